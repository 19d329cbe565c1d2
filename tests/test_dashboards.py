"""Dashboards, alert rules and provisioning files: fresh, schema-valid, linted, and proven against a
real Prometheus scraping a real training process."""

from __future__ import annotations

import collections
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from gradwatch import dashboards
from gradwatch.catalog import BY_PROM_NAME
from util import IN_CI, fetch, free_port, parse, require_tool

ROOT = Path(__file__).parents[1]
OUT = ROOT / "dashboards"
RULES = OUT / dashboards.ALERTS_FILE
RULE_TESTS = sorted((ROOT / "tests" / "rules").glob("*.yml"))
SCHEMA = Path(__file__).parent / "data" / "grafana-dashboard.jsonschema.json"
REGENERATE = "run `gradwatch dashboards --out dashboards`"
DS = {"type": "prometheus", "uid": "${datasource}"}
FILTERS = {"job": "$job", "instance": "$instance", "rank": "$rank"}


def load_dashboards() -> dict[str, dict]:
    return {name: json.loads((OUT / name).read_text()) for name in dashboards.DASHBOARDS}


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out += [p, *p.get("panels", [])]
    return [p for p in out if p["type"] != "row"]


def all_rules() -> list[dict]:
    """Every rule of the committed rules file: alerting and recording."""
    yaml = _yaml()
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alert_rules() -> list[dict]:
    return [r for r in all_rules() if "alert" in r]


def recording_rules() -> list[dict]:
    return [r for r in all_rules() if "record" in r]


def rule_name(rule: dict) -> str:
    return rule.get("alert") or rule["record"]


def _yaml():
    if IN_CI:
        import yaml
    else:
        yaml = pytest.importorskip("yaml", reason="pyyaml is not installed")
    return yaml


# ---------------------------------------------------------------------------------------------
# a small PromQL reader: every vector selector with its matchers, range and enclosing functions
# ---------------------------------------------------------------------------------------------

_STR = r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'
_TOKEN = re.compile(
    rf"""(?P<ws>\s+)
    |(?P<str>{_STR})
    |(?P<braces>\{{(?:{_STR}|[^{{}}"'`])*\}})
    |(?P<range>\[[^\]]*\])
    |(?P<num>(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)[a-zA-Z]*)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>(),=])""",
    re.X,
)
_MATCHER = re.compile(rf"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*({_STR})\s*,?")
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}


@dataclass
class Selector:
    name: str
    matchers: dict[str, tuple[str, str]]  # label -> (op, value)
    range: str | None
    functions: tuple[str, ...]  # enclosing function calls, innermost last

    @property
    def text(self) -> str:
        inner = ", ".join(f'{k}{op}"{v}"' for k, (op, v) in self.matchers.items())
        return f"{self.name}{{{inner}}}"


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m, f"cannot read PromQL at {expr[pos:]!r} in {expr!r}"
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def parse_matchers(braces: str) -> dict[str, tuple[str, str]]:
    body, out, pos = braces[1:-1], {}, 0
    while body[pos:].strip():
        m = _MATCHER.match(body, pos)
        assert m, f"cannot read matchers {braces!r}"
        out[m.group(1)] = (m.group(2), json.loads(m.group(3)) if m.group(3)[0] == '"' else "")
        pos = m.end()
    return out


def selectors(expr: str) -> list[Selector]:
    toks = tokenize(expr)
    stack: list[str | None] = []  # per open paren: function name, None (grouping), "#labels"
    pending: str | None = None  # aggregation waiting for its "(" after a by/without clause
    out: list[Selector] = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if "#labels" in stack:
            if text == "(":
                stack.append("#labels")
            elif text == ")":
                stack.pop()
        elif kind == "ident" and text in _LABEL_LISTS:
            if nxt[1] == "(":
                stack.append("#labels")
                i += 1
        elif kind == "ident" and nxt[1] == "(":
            stack.append(text)
            i += 1
        elif kind == "ident" and nxt[0] == "ident" and nxt[1] in ("by", "without"):
            pending = text
        elif kind == "ident" and text.lower() in _KEYWORDS:
            pass
        elif kind in ("ident", "braces"):
            name, matchers = (text, {}) if kind == "ident" else ("", parse_matchers(text))
            if kind == "ident" and nxt[0] == "braces":
                matchers = parse_matchers(nxt[1])
                i += 1
            if not name and "__name__" in matchers:
                name = matchers.pop("__name__")[1]
            rng = None
            if i + 1 < len(toks) and toks[i + 1][0] == "range":
                rng = toks[i + 1][1][1:-1]
                i += 1
            funcs = tuple(s for s in stack if s is not None)
            out.append(Selector(name, matchers, rng, funcs))
        elif text == "(":
            stack.append(pending)
            pending = None
        elif text == ")":
            stack.pop()
        i += 1
    assert not stack, f"unbalanced parentheses in {expr!r}"
    return out


