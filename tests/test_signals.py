"""Training-health signals, end to end (hooks -> exporter -> HTTP) against independent references:
clipping, AMP loss scale, learning rate, per-step norm history, non-finite parameter names,
per-tensor norm spread and sampled parameter updates."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.export import NORM_BUCKETS
from reference import to_float64_numpy
from util import fetch, parse, value


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)


def _clip_run(max_norm, watched, steps=3, module_path=False):
    """Train with clipping; return (grads after clip per step, returned norms, final params)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    h = gradwatch.watch(model, opt, port=0, backend="torch") if watched else None
    clip = (
        torch.nn.utils.clip_grad.clip_grad_norm_ if module_path else torch.nn.utils.clip_grad_norm_
    )
    grads, norms, text = [], [], ""
    try:
        for _ in range(steps):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().mul(50).backward()
            # a generator, as most loops pass: the wrapper must not consume it
            norms.append(clip((p for p in model.parameters()), max_norm))
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        if h is not None:
            text = fetch(h.port)
    finally:
        if h is not None:
            h.close()
    return grads, norms, [p.detach().clone() for p in model.parameters()], text


@pytest.mark.parametrize("module_path", [False, True], ids=["nn.utils", "nn.utils.clip_grad"])
def test_clipping_is_unchanged_and_reported(module_path):
    original = torch.nn.utils.clip_grad_norm_
    ref_grads, ref_norms, ref_params, _ = _clip_run(0.5, watched=False, module_path=module_path)
    grads, norms, params, text = _clip_run(0.5, watched=True, module_path=module_path)
    # bitwise-identical clipping and training
    for a, b in zip(ref_grads, grads, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    for a, b in zip(ref_norms, norms, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_params, params, strict=True):
        assert torch.equal(a, b)
    assert torch.nn.utils.clip_grad_norm_ is original  # restored at close
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is original
    samples = parse(text)
    norm = float(norms[-1])
    assert norm > 0.5  # the scenario really clips
    assert value(samples, "grad_preclip_l2_norm") == norm  # the norm clip_grad_norm_ returned
    # reference: the coefficient recomputed from float64 definitions of the pre-clip norm
    coef = value(samples, "grad_clip_coefficient_ratio")
    assert coef == pytest.approx(min(1.0, 0.5 / (norm + 1e-6)), rel=1e-15)
    # and it is what was applied: post-clip norm / pre-clip norm (fp32 rounding of the scaling)
    post = math.sqrt(sum(float((to_float64_numpy(g) ** 2).sum()) for g in grads[-1]))
    assert post / norm == pytest.approx(coef, rel=1e-6)
    assert value(samples, "grad_l2_norm") == pytest.approx(post, rel=1e-12)  # post-clip
    assert value(samples, "grad_clipped_steps_total") == 3


def test_clip_not_binding_and_steps_without_clip():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data()
    with gradwatch.watch(model, opt, port=0, backend="torch") as h:
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # does not bite
        opt.step()
        first = parse(fetch(h.port))
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()  # no clip in this step
        second = parse(fetch(h.port))
    assert value(first, "grad_clip_coefficient_ratio") == 1.0
    assert value(first, "grad_clipped_steps_total") == 0
    assert value(second, "grad_preclip_l2_norm") is None  # never a stale pre-clip norm
    assert value(second, "grad_clip_coefficient_ratio") is None


def test_clip_of_another_models_params_is_not_attached():
    model, other = _model(), _model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data()
    with gradwatch.watch(model, opt, port=0, backend="torch") as h:
        (model(x) - y).pow(2).mean().backward()
        (other(x) - y).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(other.parameters(), 1e-3)
        opt.step()
        samples = parse(fetch(h.port))
    assert value(samples, "grad_preclip_l2_norm") is None


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_amp_loss_scale_and_learning_rates(fused):
    model = _model()
    lr_tensor = torch.tensor(0.003)
    opt = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 0.01},
            {"params": model[2].parameters(), "lr": lr_tensor if fused else 0.002},
        ],
        fused=fused,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    x, y = _data()
    with gradwatch.watch(model, opt, port=0, backend="torch") as h:
        scales = []
        for _ in range(3):
            opt.zero_grad()
            scales.append(scaler.get_scale())  # the scale this step's loss is multiplied by
            scaler.scale((model(x) - y).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
        samples = parse(fetch(h.port))
    assert value(samples, "amp_loss_scale") == scales[-1] == 2.0**14  # grew every step
    assert value(samples, "optimizer_learning_rate", param_group="0") == 0.01
    want = float(lr_tensor) if fused else 0.002
    assert value(samples, "optimizer_learning_rate", param_group="1") == want


def test_learning_rate_follows_the_scheduler():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    with gradwatch.watch(model, opt, port=0, backend="torch") as h:
        for _ in range(3):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            sched.step()
        samples = parse(fetch(h.port))
    assert value(samples, "optimizer_learning_rate", param_group="0") == 0.25  # lr of step 3
    assert "amp_loss_scale" not in samples  # no GradScaler: no sample


def test_every_step_norm_lands_in_the_histogram_and_the_max():
    params = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))]
    opt = torch.optim.SGD(params, lr=0.0)
    scales = [1e-9, 3e-5, 0.7, 1.0, 2.0, 40.0, 3e3, 1e5, 0.02]
    norms = []
    with gradwatch.watch(None, opt, port=0, backend="torch") as h:
        first = None
        for i, s in enumerate(scales):
            params[0].grad = torch.full((4,), s)
            params[1].grad = torch.full((3,), -s / 2)
            norms.append(
                math.sqrt(sum(float((to_float64_numpy(p.grad) ** 2).sum()) for p in params))
            )
            opt.step()
            if i == 1:
                first = parse(fetch(h.port))
        second = parse(fetch(h.port))
        third = parse(fetch(h.port))  # no step since the previous scrape
    assert value(first, "grad_l2_norm_max_since_last_scrape") == max(norms[:2])
    # the spike at step 8 is gone from grad_l2_norm by now, not from these two
    assert value(second, "grad_l2_norm") == norms[-1]
    assert value(second, "grad_l2_norm_max_since_last_scrape") == pytest.approx(max(norms[2:]))
    assert value(third, "grad_l2_norm_max_since_last_scrape") is None
    assert value(second, "grad_l2_norm_per_step_count") == len(scales)
    assert value(second, "grad_l2_norm_per_step_sum") == pytest.approx(sum(norms), rel=1e-12)
    for le in NORM_BUCKETS:
        want = sum(n <= le for n in norms)
        assert value(second, "grad_l2_norm_per_step_bucket", le=repr(le)) == want, le
    assert value(second, "grad_l2_norm_per_step_bucket", le="+Inf") == len(scales)
    assert value(third, "grad_l2_norm_per_step_count") == len(scales)  # cumulative


