"""The three dashboards, declared as lists of panel records (rendered by :mod:`.spec`)."""

from __future__ import annotations

from ..config import DEFAULT_PORT
from .rules import HEALTH_RECORD, HEALTH_WHAT, health_heuristic
from .spec import (
    FILTERS,
    RATE,
    Dashboard,
    Panel,
    Query,
    Row,
    Variable,
    render_dashboard,
    sel,
    unit_of,
)

WHO = "rank {{rank}} opt {{optimizer}} {{instance}}"
GWHO = "{{group}} rank {{rank}} {{instance}}"
RWHO = "rank {{rank}}"
NAN_GAP = (
    " Steps whose gradients hold NaN/Inf have no magnitude sample: they show as gaps"
    " (see the non-finite panels), never as the previous step's value."
)
RED_ABOVE_0 = ((None, "green"), (1, "red"))


def metric(name: str, prefix: str = "") -> Query:
    """A catalog metric as is: one series per process and optimizer."""
    return Query(sel(name), prefix + WHO)


def magnitude(name: str, title: str, what: str, legend: str = WHO) -> Panel:
    """A gradient magnitude over time (log axis; NaN steps are gaps)."""
    query = Query(sel(name), legend)
    return Panel(title, what + NAN_GAP, [query], unit_of(name))


def per_second(counter: str, title: str, what: str, size: tuple[int, int], by: str = "") -> Panel:
    """A step counter's rate, per series or summed ``by`` labels."""
    expr = f"rate({sel(counter)}[{RATE}])"
    expr, legend = (f"sum by ({by}) ({expr})", RWHO) if by else (expr, WHO)
    return Panel(title, what, [Query(expr, legend)], "suffix: steps/s", size)


def common_variables() -> list[Variable]:
    """job, instance and rank (FILTERS), each offering the values the ones before it allow."""
    job, instance, rank = (sel("gradwatch_info", filters=FILTERS[:i]) for i in range(3))
    return [
        Variable("job", job, "job", "Prometheus scrape job(s) of the training processes."),
        Variable(
            "instance",
            instance,
            "instance",
            "Scrape target(s): one per process (rank r serves on port"
            f" {DEFAULT_PORT} + LOCAL_RANK).",
        ),
        Variable(
            "rank",
            rank,
            "rank",
            "Global rank(s) (RANK of torchrun; 0 for a single process).",
            sort=3,  # numerical: 2 before 10
        ),
    ]


# --------------------------------------------------------------------------------------------
# overview
# --------------------------------------------------------------------------------------------

MAGNITUDES = [
    Row("Gradient magnitude (all gradients of each optimizer)"),
    magnitude(
        "grad_l2_norm",
        "Total gradient L2 norm",
        "The total L2 norm of every gradient the optimizer applies, per step.",
    ),
    magnitude(
        "grad_rms",
        "Gradient RMS",
        "Root mean square gradient element, comparable across model sizes.",
    ),
    magnitude(
        "grad_abs_max",
        "Largest |gradient| element",
        "The largest absolute gradient element (L-infinity norm).",
    ),
    magnitude("grad_abs_mean", "Mean |gradient| element", "The mean absolute gradient element."),
]

HEALTH = [
    Row("Health"),
    Panel(
        "Non-finite gradient elements",
        "NaN and Inf gradient elements of the last collected step, summed over the selected"
        " processes; the stat shows the maximum over the time range and turns red above 0.",
        [Query(f"sum by (kind) ({sel('grad_nonfinite_elements')})", "{{kind}}")],
        "short",
        (6, 6),
        thresholds=RED_ABOVE_0,
        calc="max",
        kind="stat",
    ),
    Panel(
        "Non-finite steps in range",
        "Collected steps whose gradients held NaN/Inf during the dashboard's time range"
        " (catches steps between two scrapes, which the element count above cannot).",
        [Query(f"sum(increase({sel('grad_nonfinite_steps_total')}[$__range]))", "steps")],
        "short",
        (6, 6),
        thresholds=RED_ABOVE_0,
        kind="stat",
    ),
    Panel(
        "Zero gradient elements",
        "Fraction of gradient elements exactly 0 (dead units, unused embedding rows, masked"
        " parameters).",
        [metric("grad_zero_ratio")],
        "percentunit",
        (12, 6),
    ),
    Panel(
        "Vanishing and exploding tensors",
        "Gradient tensors whose own L2 norm is below the vanishing / above the exploding"
        " threshold, out of T tensors.",
        [
            metric("grad_tensors_vanishing", "vanishing "),
            metric("grad_tensors_exploding", "exploding "),
            metric("grad_tensors", "T (all tensors) "),
        ],
        "short",
    ),
    Panel(
        "gradwatch processes",
        "Version and reduction backend of each process, and the size of what it watches"
        " (N elements, T tensors).",
        [
            Query(f"sum by (job, instance, rank, version, backend) ({sel('gradwatch_info')})"),
            Query(f"sum by (job, instance, rank) ({sel('grad_elements')})"),
            Query(f"sum by (job, instance, rank) ({sel('grad_tensors')})"),
        ],
        "short",
        columns=[None, "N elements", "T tensors"],
        kind="table",
    ),
]

