"""The catalog: the single source of truth for every number gradwatch exports.

Each :class:`Statistic` carries its OpenTelemetry instrument name, the Prometheus name that the
exposition shows, its unit, the formula in plain text, how it reduces across tensors and across
ranks, and its ``source``: where its value comes from (the kernel partials of the step, a value
of the training loop, the watch's counters, the sampled update, the noise estimate, gradwatch
itself) and the function that computes it from those typed records (:mod:`gradwatch.records`).
The exporter and :mod:`gradwatch.values` are one loop over this catalog.
Instruments, ``gradwatch catalog``, the README table and the dashboards are all derived from
:data:`CATALOG`; nothing else restates a formula.

Notation used in the formulas: ``g`` ranges over every element of every gradient tensor in the
set (the params of the optimizer whose ``.grad`` is not None, or of one group, or one param);
``N`` is the number of those elements, ``T`` the number of those tensors and ``||g_i||`` the L2
norm of tensor ``i``. Sums are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from .config import Config
from .records import Aggregate, LoopValues, ProcessView, Readout, UpdateReadout, WatchSnapshot

# Label values of the `kind` label on non-finite counts.
NONFINITE_KINDS = ("nan", "inf")

# Scopes: which set of gradients (or which part of gradwatch) a statistic describes.
# RANK: this rank's own local gradients (its shards), before any combination across ranks.
GLOBAL, GROUP, PARAM, RANK, SELF = "global", "group", "param", "rank", "self"
# Training-health signals that are not functions of the gradient partials: values the training
# loop computed (clip norm, loss scale, learning rate), per-step history between scrapes, the
# sampled parameter-update statistics and the noise scale; each entry's ``source`` reads them.
TRAINING = "training"

# A value is either a plain number or one number per value of the statistic's extra label.
Value = float | Mapping[str, float]


@dataclass(frozen=True)
class Thresholds:
    """Per-tensor L2 norm bounds for the vanishing/exploding counts."""

    vanishing: float = Config.vanishing_threshold  # defaults live with the settings
    exploding: float = Config.exploding_threshold


def _finite_only(compute: Callable[[Aggregate], float]) -> Callable[[Aggregate, Thresholds], float]:
    """Magnitudes over a set holding any NaN/Inf are not finite numbers: report none (absent)."""

    def wrapped(agg: Aggregate, _: Thresholds) -> float:
        if agg.nonfinite or agg.tensors == 0:
            return math.nan
        return float(compute(agg))

    return wrapped


def _per_element(compute: Callable[[Aggregate], float]) -> Callable[[Aggregate, Thresholds], float]:
    """Ratios per element are undefined (absent) when the set has no elements."""

    def wrapped(agg: Aggregate, _: Thresholds) -> float:
        n = agg.elements
        return math.nan if n == 0 else float(compute(agg)) / n

    return wrapped


def _nonfinite_by_kind(agg: Aggregate, _: Thresholds) -> Mapping[str, float]:
    return {"nan": float(agg.nan.sum()), "inf": float(agg.inf.sum())}


def _partials_count(compute: Callable[[Aggregate, Thresholds], float]) -> FromPartials:
    return FromPartials(lambda agg, th: float(compute(agg, th)))


def _partials_per_element(compute: Callable[[Aggregate], float]) -> FromPartials:
    return FromPartials(_per_element(compute))


# ---- formulas used beyond one statistic (collection counts and the noise scale use them) ----
def total_l2_norm(agg: Aggregate) -> float:
    """grad_l2_norm: sqrt of the sum of squares over every element of every tensor."""
    return math.sqrt(float(agg.sumsq.sum()))


def clip_coefficient(loop: LoopValues) -> float:
    """grad_clip_coefficient_ratio: min(1, max_norm / (norm + 1e-6)), as clip_grad_norm_
    computes it; NaN when the step was not clipped or its pre-clip norm was NaN/Inf."""
    norm, max_norm = loop.preclip_norm, loop.clip_max_norm
    if norm is None or max_norm is None or not math.isfinite(norm):
        return math.nan  # a NaN/Inf pre-clip norm: counted, never shown as a coefficient
    return min(1.0, max_norm / (norm + 1e-6))


def preclip_nonfinite(loop: LoopValues) -> bool:
    """The step was clipped with a NaN/Inf norm (grad_preclip_nonfinite_steps_total)."""
    return loop.preclip_norm is not None and not math.isfinite(loop.preclip_norm)


def noise_estimates(
    small_sq: float, big_sq: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """Unbiased one-step estimates (|G|^2, tr(Sigma)) from the squared norms of a mean gradient
    over b_small and over b_big samples (McCandlish et al. 2018, appendix A.1)."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


# ---- where each statistic's value comes from ----
Samples = Iterable[tuple[dict[str, str], float]]


