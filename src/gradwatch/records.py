"""Typed records of one watched step: what collection produces and the catalog reads.

Collection fills them (:mod:`gradwatch.collector`), the catalog turns them into values
(:mod:`gradwatch.catalog`), the exporter and :mod:`gradwatch.values` only pick which records to
read. Nothing here computes a statistic: formulas live in the catalog.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .kernels import CONTRACT, INF, MAXABS, NAN, SUMABS, SUMSQ, ZERO

NONFINITE_NAMES = 5  # params named in grad_nonfinite_param_info and the incident log line


@dataclass(frozen=True)
class Aggregate:
    """Per-tensor partials of one set of gradient tensors, in float64 (numpy arrays of length T).

    The six columns of the contract by name, and any column by its contract name
    (:meth:`column`): a statistic of a new column reads it without a change here."""

    sumsq: np.ndarray
    sumabs: np.ndarray
    maxabs: np.ndarray
    nan: np.ndarray
    inf: np.ndarray
    zero: np.ndarray
    numel: np.ndarray
    partials: np.ndarray | None = None  # the [T, N_PARTIALS] rows these columns come from

    @staticmethod
    def of(partials: np.ndarray, numel: np.ndarray) -> Aggregate:
        """The columns of ``[T, N_PARTIALS]`` partials (see :mod:`gradwatch.kernels`)."""
        return Aggregate(
            sumsq=partials[:, SUMSQ],
            sumabs=partials[:, SUMABS],
            maxabs=partials[:, MAXABS],
            nan=partials[:, NAN],
            inf=partials[:, INF],
            zero=partials[:, ZERO],
            numel=numel,
            partials=partials,
        )

    def column(self, name: str) -> np.ndarray:
        """One column by its name in :data:`gradwatch.kernels.CONTRACT` (``"SUMSQ"``, ...)."""
        if self.partials is None:
            raise ValueError("this aggregate was not built from partials (Aggregate.of)")
        return self.partials[:, CONTRACT.by_name[name].index]

    @property
    def tensors(self) -> int:
        return int(self.sumsq.shape[0])

    @property
    def elements(self) -> int:
        return int(self.numel.sum())

    @property
    def nonfinite(self) -> int:
        return int(self.nan.sum() + self.inf.sum())

    def tensor_norms(self) -> np.ndarray:
        return np.sqrt(self.sumsq)


@dataclass(frozen=True)
class Layout:
    """Which parameter each row of the partials belongs to, fixed while the set of grads is."""

    names: tuple[str, ...]
    groups: tuple[str, ...]  # group label of each row
    group_rows: dict[str, np.ndarray]

    @staticmethod
    def build(names: Sequence[str], groups: Sequence[str]) -> Layout:
        order = list(dict.fromkeys(groups))
        garr = np.array(groups, dtype=object)
        rows = {g: np.flatnonzero(garr == g) for g in order}
        return Layout(tuple(names), tuple(groups), rows)


@dataclass(frozen=True)
class LoopValues:
    """Values the training loop computed for one collected step (None: not known this step).

    Read at the step's collection; a value held in a device tensor travels in the pinned copy
    of the step's partials (:class:`DeviceValue`) and is filled in by :meth:`resolved`.
    """

    preclip_norm: float | None = None  # what clip_grad_norm_ returned (or the norm given)
    clip_max_norm: float | None = None
    loss_scale: float | None = None  # GradScaler's scale before this step's update
    grad_scale: float | None = None  # a fused optimizer's grad_scale: its grads are scaled
    found_inf: float | None = None  # a fused optimizer's found_inf: nonzero, step skipped
    learning_rates: tuple[float, ...] = ()  # per param group; NaN: the group's lr is no number
    unreduced_tensors: int = 0  # gradients no kernel can read (left out of the partials)
    micro_batches: int | None = None  # backward passes of the step's window (noise scale)
    first_micro_batch_sumsq: float | None = None  # |g_small|^2 of the window (noise scale)

    def resolved(self, slots: Sequence[DeviceValue], values: Sequence[float]) -> LoopValues:
        """These values with each device slot's host value filled in."""
        if not slots:
            return self
        changes: dict[str, object] = {}
        lrs = list(self.learning_rates)
        for slot, v in zip(slots, values, strict=True):
            if slot.group is None:
                changes[slot.field] = float(v)
            else:
                lrs[slot.group] = float(v)
        return dataclasses.replace(self, **changes, learning_rates=tuple(lrs))


