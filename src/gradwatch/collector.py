"""Collection: from an optimizer's gradients to a published :class:`Readout`.

At each collected optimizer step (the pre-step hook, so after any clipping the loop did) the
watch lists the gradients the optimizer is about to apply, runs the fused reduction once over
them (six float64 partials per tensor, see :mod:`gradwatch.kernels`) and publishes the result.

On the CPU the reduction runs inline and is published at once. On CUDA it runs on a side stream
that waits for the producing stream; the main stream waits (on the device, never the host) for
the reduction before it goes on, so no later in-place write or free of a gradient can race with
it; the small result is copied to pinned host memory and read a step later, or by a scrape, once
its event reports completion. If results are still in flight when the ring is full the sample is
dropped and counted: the training thread never waits for telemetry.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import is_not

import numpy as np
import torch

from . import catalog, distributed
from .catalog import Aggregate, Statistic, Thresholds
from .config import Config
from .kernels import INF, MAXABS, N_PARTIALS, NAN, SUMABS, SUMSQ, ZERO, unscale
from .kernels.dispatch import Backend, select_backend

log = logging.getLogger("gradwatch")

_REDUCIBLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_STRIDED = torch.strided
_STRIDED_ONLY = {torch.strided}
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
# Unbound C-level accessors: map() over them costs a fraction of a Python-level loop per tensor.
_get_grad = torch.Tensor.grad.__get__
_get_is_cpu = torch.Tensor.is_cpu.__get__
_get_dtype = torch.Tensor.dtype.__get__
_get_layout = torch.Tensor.layout.__get__
_numel = torch.Tensor.numel
RING_SLOTS = 2  # results in flight per device before a new sample is dropped
NONFINITE_NAMES = 5  # params named in grad_nonfinite_param_info and the incident log line
INCIDENT_LOG_INTERVAL_S = 60.0  # at most one non-finite incident line per this many seconds
PENDING_NORMS = 1 << 16  # per-step norms held between scrapes before they go to the histogram


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


class Readout:
    """Host-side partials of one collected step; statistics are computed lazily, once."""

    def __init__(
        self,
        step: int,
        layout: Layout,
        partials: np.ndarray,
        numel: np.ndarray,
        context: dict[str, float] | None = None,
        local: np.ndarray | None = None,
    ) -> None:
        self.step = step
        self.layout = layout
        self.partials = partials  # combined across ranks when distributed combining is on
        self.numel = numel
        self.local = partials if local is None else local  # this rank's own shards, uncombined
        # Per-step values of the loop, keyed as OptimizerWatch._context writes them
        # (loss_scale, preclip_norm, clip_max_norm, lr:<group>, unreduced_tensors, noise_*).
        # A missing key: not known for this step.
        self.context = context or {}

    @functools.cached_property
    def total_norm(self) -> float:
        """grad_l2_norm of this step (NaN if the step held NaN/Inf)."""
        return math.nan if self.nonfinite else math.sqrt(float(self.partials[:, SUMSQ].sum()))

    @functools.cached_property
    def clip_coefficient(self) -> float:
        norm, max_norm = self.context.get("preclip_norm"), self.context.get("clip_max_norm")
        if norm is None or max_norm is None or not math.isfinite(norm):
            return math.nan  # a NaN/Inf pre-clip norm: counted, never shown as a coefficient
        return min(1.0, max_norm / (norm + 1e-6))  # as clip_grad_norm_ computes it

    @functools.cached_property
    def nonfinite_params(self) -> list[str]:
        """Names of the params whose gradient held NaN/Inf, first NONFINITE_NAMES, in order."""
        if not self.nonfinite:
            return []
        rows = np.flatnonzero((self.partials[:, NAN] > 0) | (self.partials[:, INF] > 0))
        return [self.layout.names[i] for i in rows[:NONFINITE_NAMES]]

    def aggregate(self, rows: np.ndarray | slice = slice(None), local: bool = False) -> Aggregate:
        p = (self.local if local else self.partials)[rows]
        return Aggregate(
            sumsq=p[:, SUMSQ],
            sumabs=p[:, SUMABS],
            maxabs=p[:, MAXABS],
            nan=p[:, NAN],
            inf=p[:, INF],
            zero=p[:, ZERO],
            numel=self.numel[rows],
        )

    @functools.cached_property
    def nonfinite(self) -> bool:
        return bool(self.partials[:, NAN].any() or self.partials[:, INF].any())

    def observations(
        self, stat: Statistic, thresholds: Thresholds, max_params: int
    ) -> list[tuple[dict[str, str], float]]:
        """(labels, value) pairs of one catalog statistic; non-finite values are left out."""
        assert stat.compute is not None
        if stat.scope == catalog.GLOBAL:
            sets: Iterable[tuple[dict[str, str], Aggregate]] = [({}, self.aggregate())]
        elif stat.scope == catalog.RANK:
            sets = [({}, self.aggregate(local=True))]
        elif stat.scope == catalog.GROUP:
            sets = (({"group": g}, self.aggregate(r)) for g, r in self.layout.group_rows.items())
        else:
            count = min(max_params, len(self.layout.names))
            sets = (
                ({"param": self.layout.names[i]}, self.aggregate(slice(i, i + 1)))
                for i in range(count)
            )
        out = []
        for labels, agg in sets:
            value = stat.compute(agg, thresholds)
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for kind, v in items:
                if math.isfinite(v):
                    out.append(({**labels, "kind": kind} if kind else labels, float(v)))
        return out


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


@dataclass
class _InFlight:
    step: int
    layout: Layout
    numel: np.ndarray
    host: torch.Tensor  # pinned [T*6 + K]: partials, then the K device context values
    done: torch.cuda.Event
    context: dict[str, float]  # host-known context values
    device_keys: tuple[str, ...]  # names of the K device context values
    combined: bool = False  # host also holds this rank's uncombined partials after the K values


class ErrorLog:
    """Counts failures by stage and logs each stage's first one, then every 1000th."""

    # Exported at 0 from the start, so rate()/increase() see the first failure too.
    STAGES = ("collect", "readout", "export", "server", "names", "http")

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(self.STAGES, 0)
        self._lock = threading.Lock()

    def nonzero(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if v}

    def record(self, stage: str, exc: BaseException, logged: bool = False) -> None:
        """Count a failure; ``logged``: the caller already wrote a clear line for it."""
        with self._lock:
            n = self.counts.get(stage, 0) + 1
            self.counts[stage] = n
        if not logged and (n == 1 or n % 1000 == 0):
            log.warning(
                "gradwatch: %s failed (%d so far, training goes on): %r",
                stage,
                n,
                exc,
                exc_info=n == 1,
            )


