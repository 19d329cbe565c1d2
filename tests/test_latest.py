"""The Python API: handle.latest() and gradwatch.latest() equal the scrape of the same step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from util import fetch, parse

PROCESS_LABELS = {"rank", "local_rank", "world_size"}


def _scrape_samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for name, series in parse(text).items():
        if name.endswith(("_bucket", "_count", "_sum", "_created")) or name == "target_info":
            continue  # histograms are read from /metrics; target_info is OTel's resource
        for labels, v in series.items():
            out[(name, frozenset((k, x) for k, x in labels if k not in PROCESS_LABELS))] = v
    return out


def test_latest_equals_the_scrape_of_the_same_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt, port=0, per_param=True, update_every=1) as h:
        assert h.latest().step is None and not h.latest().samples  # before the first step
        for i in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).sum().mul(i + 1).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        stats = h.latest()
        assert gradwatch.latest().samples == stats.samples  # the module-level function
        text = fetch(h.port)
    want = _scrape_samples(text)
    got = {(s.name, frozenset(s.labels)): s.value for s in stats}
    assert stats.step == 3
    assert got.keys() == {k for k in want if k[0] != "gradwatch_errors_total"} | {
        k for k in got if k[0] == "gradwatch_errors_total"
    }
    for key, v in got.items():
        assert want[key] == pytest.approx(v, rel=1e-15, abs=0), key
    # typed access
    assert stats.get("grad_l2_norm") == want[("grad_l2_norm", frozenset({("optimizer", "0")}))]
    with pytest.raises(ValueError, match="give more labels"):
        stats.get("grad_param_l2_norm")
    flat = stats.flat()
    assert flat["gradwatch/grad_l2_norm"] == stats.get("grad_l2_norm")
    assert not any("grad_param_" in k for k in flat)  # per-tensor series stay out of loggers


def test_latest_when_off_is_empty(monkeypatch):
    monkeypatch.setenv("GRADWATCH", "0")
    h = gradwatch.watch(nn.Linear(2, 1), port=0)
    assert h.latest().step is None and h.latest().samples == ()
