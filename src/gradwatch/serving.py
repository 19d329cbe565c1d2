"""The /metrics HTTP server: serves real scrapers while other clients misbehave.

One thread per connection, one request per connection (``Connection: close``), and limits that
hold whatever a client does:

* the request head (TLS handshake included) must arrive within ``head_timeout`` seconds in
  total, not per byte: a slowloris connection is dropped at its deadline;
* a response must be written within ``write_timeout`` seconds in total, in the connection's own
  thread: a client that never reads holds only its own thread, never the accept loop;
* at most ``max_connections`` are open; past that the oldest idle one (reading its head or
  writing its response, not computing) is dropped for the new one;
* a request line without an HTTP version (HTTP/0.9), bytes that are not HTTP, an oversized head
  or a malformed header are answered at once (400, 414, 431, 505) and the connection closed;
* connection errors (failed TLS handshakes, deadlines, resets, malformed requests) never print a
  traceback: they are counted in ``gradwatch_errors_total{stage="http"}`` and summarised in at
  most one log line a minute.

The exposition itself is bounded in CPU time by :class:`ScrapeBudget`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable
from email.utils import formatdate
from socketserver import BaseRequestHandler, ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIServer

from prometheus_client.exposition import choose_encoder, gzip_accepted

log = logging.getLogger("gradwatch")

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class _Reject(Exception):
    """A request answered with an error status at once (and counted)."""

    def __init__(self, status: str, why: str) -> None:
        super().__init__(why)
        self.status = status


class _Drop(Exception):
    """A connection closed without an answer (and counted)."""


class _Conn:
    __slots__ = ("sock", "state", "since", "deadline", "dropped")

    def __init__(self, sock, state: str, since: float, deadline: float) -> None:
        self.sock, self.state, self.since, self.deadline = sock, state, since, deadline
        self.dropped = ""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's default backlog of 5 resets bursts of scrapers
    head_timeout = 5.0  # seconds for the TLS handshake and the whole request head
    write_timeout = 10.0  # seconds to write the whole response
    max_connections = 256  # past this, the oldest idle connection is dropped
    max_head_bytes = 16384
    max_line_bytes = 8192
    log_every = 60.0  # seconds between two summary lines of connection errors
    errors = None  # the session's ErrorLog: set by the exporter
    budget: ScrapeBudget | None = None  # the CPU budget of all serving: set by the exporter

    def __init__(self, *args, **kwargs) -> None:
        self._conns: dict[object, _Conn] = {}
        self._conns_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._last_log = -float("inf")
        self._unlogged = 0
        self.cpu_seconds = 0.0
        self.max_connection_cpu = 0.0  # the dearest connection's thread CPU seconds
        self.http_errors = 0  # connection errors of this server (the ErrorLog counts them too)
        super().__init__(*args, **kwargs)

    # ---- connection table: the accept thread registers, the reaper enforces deadlines ----
    def process_request(self, request, client_address) -> None:
        cpu = time.thread_time()
        try:
            self._process_request(request, client_address)
        finally:
            cost = time.thread_time() - cpu  # the accept loop's share of this connection
            self.cpu_seconds += cost
            if self.budget is not None:
                self.budget.charge(cost)

    def _process_request(self, request, client_address) -> None:
        now = time.monotonic()
        victim = None
        with self._conns_lock:
            live = [c for c in self._conns.values() if not c.dropped]
            if len(live) >= self.max_connections:
                idle = [c for c in live if c.state in ("head", "write")]
                if idle:
                    victim = min(idle, key=lambda c: c.since)
                    victim.dropped = "dropped for a new connection (connection cap)"
            # Connections waiting for the CPU budget or computing a response are not dropped
            # (they wait for the server, not the other way round); when none is idle, a new
            # connection is refused.
            refuse = victim is None and len(live) >= self.max_connections
            if not refuse:
                self._conns[request] = _Conn(request, "queued", now, now + self.head_timeout)
        if victim is not None:
            self._kill(victim.sock)
        if refuse:
            self.note_error(_Drop("refused: connection cap reached and no connection is idle"))
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def conn(self, request) -> _Conn | None:
        with self._conns_lock:
            return self._conns.get(request)

    def enter(self, request, state: str, timeout: float | None) -> None:
        with self._conns_lock:
            c = self._conns.get(request)
            if c is not None:
                c.state, c.since = state, time.monotonic()
                c.deadline = c.since + timeout if timeout is not None else float("inf")

    def service_actions(self) -> None:
        """Every poll interval of serve_forever: drop the connections past their deadline."""
        super().service_actions()
        now, late = time.monotonic(), []
        with self._conns_lock:
            for c in self._conns.values():
                if not c.dropped and now > c.deadline:
                    c.dropped = f"deadline of its {c.state} passed"
                    late.append(c.sock)
        for sock in late:
            self._kill(sock)

    @staticmethod
    def _kill(sock) -> None:
        # shutdown() wakes the connection's thread out of recv/send; that thread closes it.
        # socket.socket's own shutdown: SSLSocket.shutdown would unset the TLS object under it.
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def shutdown_request(self, request) -> None:
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Close the listener and drop the connections not yet answered; responses under way
        finish (within their write deadline, which their own thread enforces)."""
        super().server_close()
        with self._conns_lock:
            pending = [c for c in self._conns.values() if c.state in ("queued", "head")]
            for c in pending:
                c.dropped = "server closed"
        for c in pending:
            self._kill(c.sock)

    # ---- errors: counted, summarised, never a traceback ----
    def handle_error(self, request, client_address) -> None:
        self.note_error(sys.exc_info()[1] or RuntimeError("unknown connection error"))

    def note_error(self, exc: BaseException) -> None:
        if self.errors is not None:
            try:
                self.errors.record("http", exc, logged=True)
            except Exception:  # noqa: BLE001
                pass
        now = time.monotonic()
        with self._log_lock:
            self.http_errors += 1
            self._unlogged += 1
            if now - self._last_log < self.log_every:
                return
            n, self._unlogged, self._last_log = self._unlogged, 0, now
        log.warning(
            "gradwatch: %d /metrics connection error(s) since the last such line (latest: %s);"
            ' counted in gradwatch_errors_total{stage="http"}, training goes on',
            n,
            _describe(exc),
        )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]


