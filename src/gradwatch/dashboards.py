"""Grafana dashboards, Prometheus alert rules and provisioning files, generated from the catalog.

``gradwatch dashboards --out dashboards`` calls :func:`write_all`. Every metric name, unit and
formula text comes from :data:`gradwatch.catalog.CATALOG`: a panel's description quotes the
formula (HELP text) of each metric its queries use, and so does every alert's description.

Why plain Python writing JSON instead of ``grafana-foundation-sdk``:

* no runtime dependency: the package needs nothing beyond what it already imports, and a plain
  ``pip install grafana-foundation-sdk`` picks its Grafana 10.1 build anyway;
* the dashboards target Grafana 11 (``schemaVersion`` :data:`SCHEMA_VERSION`, Grafana 11.0 and
  later load it as is);
* the output is validated in ``tests/test_dashboards.py`` against the SDK's draft-07 dashboard
  JSON schema (``tests/data/grafana-dashboard.jsonschema.json``), and every query runs against a
  real Prometheus scraping a real training process there.

Conventions (checked by the tests): the data source is a ``datasource`` template variable (no
``__inputs``, so file provisioning and UI import both work); ``job``, ``instance`` and ``rank``
variables filter every selector; counters appear only inside ``rate``/``increase``; every panel
has a title, a description and a unit. Output is deterministic: JSON with sorted keys and
two-space indentation, YAML in a fixed order, each file ending in one newline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .catalog import BY_PROM_NAME
from .config import DEFAULT_PORT

SCHEMA_VERSION = 39  # Grafana 11.0
TAG = "gradwatch"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance", rank=~"$rank"'
RATE = "$__rate_interval"
SCRAPE_PORT = DEFAULT_PORT  # the default /metrics port (rank r serves on it + LOCAL_RANK)
UP_JOBS = 'job=~"gradwatch.*"'  # how the alert rules find gradwatch's scrape targets in `up`

ALERTS_FILE = "gradwatch-alerts.yml"
EXTRA_METRICS = ("up",)  # names queries may use that are not in the catalog

_NAME_RE = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b")


# --------------------------------------------------------------------------------------------
# metrics and expressions
# --------------------------------------------------------------------------------------------


# Sample names of histogram families: name_bucket / name_sum / name_count -> name.
HISTOGRAM_SERIES = {
    f"{s.prom_name}_{suffix}": s.prom_name
    for s in BY_PROM_NAME.values()
    if s.instrument == "histogram"
    for suffix in ("bucket", "sum", "count")
}


def base_metric(name: str) -> str:
    """The catalog name a series name belongs to (histogram sample names map to the family)."""
    return HISTOGRAM_SERIES.get(name, name)


def sel(name: str, extra: str = "") -> str:
    """``name{job=~"$job", instance=~"$instance", rank=~"$rank"[, extra]}``; name must exist."""
    if base_metric(name) not in BY_PROM_NAME:
        raise KeyError(f"{name} is not in the catalog")
    return f"{name}{{{SEL}{', ' + extra if extra else ''}}}"


def metrics_in(expr: str) -> list[str]:
    """Catalog metric names an expression uses, in order of first appearance."""
    found = (base_metric(m) for m in _NAME_RE.findall(expr))
    seen = dict.fromkeys(m for m in found if m in BY_PROM_NAME)
    return list(seen)


def formulas(names: Iterable[str]) -> str:
    """``name: HELP text`` lines of catalog metrics (the text the exposition's HELP carries)."""
    return "\n".join(f"{n}: {BY_PROM_NAME[n].description()}" for n in names)


# --------------------------------------------------------------------------------------------
# Grafana building blocks
# --------------------------------------------------------------------------------------------

# Grafana unit ids: magnitudes of gradients span many decades, so scientific notation.
UNITS = {"{gradient}": "sci", "1": "percentunit", "s": "s"}


def unit_of(name: str) -> str:
    return UNITS.get(BY_PROM_NAME[base_metric(name)].unit, "short")


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict:
    t = {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if instant:
        t["format"] = "table"
    return t


def _targets(exprs: Sequence[tuple[str, str]], instant: bool = False) -> list[dict]:
    return [target(e, leg, chr(ord("A") + i), instant) for i, (e, leg) in enumerate(exprs)]


def _description(what: str, exprs: Sequence[tuple[str, str]]) -> str:
    names = []
    for e, _ in exprs:
        names += [n for n in metrics_in(e) if n not in names]
    # Grafana renders descriptions as Markdown: one list item per metric
    items = "\n".join(f"- `{n}`: {BY_PROM_NAME[n].description()}" for n in names)
    return f"{what}\n\n{items}"


def _thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def timeseries(
    title: str,
    what: str,
    exprs: Sequence[tuple[str, str]],
    unit: str,
    log: bool = False,
    stack: bool = False,
) -> dict:
    """A time series panel; gaps (NaN steps: magnitudes are absent) stay gaps."""
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "fillOpacity": 10 if stack else 0,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
    }
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries",
        "title": title,
        "description": _description(what, exprs),
        "datasource": DS,
        "targets": _targets(exprs),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "palette-classic"},
                "custom": custom,
                "thresholds": _thresholds((None, "green")),
            },
            "overrides": [],
        },
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    what: str,
    exprs: Sequence[tuple[str, str]],
    unit: str,
    thresholds: dict | None = None,
    calc: str = "lastNotNull",
) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": _description(what, exprs),
        "datasource": DS,
        "targets": _targets(exprs),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "thresholds": thresholds or _thresholds((None, "green")),
            },
            "overrides": [],
        },
        "options": {
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": [calc], "fields": "", "values": False},
            "textMode": "auto",
        },
    }


