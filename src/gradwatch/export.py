"""Export: catalog statistics as OpenTelemetry instruments, served on /metrics for Prometheus.

Every instrument is observable: its callback reads the latest published readout at scrape time.
A value that is not finite yields no sample, so a NaN step shows as counts and absent norms,
never as the previous step's norm (the OTel SDK would drop a NaN and keep the stale value of a
synchronous gauge). The HTTP server answers ``/metrics`` only; everything else is 404.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import make_server

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter, ObservableGauge
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from prometheus_client import CollectorRegistry, make_wsgi_app

from . import __version__, catalog
from .catalog import Statistic, Thresholds
from .config import Config, binds_all_interfaces, server_class, tls_context
from .records import ProcessView
from .serving import ScrapeBudget, _QuietHandler, _Server, metrics_only

log = logging.getLogger("gradwatch")

RANK_LABELS = ("rank", "local_rank", "world_size")

# Buckets of grad_l2_norm_per_step: 1, 2, 5 per decade from 1e-8 to 1e4 (explicit buckets: the
# Python Prometheus exporter cannot serve exponential histograms).
NORM_BUCKETS = tuple(
    float(f"{m}e{e}") for e in range(-8, 5) for m in (1, 2, 5) if float(f"{m}e{e}") <= 1e4
)

# The one histogram: every collected step's norm, recorded at scrapes (see record_norms).
(_HISTORY,) = [s for s in catalog.CATALOG if isinstance(s.source, catalog.FromStepHistory)]


def _finite(samples) -> list[tuple[dict[str, str], float]]:
    """A value that is not finite yields no sample (see the module docstring)."""
    return [(labels, float(v)) for labels, v in samples if v is not None and math.isfinite(v)]


class _PinningRegistry(CollectorRegistry):
    """Pins one snapshot of every watch before each collection, so that all the samples of a
    scrape belong to the same step (instrument callbacks run one after another)."""

    def __init__(self, pin: Callable[[], None], lock: threading.Lock) -> None:
        super().__init__(auto_describe=True)
        self._pin = pin
        self._collect_lock = lock

    def collect(self):
        with self._collect_lock:
            self._pin()
            yield from super().collect()

    def restricted_registry(self, names):
        """``/metrics?name[]=a&name[]=b``: the samples of these names only, filtered as
        prometheus_client's RestrictedRegistry does (families kept with their matching samples).
        Its own RestrictedRegistry finds nothing here: it looks names up in the table built at
        registration, when the OTel collector had produced no metric yet."""
        return _RestrictedRegistry(self, set(names))


class _RestrictedRegistry:
    def __init__(self, registry: CollectorRegistry, names: set[str]) -> None:
        self._registry, self._names = registry, names

    def collect(self):
        for metric in self._registry.collect():
            restricted = metric._restricted_metric(self._names)
            if restricted is not None:
                yield restricted


class _PinningPeriodicReader(PeriodicExportingMetricReader):
    """OTLP push: the same pinning as a scrape, under the same lock."""

    def __init__(self, exporter, pin: Callable[[], None], lock: threading.Lock, **kw) -> None:
        super().__init__(exporter, **kw)
        self._pin = pin
        self._pin_lock = lock

    def collect(self, timeout_millis: float = 10_000) -> None:
        with self._pin_lock:
            self._pin()
            super().collect(timeout_millis=timeout_millis)


def make_resource(config: Config) -> Resource:
    """Resource of this process: OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME are honoured
    (service.name defaults to "gradwatch"); rank, local_rank and world_size always come from
    the launcher's variables, never from a copy of OTEL_RESOURCE_ATTRIBUTES shared by ranks."""
    from_env = OTELResourceDetector().detect().attributes
    attrs: dict[str, str] = {}
    if not from_env.get("service.name"):
        attrs["service.name"] = "gradwatch"
    attrs.update(
        {
            "rank": str(config.rank),
            "local_rank": str(config.local_rank),
            "world_size": str(config.world_size),
        }
    )
    return Resource.create(attrs)