def test_promql_reader() -> None:
    sels = selectors(
        'sum by (job, rank) (rate(a_total{job=~"$job", x="}"}[$__rate_interval])) / ignoring (g)'
        ' b or on (job) topk(20, max_over_time(c[5m] offset 1h)) unless {__name__="d"}'
    )
    assert [s.name for s in sels] == ["a_total", "b", "c", "d"]
    assert sels[0].matchers == {"job": ("=~", "$job"), "x": ("=", "}")}
    assert sels[0].range == "$__rate_interval" and sels[0].functions == ("sum", "rate")
    assert sels[2].functions == ("topk", "max_over_time") and sels[2].range == "5m"


def test_sel_is_the_one_selector_and_knows_only_catalog_names() -> None:
    assert dashboards.sel("grad_l2_norm") == (
        'grad_l2_norm{job=~"$job", instance=~"$instance", rank=~"$rank"}'
    )
    assert dashboards.sel("grad_group_rms", 'group="a"', filters=("job",)) == (
        'grad_group_rms{job=~"$job", group="a"}'
    )
    assert dashboards.sel("grad_l2_norm_per_step_bucket", filters=()) == (
        "grad_l2_norm_per_step_bucket"
    )
    assert dashboards.sel("up", 'job="x"', filters=()) == 'up{job="x"}'
    with pytest.raises(KeyError):
        dashboards.sel("grad_l2_norms")


# ---------------------------------------------------------------------------------------------
# (1) committed files are the generated ones
# ---------------------------------------------------------------------------------------------


def test_committed_files_are_fresh(tmp_path: Path) -> None:
    written = dashboards.write_all(tmp_path)
    fresh = {p.relative_to(tmp_path).as_posix(): p.read_text() for p in written}
    assert sorted(fresh) == sorted(dashboards.render_all())
    stale = [
        rel
        for rel, text in fresh.items()
        if not (OUT / rel).is_file() or (OUT / rel).read_text() != text
    ]
    assert not stale, f"dashboards/ is stale ({', '.join(stale)}): {REGENERATE}"
    generated_names = {(OUT / rel).resolve() for rel in fresh}
    extra = [
        p.relative_to(ROOT).as_posix()
        for p in OUT.rglob("*")
        if p.is_file()
        and p.suffix in (".json", ".yml", ".yaml")
        and p.resolve() not in generated_names
    ]
    assert not extra, f"files in dashboards/ that are no longer generated: {extra}"


def test_generation_is_deterministic() -> None:
    assert dashboards.render_all() == dashboards.render_all()
    for name, text in dashboards.render_all().items():
        assert text.endswith("\n") and not text.endswith("\n\n"), name
        assert not any(line != line.rstrip() for line in text.splitlines()), name


# ---------------------------------------------------------------------------------------------
# (2) the shared Grafana dashboard JSON schema
# ---------------------------------------------------------------------------------------------


def test_dashboards_validate_against_schema() -> None:
    if not SCHEMA.is_file():
        msg = f"Grafana dashboard schema not found at {SCHEMA} (see tests/data/README.md)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    import jsonschema

    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    for name, dash in load_dashboards().items():
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in validator.iter_errors(dash)
        ]
        assert not errors, f"{name} fails the schema:\n" + "\n".join(errors[:20])
        assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 39


# ---------------------------------------------------------------------------------------------
# (3) dashboard conventions
# ---------------------------------------------------------------------------------------------


