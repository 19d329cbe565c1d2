"""Export: catalog statistics as OpenTelemetry instruments, served on /metrics for Prometheus.

Every instrument is observable: its callback reads the latest published readout at scrape time.
A value that is not finite yields no sample, so a NaN step shows as counts and absent norms,
never as the previous step's norm (the OTel SDK would drop a NaN and keep the stale value of a
synchronous gauge). The HTTP server answers ``/metrics`` only; everything else is 404.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter, ObservableGauge
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, make_wsgi_app

from . import __version__, catalog
from .catalog import Statistic, Thresholds
from .config import Config

log = logging.getLogger("gradwatch")

RANK_LABELS = ("rank", "local_rank", "world_size")

# Buckets of grad_l2_norm_per_step: 1, 2, 5 per decade from 1e-8 to 1e4 (explicit buckets: the
# Python Prometheus exporter cannot serve exponential histograms).
NORM_BUCKETS = tuple(
    float(f"{m}e{e}") for e in range(-8, 5) for m in (1, 2, 5) if float(f"{m}e{e}") <= 1e4
)

# Statistics of the sampled parameter update: (what, scope) of UpdateReadout.values().
_UPDATE_STATS = {
    "param_l2_norm": ("param", False),
    "update_l2_norm": ("update", False),
    "update_to_param_ratio": ("ratio", False),
    "param_group_l2_norm": ("param", True),
    "update_group_l2_norm": ("update", True),
    "update_group_to_param_ratio": ("ratio", True),
}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def metrics_only(app: Callable) -> Callable:
    """WSGI wrapper: serve `/metrics` (and `/`-less health at `/healthz`), 404 for anything else."""

    def wrapped(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return app(environ, start_response)
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: gradwatch serves /metrics\n"]

    return wrapped


class _PinningRegistry(CollectorRegistry):
    """Pins one snapshot of every watch before each collection, so that all the samples of a
    scrape belong to the same step (instrument callbacks run one after another)."""

    def __init__(self, pin: Callable[[], None]) -> None:
        super().__init__(auto_describe=True)
        self._pin = pin
        self._collect_lock = threading.Lock()

    def collect(self):
        with self._collect_lock:
            self._pin()
            yield from super().collect()


class Exporter:
    """The OTel meter provider, its Prometheus reader and the HTTP endpoint of one process."""

    def __init__(self, session, config: Config) -> None:
        self.session = session
        self.config = config
        self.thresholds = Thresholds(config.vanishing_threshold, config.exploding_threshold)
        self._pinned: list = []
        self.registry = _PinningRegistry(self.pin)
        self.reader = PrometheusMetricReader(
            scope_info_enabled=False,
            resource_attribute_filter=lambda key: key in RANK_LABELS,
            registry=self.registry,
        )
        resource = Resource.create(
            {
                "service.name": "gradwatch",
                "rank": str(config.rank),
                "local_rank": str(config.local_rank),
                "world_size": str(config.world_size),
            }
        )
        histograms = [s for s in catalog.CATALOG if s.instrument == "histogram"]
        views = [
            View(
                instrument_name=s.otel_name,
                aggregation=ExplicitBucketHistogramAggregation(NORM_BUCKETS, record_min_max=False),
            )
            for s in histograms
        ]
        self.provider = MeterProvider(
            resource=resource, metric_readers=[self.reader], shutdown_on_exit=False, views=views
        )  # our close() shuts it down
        meter = self.provider.get_meter("gradwatch", __version__)
        self._histograms = {
            s.prom_name: meter.create_histogram(
                s.otel_name, unit=s.unit, description=s.description(self.thresholds)
            )
            for s in histograms
        }
        for stat in catalog.CATALOG:
            if stat.scope == catalog.PARAM and not config.per_param:
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

    # ---- values ----
    def pin(self) -> None:
        """Take the consistent per-watch snapshots the next callbacks read."""
        try:
            self._pinned = [(w.index, w.snapshot(drain=True)) for w in self.session.watches()]
        except Exception as exc:  # noqa: BLE001
            self.session.errors.record("export", exc)
            self._pinned = []
        try:  # every step's norm since the previous scrape goes into the histogram
            hist = self._histograms.get("grad_l2_norm_per_step")
            for index, snap in self._pinned:
                attrs = {"optimizer": index}
                for v in snap.norms_since_last:
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

    def values(self, stat: Statistic) -> list[tuple[dict[str, str], float]]:
        """The (labels, value) samples of one statistic right now."""
        session = self.session
        name = stat.prom_name
        if stat.scope == catalog.SELF:
            if name == "gradwatch_errors_total":
                return [({"stage": k}, float(v)) for k, v in sorted(session.errors.counts.items())]
            if name == "gradwatch_info":
                backends = ",".join(sorted(session.backend_names())) or "none"
                return [({"version": __version__, "backend": backends}, 1.0)]
        out = []
        for index, snap in self._pinned:
            labels = {"optimizer": index}
            if name == "gradwatch_collect_seconds":
                v = snap.collect_seconds
            elif name == "gradwatch_dropped_steps_total":
                v = snap.dropped_steps
            elif name == "grad_steps_total":
                v = snap.collected_steps
            elif name == "grad_nonfinite_steps_total":
                v = snap.nonfinite_steps
            elif name == "amp_skipped_steps_total":
                v = snap.amp_skipped_steps
            elif name == "grad_clipped_steps_total":
                v = snap.clipped_steps
            elif name == "grad_l2_norm_max_since_last_scrape":
                v = snap.max_norm_since_last
            elif name in _UPDATE_STATS or name == "update_stats_step":
                out += self._update_values(name, labels, snap.update)
                continue
            elif name == "grad_nonfinite_param_info":
                if snap.last_nonfinite is not None:
                    out += self._training_values(name, labels, snap.last_nonfinite)
                continue
            elif stat.scope == catalog.TRAINING:
                if snap.readout is not None:
                    out += self._training_values(name, labels, snap.readout)
                continue
            else:
                readout = snap.readout
                if readout is None:
                    continue
                if name == "grad_stats_step":
                    v = readout.step
                else:
                    out += [
                        ({**labels, **a}, x)
                        for a, x in readout.observations(
                            stat, self.thresholds, self.config.max_params
                        )
                    ]
                    continue
            if v is not None and math.isfinite(v):
                out.append((labels, float(v)))
        return out

    @staticmethod
    def _training_values(name: str, labels: dict, readout) -> list[tuple[dict[str, str], float]]:
        ctx = readout.context
        if name == "grad_preclip_l2_norm":
            values = [(labels, ctx.get("preclip_norm", math.nan))]
        elif name == "grad_clip_coefficient_ratio":
            values = [(labels, readout.clip_coefficient)]
        elif name == "amp_loss_scale":
            values = [(labels, ctx.get("loss_scale", math.nan))]
        elif name == "optimizer_learning_rate":
            values = [
                ({**labels, "param_group": key[3:]}, v)
                for key, v in ctx.items()
                if key.startswith("lr:")
            ]
        elif name == "grad_nonfinite_param_info":
            values = [
                ({**labels, "param": p, "position": str(i)}, 1.0)
                for i, p in enumerate(readout.nonfinite_params)
            ]
        else:
            values = []
        return [(a, float(v)) for a, v in values if math.isfinite(v)]

    @staticmethod
    def _update_values(name: str, labels: dict, update) -> list[tuple[dict[str, str], float]]:
        if update is None:
            return []
        if name == "update_stats_step":
            return [(labels, float(update.step))]
        what, per_group = _UPDATE_STATS[name]
        if per_group:
            values = [
                ({**labels, "group": g}, update.values(what, rows))
                for g, rows in update.layout.group_rows.items()
            ]
        else:
            values = [(labels, update.values(what))]
        return [(a, float(v)) for a, v in values if math.isfinite(v)]

    # ---- endpoint ----
    def start_server(self) -> None:
        host, port = self.config.host, self.config.serve_port
        if host in ("0.0.0.0", "::", ""):
            log.warning(
                "gradwatch: /metrics listens on all interfaces (%s:%d); anyone who can"
                " reach this host can read it",
                host,
                port,
            )
        app = metrics_only(make_wsgi_app(self.registry))
        self.server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="gradwatch-http", daemon=True
        )
        self.thread.start()
        log.info("gradwatch: serving http://%s:%d/metrics", host, self.port)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else 0

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        try:
            self.provider.shutdown()
        except Exception:  # noqa: BLE001
            pass