def otlp_reader(pin: Callable[[], None], lock: threading.Lock) -> PeriodicExportingMetricReader:
    """OTLP/HTTP push, configured by the standard OTEL_EXPORTER_OTLP_* variables and
    OTEL_METRIC_EXPORT_INTERVAL (read by the OpenTelemetry SDK itself)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:
        raise RuntimeError(
            "OTEL_METRICS_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http"
            " (pip install 'gradwatch[otlp]')"
        ) from exc
    return _PinningPeriodicReader(OTLPMetricExporter(), pin, lock)


class Exporter:
    """The OTel meter provider, its Prometheus reader and the HTTP endpoint of one process."""

    def __init__(self, session, config: Config) -> None:
        self.session = session
        self.config = config
        self.thresholds = Thresholds(config.vanishing_threshold, config.exploding_threshold)
        self._pinned: list = []
        lock = threading.Lock()
        self.registry = _PinningRegistry(self.pin, lock)
        self.pull = "prometheus" in config.exporters
        readers = []
        self.reader = PrometheusMetricReader(
            scope_info_enabled=False,
            resource_attribute_filter=lambda key: key in RANK_LABELS,
            registry=self.registry,
        )
        if self.pull:
            readers.append(self.reader)
        self.push = otlp_reader(self.pin, lock) if "otlp" in config.exporters else None
        if self.push is not None:
            readers.append(self.push)
        self.resource = make_resource(config)
        histograms = [s for s in catalog.CATALOG if s.instrument == "histogram"]
        views = [
            View(
                instrument_name=s.otel_name,
                aggregation=ExplicitBucketHistogramAggregation(NORM_BUCKETS, record_min_max=False),
            )
            for s in histograms
        ]
        self.provider = MeterProvider(
            resource=self.resource,
            metric_readers=readers,
            shutdown_on_exit=False,
            views=views,
        )  # our close() shuts it down
        meter = self.provider.get_meter("gradwatch", __version__)
        self._histograms = {
            s.prom_name: meter.create_histogram(
                s.otel_name, unit=s.unit, description=s.description(self.thresholds)
            )
            for s in histograms
        }
        for stat in catalog.CATALOG:
            if stat.scope == catalog.PARAM and not config.per_param_here:
                continue
            if stat.instrument == "histogram":
                continue
            kind = ObservableCounter if stat.instrument == "counter" else ObservableGauge
            factory = (
                meter.create_observable_counter
                if kind is ObservableCounter
                else meter.create_observable_gauge
            )
            factory(
                stat.otel_name,
                callbacks=[self._callback(stat)],
                unit=stat.unit,
                description=stat.description(self.thresholds),
            )
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self._restarts = 0
        self.budget = ScrapeBudget()

    # ---- values ----
    def pin(self) -> None:
        """Take the consistent per-watch snapshots the next callbacks read."""
        try:
            self._pinned = [(w.index, w.snapshot(drain=True)) for w in self.session.watches()]
        except Exception as exc:  # noqa: BLE001
            self.session.errors.record("export", exc)
            self._pinned = []
        for index, snap in self._pinned:  # every step's norm since the last scrape
            self.record_norms(index, _HISTORY.source.norms(snap))

    def record_norms(self, index: str, norms) -> None:
        """Per-step norms of one optimizer into the histogram (at a scrape, or from the training
        thread when many steps pass without one)."""
        try:
            hist = self._histograms[_HISTORY.prom_name]
            attrs = {"optimizer": index}
            for v in norms:
                hist.record(v, attrs)
        except Exception as exc:  # noqa: BLE001
            self.session.errors.record("export", exc)

    def _callback(self, stat: Statistic) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            try:
                return [Observation(v, attrs) for attrs, v in self.values(stat)]
            except Exception as exc:  # noqa: BLE001 - a scrape must never break training
                self.session.errors.record("export", exc)
                return []

        return callback

    def values(self, stat: Statistic, pinned=None) -> list[tuple[dict[str, str], float]]:
        """The (labels, value) samples of one statistic from the pinned snapshots (those of the
        scrape in progress, or ``pinned``: [(optimizer index, WatchSnapshot)]), as its catalog
        entry's source computes them; values that are not finite are left out."""
        source = stat.source
        if isinstance(source, catalog.FromProcess):
            return _finite(source.read(self._process()))
        out = []
        for index, snap in self._pinned if pinned is None else pinned:
            samples = source.samples(stat, snap, self.thresholds, self.config.max_params)
            out += _finite(({"optimizer": index, **labels}, v) for labels, v in samples)
        return out

    def _process(self) -> ProcessView:
        errors = tuple(sorted(self.session.errors.counts.items()))
        return ProcessView(errors, tuple(sorted(self.session.backend_names())), __version__)

    # ---- endpoint ----
    def start_server(self, port: int | None = None) -> None:
        """Serve /metrics on ``port`` (default: the configured one; 0 picks a free port)."""
        if not self.pull:
            log.info(
                "gradwatch: OTEL_METRICS_EXPORTER=%s: no /metrics endpoint",
                ",".join(self.config.exporters) or "none",
            )
            return
        host = self.config.host
        port = self.config.serve_port if port is None else port
        if binds_all_interfaces(host):
            log.warning(
                "gradwatch: /metrics listens on all interfaces (%s:%d); anyone who can"
                " reach this host can read it",
                host,
                port,
            )
        app = metrics_only(
            make_wsgi_app(self.registry),
            lambda exc: self.session.errors.record("server", exc),
            self.budget,
        )
        server = make_server(host, port, app, server_class(_Server, host), _QuietHandler)
        server.errors = self.session.errors  # connection errors: counted, never a traceback
        server.budget = self.budget  # every connection's CPU time is charged to it
        scheme = "http"
        if self.config.tls_cert:
            try:
                # Handshake in the per-connection thread, not in the accept loop: a client that
                # connects and stays silent must not stall every other scrape.
                server.socket = self._tls_context().wrap_socket(
                    server.socket, server_side=True, do_handshake_on_connect=False
                )
            except BaseException:
                server.server_close()
                raise
            scheme = "https"
        self.server = server
        self.thread = threading.Thread(target=self._serve, name="gradwatch-http", daemon=True)
        self.thread.start()
        log.info("gradwatch: serving %s://%s:%d/metrics", scheme, host, self.port)

    def _tls_context(self) -> ssl.SSLContext:
        """TLS for /metrics; with a client CA, mutual TLS (clients must present a cert)."""
        return tls_context(self.config)  # the settings check's loader: never a passphrase prompt

    def _serve(self) -> None:
        server = self.server
        try:
            server.serve_forever()
        except Exception as exc:  # noqa: BLE001 - the endpoint dies, training goes on
            self.session.errors.record("server", exc)

    RESTARTS = 3

    def ensure_serving(self) -> None:
        """Called at collected steps: restart an endpoint whose thread died (a few times)."""
        if self.thread is None or self.thread.is_alive() or self._restarts >= self.RESTARTS:
            return
        self._restarts += 1
        self.session.errors.record(
            "server", RuntimeError("the /metrics thread stopped"), logged=True
        )
        log.warning(
            "gradwatch: the /metrics thread stopped; restarting it (%d of %d)",
            self._restarts,
            self.RESTARTS,
        )
        old, self.server = self.server, None
        port = old.server_address[1] if old is not None else None
        if old is not None:
            old.server_close()
        self.start_server(port)  # the same port: scrapers and file_sd targets stay valid

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else 0

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            if self.thread is not None and self.thread.is_alive():
                server.shutdown()
            server.server_close()
        self.thread = None
        try:
            self.provider.shutdown()
        except Exception:  # noqa: BLE001
            pass