def _variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def test_datasource_is_a_template_variable() -> None:
    for name, dash in load_dashboards().items():
        text = (OUT / name).read_text()
        assert "__inputs" not in dash and "${DS_" not in text, name
        ds = _variables(dash)["datasource"]
        assert ds["type"] == "datasource" and ds["query"] == "prometheus", name
        for p in panels(dash):
            assert p["datasource"] == DS, (name, p["title"])
            assert p["targets"], (name, p["title"])
            for t in p["targets"]:
                assert t["datasource"] == DS, (name, p["title"])
        for v in dash["templating"]["list"]:
            if v["type"] == "query":
                assert v["datasource"] == DS, (name, v["name"])


def test_job_instance_rank_variables() -> None:
    for name, dash in load_dashboards().items():
        variables = _variables(dash)
        order = list(variables)
        for var in FILTERS:
            v = variables[var]
            assert v["type"] == "query", (name, var)
            assert v["multi"] is True and v["includeAll"] is True, (name, var)
            assert v["allValue"] == ".+" and v["refresh"] == 2, (name, var)
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"])
            assert m and m.group(2) == var, (name, v["query"])
            # a variable's values are filtered by the variables before it
            (sel,) = selectors(m.group(1))
            earlier = [f for f in FILTERS if order.index(f) < order.index(var)]
            for f in earlier:
                assert sel.matchers.get(f) == ("=~", f"${f}"), (name, var, v["query"])
        assert order.index("datasource") < order.index("job"), name


def test_group_ratio_panel_and_variables() -> None:
    dash = load_dashboards()["gradwatch-layers.json"]
    variables = _variables(dash)
    for var, default in (("group_a", "seed"), ("group_b", "host")):
        v = variables[var]
        assert v["type"] == "query" and v["current"]["value"] == default
        assert re.fullmatch(r"label_values\(grad_group_rms\{.*\}, group\)", v["query"])
        (group_sel,) = selectors(v["query"][len("label_values(") : -len(", group)")])
        assert all(group_sel.matchers.get(k) == ("=~", f) for k, f in FILTERS.items()), v
    (ratio,) = [p for p in panels(dash) if p["title"].startswith("RMS ratio")]
    expr = re.sub(r"\s+", " ", ratio["targets"][0]["expr"])
    assert re.fullmatch(
        r'grad_group_rms\{[^}]*group="\$group_a"\} / ignoring \(group\) '
        r'grad_group_rms\{[^}]*group="\$group_b"\}',
        expr,
    )
    assert 'grad_group_rms{group="$group_a"} / ignoring(group)' in ratio["description"]


def test_required_panels_exist() -> None:
    d = load_dashboards()
    used = {
        name: " ".join(t["expr"] for p in panels(dash) for t in p["targets"])
        for name, dash in d.items()
    }
    for metric in (
        "grad_l2_norm",
        "grad_rms",
        "grad_abs_max",
        "grad_abs_mean",
        "grad_nonfinite_elements",
        "grad_zero_ratio",
        "grad_tensor_l2_norm_min",
        "grad_tensor_l2_norm_max",
        "grad_tensor_l2_norm_mean",
        "grad_tensors_vanishing",
        "grad_tensors_exploding",
        "grad_steps_total",
        "gradwatch_collect_seconds",
        "gradwatch_errors_total",
        "gradwatch_dropped_steps_total",
        "amp_skipped_steps_total",
        "grad_noise_scale",
    ):
        assert re.search(rf"\b{metric}\b", used["gradwatch-overview.json"]), metric
    assert "rate(grad_steps_total{" in used["gradwatch-overview.json"]
    (nonfinite,) = [
        p
        for p in panels(d["gradwatch-overview.json"])
        if p["title"] == "Non-finite gradient elements"
    ]
    assert nonfinite["type"] == "stat"
    steps = nonfinite["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[0] == {"color": "green", "value": None}
    assert [s["color"] for s in steps if s["value"] is not None and s["value"] > 0] == ["red"]
    layers = d["gradwatch-layers.json"]
    assert any(
        p["type"] == "heatmap" and "grad_param_l2_norm" in p["targets"][0]["expr"]
        for p in panels(layers)
    )
    assert "topk(20, grad_param_l2_norm{" in used["gradwatch-layers.json"]
    for metric in ("grad_group_l2_norm", "grad_group_rms"):
        assert metric in used["gradwatch-layers.json"]
    ranks = used["gradwatch-ranks.json"]
    assert "by (rank)" in ranks
    assert re.search(r"max\(grad_stats_step\{[^}]*\}\) - min\(grad_stats_step\{[^}]*\}\)", ranks)
    assert "sum by (rank, kind) (grad_nonfinite_elements{" in ranks


def test_panels_have_title_description_unit_and_formula() -> None:
    for name, dash in load_dashboards().items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), name
        for p in panels(dash):
            where = f"{name}: panel {p.get('title')!r}"
            assert p.get("title"), where
            assert p.get("description"), where
            assert p["fieldConfig"]["defaults"].get("unit"), where
            for t in p["targets"]:
                for s in selectors(t["expr"]):
                    formula = BY_PROM_NAME[dashboards.base_metric(s.name)].description()
                    assert formula in p["description"], f"{where}: no formula of {s.name}"


