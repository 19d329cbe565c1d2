"""The CUDA paths merged after the last GPU run, each against an independent float64 reference:
training-health signals (clip_grad_norm_ wrapper, AMP loss scale, learning rates, non-finite
parameter names, sampled parameter updates), the gradient-noise-scale hooks, and the combining of
FSDP2 (DTensor) partials with the all-reduce pair on gradwatch's own process group.

Every test runs on the CPU and on CUDA. The CPU case runs in CI and proves the test logic; the
`cuda` case is marked `cuda` and skipped without a GPU (run `bash benchmarks/gpu_check.sh` on
one). On CUDA the measured steps follow warm-up steps (Triton compiles, the endpoint starts, NCCL
builds its communicators) and run under ``torch.cuda.set_sync_debug_mode("error")``, where a host
sync raises. gradwatch catches whatever its hooks raise and counts it, so a sync inside gradwatch
shows up as ``watch.errors.nonzero() != {}``; one outside those (in gradwatch's wrappers of
clip_grad_norm_ and GradScaler.step) raises out of the loop.

FSDP2 runs in this process with a world of one (gloo on the CPU, NCCL on CUDA). gradwatch combines
only when more than one rank runs (``distributed.active()``), so the tests patch ``active`` to say
yes: the all-reduce pair then really runs, over one rank, where it leaves every owned row as it is.
Under FSDP2 clip_grad_norm_ returns a replicated DTensor: gradwatch reads its local copy.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradwatch
from gradwatch import distributed
from reference import reference_stats, to_float64_numpy
from test_noise import MBS
from test_noise import _batch as noise_batch
from test_noise import _estimates as noise_estimates
from test_noise import _problem as noise_problem
from util import assert_global_stats, fetch, free_port, no_host_sync, parse, value

_CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=_CUDA_MARKS)]
_NCCL = pytest.mark.skipif(
    not (dist.is_available() and dist.is_nccl_available()), reason="needs NCCL"
)
DIST_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not dist.is_available(), reason="no dist")),
    pytest.param("cuda", marks=[*_CUDA_MARKS, _NCCL]),
]
WARMUP = 3  # steps before the sync check: Triton compiles, the endpoint starts, NCCL connects


def warm_up_then_check(step, device: str, n: int = 5) -> None:
    """WARMUP steps, then n more where (on CUDA) any host sync raises."""
    for _ in range(WARMUP):
        step()
    with no_host_sync(device):
        for _ in range(n):
            step()


def settle(handle, device: str):
    """Wait (test only) for the device, publish what is in flight, scrape. (samples, watch)."""
    if device == "cuda":
        torch.cuda.synchronize()
    (watch,) = handle.session.watches()
    watch.flush()
    return parse(fetch(handle.port)), watch


def check_clean(watch, device: str) -> None:
    """No failure counted, and the path under test was the device's own."""
    assert watch.errors.nonzero() == {}, watch.errors.counts
    if device == "cuda":
        assert watch.backend_names == {"triton"}
        assert watch._streams  # the side-stream path, results read from pinned memory
    else:
        assert not watch._streams


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Capture:
    """An optimizer step pre-hook registered after gradwatch's: per step, float64 device copies of
    the gradients the optimizer applies (local shards of DTensors), their full shapes, the fused
    GradScaler's grad_scale and the learning rates. Copies stay on the device: no sync."""

    def __init__(self, opt):
        self.grads: list[list[torch.Tensor]] = []
        self.shapes: list[list[tuple[int, ...]]] = []
        self.scales: list[torch.Tensor | None] = []
        self.lrs: list[list[object]] = []
        opt.register_step_pre_hook(self)

    def __call__(self, opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self.grads.append([_local(p.grad).detach().to(torch.float64, copy=True) for p in params])
        self.shapes.append([tuple(p.grad.shape) for p in params])
        scale = getattr(opt, "grad_scale", None)
        self.scales.append(None if scale is None else scale.detach().clone())
        self.lrs.append([g["lr"] for g in opt.param_groups])

    def unscaled(self, step: int, scale: float = 1.0) -> list[np.ndarray]:
        """The grads of optimizer step ``step`` (1-based, as grad_stats_step), divided by scale."""
        return [to_float64_numpy(g) / scale for g in self.grads[step - 1]]


class ParamHistory:
    """Float64 device copies of the params before and after each step (hooks registered after
    gradwatch's: they see the values its snapshot and its post-step reduction see)."""

    def __init__(self, opt, named):
        self.named = named  # callable: [(name, param)]
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        opt.register_step_pre_hook(lambda *_: self.before.append(self._copy()))
        opt.register_step_post_hook(lambda *_: self.after.append(self._copy()))

    def _copy(self) -> dict[str, torch.Tensor]:
        return {n: _local(p).detach().to(torch.float64, copy=True) for n, p in self.named()}

    def check(self, samples: dict, step: int, groups=(), rel: float = 1e-12) -> None:
        """update_* / param_* of ``step`` against float64 norms from their definitions."""
        before = {n: to_float64_numpy(v) for n, v in self.before[step - 1].items()}
        after = {n: to_float64_numpy(v) for n, v in self.after[step - 1].items()}

        def norm(d, prefix=""):
            return math.sqrt(sum(float((v**2).sum()) for n, v in d.items() if n.startswith(prefix)))

        delta = {n: after[n] - before[n] for n in after}
        d, p = norm(delta), norm(after)
        assert d > 0
        assert value(samples, "update_stats_step") == step
        assert value(samples, "update_l2_norm") == pytest.approx(d, rel=rel)
        assert value(samples, "param_l2_norm") == pytest.approx(p, rel=rel)
        assert value(samples, "update_to_param_ratio") == pytest.approx(d / p, rel=rel)
        for g in groups:
            d, p = norm(delta, g + "."), norm(after, g + ".")
            assert value(samples, "update_group_l2_norm", group=g) == pytest.approx(d, rel=rel)
            assert value(samples, "param_group_l2_norm", group=g) == pytest.approx(p, rel=rel)
            assert value(samples, "update_group_to_param_ratio", group=g) == pytest.approx(
                d / p, rel=rel
            )


def compare(samples: dict, grads, rel: float = 1e-10) -> None:
    """The global statistics of a scrape against reference_stats of the same gradients."""
    assert_global_stats(samples, reference_stats(grads), rel, extra=("grad_zero_ratio",))


def _mlp(device: str, dtype=torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).to(device, dtype)


def _data(device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g)
    return x.to(device), y.to(device)  # before the sync check: a pageable copy syncs


# ---- training-health signals ----
@pytest.mark.parametrize("device", DEVICES)
def test_clip_norm_and_learning_rates(device):
    """clip_grad_norm_'s returned norm tensor travels to /metrics without a sync; coefficient,
    clipped steps, post-clip statistics and the scheduled learning rates of two groups."""
    model = _mlp(device)
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[2].parameters(), "lr": 0.05},
        ]
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data(device)
    norms: list[torch.Tensor] = []  # what clip_grad_norm_ returned, per step (device tensors)
    with gradwatch.watch(model, opt, port=0) as h:
        cap = Capture(opt)

        def step():
            opt.zero_grad()
            (model(x) - y).pow(2).mean().mul(50).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
            opt.step()
            sched.step()

        warm_up_then_check(step, device)
        samples, watch = settle(h, device)
    check_clean(watch, device)
    total = WARMUP + 5
    assert watch.collected_steps + watch.dropped_steps == total
    s = int(value(samples, "grad_stats_step"))
    assert s >= total - 1
    norm = float(norms[s - 1])
    assert norm > 0.5  # the scenario really clips
    assert value(samples, "grad_preclip_l2_norm") == norm  # exactly the returned tensor's value
    coef = value(samples, "grad_clip_coefficient_ratio")
    assert coef == pytest.approx(min(1.0, 0.5 / (norm + 1e-6)), rel=1e-15)
    grads = cap.unscaled(s)  # after clipping: what the optimizer applied
    compare(samples, grads)
    post = reference_stats(grads)["grad_l2_norm"]
    assert post / norm == pytest.approx(coef, rel=1e-6)  # the coefficient that was applied
    assert value(samples, "grad_clipped_steps_total") == watch.collected_steps
    assert value(samples, "grad_steps_total") == watch.collected_steps
    for i, lr in enumerate(cap.lrs[s - 1]):
        assert value(samples, "optimizer_learning_rate", param_group=str(i)) == lr
    assert cap.lrs[s - 1][0] == 0.1 * 0.5 ** (s - 1)  # the scheduler's, not a stale one


