"""CPU cost of gradwatch's collection, side by side with the floor and the usual alternatives.

Two shapes: a ~25M-parameter transformer-like stack (few large tensors) and 1000 x
(Linear(16, 16) + LayerNorm(16)) (4000 small tensors). For each, in one process and interleaved
round-robin so that machine noise hits every method alike:

  read pass      one plain read of every gradient byte (`g.sum()` per tensor): the floor
  get_total_norm torch.nn.utils.get_total_norm (the total L2 norm only)
  norm().item()  a per-tensor `.norm().item()` Python loop (per-layer norms the usual way)
  gradwatch      gradwatch's full collection of the default statistic set (hook body)
  train step     forward + backward + AdamW step, without and with gradwatch every step

Run:  python benchmarks/bench_cpu.py [--repeats 15] [--backend auto|native|torch]
Prints a markdown table; copy it into benchmarks/RESULTS.md with the machine's description.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import gradwatch


def big_model() -> nn.Module:
    d, hidden, vocab = 768, 3072, 8000
    layers: list[nn.Module] = [nn.Embedding(vocab, d)]
    for _ in range(3):
        layers += [
            nn.Linear(d, d),
            nn.Linear(d, d),
            nn.Linear(d, d),
            nn.Linear(d, d),
            nn.LayerNorm(d),
            nn.Linear(d, hidden),
            nn.GELU(),
            nn.Linear(hidden, d),
            nn.LayerNorm(d),
        ]
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def small_model() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(1000):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16)]
    return nn.Sequential(*layers)


def inputs(model: nn.Module, batch: int) -> torch.Tensor:
    first = model[0]
    if isinstance(first, nn.Embedding):
        return torch.randint(0, first.num_embeddings, (batch,))
    return torch.randn(batch, 16)


def timed(fn, repeats: int) -> list[float]:
    return [fn() for _ in range(repeats)]


def bench_shape(name: str, model: nn.Module, batch: int, repeats: int, backend: str) -> list[str]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = inputs(model, batch)
    params = [p for p in model.parameters()]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()

    step()
    grads = [p.grad for p in params]
    n_elem = sum(g.numel() for g in grads)

    def clock(fn):
        def run() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return run

    def read_pass() -> None:
        for g in grads:
            g.sum()

    def total_norm() -> None:
        torch.nn.utils.get_total_norm(grads)

    def norm_item() -> None:
        for g in grads:
            g.norm().item()

    handle = gradwatch.watch(model, opt, port=0, backend=backend)
    step()  # builds the kernel, names, layout and exporter once
    watch = handle.session.watches()[0]

    def gradwatch_collect() -> None:
        watch._collect()

    methods = {
        "read pass": clock(read_pass),
        "get_total_norm": clock(total_norm),
        "norm().item() loop": clock(norm_item),
        "gradwatch collect": clock(gradwatch_collect),
    }
    results: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            results[k].append(fn())
    # training steps: interleave with and without gradwatch (the hook is removed and re-added)
    steps_on, steps_off = [], []
    handle.close()
    for _ in range(max(5, repeats // 2)):
        t0 = time.perf_counter()
        step()
        steps_off.append(time.perf_counter() - t0)
        h = gradwatch.watch(model, opt, port=0, backend=backend)
        step()  # warm (first step starts the endpoint)
        t0 = time.perf_counter()
        step()
        steps_on.append(time.perf_counter() - t0)
        h.close()
    backend_used = ",".join(sorted(watch.backend_names))
    floor = statistics.median(results["read pass"])
    step_off = statistics.median(steps_off)
    rows = [
        f"\n### {name}: {len(grads)} tensors, {n_elem / 1e6:.2f}M elements, batch {batch},"
        f" backend `{backend_used}`\n",
        "| method | median ms | x read pass | % of train step | µs per tensor |",
        "|---|---|---|---|---|",
    ]
    for k, v in results.items():
        med = statistics.median(v)
        rows.append(
            f"| {k} | {med * 1e3:.2f} | {med / floor:.2f} | {100 * med / step_off:.1f} |"
            f" {med * 1e6 / len(grads):.2f} |"
        )
    step_on = statistics.median(steps_on)
    rows.append(f"| train step, no telemetry | {step_off * 1e3:.1f} | | 100 | |")
    rows.append(
        f"| train step, gradwatch every step | {step_on * 1e3:.1f} | |"
        f" {100 * step_on / step_off:.1f} | |"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--only", choices=("big", "small"), default=None)
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    if args.only in (None, "big"):
        print("\n".join(bench_shape("~25M params", big_model(), 64, args.repeats, args.backend)))
    if args.only in (None, "small"):
        print(
            "\n".join(
                bench_shape(
                    "1000 x (Linear(16,16) + LayerNorm(16))",
                    small_model(),
                    64,
                    args.repeats,
                    args.backend,
                )
            )
        )


if __name__ == "__main__":
    main()
