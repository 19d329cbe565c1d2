"""CPU cost of gradwatch's collection, side by side with the floor and the usual alternatives.

Default run: what gradwatch adds to a training step, in one process, every variant interleaved
round-robin (the order rotated each round) so that machine noise hits every one alike:

  no telemetry    forward + backward + SGD step (batch 1), zero_grad(set_to_none=True)
  gradwatch       the same step with gradwatch watching it (default statistic set, every step)
  read pass       a step pre-hook doing one plain `g.sum()` per gradient (the floor)
  get_total_norm  a step pre-hook calling torch.nn.utils.get_total_norm (total L2 norm only)
  norm().item()   a step pre-hook doing `g.norm().item()` per gradient (per-layer norms)
  _foreach_norm   a step pre-hook calling torch._foreach_norm (per-tensor norms, no .item())

Each variant steps its own SGD optimizer over the same parameters (only gradwatch's is
watched); every hook lists the gradients from the optimizer's param groups, as gradwatch does.
"added" is the median over rounds of (variant step - no-telemetry step of the same round), wall
(perf_counter) and CPU (process_time: every thread of the process, spin-waits included); "read
passes" divides it by the median wall (resp. CPU) time of a plain read pass timed alone in the
same rounds (torch sums a large tensor on every thread: its CPU time can be ~2x its wall).
Shapes: a ~25M-parameter transformer-like stack (51 tensors) and 1000 x (Linear(16, 16) +
LayerNorm(16)) (4000 tensors). Then scaling: the added time of a bare SGD step over synthetic
gradients, by tensor count (100 .. 100k tensors of 64 elements) and by element count (16
tensors, 64K .. 64M elements).

  --isolated   the earlier table instead: the hook body alone (watch._collect) next to the
               alternatives called directly, and whole AdamW steps batch 64

Run:  python benchmarks/bench_cpu.py [--repeats 21] [--only big|small|scaling]
Prints markdown tables; copy them into benchmarks/RESULTS.md with the machine's description.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

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


def _grads_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]


def _alternatives() -> dict[str, Callable[[list[torch.Tensor]], object]]:
    return {
        "read pass (g.sum() per tensor)": lambda gs: [g.sum() for g in gs],
        "get_total_norm": lambda gs: torch.nn.utils.get_total_norm(gs),
        "norm().item() loop": lambda gs: [g.norm().item() for g in gs],
        "torch._foreach_norm": lambda gs: torch._foreach_norm(gs),
    }


def _added_table(
    title: str,
    params: list[torch.Tensor],
    step: Callable[[torch.optim.Optimizer], None],
    repeats: int,
    model: nn.Module | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Steps with each variant, interleaved: rows of added wall and CPU time per step, and
    {"read pass": seconds, variant: added wall seconds}."""

    def sgd() -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1e-12)

    variants: dict[str, torch.optim.Optimizer] = {"no telemetry": sgd(), "gradwatch": sgd()}
    for name, fn in _alternatives().items():
        opt = sgd()
        opt.register_step_pre_hook(lambda o, a, k, fn=fn: fn(_grads_of(o)) and None)
        variants[name] = opt
    handle = gradwatch.watch(model, variants["gradwatch"], port=0)
    watch = None
    try:
        for opt in variants.values():  # warm: first step starts the endpoint, builds the layout
            step(opt)
            step(opt)
        watch = handle.session.watches()[0]
        names = list(variants)
        wall: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        read_wall, read_cpu = [], []
        for r in range(repeats):
            grads = _grads_of(variants["no telemetry"])
            c0, t0 = time.process_time(), time.perf_counter()
            for g in grads:
                g.sum()
            read_wall.append(time.perf_counter() - t0)
            read_cpu.append(time.process_time() - c0)
            del grads
            for k in names[r % len(names) :] + names[: r % len(names)]:
                c0, t0 = time.process_time(), time.perf_counter()
                step(variants[k])
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    finally:
        handle.close()
    n_tensors = len(params)
    n_elem = sum(p.numel() for p in params)
    rp, rp_cpu = statistics.median(read_wall), statistics.median(read_cpu)
    base, base_cpu = statistics.median(wall["no telemetry"]), statistics.median(cpu["no telemetry"])
    backend = ",".join(sorted(watch.backend_names)) if watch is not None else "?"
    rows = [
        f"\n### {title}: {n_tensors} tensors, {n_elem / 1e6:.2f}M elements, backend `{backend}`\n",
        f"One read pass alone: {rp * 1e3:.2f} ms wall, {rp_cpu * 1e3:.2f} ms CPU. Step without"
        f" telemetry: {base * 1e3:.1f} ms wall, {base_cpu * 1e3:.1f} ms CPU. {repeats} rounds.\n",
        "| variant | added wall ms | added wall, read passes | added CPU ms |"
        " added CPU, read passes | added wall µs per tensor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    added = {"read pass": rp}
    for k in names[1:]:
        dw = statistics.median([a - b for a, b in zip(wall[k], wall["no telemetry"], strict=True)])
        dc = statistics.median([a - b for a, b in zip(cpu[k], cpu["no telemetry"], strict=True)])
        added[k] = dw
        rows.append(
            f"| {k} | {dw * 1e3:.2f} | {dw / rp:.2f} | {dc * 1e3:.2f} | {dc / rp_cpu:.2f} |"
            f" {dw * 1e6 / n_tensors:.2f} |"
        )
    return rows, added


def train_step_table(name: str, model: nn.Module, repeats: int) -> list[str]:
    torch.manual_seed(0)
    x = inputs(model, 1)

    def step(opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()

    title = f"{name}, SGD batch 1"
    return _added_table(title, list(model.parameters()), step, repeats, model)[0]


def _synthetic(counts: list[int]) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=g)) for n in counts]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def scaling_table(repeats: int) -> list[str]:
    """Added time of a bare SGD step (gradients set once, kept between steps) by shape."""
    out = [
        "\n### scaling: bare SGD step over synthetic fp32 gradients (kept between steps)\n",
        "| tensors | elements | read pass ms | gradwatch added ms | x read pass |"
        " µs per tensor | get_total_norm x read pass | _foreach_norm x read pass |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    shapes = [(n, 64) for n in (100, 1000, 10_000, 100_000)]
    shapes += [(16, e // 16) for e in (1 << 16, 1 << 20, 1 << 24, 1 << 26)]
    for n, per in shapes:
        params = _synthetic([per] * n)
        reps = max(5, repeats // 3) if n * per >= 1 << 24 or n >= 100_000 else repeats
        _, added = _added_table("", params, lambda opt: opt.step(), reps)
        rp, gw = added["read pass"], added["gradwatch"]
        out.append(
            f"| {n} | {n * per} | {rp * 1e3:.3f} | {gw * 1e3:.3f} | {gw / rp:.2f} |"
            f" {gw * 1e6 / n:.2f} | {added['get_total_norm'] / rp:.2f} |"
            f" {added['torch._foreach_norm'] / rp:.2f} |"
        )
        del params
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--backend", default="auto", help="--isolated only")
    ap.add_argument("--only", choices=("big", "small", "scaling"), default=None)
    ap.add_argument("--isolated", action="store_true", help="the earlier hook-body table")
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    if args.isolated:
        main_isolated(args)
        return
    if args.only in (None, "big"):
        print("\n".join(train_step_table("~25M params", big_model(), args.repeats)))
    if args.only in (None, "small"):
        print(
            "\n".join(
                train_step_table(
                    "1000 x (Linear(16,16) + LayerNorm(16))", small_model(), args.repeats
                )
            )
        )
    if args.only in (None, "scaling"):
        print("\n".join(scaling_table(args.repeats)))


def main_isolated(args: argparse.Namespace) -> None:
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