def test_every_selector_is_filtered_and_known() -> None:
    for name, dash in load_dashboards().items():
        for p in panels(dash):
            for t in p["targets"]:
                sels = selectors(t["expr"])
                assert sels, (name, t["expr"])
                for s in sels:
                    where = f"{name}: {p['title']!r}: {s.text}"
                    known = dashboards.base_metric(s.name)
                    assert known in BY_PROM_NAME or s.name in dashboards.EXTRA_METRICS, where
                    for label, var in FILTERS.items():
                        assert s.matchers.get(label) == ("=~", var), f"{where} lacks {label}"


def test_counters_only_inside_rate_or_increase() -> None:
    for name, dash in load_dashboards().items():
        for p in panels(dash):
            for t in p["targets"]:
                for s in selectors(t["expr"]):
                    # histogram buckets are counters too
                    if BY_PROM_NAME[dashboards.base_metric(s.name)].instrument == "gauge":
                        continue
                    where = f"{name}: {p['title']!r}: {t['expr']}"
                    assert s.functions and s.functions[-1] in ("rate", "increase"), where
                    assert s.range in ("$__rate_interval", "$__range"), where
                    if s.functions[-1] == "rate":
                        assert s.range == "$__rate_interval", where


def test_alert_rules_use_catalog_metrics_and_quote_formulas() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "GradwatchNonFiniteGradients",
        "GradwatchGradNormExploding",
        "GradwatchGradientsVanishing",
        "GradwatchTargetDown",
    } <= names
    for r in rules:
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        for s in selectors(r["expr"]):
            assert s.name in BY_PROM_NAME or s.name in dashboards.EXTRA_METRICS, (r["alert"], s)
            if s.name in BY_PROM_NAME:
                assert BY_PROM_NAME[s.name].description() in r["annotations"]["description"], (
                    r["alert"],
                    s.name,
                )
            if s.name == "up":
                assert s.matchers.get("job"), f"{r['alert']}: up without a job matcher"


def test_recording_rules_are_named_and_described_as_derived() -> None:
    records = recording_rules()
    assert [r["record"] for r in records] == [dashboards.HEALTH_RECORD]
    text = RULES.read_text()
    for r in records:
        # level:metric:operations, the recording-rule convention; never a catalog name
        assert re.fullmatch(r"[a-zA-Z_]\w*:[a-zA-Z_]\w*:[a-zA-Z_]\w*", r["record"]), r
        assert r["record"] not in BY_PROM_NAME
        assert "alert" not in r and "for" not in r and "annotations" not in r
        for s in selectors(r["expr"]):
            assert s.name in BY_PROM_NAME, (r["record"], s.name)
        # the comment above the rule states what it is
        lines = text.splitlines()
        (at,) = [
            i
            for i, line in enumerate(lines)
            if line.strip().startswith("- record:") and r["record"] in line
        ]
        comment = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            comment.insert(0, line.strip()[1:].strip())
        comment_text = " ".join(comment)
        assert "heuristic, not a measurement" in comment_text, comment_text
    (health,) = records
    assert health["expr"] == (
        "clamp(1 - 0.5 * grad_tensors_vanishing / grad_tensors"
        " - 0.8 * grad_tensors_exploding / grad_tensors, 0, 1)"
    )
    assert health["labels"] == {"heuristic": "true"}
    (panel,) = [
        p
        for p in panels(load_dashboards()["gradwatch-overview.json"])
        if "health" in p["title"].lower()
    ]
    assert "heuristic" in panel["title"].lower()
    assert "1 - 0.5 * (vanishing tensors / T) - 0.8 * (exploding" in panel["description"]
    (t,) = panel["targets"]
    assert [s.name for s in selectors(t["expr"])] == [
        "grad_tensors_vanishing",
        "grad_tensors",
        "grad_tensors_exploding",
        "grad_tensors",
    ]


