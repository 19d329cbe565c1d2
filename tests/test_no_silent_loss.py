"""No silent loss: a finite step always reaches the histogram, a gradient no kernel can read
is counted and named while the rest of the optimizer is reported, and a strided gradient is
read in bounded chunks, never copied whole."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import collector
from gradwatch.kernels import dispatch
from reference import assert_partials_close, reference_stats
from util import fetch, parse, value


def test_histogram_counts_every_step_between_far_apart_scrapes(monkeypatch):
    monkeypatch.setattr(collector, "PENDING_NORMS", 8)  # 65,536 in production
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    h = gradwatch.watch(model, opt, port=0, backend="torch")
    try:
        norms = []
        for i in range(30):  # no scrape in between: 3 hand-overs of 8, then 6 pending
            opt.zero_grad()
            model(torch.randn(3, 4)).sum().mul(i + 1).backward()
            norms.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))
            opt.step()
        samples = parse(fetch(h.port))
        assert value(samples, "grad_steps_total") == 30
        assert value(samples, "grad_l2_norm_per_step_count") == 30
        assert value(samples, "grad_l2_norm_per_step_sum") == pytest.approx(sum(norms), rel=1e-5)
        # the max since the last scrape covers the handed-over norms too
        assert value(samples, "grad_l2_norm_max_since_last_scrape") == pytest.approx(
            max(norms), rel=1e-5
        )
    finally:
        h.close()


@pytest.mark.parametrize("kind", ["sparse", "complex", "meta"])
def test_unreadable_gradient_is_counted_named_and_the_rest_reported(kind, caplog):
    torch.manual_seed(0)
    dense = nn.Linear(3, 2)
    if kind == "sparse":
        odd = nn.Embedding(10, 3, sparse=True)
    else:
        odd = nn.ParameterList(
            [nn.Parameter(torch.zeros(3, dtype=torch.complex64))]
            if kind == "complex"
            else [nn.Parameter(torch.zeros(3, device="meta"))]
        )
    model = nn.ModuleDict({"odd": odd, "dense": dense})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = gradwatch.watch(model, opt, port=0)
    try:
        with caplog.at_level(logging.WARNING, logger="gradwatch"):
            for _ in range(3):
                opt.zero_grad()
                x = odd(torch.tensor([1, 2])) if kind == "sparse" else torch.randn(2, 3)
                dense(x).pow(2).sum().backward()
                if kind == "complex":
                    odd[0].grad = torch.ones(3, dtype=torch.complex64)
                elif kind == "meta":
                    odd[0].grad = torch.ones(3, device="meta")
                grads = [p.grad.clone() for p in dense.parameters()]
                opt.step()
        samples = parse(fetch(h.port))
        ref = reference_stats(grads)
        assert value(samples, "grad_steps_total") == 3  # the optimizer is still reported
        assert value(samples, "grad_tensors") == 2  # the two dense ones
        assert value(samples, "grad_l2_norm") == pytest.approx(ref["grad_l2_norm"], rel=1e-12)
        assert value(samples, "grad_unreduced_tensors") == 1
        assert value(samples, "gradwatch_errors_total", stage="collect") == 0
        lines = [r.getMessage() for r in caplog.records if "cannot be reduced" in r.getMessage()]
        assert len(lines) == 1, lines  # once per parameter, not once per step
        assert "odd." in lines[0], lines  # named
    finally:
        h.close()


def test_strided_gradient_is_read_in_bounded_chunks(monkeypatch):
    monkeypatch.setattr(dispatch, "STRIDED_CHUNK_ELEMENTS", 1000)
    seen: list[int] = []
    backend = dispatch.select_backend(torch.device("cpu"), "auto")

    def spy(tensors):
        for t in tensors:
            if not t.is_contiguous():
                seen.append(t.numel())
        return backend.partials(tensors)

    spying = dispatch.Backend(backend.name, spy)
    base = torch.randn(400, 60)
    base[5, 6] = float("nan")
    tensors = [base[:, ::2], torch.randn(7), base.t(), torch.randn(9000)[::3]]
    out = spying.reduce(tensors)
    assert_partials_close(out, tensors)
    # no call was handed a non-dense tensor larger than the chunk (the transposed one is dense
    # and read in place, whatever its size)
    strided = [n for n in seen if n != base.numel()]
    assert strided and max(strided) <= 1000, seen
