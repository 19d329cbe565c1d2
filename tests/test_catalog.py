"""The catalog is the single source of truth: names, units, README and exposition agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import gradwatch
from gradwatch import catalog
from gradwatch.docs import render
from util import fetch, help_texts, parse

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = """grad_l2_norm grad_rms grad_abs_mean grad_abs_max grad_l2_norm_divided_by_tensors
grad_tensor_l2_norm_min grad_tensor_l2_norm_max grad_tensor_l2_norm_mean grad_zero_ratio
grad_nonfinite_elements grad_tensors_vanishing grad_tensors_exploding grad_elements grad_tensors
grad_stats_step grad_steps_total grad_nonfinite_steps_total grad_group_l2_norm grad_group_rms
grad_group_abs_max grad_group_nonfinite_elements grad_param_l2_norm grad_param_abs_max
grad_param_zero_ratio grad_param_nonfinite_elements gradwatch_collect_seconds
gradwatch_errors_total gradwatch_info grad_rank_nonfinite_elements""".split()


def test_required_names_present_and_unique():
    names = [s.prom_name for s in catalog.CATALOG]
    assert len(names) == len(set(names))
    assert set(REQUIRED) <= set(names)
    assert len({s.otel_name for s in catalog.CATALOG}) == len(names)


def test_units_follow_the_rules():
    for s in catalog.CATALOG:
        assert s.unit, s.prom_name
        # unit "1" gets "_ratio" appended by the OTLP translation: only on names ending in _ratio
        assert (s.unit == "1") == s.prom_name.endswith("_ratio"), s.prom_name
        assert s.unit in ("1", "s") or re.fullmatch(r"\{[a-z]+\}", s.unit), s.unit
        assert s.prom_name.endswith("_total") == (s.instrument == "counter"), s.prom_name
        assert s.instrument in ("gauge", "counter", "histogram"), s.prom_name
        assert not s.prom_name.endswith(("_count", "_sum", "_bucket")), s.prom_name
        assert s.formula.strip() and "\n" not in s.formula
        assert (s.compute is not None) == (
            s.scope in (catalog.GLOBAL, catalog.GROUP, catalog.PARAM, catalog.RANK)
            and s.instrument == "gauge"
            and s.prom_name != "grad_stats_step"
        )


def test_readme_tables_are_generated():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render(text) == text, "README.md is stale: run `gradwatch readme README.md`"
    for s in catalog.CATALOG:
        assert f"`{s.prom_name}`" in text


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"&& (python3 -m pytest[^\n]*)", readme).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-1].strip() == command
    assert "gradwatch demo" in readme.split("```")[1]


def test_exposition_names_help_and_units_come_from_the_catalog():
    """The exporter derives each Prometheus name from otel_name + unit: it must equal prom_name."""
    model, broken = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = torch.nn.Embedding(3, 2, sparse=True)  # a gradient no kernel reads: counted
    # NaN grads: names them
    opt_broken = torch.optim.SGD([*broken.parameters(), *sparse.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with gradwatch.watch(
        [model, broken, sparse],
        [opt, opt_broken],
        port=0,
        per_param=True,
        backend="torch",
        micro_batch_size=1,
        update_every=1,
    ) as h:
        for _ in range(2):  # two micro-batches per step: grad_noise_* (from the second step)
            for _ in range(2):
                scaler.scale(model(torch.ones(1, 3)).sum() / 2).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        broken(torch.ones(1, 2)).sum().backward()
        broken.weight.grad[0, 0] = float("nan")
        sparse(torch.tensor([0])).sum().backward()
        opt_broken.step()
        h.session.errors.record("probe", RuntimeError("test"))  # makes errors_total appear
        text = fetch(h.port)
    helps = help_texts(text)
    samples = parse(text)
    for s in catalog.CATALOG:
        family = s.prom_name.removesuffix("_total") if s.instrument == "counter" else s.prom_name
        assert family in helps, f"{s.prom_name} missing from the exposition"
        assert helps[family] == s.description(), s.prom_name
        sample = s.prom_name + ("_count" if s.instrument == "histogram" else "")
        assert sample in samples, s.prom_name
    # no scope labels (they bloat every series); ranks always there
    assert "otel_scope_name" not in text


def test_readme_serving_limits_come_from_the_code(monkeypatch):
    """The figures of the reliability section are generated: change the code, the README is
    stale (the scrape budget and deadlines can never drift from what the server does)."""
    from gradwatch import serving

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"**{serving._Server.head_timeout:g} s in all**" in text
    monkeypatch.setattr(serving._Server, "head_timeout", 7.0)
    assert render(text) != text and "**7 s in all**" in render(text)


def test_every_value_comes_from_its_catalog_entry():
    """The exporter and the Python API are loops over the catalog: no statistic is picked by
    name outside it, and each entry's source fits its instrument."""
    import ast

    names = {s.prom_name for s in catalog.CATALOG}
    for path in ("export.py", "values.py"):
        tree = ast.parse((ROOT / "src" / "gradwatch" / path).read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        named = [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
        ]
        assert not named, f"{path} names {named}: read them through catalog sources"
    for s in catalog.CATALOG:
        src = s.source
        if s.instrument == "histogram":
            assert isinstance(src, catalog.FromStepHistory), s.prom_name
        elif s.instrument == "counter":
            assert isinstance(src, catalog.FromWatch | catalog.FromProcess), s.prom_name
        else:
            assert not isinstance(src, catalog.FromStepHistory), s.prom_name
        if isinstance(src, catalog.FromPartials):
            assert s.scope in (catalog.GLOBAL, catalog.GROUP, catalog.PARAM, catalog.RANK)
        if s.scope == catalog.SELF:
            assert isinstance(src, catalog.FromProcess | catalog.FromWatch), s.prom_name


def test_a_column_is_read_by_its_contract_name():
    """A statistic of a new partial reads it by name: records need no new field."""
    import numpy as np

    from gradwatch.kernels import CONTRACT
    from gradwatch.records import Aggregate

    partials = np.arange(2.0 * CONTRACT.n).reshape(2, CONTRACT.n)
    agg = Aggregate.of(partials, np.array([3.0, 4.0]))
    for c in CONTRACT.columns:
        np.testing.assert_array_equal(agg.column(c.name), partials[:, c.index])
    np.testing.assert_array_equal(agg.maxabs, agg.column("MAXABS"))