@dataclass(frozen=True)
class FromPartials:
    """A function of the step's kernel partials, over the set its scope names (all gradients,
    each group, each parameter, this rank's local shards)."""

    compute: Callable[[Aggregate, Thresholds], Value]

    def samples(self, stat: Statistic, snap: WatchSnapshot, th: Thresholds, cap: int) -> Samples:
        readout = snap.readout
        if readout is None:
            return
        if stat.scope == GLOBAL:
            sets: Iterable[tuple[dict[str, str], Aggregate]] = [({}, readout.aggregate())]
        elif stat.scope == RANK:
            sets = [({}, readout.aggregate(local=True))]
        elif stat.scope == GROUP:
            rows = readout.layout.group_rows.items()
            sets = (({"group": g}, readout.aggregate(r)) for g, r in rows)
        else:
            names = readout.layout.names
            sets = (
                ({"param": names[i]}, readout.aggregate(slice(i, i + 1)))
                for i in range(min(cap, len(names)))
            )
        for labels, agg in sets:
            value = self.compute(agg, th)
            if isinstance(value, Mapping):
                for kind, v in value.items():
                    yield {**labels, "kind": kind}, v
            else:
                yield labels, value


@dataclass(frozen=True)
class FromStep:
    """A value of the latest collected step: its number, a loop value, the noise estimate."""

    read: Callable[[Readout], float | None]

    def samples(self, stat: Statistic, snap: WatchSnapshot, th: Thresholds, cap: int) -> Samples:
        if snap.readout is not None:
            v = self.read(snap.readout)
            if v is not None:
                yield {}, v


@dataclass(frozen=True)
class FromLearningRates:
    """One value per optimizer param group of the latest collected step."""

    def samples(self, stat: Statistic, snap: WatchSnapshot, th: Thresholds, cap: int) -> Samples:
        if snap.readout is not None:
            for i, lr in enumerate(snap.readout.loop.learning_rates):
                yield {"param_group": str(i)}, lr


@dataclass(frozen=True)
class FromWatch:
    """A counter or gauge the watch keeps across steps."""

    read: Callable[[WatchSnapshot], float]

    def samples(self, stat: Statistic, snap: WatchSnapshot, th: Thresholds, cap: int) -> Samples:
        yield {}, self.read(snap)


@dataclass(frozen=True)
class FromUpdate:
    """A function of the last sampled update's partials (update, parameter), over all
    parameters with a gradient or per group."""

    compute: Callable[[Aggregate, Aggregate], float]
    per_group: bool = False

    def samples(self, stat: Statistic, snap: WatchSnapshot, th: Thresholds, cap: int) -> Samples:
        update = snap.update
        if update is None:
            return
        if self.per_group:
            for g, rows in update.layout.group_rows.items():
                yield {"group": g}, _finite_update(self.compute, update, rows)
        else:
            yield {}, _finite_update(self.compute, update, slice(None))


def _finite_update(compute, update: UpdateReadout, rows) -> float:
    delta, param = update.aggregates(rows)
    if delta.nonfinite or param.nonfinite:
        return math.nan
    return compute(delta, param)


@dataclass(frozen=True)
class FromNonfiniteParams:
    """The parameters named in the latest collected step that held NaN/Inf."""

    def samples(self, stat: Statistic, snap: WatchSnapshot, th: Thresholds, cap: int) -> Samples:
        if snap.last_nonfinite is not None:
            for i, p in enumerate(snap.last_nonfinite.nonfinite_params):
                yield {"param": p, "position": str(i)}, 1.0


@dataclass(frozen=True)
class FromStepHistory:
    """Every finite step's grad_l2_norm since the last scrape (recorded into a histogram)."""

    def norms(self, snap: WatchSnapshot) -> tuple[float, ...]:
        return snap.norms_since_last


@dataclass(frozen=True)
class FromProcess:
    """gradwatch's own process-wide values (no optimizer label)."""

    read: Callable[[ProcessView], Samples]


@dataclass(frozen=True)
class FromUpdateStep:
    """The step number of the last sampled update."""

    def samples(self, stat: Statistic, snap: WatchSnapshot, th: Thresholds, cap: int) -> Samples:
        if snap.update is not None:
            yield {}, snap.update.step


def _update_ratio(update: Aggregate, param: Aggregate) -> float:
    norm = total_l2_norm(param)
    return total_l2_norm(update) / norm if norm > 0 else math.nan


def _noise_scale(readout: Readout) -> float | None:
    """B_simple = tr(Sigma) / |G|^2, a batch size only where both estimates are positive
    (early or noisy they can be <= 0, being differences of noisy terms)."""
    noise = readout.noise
    if noise is None:
        return None
    trace, g2 = noise.trace_sigma, noise.true_grad_sq_norm
    return trace / g2 if g2 > 0 and trace > 0 else math.nan


def _info(process: ProcessView) -> Samples:
    return [({"version": process.version, "backend": ",".join(process.backends) or "none"}, 1.0)]


Source = FromPartials | FromStep | FromLearningRates | FromWatch | FromUpdate
Source = Source | FromUpdateStep | FromNonfiniteParams | FromStepHistory | FromProcess