@pytest.mark.parametrize("device", DEVICES)
def test_amp_loss_scale_fused_step_and_tensor_learning_rate(device):
    """GradScaler with a fused optimizer: the loss scale read with _get_scale_async and a tensor
    learning rate (on the device for CUDA) travel in the pinned copy; statistics are unscaled."""
    model = _mlp(device)
    lr = torch.tensor(0.003, device=device)
    opt = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 0.01},
            {"params": model[2].parameters(), "lr": lr},
        ],
        fused=True,
    )
    init = 2.0**12
    scaler = torch.amp.GradScaler(device, init_scale=init, growth_interval=1)
    x, y = _data(device)
    with gradwatch.watch(model, opt, port=0) as h:
        cap = Capture(opt)

        def step():
            opt.zero_grad()
            scaler.scale((model(x) - y).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()

        warm_up_then_check(step, device)
        samples, watch = settle(h, device)
    check_clean(watch, device)
    total = WARMUP + 5
    # no overflow: the scale doubled at every update, so step s used init * 2**(s - 1)
    assert watch.amp_skipped_steps == 0
    assert scaler.get_scale() == init * 2.0**total
    s = int(value(samples, "grad_stats_step"))
    assert s >= total - 1
    scale = init * 2.0 ** (s - 1)
    assert value(samples, "amp_loss_scale") == scale
    assert float(cap.scales[s - 1]) == scale  # the fused step saw still-scaled gradients
    compare(samples, cap.unscaled(s, scale))
    assert value(samples, "optimizer_learning_rate", param_group="0") == 0.01
    assert value(samples, "optimizer_learning_rate", param_group="1") == float(lr)
    assert value(samples, "amp_skipped_steps_total") == 0


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_parameter_update_bf16(device):
    """update_every=3 on bf16 params: fp32 snapshot before the step, one reduction of deltas and
    params after it (the main stream on CUDA), read back from pinned memory."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 2)}).to(device, torch.bfloat16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 8).to(device, torch.bfloat16)
    groups = {"a": "a.", "b": "b."}
    with gradwatch.watch(model, opt, port=0, update_every=3, groups=groups) as h:
        hist = ParamHistory(opt, model.named_parameters)

        def step():
            opt.zero_grad()
            model["b"](model["a"](x).tanh()).float().pow(2).mean().backward()
            opt.step()

        warm_up_then_check(step, device)  # steps 1, 4 and 7 are sampled
        samples, watch = settle(h, device)
        assert watch.updates.pending is None  # the snapshot was freed after the step
    check_clean(watch, device)
    s = int(value(samples, "update_stats_step"))
    assert s == 7 or (s == 4 and watch.dropped_steps)
    hist.check(samples, s, groups=groups)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_parameters_are_named(device, caplog):
    """NaN/Inf gradients: the parameters are named from the device partials (first five, in
    order), the latest incident is kept past finite steps, one rate-limited log line."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)]).to(device)  # 8 tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def step(bad=()):
        for p in params:
            p.grad = torch.ones_like(p)
        for i in bad:  # fill_ on a slice: a Python-scalar setitem would copy (and sync)
            params[i].grad.view(-1)[:1].fill_(float("nan") if i % 2 else float("inf"))
        opt.step()

    first_bad = [i for i in range(8) if i != 1]  # 7 of 8: 3 NaN, 4 Inf
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with gradwatch.watch(model, opt, port=0) as h:
            for _ in range(WARMUP):
                step()
            with no_host_sync(device):
                step(first_bad)  # step 4
                step()
                step([3, 6])  # step 6: one NaN, one Inf
                step()
            samples, watch = settle(h, device)
    check_clean(watch, device)
    assert watch.dropped_steps == 0  # every step published, the incidents included
    assert value(samples, "grad_nonfinite_steps_total") == 2
    info = {dict(k)["position"]: dict(k)["param"] for k in samples["grad_nonfinite_param_info"]}
    assert info == {"0": names[3], "1": names[6]}  # the latest incident, kept past step 7
    last = watch.last_nonfinite
    assert last.step == WARMUP + 3
    agg = last.aggregate()
    assert (agg.nan.sum(), agg.inf.sum()) == (1, 1)
    assert (agg.nan > 0).tolist() == [i == 3 for i in range(8)]
    assert (agg.inf > 0).tolist() == [i == 6 for i in range(8)]
    compare(samples, [torch.ones_like(p) for p in params])  # the finite last step
    lines = [r.getMessage() for r in caplog.records if "turned non-finite" in r.getMessage()]
    assert len(lines) == 1, lines  # step 6 is a new incident, within a minute: not logged
    want = [names[i] for i in first_bad][:5]
    assert f"step {WARMUP + 1}:" in lines[0] and ", ".join(want) in lines[0]
    assert "(3 NaN, 4 Inf elements)" in lines[0] and "2 more" in lines[0]


# ---- gradient noise scale ----
K = 3  # micro-batches per step (test_noise's problem, a shorter window)


def _noise_problem(device: str, seed: int, steps: int):
    """test_noise.py's linear regression, float64, with every micro-batch of every step made up
    front and moved to the device before the sync check."""
    gen, model, w_star = noise_problem(seed)
    windows = [[noise_batch(gen, w_star) for _ in range(K)] for _ in range(steps)]
    on_device = [[(x.to(device), y.to(device)) for x, y in w] for w in windows]
    return model.to(device), windows, on_device


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clipped"])
@pytest.mark.parametrize("device", DEVICES)
def test_noise_scale_hooks(device, clip):
    """Post-accumulate-grad hooks count micro-batches and keep |g_small|^2 as a device scalar;
    it reaches the step through the pinned copy. Clipped steps are undone with the device norm."""
    total = WARMUP + 3
    model, windows, on_device = _noise_problem(device, 1, total)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, port=0, micro_batch_size=MBS, noise_ema=0.0) as h:

        def step(window):
            for x, y in window:
                (((model(x).squeeze(-1) - y) ** 2).mean() / 2 / K).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # always bites
            opt.step()
            opt.zero_grad()

        for window in on_device[:WARMUP]:  # the first step starts the hooks
            step(window)
        with no_host_sync(device):
            for window in on_device[WARMUP:]:
                step(window)
        samples, watch = settle(h, device)
    check_clean(watch, device)
    s = int(value(samples, "grad_stats_step"))
    assert s >= total - 1
    assert value(samples, "grad_accumulation_micro_batches") == K
    if clip:
        assert value(samples, "grad_clip_coefficient_ratio") < 0.01
    trace, g2 = noise_estimates(to_float64_numpy(model.weight), windows[s - 1])
    rel = 1e-6 if clip else 1e-9  # clipping: fp64 rounding of the coefficient, undone
    assert value(samples, "grad_noise_trace_sigma") == pytest.approx(trace, rel=rel)
    assert value(samples, "grad_noise_true_grad_sq_norm") == pytest.approx(g2, rel=rel)
    if g2 > 0 and trace > 0:
        assert value(samples, "grad_noise_scale") == pytest.approx(trace / g2, rel=rel)
    else:
        assert value(samples, "grad_noise_scale") is None