@dataclass(frozen=True)
class ClipRecord:
    """One call of clip_grad_norm_ (norm_type 2): its returned total norm, kept without a sync."""

    param_ids: frozenset[int]
    norm: torch.Tensor  # the 0-dim tensor clip_grad_norm_ returned (device tensor on CUDA)
    max_norm: float


class UpdateReadout:
    """Partials of theta_t - theta_(t-1) (``delta``) and of theta_t (``param``) of one step."""

    def __init__(self, step: int, layout: Layout, delta: np.ndarray, param: np.ndarray) -> None:
        self.step, self.layout, self.delta, self.param = step, layout, delta, param

    def values(self, what: str, rows: np.ndarray | slice = slice(None)) -> float:
        d, p = self.delta[rows], self.param[rows]
        if d[:, NAN].any() or d[:, INF].any() or p[:, NAN].any() or p[:, INF].any():
            return math.nan
        update, param = math.sqrt(d[:, SUMSQ].sum()), math.sqrt(p[:, SUMSQ].sum())
        if what == "update":
            return update
        if what == "param":
            return param
        return update / param if param > 0 else math.nan


def _fp32_copies(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """theta of each parameter in (at least) fp32, a copy; DTensor params (FSDP2): this rank's
    shards, which the optimizer updates in place."""
    local = distributed.local_view([p.detach() for p in params], "off").tensors
    return [x.to(torch.promote_types(x.dtype, torch.float32), copy=True) for x in local]


class OptimizerWatch:
    """Watches one optimizer: collects at its pre-step hook, publishes :class:`Readout` s."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        index: int,
        config: Config,
        errors: ErrorLog,
        name_source: Callable[[], dict[int, str]],
    ) -> None:
        self.optimizer_ref = optimizer  # strong ref is fine: the watch lives as long as training
        self.index = str(index)
        self.config = config
        self.errors = errors
        self._name_source = name_source
        self._names: dict[int, str] | None = None
        self._layout_key: tuple[int, ...] | None = None
        self._layout: Layout | None = None
        self._listed_cpu = False  # the last listing's gradients are all strided CPU ones
        self._listed_dtypes: set[torch.dtype] = set()  # and of these (reducible) dtypes
        # element counts of the last collected plain gradients: (list, int64 array, float64 array)
        self._counts: tuple[list[int], np.ndarray, np.ndarray] | None = None
        self._backends: dict[torch.device, Backend] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._inflight: deque[_InFlight] = deque()
        self._lock = threading.Lock()  # counters and latest: held briefly
        self._publish_lock = threading.RLock()  # one publisher at a time, in step order
        self.steps = 0  # optimizer.step() calls seen
        self.collected_steps = 0
        self.nonfinite_steps = 0
        self.amp_skipped_steps = 0
        self.dropped_steps = 0
        self.clipped_steps = 0
        self.preclip_nonfinite_steps = 0
        self.collect_seconds = math.nan
        self.latest: Readout | None = None
        self.last_nonfinite: Readout | None = None
        self.backend_names: set[str] = set()
        self.scaler = None  # the GradScaler whose step() called this optimizer (set by session)
        # optimizers this one wraps (their own steps are not reported: see stacks.wrapped)
        self.inner_optimizers: list[torch.optim.Optimizer] = []
        self.closure_pending = False  # step(closure) began; collect after the closure's first call
        self._unreduced_now = 0  # gradients of the last listing no kernel can read
        self._unreduced_logged: set[int] = set()
        self._norms: list[float] = []  # finite per-step norms since the last scrape
        self._max_norm = math.nan  # their max (kept when a full list is handed over early)
        # Receives the norms when PENDING_NORMS pile up between scrapes (the exporter's
        # histogram): no finite step is ever dropped from it.
        self.norm_sink: Callable[[str, Sequence[float]], None] | None = None
        self._was_nonfinite = False
        self._last_incident = -math.inf
        self._suppressed_incidents = 0
        # parameter updates, sampled every config.update_every steps
        self._update_pending: tuple | None = None  # (step, layout, params, fp32 snapshots)
        self._early_snaps: dict[int, torch.Tensor] | None = None  # see snapshot_before_closure
        self._update_inflight: tuple | None = None  # (step, layout, pinned host, event)
        self.latest_update: UpdateReadout | None = None
        # gradient noise scale (config.micro_batch_size): backward passes since the last step,
        # the sum of squares of the window's first micro-batch gradient (0-dim float64 tensor,
        # on the device: no host sync), and the EMAs of the two unbiased estimates.
        self._grad_hooks: list = []
        self._backward_queued = False
        self._micro_batches = 0
        self._small_sumsq: torch.Tensor | None = None
        self._step_noise: tuple[int, torch.Tensor | None] | None = None
        self._noise_n = 0
        self._ema_trace = 0.0
        self._ema_g2 = 0.0
        # The watch (hence the hooks) starts at the first step, inside that step's window:
        # the backward passes before it were not seen, so that window is not reported.
        self._hooks_from_step = self.steps + 1
        if config.micro_batch_size is not None:
            if config.world_size > 1:  # B_big would need the ranks' samples: not done yet
                log.warning(
                    "gradwatch: GRADWATCH_MICRO_BATCH_SIZE is set but WORLD_SIZE is %d: the"
                    " gradient noise scale is computed for single-process training only",
                    config.world_size,
                )
            else:
                self._install_grad_hooks()

    # ---- gradient accumulation windows (gradient noise scale) ----
    def _install_grad_hooks(self) -> None:
        """One post-accumulate-grad hook per parameter: the first to fire in a backward pass
        queues :meth:`_on_backward_end` to run once at its end (the others return at once)."""
        try:
            for group in self.optimizer_ref.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._grad_hooks.append(
                            p.register_post_accumulate_grad_hook(self._on_grad_accumulated)
                        )
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)

    def remove_hooks(self) -> None:
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks.clear()

    def _on_grad_accumulated(self, _param: torch.Tensor) -> None:
        if self._backward_queued:
            return
        try:
            self._backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        except Exception as exc:  # noqa: BLE001
            self._backward_queued = False
            self.errors.record("collect", exc)

    def _on_backward_end(self) -> None:
        """End of one backward pass: count it; after the window's first, keep |g_small|^2."""
        self._backward_queued = False
        try:
            self._micro_batches += 1
            # only in windows whose step will be collected (steps 1, every+1, ...)
            if self._micro_batches == 1 and self.steps % self.config.every == 0:
                self._small_sumsq = self._sumsq_now()
        except Exception as exc:  # noqa: BLE001
            self._small_sumsq = None
            self.errors.record("collect", exc)

    def _sumsq_now(self) -> torch.Tensor | None:
        """Sum of squares of the current gradients, float64, as a 0-dim tensor on their device
        (one launch of the fused reduction; nothing is copied to the host here)."""
        _, grads, _ = self._params_with_grads()
        if not grads:
            return None
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        sums = [self._backend(d).reduce(gs)[:, SUMSQ].sum() for d, gs in by_device.items()]
        if len(sums) == 1:
            return sums[0]
        return torch.stack([x.to("cpu") for x in sums]).sum()  # several devices: rare, syncs

    def _take_window(self) -> None:
        """At a step: hand the window's (k, |g_small|^2) to this step's collection, reset."""
        if self.config.micro_batch_size is None or not self._grad_hooks:
            self._step_noise = None
            return
        if self.steps > self._hooks_from_step:
            self._step_noise = (self._micro_batches, self._small_sumsq)
        else:  # e.g. a closure step: its own backward was counted, the window's earlier not
            self._step_noise = None
        self._micro_batches, self._small_sumsq = 0, None
        self._backward_queued = False  # a backward that raised never ran its callback

    def _noise_update(self, readout: Readout) -> None:
        """Fold this step's unbiased estimates of tr(Sigma) and |G|^2 into their EMAs and write
        the exported values into the readout's context (McCandlish et al. 2018, app. A.1)."""
        mbs = self.config.micro_batch_size
        ctx = readout.context
        if mbs is None or not self._grad_hooks:
            return
        k, small = ctx.get("micro_batches"), ctx.get("noise_small_sumsq")
        beta = self.config.noise_ema
        if (
            k is not None
            and k >= 2
            and small is not None
            and math.isfinite(small)
            and not readout.nonfinite
        ):
            k = int(k)
            big = float(readout.partials[:, SUMSQ].sum())  # unscaled by _publish (fused AMP)
            coef = readout.clip_coefficient
            if coef < 1.0:  # clip_grad_norm_ scaled every gradient by coef: undo it
                big /= coef * coef
            scale = ctx.get("loss_scale")
            if scale:  # the first micro-batch's grads are still multiplied by the loss scale
                small /= scale * scale
            if self.config.loss_accumulation == "mean":
                # loss / k per micro-batch: the first backward left g_small / k in .grad, the
                # accumulated .grad is the window's mean gradient g_big
                small_sq, big_sq = k * k * small, big
            else:  # losses summed: .grad is g_small after the first, k * g_big at the step
                small_sq, big_sq = small, big / (k * k)
            b_small, b_big = float(mbs), float(mbs * k)
            g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
            trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
            self._noise_n += 1
            self._ema_g2 = beta * self._ema_g2 + (1.0 - beta) * g2
            self._ema_trace = beta * self._ema_trace + (1.0 - beta) * trace
        if self._noise_n:
            corr = 1.0 - beta**self._noise_n  # bias correction of an EMA started at 0
            g2, trace = self._ema_g2 / corr, self._ema_trace / corr
            ctx["noise_true_grad_sq_norm"] = g2
            ctx["noise_trace_sigma"] = trace
            # a batch size: only where both estimates are positive (early or noisy they can
            # be <= 0, being differences of noisy terms)
            ctx["noise_scale"] = trace / g2 if g2 > 0 and trace > 0 else math.nan

    # ---- training thread ----
    def begin_step(self) -> None:
        """First half of a step (its pre-step hook): count it and publish finished device work.

        The step number is the count of ``step()`` calls, applied or skipped by GradScaler
        (see :meth:`note_amp_skipped`), the same on fused and non-fused paths."""
        self.steps += 1
        self.closure_pending = False  # a closure that raised last step never collected
        self._early_snaps = None
        try:
            self.poll()
        except Exception as exc:  # noqa: BLE001
            self.errors.record("readout", exc)

    def _due(self, every: int) -> bool:
        """This step is one of 1, every + 1, 2 every + 1, ... (every 0: none is)."""
        return every > 0 and (self.steps - 1) % every == 0

    def collect_step(self, clip: ClipRecord | None = None, sample_update: bool = True) -> None:
        """Second half: the gradients the step will apply are final. At the pre-step hook
        without a closure; after the closure's first call with one. Never raises."""
        try:
            self._take_window()
        except Exception as exc:  # noqa: BLE001
            self._step_noise = None
            self.errors.record("collect", exc)
        try:
            if self._due(self.config.every):
                t0 = time.perf_counter()
                self._collect(clip)
                self.collect_seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - telemetry never raises into training
            self.errors.record("collect", exc)
        try:
            self._update_pending = None  # an earlier step whose post hook never ran
            k = self.config.update_every
            early = self._early_snaps is not None  # taken before the params could change
            if (sample_update or early) and self._due(k):
                self._snapshot_params()
        except Exception as exc:  # noqa: BLE001
            self._update_pending = None
            self.errors.record("collect", exc)
        self._early_snaps = None

    def snapshot_before_closure(self) -> None:
        """Pre-step hook of a step with a closure that samples the update: theta_(t-1) of every
        parameter of the optimizer, now. The step may move the weights before it calls the
        closure (SAM perturbs them, then puts them back); which parameters have a gradient is
        only known after the closure, when :meth:`_snapshot_params` picks theirs. Never raises."""
        self._early_snaps = None
        if not self._due(self.config.update_every):
            return
        try:
            params = [p for g in self.optimizer_ref.param_groups for p in g["params"]]
            snaps = _fp32_copies(params)
            self._early_snaps = {id(p): x for p, x in zip(params, snaps, strict=True)}
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)

    def on_step_post(self) -> None:
        """Post-step hook body: difference the sampled step's snapshot; never raises."""
        pending, self._update_pending = self._update_pending, None
        if pending is None:
            return
        try:
            self._reduce_update(*pending)
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)

    def note_amp_skipped(self) -> None:
        """GradScaler skipped optimizer.step() (non-fused path): the hook never fired. The
        call still takes a step number, as it does on the fused path (where step() runs)."""
        self.steps += 1
        self.count_skipped()

    def count_skipped(self) -> None:
        """A step whose gradients were not applied (loss-scale overflow)."""
        with self._lock:
            self.amp_skipped_steps += 1
        self._micro_batches, self._small_sumsq = 0, None  # the skipped step ends its window

    def _layout_for(self, params: list[torch.nn.Parameter], group_of: list[int]) -> Layout:
        key = tuple(map(id, params))
        if key != self._layout_key or self._layout is None:
            if self._names is None:
                self._names = self._name_source()
            names = []
            for i, p in enumerate(params):
                name = self._names.get(id(p))
                names.append(name if name else f"group{group_of[i]}.param{i}")
            if self.config.groups:
                groups = []
                for name in names:
                    label = next(
                        (
                            g
                            for g, prefixes in self.config.groups
                            if any(name.startswith(x) for x in prefixes)
                        ),
                        "other",
                    )
                    groups.append(label)
            else:
                groups = [str(g) for g in group_of]
            groups = self._cap_groups(groups)
            if self.config.per_param_here and len(names) > self.config.max_params:
                log.warning(
                    "gradwatch: %d parameters have gradients but GRADWATCH_MAX_PARAMS is %d:"
                    " grad_param_* series are exported for the first %d only",
                    len(names),
                    self.config.max_params,
                    self.config.max_params,
                )
            self._layout = Layout.build(names, groups)
            self._layout_key = key
        return self._layout

    def _cap_groups(self, groups: list[str]) -> list[str]:
        """Bound the group series: groups past the cap share one `_overflow` group."""
        order = list(dict.fromkeys(groups))
        cap = self.config.max_groups
        if len(order) <= cap:
            return groups
        keep = set(order[: cap - 1])
        log.warning(
            "gradwatch: %d parameter groups but GRADWATCH_MAX_GROUPS is %d: the last %d are"
            " merged into group _overflow",
            len(order),
            cap,
            len(order) - cap + 1,
        )
        return [g if g in keep else "_overflow" for g in groups]

    def _backend(self, device: torch.device) -> Backend:
        backend = self._backends.get(device)
        if backend is None:
            backend = select_backend(device, self.config.backend)
            self._backends[device] = backend
            self.backend_names.add(backend.name)
        return backend

    def _params_with_grads(self):
        """(params, grads, group index of each) of the gradients the kernels can read, in
        param-group order (sorted by device when on several). One C-level pass per property
        checked when every gradient is a strided CPU one of a reducible dtype (the usual case);
        otherwise the per-tensor listing, which also logs and counts the unreducible ones."""
        groups = self.optimizer_ref.param_groups
        params = list(chain.from_iterable([g["params"] for g in groups]))
        grads = list(map(_get_grad, params))
        group_of = list(
            chain.from_iterable([repeat(i, len(g["params"])) for i, g in enumerate(groups)])
        )
        if len(group_of) == len(params):
            present = list(map(is_not, grads, repeat(None)))
            if not all(present):
                params = list(compress(params, present))
                grads = list(compress(grads, present))
                group_of = list(compress(group_of, present))
            if (
                grads
                and all(map(_get_is_cpu, grads))  # also: no meta tensor
                and set(map(_get_layout, grads)) == _STRIDED_ONLY
                and (dtypes := set(map(_get_dtype, grads))) <= _REDUCIBLE_DTYPES
            ):
                self._unreduced_now = 0
                self._listed_cpu = True
                self._listed_dtypes = dtypes
                return params, grads, group_of
        self._listed_cpu = False
        return self._params_with_grads_listed()

    def _params_with_grads_listed(self):
        params: list[torch.nn.Parameter] = []
        grads: list[torch.Tensor] = []
        group_of: list[int] = []
        unreduced = 0
        for gi, group in enumerate(self.optimizer_ref.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    if g.dtype not in _REDUCIBLE_DTYPES or g.layout is not _STRIDED or g.is_meta:
                        unreduced += 1
                        self._note_unreduced(p, g)
                        continue
                    params.append(p)
                    grads.append(g)
                    group_of.append(gi)
        self._unreduced_now = unreduced
        if grads and any(g.device != grads[0].device for g in grads):
            order = sorted(range(len(grads)), key=lambda i: str(grads[i].device))
            params = [params[i] for i in order]
            grads = [grads[i] for i in order]
            group_of = [group_of[i] for i in order]
        return params, grads, group_of

    def _note_unreduced(self, p: torch.nn.Parameter, g: torch.Tensor) -> None:
        """One log line per parameter whose gradient no kernel can read; the rest is reported."""
        if id(p) in self._unreduced_logged:
            return
        self._unreduced_logged.add(id(p))
        if self._names is None:
            self._names = self._name_source()
        kind = "sparse" if g.layout is not _STRIDED else "meta" if g.is_meta else str(g.dtype)
        log.warning(
            "gradwatch: optimizer %s: the %s gradient of %s cannot be reduced; it is left out of"
            " the statistics and counted in grad_unreduced_tensors (training goes on)",
            self.index,
            kind,
            self._names.get(id(p)) or f"a {tuple(p.shape)} parameter",
        )

    def _context(self, clip: ClipRecord | None):
        """Per-step values of the loop: host floats, and device tensors to copy with the partials.

        CPU tensors are read at once (no device to wait for); CUDA tensors travel in the pinned
        copy of the reduction, so reading them never synchronizes the host.
        """
        host: dict[str, float] = {}
        device: list[tuple[str, torch.Tensor]] = []

        def put(key: str, v: object) -> None:
            if v is None or isinstance(v, bool):
                return
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    return
                if v.device.type == "cpu":
                    host[key] = float(v)
                else:
                    device.append((key, v.detach()))
            elif isinstance(v, int | float):
                host[key] = float(v)

        opt = self.optimizer_ref
        put("grad_scale", getattr(opt, "grad_scale", None))
        put("found_inf", getattr(opt, "found_inf", None))
        scaler = self.scaler
        if scaler is not None and scaler.is_enabled():
            put("loss_scale", scaler._get_scale_async())  # no get_scale(): that one syncs
        if clip is not None:
            put("preclip_norm", clip.norm)
            host["clip_max_norm"] = clip.max_norm
        groups = opt.param_groups
        if self.inner_optimizers and not any("lr" in g for g in groups):
            # a container without learning rates of its own (torchtitan's OptimizersContainer):
            # its inner optimizers' groups, numbered in order
            groups = [g for inner in self.inner_optimizers for g in inner.param_groups]
        for i, group in enumerate(groups):
            put(f"lr:{i}", group.get("lr"))
        if self._unreduced_now:
            host["unreduced_tensors"] = float(self._unreduced_now)
        if self._step_noise is not None:
            k, small = self._step_noise
            if k:
                host["micro_batches"] = float(k)
            put("noise_small_sumsq", small)
        return host, device

    def _collect(self, clip: ClipRecord | None = None) -> None:
        params, grads, group_of = self._params_with_grads()
        if not grads:
            return
        device = grads[0].device
        layout = self._layout_for(params, group_of)
        prepared = None
        if self._listed_cpu and set(map(type, grads)) <= _PLAIN_TYPES:
            # plain CPU tensors (no DTensor): the kernel's checks are done, counts shared
            counts = list(map(_numel, grads))
            cached = self._counts
            if cached is None or cached[0] != counts:
                arr = np.array(counts, dtype=np.int64)
                as_float = arr.astype(np.float64)
                arr.flags.writeable = as_float.flags.writeable = False  # shared by readouts
                cached = self._counts = (counts, arr, as_float)
            view = distributed.LocalView(grads, None, cached[2], False)
            prepared = (self._listed_dtypes, cached[1])
        else:
            # DTensor grads (FSDP2): local shards, rows owned by this rank, full numel.
            view = distributed.local_view(grads, self.config.distributed)
        grads, numel = view.tensors, view.numel
        context, device_values = self._context(clip)
        if prepared is not None:
            local = self._backend(device).reduce(grads, prepared)
            for key, t in device_values:
                context[key] = float(t)
            self._publish_host(local, layout, numel, context)
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        if len(by_device) == 1 and device.type == "cuda":
            backend = self._backend(device)
            self._launch_cuda(
                device,
                lambda: backend.reduce(grads),
                layout,
                numel,
                context,
                device_values,
                view.owned,
            )
            return
        parts = [self._backend(d).reduce(gs).to("cpu") for d, gs in by_device.items()]
        local = torch.cat(parts) if len(parts) > 1 else parts[0]
        for key, t in device_values:  # this path already copies to the host synchronously
            context[key] = float(t)
        self._publish_host(local, layout, numel, context, view.owned if view.combine else None)

    def _publish_host(self, local, layout, numel, context, owned=None) -> None:
        """Publish CPU partials of this step, combined across ranks first if ``owned`` is given
        (one small gloo all-reduce pair; waiting for it on the CPU is cheap)."""
        host = local.numpy().reshape(-1, N_PARTIALS)
        if owned is None:
            self._publish(self.steps, layout, host, numel, context)
            return
        result, works = distributed.start_combine(local, owned)
        for work in works:
            work.wait()
        combined = distributed.finish_combine(result).numpy()
        self._publish(self.steps, layout, combined, numel, context, local=host)

    def _launch_cuda(
        self, device, reduce, layout, numel, context, device_values, owned=None
    ) -> None:
        """``reduce()`` gives the [T, 6] partials (launched on the side stream, which waits for
        the main one); they are combined across ranks if ``owned`` is given, then copied to
        pinned memory and read by :meth:`poll` once their event completes."""
        with self._lock:
            if len(self._inflight) >= RING_SLOTS:
                self.dropped_steps += 1
                return
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        stream.wait_stream(
            main
        )  # read grads only once their producer (maybe FSDP's stream) is done
        t = len(layout.names)
        k = len(device_values)
        combine = owned is not None
        with torch.cuda.stream(stream):
            partials = reduce()
            if k:
                extra = torch.stack(
                    [v.reshape(()).to(device, torch.float64) for _, v in device_values]
                )
            reduced = torch.cuda.Event()
            reduced.record(stream)
            local = partials
            if combine:
                # Collectives on the dedicated group; wait() orders this side stream after them on
                # the device (NCCL), the host goes on.
                result, works = distributed.start_combine(partials, owned)
                for work in works:
                    work.wait()
                partials = distributed.finish_combine(result)
            size = t * N_PARTIALS * (2 if combine else 1) + k
            host = torch.empty(size, dtype=torch.float64, pin_memory=True)
            host[: t * N_PARTIALS].copy_(partials.reshape(-1), non_blocking=True)
            if k:
                host[t * N_PARTIALS : t * N_PARTIALS + k].copy_(extra, non_blocking=True)
            if combine:
                host[t * N_PARTIALS + k :].copy_(local.reshape(-1), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        # Later in-place writes (clip, unscale_, fused steps, zero_grad) and frees are ordered after
        # the reduction on the device; the host does not wait.
        main.wait_event(reduced)
        keys = tuple(key for key, _ in device_values)
        with self._lock:
            self._inflight.append(
                _InFlight(self.steps, layout, numel, host, done, context, keys, combine)
            )

    # ---- parameter updates (sampled) ----
    def _snapshot_params(self) -> None:
        """Pre-step of a sampled step: copy theta_(t-1) in (at least) fp32; freed after the step."""
        params, _, group_of = self._params_with_grads()
        if not params:
            return
        layout = self._layout_for(params, group_of)
        early = self._early_snaps
        if early is not None:  # taken at the pre-step hook of a closure step
            snaps = [early.get(id(p)) for p in params]
            if any(x is None for x in snaps):
                return  # a parameter that was not in the param groups then
        else:
            snaps = _fp32_copies(params)
        self._update_pending = (self.steps, layout, params, snaps)

    def _reduce_update(self, step, layout, params, snaps) -> None:
        """Post-step: snaps <- theta_(t-1) - theta_t in place (fp32 or wider), then one reduction
        over [deltas..., params...] with the float64-accumulating kernels. ``params`` are the
        Parameters, read now: a step may have replaced their ``.data`` (SAM does)."""
        params = distributed.local_view([p.detach() for p in params], "off").tensors
        with torch.no_grad():
            for s_, p in zip(snaps, params, strict=True):
                s_.sub_(p.detach())
        tensors = snaps + [p.detach() for p in params]
        t = len(params)
        devices = {x.device for x in tensors}
        device = tensors[0].device
        if len(devices) == 1 and device.type == "cuda":
            with self._lock:
                if self._update_inflight is not None:
                    self.dropped_steps += 1
                    return
            # Main stream: the snapshots are freed after this launch, in stream order.
            partials = self._backend(device).reduce(tensors)
            host = torch.empty(2 * t * N_PARTIALS, dtype=torch.float64, pin_memory=True)
            host.copy_(partials.reshape(-1), non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
            with self._lock:
                self._update_inflight = (step, layout, host, done)
            return
        parts = []
        for d in sorted(devices, key=str):
            idx = [i for i, x in enumerate(tensors) if x.device == d]
            rows = self._backend(d).reduce([tensors[i] for i in idx]).to("cpu").numpy()
            parts.append((idx, rows))
        out = np.empty((2 * t, N_PARTIALS), dtype=np.float64)
        for idx, rows in parts:
            out[idx] = rows.reshape(-1, N_PARTIALS)
        self._publish_update(step, layout, out)

    def _publish_update(self, step, layout, rows: np.ndarray) -> None:
        t = len(layout.names)
        readout = UpdateReadout(step, layout, rows[:t].copy(), rows[t:].copy())
        with self._lock:
            self.latest_update = readout

    def poll(self) -> None:
        """Publish every in-flight result whose copy has completed; never blocks.

        The training thread and scrape threads all poll; one at a time publishes (the others
        return at once: the one holding the lock publishes what they would have), so results
        are published in step order and the published state (latest, counters, noise EMAs,
        incident log) changes in one thread at a time."""
        if not self._publish_lock.acquire(blocking=False):
            return
        try:
            self._poll_locked()
        finally:
            self._publish_lock.release()

    def _poll_locked(self) -> None:
        while True:
            with self._lock:
                if not self._inflight or not self._inflight[0].done.query():
                    break
                item = self._inflight.popleft()
            try:
                data = item.host.numpy()
                t = len(item.layout.names)
                context = dict(item.context)
                k = len(item.device_keys)
                for i, key in enumerate(item.device_keys):
                    context[key] = float(data[t * N_PARTIALS + i])
                local = None
                if item.combined:
                    local = data[t * N_PARTIALS + k :].reshape(t, N_PARTIALS).copy()
                self._publish(
                    item.step,
                    item.layout,
                    data[: t * N_PARTIALS].reshape(t, N_PARTIALS).copy(),
                    item.numel,
                    context,
                    local=local,
                )
            except Exception as exc:  # noqa: BLE001
                self.errors.record("readout", exc)
        with self._lock:
            upd = self._update_inflight
            if upd is None or not upd[3].query():
                return
            self._update_inflight = None
        try:
            step, layout, host, _ = upd
            self._publish_update(step, layout, host.numpy().reshape(-1, N_PARTIALS))
        except Exception as exc:  # noqa: BLE001
            self.errors.record("readout", exc)

    def snapshot(self, drain: bool = False) -> WatchSnapshot:
        """Publish finished device work, then one consistent view of readout and counters.

        ``drain``: hand over (and forget) the per-step norms collected since the last drain: the
        exporter does so once per scrape, for the histogram and the max since the last scrape.
        """
        self.poll()
        with self._lock:
            norms: tuple[float, ...] = ()
            max_norm = self._max_norm  # since the last drain, also when not draining now
            if drain:
                norms = tuple(self._norms)
                self._norms, self._max_norm = [], math.nan
            return WatchSnapshot(
                self.latest,
                self.collected_steps,
                self.nonfinite_steps,
                self.amp_skipped_steps,
                self.dropped_steps,
                self.collect_seconds,
                self.clipped_steps,
                self.preclip_nonfinite_steps,
                max_norm,
                norms,
                self.latest_update,
                self.last_nonfinite,
            )

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (off the training path: at close) for in-flight results and publish them."""
        deadline = time.monotonic() + timeout
        while (self._inflight or self._update_inflight) and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.001)

    def _publish(self, step, layout, partials, numel, context, local=None) -> None:
        with self._publish_lock:  # reentrant: poll() already holds it
            self._publish_locked(step, layout, partials, numel, context, local)

    def _publish_locked(self, step, layout, partials, numel, context, local=None) -> None:
        if context.get("found_inf"):  # fused GradScaler path: this step is skipped
            with self._lock:
                self.amp_skipped_steps += 1
            return
        scale = context.get("grad_scale")
        if scale is not None and scale != 1.0:
            # Fused optimizers under GradScaler see still-scaled grads; report unscaled values.
            unscale(partials, scale)
        readout = Readout(step, layout, partials, numel, context, local)
        clipped = readout.clip_coefficient < 1.0
        preclip = context.get("preclip_norm")
        preclip_nonfinite = preclip is not None and not math.isfinite(preclip)
        try:
            self._noise_update(readout)
        except Exception as exc:  # noqa: BLE001
            self.errors.record("readout", exc)
        with self._lock:
            self.latest = readout
            self.collected_steps += 1
            if readout.nonfinite:
                self.nonfinite_steps += 1
                self.last_nonfinite = readout
            else:
                norm = readout.total_norm
                self._norms.append(norm)
                if not norm <= self._max_norm:  # also when the max is still NaN
                    self._max_norm = norm
            if clipped:
                self.clipped_steps += 1
            if preclip_nonfinite:
                self.preclip_nonfinite_steps += 1
            hand_over = None
            if len(self._norms) >= PENDING_NORMS:
                if self.norm_sink is not None:
                    hand_over, self._norms = self._norms, []
                else:  # no exporter to hand them to: stay bounded
                    del self._norms[:-PENDING_NORMS]
        if hand_over is not None:
            try:
                self.norm_sink(self.index, hand_over)
            except Exception as exc:  # noqa: BLE001
                self.errors.record("export", exc)
        self._log_incident(readout)

    def _log_incident(self, readout: Readout) -> None:
        """One line when a step turns non-finite after finite ones (at most one a minute)."""
        was, self._was_nonfinite = self._was_nonfinite, readout.nonfinite
        if not readout.nonfinite or was:
            return
        now = time.monotonic()
        if now - self._last_incident < INCIDENT_LOG_INTERVAL_S:
            self._suppressed_incidents += 1
            return
        self._last_incident = now
        agg = readout.aggregate()
        names = readout.nonfinite_params
        more = int(((agg.nan > 0) | (agg.inf > 0)).sum()) - len(names)
        log.warning(
            "gradwatch: optimizer %s step %d: gradients turned non-finite (%d NaN, %d Inf"
            " elements) in %s%s%s",
            self.index,
            readout.step,
            int(agg.nan.sum()),
            int(agg.inf.sum()),
            ", ".join(names),
            f" and {more} more" if more > 0 else "",
            f" ({self._suppressed_incidents} earlier incidents not logged)"
            if self._suppressed_incidents
            else "",
        )
        self._suppressed_incidents = 0