@dataclass(frozen=True)
class Statistic:
    """One exported number: names, unit, formula, reductions and (if it is one) its computation."""

    otel_name: str
    prom_name: str
    instrument: str  # "gauge" | "counter" | "histogram"
    unit: str
    formula: str
    scope: str
    across_tensors: str
    across_ranks: str
    source: Source
    labels: tuple[str, ...] = ()
    label_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_on: bool = True

    @property
    def compute(self) -> Callable[[Aggregate, Thresholds], Value] | None:
        """The function of the partials, for statistics of the kernel partials; else None."""
        return self.source.compute if isinstance(self.source, FromPartials) else None

    def with_unit(self, unit: str) -> Statistic:
        return replace(self, unit=unit)

    def description(self, thresholds: Thresholds | None = None) -> str:
        """HELP text: the formula with the thresholds in force substituted."""
        th = thresholds or Thresholds()
        return self.formula.format(vanishing=th.vanishing, exploding=th.exploding)


_ABSENT = " Absent while the set holds NaN/Inf (see grad_nonfinite_elements)."
_PARTIALS = "per-tensor partials summed over shards (max for abs max); replicated tensors once"


def _magnitude(otel: str, prom: str, scope: str, formula: str, compute, **kw) -> Statistic:
    return Statistic(
        otel_name=otel,
        prom_name=prom,
        instrument="gauge",
        unit="{gradient}",
        formula=formula + _ABSENT,
        scope=scope,
        across_tensors=kw.pop("across_tensors", "sum of squares over all tensors, then sqrt"),
        across_ranks=kw.pop("across_ranks", _PARTIALS),
        source=FromPartials(_finite_only(compute)),
        **kw,
    )


_L2 = "sqrt(sum of g^2 over every element of every gradient tensor)"