# ---- FSDP2 / DTensor combining ----
@pytest.fixture
def world_of_one(device, monkeypatch):
    """A one-rank process group in this process (gloo on the CPU, NCCL on CUDA) that gradwatch
    takes as distributed, so that it combines (it skips combining at world size 1)."""
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(0)
        backend = "nccl"
    dist.init_process_group(
        backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}"
    )
    distributed.reset()
    monkeypatch.setattr(distributed, "active", lambda: True)
    try:
        yield
    finally:
        dist.destroy_process_group()
        distributed.reset()


@pytest.mark.parametrize("device", DIST_DEVICES)
def test_combine_pair_zeroes_rows_not_owned(device, world_of_one):
    """start_combine/finish_combine on the device's tensors: the pinned mask zeroes rows this rank
    does not own, the all-reduce pair (sum, max) over one rank leaves the others exact."""
    g = torch.Generator().manual_seed(0)
    partials = torch.rand(5, 6, generator=g, dtype=torch.float64).to(device)
    owned = np.array([True, False, True, True, False])

    def combine():
        result, works = distributed.start_combine(partials, owned)
        for work in works:
            work.wait()
        return distributed.finish_combine(result)

    combine()  # warm-up: the group and its communicator are made
    with no_host_sync(device):
        out = combine()
    got = out.cpu().numpy()
    want = partials.cpu().numpy() * owned[:, None]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float64 and got.shape == (5, 6)


