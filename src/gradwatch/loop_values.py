"""The training loop's values of one step (clip norm, loss scale, learning rates, ...) as a
:class:`~gradwatch.records.LoopValues` record, read without a host sync.

CPU tensors are read at once (no device to wait for); a CUDA tensor is left as a
:class:`~gradwatch.records.DeviceValue` that travels in the pinned copy of the step's partials
(:mod:`gradwatch.readback`), so reading it never synchronizes the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .records import DeviceValue, LoopValues


@dataclass(frozen=True)
class ClipRecord:
    """One call of clip_grad_norm_ (norm_type 2): its returned total norm, kept without a sync."""

    param_ids: frozenset[int]
    norm: torch.Tensor  # the 0-dim tensor clip_grad_norm_ returned (device tensor on CUDA)
    max_norm: float


@dataclass(frozen=True)
class StepWindow:
    """What the noise-scale hooks saw between the previous step and this one."""

    micro_batches: int
    first_sumsq: torch.Tensor | None  # |g_small|^2, a 0-dim float64 tensor on the grads' device


class _Reader:
    """Collects the fields of one LoopValues: host numbers now, device tensors as slots."""

    def __init__(self) -> None:
        self.fields: dict[str, float] = {}
        self.lrs: list[float] = []
        self.device: list[DeviceValue] = []

    def number(self, v: object) -> float | torch.Tensor | None:
        """A host float, a device tensor left for the readback, or None (not a number)."""
        if v is None or isinstance(v, bool):
            return None
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                return None
            return float(v) if v.device.type == "cpu" else v.detach()
        if isinstance(v, int | float):
            return float(v)
        return None

    def put(self, name: str, v: object) -> None:
        x = self.number(v)
        if isinstance(x, torch.Tensor):
            self.device.append(DeviceValue(name, None, x))
        elif x is not None:
            self.fields[name] = x

    def put_lr(self, v: object) -> None:
        x = self.number(v)
        if isinstance(x, torch.Tensor):
            self.device.append(DeviceValue("learning_rates", len(self.lrs), x))
            x = math.nan  # filled in at readback
        self.lrs.append(math.nan if x is None else x)


def read_loop_values(
    optimizer: torch.optim.Optimizer,
    scaler,
    clip: ClipRecord | None,
    inner_optimizers: Sequence[torch.optim.Optimizer],
    unreduced_tensors: int,
    window: StepWindow | None,
) -> tuple[LoopValues, list[DeviceValue]]:
    """The loop's values at this step's collection, and those still on a device."""
    r = _Reader()
    r.put("grad_scale", getattr(optimizer, "grad_scale", None))
    r.put("found_inf", getattr(optimizer, "found_inf", None))
    if scaler is not None and scaler.is_enabled():
        r.put("loss_scale", scaler._get_scale_async())  # no get_scale(): that one syncs
    if clip is not None:
        r.put("preclip_norm", clip.norm)
        r.fields["clip_max_norm"] = clip.max_norm
    groups = optimizer.param_groups
    if inner_optimizers and not any("lr" in g for g in groups):
        # a container without learning rates of its own (torchtitan's OptimizersContainer):
        # its inner optimizers' groups, numbered in order
        groups = [g for inner in inner_optimizers for g in inner.param_groups]
    for group in groups:
        r.put_lr(group.get("lr"))
    micro_batches = None
    if window is not None:
        micro_batches = window.micro_batches or None
        r.put("first_micro_batch_sumsq", window.first_sumsq)
    values = LoopValues(
        **r.fields,
        learning_rates=tuple(r.lrs),
        unreduced_tensors=unreduced_tensors,
        micro_batches=micro_batches,
    )
    return values, r.device


def with_host_values(values: LoopValues, device: Sequence[DeviceValue]) -> LoopValues:
    """``values`` with every device slot read now (paths that copy to the host anyway)."""
    return values.resolved(device, [float(d.tensor) for d in device])  # type: ignore[arg-type]
