"""The sampled parameter update: theta_t - theta_(t-1) of every parameter with a gradient, every
GRADWATCH_UPDATE_EVERY-th step.

An fp32 (or wider) snapshot of theta_(t-1) is taken at the step's pre-hook (before the closure
of a closure step, since the step may move the weights first), differenced in place at the
post-hook and reduced once over [deltas..., params...] by the same kernels as the gradients;
on CUDA the result goes through a :class:`~gradwatch.readback.Readback`. The snapshot is freed
after the step: the cost is one copy of the parameters held for one step, opt-in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed
from .kernels import N_PARTIALS
from .kernels.dispatch import Backend
from .listing import GradientListing
from .readback import Readback
from .records import Layout, UpdateReadout

UPDATE_SLOTS = 1  # sampled updates in flight (each holds no more than its partials)


@dataclass(frozen=True)
class UpdateResult:
    """What the publisher needs of one update reduction besides its values."""

    step: int
    layout: Layout


@dataclass
class _Pending:
    step: int
    layout: Layout
    params: list[torch.nn.Parameter]
    snaps: list[torch.Tensor]  # theta_(t-1), fp32 or wider


def fp32_copies(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """theta of each parameter in (at least) fp32, a copy; DTensor params (FSDP2): this rank's
    shards, which the optimizer updates in place."""
    local = distributed.local_view([p.detach() for p in params], "off").tensors
    return [x.to(torch.promote_types(x.dtype, torch.float32), copy=True) for x in local]


class UpdateSampler:
    """One optimizer's update sampling: snapshot, difference, reduce, read back."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        listing: GradientListing,
        backend: Callable[[torch.device], Backend],
        dropped: Callable[[], None],
    ) -> None:
        self.optimizer = optimizer
        self.listing = listing
        self._backend = backend
        self._dropped = dropped  # counts a sample the full ring could not take
        self.pending: _Pending | None = None  # the sampled step between its pre and post hooks
        self.early: dict[int, torch.Tensor] | None = None  # see snapshot_before_closure
        self.results: Readback[UpdateResult] = Readback(UPDATE_SLOTS)
        self.latest: UpdateReadout | None = None

    def snapshot_before_closure(self) -> None:
        """theta_(t-1) of every parameter of the optimizer, now (pre-step hook of a closure step
        that samples the update): the step may move the weights before it calls the closure
        (SAM perturbs them, then puts them back); which parameters have a gradient is only
        known after the closure, when :meth:`snapshot` picks theirs."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        snaps = fp32_copies(params)
        self.early = {id(p): x for p, x in zip(params, snaps, strict=True)}

    def snapshot(self, step: int) -> None:
        """Pre-step of a sampled step (gradients final): theta_(t-1) of the params with a grad."""
        params, _, group_of = self.listing.params_with_grads()
        if not params:
            return
        layout = self.listing.layout_for(params, group_of)
        early = self.early
        if early is not None:  # taken at the pre-step hook of a closure step
            snaps = [early.get(id(p)) for p in params]
            if any(x is None for x in snaps):
                return  # a parameter that was not in the param groups then
        else:
            snaps = fp32_copies(params)
        self.pending = _Pending(step, layout, params, snaps)  # type: ignore[arg-type]

    def reduce(self, pending: _Pending, publish: Callable[[UpdateReadout], None]) -> None:
        """Post-step: snaps <- theta_(t-1) - theta_t in place (fp32 or wider), then one reduction
        over [deltas..., params...] with the float64-accumulating kernels. The Parameters are
        read now: a step may have replaced their ``.data`` (SAM does)."""
        snaps = pending.snaps
        params = distributed.local_view([p.detach() for p in pending.params], "off").tensors
        with torch.no_grad():
            for s_, p in zip(snaps, params, strict=True):
                s_.sub_(p.detach())
        tensors = snaps + [p.detach() for p in params]
        t = len(params)
        devices = {x.device for x in tensors}
        device = tensors[0].device
        if len(devices) == 1 and device.type == "cuda":
            if self.results.full():
                self._dropped()
                return
            # Main stream: the snapshots are freed after this launch, in stream order.
            partials = self._backend(device).reduce(tensors)
            self.results.push([partials], UpdateResult(pending.step, pending.layout), device)
            return
        parts = []
        for d in sorted(devices, key=str):
            idx = [i for i, x in enumerate(tensors) if x.device == d]
            rows = self._backend(d).reduce([tensors[i] for i in idx]).to("cpu").numpy()
            parts.append((idx, rows))
        out = np.empty((2 * t, N_PARTIALS), dtype=np.float64)
        for idx, rows in parts:
            out[idx] = rows.reshape(-1, N_PARTIALS)
        publish(readout(pending.step, pending.layout, out))


def readout(step: int, layout: Layout, rows: np.ndarray) -> UpdateReadout:
    """The update's record from its [2T, N_PARTIALS] rows: deltas, then parameters."""
    t = len(layout.names)
    return UpdateReadout(step, layout, rows[:t].copy(), rows[t:].copy())
