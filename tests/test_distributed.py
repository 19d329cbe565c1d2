"""Distributed training on the CPU: 2 ranks under torchrun with gloo (DDP and FSDP2), discovery
with a real Prometheus (file_sd), OTLP push, resource attributes and the per-rank series budget.

Each rank's script (tests/scripts/train_dist.py) computes float64 references from the full
gradients (DTensor.full_tensor() under FSDP2) and writes them as JSON; both ranks' endpoints are
scraped over HTTP and compared with them.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import gradwatch
from gradwatch import catalog
from gradwatch.config import from_env
from gradwatch.export import make_resource
from reference import reference_stats
from util import (
    IN_CI,
    assert_global_stats,
    fetch,
    free_port,
    free_port_pair,
    parse,
    require_tool,
    value,
)

SCRIPT = str(Path(__file__).parent / "scripts" / "train_dist.py")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH", "OTEL_"))}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


class TorchRun:
    """torchrun --nproc_per_node=2 train_dist.py; ranks write OUT/rank<r>.<phase>.json."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.out = tmp
        self.base = free_port_pair()
        self.log = tmp / "torchrun.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node=2", SCRIPT]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=_env(OUT=str(tmp), GRADWATCH_PORT=str(self.base), **env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def refs(self, phase: str, timeout: float = 60.0) -> list[dict]:
        paths = [self.out / f"rank{r}.{phase}.json" for r in (0, 1)]
        deadline = time.monotonic() + timeout
        while not all(p.exists() for p in paths):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ranks did not reach {phase}:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)
        return [json.loads(p.read_text()) for p in paths]

    def scrape(self) -> list[dict]:
        return [parse(fetch(self.base + r)) for r in (0, 1)]

    def touch(self, name: str) -> None:
        (self.out / name).write_text("")

    def close(self) -> None:
        self.touch("done")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    run = TorchRun(
        tmp,
        MODE="ddp",
        GRADWATCH_FILE_SD=str(tmp / "sd" / "gradwatch.json"),
        OTEL_SERVICE_NAME="trainer",
        OTEL_RESOURCE_ATTRIBUTES="team=vision,rank=99",
    )
    try:
        refs = run.refs("phase1")
        yield run, refs, run.scrape()
    finally:
        run.close()
    assert run.proc.returncode == 0, run.log.read_text()[-4000:]


def test_ddp_every_rank_equals_the_float64_reference(ddp):
    run, refs, scrapes = ddp
    for r in (0, 1):
        assert_global_stats(scrapes[r], refs[r], rel=1e-12, extra=("grad_zero_ratio",))
        assert refs[r]["get_total_norm"] == pytest.approx(refs[r]["grad_l2_norm"], rel=1e-12)
        assert refs[r]["placements"] == ["plain"] * 6
    # after DDP's all-reduce the gradients, hence the statistics, agree across ranks
    assert refs[0]["grad_l2_norm"] == refs[1]["grad_l2_norm"]
    assert value(scrapes[0], "grad_l2_norm") == value(scrapes[1], "grad_l2_norm")


def test_rank_labels_and_otel_resource_variables(ddp):
    _, _, scrapes = ddp
    for r in (0, 1):
        for series in scrapes[r]["grad_l2_norm"]:
            labels = dict(series)
            assert (labels["rank"], labels["local_rank"], labels["world_size"]) == (
                str(r),
                str(r),
                "2",
            )
        (info,) = scrapes[r]["target_info"]
        info = dict(info)
        assert info["service_name"] == "trainer" and info["team"] == "vision"
        assert info["rank"] == str(r)  # the launcher's rank wins over OTEL_RESOURCE_ATTRIBUTES