PER_TENSOR = [
    Row("Per-tensor L2 norms"),
    Panel(
        "Per-tensor L2 norm: min, mean, max",
        "Each gradient tensor's own L2 norm ||g_i||, reduced over the tensors: smallest, mean"
        " and largest." + NAN_GAP,
        [
            metric("grad_tensor_l2_norm_min", "min "),
            metric("grad_tensor_l2_norm_mean", "mean "),
            metric("grad_tensor_l2_norm_max", "max "),
        ],
        "sci",
    ),
    Panel(
        "Per-tensor norm spread (max / min)",
        "Ratio of the largest to the smallest per-tensor L2 norm: how many times the most"
        " active tensor's gradient outweighs the least active one's. Absent (a gap) when a"
        " tensor's gradient is all zero." + NAN_GAP,
        [metric("grad_tensor_l2_norm_max_to_min_ratio")],
        "short",
        log=True,
    ),
]


def _fraction_of_steps(counter: str) -> str:
    """A step counter's rate as a fraction of the collected steps' rate."""
    return (
        f"rate({sel(counter)}[{RATE}])\n/ on (job, instance, rank, optimizer)\n"
        f"rate({sel('grad_steps_total')}[{RATE}])"
    )


def _norm_quantile(q: float) -> Query:
    bucket = f"rate({sel('grad_l2_norm_per_step_bucket')}[{RATE}])"
    expr = f"histogram_quantile({q}, sum by (job, instance, rank, optimizer, le) ({bucket}))"
    return Query(expr, f"p{int(q * 100)} " + WHO)


CLIPPING = [
    Row("Clipping and every step between scrapes"),
    Panel(
        "Gradient norm before and after clipping",
        "The total norm clip_grad_norm_ returned (before clipping) and the total norm the"
        " optimizer applied (after clipping). Apart where clipping bites." + NAN_GAP,
        [metric("grad_preclip_l2_norm", "pre-clip "), metric("grad_l2_norm", "applied ")],
        "sci",
    ),
    Panel(
        "Clipping coefficient and clipped steps",
        "The coefficient the clip applied (1: not clipped), the fraction of collected steps it"
        " clipped, and the fraction whose pre-clip norm was NaN/Inf (the clip then zeroed or"
        " poisoned the gradients: no coefficient is shown for them), per $__rate_interval.",
        [
            metric("grad_clip_coefficient_ratio", "coefficient "),
            Query(_fraction_of_steps("grad_clipped_steps_total"), "clipped fraction " + WHO),
            Query(
                _fraction_of_steps("grad_preclip_nonfinite_steps_total"),
                "NaN/Inf pre-clip fraction " + WHO,
            ),
        ],
        "percentunit",
    ),
    Panel(
        "Largest step norm between scrapes",
        "The largest total gradient norm of any collected step since the previous scrape,"
        " next to the last step's: a one-step spike shows here even when the scrape lands on"
        " a calm step.",
        [
            metric("grad_l2_norm_max_since_last_scrape", "max since scrape "),
            metric("grad_l2_norm", "last step "),
        ],
        "sci",
    ),
    Panel(
        "Per-step gradient norm quantiles",
        "Quantiles of the total gradient norm over every collected step (from the"
        " grad_l2_norm_per_step histogram, buckets 1, 2, 5 per decade: a quantile is exact"
        " only to its bucket).",
        [_norm_quantile(0.5), _norm_quantile(0.99)],
        "sci",
    ),
]

