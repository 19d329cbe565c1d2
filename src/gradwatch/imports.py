"""Post-import hooks: run a function once a module has been imported, by anyone.

No-code mode uses it to start once the program imports torch, and the stack adapters to patch a
trainer's classes (DeepSpeed ZeRO) once the program imports them. Standard library only: this
runs at interpreter start-up.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Callable

_lock = threading.Lock()
_pending: dict[str, list[Callable[[types.ModuleType], None]]] = {}


def after_import(name: str, callback: Callable[[types.ModuleType], None]) -> None:
    """Call ``callback(module)`` once module ``name`` is fully imported: now if it already is,
    else right after its import finishes. ``callback`` must not raise."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__spec__", None) is not None:
        if not getattr(module.__spec__, "_initializing", False):
            callback(module)
            return
    with _lock:
        _pending.setdefault(name, []).append(callback)
        if not any(isinstance(f, _ImportWatcher) for f in sys.meta_path):
            sys.meta_path.insert(0, _ImportWatcher())


def cancel(callback: Callable[[types.ModuleType], None]) -> None:
    """Forget a callback that has not run yet."""
    with _lock:
        for callbacks in _pending.values():
            while callback in callbacks:
                callbacks.remove(callback)


class _NotifyingLoader(importlib.abc.Loader):
    """Delegates to the module's own loader, then runs the callbacks."""

    def __init__(self, inner: importlib.abc.Loader, callbacks: list) -> None:
        self._inner = inner
        self._callbacks = callbacks

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__.loader = self._inner  # leave no trace on the module's spec
        self._inner.exec_module(module)
        callbacks = self._callbacks
        while callbacks:
            for callback in callbacks:
                callback(module)
            # callbacks may ask for this module again (it still reads as initializing here)
            with _lock:
                callbacks = _pending.pop(module.__name__, [])

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """Intercepts the imports of the modules in ``_pending``; removes itself when none is left."""

    def __init__(self) -> None:
        self._searching: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _pending or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.discard(fullname)
        with _lock:
            callbacks = _pending.pop(fullname, [])
            if not _pending and self in sys.meta_path:
                sys.meta_path.remove(self)
        if spec is None or spec.loader is None or not callbacks:
            return None
        spec.loader = _NotifyingLoader(spec.loader, callbacks)
        return spec
