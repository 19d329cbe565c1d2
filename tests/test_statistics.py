"""Every statistic, end to end (hook -> kernel -> exporter -> HTTP), against a float64 reference."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.kernels.cpu_native import native_available
from reference import COUNTS, MAGNITUDES, reference_stats, to_float64_numpy
from util import fetch, help_texts, parse, value


@pytest.fixture(params=["native", "torch"])
def backend(request):
    if request.param == "native":
        assert native_available(), "the C kernel must build here (gcc is in CI)"
    return request.param


class Capture:
    """A test pre-step hook registered after gradwatch's: sees the very grads it saw."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.grads: list[np.ndarray] = []
        self.scale: float | None = None
        opt.register_step_pre_hook(self)

    def __call__(self, opt, args, kwargs) -> None:
        self.grads = [
            to_float64_numpy(p.grad)
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        scale = getattr(opt, "grad_scale", None)
        self.scale = None if scale is None else float(scale)

    def unscaled(self) -> list[np.ndarray]:
        return [g / self.scale for g in self.grads] if self.scale else self.grads


def check_against_reference(samples, grads, rtol=1e-12, **thresholds) -> None:
    ref = reference_stats(grads, **thresholds)
    for name in MAGNITUDES:
        got = value(samples, name)
        if ref[name] is None:
            assert got is None, f"{name} must be absent for a non-finite step, got {got}"
        else:
            assert got is not None, name
            assert got == pytest.approx(ref[name], rel=rtol, abs=0), name
    for name in COUNTS:
        assert value(samples, name) == ref[name], name
    for kind in ("nan", "inf"):
        assert (
            value(samples, "grad_nonfinite_elements", kind=kind)
            == ref["grad_nonfinite_elements"][kind]
        )
    if ref["grad_zero_ratio"] is not None:
        assert value(samples, "grad_zero_ratio") == pytest.approx(ref["grad_zero_ratio"], rel=1e-15)


def train(model, opt, steps=1, make_loss=None):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        make_loss().backward()
        opt.step()


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(50, 8, dtype=dtype)  # most rows untouched: exact zero grads
        self.body = nn.Sequential(
            nn.Linear(8, 32, dtype=dtype), nn.ReLU(), nn.Linear(32, 4, dtype=dtype)
        )
        self.frozen = nn.Linear(4, 4, dtype=dtype)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(3, 3, dtype=dtype)  # in the optimizer, never gets a grad

    def forward(self, tokens):
        return self.frozen(self.body(self.embed(tokens)))


def mlp_loss(model, dtype=torch.float32):
    tokens = torch.randint(0, 5, (16,))
    return lambda: model(tokens).float().pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_mlp_embedding_frozen_unused(backend, dtype):
    torch.manual_seed(0)
    model = MLP(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, port=0, backend=backend) as h:
        cap = Capture(opt)
        train(model, opt, 3, mlp_loss(model))
        samples = parse(fetch(h.port))
    check_against_reference(samples, cap.grads)
    assert value(samples, "grad_tensors") == 5  # embed + 2x(weight, bias); frozen/unused excluded
    assert value(samples, "grad_zero_ratio") > 0.4  # 45 of 50 embedding rows untouched
    assert value(samples, "grad_stats_step") == 3
    assert value(samples, "grad_steps_total") == 3
    assert value(samples, "gradwatch_info", backend=backend) == 1
    # the reviewed field, named for what it is: total norm / number of tensors
    assert value(samples, "grad_l2_norm_divided_by_tensors") == pytest.approx(
        value(samples, "grad_l2_norm") / 5, rel=1e-15
    )


def _manual_step(opt, params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()


def test_huge_fp32_magnitudes_are_exact(backend):
    params = [nn.Parameter(torch.zeros(1000)), nn.Parameter(torch.zeros(7, 3))]
    grads = [torch.full((1000,), 1e20), torch.full((7, 3), -3e19)]
    assert math.isinf(torch.nn.utils.get_total_norm(grads))  # what torch reports
    opt = torch.optim.SGD(params, lr=0.0)
    with gradwatch.watch(None, opt, port=0, backend=backend) as h:
        _manual_step(opt, params, grads)
        samples = parse(fetch(h.port))
    check_against_reference(samples, grads)
    assert value(samples, "grad_l2_norm") == pytest.approx(math.sqrt(1000e40 + 21 * 9e38))
    assert value(samples, "grad_tensors_exploding") == 2


def test_nonfinite_step_shows_counts_and_no_stale_norm(backend):
    params = [nn.Parameter(torch.zeros(100)), nn.Parameter(torch.zeros(10))]
    opt = torch.optim.SGD(params, lr=0.0)
    with gradwatch.watch(None, opt, port=0, backend=backend) as h:
        _manual_step(opt, params, [torch.ones(100), torch.ones(10)])
        first = parse(fetch(h.port))
        assert value(first, "grad_l2_norm") == pytest.approx(math.sqrt(110))
        bad = torch.ones(100)
        bad[[3, 50]] = float("nan")
        bad[7] = float("inf")
        bad[8] = -float("inf")
        _manual_step(opt, params, [bad, torch.ones(10)])
        second = parse(fetch(h.port))
        check_against_reference(second, [bad, torch.ones(10)])
        assert value(second, "grad_nonfinite_elements", kind="nan") == 2
        assert value(second, "grad_nonfinite_elements", kind="inf") == 2
        for name in MAGNITUDES:
            assert value(second, name) is None, f"stale {name} left on display"
        assert value(second, "grad_stats_step") == 2
        assert value(second, "grad_nonfinite_steps_total") == 1
        assert value(second, "grad_group_l2_norm", group="0") is None
        assert value(second, "grad_group_nonfinite_elements", group="0", kind="nan") == 2
        _manual_step(opt, params, [torch.full((100,), 2.0), torch.ones(10)])
        third = parse(fetch(h.port))
    assert value(third, "grad_l2_norm") == pytest.approx(math.sqrt(410))
    assert value(third, "grad_nonfinite_steps_total") == 1
    assert value(third, "grad_steps_total") == 3


def test_empty_and_scalar_grads(backend):
    params = [
        nn.Parameter(torch.zeros(0)),
        nn.Parameter(torch.zeros(())),
        nn.Parameter(torch.zeros(3)),
    ]
    grads = [torch.zeros(0), torch.tensor(-2.5), torch.tensor([0.0, 1.0, -4.0])]
    opt = torch.optim.SGD(params, lr=0.0)
    with gradwatch.watch(None, opt, port=0, backend=backend) as h:
        _manual_step(opt, params, grads)
        samples = parse(fetch(h.port))
    check_against_reference(samples, grads)
    assert value(samples, "grad_tensor_l2_norm_min") == 0.0
    assert value(samples, "grad_tensors_vanishing") == 1


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_amp_grad_scaler_reports_unscaled_grads(backend, fused):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(32, 8)
    with gradwatch.watch(model, opt, port=0, backend=backend) as h:
        cap = Capture(opt)
        for _ in range(2):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
        samples = parse(fetch(h.port))
        if fused:
            assert cap.scale == 2.0**10  # the hook really saw still-scaled grads
        else:
            assert cap.scale is None
        check_against_reference(samples, cap.unscaled(), rtol=1e-12)
        # an overflowing step: GradScaler skips it; counted, not reported as gradients
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean() * float("inf")).backward()
        scaler.step(opt)
        scaler.update()
        after = parse(fetch(h.port))
    assert value(after, "amp_skipped_steps_total") == 1
    assert value(after, "grad_stats_step") == 2
    assert value(after, "grad_nonfinite_steps_total") == 0
    assert value(after, "grad_l2_norm") == value(samples, "grad_l2_norm")


def test_groups_by_prefix_and_by_param_group(backend):
    torch.manual_seed(2)
    model = nn.ModuleDict(
        {"host": nn.Linear(10, 10), "seed": nn.Linear(10, 3), "head": nn.Linear(3, 1)}
    )
    opt = torch.optim.SGD(
        [
            {"params": model["host"].parameters()},
            {
                "params": list(model["seed"].parameters()) + list(model["head"].parameters()),
                "lr": 0.1,
            },
        ],
        lr=0.01,
    )
    x = torch.randn(4, 10)

    def loss():
        return model["head"](model["seed"](model["host"](x))).pow(2).sum()

    for groups, expect in [
        (None, {"0": ["host"], "1": ["seed", "head"]}),
        (
            {"host": "host.", "seed": ["seed."]},
            {"host": ["host"], "seed": ["seed"], "other": ["head"]},
        ),
    ]:
        with gradwatch.watch(model, opt, port=0, backend=backend, groups=groups) as h:
            cap = Capture(opt)
            train(model, opt, 1, loss)
            samples = parse(fetch(h.port))
        names = [n for n, p in model.named_parameters()]
        by_name = dict(zip(names, cap.grads, strict=True))
        for label, prefixes in expect.items():
            sub = [g for n, g in by_name.items() if n.split(".")[0] in prefixes]
            ref = reference_stats(sub)
            assert value(samples, "grad_group_l2_norm", group=label) == pytest.approx(
                ref["grad_l2_norm"], rel=1e-12
            )
            assert value(samples, "grad_group_rms", group=label) == pytest.approx(
                ref["grad_rms"], rel=1e-12
            )
            assert value(samples, "grad_group_abs_max", group=label) == ref["grad_abs_max"]
            assert value(samples, "grad_group_nonfinite_elements", group=label, kind="nan") == 0
        assert len(samples["grad_group_l2_norm"]) == len(expect)


def test_per_param_series_use_dotted_names_and_cap(backend, caplog):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 4)
    with gradwatch.watch(model, opt, port=0, backend=backend, per_param=True) as h:
        cap = Capture(opt)
        train(model, opt, 1, lambda: model(x).sum())
        samples = parse(fetch(h.port))
    for (name, _), g in zip(model.named_parameters(), cap.grads, strict=True):
        assert value(samples, "grad_param_l2_norm", param=name) == pytest.approx(
            float(np.sqrt(np.sum(g * g))), rel=1e-12
        )
        assert value(samples, "grad_param_abs_max", param=name) == float(np.abs(g).max())
        assert value(samples, "grad_param_zero_ratio", param=name) == float((g == 0).mean())
        assert value(samples, "grad_param_nonfinite_elements", param=name, kind="inf") == 0
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with gradwatch.watch(
            model, opt, port=0, backend=backend, per_param=True, max_params=2
        ) as h:
            train(model, opt, 1, lambda: model(x).sum())
            samples = parse(fetch(h.port))
    assert len(samples["grad_param_l2_norm"]) == 2
    assert "GRADWATCH_MAX_PARAMS" in caplog.text


