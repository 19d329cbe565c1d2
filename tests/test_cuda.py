"""The CUDA path: no host sync, race-free with everything that writes grads, compiled models.

Marked `cuda`; skipped without a GPU (CI has none: run `bash benchmarks/gpu_check.sh` on one).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.catalog import BY_PROM_NAME, Thresholds
from gradwatch.kernels.triton_reduce import sum_relative_error_bound
from reference import reference_stats, to_float64_numpy
from util import no_host_sync

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


class Capture:
    """Registered after gradwatch's hook: float64 copies of the grads it saw (device-side clone)."""

    def __init__(self, opt):
        self.steps: list[tuple[list[torch.Tensor], torch.Tensor | None]] = []
        opt.register_step_pre_hook(self)

    def __call__(self, opt, args, kwargs):
        grads = [
            p.grad.detach().to(torch.float64, copy=True)
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        scale = getattr(opt, "grad_scale", None)
        self.steps.append((grads, None if scale is None else scale.detach().clone()))

    def unscaled(self, i=-1) -> list[np.ndarray]:
        grads, scale = self.steps[i]
        s = 1.0 if scale is None else float(scale)
        return [to_float64_numpy(g) / s for g in grads]


def settle(handle) -> dict:
    """Wait (test only) for in-flight results, then the global statistics of the latest readout."""
    torch.cuda.synchronize()
    watch = handle.session.watches()[0]
    watch.flush()
    readout = watch.latest
    agg = readout.aggregate()
    out = {"step": readout.step}
    for name in (
        "grad_l2_norm",
        "grad_rms",
        "grad_abs_max",
        "grad_abs_mean",
        "grad_zero_ratio",
        "grad_tensor_l2_norm_min",
        "grad_tensor_l2_norm_max",
        "grad_elements",
        "grad_tensors",
    ):
        v = BY_PROM_NAME[name].compute(agg, Thresholds())
        out[name] = None if isinstance(v, float) and math.isnan(v) else v
    return out


def check(got: dict, grads, rtol=1e-10) -> None:
    ref = reference_stats(grads)
    for name, v in got.items():
        if name == "step":
            continue
        assert v == pytest.approx(ref[name], rel=rtol), name


def make_model(width=256, depth=4):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(nn.Embedding(1000, width), *layers, nn.Linear(width, 1)).cuda()


def test_no_host_sync_fused_adamw_grad_scaler_and_planted_item_is_caught():
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    tokens = torch.randint(0, 100, (64,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(tokens).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    with gradwatch.watch(model, opt, port=0) as h:
        cap = Capture(opt)
        for _ in range(3):  # warm-up: Triton compiles, the endpoint starts
            step()
        with no_host_sync("cuda"):
            for _ in range(10):
                step()
        watch = h.session.watches()[0]
        assert watch.errors.nonzero() == {}, watch.errors.counts
        assert watch.backend_names == {"triton"}
        got = settle(h)
        skipped = watch.amp_skipped_steps
        assert watch.collected_steps + skipped + watch.dropped_steps == 13
        assert skipped <= 2 and got["step"] >= 11
        check(got, cap.unscaled(got["step"] - 1))  # Capture ran at every step, skipped ones too

        # The same loop with a planted .item() in gradwatch's reduction must be caught.
        backend = watch._backends[torch.device("cuda", torch.cuda.current_device())]
        original = backend.partials

        def planted(tensors):
            out = original(tensors)
            out.sum().item()
            return out

        object.__setattr__(backend, "partials", planted)
        try:
            with no_host_sync("cuda"):
                step()
        finally:
            object.__setattr__(backend, "partials", original)
        assert watch.errors.counts.get("collect", 0) == 1  # caught, counted, training went on


def test_race_free_with_accumulation_zero_grad_in_place_and_clip():
    """Big grads (the kernel takes a while) rewritten right after the step: stats stay exact."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(32, 2048, device="cuda")
    with gradwatch.watch(model, opt, port=0) as h:
        cap = Capture(opt)
        for _ in range(4):
            for _micro in range(2):  # gradient accumulation
                model(x).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # in-place scale
            opt.step()
            opt.zero_grad(set_to_none=False)  # in-place zeros right after the step
            for p in model.parameters():
                p.grad.add_(1.0)  # and more in-place writes
            opt.zero_grad(set_to_none=False)
        got = settle(h)
    assert got["step"] == 4
    check(got, cap.unscaled(-1))
    assert got["grad_l2_norm"] == pytest.approx(0.05, rel=1e-4)  # measured after clipping


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_huge_values_on_cuda(dtype):
    params = [nn.Parameter(torch.zeros(n, device="cuda", dtype=dtype)) for n in (0, 1, 5000, 70001)]
    opt = torch.optim.SGD(params, lr=0.0)
    with gradwatch.watch(None, opt, port=0) as h:
        cap = Capture(opt)
        for i, p in enumerate(params):
            scale = 1e4 if dtype == torch.float32 and i == 3 else 1.0
            p.grad = torch.randn(p.shape, device="cuda", dtype=dtype) * scale
        if dtype == torch.float32:
            params[2].grad[7] = 1e20
        opt.step()
        got = settle(h)
    # 16-bit sums: float32 lanes on CUDA, within the kernel's stated bound (1e-10 otherwise)
    bound = sum_relative_error_bound(dtype, torch.device("cuda"))
    check(got, cap.unscaled(-1), rtol=max(1e-10, bound))


def test_torch_backend_on_cuda_is_sync_free_and_exact():
    """GRADWATCH_BACKEND=torch (or no Triton) on CUDA: device ops, still no host sync."""
    from gradwatch.kernels.torch_fallback import DEVICE_CHUNK, device_partials
    from reference import assert_partials_close

    torch.manual_seed(2)
    model = make_model(width=128, depth=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 100, (32,), device="cuda")

    def step():
        opt.zero_grad()
        model(tokens).pow(2).mean().backward()
        opt.step()

    with gradwatch.watch(model, opt, port=0, backend="torch") as h:
        cap = Capture(opt)
        for _ in range(3):
            step()
        with no_host_sync("cuda"):
            for _ in range(3):
                step()
        watch = h.session.watches()[0]
        assert watch.errors.nonzero() == {}, watch.errors.counts
        assert watch.backend_names == {"torch"}
        got = settle(h)
    check(got, cap.unscaled(got["step"] - 1))

    big = torch.randn(2 * DEVICE_CHUNK + 3, device="cuda") * 1e20  # several slices, fp32 1e20
    big[DEVICE_CHUNK + 1] = float("nan")
    half = torch.randn(1000, device="cuda").bfloat16()
    half[:10] = 0
    ts = [big, half, torch.empty(0, device="cuda"), big[::3]]
    with no_host_sync("cuda"):
        out = device_partials(ts)
    assert out.device.type == "cuda"
    assert_partials_close(out, ts)