def table(
    title: str,
    what: str,
    exprs: Sequence[tuple[str, str]],
    unit: str,
    value_names: Sequence[str | None],
    hide: Sequence[str] = ("Time", "__name__", "local_rank", "world_size"),
) -> dict:
    """An instant-query table (top-k lists, info labels), sorted by value, descending.

    ``value_names`` names each query's value column; None hides it. Several queries are merged
    into one row per label set.
    """
    columns = ["Value"] if len(exprs) == 1 else [f"Value #{t['refId']}" for t in _targets(exprs)]
    named = list(zip(columns, value_names, strict=True))
    rename = {c: n for c, n in named if n}
    excluded = {h: True for h in hide} | {c: True for c, n in named if not n}
    merge = [{"id": "merge", "options": {}}] if len(exprs) > 1 else []
    return {
        "type": "table",
        "title": title,
        "description": _description(what, exprs),
        "datasource": DS,
        "targets": _targets(exprs, instant=True),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "thresholds": _thresholds((None, "green")),
            },
            "overrides": [],
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "sortBy": [{"desc": True, "displayName": next(iter(rename.values()))}],
        },
        "transformations": [
            *merge,
            {"id": "organize", "options": {"excludeByName": excluded, "renameByName": rename}},
        ],
    }


def heatmap(title: str, what: str, exprs: Sequence[tuple[str, str]], unit: str) -> dict:
    """Series as rows (one per parameter), colour = value on an exponential scale."""
    return {
        "type": "heatmap",
        "title": title,
        "description": _description(what, exprs),
        "datasource": DS,
        "targets": _targets(exprs),
        "maxDataPoints": 200,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False}},
            },
            "overrides": [],
        },
        "options": {
            "calculate": False,
            "cellGap": 1,
            "cellValues": {"unit": unit},
            "color": {
                "exponent": 0.3,
                "fill": "dark-orange",
                "mode": "scheme",
                "reverse": False,
                "scale": "exponential",
                "scheme": "Spectral",
                "steps": 64,
            },
            "filterValues": {"le": 1e-30},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "showValue": "never",
            "tooltip": {"mode": "single", "showColorScale": True, "yHistogram": False},
            "yAxis": {"axisPlacement": "left", "reverse": True},
        },
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(items: Sequence[tuple[dict, int, int]]) -> list[dict]:
    """Place (panel, width, height) left to right, wrapping at 24 columns; rows span the width."""
    out, x, y, line_h = [], 0, 0, 0
    for pid, (panel, w, h) in enumerate(items, start=1):
        if panel["type"] == "row":
            w, h = 24, 1
        if x + w > 24 or panel["type"] == "row":
            x, y, line_h = 0, y + line_h, 0
        out.append({**panel, "id": pid, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
        x, line_h = x + w, max(line_h, h)
        if panel["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return out


def datasource_variable() -> dict:
    return {
        "type": "datasource",
        "name": "datasource",
        "label": "Data source",
        "description": "The Prometheus that scrapes gradwatch's /metrics.",
        "query": "prometheus",
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def query_variable(
    name: str,
    label: str,
    metric_selector: str,
    label_name: str,
    description: str,
    multi: bool = True,
    default: str | None = None,
    sort: int = 1,
) -> dict:
    query = f"label_values({metric_selector}, {label_name})"
    v: dict[str, Any] = {
        "type": "query",
        "name": name,
        "label": label,
        "description": description,
        "datasource": DS,
        "query": query,
        "definition": query,
        "refresh": 2,
        "sort": sort,
        "regex": "",
        "hide": 0,
        "options": [],
        "multi": multi,
        "includeAll": multi,
    }
    if multi:
        v["allValue"] = ".+"
        v["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    elif default is not None:
        v["current"] = {"selected": True, "text": default, "value": default}
    return v


def common_variables() -> list[dict]:
    """datasource, job, instance and rank: each filters the next one's values."""
    return [
        datasource_variable(),
        query_variable(
            "job",
            "job",
            "gradwatch_info",
            "job",
            "Prometheus scrape job(s) of the training processes.",
        ),
        query_variable(
            "instance",
            "instance",
            'gradwatch_info{job=~"$job"}',
            "instance",
            "Scrape target(s): one per process (rank r serves on port"
            f" {SCRAPE_PORT} + LOCAL_RANK).",
        ),
        query_variable(
            "rank",
            "rank",
            'gradwatch_info{job=~"$job", instance=~"$instance"}',
            "rank",
            "Global rank(s) (RANK of torchrun; 0 for a single process).",
            sort=3,
        ),
    ]


def dashboard(
    uid: str, title: str, description: str, panels: list[dict], variables: list[dict]
) -> dict:
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [
            {
                "title": "gradwatch dashboards",
                "type": "dashboards",
                "tags": [TAG],
                "asDropdown": True,
                "icon": "external link",
                "tooltip": "",
                "targetBlank": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": variables},
        "panels": panels,
    }


# --------------------------------------------------------------------------------------------
# the dashboards
# --------------------------------------------------------------------------------------------

_WHO = "rank {{rank}} opt {{optimizer}} {{instance}}"
_NAN_GAP = (
    " Steps whose gradients hold NaN/Inf have no magnitude sample: they show as gaps"
    " (see the non-finite panels), never as the previous step's value."
)


# The health-score heuristic some training loops compute. Not a measurement: a recording rule
# (never an exported metric), named and described so that nobody takes it for one.
HEALTH_RECORD = "gradwatch:grad_health_heuristic:ratio"
HEALTH_WHAT = (
    "A heuristic, not a measurement: 1 - 0.5 * (vanishing tensors / T) - 0.8 * (exploding"
    " tensors / T), clipped to [0, 1], T = gradient tensors, per process and optimizer. The"
    " weights 0.5 and 0.8 are a convention some training loops use, not derived from anything;"
    " 1 only means no tensor crossed either threshold. Look at the counts themselves."
)


def health_heuristic(select=lambda name: name) -> str:
    """The heuristic's PromQL (series match one to one: same labels), each metric name passed
    through ``select`` (:func:`sel` for dashboards)."""
    v, e, t = map(select, ("grad_tensors_vanishing", "grad_tensors_exploding", "grad_tensors"))
    return f"clamp(1 - 0.5 * {v} / {t} - 0.8 * {e} / {t}, 0, 1)"


def _magnitude(name: str, title: str, what: str, legend: str = _WHO) -> dict:
    return timeseries(title, what + _NAN_GAP, [(sel(name), legend)], unit_of(name), log=True)


def overview() -> dict:
    spread = sel("grad_tensor_l2_norm_max_to_min_ratio")
    errors = (
        f"sum by (job, instance, rank, stage) (rate({sel('gradwatch_errors_total')}[{RATE}]))\n"
        f"or on (job, instance, rank)\n"
        f"sum by (job, instance, rank) (0 * {sel('gradwatch_info')})"
    )
    items = [
        (row("Gradient magnitude (all gradients of each optimizer)"), 24, 1),
        (
            _magnitude(
                "grad_l2_norm",
                "Total gradient L2 norm",
                "The total L2 norm of every gradient the optimizer applies, per step.",
            ),
            12,
            8,
        ),
        (
            _magnitude(
                "grad_rms",
                "Gradient RMS",
                "Root mean square gradient element, comparable across model sizes.",
            ),
            12,
            8,
        ),
        (
            _magnitude(
                "grad_abs_max",
                "Largest |gradient| element",
                "The largest absolute gradient element (L-infinity norm).",
            ),
            12,
            8,
        ),
        (
            _magnitude(
                "grad_abs_mean", "Mean |gradient| element", "The mean absolute gradient element."
            ),
            12,
            8,
        ),
        (row("Health"), 24, 1),
        (
            stat(
                "Non-finite gradient elements",
                "NaN and Inf gradient elements of the last"
                " collected step, summed over the selected processes; the stat shows the maximum"
                " over the time range and turns red above 0.",
                [(f"sum by (kind) ({sel('grad_nonfinite_elements')})", "{{kind}}")],
                "short",
                _thresholds((None, "green"), (1, "red")),
                calc="max",
            ),
            6,
            6,
        ),
        (
            stat(
                "Non-finite steps in range",
                "Collected steps whose gradients held NaN/Inf"
                " during the dashboard's time range (catches steps between two scrapes, which the"
                " element count above cannot).",
                [(f"sum(increase({sel('grad_nonfinite_steps_total')}[$__range]))", "steps")],
                "short",
                _thresholds((None, "green"), (1, "red")),
            ),
            6,
            6,
        ),
        (
            timeseries(
                "Zero gradient elements",
                "Fraction of gradient elements exactly 0 (dead"
                " units, unused embedding rows, masked parameters).",
                [(sel("grad_zero_ratio"), _WHO)],
                "percentunit",
            ),
            12,
            6,
        ),
        (
            timeseries(
                "Vanishing and exploding tensors",
                "Gradient tensors whose own L2 norm is"
                " below the vanishing / above the exploding threshold, out of T tensors.",
                [
                    (sel("grad_tensors_vanishing"), "vanishing " + _WHO),
                    (sel("grad_tensors_exploding"), "exploding " + _WHO),
                    (sel("grad_tensors"), "T (all tensors) " + _WHO),
                ],
                "short",
            ),
            12,
            8,
        ),
        (
            table(
                "gradwatch processes",
                "Version and reduction backend of each process, and the"
                " size of what it watches (N elements, T tensors).",
                [
                    (
                        f"sum by (job, instance, rank, version, backend) ({sel('gradwatch_info')})",
                        "",
                    ),
                    (f"sum by (job, instance, rank) ({sel('grad_elements')})", ""),
                    (f"sum by (job, instance, rank) ({sel('grad_tensors')})", ""),
                ],
                "short",
                [None, "N elements", "T tensors"],
            ),
            12,
            8,
        ),
        (row("Per-tensor L2 norms"), 24, 1),
        (
            timeseries(
                "Per-tensor L2 norm: min, mean, max",
                "Each gradient tensor's own L2 norm"
                " ||g_i||, reduced over the tensors: smallest, mean and largest." + _NAN_GAP,
                [
                    (sel("grad_tensor_l2_norm_min"), "min " + _WHO),
                    (sel("grad_tensor_l2_norm_mean"), "mean " + _WHO),
                    (sel("grad_tensor_l2_norm_max"), "max " + _WHO),
                ],
                "sci",
                log=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Per-tensor norm spread (max / min)",
                "Ratio of the largest to the smallest"
                " per-tensor L2 norm: how many times the most active tensor's gradient"
                " outweighs the least active one's. Absent (a gap) when a tensor's gradient is"
                " all zero." + _NAN_GAP,
                [(spread, _WHO)],
                "short",
                log=True,
            ),
            12,
            8,
        ),
        *training_health(),
        (row("Progress and gradwatch's own cost"), 24, 1),
        (
            timeseries(
                "Collected steps per second",
                "rate(grad_steps_total[$__rate_interval]):"
                " optimizer steps per second whose gradients were collected (all steps with"
                " GRADWATCH_EVERY=1).",
                [(f"rate({sel('grad_steps_total')}[{RATE}])", _WHO)],
                "suffix: steps/s",
            ),
            8,
            7,
        ),
        (
            timeseries(
                "gradwatch collection time",
                "Host time the training thread spent in gradwatch's last collection.",
                [(sel("gradwatch_collect_seconds"), _WHO)],
                "s",
            ),
            8,
            7,
        ),
        (
            timeseries(
                "gradwatch errors per second",
                "Failures inside gradwatch per second, by"
                " stage (0 for a process that never failed: gradwatch_errors_total only has"
                " series once a stage failed, so the query falls back to 0 * gradwatch_info).",
                [(errors, "{{stage}} rank {{rank}} {{instance}}")],
                "suffix: errors/s",
            ),
            8,
            7,
        ),
        (
            timeseries(
                "Dropped collections per second",
                "Collections dropped because the device"
                " had not finished the previous ones (the training thread never waits).",
                [(f"rate({sel('gradwatch_dropped_steps_total')}[{RATE}])", _WHO)],
                "suffix: steps/s",
            ),
            12,
            7,
        ),
        (
            timeseries(
                "AMP skipped steps per second",
                "Optimizer steps torch.amp.GradScaler"
                " skipped (scaled gradients held NaN/Inf); a few while the scale settles are"
                " normal, a steady rate is not.",
                [(f"rate({sel('amp_skipped_steps_total')}[{RATE}])", _WHO)],
                "suffix: steps/s",
            ),
            12,
            7,
        ),
    ]
    return dashboard(
        "gradwatch-overview",
        "gradwatch / Overview",
        "Gradient statistics of the whole model per optimizer step, health counts and"
        " gradwatch's own cost. Generated by `gradwatch dashboards` from the catalog.",
        layout(items),
        common_variables(),
    )


def training_health() -> list[tuple[dict, int, int]]:
    """Overview rows of the training-health signals: clipping, history, AMP, LR, updates."""
    rate_by = "sum by (job, instance, rank, optimizer, le)"
    bucket = f"rate({sel('grad_l2_norm_per_step_bucket')}[{RATE}])"
    return [
        (row("Clipping and every step between scrapes"), 24, 1),
        (
            timeseries(
                "Gradient norm before and after clipping",
                "The total norm clip_grad_norm_ returned (before clipping) and the total norm the"
                " optimizer applied (after clipping). Apart where clipping bites." + _NAN_GAP,
                [
                    (sel("grad_preclip_l2_norm"), "pre-clip " + _WHO),
                    (sel("grad_l2_norm"), "applied " + _WHO),
                ],
                "sci",
                log=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Clipping coefficient and clipped steps",
                "The coefficient the clip applied (1: not clipped), the fraction of collected"
                " steps it clipped, and the fraction whose pre-clip norm was NaN/Inf (the clip"
                " then zeroed or poisoned the gradients: no coefficient is shown for them),"
                " per $__rate_interval.",
                [
                    (sel("grad_clip_coefficient_ratio"), "coefficient " + _WHO),
                    (
                        f"rate({sel('grad_clipped_steps_total')}[{RATE}])\n/ on (job, instance,"
                        f" rank, optimizer)\nrate({sel('grad_steps_total')}[{RATE}])",
                        "clipped fraction " + _WHO,
                    ),
                    (
                        f"rate({sel('grad_preclip_nonfinite_steps_total')}[{RATE}])\n/ on (job,"
                        f" instance, rank, optimizer)\nrate({sel('grad_steps_total')}[{RATE}])",
                        "NaN/Inf pre-clip fraction " + _WHO,
                    ),
                ],
                "percentunit",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Largest step norm between scrapes",
                "The largest total gradient norm of any collected step since the previous scrape,"
                " next to the last step's: a one-step spike shows here even when the scrape"
                " lands on a calm step.",
                [
                    (sel("grad_l2_norm_max_since_last_scrape"), "max since scrape " + _WHO),
                    (sel("grad_l2_norm"), "last step " + _WHO),
                ],
                "sci",
                log=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Per-step gradient norm quantiles",
                "Quantiles of the total gradient norm over every collected step (from the"
                " grad_l2_norm_per_step histogram, buckets 1, 2, 5 per decade: a quantile is"
                " exact only to its bucket).",
                [
                    (
                        f"histogram_quantile({q}, {rate_by} ({bucket}))",
                        f"p{int(q * 100)} " + _WHO,
                    )
                    for q in (0.5, 0.99)
                ],
                "sci",
                log=True,
            ),
            12,
            8,
        ),
        (row("Loss scale, learning rate and updates"), 24, 1),
        (
            timeseries(
                "AMP loss scale",
                "The factor torch.amp.GradScaler multiplied the loss by; it halves at each"
                " skipped (overflowing) step and grows after a run of good ones.",
                [(sel("amp_loss_scale"), _WHO)],
                "short",
                log=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Learning rate",
                "Learning rate of each optimizer param group, as the optimizer applied it.",
                [(sel("optimizer_learning_rate"), "group {{param_group}} " + _WHO)],
                "sci",
                log=True,
            ),
            8,
            8,
        ),
        (
            table(
                "Parameters with non-finite gradients (first 5)",
                "The first parameters (optimizer order) whose gradients held NaN/Inf in a step"
                " during the time range.",
                [
                    (
                        "max by (job, instance, rank, optimizer, position, param)"
                        f" (max_over_time({sel('grad_nonfinite_param_info')}[$__range]))",
                        "",
                    )
                ],
                "short",
                ["seen"],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Update / parameter norm ratio",
                "||theta_t - theta_(t-1)|| / ||theta_t|| of the sampled steps, whole model and"
                " per group (every GRADWATCH_UPDATE_EVERY-th step).",
                [
                    (sel("update_to_param_ratio"), "all " + _WHO),
                    (sel("update_group_to_param_ratio"), "{{group}} " + _WHO),
                ],
                "sci",
                log=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Update and parameter norms",
                "L2 norms of the sampled update and of the parameters after it.",
                [
                    (sel("update_l2_norm"), "update " + _WHO),
                    (sel("param_l2_norm"), "params " + _WHO),
                ],
                "sci",
                log=True,
            ),
            12,
            8,
        ),
        (row("Gradient noise scale and health heuristic"), 24, 1),
        (
            timeseries(
                "Gradient noise scale B_simple (samples)",
                "tr(Sigma) / |G|^2 estimated from gradient accumulation (McCandlish et al. 2018,"
                " appendix A.1): the batch size around which larger batches stop paying off."
                " Needs GRADWATCH_MICRO_BATCH_SIZE and k >= 2 micro-batches per step; the"
                " micro-batch count k is shown for reference.",
                [
                    (sel("grad_noise_scale"), "B_simple " + _WHO),
                    (sel("grad_accumulation_micro_batches"), "k micro-batches " + _WHO),
                ],
                "short",
                log=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Gradient health score (heuristic, not a measurement)",
                HEALTH_WHAT + " Same expression as the recording rule " + HEALTH_RECORD + ".",
                [(health_heuristic(sel), _WHO)],
                "percentunit",
            ),
            12,
            8,
        ),
    ]


def layers() -> dict:
    group_a, group_b = (
        sel("grad_group_rms", 'group="$group_a"'),
        sel("grad_group_rms", 'group="$group_b"'),
    )
    ratio = f"{group_a}\n/ ignoring (group)\n{group_b}"
    gwho = "{{group}} rank {{rank}} {{instance}}"
    items = [
        (row("Per parameter (needs GRADWATCH_PER_PARAM=1)"), 24, 1),
        (
            heatmap(
                "Per-parameter gradient L2 norm",
                "One row per parameter tensor, colour = its"
                " gradient's L2 norm (exponential colour scale), maximum over the selected"
                " ranks. Only exported with GRADWATCH_PER_PARAM=1 (at most"
                " GRADWATCH_MAX_PARAMS parameters).",
                [(f"max by (param) ({sel('grad_param_l2_norm')})", "{{param}}")],
                "sci",
            ),
            24,
            12,
        ),
        (
            table(
                "Top 20 parameter gradient norms",
                "The 20 parameter tensors with the largest"
                " gradient L2 norm at the end of the time range.",
                [(f"topk(20, {sel('grad_param_l2_norm')})", "")],
                "sci",
                ["L2 norm"],
            ),
            8,
            10,
        ),
        (
            table(
                "Bottom 20 parameter gradient norms",
                "The 20 parameter tensors with the smallest"
                " gradient L2 norm at the end of the time range (candidates for vanishing"
                " gradients).",
                [(f"bottomk(20, {sel('grad_param_l2_norm')})", "")],
                "sci",
                ["L2 norm"],
            ),
            8,
            10,
        ),
        (
            table(
                "Parameters with non-finite gradients",
                "Per parameter: the most NaN/Inf"
                " gradient elements seen in one step during the time range (top 20; all 0 on a"
                " healthy run).",
                [
                    (
                        "topk(20, sum by (job, instance, rank, param) (max_over_time("
                        f"{sel('grad_param_nonfinite_elements')}[$__range])))",
                        "",
                    )
                ],
                "short",
                ["NaN/Inf elements"],
            ),
            8,
            10,
        ),
        (
            table(
                "Top 20 parameter zero ratios",
                "Parameters whose gradients hold the largest fraction of exact zeros.",
                [(f"topk(20, {sel('grad_param_zero_ratio')})", "")],
                "percentunit",
                ["zero fraction"],
            ),
            12,
            8,
        ),
        (
            table(
                "Top 20 parameter |gradient| maxima",
                "Parameters with the largest absolute gradient element.",
                [(f"topk(20, {sel('grad_param_abs_max')})", "")],
                "sci",
                ["max |g|"],
            ),
            12,
            8,
        ),
        (row("Per group (GRADWATCH_GROUPS or optimizer param groups)"), 24, 1),
        (
            _magnitude(
                "grad_group_l2_norm",
                "Group gradient L2 norm",
                "L2 norm of each group's gradients.",
                gwho,
            ),
            12,
            8,
        ),
        (
            _magnitude(
                "grad_group_rms",
                "Group gradient RMS",
                "Root mean square gradient element of each group.",
                gwho,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "RMS ratio $group_a / $group_b",
                "How many times larger the RMS gradient"
                " element of group $group_a is than that of group $group_b (pick the groups"
                ' with the variables above): grad_group_rms{group="$group_a"} / ignoring'
                '(group) grad_group_rms{group="$group_b"}, matched per process and'
                " optimizer. Both RMS values are sqrt(sum of g^2 / N_group) of their group.",
                [(ratio, "rank {{rank}} opt {{optimizer}} {{instance}}")],
                "sci",
                log=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Group |gradient| maximum",
                "Largest absolute gradient element per group." + _NAN_GAP,
                [(sel("grad_group_abs_max"), gwho)],
                "sci",
                log=True,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Group non-finite elements",
                "NaN and Inf gradient elements per group in the last collected step.",
                [
                    (
                        f"sum by (job, instance, rank, group) "
                        f"({sel('grad_group_nonfinite_elements')})",
                        gwho,
                    )
                ],
                "short",
            ),
            24,
            7,
        ),
    ]
    group_sel = 'grad_group_rms{job=~"$job", instance=~"$instance", rank=~"$rank"}'
    variables = common_variables() + [
        query_variable(
            "group_a",
            "group A",
            group_sel,
            "group",
            "Numerator group of the RMS ratio panel.",
            multi=False,
            default="seed",
        ),
        query_variable(
            "group_b",
            "group B",
            group_sel,
            "group",
            "Denominator group of the RMS ratio panel.",
            multi=False,
            default="host",
        ),
    ]
    return dashboard(
        "gradwatch-layers",
        "gradwatch / Layers and groups",
        "Per-parameter and per-group gradient statistics, and the RMS ratio of two groups."
        " Generated by `gradwatch dashboards` from the catalog.",
        layout(items),
        variables,
    )


def ranks() -> dict:
    skew = f"max({sel('grad_stats_step')}) - min({sel('grad_stats_step')})"
    rwho = "rank {{rank}}"

    def by_rank(name: str, title: str, what: str, width: int = 12) -> tuple[dict, int, int]:
        log = BY_PROM_NAME[name].unit == "{gradient}"
        return (
            timeseries(
                title,
                f"{what} (max over the rank's optimizers).",
                [(f"max by (rank) ({sel(name)})", rwho)],
                unit_of(name),
                log=log,
            ),
            width,
            8,
        )

    items = [
        (row("Key statistics by rank"), 24, 1),
        by_rank(
            "grad_l2_norm",
            "Total gradient L2 norm by rank",
            "Total L2 norm per rank; after DDP's all-reduce every rank should agree",
        ),
        by_rank("grad_rms", "Gradient RMS by rank", "RMS gradient element per rank"),
        by_rank("grad_abs_max", "Largest |gradient| by rank", "Largest absolute element per rank"),
        by_rank("grad_zero_ratio", "Zero gradient fraction by rank", "Fraction of exact zeros"),
        (row("Non-finite gradients by rank"), 24, 1),
        (
            timeseries(
                "Non-finite gradient elements by rank",
                "NaN and Inf gradient elements of each rank's last collected step.",
                [
                    (
                        f"sum by (rank, kind) ({sel('grad_nonfinite_elements')})",
                        "{{kind}} rank {{rank}}",
                    )
                ],
                "short",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Rank-local non-finite gradient elements",
                "NaN and Inf elements in each rank's own local gradients (its shards under FSDP2)"
                " before combination across ranks: the rank where a NaN appeared. Under FSDP2"
                " grad_nonfinite_elements is global (identical on every rank); this one is not.",
                [
                    (
                        f"sum by (rank, kind) ({sel('grad_rank_nonfinite_elements')})",
                        "{{kind}} rank {{rank}}",
                    )
                ],
                "short",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Non-finite steps by rank",
                "Collected steps with NaN/Inf gradients per"
                " rank, counted per $__rate_interval window.",
                [(f"sum by (rank) (increase({sel('grad_nonfinite_steps_total')}[{RATE}]))", rwho)],
                "short",
            ),
            8,
            8,
        ),
        (row("Progress and cost by rank"), 24, 1),
        (
            stat(
                "Step skew between ranks",
                f"{skew}: how many optimizer steps the most advanced"
                " selected rank is ahead of the least advanced one (0 for a single process;"
                " compare ranks of one run only).",
                [(skew, "skew")],
                "short",
                _thresholds((None, "green"), (2, "orange")),
            ),
            6,
            8,
        ),
        (
            timeseries(
                "Optimizer step by rank",
                "The step each rank's statistics belong to.",
                [(f"max by (rank) ({sel('grad_stats_step')})", rwho)],
                "short",
            ),
            18,
            8,
        ),
        (
            timeseries(
                "Collected steps per second by rank",
                "rate(grad_steps_total) per rank.",
                [(f"sum by (rank) (rate({sel('grad_steps_total')}[{RATE}]))", rwho)],
                "suffix: steps/s",
            ),
            8,
            8,
        ),
        by_rank(
            "gradwatch_collect_seconds",
            "gradwatch collection time by rank",
            "Host time of each rank's last collection",
            width=8,
        ),
        (
            timeseries(
                "Dropped collections by rank",
                "Collections dropped per second per rank.",
                [(f"sum by (rank) (rate({sel('gradwatch_dropped_steps_total')}[{RATE}]))", rwho)],
                "suffix: steps/s",
            ),
            8,
            8,
        ),
    ]
    return dashboard(
        "gradwatch-ranks",
        "gradwatch / Ranks",
        "Key gradient statistics, non-finite counts and progress per rank of a distributed run"
        " (works for a single process: rank 0). Generated by `gradwatch dashboards`.",
        layout(items),
        common_variables(),
    )


DASHBOARDS = {
    "gradwatch-overview.json": overview,
    "gradwatch-layers.json": layers,
    "gradwatch-ranks.json": ranks,
}


# --------------------------------------------------------------------------------------------
# alert rules
# --------------------------------------------------------------------------------------------

_WHERE = "{{ $labels.instance }} rank {{ $labels.rank }}"


def _alert(
    name: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    what: str,
    uses: Sequence[str] = (),
) -> dict:
    names = list(dict.fromkeys([*metrics_in(expr), *uses]))
    text = what + ("\n" + formulas(names) if names else "")
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": text},
    }


def alert_rules() -> dict:
    """The rules file ``gradwatch-alerts.yml``: the alerting rules (group ``gradwatch``) and
    the recording rules (group ``gradwatch-recording``)."""
    by = "sum by (job, instance, rank, optimizer)"
    rules = [
        _alert(
            "GradwatchNonFiniteGradients",
            f"{by} (grad_nonfinite_elements) > 0\n"
            f"or\n{by} (increase(grad_nonfinite_steps_total[5m])) > 0\n"
            f"or\n{by} (grad_nonfinite_steps_total > 0 unless grad_nonfinite_steps_total"
            " offset 5m)",
            "0m",
            "critical",
            f"NaN/Inf gradients on {_WHERE}",
            "Gradients held NaN or Inf elements in the last 5 minutes (the last step's count,"
            " the step counter's increase, or a process younger than 5 minutes whose counter"
            " started above 0). Magnitude statistics of those steps are absent. Steps that"
            " torch.amp.GradScaler skipped are not counted (see amp_skipped_steps_total).",
        ),
        _alert(
            "GradwatchPreclipNormNonFinite",
            f"{by} (increase(grad_preclip_nonfinite_steps_total[5m])) > 0\n"
            f"or\n{by} (grad_preclip_nonfinite_steps_total > 0 unless"
            " grad_preclip_nonfinite_steps_total offset 5m)",
            "0m",
            "critical",
            f"The pre-clip gradient norm was NaN/Inf on {_WHERE}",
            "In the last 5 minutes a collected step's pre-clip norm was NaN or Inf, so the clip"
            " scaled its gradients by 0 or NaN: the post-clip statistics of that step (often a"
            " calm-looking 0) describe the clip's output, not the gradients.",
        ),
        _alert(
            "GradwatchGradNormExploding",
            "grad_l2_norm > 10 * quantile_over_time(0.5, grad_l2_norm[1h] offset 5m)\n"
            "and\ncount_over_time(grad_l2_norm[1h] offset 5m) >= 30",
            "2m",
            "warning",
            f"Gradient norm {{{{ $value | humanize }}}} is over 10x its usual value on {_WHERE}",
            "The total gradient L2 norm stayed above 10 times its median of the hour before"
            " the last 5 minutes. The median needs at least 30 samples of history (a run's"
            " first minutes, with a few large early-training norms, define no normal), and"
            " leaving out the last 5 minutes keeps a rising norm from raising its own baseline."
            " If the loop clips gradients before optimizer.step(), this is the clipped norm.",
        ),
        _alert(
            "GradwatchGradientsVanishing",
            "grad_tensors_vanishing / grad_tensors > 0.5",
            "15m",
            "warning",
            f"{{{{ $value | humanizePercentage }}}} of gradient tensors vanish on {_WHERE}",
            "More than half of the gradient tensors had an L2 norm below the vanishing"
            " threshold for 15 minutes.",
        ),
        _alert(
            "GradwatchTargetDown",
            f"up{{{UP_JOBS}}} == 0",
            "2m",
            "warning",
            "gradwatch /metrics of {{ $labels.instance }} cannot be scraped",
            "Prometheus could not scrape the target for 2 minutes: the training process ended"
            " or hangs, or /metrics is not reachable (GRADWATCH_HOST/PORT). A finished run's"
            " static target fires this too. up is Prometheus's own scrape-health series.",
        ),
        _alert(
            "GradwatchNoStatistics",
            f"up{{{UP_JOBS}}} == 1\nunless on (job, instance)\ngrad_stats_step",
            "10m",
            "warning",
            "gradwatch on {{ $labels.instance }} serves no gradient statistics",
            "The process answers /metrics but has published no gradient statistics for 10"
            " minutes: no optimizer step was collected (still loading, stuck before its first"
            " step, or collection fails: see gradwatch_errors_total).",
            uses=("gradwatch_errors_total",),
        ),
        _alert(
            "GradwatchStatisticsStale",
            f"changes(grad_stats_step[10m]) == 0\nand on (job, instance)\nup{{{UP_JOBS}}} == 1",
            "5m",
            "warning",
            f"Training step has not advanced for 15 minutes on {_WHERE}",
            "grad_stats_step did not change for 15 minutes while the process still answers"
            " /metrics: training hangs (collective, data loader) or a step takes longer than"
            " that (raise the window for such runs, or for large GRADWATCH_EVERY).",
        ),
        _alert(
            "GradwatchTelemetryAbsent",
            f"absent(grad_stats_step{{{UP_JOBS}}})",
            "15m",
            "info",
            "No gradwatch statistics in Prometheus",
            "No gradwatch process has published gradient statistics for 15 minutes (none runs,"
            " or none is scraped: check the job name and targets). Drop this rule where"
            " training runs come and go.",
        ),
        _alert(
            "GradwatchInternalErrors",
            'increase(gradwatch_errors_total{stage!="http"}[10m]) > 0\n'
            'or\n(gradwatch_errors_total{stage!="http"} > 0'
            " unless gradwatch_errors_total offset 10m)",
            "0m",
            "warning",
            "gradwatch failed in stage {{ $labels.stage }} on " + _WHERE,
            "gradwatch logged failures in the last 10 minutes (training went on; statistics of"
            " that stage may be missing). The series of a stage appears with its first"
            " failure, hence the second term. Stage http (misbehaving /metrics clients, not"
            " gradwatch failures) does not alert.",
        ),
    ]
    return {
        "groups": [
            {"name": "gradwatch", "rules": rules},
            {"name": "gradwatch-recording", "rules": recording_rules()},
        ]
    }


def recording_rules() -> list[dict]:
    """Recording rules: derived series, never measurements (see RULE_COMMENTS)."""
    return [
        {
            "record": HEALTH_RECORD,
            "expr": health_heuristic(),
            "labels": {"heuristic": "true"},
        }
    ]


# Prometheus rules have no description field: these comments go above each recording rule.
RULE_COMMENTS = {
    HEALTH_RECORD: HEALTH_WHAT
    + " Needs gradwatch's default metrics grad_tensors_vanishing, grad_tensors_exploding and"
    " grad_tensors (thresholds: GRADWATCH_VANISHING_THRESHOLD, GRADWATCH_EXPLODING_THRESHOLD).",
}


def _comment_rules(text: str, width: int = 96) -> str:
    """Insert RULE_COMMENTS as YAML comments above their ``- record:`` lines."""
    import textwrap

    out = []
    for line in text.split("\n"):
        m = re.fullmatch(r'(\s*)- record: "?([^"]+)"?', line)
        if m and m.group(2) in RULE_COMMENTS:
            pad = m.group(1)
            out += [f"{pad}# {c}" for c in textwrap.wrap(RULE_COMMENTS[m.group(2)], width)]
        out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Prometheus and Grafana configuration
# --------------------------------------------------------------------------------------------


def prometheus_config() -> dict:
    """An example prometheus.yml: scrape one process on the default port, load the alert rules."""
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [ALERTS_FILE],
        "scrape_configs": [
            {
                "job_name": "gradwatch",
                "static_configs": [{"targets": [f"127.0.0.1:{SCRAPE_PORT}"]}],
            }
        ],
    }


def datasource_provisioning() -> dict:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "type": "prometheus",
                "uid": "prometheus",
                "access": "proxy",
                "url": "http://127.0.0.1:9090",
                "isDefault": True,
                "editable": True,
                # the scrape interval: Grafana derives $__rate_interval from it
                "jsonData": {"timeInterval": "5s", "httpMethod": "POST"},
            }
        ],
    }


def dashboard_provisioning() -> dict:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "gradwatch",
                "orgId": 1,
                "folder": "gradwatch",
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": True,
                "updateIntervalSeconds": 30,
                "options": {
                    "path": "/var/lib/grafana/dashboards/gradwatch",
                    "foldersFromFilesStructure": False,
                },
            }
        ],
    }


