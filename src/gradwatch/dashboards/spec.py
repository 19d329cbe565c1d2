"""Dashboard records (panels, rows, variables) and the generator that renders them as Grafana JSON.

A panel is declared by what it shows (kind, title, text, queries, unit, size); everything a
Grafana panel needs beyond that (data source, legend, colours, target ids, grid position, the
formula list in its description) is filled in here, the same way for every panel of a kind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..catalog import BY_PROM_NAME

SCHEMA_VERSION = 39  # Grafana 11.0
TAG = "gradwatch"
DS = {"type": "prometheus", "uid": "${datasource}"}
FILTERS = ("job", "instance", "rank")  # the template variables every panel selector matches
RATE = "$__rate_interval"
EXTRA_METRICS = ("up",)  # names queries may use that are not in the catalog

_NAME_RE = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b")

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


def sel(name: str, *matchers: str, filters: Sequence[str] = FILTERS) -> str:
    """The one way to write a selector: ``name{job=~"$job", ..., matchers}`` with a regex
    matcher per template variable in ``filters`` (none: the bare name). The name must be a
    catalog metric (or one of :data:`EXTRA_METRICS`)."""
    if base_metric(name) not in BY_PROM_NAME and name not in EXTRA_METRICS:
        raise KeyError(f"{name} is not in the catalog")
    parts = [*(f'{f}=~"${f}"' for f in filters), *matchers]
    return f"{name}{{{', '.join(parts)}}}" if parts else name


def metrics_in(expr: str) -> list[str]:
    """Catalog metric names an expression uses, in order of first appearance."""
    found = (base_metric(m) for m in _NAME_RE.findall(expr))
    return list(dict.fromkeys(m for m in found if m in BY_PROM_NAME))


def formulas(names: Iterable[str]) -> str:
    """``name: HELP text`` lines of catalog metrics (the text the exposition's HELP carries)."""
    return "\n".join(f"{n}: {BY_PROM_NAME[n].description()}" for n in names)


# Grafana unit ids: magnitudes of gradients span many decades, so scientific notation.
UNITS = {"{gradient}": "sci", "1": "percentunit", "s": "s"}


def unit_of(name: str) -> str:
    return UNITS.get(BY_PROM_NAME[base_metric(name)].unit, "short")


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

Steps = tuple[tuple[float | None, str], ...]  # threshold steps: (from value, colour)
GREEN: Steps = ((None, "green"),)


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""  # "" lets Grafana name the series (__auto)


@dataclass(frozen=True)
class Panel:
    """A panel: most are 12 x 8 time series, so those are the defaults."""

    title: str
    what: str  # the description's first paragraph; the formulas of the metrics used follow
    queries: Sequence[Query]
    unit: str  # a Grafana unit id
    size: tuple[int, int] = (12, 8)  # (width of 24 columns, height)
    kind: Literal["timeseries", "stat", "table", "heatmap"] = "timeseries"
    log: bool | None = None  # timeseries: log10 y axis; None: for "sci" (spans decades)
    thresholds: Steps = GREEN  # stat: background colour steps
    calc: str = "lastNotNull"  # stat: reduction over the time range
    columns: Sequence[str | None] = ()  # table: each query's value column name (None hides it)


@dataclass(frozen=True)
class Row:
    title: str


@dataclass(frozen=True)
class Variable:
    """A query variable offering the values of the label ``values_of`` on the series
    ``selector`` matches."""

    name: str
    selector: str
    values_of: str
    description: str
    default: str | None = None  # a single-valued variable's default; None: multi-valued, All
    sort: int = 1  # Grafana's sort mode (1 alphabetical, 3 numerical)
    title: str = ""  # the label shown; "" shows the name


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: Sequence[Panel | Row]
    variables: Sequence[Variable]  # after the data source variable


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _thresholds(steps: Steps) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def _target(q: Query, ref: str, instant: bool) -> dict:
    t = {
        "datasource": DS,
        "editorMode": "code",
        "expr": q.expr,
        "legendFormat": q.legend or "__auto",
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    return t | {"format": "table"} if instant else t


def _description(what: str, queries: Sequence[Query]) -> str:
    names = dict.fromkeys(n for q in queries for n in metrics_in(q.expr))
    # Grafana renders descriptions as Markdown: one list item per metric
    items = "\n".join(f"- `{n}`: {BY_PROM_NAME[n].description()}" for n in names)
    return f"{what}\n\n{items}"


def _field_config(unit: str, **defaults: Any) -> dict:
    return {"defaults": {"unit": unit, **defaults}, "overrides": []}


def _timeseries(p: Panel) -> dict:
    """Gaps (NaN steps: magnitudes are absent) stay gaps."""
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "fillOpacity": 0,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
    }
    if p.log or (p.log is None and p.unit == "sci"):
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    legend = {"displayMode": "table", "placement": "bottom", "showLegend": True}
    return {
        "fieldConfig": _field_config(
            p.unit, color={"mode": "palette-classic"}, custom=custom, thresholds=_thresholds(GREEN)
        ),
        "options": {
            "legend": legend | {"calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def _stat(p: Panel) -> dict:
    return {
        "fieldConfig": _field_config(
            p.unit, color={"mode": "thresholds"}, thresholds=_thresholds(p.thresholds)
        ),
        "options": {
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": [p.calc], "fields": "", "values": False},
            "textMode": "auto",
        },
    }


TABLE_HIDDEN = ("Time", "__name__", "local_rank", "world_size")


def _table(p: Panel) -> dict:
    """Instant queries (top-k lists, info labels), sorted by the first named value, descending;
    several queries are merged into one row per label set."""
    several = len(p.queries) > 1
    values = [f"Value #{chr(65 + i)}" for i in range(len(p.queries))] if several else ["Value"]
    named = list(zip(values, p.columns, strict=True))
    rename = {v: n for v, n in named if n}
    excluded = dict.fromkeys(TABLE_HIDDEN, True) | {v: True for v, n in named if not n}
    merge = [{"id": "merge", "options": {}}] if several else []
    return {
        "fieldConfig": _field_config(
            p.unit, color={"mode": "thresholds"}, thresholds=_thresholds(GREEN)
        ),
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


def _heatmap(p: Panel) -> dict:
    """Series as rows (one per parameter), colour = value on an exponential scale."""
    scale = {"exponent": 0.3, "fill": "dark-orange", "mode": "scheme", "reverse": False}
    return {
        "maxDataPoints": 200,
        "fieldConfig": _field_config(
            p.unit, custom={"hideFrom": {"legend": False, "tooltip": False, "viz": False}}
        ),
        "options": {
            "calculate": False,
            "cellGap": 1,
            "cellValues": {"unit": p.unit},
            "color": scale | {"scale": "exponential", "scheme": "Spectral", "steps": 64},
            "filterValues": {"le": 1e-30},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "showValue": "never",
            "tooltip": {"mode": "single", "showColorScale": True, "yHistogram": False},
            "yAxis": {"axisPlacement": "left", "reverse": True},
        },
    }


_KINDS = {"timeseries": _timeseries, "stat": _stat, "table": _table, "heatmap": _heatmap}


def render_panel(p: Panel | Row) -> dict:
    if isinstance(p, Row):
        return {"type": "row", "title": p.title, "collapsed": False, "panels": []}
    instant = p.kind == "table"
    return {
        "type": p.kind,
        "title": p.title,
        "description": _description(p.what, p.queries),
        "datasource": DS,
        "targets": [_target(q, chr(65 + i), instant) for i, q in enumerate(p.queries)],
        **_KINDS[p.kind](p),
    }


def layout(items: Sequence[Panel | Row]) -> list[dict]:
    """Place panels left to right, wrapping at 24 columns; rows span the width."""
    out: list[dict] = []
    x = y = line_h = 0
    for pid, item in enumerate(items, start=1):
        is_row = isinstance(item, Row)
        w, h = (24, 1) if is_row else item.size
        if x + w > 24 or is_row:
            x, y, line_h = 0, y + line_h, 0
        out.append({**render_panel(item), "id": pid, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
        x, line_h = x + w, max(line_h, h)
        if is_row:
            x, y, line_h = 0, y + h, 0
    return out


DATASOURCE_VARIABLE = {
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


def render_variable(v: Variable) -> dict:
    query = f"label_values({v.selector}, {v.values_of})"
    multi = v.default is None
    out: dict[str, Any] = {
        "type": "query",
        "name": v.name,
        "label": v.title or v.name,
        "description": v.description,
        "datasource": DS,
        "query": query,
        "definition": query,
        "refresh": 2,  # on time range change: the label values of the range shown
        "sort": v.sort,
        "regex": "",
        "hide": 0,
        "options": [],
        "multi": multi,
        "includeAll": multi,
    }
    if multi:
        out["allValue"] = ".+"
        out["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    else:
        out["current"] = {"selected": True, "text": v.default, "value": v.default}
    return out


def render_dashboard(d: Dashboard) -> dict:
    link = {
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
    return {
        "id": None,
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
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
        "links": [link],
        "templating": {"list": [DATASOURCE_VARIABLE, *map(render_variable, d.variables)]},
        "panels": layout(d.panels),
    }