UPDATES = [
    Row("Loss scale, learning rate and updates"),
    Panel(
        "AMP loss scale",
        "The factor torch.amp.GradScaler multiplied the loss by; it halves at each skipped"
        " (overflowing) step and grows after a run of good ones.",
        [metric("amp_loss_scale")],
        "short",
        (8, 8),
        log=True,
    ),
    Panel(
        "Learning rate",
        "Learning rate of each optimizer param group, as the optimizer applied it.",
        [metric("optimizer_learning_rate", "group {{param_group}} ")],
        "sci",
        (8, 8),
    ),
    Panel(
        "Parameters with non-finite gradients (first 5)",
        "The first parameters (optimizer order) whose gradients held NaN/Inf in a step during"
        " the time range.",
        [
            Query(
                "max by (job, instance, rank, optimizer, position, param)"
                f" (max_over_time({sel('grad_nonfinite_param_info')}[$__range]))"
            )
        ],
        "short",
        (8, 8),
        columns=["seen"],
        kind="table",
    ),
    Panel(
        "Update / parameter norm ratio",
        "||theta_t - theta_(t-1)|| / ||theta_t|| of the sampled steps, whole model and per"
        " group (every GRADWATCH_UPDATE_EVERY-th step).",
        [
            metric("update_to_param_ratio", "all "),
            metric("update_group_to_param_ratio", "{{group}} "),
        ],
        "sci",
    ),
    Panel(
        "Update and parameter norms",
        "L2 norms of the sampled update and of the parameters after it.",
        [metric("update_l2_norm", "update "), metric("param_l2_norm", "params ")],
        "sci",
    ),
]

NOISE = [
    Row("Gradient noise scale and health heuristic"),
    Panel(
        "Gradient noise scale B_simple (samples)",
        "tr(Sigma) / |G|^2 estimated from gradient accumulation (McCandlish et al. 2018,"
        " appendix A.1): the batch size around which larger batches stop paying off. Needs"
        " GRADWATCH_MICRO_BATCH_SIZE and k >= 2 micro-batches per step; the micro-batch count k"
        " is shown for reference.",
        [
            metric("grad_noise_scale", "B_simple "),
            metric("grad_accumulation_micro_batches", "k micro-batches "),
        ],
        "short",
        log=True,
    ),
    Panel(
        "Gradient health score (heuristic, not a measurement)",
        HEALTH_WHAT + " Same expression as the recording rule " + HEALTH_RECORD + ".",
        [Query(health_heuristic(sel), WHO)],
        "percentunit",
    ),
]

# gradwatch_errors_total only has series once a stage failed: fall back to 0 per process.
ERRORS = (
    f"sum by (job, instance, rank, stage) (rate({sel('gradwatch_errors_total')}[{RATE}]))\n"
    f"or on (job, instance, rank)\n"
    f"sum by (job, instance, rank) (0 * {sel('gradwatch_info')})"
)

COST = [
    Row("Progress and gradwatch's own cost"),
    per_second(
        "grad_steps_total",
        "Collected steps per second",
        "rate(grad_steps_total[$__rate_interval]): optimizer steps per second whose gradients"
        " were collected (all steps with GRADWATCH_EVERY=1).",
        (8, 7),
    ),
    Panel(
        "gradwatch collection time",
        "Host time the training thread spent in gradwatch's last collection.",
        [metric("gradwatch_collect_seconds")],
        "s",
        (8, 7),
    ),
    Panel(
        "gradwatch errors per second",
        "Failures inside gradwatch per second, by stage (0 for a process that never failed:"
        " gradwatch_errors_total only has series once a stage failed, so the query falls back"
        " to 0 * gradwatch_info).",
        [Query(ERRORS, "{{stage}} rank {{rank}} {{instance}}")],
        "suffix: errors/s",
        (8, 7),
    ),
    per_second(
        "gradwatch_dropped_steps_total",
        "Dropped collections per second",
        "Collections dropped because the device had not finished the previous ones (the"
        " training thread never waits).",
        (12, 7),
    ),
    per_second(
        "amp_skipped_steps_total",
        "AMP skipped steps per second",
        "Optimizer steps torch.amp.GradScaler skipped (scaled gradients held NaN/Inf); a few"
        " while the scale settles are normal, a steady rate is not.",
        (12, 7),
    ),
]

OVERVIEW = Dashboard(
    "gradwatch-overview",
    "gradwatch / Overview",
    "Gradient statistics of the whole model per optimizer step, health counts and"
    " gradwatch's own cost. Generated by `gradwatch dashboards` from the catalog.",
    [*MAGNITUDES, *HEALTH, *PER_TENSOR, *CLIPPING, *UPDATES, *NOISE, *COST],
    common_variables(),
)


