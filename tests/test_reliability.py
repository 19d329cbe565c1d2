"""Telemetry that never hurts the run: same results, faults contained, bounded, safe to expose."""

from __future__ import annotations

import gc
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.catalog import FromPartials
from util import assert_promtool_clean, fetch, free_port, openssl, parse, require_tool, value


def assert_port_free(port: int) -> None:
    """No listener is left (SO_REUSEADDR, as servers use: TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


# ---- 1. never changes training ----------------------------------------------------------------
def _train(seed: int, watch: bool, *, scaler: bool, fused: bool, clip: bool, accumulate: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    gs = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
    # every signal on: per-param, groups, update sampling every step, noise scale when accumulating
    signals = dict(
        per_param=True,
        groups={"a": "1."},
        update_every=1,
        micro_batch_size=16 if accumulate > 1 else None,
    )
    handle = gradwatch.watch(model, opt, port=0, **signals) if watch else None
    try:
        for step in range(12):
            for _ in range(accumulate):
                tokens = torch.randint(0, 30, (16,))
                loss = model(tokens).pow(2).mean() * (1e30 if step == 5 and scaler else 1.0)
                (gs.scale(loss) if gs else loss).backward()
            if clip:
                if gs:
                    gs.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            if gs:
                gs.step(opt)
                gs.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=step % 2 == 0)
    finally:
        if handle:
            handle.close()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "scaler,fused,clip,accumulate",
    [
        (False, False, False, 1),
        (False, False, True, 3),
        (True, False, True, 2),
        (True, True, False, 1),
    ],
)
def test_training_result_is_bitwise_identical(scaler, fused, clip, accumulate):
    kw = dict(scaler=scaler, fused=fused, clip=clip, accumulate=accumulate)
    without = _train(0, False, **kw)
    with_ = _train(0, True, **kw)
    for a, b in zip(without, with_, strict=True):
        assert torch.equal(a, b)


# ---- 2. never stops a run ---------------------------------------------------------------------
def _small_run(steps: int = 5, **settings):
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gradwatch.watch(model, opt, port=0, **settings)
    x = torch.randn(2, 4)

    def step():
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    for _ in range(steps):
        step()
    return handle, step


def _warnings(caplog, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_fault_in_reduction_is_logged_once_and_counted(monkeypatch, caplog):
    import gradwatch.kernels.dispatch as dispatch

    def boom(tensors):
        raise RuntimeError("injected reduction fault")

    monkeypatch.setattr(
        "gradwatch.collector.select_backend",
        lambda device, preference: dispatch.Backend("boom", boom),
    )
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        handle, step = _small_run(7, update_every=0)  # only the gradient reduction runs
        samples = parse(fetch(handle.port))
        handle.close()
    assert value(samples, "gradwatch_errors_total", stage="collect") == 7
    assert value(samples, "grad_l2_norm") is None  # nothing was published
    assert _warnings(caplog, "injected reduction fault") == 1


def test_fault_in_otel_callback_scrape_still_serves_the_rest(monkeypatch, caplog):
    def boom(self, *a, **k):
        raise ValueError("injected callback fault")

    handle, step = _small_run(2)
    monkeypatch.setattr(FromPartials, "samples", boom)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        samples = parse(fetch(handle.port))
        step()
        samples = parse(fetch(handle.port))
    handle.close()
    assert value(samples, "grad_stats_step") == 3  # gauges without the faulty path still served
    assert value(samples, "gradwatch_errors_total", stage="export") >= 2
    assert _warnings(caplog, "injected callback fault") == 1


def test_fault_in_http_serving_answers_500_and_counts(monkeypatch):
    handle, step = _small_run(1)
    exporter = handle.session.exporter
    monkeypatch.setattr(
        exporter.registry,
        "collect",
        lambda: (_ for _ in ()).throw(OSError("injected scrape fault")),
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(handle.port)
    assert info.value.code == 500
    monkeypatch.undo()
    step()
    samples = parse(fetch(handle.port))
    handle.close()
    assert value(samples, "gradwatch_errors_total", stage="server") == 1


def test_dead_endpoint_thread_is_restarted_on_the_same_port(caplog):
    handle, step = _small_run(1)
    exporter = handle.session.exporter
    port = handle.port
    exporter.server.shutdown()  # the serving thread ends, as if it had died
    exporter.thread.join(5)
    assert not exporter.thread.is_alive()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        step()
    assert handle.port == port
    samples = parse(fetch(port))
    handle.close()
    assert value(samples, "gradwatch_errors_total", stage="server") == 1
    assert _warnings(caplog, "restarting") == 1


def test_scrapes_during_shutdown_never_reach_training():
    handle, step = _small_run(2)
    port = handle.port
    stop = threading.Event()
    results = {"ok": 0, "refused": 0, "other": []}

    def scraper():
        while not stop.is_set():
            try:
                fetch(port, timeout=2)
                results["ok"] += 1
            except (urllib.error.URLError, ConnectionError, OSError):
                results["refused"] += 1
            except Exception as exc:  # noqa: BLE001
                results["other"].append(exc)

    threads = [threading.Thread(target=scraper) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    handle.close()
    closed_in = time.monotonic() - t0
    step()  # training goes on after close, with no hook left
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(10)
    assert closed_in < 5 and results["ok"] > 0 and not results["other"]
    assert_port_free(port)


# ---- 3. bounded resources ---------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_memory_and_threads_flat_over_10000_steps():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    with gradwatch.watch(model, opt, port=0, per_param=True) as handle:

        def steps(n):
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                model(x).sum().backward()
                opt.step()

        steps(1000)
        fetch(handle.port)
        gc.collect()
        rss0, threads0 = _rss_bytes(), threading.active_count()
        for _ in range(9):
            steps(1000)
            fetch(handle.port)
        gc.collect()
        rss1 = _rss_bytes()
        # the last scrape's connection thread may still be closing: a leak would stay
        deadline = time.monotonic() + 5
        while threading.active_count() > threads0 and time.monotonic() < deadline:
            time.sleep(0.01)
        threads1 = threading.enumerate()
        samples = parse(fetch(handle.port))
    assert value(samples, "grad_steps_total") == 10000
    assert len(threads1) == threads0, [t.name for t in threads1]
    assert rss1 - rss0 < 8 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"


def test_fifty_concurrent_scrapers_training_goes_on():
    handle, step = _small_run(1)
    port = handle.port
    stop = threading.Event()
    scrapes, failures = [0], []

    def scraper():
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not stop.is_set():
            try:
                fetch(port, timeout=10)
                scrapes[0] += 1
            except Exception as exc:  # noqa: BLE001
                failures.append(exc)

    threads = [threading.Thread(target=scraper) for _ in range(50)]
    for t in threads:
        t.start()
    steps = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        step()
        steps += 1
    for t in threads:
        t.join(30)
    samples = parse(fetch(port))
    handle.close()
    assert steps > 100 and scrapes[0] > 50 and not failures, (steps, scrapes, failures[:3])
    assert value(samples, "gradwatch_errors_total", stage="server") == 0
    assert value(samples, "grad_stats_step") == steps + 1


# ---- 4. bad input: hostile parameter names ------------------------------------------------------
def test_parameter_names_with_quotes_backslashes_newlines_and_unicode():
    names = ['we"ird', "back\\slash", "new\nline", "ünïcödé_名前", "{brace}=x,y"]
    model = nn.Module()
    for i, n in enumerate(names):
        model.register_parameter(n, nn.Parameter(torch.full((3,), float(i + 1))))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, port=0, per_param=True) as h:
        for p in model.parameters():
            p.grad = p.detach().clone()
        opt.step()
        text = fetch(h.port)
    samples = parse(text)
    for i, n in enumerate(names):
        assert value(samples, "grad_param_abs_max", param=n) == i + 1
    assert_promtool_clean(text)


# ---- 5. exposure ------------------------------------------------------------------------------
def test_only_metrics_and_health_are_served():
    handle, _ = _small_run(1)
    try:
        assert fetch(handle.port, "/healthz") == "ok\n"
        for path in ("/", "/metrics/", "/debug", "/../etc/passwd", "/metrics?x=1#"):
            if path.startswith("/metrics?"):
                continue
            with pytest.raises(urllib.error.HTTPError) as info:
                fetch(handle.port, path)
            assert info.value.code == 404, path
    finally:
        handle.close()


def test_default_bind_is_loopback_and_all_interfaces_warns(caplog):
    handle, _ = _small_run(1)
    assert handle.session.exporter.server.server_address[0] == "127.0.0.1"
    handle.close()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        handle, _ = _small_run(1, host="0.0.0.0")
        handle.close()
    assert _warnings(caplog, "all interfaces") == 1


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


def _https(port, certs, client_cert: bool) -> str:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx, timeout=5) as r:
        return r.read().decode()


def test_tls_and_mutual_tls(certs):
    handle, _ = _small_run(1, tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    try:
        assert "grad_l2_norm" in _https(handle.port, certs, client_cert=False)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            fetch(handle.port, timeout=3)  # plain HTTP is not answered
        with socket.create_connection(("127.0.0.1", handle.port)):  # a silent client ...
            assert "grad_l2_norm" in _https(
                handle.port, certs, client_cert=False
            )  # ... blocks none
    finally:
        handle.close()
    handle, _ = _small_run(
        1,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )
    try:
        assert "grad_l2_norm" in _https(handle.port, certs, client_cert=True)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _https(handle.port, certs, client_cert=False)
    finally:
        handle.close()


def test_real_prometheus_scrapes_over_mutual_tls(certs, tmp_path):
    prometheus = require_tool("prometheus")
    handle, step = _small_run(
        1,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s}}
scrape_configs:
  - job_name: gradwatch-tls
    scheme: https
    tls_config:
      ca_file: {certs / "ca.pem"}
      cert_file: {certs / "client.pem"}
      key_file: {certs / "client.key"}
    static_configs: [{{targets: ["127.0.0.1:{handle.port}"]}}]
""")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, result = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            step()
            try:
                import json

                url = f"http://127.0.0.1:{prom_port}/api/v1/query?query=grad_stats_step"
                with urllib.request.urlopen(url, timeout=2) as r:
                    result = json.load(r)["data"]["result"]
                if result:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert result, "Prometheus never scraped gradwatch over mutual TLS"
        assert result[0]["metric"]["job"] == "gradwatch-tls"
    finally:
        proc.terminate()
        proc.wait(10)
        handle.close()


