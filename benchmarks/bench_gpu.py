"""GPU cost of gradwatch on a GPT-2-small-shaped model, side by side with the usual alternatives.

Model: 12 blocks, d=768, 12 heads, vocab 50257 (tied), context 1024: ~124M parameters, fp32
params and grads, bf16 autocast, fused AdamW. Configurations, interleaved round-robin:

  none          no telemetry
  gradwatch     gradwatch every step (Triton kernel on a side stream, no host sync)
  clip+item     HF-style: clip_grad_norm_(1.0) and .item() of the norm every step
  norm().item() per-tensor .norm().item() loop every step

Also: the fused kernel alone on the model's gradients (fp32, and cast to bf16, fp16 and fp64)
against a device-to-device copy of the same bytes (achieved bandwidth), a plain sum() over the
same bytes and torch._foreach_norm, for the persistent grid and for one program per chunk (the
previous kernel, ``PROGRAMS_PER_SM = 0``); the host time of one kernel call for the 148 tensors
(table built from scratch, cached with new addresses, cached with the same addresses:
benchmarks/triton_host.py), and host syncs per step counted with torch.cuda.set_sync_debug_mode.

Run:  python benchmarks/bench_gpu.py [--batch 8] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.kernels import COLUMNS, triton_reduce
from gradwatch.kernels.triton_reduce import triton_partials


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=50257, ctx=1024, d=768, heads=12, layers=12) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.t()


def time_steps(fn, n: int, device_only: bool = False) -> float:
    """Mean ms per call. device_only: the GPU spins first, so the host queues all n calls
    ahead and the events time the kernels back to back, without host-side setup between."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    if device_only:
        torch.cuda._sleep(int(5e8))  # ~0.25 s at 2 GHz: far longer than queueing n calls
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def kernel_ms(fn, n: int = 20, device_only: bool = False) -> float:
    """time_steps after 3 warm-up calls (compilation, caches)."""
    for _ in range(3):
        fn()
    return time_steps(fn, n, device_only)


