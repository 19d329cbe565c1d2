"""Latency of real scrapes while other clients abuse /metrics: gradwatch's server against
prometheus_client's own ``start_http_server``, same registry, same run.

Scenarios (each against each server in turn; the abusers run in a separate process, the real
scraper in another, so that neither takes the server process's GIL):

* ``flood``: N threads fetching /metrics back to back;
* ``slowloris``: N connections sending their request head one byte every 2 s;
* ``noread``: N connections that send a request and never read the response (receive buffer of
  4 KiB, so that the server's writes block), reconnecting when closed.

The real scraper fetches /metrics every 0.3 s (``--interval``; timeout 30 s) and reports p50/max
latency and failures. The exposition is gradwatch's default statistic set of a small model, or with
``--params N --per-param`` the per-parameter series of N parameter tensors.

Run:  python benchmarks/bench_http_abuse.py [--clients 200] [--scrapes 12]
      python benchmarks/bench_http_abuse.py --params 500 --per-param
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import torch
from prometheus_client import start_http_server
from torch import nn

import gradwatch

ABUSER = r"""
import socket, sys, threading, time, urllib.request
mode, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
REQ = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n"
def flood():
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
        except Exception:
            time.sleep(0.01)
def slowloris():
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            for b in REQ[:-2] + b"X-Slow: " + b"a" * 1000:
                s.send(bytes([b]))
                time.sleep(2)
        except Exception:
            time.sleep(0.1)
def noread():
    while True:
        try:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(REQ)
            while s.recv(1, socket.MSG_PEEK) :
                time.sleep(1)  # never read: only notice when the server closes
            s.close()
        except Exception:
            time.sleep(0.1)
target = {"flood": flood, "slowloris": slowloris, "noread": noread}[mode]
for _ in range(n):
    threading.Thread(target=target, daemon=True).start()
print("ready", flush=True)
time.sleep(3600)
"""

PROBER = r"""
import json, sys, time, urllib.request
port, k, interval = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
out = []
for _ in range(k):
    t0 = time.monotonic()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
        out.append(time.monotonic() - t0)
    except Exception as exc:
        out.append(None)
    time.sleep(interval)
print(json.dumps(out))
"""


baseline_threads = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario(
    mode: str, port: int, clients: int, scrapes: int, interval: float
) -> list[float | None]:
    abuser = subprocess.Popen(
        [sys.executable, "-c", ABUSER, mode, str(port), str(clients)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        abuser.stdout.readline()
        time.sleep(1.5 if mode == "flood" else 3.0)  # let the abuse build up
        out = subprocess.run(
            [sys.executable, "-c", PROBER, str(port), str(scrapes), str(interval)],
            capture_output=True,
            text=True,
            timeout=60 + (31 + interval) * scrapes,
        )
        return json.loads(out.stdout)
    finally:
        abuser.kill()
        abuser.wait(10)
        # Both servers share the registry (and its collection lock): wait until the threads
        # that still work for the killed abuser are gone, so that they do not delay the next
        # scenario (prometheus_client's may compute queued expositions for many seconds).
        end = time.monotonic() + 120
        while threading.active_count() > baseline_threads + 2 and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--scrapes", type=int, default=12)
    ap.add_argument("--params", type=int, default=8)
    ap.add_argument("--per-param", action="store_true")
    ap.add_argument("--modes", default="flood,slowloris,noread")
    ap.add_argument("--interval", type=float, default=0.3, help="seconds between real scrapes")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(max(args.params // 2, 1))])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    handle = gradwatch.watch(model, opt, port=0, per_param=args.per_param)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
    exporter = handle.session.exporter
    theirs = free_port()
    httpd, _ = start_http_server(theirs, addr="127.0.0.1", registry=exporter.registry)
    ours = handle.port
    global baseline_threads
    baseline_threads = threading.active_count()
    size = len(
        __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{ours}/metrics").read()
    )
    print(
        f"exposition {size} bytes; {args.clients} abusing clients; {args.scrapes} real scrapes"
        f" per scenario, {args.interval} s apart, timeout 30 s"
    )
    print("| scenario | server | p50 s | max s | failed |")
    print("|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for label, port in (("gradwatch", ours), ("prometheus_client", theirs)):
            lat = scenario(mode, port, args.clients, args.scrapes, args.interval)
            ok = [x for x in lat if x is not None]
            p50 = f"{statistics.median(ok):.3f}" if ok else "-"
            mx = f"{max(ok):.3f}" if ok else "-"
            print(f"| {mode} | {label} | {p50} | {mx} | {len(lat) - len(ok)} |", flush=True)
    errors = exporter.session.errors.counts.get("http", 0)
    budget = exporter.budget
    print(
        f"\ngradwatch: {errors} connection errors counted (stage=http); {budget.fresh} fresh"
        f" expositions, {budget.cached} cached, {budget.waited} connections waited for the CPU"
        f" budget, {budget.charged:.2f} CPU s charged"
    )
    httpd.shutdown()
    handle.close()


if __name__ == "__main__":
    main()