CATALOG: tuple[Statistic, ...] = (
    # ---- global statistics over all gradients the optimizer is about to apply ----
    _magnitude(
        "grad.l2_norm",
        "grad_l2_norm",
        GLOBAL,
        f"Total L2 norm of the gradients: {_L2}; the total norm torch.nn.utils.clip_grad_norm_"
        " computes, taken at the optimizer step, i.e. after any clipping the loop did"
        " (then min(pre-clip norm, max_norm) up to the rounding of the scaled gradients to"
        " their dtype: bf16 gradients clipped to 1.0 can read 1.002, exactly their norm).",
        total_l2_norm,
    ),
    _magnitude(
        "grad.rms",
        "grad_rms",
        GLOBAL,
        "Root mean square of the gradient elements: sqrt(sum of g^2 / N), N = number of gradient"
        " elements; comparable across model sizes.",
        lambda a: math.sqrt(a.sumsq.sum() / a.elements) if a.elements else math.nan,
    ),
    _magnitude(
        "grad.abs_mean",
        "grad_abs_mean",
        GLOBAL,
        "Mean absolute gradient element: sum of abs(g) / N, N = number of gradient elements.",
        lambda a: a.sumabs.sum() / a.elements if a.elements else math.nan,
        across_tensors="sum of abs over all tensors, divided by N",
    ),
    _magnitude(
        "grad.abs_max",
        "grad_abs_max",
        GLOBAL,
        "Largest absolute gradient element (the L-infinity norm): max of abs(g).",
        lambda a: a.maxabs.max(),
        across_tensors="max over tensors",
    ),
    _magnitude(
        "grad.l2_norm_divided_by_tensors",
        "grad_l2_norm_divided_by_tensors",
        GLOBAL,
        f"Total L2 norm divided by the number of gradient tensors: {_L2} / T, T = number of"
        " gradient tensors. Not the total norm: divide grad_l2_norm by grad_tensors to see why.",
        lambda a: math.sqrt(a.sumsq.sum()) / a.tensors,
    ),
    _magnitude(
        "grad.tensor_l2_norm_min",
        "grad_tensor_l2_norm_min",
        GLOBAL,
        "Smallest per-tensor L2 norm: min over tensors i of ||g_i|| = sqrt(sum of g^2 over"
        " tensor i).",
        lambda a: a.tensor_norms().min(),
        across_tensors="min over tensors of each tensor's own L2 norm",
    ),
    _magnitude(
        "grad.tensor_l2_norm_max",
        "grad_tensor_l2_norm_max",
        GLOBAL,
        "Largest per-tensor L2 norm: max over tensors i of ||g_i|| = sqrt(sum of g^2 over"
        " tensor i).",
        lambda a: a.tensor_norms().max(),
        across_tensors="max over tensors of each tensor's own L2 norm",
    ),
    _magnitude(
        "grad.tensor_l2_norm_mean",
        "grad_tensor_l2_norm_mean",
        GLOBAL,
        "Mean per-tensor L2 norm: (sum over tensors i of ||g_i||) / T, T = number of gradient"
        " tensors.",
        lambda a: a.tensor_norms().mean(),
        across_tensors="mean over tensors of each tensor's own L2 norm",
    ),
    Statistic(
        otel_name="grad.zero_ratio",
        prom_name="grad_zero_ratio",
        instrument="gauge",
        unit="1",
        formula="Fraction of gradient elements exactly 0: (number of elements equal to 0) / N,"
        " N = number of gradient elements.",
        scope=GLOBAL,
        across_tensors="zero counts summed, divided by N",
        across_ranks="zero counts and N summed over shards",
        source=_partials_per_element(lambda a: a.zero.sum()),
    ),
    Statistic(
        otel_name="grad.nonfinite_elements",
        prom_name="grad_nonfinite_elements",
        instrument="gauge",
        unit="{element}",
        formula="Gradient elements that are NaN (kind=nan) or +/-Inf (kind=inf) in the last"
        " collected step; exact counts.",
        scope=GLOBAL,
        across_tensors="counts summed",
        across_ranks="counts summed over shards",
        labels=("kind",),
        label_values={"kind": NONFINITE_KINDS},
        source=FromPartials(_nonfinite_by_kind),
    ),
    Statistic(
        otel_name="grad.tensors_vanishing",
        prom_name="grad_tensors_vanishing",
        instrument="gauge",
        unit="{tensor}",
        formula="Gradient tensors whose L2 norm ||g_i|| is below {vanishing:g} (vanishing"
        " threshold in force).",
        scope=GLOBAL,
        across_tensors="count of tensors",
        across_ranks="computed on the full (all-shard) per-tensor norms",
        source=_partials_count(lambda a, th: (a.tensor_norms() < th.vanishing).sum()),
    ),
    Statistic(
        otel_name="grad.tensors_exploding",
        prom_name="grad_tensors_exploding",
        instrument="gauge",
        unit="{tensor}",
        formula="Gradient tensors whose L2 norm ||g_i|| is above {exploding:g} (exploding"
        " threshold in force); a tensor holding Inf counts, one holding NaN does not.",
        scope=GLOBAL,
        across_tensors="count of tensors",
        across_ranks="computed on the full (all-shard) per-tensor norms",
        source=_partials_count(lambda a, th: (a.tensor_norms() > th.exploding).sum()),
    ),
    Statistic(
        otel_name="grad.elements",
        prom_name="grad_elements",
        instrument="gauge",
        unit="{element}",
        formula="N: number of gradient elements in the last collected step (params without a"
        " grad are not counted).",
        scope=GLOBAL,
        across_tensors="sum of numel",
        across_ranks="sum over shards (full parameter sizes)",
        source=FromPartials(lambda a, _: float(a.elements)),
    ),
    Statistic(
        otel_name="grad.tensors",
        prom_name="grad_tensors",
        instrument="gauge",
        unit="{tensor}",
        formula="T: number of gradient tensors in the last collected step (params whose .grad is"
        " not None).",
        scope=GLOBAL,
        across_tensors="count",
        across_ranks="parameters counted once",
        source=FromPartials(lambda a, _: float(a.tensors)),
    ),
    Statistic(
        otel_name="grad.stats_step",
        prom_name="grad_stats_step",
        source=FromStep(lambda r: r.step),
        instrument="gauge",
        unit="{step}",
        formula="Optimizer step that the grad_* gauges belong to: number of optimizer.step()"
        " calls so far, this one included; steps GradScaler (or DeepSpeed) skipped take a"
        " number too, on fused and non-fused paths alike.",
        scope=GLOBAL,
        across_tensors="-",
        across_ranks="identical on every rank",
    ),
    Statistic(
        otel_name="grad.steps",
        prom_name="grad_steps_total",
        source=FromWatch(lambda w: w.collected_steps),
        instrument="counter",
        unit="{step}",
        formula="Optimizer steps whose gradients were collected (every GRADWATCH_EVERY-th step).",
        scope=GLOBAL,
        across_tensors="-",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="grad.nonfinite_steps",
        prom_name="grad_nonfinite_steps_total",
        source=FromWatch(lambda w: w.nonfinite_steps),
        instrument="counter",
        unit="{step}",
        formula="Collected steps whose gradients held any NaN or +/-Inf element.",
        scope=GLOBAL,
        across_tensors="-",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="amp.skipped_steps",
        prom_name="amp_skipped_steps_total",
        source=FromWatch(lambda w: w.amp_skipped_steps),
        instrument="counter",
        unit="{step}",
        formula="Optimizer steps that torch.amp.GradScaler skipped because the scaled gradients"
        " held NaN/Inf; their gradients are not reported as statistics.",
        scope=GLOBAL,
        across_tensors="-",
        across_ranks="per rank",
    ),
    # ---- per parameter group ----
    _magnitude(
        "grad.group.l2_norm",
        "grad_group_l2_norm",
        GROUP,
        "L2 norm of the group's gradients: sqrt(sum of g^2 over every element of every gradient"
        " tensor in the group).",
        lambda a: math.sqrt(a.sumsq.sum()),
        labels=("group",),
    ),
    _magnitude(
        "grad.group.rms",
        "grad_group_rms",
        GROUP,
        "Root mean square of the group's gradient elements: sqrt(sum of g^2 / N_group).",
        lambda a: math.sqrt(a.sumsq.sum() / a.elements) if a.elements else math.nan,
        labels=("group",),
    ),
    _magnitude(
        "grad.group.abs_max",
        "grad_group_abs_max",
        GROUP,
        "Largest absolute gradient element in the group: max of abs(g).",
        lambda a: a.maxabs.max(),
        labels=("group",),
        across_tensors="max over tensors",
    ),
    Statistic(
        otel_name="grad.group.nonfinite_elements",
        prom_name="grad_group_nonfinite_elements",
        instrument="gauge",
        unit="{element}",
        formula="Gradient elements of the group that are NaN (kind=nan) or +/-Inf (kind=inf) in"
        " the last collected step.",
        scope=GROUP,
        across_tensors="counts summed",
        across_ranks="counts summed over shards",
        labels=("group", "kind"),
        label_values={"kind": NONFINITE_KINDS},
        source=FromPartials(_nonfinite_by_kind),
    ),
    # ---- per parameter tensor (opt-in) ----
    _magnitude(
        "grad.param.l2_norm",
        "grad_param_l2_norm",
        PARAM,
        "L2 norm of one parameter's gradient: sqrt(sum of g^2 over the tensor).",
        lambda a: math.sqrt(a.sumsq.sum()),
        labels=("param",),
        default_on=False,
        across_tensors="one tensor",
    ),
    _magnitude(
        "grad.param.abs_max",
        "grad_param_abs_max",
        PARAM,
        "Largest absolute element of one parameter's gradient: max of abs(g).",
        lambda a: a.maxabs.max(),
        labels=("param",),
        default_on=False,
        across_tensors="one tensor",
    ),
    Statistic(
        otel_name="grad.param.zero_ratio",
        prom_name="grad_param_zero_ratio",
        instrument="gauge",
        unit="1",
        formula="Fraction of one parameter's gradient elements exactly 0: zeros / numel.",
        scope=PARAM,
        across_tensors="one tensor",
        across_ranks="zero counts and numel summed over shards",
        labels=("param",),
        source=_partials_per_element(lambda a: a.zero.sum()),
        default_on=False,
    ),
    Statistic(
        otel_name="grad.param.nonfinite_elements",
        prom_name="grad_param_nonfinite_elements",
        instrument="gauge",
        unit="{element}",
        formula="Elements of one parameter's gradient that are NaN (kind=nan) or +/-Inf"
        " (kind=inf) in the last collected step.",
        scope=PARAM,
        across_tensors="one tensor",
        across_ranks="counts summed over shards",
        labels=("param", "kind"),
        label_values={"kind": NONFINITE_KINDS},
        source=FromPartials(_nonfinite_by_kind),
        default_on=False,
    ),
    # ---- this rank's local gradients (before combination across ranks) ----
    Statistic(
        otel_name="grad.rank.nonfinite_elements",
        prom_name="grad_rank_nonfinite_elements",
        instrument="gauge",
        unit="{element}",
        formula="Elements of this rank's local gradients (its own shards under FSDP2, its full"
        " copy otherwise) that are NaN (kind=nan) or +/-Inf (kind=inf) in the last collected"
        " step, counted before combination across ranks; the rank where a NaN appeared.",
        scope=RANK,
        across_tensors="counts summed",
        across_ranks="per rank (not combined); sum over ranks >= grad_nonfinite_elements",
        labels=("kind",),
        label_values={"kind": NONFINITE_KINDS},
        source=FromPartials(_nonfinite_by_kind),
    ),
    # ---- training-health signals (issue 6): clipping, AMP, learning rate, updates, history ----
    # Kept in one section so that other branches' catalog edits merge cleanly around it.
    _magnitude(
        "grad.tensor_l2_norm_max_to_min_ratio",
        "grad_tensor_l2_norm_max_to_min_ratio",
        GLOBAL,
        "Spread of the per-tensor L2 norms: max over tensors i of ||g_i|| / min over tensors i"
        " of ||g_i||. Absent when the smallest is 0.",
        lambda a: (a.tensor_norms().max() / m) if (m := a.tensor_norms().min()) > 0 else math.nan,
        across_tensors="max and min over tensors of each tensor's own L2 norm, then divided",
    ).with_unit("1"),
    Statistic(
        otel_name="grad.preclip_l2_norm",
        prom_name="grad_preclip_l2_norm",
        source=FromStep(lambda r: r.loop.preclip_norm),
        instrument="gauge",
        unit="{gradient}",
        formula="Total L2 norm of the gradients before clipping: the norm"
        " torch.nn.utils.clip_grad_norm_ (norm_type 2) returned, or the one passed to"
        " torch.nn.utils.clip_grads_with_norm_, in the collected step (the last call before"
        " the step); under DeepSpeed ZeRO the norm DeepSpeed clipped with. Absent in steps the"
        " loop did not clip.",
        scope=TRAINING,
        across_tensors="computed by the clip (clip_grad_norm_: foreach norms, stacked, norm of"
        " norms)",
        across_ranks="as clip_grad_norm_ computed it on the rank",
    ),
    Statistic(
        otel_name="grad.clip_coefficient_ratio",
        prom_name="grad_clip_coefficient_ratio",
        source=FromStep(lambda r: clip_coefficient(r.loop)),
        instrument="gauge",
        unit="1",
        formula="Clipping coefficient the clip applied in the collected step:"
        " min(1, max_norm / (grad_preclip_l2_norm + 1e-6)), evaluated in float64; 1 means not"
        " clipped. Absent in steps the loop did not clip and in steps whose pre-clip norm was"
        " NaN/Inf (see grad_preclip_nonfinite_steps_total).",
        scope=TRAINING,
        across_tensors="-",
        across_ranks="as clip_grad_norm_ computed it on the rank",
    ),
    Statistic(
        otel_name="grad.preclip_nonfinite_steps",
        prom_name="grad_preclip_nonfinite_steps_total",
        source=FromWatch(lambda w: w.preclip_nonfinite_steps),
        instrument="counter",
        unit="{step}",
        formula="Collected steps whose pre-clip norm (what the clip returned or was given) was"
        " NaN or +/-Inf: the clip then scaled the gradients by 0 or NaN, so the post-clip"
        " grad_* values of those steps describe the clip's output, not the gradients; the"
        " step has no grad_preclip_l2_norm and no grad_clip_coefficient_ratio.",
        scope=TRAINING,
        across_tensors="-",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="grad.clipped_steps",
        prom_name="grad_clipped_steps_total",
        source=FromWatch(lambda w: w.clipped_steps),
        instrument="counter",
        unit="{step}",
        formula="Collected steps in which the clip scaled the gradients down"
        " (grad_clip_coefficient_ratio < 1).",
        scope=TRAINING,
        across_tensors="-",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="amp.loss_scale",
        prom_name="amp_loss_scale",
        source=FromStep(lambda r: r.loop.loss_scale),
        instrument="gauge",
        unit="{factor}",
        formula="Loss scale of torch.amp.GradScaler in the collected step: the factor the loss"
        " was multiplied by before backward (before this step's update of the scale).",
        scope=TRAINING,
        across_tensors="-",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="optimizer.learning_rate",
        prom_name="optimizer_learning_rate",
        source=FromLearningRates(),
        instrument="gauge",
        unit="{lr}",
        formula="Learning rate of optimizer param group param_group in the collected step:"
        ' param_groups[param_group]["lr"] as the optimizer is about to apply it.',
        scope=TRAINING,
        across_tensors="-",
        across_ranks="per rank",
        labels=("param_group",),
    ),
    Statistic(
        otel_name="grad.nonfinite_param_info",
        prom_name="grad_nonfinite_param_info",
        source=FromNonfiniteParams(),
        instrument="gauge",
        unit="{info}",
        formula="Always 1, one series per parameter whose gradient held NaN/Inf in the most"
        " recent collected step that held any (kept after later finite steps, so that a"
        " one-step incident outlives it; see grad_nonfinite_steps_total): the first 5 in the"
        " optimizer's parameter order (position 0-4).",
        scope=TRAINING,
        across_tensors="-",
        across_ranks="per rank",
        labels=("param", "position"),
    ),
    Statistic(
        otel_name="grad.l2_norm_per_step",
        prom_name="grad_l2_norm_per_step",
        source=FromStepHistory(),
        instrument="histogram",
        unit="{gradient}",
        formula="Histogram of grad_l2_norm over every collected step with finite gradients"
        " (buckets 1e-8 to 1e4, 3 per decade): no step between two scrapes is missed.",
        scope=TRAINING,
        across_tensors="sum of squares over all tensors, then sqrt",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="grad.l2_norm_max_since_last_scrape",
        prom_name="grad_l2_norm_max_since_last_scrape",
        source=FromWatch(lambda w: w.max_norm_since_last),
        instrument="gauge",
        unit="{gradient}",
        formula="Largest grad_l2_norm of the finite collected steps since the previous scrape of"
        " this endpoint (by any scraper); absent when no such step was collected since.",
        scope=TRAINING,
        across_tensors="sum of squares over all tensors, then sqrt; max over steps",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="param.l2_norm",
        prom_name="param_l2_norm",
        source=FromUpdate(lambda update, param: total_l2_norm(param)),
        instrument="gauge",
        unit="{weight}",
        formula="L2 norm of the parameters after the sampled step: sqrt(sum of theta_t^2)"
        " over the parameters with a gradient (in the optimizer's param groups), at the last"
        " sampled step (every GRADWATCH_UPDATE_EVERY-th, see update_stats_step).",
        scope=TRAINING,
        across_tensors="sum of squares over all tensors, then sqrt",
        across_ranks="per rank (the rank's parameters or shards)",
    ),
    Statistic(
        otel_name="update.l2_norm",
        prom_name="update_l2_norm",
        source=FromUpdate(lambda update, param: total_l2_norm(update)),
        instrument="gauge",
        unit="{weight}",
        formula="L2 norm of the update the optimizer applied:"
        " sqrt(sum of (theta_t - theta_(t-1))^2),"
        " differenced in fp32 or wider from an fp32 snapshot taken at the pre-step hook,"
        " over the parameters with a gradient (in the optimizer's param groups), at the last"
        " sampled step (every GRADWATCH_UPDATE_EVERY-th, see update_stats_step).",
        scope=TRAINING,
        across_tensors="sum of squares over all tensors, then sqrt",
        across_ranks="per rank (the rank's parameters or shards)",
    ),
    Statistic(
        otel_name="update.to_param_ratio",
        prom_name="update_to_param_ratio",
        source=FromUpdate(_update_ratio),
        instrument="gauge",
        unit="1",
        formula="Relative update size: update_l2_norm / param_l2_norm of the same step,"
        " over the parameters with a gradient (in the optimizer's param groups), at the last"
        " sampled step (every GRADWATCH_UPDATE_EVERY-th, see update_stats_step).",
        scope=TRAINING,
        across_tensors="ratio of the two totals",
        across_ranks="per rank (the rank's parameters or shards)",
    ),
    Statistic(
        otel_name="param.group.l2_norm",
        prom_name="param_group_l2_norm",
        source=FromUpdate(lambda update, param: total_l2_norm(param), per_group=True),
        instrument="gauge",
        unit="{weight}",
        formula="L2 norm of the group's parameters after the sampled step: sqrt(sum of theta_t^2)"
        " over the parameters with a gradient (in the optimizer's param groups), at the last"
        " sampled step (every GRADWATCH_UPDATE_EVERY-th, see update_stats_step).",
        scope=TRAINING,
        across_tensors="sum of squares over the group's tensors, then sqrt",
        across_ranks="per rank (the rank's parameters or shards)",
        labels=("group",),
    ),
    Statistic(
        otel_name="update.group.l2_norm",
        prom_name="update_group_l2_norm",
        source=FromUpdate(lambda update, param: total_l2_norm(update), per_group=True),
        instrument="gauge",
        unit="{weight}",
        formula="L2 norm of the group's update: sqrt(sum of (theta_t - theta_(t-1))^2)"
        " over the parameters with a gradient (in the optimizer's param groups), at the last"
        " sampled step (every GRADWATCH_UPDATE_EVERY-th, see update_stats_step).",
        scope=TRAINING,
        across_tensors="sum of squares over the group's tensors, then sqrt",
        across_ranks="per rank (the rank's parameters or shards)",
        labels=("group",),
    ),
    Statistic(
        otel_name="update.group.to_param_ratio",
        prom_name="update_group_to_param_ratio",
        source=FromUpdate(_update_ratio, per_group=True),
        instrument="gauge",
        unit="1",
        formula="Relative update size of the group: update_group_l2_norm / param_group_l2_norm,"
        " over the parameters with a gradient (in the optimizer's param groups), at the last"
        " sampled step (every GRADWATCH_UPDATE_EVERY-th, see update_stats_step).",
        scope=TRAINING,
        across_tensors="ratio of the two group totals",
        across_ranks="per rank (the rank's parameters or shards)",
        labels=("group",),
    ),
    Statistic(
        otel_name="update.stats_step",
        prom_name="update_stats_step",
        source=FromUpdateStep(),
        instrument="gauge",
        unit="{step}",
        formula="Optimizer step that the update_* and param_* gauges belong to (the last step"
        " sampled: every GRADWATCH_UPDATE_EVERY-th, steps 1, N+1, ...).",
        scope=TRAINING,
        across_tensors="-",
        across_ranks="identical on every rank",
    ),
    Statistic(
        otel_name="grad.unreduced_tensors",
        prom_name="grad_unreduced_tensors",
        source=FromStep(lambda r: r.loop.unreduced_tensors or None),
        instrument="gauge",
        unit="{tensor}",
        formula="Parameter tensors of the collected step whose gradient gradwatch cannot reduce"
        " (sparse, complex or meta gradients, named once in the log): left out of every other"
        " grad_* statistic of the step. Absent when there are none.",
        scope=TRAINING,
        across_tensors="count",
        across_ranks="per rank",
    ),
    # ---- gradient noise scale (issue 6): needs GRADWATCH_MICRO_BATCH_SIZE ----
    Statistic(
        otel_name="grad.accumulation_micro_batches",
        prom_name="grad_accumulation_micro_batches",
        source=FromStep(lambda r: r.loop.micro_batches),
        instrument="gauge",
        unit="{batch}",
        formula="Backward passes k between the previous optimizer step and the collected one:"
        " micro-batches accumulated into its gradient. Exported when GRADWATCH_MICRO_BATCH_SIZE"
        " is set.",
        scope=TRAINING,
        across_tensors="-",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="grad.noise_trace_sigma",
        prom_name="grad_noise_trace_sigma",
        source=FromStep(lambda r: r.noise.trace_sigma if r.noise else None),
        instrument="gauge",
        unit="{gradientsquared}",
        formula="Trace of the per-sample gradient covariance, tr(Sigma): bias-corrected EMA"
        " (decay GRADWATCH_NOISE_EMA) over collected steps with k >= 2 micro-batches of the"
        " unbiased estimate (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big), g_small the"
        " first micro-batch's mean gradient (B_small = GRADWATCH_MICRO_BATCH_SIZE samples),"
        " g_big the step's (B_big = k * B_small); |g|^2 in float64, unscaled (loss scale),"
        " before clipping. Can be <= 0 while the estimate is noisy.",
        scope=TRAINING,
        across_tensors="sum of squares over all tensors",
        across_ranks="per rank (single-process data only)",
    ),
    Statistic(
        otel_name="grad.noise_true_grad_sq_norm",
        prom_name="grad_noise_true_grad_sq_norm",
        source=FromStep(lambda r: r.noise.true_grad_sq_norm if r.noise else None),
        instrument="gauge",
        unit="{gradientsquared}",
        formula="Squared norm of the true (full-data) gradient, |G|^2: bias-corrected EMA"
        " (decay GRADWATCH_NOISE_EMA) of the unbiased estimate"
        " (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small), same steps and terms as"
        " grad_noise_trace_sigma. Can be <= 0 while |G|^2 is small next to the noise.",
        scope=TRAINING,
        across_tensors="sum of squares over all tensors",
        across_ranks="per rank (single-process data only)",
    ),
    Statistic(
        otel_name="grad.noise_scale",
        prom_name="grad_noise_scale",
        source=FromStep(_noise_scale),
        instrument="gauge",
        unit="{sample}",
        formula="Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018,"
        " appendix A.1), in samples: grad_noise_trace_sigma / grad_noise_true_grad_sq_norm (a"
        " ratio of the two EMAs). Absent while either EMA is <= 0.",
        scope=TRAINING,
        across_tensors="ratio of the two totals",
        across_ranks="per rank (single-process data only)",
    ),
    # ---- gradwatch's own cost and health ----
    Statistic(
        otel_name="gradwatch.collect",
        prom_name="gradwatch_collect_seconds",
        source=FromWatch(lambda w: w.collect_seconds),
        instrument="gauge",
        unit="s",
        formula="Host time the training thread spent in gradwatch's last collection (launch or"
        " computation of the reduction, not the asynchronous device time).",
        scope=SELF,
        across_tensors="-",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="gradwatch.errors",
        prom_name="gradwatch_errors_total",
        source=FromProcess(lambda p: [({"stage": k}, float(n)) for k, n in p.errors]),
        instrument="counter",
        unit="{error}",
        formula="Failures inside gradwatch, by stage (collect, readout, export, server, names),"
        " each logged and never raised into training; and connections of misbehaving /metrics"
        " clients (http: failed TLS handshakes, deadlines, malformed requests, resets), summarised"
        " in one log line a minute at most.",
        scope=SELF,
        across_tensors="-",
        across_ranks="per rank",
        labels=("stage",),
    ),
    Statistic(
        otel_name="gradwatch.dropped_steps",
        prom_name="gradwatch_dropped_steps_total",
        source=FromWatch(lambda w: w.dropped_steps),
        instrument="counter",
        unit="{step}",
        formula="Collections dropped because the device had not finished the previous ones"
        " (gradwatch never blocks the training thread to wait for them).",
        scope=SELF,
        across_tensors="-",
        across_ranks="per rank",
    ),
    Statistic(
        otel_name="gradwatch.info",
        prom_name="gradwatch_info",
        source=FromProcess(_info),
        instrument="gauge",
        unit="{info}",
        formula="Always 1; labels carry the gradwatch version and the reduction backend in use.",
        scope=SELF,
        across_tensors="-",
        across_ranks="per rank",
        labels=("version", "backend"),
    ),
)