class _QuietHandler(BaseRequestHandler):
    """One request of one connection, under the server's deadlines; never logs a request."""

    server: _Server

    def handle(self) -> None:
        server, cpu = self.server, time.thread_time()
        try:
            self._handle()
        finally:
            cost = time.thread_time() - cpu
            server.cpu_seconds += cost
            server.max_connection_cpu = max(server.max_connection_cpu, cost)
            if server.budget is not None:
                server.budget.charge(cost)

    def _handle(self) -> None:
        server, sock = self.server, self.request
        conn = server.conn(sock)
        deadline = conn.deadline if conn is not None else time.monotonic() + server.head_timeout
        try:
            if server.budget is not None and not server.budget.admit(
                deadline, lambda: bool(conn is not None and conn.dropped)
            ):
                raise _Drop("waited for the CPU budget past the head deadline")
            server.enter(sock, "head", deadline - time.monotonic())
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.do_handshake()
            try:
                method, target, version, headers = self._read_head(deadline)
            except _Reject as reject:
                self._respond(
                    reject.status,
                    [("Content-Type", "text/plain")],
                    [f"gradwatch: {reject}\n".encode()],
                    head=False,
                )
                raise
            environ = self._environ(method, target, version, headers)
            server.enter(sock, "app", None)
            captured: dict = {}

            def start_response(status, response_headers, exc_info=None):
                captured["status"], captured["headers"] = status, response_headers

            result = server.get_app()(environ, start_response)
            try:
                body = [bytes(b) for b in result]
            finally:
                if hasattr(result, "close"):
                    result.close()
            self._respond(captured["status"], captured["headers"], body, method == "HEAD")
        except Exception as exc:  # noqa: BLE001 - a client's misbehaviour is counted, not raised
            dropped = conn.dropped if conn is not None else ""
            if dropped:
                exc = _Drop(f"{dropped}: {_describe(exc)}")
            elif isinstance(exc, TimeoutError):
                exc = _Drop(f"deadline passed: {_describe(exc)}")
            if not isinstance(exc, _Quiet):
                server.note_error(exc)

    # ---- reading ----
    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Drop("request head deadline passed")
        self.request.settimeout(remaining)
        return self.request.recv(4096)

    def _read_head(self, deadline: float):
        server, buf = self.server, bytearray()
        line_end = -1
        while True:
            chunk = self._recv(deadline)
            if not chunk:
                if not buf:
                    raise _Quiet("closed before sending anything")  # a port probe: not an error
                raise _Drop("connection closed in the middle of the request head")
            scan_from = max(len(buf) - 3, 0)
            buf += chunk
            if line_end < 0:
                self._check_method(buf)
                line_end = buf.find(b"\n")
                if line_end < 0:
                    if len(buf) > server.max_line_bytes:
                        raise _Reject("414 URI Too Long", "request line too long")
                    continue
                line = bytes(buf[:line_end]).rstrip(b"\r")
                if len(line) > server.max_line_bytes:
                    raise _Reject("414 URI Too Long", "request line too long")
                method, target, version = self._request_line(line)
            end = _head_end(buf, max(scan_from, line_end - 1))
            if end >= 0:
                break
            if len(buf) > server.max_head_bytes:
                raise _Reject("431 Request Header Fields Too Large", "request head too large")
        headers = []
        for raw in bytes(buf[line_end + 1 : end]).rstrip(b"\r\n").split(b"\n"):
            raw = raw.rstrip(b"\r")
            if not raw:
                continue
            name, sep, val = raw.partition(b":")
            if not sep or not name or not set(name) <= _TOKEN:
                raise _Reject("400 Bad Request", "malformed header line")
            headers.append((name.decode("ascii"), val.strip().decode("iso-8859-1")))
        return method, target, version, headers

    @staticmethod
    def _check_method(buf: bytearray) -> None:
        """Bytes that cannot start an HTTP request (TLS, binary) are answered at once."""
        space, newline = buf.find(b" "), buf.find(b"\n")
        if newline >= 0 and (space < 0 or newline < space):
            raise _Reject("400 Bad Request", "malformed request line")
        method = buf if space < 0 else buf[:space]
        if not method or len(method) > 32 or not set(method) <= _TOKEN:
            raise _Reject("400 Bad Request", "not an HTTP request")

    @staticmethod
    def _request_line(line: bytes) -> tuple[str, str, str]:
        parts = line.split(b" ")
        if len(parts) == 2:
            raise _Reject("505 HTTP Version Not Supported", "HTTP/0.9 request")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _Reject("400 Bad Request", "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            if version.startswith(b"HTTP/"):
                raise _Reject("505 HTTP Version Not Supported", "unsupported HTTP version")
            raise _Reject("400 Bad Request", "malformed request line")
        try:
            return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")
        except UnicodeDecodeError:
            raise _Reject("400 Bad Request", "non-ASCII request line") from None

    def _environ(self, method: str, target: str, version: str, headers) -> dict:
        env = dict(self.server.base_environ)
        path, _, query = target.partition("?")
        env.update(
            REQUEST_METHOD=method,
            PATH_INFO=urllib.parse.unquote(path, "iso-8859-1"),
            QUERY_STRING=query,
            SERVER_PROTOCOL=version,
            REMOTE_ADDR=str(self.client_address[0]) if self.client_address else "",
            CONTENT_LENGTH="",
            CONTENT_TYPE="",
        )
        env.pop("REMOTE_HOST", None)
        for name, val in headers:
            key = name.upper().replace("-", "_")
            if key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
                env[key] = val
                continue
            key = "HTTP_" + key
            env[key] = f"{env[key]},{val}" if key in env else val
        env.update(
            {
                "wsgi.version": (1, 0),
                "wsgi.url_scheme": "https" if isinstance(self.request, ssl.SSLSocket) else "http",
                "wsgi.input": _EmptyInput(),
                "wsgi.errors": _NullErrors(),
                "wsgi.multithread": True,
                "wsgi.multiprocess": False,
                "wsgi.run_once": False,
            }
        )
        return env

    # ---- writing ----
    def _respond(self, status: str, headers: list, body: list[bytes], head: bool) -> None:
        server, sock = self.server, self.request
        length = sum(len(b) for b in body)
        lines = [f"HTTP/1.1 {status}", f"Date: {_date()}", "Server: gradwatch"]
        lines += [
            f"{k}: {v}" for k, v in headers if k.lower() not in ("content-length", "connection")
        ]
        lines += [f"Content-Length: {length}", "Connection: close", "", ""]
        data = [("\r\n".join(lines)).encode("iso-8859-1")] + ([] if head else body)
        server.enter(sock, "write", server.write_timeout)
        deadline = time.monotonic() + server.write_timeout
        gather = not isinstance(sock, ssl.SSLSocket)  # sendmsg: head and body in one call
        views = [memoryview(chunk) for chunk in data if chunk]
        while views:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Drop("response write deadline passed")
            sock.settimeout(remaining)
            sent = sock.sendmsg(views) if gather else sock.send(views[0][:262144])
            while sent and views:
                n = min(sent, len(views[0]))
                sent -= n
                views[0] = views[0][n:]
                if not views[0]:
                    views.pop(0)


_dates: dict[int, str] = {}


def _date() -> str:
    """The Date header, formatted once a second."""
    now = int(time.time())
    text = _dates.get(now)
    if text is None:
        text = formatdate(now, usegmt=True)
        _dates.clear()
        _dates[now] = text
    return text


class _Quiet(Exception):
    """Closed without counting (a connection that sent nothing and closed)."""


def _head_end(buf: bytearray, start: int) -> int:
    """Index just after the blank line ending the head, -1 while incomplete."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep, start)) >= 0]
    return min(ends, default=-1)


class _EmptyInput:
    def read(self, *args) -> bytes:
        return b""

    def readline(self, *args) -> bytes:
        return b""

    def readlines(self, *args) -> list:
        return []

    def __iter__(self):
        return iter(())


class _NullErrors:
    def write(self, s) -> None:
        pass

    def writelines(self, lines) -> None:
        pass

    def flush(self) -> None:
        pass


class ScrapeBudget:
    """Bounds the CPU time the /metrics server takes from the process, whoever connects.

    A token bucket of CPU seconds, filled at ``cpu_share`` CPU seconds per wall second up to
    ``burst``. Everything the server does for a connection is charged to it, measured with
    ``time.thread_time()``: accepting it, the TLS handshake, reading and answering the request,
    the exposition (OTel collection, text encoding, gzip). A connection starts only when the
    bucket is not in debt, in arrival order (:meth:`admit`, in the connection's own thread, never
    in the accept loop); so a back-to-back scraper, or a swarm of them, cannot take more than
    ``cpu_share`` of a core (the GIL included) on average, and a real scraper waits behind at most
    the connections that arrived before it.

    An exposition is served from the cache (the latest of the request's shape: content type,
    gzip, ``name[]`` filter) while other connections wait for the bucket and it is under
    ``max_stale`` seconds old; otherwise it is computed afresh, once the bucket holds its cost
    (that of the last exposition; waiting at most ``max_stale``). A normal scraper therefore
    always gets a fresh one; under a flood they are at most about ``max_stale`` plus one
    exposition's repayment old. One exposition is computed at a time; a request that waited for
    one begun after it arrived gets that one."""

    def __init__(
        self,
        cpu_share: float = 0.1,
        burst: float = 0.5,
        max_stale: float = 1.0,
        shapes: int = 16,
    ) -> None:
        self.cpu_share = cpu_share
        self.burst = burst
        self.max_stale = max_stale
        self.shapes = shapes
        self._lock = threading.Lock()  # one exposition at a time
        self._bucket = threading.Lock()
        self._queue: deque[threading.Event] = deque()
        self._tokens = burst
        self._filled = time.monotonic()
        self._cost = 0.0  # CPU seconds of the last fresh exposition
        self._cache: OrderedDict[tuple, tuple[float, str, list, bytes]] = OrderedDict()
        self.fresh = 0  # expositions computed
        self.cached = 0  # requests answered with a cached exposition
        self.stale = 0  # ... of them, with one begun before they arrived (the budget's choice)
        self.cpu_seconds = 0.0  # thread CPU time of all expositions
        self.charged = 0.0  # CPU seconds charged in all (connections, expositions included)
        self.waited = 0  # connections that had to wait for the bucket

    # ---- the bucket ----
    def _refill(self) -> float:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._filled) * self.cpu_share)
        self._filled = now
        return self._tokens

    def tokens(self) -> float:
        with self._bucket:
            return self._refill()

    def _waiting_hit(self, key: tuple, arrived: float) -> tuple | None:
        """The cached exposition of this shape if other connections wait and it is fresh
        enough (counted as served), else None."""
        with self._bucket:
            cached = self._cache.get(key)
            if cached is None or not self._queue or arrived - cached[0] >= self.max_stale:
                return None
            self.cached += 1
            self.stale += 1
            return cached

    def queued(self) -> bool:
        """Connections are waiting for the bucket."""
        with self._bucket:
            return bool(self._queue)

    def afford(self, cost: float, limit: float) -> None:
        """Wait (at most ``limit`` seconds) until the bucket holds ``cost``."""
        end = time.monotonic() + limit
        while True:
            with self._bucket:
                missing = cost - self._refill()
            now = time.monotonic()
            if missing <= 0 or now >= end:
                return
            time.sleep(min(missing / self.cpu_share, end - now))

    def charge(self, seconds: float) -> None:
        with self._bucket:
            self._tokens -= seconds
            self.charged += seconds

    def admit(self, deadline: float, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Wait, in arrival order, until the bucket is not in debt; False at ``deadline`` or once
        ``cancelled()`` (the connection was dropped meanwhile)."""
        me = threading.Event()
        with self._bucket:
            if not self._queue and self._refill() > 0:
                return True
            self._queue.append(me)
            self.waited += 1
        try:
            while True:
                with self._bucket:
                    tokens = self._refill()
                    first = self._queue[0] is me
                    if first and tokens > 0:
                        return True
                now = time.monotonic()
                if now >= deadline or cancelled():
                    return False
                # The first waits for the tokens; the others sleep until it leaves (set), so a
                # long queue costs no CPU.
                wait = max(-tokens / self.cpu_share, 0.001) if first else deadline - now
                me.wait(min(wait, deadline - now))
                me.clear()
        finally:
            with self._bucket:
                self._queue.remove(me)
                if self._queue:
                    self._queue[0].set()

    # ---- expositions ----
    @staticmethod
    def shape(environ: dict) -> tuple:
        """What the response depends on besides the statistics (not the raw headers: a client
        must not defeat the cache by varying them)."""
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        return (
            choose_encoder(environ.get("HTTP_ACCEPT"))[1],
            gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")),
            tuple(sorted(set(names))) if names else None,
        )

    def serve(self, app: Callable, environ: dict, start_response: Callable) -> list[bytes]:
        if environ.get("REQUEST_METHOD") != "GET":
            return app(environ, start_response)  # OPTIONS, 405: no exposition
        key, arrived = self.shape(environ), time.monotonic()
        cached = self._waiting_hit(key, arrived)  # without the exposition lock: the fast path
        if cached is None:
            with self._lock:
                now = time.monotonic()
                cached = self._cache.get(key)
                if cached is not None and (
                    cached[0] >= arrived or (now - cached[0] < self.max_stale and self.queued())
                ):
                    with self._bucket:
                        self._cache.move_to_end(key)
                    self.cached += 1
                    self.stale += cached[0] < arrived
                else:
                    if not self.queued():
                        # Pay before computing: alone, a scraper waits the exposition's cost /
                        # share (the cost of the last one; at most max_stale), then gets a
                        # fresh one. With others waiting, the debt is repaid by their wait.
                        self.afford(self._cost, self.max_stale)
                    cached = self._compute(app, environ, key, time.monotonic())
        _, status, headers, body = cached
        start_response(status, headers)
        return [body]

    def _compute(self, app: Callable, environ: dict, key: tuple, began: float) -> tuple:
        captured: dict = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers

        cpu = time.thread_time()
        try:
            body = b"".join(app(environ, capture))
        finally:
            self._cost = time.thread_time() - cpu
            self.cpu_seconds += self._cost
        self.fresh += 1
        cached = (began, captured["status"], captured["headers"], body)
        with self._bucket:  # _waiting_hit reads the cache under this lock only
            self._cache[key] = cached
            self._cache.move_to_end(key)
            while len(self._cache) > self.shapes:  # bounded: shapes are the client's choice
                self._cache.popitem(last=False)
        return cached


def metrics_only(
    app: Callable, on_error: Callable[[BaseException], None], budget: ScrapeBudget | None = None
) -> Callable:
    """WSGI wrapper: `/metrics` and `/healthz` only, 404 for anything else; a failing scrape is
    answered 500 and reported to ``on_error``, never propagated."""

    def wrapped(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                if budget is not None:
                    return budget.serve(app, environ, start_response)
                return app(environ, start_response)
            except Exception as exc:  # noqa: BLE001
                on_error(exc)
                start_response(
                    "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
                )
                return [b"gradwatch: scrape failed (logged and counted)\n"]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: gradwatch serves /metrics\n"]

    return wrapped


def limits_markdown() -> str:
    """README's list of the serving limits, generated from the values the code uses."""
    import inspect

    budget = {k: v.default for k, v in inspect.signature(ScrapeBudget.__init__).parameters.items()}
    head, write = _Server.head_timeout, _Server.write_timeout
    lines = [
        f"- the request head, TLS handshake included, must arrive within **{head:g} s in all**"
        f" (not per byte: a slowloris connection is dropped at {head:g} s); a response must be"
        f" written within **{write:g} s in all**, in the connection's own thread, so a client"
        " that never reads holds only that thread;",
        f"- at most **{_Server.max_connections} connections**; past that the oldest idle one"
        " (reading its head or writing its response) is dropped for the new one;",
        f"- HTTP/0.9, bytes that are not HTTP, heads over {_Server.max_head_bytes // 1024} KiB"
        " and malformed headers are answered at once (505, 400, 414, 431) and closed;",
        f"- the server's CPU time is bounded: **{budget['cpu_share']:.0%} of a core** on average"
        f" (burst {budget['burst']:g} CPU s), measured per connection with `time.thread_time()`"
        " (accept, TLS, request, exposition, write). Connections start in arrival order while"
        f" the budget is not in debt (one still waiting at its {head:g} s head deadline is"
        " dropped); while others wait, the latest exposition (at most"
        f" {budget['max_stale']:g} s old) is served again instead of a new one. A lone scraper"
        " always gets a fresh exposition, after waiting for its cost when the budget is short.",
    ]
    return "\n".join(lines) + "\n"
