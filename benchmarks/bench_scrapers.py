"""Step time of a training loop while 50 clients scrape /metrics as fast as they can.

Phases of equal length, one after another in one run: no scrapers, 50 concurrent scrapers
(threads of a separate process, so that only the server side runs in the training process), no
scrapers again. Prints the median step time of each phase and the change.

Run:  python benchmarks/bench_scrapers.py [--seconds 10] [--scrapers 50] [--per-param]
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(512, 512), nn.LayerNorm(512))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64, 512)
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

    phase(1.0)  # warm-up
    quiet1 = phase(args.seconds)
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRAPER, str(handle.port), str(args.scrapers), str(args.seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # let the scrapers ramp up
    loaded = phase(args.seconds - 0.5)
    scrapes, errors = proc.communicate(timeout=120)[0].split()
    quiet2 = phase(args.seconds)
    size = len(
        __import__("urllib.request")
        .request.urlopen(f"http://127.0.0.1:{handle.port}/metrics")
        .read()
    )
    handle.close()
    base = statistics.median(quiet1 + quiet2)
    med = statistics.median(loaded)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{n_params / 1e6:.1f}M params, {torch.get_num_threads()} torch threads, exposition"
        f" {size} bytes, per_param={args.per_param}"
    )
    print("| phase | steps | median step ms |")
    print("|---|---|---|")
    print(f"| no scrapers (before) | {len(quiet1)} | {statistics.median(quiet1) * 1e3:.2f} |")
    print(f"| {args.scrapers} concurrent scrapers | {len(loaded)} | {med * 1e3:.2f} |")
    print(f"| no scrapers (after) | {len(quiet2)} | {statistics.median(quiet2) * 1e3:.2f} |")
    print(
        f"\nstep time with {args.scrapers} scrapers: {100 * (med / base - 1):+.1f}%;"
        f" {int(scrapes)} scrapes served ({int(scrapes) / (args.seconds - 0.5):.0f}/s),"
        f" {int(errors)} failed"
    )


if __name__ == "__main__":
    main()
