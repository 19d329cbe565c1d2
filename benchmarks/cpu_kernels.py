"""CPU partials kernels side by side: the native C kernel, the torch fallback and the floor.

Two gradient sets: ~25M fp32 elements in ~150 tensors (a 12-layer d=384 transformer's shapes)
and 4000 tiny tensors (1000 x Linear(16, 16) + LayerNorm(16)). Candidates, timed interleaved
round-robin so machine noise hits every one alike:

  (a) read floor     one plain read of every gradient (`t.sum()` per tensor)
  (b) get_total_norm torch.nn.utils.get_total_norm (total L2 norm only)
  (c) norm().item()  per-tensor `.norm().item()` loop
  (d) torch_partials the pure-torch fallback (all six partials, float64-exact)
  (e) native 1 thr   native_partials with torch.set_num_threads(1)
  (e) native N thr   native_partials with all torch threads (torch's OpenMP pool or pthreads)
  (f) native pyth.   the same C function driven by N Python threads (ctypes releases the GIL)

Run:  PYTHONPATH=src python benchmarks/cpu_kernels.py [--repeats 20] [--sweep] [--scaling]
Prints markdown tables (median and min ms after warmup; ratio of medians to (a); us per tensor).
On a shared or busy machine torch's and our threads both suffer: compare the min column too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gradwatch.kernels import COLUMNS, DTYPE_CODES, N_PARTIALS, cpu_native
from gradwatch.kernels.torch_fallback import torch_partials


def transformer_grads(layers: int = 12, d: int = 384, vocab: int = 8192, ctx: int = 512):
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln1, qkv, out proj
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln2, mlp
    shapes += [(d,), (d,)]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) * 1e-3 for s in shapes]


def tiny_grads() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = [(16, 16), (16,), (16,), (16,)]  # Linear weight, bias; LayerNorm weight, bias
    return [torch.randn(s, generator=g) for _ in range(1000) for s in shapes]


def native_one_thread(ts: list[torch.Tensor]) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cpu_native.native_partials(ts)
    finally:
        torch.set_num_threads(before)


class PyThreads:
    """Alternative thread strategy: split the concatenated elements into N ranges in Python and
    let N Python threads call gw_partials (single-threaded) on them; combine in numpy."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pool = ThreadPoolExecutor(n)

    def __call__(self, ts: list[torch.Tensor]) -> torch.Tensor:
        fn = cpu_native._get_fn()
        counts = [t.numel() for t in ts]
        total = sum(counts)
        nt = max(1, min(self.n, total // cpu_native.MIN_ELEMENTS_PER_THREAD))
        # pieces: (tensor index, begin, end) per worker
        work: list[list[tuple[int, int, int]]] = [[] for _ in range(nt)]
        per = -(-total // nt)
        k, room = 0, per
        for i, c in enumerate(counts):
            if c == 0:
                work[k].append((i, 0, 0))
                continue
            b = 0
            while b < c:
                take = c - b if k == nt - 1 else min(c - b, room)
                work[k].append((i, b, b + take))
                b += take
                room -= take
                if room == 0 and k < nt - 1:
                    k, room = k + 1, per

        def run(pieces: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
            m = len(pieces)
            ptr = np.array(
                [ts[i].data_ptr() + b * ts[i].element_size() for i, b, _ in pieces], np.int64
            )
            cnt = np.array([e - b for _, b, e in pieces], np.int64)
            code = np.array([DTYPE_CODES[ts[i].dtype] for i, _, _ in pieces], np.int8)
            out = np.empty((m, N_PARTIALS))
            fn(m, ptr.ctypes.data, cnt.ctypes.data, code.ctypes.data, out.ctypes.data, 1, 1)
            return np.array([i for i, _, _ in pieces]), out

        res = list(self.pool.map(run, work))
        idx = np.concatenate([r[0] for r in res])
        rows = np.concatenate([r[1] for r in res])
        out = np.zeros((len(ts), N_PARTIALS))
        for c in COLUMNS:  # each column's contract combine
            op = np.add if c.combine == "sum" else np.maximum
            op.at(out[:, c.index], idx, rows[:, c.index])
        return torch.from_numpy(out)


def bench(cands: dict, repeats: int, stat: Callable = statistics.median) -> dict:
    for fn in cands.values():  # warmup (also builds / loads the native library)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(repeats):
        for k, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: stat(v) for k, v in times.items()}


def table(name: str, ts: list[torch.Tensor], repeats: int, nthreads: int) -> str:
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    pyth = PyThreads(nthreads)
    pool = "torch's OpenMP pool" if cpu_native._openmp else "pthreads"
    cands: dict[str, Callable[[], object]] = {
        "(a) read floor: t.sum() per tensor": lambda: [t.sum() for t in ts],
        "(b) torch.nn.utils.get_total_norm": lambda: torch.nn.utils.get_total_norm(ts),
        "(c) [t.norm().item() for t in ts]": lambda: [t.norm().item() for t in ts],
        "(d) torch_partials": lambda: torch_partials(ts),
        "(e) native_partials, 1 thread": lambda: native_one_thread(ts),
        f"(e) native_partials, {nthreads} threads ({pool})": lambda: cpu_native.native_partials(ts),
        f"(f) native via {nthreads} Python threads": lambda: pyth(ts),
    }
    runs = bench(cands, repeats, stat=lambda v: (statistics.median(v), min(v)))
    med = {k: v[0] for k, v in runs.items()}
    floor = med["(a) read floor: t.sum() per tensor"]
    lines = [
        f"### {name}: {len(ts)} tensors, {sum(t.numel() for t in ts) / 1e6:.2f}M fp32 elements",
        "",
        "| candidate | median ms | min ms | x read floor | us / tensor | GB/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, v in med.items():
        lines.append(
            f"| {k} | {v * 1e3:.3f} | {runs[k][1] * 1e3:.3f} | {v / floor:.2f} "
            f"| {v * 1e6 / len(ts):.2f} | {nbytes / v / 1e9:.1f} |"
        )
    pyth.pool.shutdown()
    return "\n".join(lines)


def sweep(repeats: int, nthreads: int) -> str:
    """One fp32 tensor of n elements, the C side forced to k threads (no per-thread minimum):
    where splitting starts to pay, to choose MIN_ELEMENTS_PER_THREAD."""
    fn = cpu_native._get_fn()
    ks = sorted({1 << i for i in range(nthreads.bit_length())} | {nthreads})
    kind = "OpenMP threads" if cpu_native._openmp else "pthreads"
    lines = [
        f"### thread threshold: one fp32 tensor, us with k {kind} (best in bold)",
        "",
        "| elements | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---:|" + "---:|" * len(ks),
    ]
    for n in (1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23):
        x = torch.randn(n)
        ptr = np.array([x.data_ptr()], np.int64)
        cnt = np.array([n], np.int64)
        code = np.zeros(1, np.int8)
        out = np.empty(6)
        args = (1, ptr.ctypes.data, cnt.ctypes.data, code.ctypes.data, out.ctypes.data)
        med = bench({k: lambda a=args, k=k: fn(*a, k, 1) for k in ks}, repeats * 3)
        best = min(med, key=med.get)
        cells = [f"**{v * 1e6:.0f}**" if k == best else f"{v * 1e6:.0f}" for k, v in med.items()]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling(repeats: int, nthreads: int) -> str:
    """Transformer-like set at 1, 2, 4, ... torch threads: the read floor vs native_partials."""
    ts = transformer_grads()
    before = torch.get_num_threads()
    counts = sorted(
        {1 << i for i in range(nthreads.bit_length()) if 1 << i <= nthreads} | {nthreads}
    )
    lines = [
        "### thread scaling, transformer-like set",
        "",
        "| threads | read floor ms | native_partials ms | x read floor |",
        "|---:|---:|---:|---:|",
    ]
    try:
        for k in counts:
            torch.set_num_threads(k)
            med = bench(
                {"a": lambda: [t.sum() for t in ts], "e": lambda: cpu_native.native_partials(ts)},
                repeats,
            )
            lines.append(
                f"| {k} | {med['a'] * 1e3:.3f} | {med['e'] * 1e3:.3f} | {med['e'] / med['a']:.2f} |"
            )
    finally:
        torch.set_num_threads(before)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also sweep the threading threshold")
    ap.add_argument("--scaling", action="store_true", help="also scale torch threads 1..N")
    args = ap.parse_args()
    if not cpu_native.native_available():
        raise SystemExit(f"native kernel unavailable: {cpu_native._failure}")
    nthreads = torch.get_num_threads()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, torch threads {nthreads}, "
        f"library {cpu_native._lib_path}\n"
    )
    print(table("Transformer-like", transformer_grads(), args.repeats, nthreads))
    print()
    print(table("Tiny", tiny_grads(), args.repeats, nthreads))
    if args.sweep:
        print()
        print(sweep(args.repeats, nthreads))
    if args.scaling:
        print()
        print(scaling(args.repeats, nthreads))


if __name__ == "__main__":
    main()
