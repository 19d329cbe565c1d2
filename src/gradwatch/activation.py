"""No-code activation: ``GRADWATCH=1 python train.py``.

The wheel installs ``gradwatch_autostart.pth`` into site-packages. Its one line runs at every
interpreter start; when GRADWATCH is unset it only reads ``os.environ`` and imports nothing.
When it is set, :func:`autostart` parses the settings and, without importing torch itself, arms
a post-import hook: once the program imports torch, every optimizer gets gradwatch's global
step pre-hook. The endpoint starts at the first optimizer step (see :mod:`gradwatch.session`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

from .config import FALSE_WORDS, SettingError, from_env


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
    if "torch" in sys.modules:
        _start()
    else:
        sys.meta_path.insert(0, _TorchImportWatcher())


def _start() -> None:
    try:
        from .session import start_from_env

        start_from_env()
    except Exception as exc:  # noqa: BLE001
        print(f"gradwatch: could not start ({exc!r}); training goes on", file=sys.stderr)


class _NotifyingLoader(importlib.abc.Loader):
    """Delegates to torch's own loader, then starts gradwatch once torch is fully imported."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__.loader = self._inner  # leave no trace on torch's module spec
        self._inner.exec_module(module)
        _start()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _TorchImportWatcher(importlib.abc.MetaPathFinder):
    """Waits for ``import torch`` (by anyone), then removes itself."""

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch" or self._searching:
            return None
        self._searching = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching = False
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _NotifyingLoader(spec.loader)
        return spec