def test_nonfinite_parameters_are_named_and_logged_once(caplog):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])  # 8 tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    names = [n for n, _ in model.named_parameters()]
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with gradwatch.watch(model, opt, port=0, backend="torch") as h:
            for step in range(5):
                for p in model.parameters():  # set by hand: NaN params must not poison them
                    p.grad = torch.ones_like(p)
                if step in (1, 2, 4):
                    for i, p in enumerate(model.parameters()):
                        if i != 1:  # every param but the second: 7 of 8
                            p.grad.view(-1)[0] = float("nan") if i % 2 else float("inf")
                opt.step()
                if step == 1:
                    bad = parse(fetch(h.port))
                if step == 3:
                    good = parse(fetch(h.port))
    info = {dict(k)["position"]: dict(k)["param"] for k in bad["grad_nonfinite_param_info"]}
    want = [n for i, n in enumerate(names) if i != 1][:5]
    assert info == {str(i): n for i, n in enumerate(want)}
    # kept after the finite step 3: a one-step incident must outlive the next scrape
    assert good["grad_nonfinite_param_info"] == bad["grad_nonfinite_param_info"]
    lines = [r.getMessage() for r in caplog.records if "turned non-finite" in r.getMessage()]
    # steps 1-2 are one incident; step 4 is a new one, but within a minute: rate-limited
    assert len(lines) == 1, lines
    assert "step 2:" in lines[0] and ", ".join(want) in lines[0] and "2 more" in lines[0]


