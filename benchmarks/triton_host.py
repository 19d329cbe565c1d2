"""Host-side cost of one Triton partials call: checks, the slot table, its H2D copy, launches.

Runs anywhere: on a machine without CUDA the kernel module runs under ``TRITON_INTERPRET=1``
(set here before triton is imported) and the launches are stubbed out, so what is timed is the
host work of building (or reusing) the table. On CUDA (``bench_gpu.py`` calls :func:`measure`)
the real launches are timed too, as queued by the host.

Cases, for the GPT-2-small parameter shapes (148 tensors) and 4000 small tensors (1000 x
(Linear(16, 16) + LayerNorm(16))):

  uncached       the layout cache emptied before every call (the table built from scratch)
  new pointers   same layout, gradients reallocated every call (two sets alternate): the cached
                 table with its base addresses rewritten
  same pointers  the same gradients every call: the device table reused as it is

Run:  python benchmarks/triton_host.py [--repeats 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from gradwatch.kernels import triton_reduce  # noqa: E402


def gpt2_shapes() -> list[torch.Size]:
    from bench_gpu import GPT

    with torch.device("meta"):
        return [p.shape for p in GPT().parameters()]


def small_shapes() -> list[torch.Size]:
    out = []
    for _ in range(1000):  # Linear(16, 16) + LayerNorm(16): weight, bias, weight, bias
        out += [torch.Size([16, 16]), torch.Size([16]), torch.Size([16]), torch.Size([16])]
    return out


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _interleaved_us(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Host µs of one call per case: the median over 7 rounds of a batch of ``repeats`` calls,
    the cases interleaved round-robin (a shared machine's load hits all of them alike)."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(7):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - t0) / repeats * 1e6)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {k: statistics.median(v) for k, v in times.items()}


def measure(
    shapes: list[torch.Size], device: torch.device, repeats: int, stub: bool
) -> dict[str, float]:
    """Host µs per call for the three cases (see the module docstring)."""
    sets = [[torch.zeros(s, device=device) for s in shapes] for _ in range(2)]
    kernels = triton_reduce._KERNELS
    interpret = triton_reduce._interpret_mode()
    real = triton_reduce._kernel(interpret)
    if stub:
        kernels[interpret] = _NoLaunch()
    flip = [0]

    def new_pointers() -> None:
        flip[0] ^= 1
        triton_reduce.triton_partials(sets[flip[0]])

    def uncached() -> None:
        triton_reduce.clear_layout_cache()
        new_pointers()

    def same_pointers() -> None:
        triton_reduce.triton_partials(sets[0])

    cases = {"uncached_us": uncached, "new_pointers_us": new_pointers}
    cases["same_pointers_us"] = same_pointers
    try:
        return {**_interleaved_us(cases, repeats), "tensors": len(shapes)}
    finally:
        kernels[interpret] = real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    results = {}
    for name, shapes in (("gpt2-small", gpt2_shapes()), ("4000 small", small_shapes())):
        repeats = max(20, args.repeats * 148 // len(shapes))  # about the same time per case
        results[name] = measure(shapes, device, repeats, not cuda)
    where = "CUDA, real launches" if cuda else "CPU, TRITON_INTERPRET=1, launches stubbed"
    print(f"Host µs per triton_partials call ({where}), median of 7 interleaved batches")
    print("| tensors | uncached | cached, new pointers | cached, same pointers |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} ({r['tensors']}) | {r['uncached_us']:.0f} | {r['new_pointers_us']:.0f} |"
            f" {r['same_pointers_us']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
