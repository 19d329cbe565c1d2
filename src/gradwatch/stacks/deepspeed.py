"""DeepSpeed ZeRO (stages 1, 2 and 3): global statistics of the real model from flat partitions.

Where things are (DeepSpeed 0.19, checked on CPU ranks):

- **The step** is the ZeRO optimizer's ``step()`` (``DeepSpeedZeroOptimizer`` for stages 1/2,
  ``DeepSpeedZeroOptimizer_Stage3``), not a torch ``Optimizer``: torch's hooks never see it.
  gradwatch wraps that method once the classes are imported.
- **The final gradients** exist only inside it: for each (sub) group DeepSpeed builds one flat
  fp32 gradient of this rank's partition, unscales and clips it, then calls the inner torch
  optimizer's ``step()`` over that one flat tensor and frees the gradient. gradwatch reduces each
  flat gradient at that inner step's pre-hook (the inner optimizer gets no series of its own).
- **Partitions map to parameters** by DeepSpeed's own layout: stages 1/2 cut the group's flat
  buffer (parameters in ``round_robin_bit16_groups`` order, each followed by its alignment
  padding) into equal partitions; stage 3 partitions every parameter on its own (``ds_tensor``:
  ``ceil(numel / world)`` elements, the tail padded) and concatenates this rank's pieces. Each
  piece is a :class:`Segment`; padding belongs to none and is never counted.
- **Combining**: every rank reduces its segments into per-parameter partials rows (rows it holds
  no piece of stay zero), and one small all-reduce of the ``[T, 6]`` rows per collected step
  (per column the contract's combine: sums, and max for the max-abs column) gives every rank
  the same full per-parameter partials.
- **The clip norm** is ``_global_grad_norm`` (DeepSpeed's pre-clip global norm, unscaled), with
  ``clip_grad`` (the config's ``gradient_clipping``) as max norm; DeepSpeed's clip coefficient,
  ``clip_grad / (norm + 1e-6)`` capped at 1, is torch's. Under fp16 the loss scale is DeepSpeed's
  and a step DeepSpeed skips for overflow counts in ``amp_skipped_steps_total``.

Data parallelism only: the ZeRO group must be the whole world (no tensor or pipeline parallel).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..collector import OptimizerWatch
from ..kernels import CONTRACT
from ..loop_values import with_host_values
from ..records import DeviceValue

log = logging.getLogger("gradwatch")


@dataclass(frozen=True)
class Segment:
    """The piece of one parameter's gradient held in a flat partition."""

    row: int  # the parameter's row in the layout
    start: int  # first element in the flat partition
    length: int


@dataclass
class ZeroLayout:
    """The model's parameters in DeepSpeed's order, and where each flat partition puts them."""

    params: list[torch.nn.Parameter]
    group_of: list[int]  # optimizer param group of each row
    numel: np.ndarray  # float64 [T]: full element counts
    segments: dict[int, list[Segment]]  # id(flat fp32 partition) -> its segments
    rank: int

    @staticmethod
    def build(zero) -> ZeroLayout:
        if hasattr(zero, "fp32_partitioned_groups_flat"):
            return _stage3_layout(zero)
        return _stage12_layout(zero)


def _rank(group) -> int:
    return torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0


def _stage12_layout(zero) -> ZeroLayout:
    params, group_of, numel, segments = [], [], [], {}
    paddings = getattr(zero, "round_robin_bit16_padding", None)
    rank = 0
    for i, group in enumerate(zero.round_robin_bit16_groups):
        rank = _rank(zero.real_dp_process_group[i])
        size = int(zero.partition_size[i])
        start, end = rank * size, (rank + 1) * size
        pads = paddings[i] if paddings is not None else [0] * len(group)
        segs, offset = [], 0
        for p, pad in zip(group, pads, strict=True):
            lo, hi = max(offset, start), min(offset + p.numel(), end)
            row = len(params)
            if lo < hi:
                segs.append(Segment(row, lo - start, hi - lo))
            params.append(p)
            group_of.append(i)
            numel.append(p.numel())
            offset += p.numel() + int(pad)
        segments[id(zero.single_partition_of_fp32_groups[i])] = segs
    return ZeroLayout(params, group_of, np.array(numel, dtype=np.float64), segments, rank)