# ---- 6. lifecycle -----------------------------------------------------------------------------
def test_close_removes_hooks_stops_server_frees_port_and_watch_is_idempotent():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h1 = gradwatch.watch(model, opt, port=0)
    h2 = gradwatch.watch(model, opt, port=0)  # same optimizer again: the same session
    assert h1.session is h2.session
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    port = h1.port
    assert value(parse(fetch(port)), "grad_steps_total") == 1  # one hook, not two
    watch = h1.session.watches()[0]
    h1.close()
    h2.close()  # closing twice is harmless
    opt.step()
    assert watch.steps == 1  # hooks removed
    assert_port_free(port)
    import torch.amp.grad_scaler as gsm

    assert not hasattr(gsm.GradScaler.step, "_gradwatch_session")


def test_forked_child_never_exports():
    handle, step = _small_run(1)
    session = handle.session
    pid = os.fork()
    if pid == 0:  # child: like a DataLoader worker that (wrongly) steps the optimizer
        code = 0
        try:
            step()
            watch = session.watches()[0]
            code = 0 if watch.steps == 1 else 3
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    handle.close()
    assert os.WEXITSTATUS(status) == 0


def test_interpreter_exit_frees_the_port(tmp_path):
    port = free_port()
    code = (
        "import gradwatch, torch; m = torch.nn.Linear(2, 2);"
        "o = torch.optim.SGD(m.parameters(), lr=0.1);"
        f"h = gradwatch.watch(m, o, port={port}); m(torch.ones(1, 2)).sum().backward();"
        "o.step(); print(h.port)"
    )
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(port), out.stderr
    assert "Traceback" not in out.stderr
    assert_port_free(port)


