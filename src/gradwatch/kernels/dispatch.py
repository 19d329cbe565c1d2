"""Choosing the reduction backend for a device: the fastest one that works here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("gradwatch")


_is_contiguous = torch.Tensor.is_contiguous
STRIDED_CHUNK_ELEMENTS = 1 << 22  # a non-dense gradient is copied at most this much at a time


@dataclass(frozen=True)
class Backend:
    """A named implementation of the partials contract of :mod:`gradwatch.kernels`."""

    name: str
    partials: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    # ``partials`` for contiguous tensors the caller has checked (see ``reduce``), if it has one
    prepared: Callable[[Sequence[torch.Tensor], set, np.ndarray], torch.Tensor] | None = None

    def reduce(
        self, tensors: Sequence[torch.Tensor], prepared: tuple[set, np.ndarray] | None = None
    ) -> torch.Tensor:
        """``partials``, but a strided tensor that is not dense (``x[:, ::2]``), which a kernel
        can only read through a contiguous copy, is reduced in chunks of at most
        STRIDED_CHUNK_ELEMENTS elements: transient memory stays bounded. Sync-free.

        ``prepared``: (set of the tensors' dtypes, int64 array of their numel) from a caller
        that has checked that every tensor is a plain (not a subclass) CPU tensor of a dtype
        the kernels read; lets the native kernel skip its own checks."""
        if all(map(_is_contiguous, tensors)):  # the usual case: one C call per tensor
            if prepared is not None and self.prepared is not None:
                return self.prepared(tensors, *prepared)
            return self.partials(tensors)
        from .torch_fallback import is_non_overlapping_and_dense

        strided_rows = [
            i
            for i, t in enumerate(tensors)
            if not t.is_contiguous() and not is_non_overlapping_and_dense(t)
        ]
        if not strided_rows:
            return self.partials(tensors)
        holes = set(strided_rows)
        out = self.partials([t[:0] if i in holes else t for i, t in enumerate(tensors)])
        for i in strided_rows:
            rows = torch.cat([self.partials([c]) for c in _chunks(tensors[i])])
            out[i] = combine_rows(rows)
        return out


def combine_rows(rows: torch.Tensor) -> torch.Tensor:
    """The partials of a tensor from those of its pieces (each column's contract rule)."""
    from .contract import combine_pieces

    return combine_pieces(rows)


def _chunks(t: torch.Tensor):
    """Views of ``t`` along its first dimensions, each of at most STRIDED_CHUNK_ELEMENTS
    elements (or one element row of the last dimension)."""
    if t.numel() <= STRIDED_CHUNK_ELEMENTS or t.dim() <= 1:
        if t.dim() == 1 and t.numel() > STRIDED_CHUNK_ELEMENTS:
            for a in range(0, t.numel(), STRIDED_CHUNK_ELEMENTS):
                yield t[a : a + STRIDED_CHUNK_ELEMENTS]
        else:
            yield t
        return
    per_row = t[0].numel()
    if per_row > STRIDED_CHUNK_ELEMENTS:
        for row in t:
            yield from _chunks(row)
        return
    step = max(1, STRIDED_CHUNK_ELEMENTS // per_row)
    for a in range(0, t.shape[0], step):
        yield t[a : a + step]


def _torch(device: torch.device) -> Backend:
    from .torch_fallback import device_partials, torch_partials

    # On the CPU: the host-side fallback (fastest there); elsewhere: sync-free device ops.
    return Backend("torch", torch_partials if device.type == "cpu" else device_partials)


def _native() -> Backend | None:
    from .cpu_native import native_available, native_partials, native_partials_prepared

    if not native_available():
        return None
    return Backend("native", native_partials, native_partials_prepared)


def _triton() -> Backend | None:
    from .triton_reduce import triton_available, triton_partials

    return Backend("triton", triton_partials) if triton_available() else None


def select_backend(device: torch.device, preference: str = "auto") -> Backend:
    """auto: Triton on CUDA, the compiled C kernel on the CPU; plain torch ops when neither works.

    An explicit preference that cannot run on this device falls back the same way, with a warning.
    """
    if device.type == "cuda":
        candidates = {"auto": _triton, "triton": _triton}.get(preference)
    elif device.type == "cpu":
        candidates = {"auto": _native, "native": _native, "triton": _triton}.get(preference)
    else:
        candidates = None
    chosen = candidates() if candidates is not None else None
    if chosen is None:
        if preference not in ("auto", "torch"):
            log.warning(
                "gradwatch: backend %r is not available for %s; using torch ops", preference, device
            )
        chosen = _torch(device)
    return chosen
