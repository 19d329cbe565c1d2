"""No-code activation: ``GRADWATCH=1 python train.py``.

The wheel installs ``gradwatch_autostart.pth`` into site-packages. Its one line runs at every
interpreter start; when GRADWATCH is unset it only reads ``os.environ`` and imports nothing.
When it is set, :func:`autostart` parses the settings and, without importing torch itself, arms
a post-import hook: once the program imports torch, every optimizer gets gradwatch's global
step pre-hook. The endpoint starts at the first optimizer step (see :mod:`gradwatch.session`).
"""

from __future__ import annotations

import sys
import threading
import types

from .config import FALSE_WORDS, SettingError, from_env
from .imports import after_import


def wanted(value: str | None) -> bool:
    """The .pth line's test: GRADWATCH set to anything but an off word."""
    return value is not None and value.strip().lower() not in FALSE_WORDS


_ran = False


def autostart() -> None:
    """Called from the .pth line when GRADWATCH is set. Never raises; runs once per process
    (a venv's lib64 -> lib symlink makes `site` execute the same .pth file twice)."""
    global _ran
    if _ran:
        return
    _ran = True
    try:
        config = from_env()
    except SettingError as exc:
        print(f"{exc}; gradwatch telemetry is off, training goes on", file=sys.stderr)
        return
    except Exception as exc:  # noqa: BLE001 - interpreter start-up must never fail
        print(f"gradwatch: autostart failed ({exc!r}); telemetry is off", file=sys.stderr)
        return
    if not config.enabled:
        return
    after_import("torch", _start)


def _start(_torch: types.ModuleType | None = None) -> None:
    try:
        arm()
    except Exception as exc:  # noqa: BLE001
        print(f"gradwatch: could not start ({exc!r}); training goes on", file=sys.stderr)


# ---- armed: hooks in place, no session yet ----
# A process that never steps an optimizer (a spawned DataLoader worker, a tool that imports
# torch) pays only for these few wrappers: the session (numpy, the kernels, OpenTelemetry) is
# built at the first call of any of them, which then forwards to it.

_armed = False
_hooks = None  # the HookSet of the two global dispatchers
_originals: list[tuple[object, str, object]] = []  # (owner, attribute, original)


def armed() -> bool:
    """No-code mode is waiting for the first step (or has started its session)."""
    return _armed


def arm() -> None:
    """Register the global step dispatchers and the triggers; called once torch is imported."""
    global _armed, _hooks
    if _armed:
        return
    _armed = True
    import torch
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    from .hooks import HookSet
    from .stacks import ZERO_OPTIMIZERS, clip_functions

    _hooks = HookSet()
    _hooks.add(register_optimizer_step_pre_hook, _pre_step)
    _hooks.add(register_optimizer_step_post_hook, _post_step)
    for name, original, owners in clip_functions():
        for owner in owners:
            _trigger(owner, name, original, owner)
    _trigger(torch.amp.GradScaler, "step", torch.amp.GradScaler.step, torch.amp.GradScaler)
    for module_name, _ in ZERO_OPTIMIZERS:
        after_import(module_name, lambda _m: session())
    import multiprocessing

    if multiprocessing.parent_process() is None:  # not in DataLoader or other worker processes
        timer = threading.Timer(NO_STEP_WARNING_S, _warn_if_no_step)
        timer.daemon = True
        timer.start()


NO_STEP_WARNING_S = 300.0  # one line if no optimizer has stepped this long after torch import


def _warn_if_no_step() -> None:
    if _started:
        return
    print(
        f"gradwatch: GRADWATCH=1 but no optimizer has stepped in {NO_STEP_WARNING_S:.0f} s, so"
        " /metrics is not up yet; if this process trains, its optimizer is not a torch.optim"
        " Optimizer that gradwatch hooks (README, Training stacks)",
        file=sys.stderr,
        flush=True,
    )


def _trigger(owner, name: str, original, lookup) -> None:
    """Replace ``owner.name`` by a function that starts the session, then calls what the
    session put there (its own wrapper of ``original``)."""

    def start_then_call(*args, **kwargs):
        session()
        return getattr(lookup, name)(*args, **kwargs)

    start_then_call.__wrapped__ = original  # type: ignore[attr-defined]
    start_then_call.__name__ = getattr(original, "__name__", name)
    start_then_call.__doc__ = getattr(original, "__doc__", None)
    _originals.append((owner, name, original))
    setattr(owner, name, start_then_call)


def _disarm_triggers() -> None:
    while _originals:
        owner, name, original = _originals.pop()
        setattr(owner, name, original)


_started = False


def session():
    """The no-code session, built at the first trigger; None if it is off or closed."""
    from . import session as session_module

    if not _started:
        claim()
        return session_module.start_from_env(global_hooks=False)
    return session_module.live_session()


def claim() -> None:
    """The session is being built now: put the real functions back (the session wraps them,
    not the triggers); later triggers only look the session up."""
    global _started
    _started = True
    _disarm_triggers()


def _pre_step(optimizer, args, kwargs):
    s = session()
    return None if s is None else s._pre_step_hook(optimizer, args, kwargs)


def _post_step(optimizer, args, kwargs):
    from .session import live_session

    s = live_session()
    if s is not None:
        s._post_step_hook(optimizer, args, kwargs)
