"""Grafana dashboards, Prometheus alert rules and provisioning files, generated from the catalog.

``gradwatch dashboards --out dashboards`` calls :func:`write_all`. Every metric name, unit and
formula text comes from :data:`gradwatch.catalog.CATALOG`: a panel's description quotes the
formula (HELP text) of each metric its queries use, and so does every alert's description.

Dashboards are data: :mod:`.panels` declares them as lists of panel records, :mod:`.rules` the
alerting and recording rules, :mod:`.spec` holds the records and the generator that renders
them, :mod:`.files` writes JSON and YAML (why not ``grafana-foundation-sdk``: docs/grafana.md).

Conventions (checked by the tests): the data source is a ``datasource`` template variable (no
``__inputs``, so file provisioning and UI import both work); ``job``, ``instance`` and ``rank``
variables filter every selector (:func:`sel`); counters appear only inside ``rate``/``increase``;
every panel has a title, a description and a unit.
"""

from .files import (
    dashboard_provisioning,
    datasource_provisioning,
    prometheus_config,
    render_all,
    to_json,
    to_yaml,
    write_all,
)
from .panels import DASHBOARDS, layers, overview, ranks
from .rules import (
    ALERTS_FILE,
    HEALTH_RECORD,
    RULE_COMMENTS,
    alert_rules,
    health_heuristic,
    recording_rules,
)
from .spec import EXTRA_METRICS, SCHEMA_VERSION, base_metric, formulas, metrics_in, sel

__all__ = [
    "ALERTS_FILE",
    "DASHBOARDS",
    "EXTRA_METRICS",
    "HEALTH_RECORD",
    "RULE_COMMENTS",
    "SCHEMA_VERSION",
    "alert_rules",
    "base_metric",
    "dashboard_provisioning",
    "datasource_provisioning",
    "formulas",
    "health_heuristic",
    "layers",
    "metrics_in",
    "overview",
    "prometheus_config",
    "ranks",
    "recording_rules",
    "render_all",
    "sel",
    "to_json",
    "to_yaml",
    "write_all",
]
