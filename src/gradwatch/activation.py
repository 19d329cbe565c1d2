"""No-code activation: ``GRADWATCH=1 python train.py``.

The wheel installs ``gradwatch_autostart.pth`` into site-packages. Its one line runs at every
interpreter start; when GRADWATCH is unset it only reads ``os.environ`` and imports nothing.
When it is set, :func:`autostart` parses the settings and, without importing torch itself, arms
a post-import hook: once the program imports torch, every optimizer gets gradwatch's global
step pre-hook. The endpoint starts at the first optimizer step (see :mod:`gradwatch.session`).
"""

from __future__ import annotations

import sys
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
        from .session import start_from_env

        start_from_env()
    except Exception as exc:  # noqa: BLE001
        print(f"gradwatch: could not start ({exc!r}); training goes on", file=sys.stderr)