def test_tensor_norm_spread_ratio():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(params, lr=0.0)
    with gradwatch.watch(None, opt, port=0, backend="torch") as h:
        params[0].grad, params[1].grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0])
        opt.step()
        spread = parse(fetch(h.port))
        params[1].grad = torch.zeros(2)
        opt.step()
        zero = parse(fetch(h.port))
    assert value(spread, "grad_tensor_l2_norm_max_to_min_ratio") == pytest.approx(5.0 / 0.1)
    assert value(zero, "grad_tensor_l2_norm_max_to_min_ratio") is None  # min is 0: absent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_parameter_update(dtype):
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 2)}).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 8, dtype=dtype)
    before, after = {}, {}

    def keep(store):
        return lambda *_: store.update(
            {n: to_float64_numpy(p) for n, p in model.named_parameters()}
        )

    opt.register_step_pre_hook(keep(before))
    opt.register_step_post_hook(keep(after))
    with gradwatch.watch(
        model, opt, port=0, backend="torch", update_every=3, groups={"a": "a.", "b": "b."}
    ) as h:
        for step in range(1, 8):
            opt.zero_grad()
            model["b"](model["a"](x).tanh()).float().pow(2).mean().backward()
            opt.step()
            if step == 4:  # sampled steps are 1, 4, 7
                b4, a4 = dict(before), dict(after)
        samples = parse(fetch(h.port))
        assert value(samples, "update_stats_step") == 7

        # reference: float64 norms of the exact values before/after step 7
        def norm(d, prefix=""):
            return math.sqrt(sum(float((v**2).sum()) for n, v in d.items() if n.startswith(prefix)))

        delta = {n: after[n] - before[n] for n in after}
        assert norm(delta) > 0
        assert value(samples, "update_l2_norm") == pytest.approx(norm(delta), rel=1e-12)
        assert value(samples, "param_l2_norm") == pytest.approx(norm(after), rel=1e-12)
        assert value(samples, "update_to_param_ratio") == pytest.approx(
            norm(delta) / norm(after), rel=1e-12
        )
        for g in ("a", "b"):
            d, p = norm(delta, g + "."), norm(after, g + ".")
            assert value(samples, "update_group_l2_norm", group=g) == pytest.approx(d, rel=1e-12)
            assert value(samples, "param_group_l2_norm", group=g) == pytest.approx(p, rel=1e-12)
            assert value(samples, "update_group_to_param_ratio", group=g) == pytest.approx(
                d / p, rel=1e-12
            )
        watch = h.session.watches()[0]
        assert watch.updates.pending is None  # the snapshot was freed after the step
    assert b4 and a4


def test_updates_off():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with gradwatch.watch(model, opt, port=0, backend="torch", update_every=0) as h:
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        samples = parse(fetch(h.port))
    assert "update_l2_norm" not in samples and "update_stats_step" not in samples


def test_no_code_mode_global_hooks_reach_clip_and_updates():
    """Global pre/post hooks (optimizer=None) carry clip values and update samples too."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with gradwatch.watch(model, None, port=0, backend="torch", update_every=1) as h:
        opt.zero_grad()
        (model(x) - y).pow(2).mean().mul(100).backward()
        n = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        samples = parse(fetch(h.port))
    assert value(samples, "grad_preclip_l2_norm") == float(n)
    assert value(samples, "update_l2_norm") == pytest.approx(0.1 * 0.1, rel=1e-5)  # SGD: lr*|g|
    assert np.isfinite(value(samples, "param_l2_norm"))
