"""gradwatch: exact, self-describing gradient statistics of a PyTorch run on Prometheus /metrics.

Importing this package is cheap: torch and OpenTelemetry load only when something is watched.

Example::

    import torch, gradwatch
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gradwatch.watch(model, opt, port=0)   # port 0: any free port
    model(torch.randn(8, 4)).sum().backward()
    opt.step()                                      # first step starts /metrics
    print(f"http://127.0.0.1:{handle.port}/metrics")
    handle.close()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "latest", "watch"]

if TYPE_CHECKING:
    from .session import Handle
    from .values import Statistics


def watch(model: Any = None, optimizer: Any = None, **settings: Any) -> Handle:
    """Export gradient statistics of ``optimizer`` (every optimizer if None) on ``/metrics``.

    ``model`` (a module or a list of them) supplies the dotted parameter names; without it they
    are found among the live modules. ``settings`` override the environment variables (each is
    parsed and bounded exactly like its variable; None keeps the variable's value); the full
    list is below.

    Returns a handle with ``close()`` (also a context manager). With ``GRADWATCH=0`` or a bad
    setting it returns a disabled handle and training goes on without telemetry. A second call
    adds its model and optimizer to the running session.
    """
    from .session import watch as _watch

    return _watch(model, optimizer, **settings)


def _document_settings() -> None:
    from .config import arguments_doc

    watch.__doc__ = (watch.__doc__ or "") + "\n    Settings:\n\n" + arguments_doc() + "\n"


_document_settings()


def latest() -> Statistics:
    """The latest statistics of this process's session (no-code mode or ``watch()``), as a
    typed object; empty (``step`` None) before the first collected step or when off.

    Example::

        import gradwatch
        stats = gradwatch.latest()
        if stats.step is not None:
            print(stats.step, stats.get("grad_l2_norm", optimizer="0"))
    """
    from .session import live_session
    from .values import build

    return build(live_session())