# --------------------------------------------------------------------------------------------
# layers and groups
# --------------------------------------------------------------------------------------------


def _params_table(
    title: str, what: str, expr: str, unit: str, column: str, size: tuple[int, int] = (8, 10)
) -> Panel:
    """An instant table of one query, one value column."""
    return Panel(title, what, [Query(expr)], unit, size, kind="table", columns=[column])


PER_PARAM = [
    Row("Per parameter (needs GRADWATCH_PER_PARAM=1)"),
    Panel(
        "Per-parameter gradient L2 norm",
        "One row per parameter tensor, colour = its gradient's L2 norm (exponential colour"
        " scale), maximum over the selected ranks. Only exported with GRADWATCH_PER_PARAM=1 (at"
        " most GRADWATCH_MAX_PARAMS parameters).",
        [Query(f"max by (param) ({sel('grad_param_l2_norm')})", "{{param}}")],
        "sci",
        (24, 12),
        kind="heatmap",
    ),
    _params_table(
        "Top 20 parameter gradient norms",
        "The 20 parameter tensors with the largest gradient L2 norm at the end of the time range.",
        f"topk(20, {sel('grad_param_l2_norm')})",
        "sci",
        "L2 norm",
    ),
    _params_table(
        "Bottom 20 parameter gradient norms",
        "The 20 parameter tensors with the smallest gradient L2 norm at the end of the time"
        " range (candidates for vanishing gradients).",
        f"bottomk(20, {sel('grad_param_l2_norm')})",
        "sci",
        "L2 norm",
    ),
    _params_table(
        "Parameters with non-finite gradients",
        "Per parameter: the most NaN/Inf gradient elements seen in one step during the time"
        " range (top 20; all 0 on a healthy run).",
        "topk(20, sum by (job, instance, rank, param) (max_over_time("
        f"{sel('grad_param_nonfinite_elements')}[$__range])))",
        "short",
        "NaN/Inf elements",
    ),
    _params_table(
        "Top 20 parameter zero ratios",
        "Parameters whose gradients hold the largest fraction of exact zeros.",
        f"topk(20, {sel('grad_param_zero_ratio')})",
        "percentunit",
        "zero fraction",
        (12, 8),
    ),
    _params_table(
        "Top 20 parameter |gradient| maxima",
        "Parameters with the largest absolute gradient element.",
        f"topk(20, {sel('grad_param_abs_max')})",
        "sci",
        "max |g|",
        (12, 8),
    ),
]

GROUP_A, GROUP_B = (sel("grad_group_rms", f'group="${g}"') for g in ("group_a", "group_b"))
RMS_RATIO = f"{GROUP_A}\n/ ignoring (group)\n{GROUP_B}"

PER_GROUP = [
    Row("Per group (GRADWATCH_GROUPS or optimizer param groups)"),
    magnitude(
        "grad_group_l2_norm", "Group gradient L2 norm", "L2 norm of each group's gradients.", GWHO
    ),
    magnitude(
        "grad_group_rms",
        "Group gradient RMS",
        "Root mean square gradient element of each group.",
        GWHO,
    ),
    Panel(
        "RMS ratio $group_a / $group_b",
        "How many times larger the RMS gradient element of group $group_a is than that of"
        " group $group_b (pick the groups with the variables above):"
        ' grad_group_rms{group="$group_a"} / ignoring(group) grad_group_rms{group="$group_b"},'
        " matched per process and optimizer. Both RMS values are sqrt(sum of g^2 / N_group) of"
        " their group.",
        [Query(RMS_RATIO, WHO)],
        "sci",
    ),
    Panel(
        "Group |gradient| maximum",
        "Largest absolute gradient element per group." + NAN_GAP,
        [Query(sel("grad_group_abs_max"), GWHO)],
        "sci",
    ),
    Panel(
        "Group non-finite elements",
        "NaN and Inf gradient elements per group in the last collected step.",
        [
            Query(
                f"sum by (job, instance, rank, group) ({sel('grad_group_nonfinite_elements')})",
                GWHO,
            )
        ],
        "short",
        (24, 7),
    ),
]


def _group_variable(name: str, title: str, role: str, default: str) -> Variable:
    text = f"{role} group of the RMS ratio panel."
    return Variable(name, sel("grad_group_rms"), "group", text, default=default, title=title)