def _stage3_layout(zero) -> ZeroLayout:
    params, group_of, numel, segments = [], [], [], {}
    rank = _rank(zero.dp_process_group)
    for sg, group in enumerate(zero.fp16_groups):
        segs, offset = [], 0
        for p in group:
            piece = int(p.ds_tensor.ds_numel)  # this rank's partition of p, padding included
            valid = min(piece, max(0, int(p.ds_numel) - rank * piece))
            row = len(params)
            if valid:
                segs.append(Segment(row, offset, valid))
            params.append(p)
            group_of.append(int(zero.sub_group_to_group_id[sg]))
            numel.append(int(p.ds_numel))
            offset += piece
        segments[id(zero.fp32_partitioned_groups_flat[sg])] = segs
    return ZeroLayout(params, group_of, np.array(numel, dtype=np.float64), segments, rank)


def inner_optimizers(zero) -> list[torch.optim.Optimizer]:
    """The torch optimizers a ZeRO optimizer steps (``backup_optimizer``: stage 3 offload)."""
    found = []
    for name in ("optimizer", "backup_optimizer"):
        inner = getattr(zero, name, None)
        if isinstance(inner, torch.optim.Optimizer):
            found.append(inner)
    return found


def _partition_device(zero) -> torch.device:
    """The device of the ZeRO optimizer's flat partitions (its inner optimizer's params)."""
    for inner in inner_optimizers(zero):
        for group in inner.param_groups:
            for flat in group["params"]:
                return flat.device
    return torch.device("cpu")


class ZeroWatch(OptimizerWatch):
    """Watches one DeepSpeed ZeRO optimizer; ``optimizer_ref`` is the ZeRO optimizer."""

    samples_updates = False  # GRADWATCH_UPDATE_EVERY: DeepSpeed updates flat fp32 copies
    noise_scale_unsupported = "under DeepSpeed ZeRO"

    # ---- the ZeRO step (see module docstring) ----
    def begin_zero_step(self) -> None:
        self.begin_step()
        self._rows: list[tuple[int, torch.Tensor]] = []  # (id of the flat partition, partials)
        self._inner_steps = 0
        self._collecting = self._due(self.config.every)
        try:
            zero = self.optimizer_ref
            # the scale this step's gradients were computed with (step() may change it)
            self._loss_scale = (
                float(zero.loss_scale) if getattr(zero, "dtype", None) == torch.float16 else None
            )
        except Exception as exc:  # noqa: BLE001
            self._loss_scale = None
            self.errors.record("collect", exc)

    def on_inner_step(self, inner: torch.optim.Optimizer) -> None:
        """Pre-hook of the inner torch optimizer: reduce the flat gradients it is about to apply
        (unscaled and clipped by DeepSpeed) into per-segment partials, on their device."""
        self._inner_steps += 1
        if not self._collecting:
            return
        try:
            layout = self._zero_layout()
            for group in inner.param_groups:
                for flat in group["params"]:
                    segs = layout.segments.get(id(flat))
                    if not segs or flat.grad is None:
                        continue
                    g = flat.grad.reshape(-1)
                    views = [g.narrow(0, s.start, s.length) for s in segs]
                    self._rows.append((id(flat), self._backend(g.device).reduce(views)))
        except Exception as exc:  # noqa: BLE001
            self._collecting = False
            self.errors.record("collect", exc)

    def end_zero_step(self) -> None:
        """After the ZeRO step: count a skipped step, or combine and publish the partials."""
        try:
            zero = self.optimizer_ref
            if self._inner_steps == 0:
                if getattr(zero, "overflow", False):
                    self.count_skipped()
                return
            self.collect_step()  # the shared second half: cadence, timing, then _collect
        except Exception as exc:  # noqa: BLE001 - telemetry never raises into training
            self.errors.record("collect", exc)
        finally:
            self._rows = []

    def _collect(self, clip=None) -> None:
        if not self._collecting:  # an inner step failed to reduce (counted)
            # Still join the ranks' combine, with no rows of its own: a rank that skipped it
            # would leave its peers waiting in the all-reduce. Its peers' values of this step
            # then miss this rank's pieces; the failure shows in gradwatch_errors_total.
            self._rows = []
        self._publish_rows(self.optimizer_ref)

    def _row_index(self, flat_id: int, device: torch.device) -> torch.Tensor:
        """The layout rows of a flat partition's segments, on ``device`` (copied once)."""
        cache = self.__dict__.setdefault("_row_indexes", {})
        index = cache.get((flat_id, device))
        if index is None:
            rows = [s.row for s in self._zero_layout().segments[flat_id]]
            index = torch.tensor(rows, dtype=torch.long)
            if device.type != "cpu":
                # pinned: an asynchronous copy, no host sync (once per layout, not per step)
                index = index.pin_memory().to(device, non_blocking=True)
            cache[(flat_id, device)] = index
        return index

    def _zero_layout(self) -> ZeroLayout:
        layout = getattr(self, "_layout_cache", None)
        if layout is None:
            layout = self._layout_cache = ZeroLayout.build(self.optimizer_ref)
        return layout

    def _publish_rows(self, zero) -> None:
        zl = self._zero_layout()
        layout = self.listing.layout_for(zl.params, zl.group_of)
        t = len(zl.params)
        # every rank must pick the same device (hence collective backend) as its peers: that of
        # the flat partitions (CPU under ZeRO-Offload), also on a rank that has no rows
        device = self._rows[0][1].device if self._rows else _partition_device(zero)
        full = CONTRACT.zeros(t, device)  # identity rows of both combines
        for flat_id, partials in self._rows:
            # at most one segment of a parameter per flat partition and rank: plain assignment
            full.index_copy_(0, self._row_index(flat_id, device), partials)
        loop, device_values = self._loop_values(None)
        norm, max_norm = getattr(zero, "_global_grad_norm", None), getattr(zero, "clip_grad", 0)
        changes: dict[str, float] = {}
        if max_norm and max_norm > 0 and norm is not None:
            changes["clip_max_norm"] = float(max_norm)
            if isinstance(norm, torch.Tensor) and norm.device.type != "cpu":
                device_values.append(DeviceValue("preclip_norm", None, norm.detach().reshape(())))
            else:
                changes["preclip_norm"] = float(norm)
        if self._loss_scale is not None:
            changes["loss_scale"] = self._loss_scale
        loop = dataclasses.replace(loop, **changes)
        owned = np.ones(t, dtype=bool)  # rows without a piece here are zero: identity of both ops
        combine = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if device.type == "cuda":
            self._launch_cuda(
                device,
                lambda: full,
                layout,
                zl.numel,
                loop,
                device_values,
                owned if combine else None,
            )
            return
        loop = with_host_values(loop, device_values)
        self._publish_host(full, layout, zl.numel, loop, owned if combine else None)


