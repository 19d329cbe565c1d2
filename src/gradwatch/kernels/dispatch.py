"""Choosing the reduction backend for a device: the fastest one that works here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger("gradwatch")


@dataclass(frozen=True)
class Backend:
    """A named implementation of the partials contract of :mod:`gradwatch.kernels`."""

    name: str
    partials: Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _torch(device: torch.device) -> Backend:
    from .torch_fallback import device_partials, torch_partials

    # On the CPU: the host-side fallback (fastest there); elsewhere: sync-free device ops.
    return Backend("torch", torch_partials if device.type == "cpu" else device_partials)


def _native() -> Backend | None:
    from .cpu_native import native_available, native_partials

    return Backend("native", native_partials) if native_available() else None


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