LAYERS = Dashboard(
    "gradwatch-layers",
    "gradwatch / Layers and groups",
    "Per-parameter and per-group gradient statistics, and the RMS ratio of two groups."
    " Generated by `gradwatch dashboards` from the catalog.",
    [*PER_PARAM, *PER_GROUP],
    [
        *common_variables(),
        _group_variable("group_a", "group A", "Numerator", "seed"),
        _group_variable("group_b", "group B", "Denominator", "host"),
    ],
)


# --------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------


def by_rank(name: str, title: str, what: str, size: tuple[int, int] = (12, 8)) -> Panel:
    """A gauge's maximum over each rank's optimizers."""
    query = Query(f"max by (rank) ({sel(name)})", RWHO)
    what += " (max over the rank's optimizers)."
    return Panel(title, what, [query], unit_of(name), size)


def _nonfinite_by_rank(name: str, title: str, what: str) -> Panel:
    query = Query(f"sum by (rank, kind) ({sel(name)})", "{{kind}} rank {{rank}}")
    return Panel(title, what, [query], "short", (8, 8))


SKEW = f"max({sel('grad_stats_step')}) - min({sel('grad_stats_step')})"

RANK_PANELS = [
    Row("Key statistics by rank"),
    by_rank(
        "grad_l2_norm",
        "Total gradient L2 norm by rank",
        "Total L2 norm per rank; after DDP's all-reduce every rank should agree",
    ),
    by_rank("grad_rms", "Gradient RMS by rank", "RMS gradient element per rank"),
    by_rank("grad_abs_max", "Largest |gradient| by rank", "Largest absolute element per rank"),
    by_rank("grad_zero_ratio", "Zero gradient fraction by rank", "Fraction of exact zeros"),
    Row("Non-finite gradients by rank"),
    _nonfinite_by_rank(
        "grad_nonfinite_elements",
        "Non-finite gradient elements by rank",
        "NaN and Inf gradient elements of each rank's last collected step.",
    ),
    _nonfinite_by_rank(
        "grad_rank_nonfinite_elements",
        "Rank-local non-finite gradient elements",
        "NaN and Inf elements in each rank's own local gradients (its shards under FSDP2)"
        " before combination across ranks: the rank where a NaN appeared. Under FSDP2"
        " grad_nonfinite_elements is global (identical on every rank); this one is not.",
    ),
    Panel(
        "Non-finite steps by rank",
        "Collected steps with NaN/Inf gradients per rank, counted per $__rate_interval window.",
        [Query(f"sum by (rank) (increase({sel('grad_nonfinite_steps_total')}[{RATE}]))", RWHO)],
        "short",
        (8, 8),
    ),
    Row("Progress and cost by rank"),
    Panel(
        "Step skew between ranks",
        f"{SKEW}: how many optimizer steps the most advanced selected rank is ahead of the"
        " least advanced one (0 for a single process; compare ranks of one run only).",
        [Query(SKEW, "skew")],
        "short",
        (6, 8),
        thresholds=((None, "green"), (2, "orange")),
        kind="stat",
    ),
    Panel(
        "Optimizer step by rank",
        "The step each rank's statistics belong to.",
        [Query(f"max by (rank) ({sel('grad_stats_step')})", RWHO)],
        "short",
        (18, 8),
    ),
    per_second(
        "grad_steps_total",
        "Collected steps per second by rank",
        "rate(grad_steps_total) per rank.",
        (8, 8),
        by="rank",
    ),
    by_rank(
        "gradwatch_collect_seconds",
        "gradwatch collection time by rank",
        "Host time of each rank's last collection",
        (8, 8),
    ),
    per_second(
        "gradwatch_dropped_steps_total",
        "Dropped collections by rank",
        "Collections dropped per second per rank.",
        (8, 8),
        by="rank",
    ),
]

RANKS = Dashboard(
    "gradwatch-ranks",
    "gradwatch / Ranks",
    "Key gradient statistics, non-finite counts and progress per rank of a distributed run"
    " (works for a single process: rank 0). Generated by `gradwatch dashboards`.",
    RANK_PANELS,
    common_variables(),
)


def overview() -> dict:
    return render_dashboard(OVERVIEW)


def layers() -> dict:
    return render_dashboard(LAYERS)


def ranks() -> dict:
    return render_dashboard(RANKS)


DASHBOARDS = {
    "gradwatch-overview.json": overview,
    "gradwatch-layers.json": layers,
    "gradwatch-ranks.json": ranks,
}