# --------------------------------------------------------------------------------------------
# serialisation
# --------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    s = str(v)
    if _PLAIN.fullmatch(s) and s.lower() not in _YAML_WORDS:
        return s
    return json.dumps(s, ensure_ascii=False)  # JSON strings are valid double-quoted YAML


def _yaml_lines(v: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(v, dict):
        for k, x in v.items():
            key = _scalar(k)
            if isinstance(x, dict | list) and x:
                out.append(f"{pad}{key}:")
                out += _yaml_lines(x, indent + 2)
            elif isinstance(x, str) and "\n" in x:
                out.append(f"{pad}{key}: |-")
                out += [f"{pad}  {line}" if line else "" for line in x.split("\n")]
            else:
                out.append(f"{pad}{key}: {_scalar(x) if x or x in (0, False) else _empty(x)}")
    elif isinstance(v, list):
        for x in v:
            if isinstance(x, dict | list) and x:
                inner = _yaml_lines(x, indent + 2)
                out.append(f"{pad}- {inner[0].lstrip()}")
                out += inner[1:]
            else:
                out.append(f"{pad}- {_scalar(x)}")
    else:
        out.append(pad + _scalar(v))
    return out


def _empty(x: Any) -> str:
    if isinstance(x, dict):
        return "{}"
    if isinstance(x, list):
        return "[]"
    return _scalar(x)


def to_yaml(data: Any, header: str = "") -> str:
    """Block-style YAML of plain data (dicts keep their order); multi-line strings as ``|-``."""
    head = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return head + "\n".join(_yaml_lines(data, 0)) + "\n"


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


_GENERATED = "Generated by `gradwatch dashboards --out dashboards` from gradwatch's catalog;"
_NO_EDIT = "do not edit by hand."


def render_all() -> dict[str, str]:
    """{relative path: file text} of everything :func:`write_all` writes."""
    files = {name: to_json(build()) for name, build in DASHBOARDS.items()}
    files[ALERTS_FILE] = _comment_rules(
        to_yaml(
            alert_rules(),
            f"Prometheus alerting and recording rules for gradwatch. {_GENERATED}\n{_NO_EDIT}\n"
            "Check: promtool check rules gradwatch-alerts.yml",
        )
    )
    files["prometheus.yml"] = to_yaml(
        prometheus_config(),
        f"Example Prometheus configuration for gradwatch. {_GENERATED}\n{_NO_EDIT}\n"
        "Run: prometheus --config.file=dashboards/prometheus.yml"
        " --web.listen-address=127.0.0.1:9090\n"
        f"Under torchrun rank r serves on {SCRAPE_PORT} + LOCAL_RANK: add one target per local"
        " rank\n"
        "(127.0.0.1:9465, ...) and one per node.",
    )
    files["provisioning/datasource.yml"] = to_yaml(
        datasource_provisioning(),
        f"Grafana data source provisioning. {_GENERATED}\n{_NO_EDIT}\n"
        "Copy to /etc/grafana/provisioning/datasources/ and set url to your Prometheus.\n"
        "timeInterval is the scrape interval; Grafana derives $__rate_interval from it.",
    )
    files["provisioning/dashboards.yml"] = to_yaml(
        dashboard_provisioning(),
        f"Grafana dashboard provisioning. {_GENERATED}\n{_NO_EDIT}\n"
        "Copy to /etc/grafana/provisioning/dashboards/ and the dashboards/*.json files to\n"
        "options.path.",
    )
    return files


def write_all(out_dir: str | Path) -> list[Path]:
    """Write the dashboards, alert rules, example prometheus.yml and provisioning files."""
    out = Path(out_dir)
    paths = []
    for rel, text in render_all().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