def test_make_resource_merges_otel_variables(monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=nlp,service.name=from-attrs,rank=7")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    attrs = make_resource(from_env({"RANK": "3", "WORLD_SIZE": "4"})).attributes
    assert attrs["service.name"] == "from-attrs" and attrs["team"] == "nlp"
    assert (attrs["rank"], attrs["world_size"], attrs["local_rank"]) == ("3", "4", "0")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trainer")
    assert make_resource(from_env({})).attributes["service.name"] == "trainer"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    assert make_resource(from_env({})).attributes["service.name"] == "gradwatch"


def test_file_sd_lists_every_rank_and_prometheus_scrapes_both(ddp, tmp_path):
    run, _, _ = ddp
    sd = run.out / "sd" / "gradwatch.json"
    targets = json.loads(sd.read_text())
    assert [t["targets"] for t in targets] == [
        [f"127.0.0.1:{run.base}"],
        [f"127.0.0.1:{run.base + 1}"],
    ]
    assert [t["labels"]["rank"] for t in targets] == ["0", "1"]
    assert all(t["labels"]["world_size"] == "2" for t in targets)

    prometheus = require_tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "gradwatch",
                        "honor_labels": True,
                        "file_sd_configs": [{"files": [str(sd)], "refresh_interval": "1s"}],
                    }
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with open(log, "w") as f:
        prom = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        query = urllib.parse.quote('grad_l2_norm{job="gradwatch"}')
        deadline, result = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{port}/api/v1/query?query={query}"
                with urllib.request.urlopen(url, timeout=2) as r:
                    result = json.load(r)["data"]["result"]
                if len(result) == 2:
                    break
            except OSError:
                pass
            assert prom.poll() is None, log.read_text()
            time.sleep(0.3)
        assert len(result) == 2, (result, log.read_text()[-2000:])
        by_rank = {s["metric"]["rank"]: s for s in result}
        assert set(by_rank) == {"0", "1"}
        for r, s in by_rank.items():
            assert s["metric"]["instance"] == f"127.0.0.1:{run.base + int(r)}"
            assert "exported_rank" not in s["metric"]
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(timeout=10)


def test_fsdp2_global_statistics_exact_and_nan_traced_to_its_rank(tmp_path):
    run = TorchRun(tmp_path, MODE="fsdp2", NAN_STEP="1")
    try:
        refs = run.refs("phase1")
        scrapes = run.scrape()
        # mixed placements: Shard(0) params and HSDP (Replicate, Shard(0)) ones
        assert "(Replicate(), Shard(dim=0))" in refs[0]["placements"]
        assert "(Shard(dim=0),)" in refs[0]["placements"]
        for r in (0, 1):
            ref = refs[r]
            assert_global_stats(scrapes[r], ref, rel=1e-12, extra=("grad_zero_ratio",))
            # the total norm torch computes on the full gradients
            assert value(scrapes[r], "grad_l2_norm") == pytest.approx(
                ref["get_total_norm"], rel=1e-6
            )
            # every element once: full parameter sizes, replicated head counted once, no padding
            assert value(scrapes[r], "grad_elements") == 7 * 5 + 7 + 3 * 7 + 3 + 3 * 3 + 3
            for kind in ("nan", "inf"):
                assert value(scrapes[r], "grad_rank_nonfinite_elements", kind=kind) == 0
        assert value(scrapes[0], "grad_l2_norm") == value(scrapes[1], "grad_l2_norm")

        run.touch("go")  # rank 1 writes one NaN into its own shard
        refs = run.refs("phase2")
        deadline = time.monotonic() + 20
        while True:
            scrapes = run.scrape()
            if all(value(s, "grad_stats_step") == 4 for s in scrapes):
                break
            assert time.monotonic() < deadline, "step 4 never published"
            time.sleep(0.1)
        for r in (0, 1):
            assert_global_stats(scrapes[r], refs[r], rel=1e-12, extra=("grad_zero_ratio",))
            assert value(scrapes[r], "grad_nonfinite_elements", kind="nan") == 1
            assert value(scrapes[r], "grad_l2_norm") is None
        assert value(scrapes[0], "grad_rank_nonfinite_elements", kind="nan") == 0
        assert value(scrapes[1], "grad_rank_nonfinite_elements", kind="nan") == 1
    finally:
        run.close()
    assert run.proc.returncode == 0, run.log.read_text()[-4000:]


# ---- the per-rank budget at scale ----
def _series(text: str) -> int:
    return sum(len(v) for v in parse(text).values())