def test_every_n_steps_and_help_texts(backend):
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3)
    with gradwatch.watch(
        model,
        opt,
        port=0,
        backend=backend,
        every=3,
        vanishing_threshold=1e-5,
        exploding_threshold=7.5,
    ) as h:
        train(model, opt, 5, lambda: model(x).sum())
        text = fetch(h.port)
    samples = parse(text)
    assert value(samples, "grad_stats_step") == 4  # steps 1 and 4 were collected
    assert value(samples, "grad_steps_total") == 2
    helps = help_texts(text)
    assert "below 1e-05" in helps["grad_tensors_vanishing"]
    assert "above 7.5" in helps["grad_tensors_exploding"]
    assert "clip_grad_norm_" in helps["grad_l2_norm"]
    assert "/ T" in helps["grad_l2_norm_divided_by_tensors"]


def test_series_carry_rank_labels(backend):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, port=0, backend=backend) as h:
        train(model, opt, 1, lambda: model(torch.ones(1, 2)).sum())
        samples = parse(fetch(h.port))
    labels = dict(next(iter(samples["grad_l2_norm"])))
    assert labels["rank"] == "0" and labels["local_rank"] == "0" and labels["world_size"] == "1"
    assert labels["optimizer"] == "0"


def test_group_series_are_capped_with_one_warning(backend, caplog):
    torch.manual_seed(4)
    layers = [nn.Linear(2, 2) for _ in range(6)]
    opt = torch.optim.SGD([{"params": m.parameters()} for m in layers], lr=0.1)
    model = nn.Sequential(*layers)
    x = torch.randn(3, 2)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with gradwatch.watch(model, opt, port=0, backend=backend, max_groups=4) as h:
            cap = Capture(opt)
            train(model, opt, 2, lambda: model(x).sum())
            samples = parse(fetch(h.port))
    labels = {dict(k)["group"] for k in samples["grad_group_l2_norm"]}
    assert labels == {"0", "1", "2", "_overflow"}
    overflow = reference_stats(cap.grads[6:])  # groups 3, 4, 5: two tensors each
    assert value(samples, "grad_group_l2_norm", group="_overflow") == pytest.approx(
        overflow["grad_l2_norm"], rel=1e-12
    )
    assert sum("GRADWATCH_MAX_GROUPS" in r.getMessage() for r in caplog.records) == 1