@dataclass(frozen=True)
class DeviceValue:
    """A loop value held in a one-element device tensor: a field of :class:`LoopValues`
    (``group``: its index in ``learning_rates``), read without a host sync."""

    field: str
    group: int | None
    tensor: object = None  # torch.Tensor (not imported here: records stay plain data)

    def without_tensor(self) -> DeviceValue:
        """The slot alone, once its value is on its way in a packet."""
        return DeviceValue(self.field, self.group)


@dataclass(frozen=True)
class NoiseEstimate:
    """The gradient noise scale's bias-corrected EMAs after one step (see catalog)."""

    trace_sigma: float
    true_grad_sq_norm: float


class Readout:
    """Host-side partials of one collected step and the loop's values for it."""

    def __init__(
        self,
        step: int,
        layout: Layout,
        partials: np.ndarray,
        numel: np.ndarray,
        loop: LoopValues | None = None,
        local: np.ndarray | None = None,
    ) -> None:
        self.step = step
        self.layout = layout
        self.partials = partials  # combined across ranks when distributed combining is on
        self.numel = numel
        self.local = partials if local is None else local  # this rank's own shards, uncombined
        self.loop = loop or LoopValues()
        self.noise: NoiseEstimate | None = None  # set when it is published (noise scale on)

    def aggregate(self, rows: np.ndarray | slice = slice(None), local: bool = False) -> Aggregate:
        return Aggregate.of((self.local if local else self.partials)[rows], self.numel[rows])

    @functools.cached_property
    def nonfinite(self) -> bool:
        return bool(self.partials[:, NAN].any() or self.partials[:, INF].any())

    @functools.cached_property
    def nonfinite_params(self) -> list[str]:
        """Names of the params whose gradient held NaN/Inf, first NONFINITE_NAMES, in order."""
        if not self.nonfinite:
            return []
        rows = np.flatnonzero((self.partials[:, NAN] > 0) | (self.partials[:, INF] > 0))
        return [self.layout.names[i] for i in rows[:NONFINITE_NAMES]]


class UpdateReadout:
    """Partials of theta_t - theta_(t-1) (``delta``) and of theta_t (``param``) of one step."""

    def __init__(self, step: int, layout: Layout, delta: np.ndarray, param: np.ndarray) -> None:
        self.step, self.layout, self.delta, self.param = step, layout, delta, param

    def aggregates(self, rows: np.ndarray | slice = slice(None)) -> tuple[Aggregate, Aggregate]:
        """(update, parameter) aggregates of some rows (element counts are not kept: 0)."""
        none = np.zeros(len(self.layout.names))[rows]
        return Aggregate.of(self.delta[rows], none), Aggregate.of(self.param[rows], none)


@dataclass(frozen=True)
class WatchSnapshot:
    """One consistent view of a watch, pinned for the duration of one scrape."""

    readout: Readout | None
    collected_steps: int
    nonfinite_steps: int
    amp_skipped_steps: int
    dropped_steps: int
    collect_seconds: float
    clipped_steps: int = 0
    preclip_nonfinite_steps: int = 0
    max_norm_since_last: float = math.nan
    norms_since_last: tuple[float, ...] = ()
    update: UpdateReadout | None = None
    last_nonfinite: Readout | None = None  # the latest collected step that held NaN/Inf


@dataclass(frozen=True)
class ProcessView:
    """What gradwatch reports about itself, process-wide."""

    errors: tuple[tuple[str, int], ...]  # (stage, count), sorted by stage
    backends: tuple[str, ...]  # reduction backends in use, sorted
    version: str