# ---------------------------------------------------------------------------------------------
# (4) provisioning files and prometheus.yml
# ---------------------------------------------------------------------------------------------


def test_yaml_files_parse_and_are_structurally_right() -> None:
    yaml = _yaml()
    prom = yaml.safe_load((OUT / "prometheus.yml").read_text())
    assert prom == dashboards.prometheus_config()
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "gradwatch"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    for rule_file in prom["rule_files"]:
        assert (OUT / rule_file).is_file(), rule_file

    ds = yaml.safe_load((OUT / "provisioning" / "datasource.yml").read_text())
    assert ds == dashboards.datasource_provisioning()
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"].startswith("http") and source["name"] and source["uid"]
    scrape = prom["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape  # drives $__rate_interval

    prov = yaml.safe_load((OUT / "provisioning" / "dashboards.yml").read_text())
    assert prov == dashboards.dashboard_provisioning()
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")

    rules = yaml.safe_load(RULES.read_text())
    assert rules == dashboards.alert_rules()


def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    r = subprocess.run(
        [promtool, "check", "config", str(OUT / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# (5) promtool: the rules load, and their unit tests pass
# ---------------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    r = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


RULE_DESCRIPTION = "@rule description@"


def rendered_rule_tests(out_dir: Path) -> list[Path]:
    """The promtool test files with each "@rule description@" replaced by that alert's
    description in the generated rules file, and rule_files made absolute."""
    yaml = _yaml()
    described = {r["alert"]: r["annotations"]["description"] for r in alert_rules()}
    out = []
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        doc["rule_files"] = [str((path.parent / f).resolve()) for f in doc["rule_files"]]
        for test in doc.get("tests", []):
            for case in test.get("alert_rule_test", []):
                for alert in case.get("exp_alerts", []):
                    notes = alert.get("exp_annotations", {})
                    if notes.get("description") == RULE_DESCRIPTION:
                        notes["description"] = described[case["alertname"]]
        target = out_dir / path.name
        target.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10**6))
        out.append(target)
    return out


def test_promtool_rule_unit_tests(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    assert RULE_TESTS, "no promtool unit tests in tests/rules/"
    tested, tested_records = set(), set()
    for path in RULE_TESTS:
        text = path.read_text()
        tested |= set(re.findall(r"alertname: (\w+)", text))
        tested_records |= set(re.findall(r"expr: ['\"]?([a-zA-Z_:][a-zA-Z0-9_:]*)", text))
    untested = {r["alert"] for r in alert_rules()} - tested
    assert not untested, f"alerts without a promtool unit test: {sorted(untested)}"
    untested = {r["record"] for r in recording_rules()} - tested_records
    assert not untested, f"recording rules without a promtool unit test: {sorted(untested)}"
    r = subprocess.run(
        [promtool, "test", "rules", *map(str, rendered_rule_tests(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, "promtool test rules failed:\n" + r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# (6) the real thing: Prometheus scrapes `gradwatch demo`, every query returns data
# ---------------------------------------------------------------------------------------------

SUBSTITUTIONS = {
    "$__rate_interval": "5s",
    "$__range": "1m",
    "$job": "gradwatch",
    "$instance": ".+",
    "$rank": "0",
    "$group_a": "seed",
    "$group_b": "host",
}
NAN_AT = 40  # about 2.5 s into training, after Prometheus's first scrapes
DEMO = [sys.executable, "-m", "gradwatch.cli", "demo"]
DEMO_ARGS = ["--delay", "0.05", "--steps", "0", "--per-param", "--nan-at", str(NAN_AT)]
DEMO_ARGS += ["--clip", "1.0", "--amp"]  # exercises the clipping and loss-scale panels
# Series that only exist once something failed: a healthy run legitimately has none.
ONLY_AFTER_FAILURE = {"gradwatch_errors_total"}


def substitute(expr: str) -> str:
    for var in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(var, SUBSTITUTIONS[var])
    assert "$" not in expr, expr
    return expr


class Live:
    def __init__(self, prom_port: int, demo_port: int) -> None:
        self.prom_port, self.demo_port = prom_port, demo_port

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, **params: str) -> list[dict]:
        return self.api("query", query=expr, **params)["result"]


def _wait(what: str, predicate, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[0]} exited with {p.returncode} while waiting"
        try:
            if predicate():
                return
        except (OSError, AssertionError, KeyError, IndexError):
            pass
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT if proc.args[0] == sys.executable else signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    prometheus = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    prom_port, demo_port = free_port(), free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        dashboards.to_yaml(
            {
                "global": {
                    "scrape_interval": "1s",
                    "evaluation_interval": "1s",
                    "scrape_timeout": "1s",
                },
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "gradwatch",
                        "static_configs": [{"targets": [f"127.0.0.1:{demo_port}"]}],
                    }
                ],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH", "OTEL_"))}
    prom = demo = None
    prom_log, demo_log = tmp / "prometheus.log", tmp / "demo.log"
    try:
        with open(prom_log, "w") as log:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )
        with open(demo_log, "w") as log:
            demo = subprocess.Popen(
                [*DEMO, "--port", str(demo_port), *DEMO_ARGS],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
            )
        lv = Live(prom_port, demo_port)
        _wait("Prometheus to start", lambda: lv.api("status/buildinfo"), 20, [prom])
        _wait(
            "the demo's /metrics", lambda: "grad_stats_step" in fetch(demo_port), 30, [prom, demo]
        )
        # several scrapes with statistics (rates over 5s need two), and the NaN step behind us
        _wait(
            "8 scrapes with statistics",
            lambda: (
                float(
                    lv.query('count_over_time(grad_stats_step{job="gradwatch"}[1m])')[0]["value"][1]
                )
                >= 8
            ),
            30,
            [prom, demo],
        )
        _wait(
            f"the demo to pass step {NAN_AT}",
            lambda: float(lv.query('grad_stats_step{job="gradwatch"}')[0]["value"][1]) > NAN_AT + 5,
            20,
            [prom, demo],
        )
        yield lv
    except BaseException:
        for f in (prom_log, demo_log):
            if f.exists():
                print(f"---- {f.name} ----\n{f.read_text()[-3000:]}")
        raise
    finally:
        _stop(demo)
        _stop(prom)


def _panel_targets():
    for name, dash in sorted(load_dashboards().items()):
        for p in panels(dash):
            for t in p["targets"]:
                yield name, p["title"], t["expr"]


def test_live_every_panel_query_returns_data(live: Live) -> None:
    empty = []
    for name, title, expr in _panel_targets():
        result = live.query(substitute(expr))
        if not result:
            empty.append(f"{name}: {title!r}: {substitute(expr)}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_live_template_variables_list_the_process(live: Live) -> None:
    expected = {
        "job": {"gradwatch"},
        "instance": {f"127.0.0.1:{live.demo_port}"},
        "rank": {"0"},
        "group_a": {"seed", "host", "embed"},
    }
    expected["group_b"] = expected["group_a"]
    for name, dash in load_dashboards().items():
        for v in dash["templating"]["list"]:
            if v["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"])
            match = substitute(m.group(1).replace("$job", ".+"))
            values = live.api(f"label/{m.group(2)}/values", **{"match[]": match})
            assert expected[v["name"]] <= set(values), (name, v["name"], values)


def test_live_alert_rules_evaluate(live: Live) -> None:
    groups = live.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {rule_name(r) for r in all_rules()}
    _wait(
        "every rule to be evaluated",
        lambda: all(
            r["health"] == "ok" and not r["lastEvaluation"].startswith("0001")
            for g in live.api("rules")["groups"]
            for r in g["rules"]
        ),
        10,
    )
    missing = []
    for rule in all_rules():
        live.query(rule["expr"])  # evaluates without error
        for s in selectors(rule["expr"]):
            if s.name not in ONLY_AFTER_FAILURE and not live.query(s.text):
                missing.append(f"{rule_name(rule)}: {s.text}")
    assert not missing, "rule selectors without data:\n" + "\n".join(missing)
    # recording rules: their expression returns data, and Prometheus records it
    for rule in recording_rules():
        (computed,) = live.query(rule["expr"])
        assert 0 <= float(computed["value"][1]) <= 1, rule["record"]
        _wait(
            f"{rule['record']} to be recorded",
            lambda r=rule: live.query(f'{r["record"]}{{job="gradwatch"}}'),
            10,
        )
        (recorded,) = live.query(f'{rule["record"]}{{job="gradwatch"}}')
        assert recorded["metric"]["heuristic"] == "true"
        assert recorded["metric"]["optimizer"] == "0" and recorded["metric"]["rank"] == "0"
    # healthy apart from the injected NaN: those rules return nothing...
    for name in (
        "GradwatchGradientsVanishing",
        "GradwatchTargetDown",
        "GradwatchNoStatistics",
        "GradwatchStatisticsStale",
        "GradwatchTelemetryAbsent",
        "GradwatchGradNormExploding",
        "GradwatchInternalErrors",
    ):
        (rule,) = [r for r in alert_rules() if r["alert"] == name]
        assert live.query(rule["expr"]) == [], name
    # ...and the NaN step fires the non-finite alert.
    _wait(
        "GradwatchNonFiniteGradients to fire",
        lambda: live.query('ALERTS{alertname="GradwatchNonFiniteGradients", alertstate="firing"}'),
        10,
    )
    (alert,) = live.query('ALERTS{alertname="GradwatchNonFiniteGradients"}')
    assert alert["metric"]["rank"] == "0" and alert["metric"]["job"] == "gradwatch"


def test_live_values_agree_with_the_exporter(live: Live) -> None:
    # Constants: the same in Prometheus as in a direct scrape.
    direct = parse(fetch(live.demo_port))
    for name in ("grad_elements", "grad_tensors"):
        (served,) = direct[name].values()
        (stored,) = live.query(f'{name}{{job="gradwatch"}}')
        assert float(stored["value"][1]) == served, name
    params = {dict(k)["param"] for k in direct["grad_param_l2_norm"]}
    stored = {r["metric"]["param"] for r in live.query('grad_param_l2_norm{job="gradwatch"}')}
    assert stored == params and len(params) >= 8
    (info,) = live.query('gradwatch_info{job="gradwatch"}')
    (served_info,) = direct["gradwatch_info"]
    assert {
        k: v for k, v in info["metric"].items() if k not in ("job", "instance", "__name__")
    } == dict(served_info)

    # Per-step values: poll /metrics faster than the demo steps, then compare the samples
    # Prometheus stored with what the exporter served for the same grad_stats_step.
    served: dict[int, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: collections.defaultdict(collections.Counter)
    )
    names = ("grad_l2_norm", "grad_rms", "grad_abs_max")
    end = time.monotonic() + 10  # long enough for ~10 Prometheus scrapes
    while time.monotonic() < end:
        s = parse(fetch(live.demo_port))
        (step,) = s["grad_stats_step"].values()
        for name in names:
            for v in s.get(name, {}).values():
                served[int(step)][name][v] += 1
        time.sleep(0.03)  # under the endpoint's scrape budget (25/s), with Prometheus
    time.sleep(1.5)  # let Prometheus scrape the last of them
    window = "14s"
    steps = {}
    for r in live.query(f'grad_stats_step{{job="gradwatch"}}[{window}]'):
        steps = {ts: int(float(v)) for ts, v in r["values"]}
    agree, disagree = 0, []
    for name in names:
        (r,) = live.query(f'{name}{{job="gradwatch"}}[{window}]')
        for ts, v in r["values"]:
            step = steps.get(ts)
            if step is None or step not in served or not served[step][name]:
                continue
            expected = served[step][name].most_common(1)[0][0]
            if math.isclose(float(v), expected, rel_tol=1e-12, abs_tol=0):
                agree += 1
            else:
                disagree.append((name, step, float(v), dict(served[step][name])))
    # A scrape is not one atomic snapshot: the training thread may publish the next step
    # between two instruments' callbacks. Rare with 50 ms steps; allow one such sample.
    assert agree >= 6 and len(disagree) <= 1, (agree, disagree)