def test_fault_in_readout_is_contained(monkeypatch, caplog):
    """Publishing a step's result (Readout) fails: counted, logged once, training goes on."""
    import gradwatch.collector as collector

    def boom(*a, **k):
        raise ArithmeticError("injected readout fault")

    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        handle, step = _small_run(1, update_every=0)
        monkeypatch.setattr(collector, "Readout", boom)
        for _ in range(4):
            step()
        monkeypatch.undo()
        step()
        samples = parse(fetch(handle.port))
        handle.close()
    # On the CPU the readout runs inside the collection (on CUDA: at the next poll, "readout").
    errors = sum(v for k, v in samples["gradwatch_errors_total"].items())
    assert errors == 4 and value(samples, "grad_stats_step") == 6
    assert _warnings(caplog, "injected readout fault") == 1


def test_labels_carry_only_names_and_statistics():
    allowed = {
        "rank",
        "local_rank",
        "world_size",
        "optimizer",
        "group",
        "param",
        "kind",
        "stage",
        "version",
        "backend",
        "param_group",
        "position",
        "le",
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, port=0, per_param=True, groups={"a": "0."}) as h:
        model(torch.ones(2, 3)).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        samples = parse(fetch(h.port))
    keys = {
        k
        for name, series in samples.items()
        if name != "target_info"
        for labels in series
        for k, _ in labels
    }
    assert keys <= allowed, keys - allowed
    # target_info: OpenTelemetry's resource (service and SDK identity, the rank labels) only
    resource = {k for labels in samples["target_info"] for k, _ in labels}
    assert resource <= {
        "service_name",
        "service_instance_id",
        "telemetry_sdk_language",
        "telemetry_sdk_name",
        "telemetry_sdk_version",
        "rank",
        "local_rank",
        "world_size",
    }, resource
    # values: numbers, names of parameters/groups/stages, the version and backend
    assert {dict(lb)["param"] for lb in samples["grad_param_l2_norm"]} == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    }