@pytest.mark.parametrize("device", DIST_DEVICES)
def test_fsdp2_partials_combined_on_the_device(device, world_of_one, monkeypatch):
    """FSDP2 (flat and HSDP meshes) with combining: the DTensor local shards' partials go through
    the all-reduce pair on gradwatch's group (side stream, pinned mask copy on CUDA); statistics,
    full element counts, NaN/Inf counts and sampled updates equal the float64 reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    combined_on: list[str] = []
    start = distributed.start_combine

    def spy(partials, owned):
        combined_on.append(partials.device.type)
        return start(partials, owned)

    monkeypatch.setattr(distributed, "start_combine", spy)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            return self.head(self.encoder(x))

    torch.manual_seed(0)
    model = Net().to(device)
    flat = init_device_mesh(device, (1,))
    hsdp = init_device_mesh(device, (1, 1), mesh_dim_names=("replicate", "shard"))
    fully_shard(model.head, mesh=hsdp)
    fully_shard(model.encoder[0], mesh=flat)
    fully_shard(model, mesh=flat)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 5).to(device)
    params = list(model.parameters())

    def backward():
        opt.zero_grad()
        model(x).pow(2).mean().backward()

    with gradwatch.watch(model, opt, port=0, update_every=2) as h:
        cap = Capture(opt)
        hist = ParamHistory(opt, model.named_parameters)
        for _ in range(WARMUP):
            backward()
            opt.step()
        # FSDP2's own forward/backward collectives stay outside the check: gradwatch's work (and
        # the combining) runs in the optimizer step hooks.
        for _ in range(3):  # steps 4-6
            backward()
            with no_host_sync(device):
                opt.step()
        finite, watch = settle(h, device)
        check_clean(watch, device)
        placements = {str(p.grad.placements) for p in params}
        assert placements == {"(Shard(dim=0),)", "(Replicate(), Shard(dim=0))"}

        backward()
        params[0].grad.to_local().view(-1)[:1].fill_(float("nan"))
        params[4].grad.to_local().view(-1)[:2].fill_(float("inf"))
        with no_host_sync(device):
            opt.step()  # step 7
        nonfinite, watch = settle(h, device)
    check_clean(watch, device)
    total = WARMUP + 4
    assert watch.collected_steps + watch.dropped_steps == total
    assert combined_on == [device] * watch.collected_steps  # every collected step combined
    assert watch.latest.local is not watch.latest.partials

    s = int(value(finite, "grad_stats_step"))
    assert s >= WARMUP + 2
    # one rank: its local shards are the full gradients
    assert [tuple(g.shape) for g in cap.grads[s - 1]] == cap.shapes[s - 1]
    compare(finite, cap.unscaled(s))
    assert value(finite, "grad_elements") == 7 * 5 + 7 + 3 * 7 + 3 + 3 * 3 + 3
    for kind in ("nan", "inf"):
        assert value(finite, "grad_rank_nonfinite_elements", kind=kind) == 0
    u = int(value(finite, "update_stats_step"))
    assert u in (3, 5)  # sampled steps 1, 3, 5, 7
    hist.check(finite, u)

    assert value(nonfinite, "grad_stats_step") == total
    compare(nonfinite, cap.unscaled(total))
    assert value(nonfinite, "grad_nonfinite_elements", kind="nan") == 1
    assert value(nonfinite, "grad_nonfinite_elements", kind="inf") == 2
    assert value(nonfinite, "grad_rank_nonfinite_elements", kind="nan") == 1
    assert value(nonfinite, "grad_rank_nonfinite_elements", kind="inf") == 2
    assert value(nonfinite, "grad_l2_norm") is None
    info = {dict(k)["position"]: dict(k)["param"] for k in nonfinite["grad_nonfinite_param_info"]}
    assert info == {"0": "encoder.0.weight", "1": "head.weight"}


@pytest.mark.parametrize("device", DIST_DEVICES)
def test_fsdp2_clip_norm_is_a_dtensor(device, world_of_one):
    """clip_grad_norm_ over FSDP2 params returns a DTensor: its value is reported like a plain
    tensor's (on the CPU it is read at once; on CUDA it must travel in the pinned copy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(device)
    fully_shard(model, mesh=init_device_mesh(device, (1,)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 5).to(device)
    norms = []

    def backward_and_clip():
        opt.zero_grad()
        model(x).pow(2).mean().mul(100).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1))

    with gradwatch.watch(model, opt, port=0) as h:
        cap = Capture(opt)
        for _ in range(WARMUP):
            backward_and_clip()
            opt.step()
        for _ in range(2):
            backward_and_clip()  # DTensor collectives of torch's own: outside the check
            with no_host_sync(device):
                opt.step()
        samples, watch = settle(h, device)
    assert hasattr(norms[-1], "placements")  # a DTensor: the case under test
    check_clean(watch, device)
    s = int(value(samples, "grad_stats_step"))
    assert s >= WARMUP + 1
    norm = float(norms[s - 1].full_tensor())
    assert norm > 0.1  # the scenario really clips
    assert value(samples, "grad_preclip_l2_norm") == norm
    coef = value(samples, "grad_clip_coefficient_ratio")
    assert coef == pytest.approx(min(1.0, 0.1 / (norm + 1e-6)), rel=1e-15)
    assert value(samples, "grad_clipped_steps_total") == watch.collected_steps
    compare(samples, cap.unscaled(s))


@pytest.mark.parametrize("device", DIST_DEVICES)
def test_replicated_value_never_communicates(device, world_of_one):
    """A replicated DTensor gives its local copy; a Partial one (reading it needs an all-reduce)
    gives None, so the clip hook never issues a collective of its own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = init_device_mesh(device, (1,))
    local = torch.tensor(3.0, device=device)
    plain = torch.tensor(2.0, device=device)
    assert distributed.replicated_value(plain) is plain
    rep = DTensor.from_local(local, mesh, [Replicate()])
    assert distributed.replicated_value(rep) is not None
    assert float(distributed.replicated_value(rep)) == 3.0
    partial = DTensor.from_local(local, mesh, [Partial()])
    assert distributed.replicated_value(partial) is None
