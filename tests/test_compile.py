"""torch.compile'd model and optimizer step: hooks stay eager, no graph or graph break added."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

import gradwatch
from reference import reference_stats, to_float64_numpy
from util import fetch, parse, value

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_and_optimizer_step(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1)).to(device)
    cmodel = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    @torch.compile
    def opt_step():
        opt.step()

    x = torch.randn(4, 8, device=device)
    seen = []

    def run(steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            cmodel(x).pow(2).mean().backward()
            seen[:] = [to_float64_numpy(p.grad) for p in model.parameters()]
            opt_step()

    def counters():
        c = torch._dynamo.utils.counters
        return sum(c["graph_break"].values()), dict(c["stats"])

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run(2)
    breaks_without, stats_without = counters()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with gradwatch.watch(model, opt, port=0) as h:
        run(2)
        breaks_with, stats_with = counters()
        if device == "cuda":
            torch.cuda.synchronize()
            h.session.watches()[0].flush()
        samples = parse(fetch(h.port))
        assert h.session.errors.nonzero() == {}
    assert breaks_with <= breaks_without
    assert stats_with.get("unique_graphs") == stats_without.get("unique_graphs")
    assert stats_with.get("calls_captured") == stats_without.get("calls_captured")
    assert value(samples, "grad_stats_step") == 2
    assert value(samples, "grad_l2_norm") == pytest.approx(
        reference_stats(seen)["grad_l2_norm"], rel=1e-12
    )
