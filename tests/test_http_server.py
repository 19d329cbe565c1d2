"""The /metrics server under misbehaving clients: deadlines, connection cap, no tracebacks,
malformed requests, the name[] filter and the CPU budget. Real sockets on 127.0.0.1, each test
bounded to a few seconds (deadlines are lowered on the server instance)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import urllib.request

import pytest
import torch
from prometheus_client import generate_latest
from torch import nn

import gradwatch
import util
from util import fetch, parse, value


@pytest.fixture
def served():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gradwatch.watch(model, opt, port=0)
    x = torch.randn(2, 4)

    def step():
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    step()
    handle.step = step
    try:
        yield handle
    finally:
        handle.close()


def _server(handle):
    return handle.session.exporter.server


def _http_errors(handle) -> int:
    return handle.session.errors.counts.get("http", 0)


def _wait_for(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server closed (EOF or reset) within ``timeout``; False if still open."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_slowloris_is_dropped_at_the_total_head_deadline(served):
    _server(served).head_timeout = 1.0
    before = _http_errors(served)
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        t0 = time.monotonic()
        closed = None
        for b in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.send(bytes([b]))  # a byte every 0.1 s: a per-byte timeout never fires
            except OSError:
                closed = time.monotonic() - t0
                break
            s.settimeout(0.1)
            try:
                if s.recv(65536) == b"":
                    closed = time.monotonic() - t0
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = time.monotonic() - t0
                break
            if time.monotonic() - t0 > 4:
                break
    assert closed is not None, "a slowloris connection was held for 4 s (deadline: 1 s)"
    assert 0.8 < closed < 2.5, closed
    _wait_for(lambda: _http_errors(served) == before + 1)
    assert "grad_l2_norm" in fetch(served.port, timeout=2)


def test_connection_cap_drops_the_oldest_idle_and_real_scrapes_stay_prompt(served):
    server = _server(served)
    server.max_connections = 16
    idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(16)]
    time.sleep(0.3)  # accepted, reading their (absent) heads
    never_read = []
    for _ in range(16):  # requests whose responses are never read
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(("127.0.0.1", served.port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        never_read.append(s)
    try:
        t0 = time.monotonic()
        assert "grad_l2_norm" in fetch(served.port, timeout=5)
        assert time.monotonic() - t0 < 1.0
        # the oldest idle connections made room for the newer ones
        assert _closed_by_server(idle[0], 2.0)
        assert not _closed_by_server(idle[-1], 0.2)  # ... the newest idle one is still open
        with server._conns_lock:
            assert sum(not c.dropped for c in server._conns.values()) <= 16
    finally:
        for s in idle + never_read:
            s.close()


def test_a_client_that_never_reads_is_dropped_at_the_write_deadline(served, monkeypatch):
    server = _server(served)
    server.write_timeout = 1.0
    accept = type(server).process_request

    def small_send_buffer(self, request, client_address):  # so that a 14 kB body blocks
        request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        accept(self, request, client_address)

    monkeypatch.setattr(type(server), "process_request", small_send_buffer)
    before = _http_errors(served)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(("127.0.0.1", served.port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        with server._conns_lock:
            assert [c.state for c in server._conns.values()] == ["write"]  # blocked writing
        t0 = time.monotonic()
        assert "grad_l2_norm" in fetch(served.port, timeout=5)  # others are served meanwhile
        assert time.monotonic() - t0 < 1.0
        _wait_for(lambda: _http_errors(served) == before + 1, timeout=3.0)
        assert time.monotonic() - t0 < 2.5
        with server._conns_lock:
            assert not server._conns


def test_http09_and_garbage_are_answered_at_once(served):
    for request, status in (
        (b"GET /metrics\r\n", b"505"),  # HTTP/0.9: no version, no headers to wait for
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"400"),  # a TLS hello
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    ):
        with socket.create_connection(("127.0.0.1", served.port)) as s:
            t0 = time.monotonic()
            s.sendall(request)
            s.settimeout(2)
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 " + status), (request, answer[:60])
            assert time.monotonic() - t0 < 1.0
    _wait_for(lambda: _http_errors(served) >= 3)  # counted after the answer went out


def test_name_filter_keeps_the_named_families_only(served):
    full = parse(fetch(served.port))
    text = fetch(served.port, "/metrics?name[]=grad_steps_total&name[]=grad_l2_norm")
    samples = parse(text)
    assert set(samples) == {"grad_steps_total", "grad_l2_norm"}, sorted(samples)
    assert samples["grad_l2_norm"] == full["grad_l2_norm"]
    assert value(samples, "grad_steps_total") == 1
    none = fetch(served.port, "/metrics?name[]=no_such_metric")
    assert none == ""  # as prometheus_client: nothing matches, empty exposition


def test_exposition_is_what_the_otel_reader_and_prometheus_client_produce(served):
    fetch(served.port)  # drains the norms since the last scrape
    exporter = served.session.exporter
    served_body = urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics", timeout=5)
    body = served_body.read()
    assert exporter.budget.fresh >= 2
    assert body == generate_latest(exporter.registry)


def test_cpu_budget_bounds_back_to_back_scrapers_and_serves_cached_bodies(served):
    exporter = served.session.exporter
    server, budget = exporter.server, exporter.budget
    budget.cpu_share, budget.burst = 0.02, 0.02
    with budget._bucket:
        budget._tokens = 0.02
    stop = threading.Event()
    answered = [0]

    def scraper():
        while not stop.is_set():
            try:
                fetch(served.port, timeout=5)
                answered[0] += 1
            except OSError:
                pass

    cpu0, fresh0, stale0 = server.cpu_seconds, budget.fresh, budget.stale
    threads = [threading.Thread(target=scraper) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while time.monotonic() < t0 + 1.5:  # training steps: every exposition would be new
        served.step()
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - t0
    # The server threads' own CPU time (measured apart from the bucket's bookkeeping): the
    # burst, the share of the elapsed time, and what may still be owed: connections are
    # charged when they end, so at most the three scrapers' last ones (a few ms each here;
    # more on a loaded machine). Without the budget: ~1 CPU s in these 1.5 s.
    cpu = server.cpu_seconds - cpu0
    owed = 3 * server.max_connection_cpu + 0.01
    assert cpu <= 0.02 + 0.02 * elapsed + owed, (cpu, elapsed, owed)
    # ... because the latest exposition was served again to waiting scrapers
    assert answered[0] >= 3 and budget.stale - stale0 >= 1, (answered, budget.stale)
    assert budget.fresh - fresh0 < answered[0]
    # Alone again, a scraper waits for the exposition's cost and gets a fresh one.
    budget.cpu_share = 1.0
    samples = parse(fetch(served.port, timeout=5))
    assert value(samples, "grad_stats_step") == served.session.watches()[0].collected_steps


# ---- no tracebacks for client misbehaviour --------------------------------------------------
@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    return util.self_signed(tmp_path_factory.mktemp("selfsigned"), "localhost")


def test_no_traceback_for_plain_http_to_tls_missing_client_cert_or_idle(self_signed, capfd, caplog):
    cert, key = self_signed
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = gradwatch.watch(
        model, opt, port=0, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(cert)
    )
    try:
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        server = _server(handle)
        server.head_timeout = 0.5
        with caplog.at_level(logging.WARNING, logger="gradwatch"):
            for _ in range(10):  # plain HTTP to the TLS port
                with pytest.raises(OSError):
                    fetch(handle.port, timeout=2)
            ctx = ssl.create_default_context(cafile=str(cert))  # no client certificate
            for _ in range(3):
                with pytest.raises((OSError, ssl.SSLError)):
                    with ctx.wrap_socket(
                        socket.create_connection(("127.0.0.1", handle.port), timeout=2),
                        server_hostname="127.0.0.1",
                    ) as s:
                        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                        if not s.recv(100):
                            raise ConnectionResetError("closed")
            idle = [socket.create_connection(("127.0.0.1", handle.port)) for _ in range(3)]
            for s in idle:
                assert _closed_by_server(s, 2.5)
                s.close()
            _wait_for(lambda: _http_errors(handle) >= 16)
        errors = _http_errors(handle)
    finally:
        handle.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[:2000]
    assert errors >= 16, errors
    lines = [r for r in caplog.records if "connection error" in r.getMessage()]
    assert len(lines) == 1 and not lines[0].exc_info, [r.getMessage() for r in lines]
