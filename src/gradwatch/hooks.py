"""gradwatch's optimizer hooks, kept eager under ``torch.compile`` without importing dynamo.

``torch.compiler.disable`` would keep a hook out of a compiled ``opt.step`` (no graph, no graph
break added), but calling it imports ``torch._dynamo``: about a second of CPU time in every
process, most of which never compile anything. So hooks are registered as plain functions, and
the moment ``torch._dynamo`` is imported (``torch.compile`` does, before it traces) each
registered entry is replaced in place by its ``torch.compiler.disable`` wrapper.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from . import imports

_DYNAMO = "torch._dynamo"


class HookSet:
    """The hooks one owner registered; removed together."""

    def __init__(self) -> None:
        self._entries: list[tuple[Any, Callable]] = []  # (RemovableHandle, plain function)
        self._lock = threading.Lock()
        self._compiling = False
        imports.after_import(_DYNAMO, self._make_eager)

    def add(self, register: Callable[[Callable], Any], fn: Callable) -> Any:
        """``register(fn)`` (e.g. ``optimizer.register_step_pre_hook``); returns its handle."""
        with self._lock:
            handle = register(_disabled(fn) if self._compiling else fn)
            self._entries.append((handle, fn))
        return handle

    def _make_eager(self, _dynamo=None) -> None:
        with self._lock:
            self._compiling = True
            for handle, fn in self._entries:
                hooks = handle.hooks_dict_ref()
                if hooks is not None and handle.id in hooks:
                    hooks[handle.id] = _disabled(fn)  # same key: the hook keeps its place

    def remove_all(self) -> None:
        imports.cancel(self._make_eager)
        with self._lock:
            for handle, _ in self._entries:
                handle.remove()
            self._entries.clear()


def _disabled(fn: Callable) -> Callable:
    import torch

    return torch.compiler.disable(fn)


def dynamo_loaded() -> bool:
    return _DYNAMO in sys.modules
