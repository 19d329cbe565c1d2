"""Prometheus alerting and recording rules, declared as records (the file ``gradwatch-alerts.yml``).

Each alert's description quotes the formula of every catalog metric its expression uses. Rules
select across all scrape jobs (no dashboard variables), so metric names go through
:func:`bare`: still checked against the catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .spec import formulas, metrics_in, sel

ALERTS_FILE = "gradwatch-alerts.yml"
UP_JOBS = 'job=~"gradwatch.*"'  # how the rules find gradwatch's scrape targets in `up`
WHERE = "{{ $labels.instance }} rank {{ $labels.rank }}"
BY = "sum by (job, instance, rank, optimizer)"


def bare(name: str, *matchers: str) -> str:
    """A catalog metric's selector without the dashboards' template variables."""
    return sel(name, *matchers, filters=())


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: Literal["critical", "warning", "info"]
    summary: str
    what: str  # the description; the formulas of the metrics used follow
    uses: Sequence[str] = ()  # metrics the description mentions beyond those in expr

    def render(self) -> dict:
        names = list(dict.fromkeys([*metrics_in(self.expr), *self.uses]))
        text = self.what + ("\n" + formulas(names) if names else "")
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary, "description": text},
        }


@dataclass(frozen=True)
class Record:
    name: str
    expr: str
    comment: str  # rules have no description field: written as a YAML comment above the rule
    labels: dict[str, str] = field(default_factory=dict)

    def render(self) -> dict:
        return {"record": self.name, "expr": self.expr, "labels": self.labels}


# The health-score heuristic some training loops compute. Not a measurement: a recording rule
# (never an exported metric), named and described so that nobody takes it for one.
HEALTH_RECORD = "gradwatch:grad_health_heuristic:ratio"
HEALTH_WHAT = (
    "A heuristic, not a measurement: 1 - 0.5 * (vanishing tensors / T) - 0.8 * (exploding"
    " tensors / T), clipped to [0, 1], T = gradient tensors, per process and optimizer. The"
    " weights 0.5 and 0.8 are a convention some training loops use, not derived from anything;"
    " 1 only means no tensor crossed either threshold. Look at the counts themselves."
)


def health_heuristic(select: Callable[[str], str] = bare) -> str:
    """The heuristic's PromQL (series match one to one: same labels), each metric name passed
    through ``select`` (:func:`~.spec.sel` for dashboards)."""
    v, e, t = map(select, ("grad_tensors_vanishing", "grad_tensors_exploding", "grad_tensors"))
    return f"clamp(1 - 0.5 * {v} / {t} - 0.8 * {e} / {t}, 0, 1)"


def _new_or_rising(counter: str, window: str) -> str:
    """A counter rose within the window, or a process younger than it started above 0."""
    c = bare(counter)
    return f"{BY} (increase({c}[{window}])) > 0\nor\n{BY} ({c} > 0 unless {c} offset {window})"


_NORM, _STEP, _UP = bare("grad_l2_norm"), bare("grad_stats_step"), bare("up", UP_JOBS)
_ERRORS = bare("gradwatch_errors_total", 'stage!="http"')

ALERTS = (
    Alert(
        "GradwatchNonFiniteGradients",
        f"{BY} ({bare('grad_nonfinite_elements')}) > 0\nor\n"
        + _new_or_rising("grad_nonfinite_steps_total", "5m"),
        "0m",
        "critical",
        f"NaN/Inf gradients on {WHERE}",
        "Gradients held NaN or Inf elements in the last 5 minutes (the last step's count,"
        " the step counter's increase, or a process younger than 5 minutes whose counter"
        " started above 0). Magnitude statistics of those steps are absent. Steps that"
        " torch.amp.GradScaler skipped are not counted (see amp_skipped_steps_total).",
    ),
    Alert(
        "GradwatchPreclipNormNonFinite",
        _new_or_rising("grad_preclip_nonfinite_steps_total", "5m"),
        "0m",
        "critical",
        f"The pre-clip gradient norm was NaN/Inf on {WHERE}",
        "In the last 5 minutes a collected step's pre-clip norm was NaN or Inf, so the clip"
        " scaled its gradients by 0 or NaN: the post-clip statistics of that step (often a"
        " calm-looking 0) describe the clip's output, not the gradients.",
    ),
    Alert(
        "GradwatchGradNormExploding",
        f"{_NORM} > 10 * quantile_over_time(0.5, {_NORM}[1h] offset 5m)\n"
        f"and\ncount_over_time({_NORM}[1h] offset 5m) >= 30",
        "2m",
        "warning",
        f"Gradient norm {{{{ $value | humanize }}}} is over 10x its usual value on {WHERE}",
        "The total gradient L2 norm stayed above 10 times its median of the hour before"
        " the last 5 minutes. The median needs at least 30 samples of history (a run's"
        " first minutes, with a few large early-training norms, define no normal), and"
        " leaving out the last 5 minutes keeps a rising norm from raising its own baseline."
        " If the loop clips gradients before optimizer.step(), this is the clipped norm.",
    ),
    Alert(
        "GradwatchGradientsVanishing",
        f"{bare('grad_tensors_vanishing')} / {bare('grad_tensors')} > 0.5",
        "15m",
        "warning",
        f"{{{{ $value | humanizePercentage }}}} of gradient tensors vanish on {WHERE}",
        "More than half of the gradient tensors had an L2 norm below the vanishing"
        " threshold for 15 minutes.",
    ),
    Alert(
        "GradwatchTargetDown",
        f"{_UP} == 0",
        "2m",
        "warning",
        "gradwatch /metrics of {{ $labels.instance }} cannot be scraped",
        "Prometheus could not scrape the target for 2 minutes: the training process ended"
        " or hangs, or /metrics is not reachable (GRADWATCH_HOST/PORT). A finished run's"
        " static target fires this too. up is Prometheus's own scrape-health series.",
    ),
    Alert(
        "GradwatchNoStatistics",
        f"{_UP} == 1\nunless on (job, instance)\n{_STEP}",
        "10m",
        "warning",
        "gradwatch on {{ $labels.instance }} serves no gradient statistics",
        "The process answers /metrics but has published no gradient statistics for 10"
        " minutes: no optimizer step was collected (still loading, stuck before its first"
        " step, or collection fails: see gradwatch_errors_total).",
        uses=("gradwatch_errors_total",),
    ),
    Alert(
        "GradwatchStatisticsStale",
        f"changes({_STEP}[10m]) == 0\nand on (job, instance)\n{_UP} == 1",
        "5m",
        "warning",
        f"Training step has not advanced for 15 minutes on {WHERE}",
        "grad_stats_step did not change for 15 minutes while the process still answers"
        " /metrics: training hangs (collective, data loader) or a step takes longer than"
        " that (raise the window for such runs, or for large GRADWATCH_EVERY).",
    ),
    Alert(
        "GradwatchTelemetryAbsent",
        f"absent({bare('grad_stats_step', UP_JOBS)})",
        "15m",
        "info",
        "No gradwatch statistics in Prometheus",
        "No gradwatch process has published gradient statistics for 15 minutes (none runs,"
        " or none is scraped: check the job name and targets). Drop this rule where"
        " training runs come and go.",
    ),
    Alert(
        "GradwatchInternalErrors",
        f"increase({_ERRORS}[10m]) > 0\n"
        f"or\n({_ERRORS} > 0 unless {bare('gradwatch_errors_total')} offset 10m)",
        "0m",
        "warning",
        "gradwatch failed in stage {{ $labels.stage }} on " + WHERE,
        "gradwatch logged failures in the last 10 minutes (training went on; statistics of"
        " that stage may be missing). The series of a stage appears with its first"
        " failure, hence the second term. Stage http (misbehaving /metrics clients, not"
        " gradwatch failures) does not alert.",
    ),
)

RECORDS = (
    Record(
        HEALTH_RECORD,
        health_heuristic(),
        HEALTH_WHAT + " Needs gradwatch's default metrics grad_tensors_vanishing,"
        " grad_tensors_exploding and grad_tensors (thresholds: GRADWATCH_VANISHING_THRESHOLD,"
        " GRADWATCH_EXPLODING_THRESHOLD).",
        {"heuristic": "true"},
    ),
)

# Written above each recording rule's "- record:" line (see files.comment_rules).
RULE_COMMENTS = {r.name: r.comment for r in RECORDS}


def recording_rules() -> list[dict]:
    """Recording rules: derived series, never measurements (see RULE_COMMENTS)."""
    return [r.render() for r in RECORDS]


def alert_rules() -> dict:
    """The rules file: the alerting rules (group ``gradwatch``) and the recording rules (group
    ``gradwatch-recording``)."""
    return {
        "groups": [
            {"name": "gradwatch", "rules": [a.render() for a in ALERTS]},
            {"name": "gradwatch-recording", "rules": recording_rules()},
        ]
    }