BY_PROM_NAME: dict[str, Statistic] = {s.prom_name: s for s in CATALOG}
STEP = BY_PROM_NAME["grad_stats_step"]  # the step number the grad_* values belong to


def markdown_table(thresholds: Thresholds | None = None) -> str:
    """The metric table of README.md, generated (never hand-edited)."""
    rows = [
        "| Prometheus name | labels | unit | formula (HELP text) | across tensors | across ranks |",
        "|---|---|---|---|---|---|",
    ]
    for s in CATALOG:
        labels = ", ".join(f"`{x}`" for x in s.labels) or "-"
        opt = "" if s.default_on else " *(opt-in)*"
        rows.append(
            f"| `{s.prom_name}`{opt} | {labels} | `{s.unit}` | {s.description(thresholds)} |"
            f" {s.across_tensors} | {s.across_ranks} |"
        )
    return "\n".join(rows) + "\n"


def text_table(thresholds: Thresholds | None = None) -> str:
    """A plain-text listing for terminals."""
    out = []
    for s in CATALOG:
        labels = "{" + ",".join(s.labels) + "}" if s.labels else ""
        out.append(f"{s.prom_name}{labels}  [{s.instrument}, unit {s.unit}]")
        out.append(f"    {s.description(thresholds)}")
    return "\n".join(out) + "\n"
