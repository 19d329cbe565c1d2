"""Step time of a training loop while clients scrape /metrics as fast as they can.

Rounds of two phases of equal length in one run: no scrapers, then N concurrent scrapers
(threads of a separate process, so that only the server side runs in the training process); the
noise of a shared machine hits both alike. `--seconds` is the loaded time in all. Prints the
median step time of each phase, the change, and how the exposition CPU budget answered (fresh
expositions, cached ones, their CPU time).

Run:  python benchmarks/bench_scrapers.py [--seconds 10] [--scrapers 50] [--per-param] [--rounds 4]
      python benchmarks/bench_scrapers.py --scrapers 1 --per-param --params 500
        (one back-to-back scraper, 500 per-parameter series: the CPU-budget case)
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import gradwatch

SCRAPER = """
import sys, threading, time, urllib.request
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
count, errors = [0], [0]
def run():
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            count[0] += 1
        except Exception:
            errors[0] += 1
threads = [threading.Thread(target=run) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
print(count[0], errors[0])
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--scrapers", type=int, default=50)
    ap.add_argument("--per-param", action="store_true")
    ap.add_argument("--rounds", type=int, default=10, help="alternating quiet/loaded rounds")
    ap.add_argument("--cpu-share", type=float, default=None, help="override the CPU budget")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's own choice). On a 2-core machine use 1: with 2, any"
        " other busy process (the scrapers themselves) stalls torch's parallel regions",
    )
    ap.add_argument(
        "--params",
        type=int,
        default=0,
        help="instead of the 2.1M-parameter model: Linear(64, 64) layers with this many"
        " parameter tensors (weight and bias each)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.params:
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(args.params // 2)])
        x = torch.randn(64, 64)
    else:
        model = nn.Sequential(
            *[m for _ in range(8) for m in (nn.Linear(512, 512), nn.LayerNorm(512))]
        )
        x = torch.randn(64, 512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    handle = gradwatch.watch(model, opt, port=0, per_param=args.per_param)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()
        return time.perf_counter() - t0

    def phase(seconds: float) -> list[float]:
        times, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            times.append(step())
        return times

    phase(1.0)  # warm-up (the exporter starts at the first step)
    budget = handle.session.exporter.budget
    if args.cpu_share is not None:
        budget.cpu_share = args.cpu_share
    # Rounds of (quiet, loaded): the noise of a shared machine then hits both alike. One scraper
    # process for the whole run, stopped (SIGSTOP) in the quiet phases.
    each = args.seconds / args.rounds
    quiet: list[float] = []
    loaded: list[float] = []
    totals = dict(fresh=0, cached=0, waited=0, cpu_seconds=0.0, charged=0.0)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SCRAPER,
            str(handle.port),
            str(args.scrapers),
            str(3 * args.seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # the scrapers start
    try:
        for _ in range(args.rounds):
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.05)
            quiet += phase(each)
            proc.send_signal(signal.SIGCONT)
            # Steady state, as under scrapers that never pause: the quiet phase must not have
            # refilled the CPU budget for this one.
            with budget._bucket:
                budget._refill()
                budget._tokens = min(budget._tokens, 0.0)
            time.sleep(0.05)
            before = {k: getattr(budget, k) for k in totals}
            loaded += phase(each)
            for k in totals:
                totals[k] += getattr(budget, k) - before[k]
    finally:
        proc.kill()
        proc.wait(10)
    scrapes = totals["fresh"] + totals["cached"]
    size = len(
        __import__("urllib.request")
        .request.urlopen(f"http://127.0.0.1:{handle.port}/metrics")
        .read()
    )
    handle.close()
    base, med = statistics.median(quiet), statistics.median(loaded)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{n_params / 1e6:.1f}M params in {len(list(model.parameters()))} tensors,"
        f" {torch.get_num_threads()} torch threads, exposition {size} bytes,"
        f" per_param={args.per_param}, server CPU budget {budget.cpu_share:.0%} of a core"
        f" (burst {budget.burst} s), {args.rounds} rounds of {each:.1f} s quiet + {each:.1f} s"
        " loaded"
    )
    print("| phase | steps | median step ms | p90 step ms |")
    print("|---|---|---|---|")
    for label, times in (("no scrapers", quiet), (f"{args.scrapers} scrapers", loaded)):
        p90 = statistics.quantiles(times, n=10)[-1]
        print(
            f"| {label} | {len(times)} | {statistics.median(times) * 1e3:.2f} | {p90 * 1e3:.2f} |"
        )
    loaded_s = args.seconds
    print(
        f"\nstep time with {args.scrapers} scrapers: x{med / base:.2f}"
        f" ({100 * (med / base - 1):+.1f}%);"
        f" {scrapes} scrapes answered while loaded ({scrapes / loaded_s:.0f}/s)"
    )
    fresh, cpu = totals["fresh"], totals["cpu_seconds"]
    print(
        f"while loaded: {fresh} fresh expositions ({fresh / loaded_s:.1f}/s,"
        f" {1e3 * cpu / max(fresh, 1):.1f} ms CPU each, {100 * cpu / loaded_s:.1f}% of a core),"
        f" {totals['cached']} cached; {totals['waited']} connections waited for the CPU budget;"
        f" the server used {100 * totals['charged'] / loaded_s:.1f}% of a core in all"
    )


if __name__ == "__main__":
    main()