def patch(session, module, class_name: str) -> tuple[type, dict[str, object]] | None:
    """Wrap ``__init__`` and ``step`` of one ZeRO optimizer class; returns what to restore."""
    cls = getattr(module, class_name, None)
    if cls is None or getattr(cls.step, "_gradwatch_session", None) is not None:
        return None
    init, step = cls.__init__, cls.step

    def __init__(zero, *args, **kwargs):  # noqa: N807 - the wrapped method
        # DeepSpeed steps its inner optimizer while building (stage 3 initialises its state):
        # no series for those steps, nor later for the inner optimizer.
        with session.inner_scope(None):
            init(zero, *args, **kwargs)
        session.mark_inner(inner_optimizers(zero))

    def wrapped_step(zero, *args, **kwargs):
        watch = session.zero_watch_for(zero)
        if watch is None:
            return step(zero, *args, **kwargs)
        watch.begin_zero_step()
        try:
            with session.inner_scope(watch):
                return step(zero, *args, **kwargs)
        finally:
            watch.end_zero_step()

    for name, fn, original in (("__init__", __init__, init), ("step", wrapped_step, step)):
        fn.__wrapped__ = original  # type: ignore[attr-defined]
        fn._gradwatch_session = session  # type: ignore[attr-defined]
        fn.__name__, fn.__qualname__, fn.__doc__ = name, original.__qualname__, original.__doc__
    cls.__init__, cls.step = __init__, wrapped_step
    return cls, {"__init__": init, "step": step}


def unpatch(session, cls: type, originals: dict[str, object]) -> None:
    for name, original in originals.items():
        if getattr(getattr(cls, name), "_gradwatch_session", None) is session:
            setattr(cls, name, original)
