"""GradScaler and the split clip API: one meaning of the step number on fused and non-fused
paths, an endpoint that is up even when every step is skipped, and the pre-clip norm of
``get_total_norm`` + ``clip_grads_with_norm_`` (torchtitan's way to clip)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch
from reference import reference_stats
from util import fetch, help_texts, parse, value


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _scaled_run(fused: bool, skip_at: set[int], steps: int):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    h = gradwatch.watch(model, opt, port=0, backend="torch")
    scrapes = []
    try:
        for i in range(1, steps + 1):
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            if i in skip_at:
                loss = loss * math.inf  # inf/NaN gradients: GradScaler skips this step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scrapes.append(parse(fetch(h.port)))
    finally:
        h.close()
    return scrapes


@pytest.mark.parametrize("fused", [False, True], ids=["non-fused", "fused"])
def test_step_number_counts_every_step_call_skipped_or_not(fused):
    skip_at = {2, 5, 6}
    scrapes = _scaled_run(fused, skip_at, steps=8)
    last = scrapes[-1]
    assert value(last, "amp_skipped_steps_total") == len(skip_at)
    assert value(last, "grad_steps_total") == 8 - len(skip_at)  # steps whose gradients applied
    for i, samples in enumerate(scrapes, start=1):
        applied = max((j for j in range(1, i + 1) if j not in skip_at), default=None)
        # the latest collected step is the latest applied one, numbered by step() calls
        assert value(samples, "grad_stats_step") == applied, (i, fused)
        assert value(samples, "amp_skipped_steps_total") == len([j for j in skip_at if j <= i])


def test_endpoint_is_up_when_gradscaler_skips_every_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    h = gradwatch.watch(model, opt, port=0, backend="torch")
    try:
        seen = []
        for _ in range(4):
            opt.zero_grad()
            scaler.scale(model(torch.randn(4, 6)).sum() * math.inf).backward()
            scaler.step(opt)  # never calls opt.step(): every step is skipped
            scaler.update()
            assert h.port != 0  # up from the first training step
            samples = parse(fetch(h.port))
            seen.append(value(samples, "amp_skipped_steps_total"))
            assert value(samples, "grad_l2_norm") is None  # no gradient values at all
            assert value(samples, "grad_steps_total") == 0
        assert seen == [1, 2, 3, 4]
    finally:
        h.close()


def _split_clip_run(watched: bool, max_norm: float, steps: int = 4):
    model = _model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    h = gradwatch.watch(model, opt, port=0, backend="torch") if watched else None
    norms, grads, scrapes = [], [], []
    try:
        for i in range(steps):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().mul(10.0 * (i + 1)).backward()
            params = list(model.parameters())
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            norms.append(norm)
            grads.append([p.grad.clone() for p in params])
            opt.step()
            if h is not None:
                scrapes.append(parse(fetch(h.port)))
    finally:
        if h is not None:
            h.close()
    return norms, grads, [p.detach().clone() for p in model.parameters()], scrapes


def test_split_clip_api_reports_its_preclip_norm_for_the_same_step():
    originals = (torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_)
    ref_norms, ref_grads, ref_params, _ = _split_clip_run(False, 1.0)
    norms, grads, params, scrapes = _split_clip_run(True, 1.0)
    assert (torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_) == originals
    for a, b in zip(ref_norms + ref_params, norms + params, strict=True):
        assert torch.equal(a, b)  # training bitwise unchanged
    clipped = 0
    for i, samples in enumerate(scrapes):
        norm = float(norms[i])
        assert value(samples, "grad_stats_step") == i + 1
        assert value(samples, "grad_preclip_l2_norm") == norm  # this step's, not the last one's
        coef = min(1.0, 1.0 / (norm + 1e-6))
        assert value(samples, "grad_clip_coefficient_ratio") == pytest.approx(coef, rel=1e-15)
        clipped += coef < 1.0
        assert value(samples, "grad_clipped_steps_total") == clipped
        ref = reference_stats(grads[i])
        assert value(samples, "grad_l2_norm") == pytest.approx(ref["grad_l2_norm"], rel=1e-12)
    assert clipped >= 3


def test_split_clip_with_another_norm_type_is_not_taken_for_l2():
    model = _model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    h = gradwatch.watch(model, opt, port=0, backend="torch")
    try:
        model(torch.randn(8, 6)).pow(2).sum().mul(100).backward()
        params = list(model.parameters())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=math.inf)
        torch.nn.utils.clip_grads_with_norm_(params, 0.1, norm)
        opt.step()
        samples = parse(fetch(h.port))
        assert value(samples, "grad_preclip_l2_norm") is None  # an inf-norm is not an L2 norm
        assert value(samples, "grad_l2_norm") is not None
    finally:
        h.close()


def test_nonfinite_preclip_norm_is_counted_not_shown_as_a_calm_coefficient():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    h = gradwatch.watch(model, opt, port=0, backend="torch")
    try:
        for big in (False, True, False):
            opt.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            if big:  # squares overflow float32: clip_grad_norm_ returns inf and zeroes the grads
                for p in model.parameters():
                    p.grad.fill_(1e30)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            samples = parse(fetch(h.port))
            if big:
                assert math.isinf(float(norm))
                assert value(samples, "grad_preclip_l2_norm") is None
                assert value(samples, "grad_clip_coefficient_ratio") is None  # not a calm 0
                assert value(samples, "grad_l2_norm") == 0.0  # what the clip left, exactly
        assert value(samples, "grad_preclip_nonfinite_steps_total") == 1
        assert value(samples, "grad_clipped_steps_total") == 2  # the finite steps (both clip)
        assert value(samples, "grad_preclip_l2_norm") == float(norm)  # finite again
    finally:
        h.close()


def test_bf16_clip_reads_the_rounded_norm_and_help_says_so():
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    h = gradwatch.watch(model, opt, port=0)
    try:
        model(torch.randn(8, 64, dtype=torch.bfloat16)).pow(2).sum().mul(100).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grads = [p.grad for p in model.parameters()]
        opt.step()
        text = fetch(h.port)
    finally:
        h.close()
    got = value(parse(text), "grad_l2_norm")
    assert got == pytest.approx(reference_stats(grads)["grad_l2_norm"], rel=1e-12)  # exact
    assert got != 1.0 and abs(got - 1.0) < 2**-6  # bf16 rounding of the scaled gradients
    assert "bf16 gradients clipped to 1.0 can read" in help_texts(text)["grad_l2_norm"]
