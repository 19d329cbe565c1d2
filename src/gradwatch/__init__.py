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

from .config import ExportersArg, GroupsArg, PathArg, RanksArg

__version__ = "0.1.0"
__all__ = ["__version__", "latest", "watch"]

if TYPE_CHECKING:
    from .session import Handle
    from .values import Statistics


def watch(
    model: Any = None,
    optimizer: Any = None,
    *,
    port: int | str | None = None,
    host: str | None = None,
    every: int | str | None = None,
    groups: GroupsArg | None = None,
    per_param: bool | str | None = None,
    max_params: int | str | None = None,
    max_groups: int | str | None = None,
    vanishing_threshold: float | str | None = None,
    exploding_threshold: float | str | None = None,
    update_every: int | str | None = None,
    micro_batch_size: int | str | None = None,
    loss_accumulation: str | None = None,
    noise_ema: float | str | None = None,
    backend: str | None = None,
    tls_cert: PathArg | None = None,
    tls_key: PathArg | None = None,
    tls_client_ca: PathArg | None = None,
    distributed: str | None = None,
    per_param_ranks: RanksArg | None = None,
    file_sd: PathArg | None = None,
    exporters: ExportersArg | None = None,
    # stand-ins for GRADWATCH and the launcher's variables (tests, launchers that set none)
    enabled: bool | str | None = None,
    local_rank: int | str | None = None,
    rank: int | str | None = None,
    world_size: int | str | None = None,
) -> Handle:
    """Export gradient statistics of ``optimizer`` (every optimizer if None) on ``/metrics``.

    ``model`` (a module or a list of them) supplies the dotted parameter names; without it they
    are found among the live modules. The keyword arguments override the environment variables
    (each is parsed and bounded exactly like its variable, and a string is read like the
    variable's text); None, the default, keeps the variable's value. The full list is below.

    Returns a handle with ``close()`` (also a context manager). With ``GRADWATCH=0`` or a bad
    setting it returns a disabled handle and training goes on without telemetry. A second call
    adds its model and optimizer to the running session.

    Example::

        import torch, gradwatch
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradwatch.watch(model, opt, port=0, every=2) as handle:  # port 0: any free port
            for _ in range(3):
                model(torch.randn(8, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
            stats = handle.latest()  # step 3: steps 1 and 3 are collected
            print(stats.step, stats.get("grad_l2_norm", optimizer="0"))
    """
    # The keywords above are the settings table's rows, config.KEYWORDS (a test holds the two
    # together); only those given travel on, so that a second watch() with none asks for none.
    given = {k: v for k, v in locals().items() if k not in ("model", "optimizer") and v is not None}
    from .session import watch as _watch

    return _watch(model, optimizer, **given)


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