def test_fast_listing_matches_the_per_tensor_one_and_follows_size_changes(backend):
    """The one-pass-per-property listing gives what the per-tensor one gives (groups, frozen
    params, mixed dtypes); cached element counts follow a parameter whose size changed."""
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 4))
    c, d = nn.Parameter(torch.randn(7, dtype=torch.float64)), nn.Parameter(torch.randn(2))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [c, d], "lr": 0.2}], lr=0.1)
    handle = gradwatch.watch(None, opt, port=0, backend=backend)
    try:
        for with_grad in ([a, b, c, d], [b, d], [a, c], [a, b, c, d]):
            keep = {id(p) for p in with_grad}
            for p in (a, b, c, d):
                p.grad = torch.randn_like(p) if id(p) in keep else None
            opt.step()
            watch = handle.session.watches()[0]
            fast = watch.listing.params_with_grads()
            assert watch.listing.listed_cpu
            slow = watch.listing.params_with_grads_listed()
            assert (
                [id(p) for p in fast[0]] == [id(p) for p in slow[0]] == [id(p) for p in with_grad]
            )
            assert all(x is y for x, y in zip(fast[1], slow[1], strict=True))
            assert fast[2] == slow[2]
            latest = watch.latest
            want = [float((p.grad.double() ** 2).sum()) for p in with_grad]
            np.testing.assert_allclose(latest.partials[:, 0], want, rtol=1e-12)
            assert latest.numel.tolist() == [p.numel() for p in with_grad]
        b.data = torch.randn(6, 4)  # same parameter, new size: the counts must follow
        a.grad, b.grad, c.grad, d.grad = torch.ones(5), torch.ones(6, 4), None, None
        opt.step()
        latest = handle.session.watches()[0].latest
        assert latest.numel.tolist() == [5, 24]
        assert latest.partials[:, 0].tolist() == [5.0, 24.0]
    finally:
        handle.close()


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_every_statistic_of_all_gradients_matches_its_float64_reference(backend):
    """Every GLOBAL statistic the catalog computes from partials, computed by the kernels and
    the catalog, against reference_stats (independent of gradwatch's code): a new entry without
    a reference fails here."""
    from gradwatch import catalog
    from gradwatch.kernels.dispatch import select_backend
    from gradwatch.records import Aggregate

    gen = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(5, 7, generator=gen),
        torch.zeros(3),
        torch.randn(64, generator=gen).to(torch.bfloat16),
        torch.randn(2, 3, dtype=torch.float64, generator=gen) * 1e3,
    ]
    grads[0][0, 0] = 0.0
    ref = reference_stats(grads)
    partials = select_backend(torch.device("cpu"), backend).reduce(grads).numpy()
    agg = Aggregate.of(partials, np.array([g.numel() for g in grads], dtype=np.float64))
    th = catalog.Thresholds()
    checked = 0
    for stat in catalog.CATALOG:
        if stat.scope != catalog.GLOBAL or stat.compute is None:
            continue
        assert stat.prom_name in ref, f"{stat.prom_name}: add its reference to reference.py"
        got, want = stat.compute(agg, th), ref[stat.prom_name]
        if isinstance(want, dict):
            assert got == want, stat.prom_name
        elif want is None:
            assert math.isnan(got), stat.prom_name
        else:
            assert got == pytest.approx(want, rel=1e-12), stat.prom_name
        checked += 1
    assert checked >= 14