def test_default_scrape_stays_small_and_per_param_only_on_chosen_ranks():
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(40)])  # 80 tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, port=0, backend="torch") as h:
        model(torch.ones(2, 16)).sum().backward()
        opt.step()
        text = fetch(h.port)
    assert "grad_param_" not in text
    assert _series(text) <= 100, _series(text)
    assert len(text.encode()) <= 20_000, len(text.encode())
    # per-param series: GRADWATCH_PER_PARAM_RANKS (default 0) decides which ranks export them
    for rank, ranks, expected in [(1, (0,), False), (0, (0,), True), (5, (3, 5), True)]:
        with gradwatch.watch(
            model, opt, port=0, per_param=True, rank=rank, per_param_ranks=ranks
        ) as h:
            opt.step()
            text = fetch(h.port)
        assert ("grad_param_l2_norm" in text) == expected, (rank, ranks)


# ---- OTLP push ----
def prometheus_name_from_otlp(metric) -> str:
    """Prometheus's OTLP translation (also the Collector's), without UTF-8 names: sanitize and
    lower-case the name, add the unit suffix (curly-brace annotations dropped, s -> seconds,
    1 -> ratio for gauges), then _total for monotonic sums; no suffix is added twice."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", metric.name).lower()
    kind = metric.WhichOneof("data")
    unit = re.sub(r"\{[^}]*\}", "", metric.unit)
    suffix = {"s": "seconds", "By": "bytes", "%": "percent"}.get(unit, unit)
    if unit == "1":
        suffix = "ratio" if kind == "gauge" else ""
    if suffix and not name.endswith("_" + suffix):
        name += "_" + suffix
    if kind == "sum" and metric.sum.is_monotonic and not name.endswith("_total"):
        name += "_total"
    return name


class _Receiver(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        req = ExportMetricsServiceRequest()
        req.ParseFromString(body)
        type(self).requests.append((self.path, req))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_otlp_push_names_equal_the_pull_names(monkeypatch):
    try:
        import opentelemetry.exporter.otlp.proto.http.metric_exporter  # noqa: F401
        import opentelemetry.proto  # noqa: F401
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"OTLP packages missing: {exc}")
        pytest.skip(f"OTLP packages missing: {exc}")
    _Receiver.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    for k in list(os.environ):
        if k.startswith(("GRADWATCH", "OTEL_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pusher")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with gradwatch.watch(model, opt, port=0, per_param=True, backend="torch") as h:
            model(torch.ones(1, 3)).sum().backward()
            want = reference_stats([p.grad for p in model.parameters()])
            opt.step()
            assert h.port == 0  # otlp alone: no pull endpoint
            deadline = time.monotonic() + 10
            while not _Receiver.requests and time.monotonic() < deadline:
                time.sleep(0.05)
        # close() flushes a final export
    finally:
        server.shutdown()
        server.server_close()
    assert _Receiver.requests, "nothing pushed"
    path, req = _Receiver.requests[-1]
    assert path == "/v1/metrics"
    (rm,) = req.resource_metrics
    res = {a.key: a.value.string_value for a in rm.resource.attributes}
    assert res["service.name"] == "pusher" and res["rank"] == "0"
    metrics = {m.name: m for sm in rm.scope_metrics for m in sm.metrics}
    by_otel = {s.otel_name: s for s in catalog.CATALOG}
    for name, m in metrics.items():  # Prometheus' OTLP translation gives exactly the pull name
        assert prometheus_name_from_otlp(m) == by_otel[name].prom_name, name
    # Every statistic is pushed, except the training-health signals of loop features this
    # loop does not use (clipping, GradScaler, NaN incidents: see tests/test_signals.py).
    pushed = {by_otel[n].prom_name for n in metrics}
    expected = {s.prom_name for s in catalog.CATALOG if s.scope != catalog.TRAINING}
    assert expected <= pushed
    assert pushed - expected <= {s.prom_name for s in catalog.CATALOG}
    (point,) = metrics["grad.l2_norm"].gauge.data_points
    assert point.as_double == pytest.approx(want["grad_l2_norm"], rel=1e-12)
    assert math.isfinite(point.as_double)
