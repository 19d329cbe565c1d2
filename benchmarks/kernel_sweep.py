"""Launch-configuration sweep of the Triton partials kernel on the GPT-2-small gradient shapes.

For fp32, bf16 and fp16 copies of 148 tensors shaped like GPT-2-small's parameters (124M
elements), every candidate (BLOCK, SUB, num_warps) is checked against a float64 reference (to
the kernel's stated error bound) and timed on the device alone (the GPU spins first, so the host
queues all calls ahead), next to a device-to-device copy of the same bytes. Also the host time
of one call, with and without the kernel launches. ``--programs 0,4,8,16`` sweeps the persistent
grid (programs per SM; 0: one program per chunk).

Run (CUDA):  python benchmarks/kernel_sweep.py [--programs 0,4,8,16] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from bench_gpu import GPT, host_us, kernel_ms  # noqa: E402

from gradwatch.kernels import triton_reduce  # noqa: E402
from reference import reference_partials  # noqa: E402

CANDIDATES = [
    (1024, 8, 4),
    (2048, 8, 8),
    (1024, 16, 4),
    (2048, 16, 8),
    (4096, 8, 16),
    (512, 16, 2),
]


def device_ms(fn) -> float:
    return kernel_ms(fn, device_only=True)


def copy_ms(nbytes: int) -> float:
    """Device-to-device copy of nbytes (read + written)."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return device_ms(lambda: dst.copy_(src))


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--configs",
        default=None,
        help="candidates as BLOCK,SUB,WARPS;... (default: the built-in list)",
    )
    ap.add_argument(
        "--programs",
        default=None,
        help="persistent programs per SM to try with every config, e.g. 0,2,4,8,16 (0: one"
        " program per chunk; default: the module's)",
    )
    ap.add_argument(
        "--fanouts",
        default=None,
        help="slot-search fan-outs to try with every config, e.g. 2,64 (default: the module's)",
    )
    args = ap.parse_args()
    candidates = CANDIDATES
    if args.configs:
        candidates = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    dev = torch.device("cuda")
    with torch.device("meta"):
        shapes = [p.shape for p in GPT().parameters()]
    g = torch.Generator(device=dev).manual_seed(0)
    base = [torch.randn(s, device=dev, generator=g) * 0.01 for s in shapes]
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ts = base if dtype == torch.float32 else [t.to(dtype) for t in base]
        want = reference_partials(ts)
        nbytes = sum(t.numel() * t.element_size() for t in ts)
        copy = copy_ms(nbytes)
        itemsize = ts[0].element_size()
        default = triton_reduce._CUDA_CONFIGS[itemsize]
        fanouts = [int(f) for f in args.fanouts.split(",")] if args.fanouts else [None]
        default_fanout = triton_reduce._SEARCH_FANOUT
        programs = [int(p) for p in args.programs.split(",")] if args.programs else [None]
        default_programs = triton_reduce.PROGRAMS_PER_SM
        sweep = [(c, f, p) for c in candidates for f in fanouts for p in programs]
        for cfg, fanout, per_sm in sweep:
            triton_reduce._CUDA_CONFIGS[itemsize] = cfg
            triton_reduce._SEARCH_FANOUT = fanout or default_fanout
            triton_reduce.PROGRAMS_PER_SM = default_programs if per_sm is None else per_sm
            try:
                got = triton_reduce.triton_partials(ts).cpu().numpy()
                bound = max(1e-10, triton_reduce.sum_relative_error_bound(dtype, dev))
                rel = np.abs(got[:, :2] / want[:, :2] - 1).max()
                exact = np.array_equal(got[:, 2:], want[:, 2:])
                ms = device_ms(lambda ts=ts: triton_reduce.triton_partials(ts))
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "config": cfg,
                    "fanout": triton_reduce._SEARCH_FANOUT,
                    "programs_per_sm": triton_reduce.PROGRAMS_PER_SM,
                    "kernel_us": ms * 1e3,
                    "copy_us": copy * 1e3,
                    "pct_of_copy": 100 * 0.5 * copy / ms,
                    "max_rel_err": float(rel),
                    "bound": bound,
                    "ok": bool(rel <= bound and exact),
                }
            except Exception as exc:  # noqa: BLE001 - report and go on with the sweep
                row = {"dtype": str(dtype), "config": cfg, "error": repr(exc)}
            results.append(row)
            print(row, flush=True)
        triton_reduce._CUDA_CONFIGS[itemsize] = default
        triton_reduce._SEARCH_FANOUT = default_fanout
        triton_reduce.PROGRAMS_PER_SM = default_programs
    # host time of one call on the fp32 set: real launches, then launches stubbed out
    call = host_us(lambda: triton_reduce.triton_partials(base))
    kernels = triton_reduce._KERNELS
    real = kernels[False]
    kernels[False] = _NoLaunch()
    try:
        setup = host_us(lambda: triton_reduce.triton_partials(base))
    finally:
        kernels[False] = real
    host = {"call_us": call, "without_launch_us": setup, "tensors": len(base)}
    print(host)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        triton_reduce.triton_partials(base)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    print(f"\nGPU: {torch.cuda.get_device_name()}")
    print(
        "| dtype | BLOCK, SUB, warps | search fan-out | programs / SM | kernel µs | copy µs |"
        " % of copy | max rel err | ok |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['dtype']} | {r['config']} | | | error: {r['error'][:80]} | | | | |")
            continue
        print(
            f"| {r['dtype']} | {r['config']} | {r['fanout']} | {r['programs_per_sm']} |"
            f" {r['kernel_us']:.0f} |"
            f" {r['copy_us']:.0f} |"
            f" {r['pct_of_copy']:.0f}% | {r['max_rel_err']:.1e} | {r['ok']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "host": host}, indent=1))


if __name__ == "__main__":
    main()