def host_us(fn, n: int = 50) -> float:
    """Host time of one call (queued, not waited for), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return dt * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(ctx=args.ctx).to(dev)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    idx = torch.randint(0, 50257, (args.batch, args.ctx), device=dev)

    def fwd_bwd() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), idx.view(-1))
        loss.backward()

    def step_none() -> None:
        fwd_bwd()
        opt.step()

    def step_clip_item() -> None:
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(params, 1e9).item()  # HF-style logged grad_norm
        opt.step()

    def step_norm_loop() -> None:
        fwd_bwd()
        for p in params:
            p.grad.norm().item()
        opt.step()

    handle = None

    def step_gradwatch() -> None:
        fwd_bwd()
        opt.step()

    for fn in (step_none, step_clip_item, step_norm_loop):  # warm-up
        for _ in range(3):
            fn()
    configs = {
        "none": step_none,
        "gradwatch": step_gradwatch,
        "clip+item": step_clip_item,
        "norm().item() loop": step_norm_loop,
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for name, fn in configs.items():
            if name == "gradwatch":
                handle = gradwatch.watch(model, opt, port=0)
                for _ in range(3):
                    fn()
            times[name].append(time_steps(fn, args.steps))
            if name == "gradwatch":
                watch = handle.session.watches()[0]
                dropped, errors = watch.dropped_steps, handle.session.errors.nonzero()
                collected = watch.collected_steps
                handle.close()

    # host syncs per step: count what set_sync_debug_mode("warn") reports
    def syncs(fn) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(3):
                    fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught) / 3

    handle = gradwatch.watch(model, opt, port=0)
    for _ in range(3):
        step_gradwatch()
    sync_counts = {"none": syncs(step_none), "gradwatch": syncs(step_gradwatch)}
    gw_errors = handle.session.errors.nonzero()
    handle.close()
    sync_counts["clip+item"] = syncs(step_clip_item)
    sync_counts["norm().item() loop"] = syncs(step_norm_loop)

    # kernel vs copy bandwidth on the model's gradients, as fp32 and as bf16/fp16 copies
    fwd_bwd()
    grads = [p.grad for p in params]

    def kernel_vs_copy(gs: list[torch.Tensor]) -> dict[str, float]:
        nbytes = sum(g.numel() * g.element_size() for g in gs)
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)
        row: dict[str, float] = {"bytes": nbytes}
        row["kernel_us"] = 1e3 * kernel_ms(lambda: triton_partials(gs))
        row["copy_us"] = 1e3 * kernel_ms(lambda: dst.copy_(src))
        row["host_us"] = host_us(lambda: triton_partials(gs))
        try:
            row["kernel_device_us"] = 1e3 * kernel_ms(lambda: triton_partials(gs), device_only=True)
            persistent = triton_reduce.PROGRAMS_PER_SM
            triton_reduce.PROGRAMS_PER_SM = 0  # one program per chunk: the previous grid
            try:
                row["per_chunk_device_us"] = 1e3 * kernel_ms(
                    lambda: triton_partials(gs), device_only=True
                )
            finally:
                triton_reduce.PROGRAMS_PER_SM = persistent
            # both grids agree: max and counts exactly, sums within twice the stated bound
            a = triton_partials(gs).cpu()
            triton_reduce.PROGRAMS_PER_SM = 0
            b = triton_partials(gs).cpu()
            triton_reduce.PROGRAMS_PER_SM = persistent
            bound = max(1e-12, triton_reduce.sum_relative_error_bound(gs[0].dtype, gs[0].device))
            sums = [c.index for c in COLUMNS if not c.exact]
            exact = [c.index for c in COLUMNS if c.exact]
            rel = ((a[:, sums] - b[:, sums]).abs() / b[:, sums].abs().clamp_min(1e-300)).max()
            agree = torch.equal(a[:, exact], b[:, exact]) and rel.item() <= 2 * bound
            row["grids_agree"] = float(agree)
            row["copy_device_us"] = 1e3 * kernel_ms(lambda: dst.copy_(src), device_only=True)
            row["foreach_norm_device_us"] = 1e3 * kernel_ms(
                lambda: torch._foreach_norm(gs), device_only=True
            )
            # the floor of any statistic: one plain sum() reading the same bytes, same dtype
            flat = torch.zeros(nbytes // gs[0].element_size(), dtype=gs[0].dtype, device=dev)
            row["read_pass_device_us"] = 1e3 * kernel_ms(flat.sum, device_only=True)
        except Exception as exc:  # noqa: BLE001 - a private helper: never lose the rest of the run
            print(f"device-only timing unavailable: {exc!r}")
            row["kernel_device_us"] = row["copy_device_us"] = math.nan
            row["per_chunk_device_us"] = row["grids_agree"] = math.nan
            row["foreach_norm_device_us"] = row["read_pass_device_us"] = math.nan
        # kernel: bytes read; copy: bytes read + written, in the same time unit
        row["kernel_pct_of_copy"] = 100 * 0.5 * row["copy_us"] / row["kernel_us"]
        row["kernel_device_pct_of_copy"] = (
            100 * 0.5 * row["copy_device_us"] / row["kernel_device_us"]
        )
        return row

    bandwidth: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        try:
            gs = grads if dtype == torch.float32 else [g.to(dtype) for g in grads]
            bandwidth[str(dtype).removeprefix("torch.")] = kernel_vs_copy(gs)
        except Exception as exc:  # noqa: BLE001 - never lose the step-time table above
            print(f"kernel timing for {dtype} failed: {exc!r}")

    # host time of one call for the model's 148 tensors: table uncached / new addresses / same
    try:
        from triton_host import measure as host_table

        host_cases = host_table([p.shape for p in params], dev, repeats=50, stub=False)
    except Exception as exc:  # noqa: BLE001 - never lose the tables above
        print(f"host table timing failed: {exc!r}")
        host_cases = {}

    med = {k: statistics.median(v) for k, v in times.items()}
    name = torch.cuda.get_device_name()
    lines = [
        f"GPU: {name}; torch {torch.__version__}; {n_params / 1e6:.1f}M params in"
        f" {len(params)} tensors; batch {args.batch} x {args.ctx} tokens; bf16 autocast,"
        f" fused AdamW; median of {args.rounds} rounds x {args.steps} steps",
        "",
        "| configuration | step ms | overhead vs none | host syncs / step |",
        "|---|---|---|---|",
    ]
    for k, v in med.items():
        lines.append(
            f"| {k} | {v:.2f} | {100 * (v / med['none'] - 1):+.2f}% | {sync_counts[k]:.0f} |"
        )
    lines += [
        "",
        "Fused kernel on the model's gradients (as fp32, and cast to bf16/fp16) against a"
        " device-to-device copy of the same bytes (read + written). 'device only': the GPU spins"
        " first so the host queues every call ahead and events time the kernels back to back;"
        " 'end to end': host setup between calls included; host µs: one call's host time.",
        "",
        "| grads | MB | kernel µs (device only) | copy µs (device only) | kernel % of copy"
        " bandwidth (device only) | end to end % | host µs / call | _foreach_norm µs |"
        " sum() read pass µs | kernel x read pass | one program per chunk µs | grids agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in bandwidth.items():
        lines.append(
            f"| {k} | {r['bytes'] / 1e6:.0f} | {r['kernel_device_us']:.0f} |"
            f" {r['copy_device_us']:.0f} | {r['kernel_device_pct_of_copy']:.0f}% |"
            f" {r['kernel_pct_of_copy']:.0f}% | {r['host_us']:.0f} |"
            f" {r['foreach_norm_device_us']:.0f} | {r['read_pass_device_us']:.0f} |"
            f" {r['kernel_device_us'] / r['read_pass_device_us']:.2f} |"
            f" {r['per_chunk_device_us']:.0f} | {r['grids_agree'] == 1.0} |"
        )
    if host_cases:
        lines += [
            "",
            f"Host µs of one triton_partials call, {len(params)} tensors (real launches, median"
            " of 7 interleaved batches): table uncached"
            f" {host_cases['uncached_us']:.0f}, cached with new addresses"
            f" {host_cases['new_pointers_us']:.0f}, cached with the same addresses"
            f" {host_cases['same_pointers_us']:.0f}",
        ]
    lines += [
        "",
        f"gradwatch during timing: collected {collected}, dropped {dropped},"
        f" errors {errors or 0}; errors during the sync count: {gw_errors or 0}",
    ]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "gpu": name,
                    "median_step_ms": med,
                    "host_syncs_per_step": sync_counts,
                    "kernel_vs_copy": bandwidth,
                    "host_table_us": host_cases,
                    "programs_per_sm": triton_reduce.PROGRAMS_PER_SM,
                    "params": n_params,
                    "dropped": dropped,
                    "finite": all(math.isfinite(v) for v in med.values()),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
