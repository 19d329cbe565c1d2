"""Collection: from an optimizer's gradients to a published :class:`Readout`.

At each collected optimizer step (the pre-step hook, so after any clipping the loop did) the
watch lists the gradients the optimizer is about to apply, runs the fused reduction once over
them (six float64 partials per tensor, see :mod:`gradwatch.kernels`) and publishes the result.

On the CPU the reduction runs inline and is published at once. On CUDA it runs on a side stream
that waits for the producing stream; the main stream waits (on the device, never the host) for
the reduction before it goes on, so no later in-place write or free of a gradient can race with
it; the small result is copied to pinned host memory and read a step later, or by a scrape, once
its event reports completion. If results are still in flight when the ring is full the sample is
dropped and counted: the training thread never waits for telemetry.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import catalog, distributed
from .catalog import Aggregate, Statistic, Thresholds
from .config import Config
from .kernels import INF, MAXABS, N_PARTIALS, NAN, SUMABS, SUMSQ, ZERO
from .kernels.dispatch import Backend, select_backend

log = logging.getLogger("gradwatch")

RING_SLOTS = 2  # results in flight per device before a new sample is dropped


@dataclass(frozen=True)
class Layout:
    """Which parameter each row of the partials belongs to, fixed while the set of grads is."""

    names: tuple[str, ...]
    groups: tuple[str, ...]  # group label of each row
    group_rows: dict[str, np.ndarray]

    @staticmethod
    def build(names: Sequence[str], groups: Sequence[str]) -> Layout:
        order = list(dict.fromkeys(groups))
        garr = np.array(groups, dtype=object)
        rows = {g: np.flatnonzero(garr == g) for g in order}
        return Layout(tuple(names), tuple(groups), rows)


class Readout:
    """Host-side partials of one collected step; statistics are computed lazily, once."""

    def __init__(
        self,
        step: int,
        layout: Layout,
        partials: np.ndarray,
        numel: np.ndarray,
        local: np.ndarray | None = None,
    ) -> None:
        self.step = step
        self.layout = layout
        self.partials = partials  # combined across ranks when distributed combining is on
        self.numel = numel
        self.local = partials if local is None else local  # this rank's own shards, uncombined

    def aggregate(self, rows: np.ndarray | slice = slice(None), local: bool = False) -> Aggregate:
        p = (self.local if local else self.partials)[rows]
        return Aggregate(
            sumsq=p[:, SUMSQ],
            sumabs=p[:, SUMABS],
            maxabs=p[:, MAXABS],
            nan=p[:, NAN],
            inf=p[:, INF],
            zero=p[:, ZERO],
            numel=self.numel[rows],
        )

    @functools.cached_property
    def nonfinite(self) -> bool:
        return bool(self.partials[:, NAN].any() or self.partials[:, INF].any())

    def observations(
        self, stat: Statistic, thresholds: Thresholds, max_params: int
    ) -> list[tuple[dict[str, str], float]]:
        """(labels, value) pairs of one catalog statistic; non-finite values are left out."""
        assert stat.compute is not None
        if stat.scope == catalog.GLOBAL:
            sets: Iterable[tuple[dict[str, str], Aggregate]] = [({}, self.aggregate())]
        elif stat.scope == catalog.RANK:
            sets = [({}, self.aggregate(local=True))]
        elif stat.scope == catalog.GROUP:
            sets = (({"group": g}, self.aggregate(r)) for g, r in self.layout.group_rows.items())
        else:
            count = min(max_params, len(self.layout.names))
            sets = (
                ({"param": self.layout.names[i]}, self.aggregate(slice(i, i + 1)))
                for i in range(count)
            )
        out = []
        for labels, agg in sets:
            value = stat.compute(agg, thresholds)
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for kind, v in items:
                if math.isfinite(v):
                    out.append(({**labels, "kind": kind} if kind else labels, float(v)))
        return out


@dataclass(frozen=True)
class WatchSnapshot:
    """One consistent view of a watch, pinned for the duration of one scrape."""

    readout: Readout | None
    collected_steps: int
    nonfinite_steps: int
    amp_skipped_steps: int
    dropped_steps: int
    collect_seconds: float


@dataclass
class _InFlight:
    step: int
    layout: Layout
    numel: np.ndarray
    host: torch.Tensor  # pinned [T*6 + 2 (+ T*6)]: partials, grad scale, found_inf (, local)
    done: torch.cuda.Event
    combined: bool = False


class ErrorLog:
    """Counts failures by stage and logs each stage's first one, then every 1000th."""

    # Exported at 0 from the start, so rate()/increase() see the first failure too.
    STAGES = ("collect", "readout", "export", "server", "names")

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(self.STAGES, 0)
        self._lock = threading.Lock()

    def nonzero(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if v}

    def record(self, stage: str, exc: BaseException, logged: bool = False) -> None:
        """Count a failure; ``logged``: the caller already wrote a clear line for it."""
        with self._lock:
            n = self.counts.get(stage, 0) + 1
            self.counts[stage] = n
        if not logged and (n == 1 or n % 1000 == 0):
            log.warning(
                "gradwatch: %s failed (%d so far, training goes on): %r",
                stage,
                n,
                exc,
                exc_info=n == 1,
            )


def _param_names(models: Iterable[torch.nn.Module]) -> dict[int, str]:
    names: dict[int, str] = {}
    for model in models:
        for name, p in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), name)
    return names


class OptimizerWatch:
    """Watches one optimizer: collects at its pre-step hook, publishes :class:`Readout` s."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        index: int,
        config: Config,
        errors: ErrorLog,
        name_source: Callable[[], dict[int, str]],
    ) -> None:
        self.optimizer_ref = optimizer  # strong ref is fine: the watch lives as long as training
        self.index = str(index)
        self.config = config
        self.errors = errors
        self._name_source = name_source
        self._names: dict[int, str] | None = None
        self._layout_key: tuple[int, ...] | None = None
        self._layout: Layout | None = None
        self._backends: dict[torch.device, Backend] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._inflight: deque[_InFlight] = deque()
        self._lock = threading.Lock()
        self.steps = 0  # optimizer.step() calls seen
        self.collected_steps = 0
        self.nonfinite_steps = 0
        self.amp_skipped_steps = 0
        self.dropped_steps = 0
        self.collect_seconds = math.nan
        self.latest: Readout | None = None
        self.backend_names: set[str] = set()

    # ---- training thread ----
    def on_step(self) -> None:
        """Pre-step hook body: never raises."""
        self.steps += 1
        try:
            self.poll()
            if (self.steps - 1) % self.config.every == 0:
                t0 = time.perf_counter()
                self._collect()
                self.collect_seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - telemetry never raises into training
            self.errors.record("collect", exc)

    def note_amp_skipped(self) -> None:
        """GradScaler skipped optimizer.step() (non-fused path): the hook never fired."""
        with self._lock:
            self.amp_skipped_steps += 1

    def _layout_for(self, params: list[torch.nn.Parameter], group_of: list[int]) -> Layout:
        key = tuple(id(p) for p in params)
        if key != self._layout_key or self._layout is None:
            if self._names is None:
                self._names = self._name_source()
            names = []
            for i, p in enumerate(params):
                name = self._names.get(id(p))
                names.append(name if name else f"group{group_of[i]}.param{i}")
            if self.config.groups:
                groups = []
                for name in names:
                    label = next(
                        (
                            g
                            for g, prefixes in self.config.groups
                            if any(name.startswith(x) for x in prefixes)
                        ),
                        "other",
                    )
                    groups.append(label)
            else:
                groups = [str(g) for g in group_of]
            groups = self._cap_groups(groups)
            if self.config.per_param_here and len(names) > self.config.max_params:
                log.warning(
                    "gradwatch: %d parameters have gradients but GRADWATCH_MAX_PARAMS is %d:"
                    " grad_param_* series are exported for the first %d only",
                    len(names),
                    self.config.max_params,
                    self.config.max_params,
                )
            self._layout = Layout.build(names, groups)
            self._layout_key = key
        return self._layout

    def _cap_groups(self, groups: list[str]) -> list[str]:
        """Bound the group series: groups past the cap share one `_overflow` group."""
        order = list(dict.fromkeys(groups))
        cap = self.config.max_groups
        if len(order) <= cap:
            return groups
        keep = set(order[: cap - 1])
        log.warning(
            "gradwatch: %d parameter groups but GRADWATCH_MAX_GROUPS is %d: the last %d are"
            " merged into group _overflow",
            len(order),
            cap,
            len(order) - cap + 1,
        )
        return [g if g in keep else "_overflow" for g in groups]

    def _backend(self, device: torch.device) -> Backend:
        backend = self._backends.get(device)
        if backend is None:
            backend = select_backend(device, self.config.backend)
            self._backends[device] = backend
            self.backend_names.add(backend.name)
        return backend

    def _collect(self) -> None:
        params: list[torch.nn.Parameter] = []
        grads: list[torch.Tensor] = []
        group_of: list[int] = []
        for gi, group in enumerate(self.optimizer_ref.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    params.append(p)
                    grads.append(g)
                    group_of.append(gi)
        if not grads:
            return
        device = grads[0].device
        if any(g.device != device for g in grads):
            order = sorted(range(len(grads)), key=lambda i: str(grads[i].device))
            params = [params[i] for i in order]
            grads = [grads[i] for i in order]
            group_of = [group_of[i] for i in order]
        layout = self._layout_for(params, group_of)
        # DTensor grads (FSDP2): local shards, rows owned by this rank, full numel.
        view = distributed.local_view(grads, self.config.distributed)
        grads, numel = view.tensors, view.numel
        scale = getattr(self.optimizer_ref, "grad_scale", None)
        found_inf = getattr(self.optimizer_ref, "found_inf", None)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        if len(by_device) == 1 and device.type == "cuda":
            self._launch_cuda(device, grads, layout, numel, scale, found_inf, view.owned)
            return
        parts = [self._backend(d).partials(gs).to("cpu") for d, gs in by_device.items()]
        local = torch.cat(parts) if len(parts) > 1 else parts[0]
        combined = None
        if view.combine:
            # CPU partials: one small gloo all-reduce pair; waiting for it on the CPU is cheap.
            result, works = distributed.start_combine(local, view.owned)
            for work in works:
                work.wait()
            combined = distributed.finish_combine(result).numpy()
        host = local.numpy().reshape(-1, N_PARTIALS)
        scale_v = None if scale is None else float(scale)
        found = None if found_inf is None else float(found_inf)
        if combined is None:
            self._publish(self.steps, layout, host, numel, scale_v, found)
        else:
            self._publish(self.steps, layout, combined, numel, scale_v, found, local=host)

    def _launch_cuda(self, device, grads, layout, numel, scale, found_inf, owned=None) -> None:
        with self._lock:
            if len(self._inflight) >= RING_SLOTS:
                self.dropped_steps += 1
                return
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        stream.wait_stream(
            main
        )  # read grads only once their producer (maybe FSDP's stream) is done
        backend = self._backend(device)
        t = len(grads)
        combine = owned is not None
        with torch.cuda.stream(stream):
            partials = backend.partials(grads)
            reduced = torch.cuda.Event()
            reduced.record(stream)
            local = partials
            if combine:
                # Collectives on the dedicated group; wait() orders this side stream after them on
                # the device (NCCL), the host goes on.
                result, works = distributed.start_combine(partials, owned)
                for work in works:
                    work.wait()
                partials = distributed.finish_combine(result)
            extra = torch.full((2,), math.nan, dtype=torch.float64, device=device)
            if scale is not None:
                extra[0].copy_(scale.reshape(()))
            if found_inf is not None:
                extra[1].copy_(found_inf.reshape(()))
            size = t * N_PARTIALS * (2 if combine else 1) + 2
            host = torch.empty(size, dtype=torch.float64, pin_memory=True)
            host[: t * N_PARTIALS].copy_(partials.reshape(-1), non_blocking=True)
            host[t * N_PARTIALS : t * N_PARTIALS + 2].copy_(extra, non_blocking=True)
            if combine:
                host[t * N_PARTIALS + 2 :].copy_(local.reshape(-1), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        # Later in-place writes (clip, unscale_, fused steps, zero_grad) and frees are ordered after
        # the reduction on the device; the host does not wait.
        main.wait_event(reduced)
        with self._lock:
            self._inflight.append(_InFlight(self.steps, layout, numel, host, done, combine))

    def poll(self) -> None:
        """Publish every in-flight result whose copy has completed; never blocks."""
        while True:
            with self._lock:
                if not self._inflight or not self._inflight[0].done.query():
                    return
                item = self._inflight.popleft()
            try:
                data = item.host.numpy()
                t = len(item.layout.names)
                scale, found = data[t * N_PARTIALS], data[t * N_PARTIALS + 1]
                local = None
                if item.combined:
                    local = data[t * N_PARTIALS + 2 :].reshape(t, N_PARTIALS).copy()
                self._publish(
                    item.step,
                    item.layout,
                    data[: t * N_PARTIALS].reshape(t, N_PARTIALS).copy(),
                    item.numel,
                    None if math.isnan(scale) else float(scale),
                    None if math.isnan(found) else float(found),
                    local=local,
                )
            except Exception as exc:  # noqa: BLE001
                self.errors.record("readout", exc)

    def snapshot(self) -> WatchSnapshot:
        """Publish finished device work, then one consistent view of readout and counters."""
        self.poll()
        with self._lock:
            return WatchSnapshot(
                self.latest,
                self.collected_steps,
                self.nonfinite_steps,
                self.amp_skipped_steps,
                self.dropped_steps,
                self.collect_seconds,
            )

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (off the training path: at close) for in-flight results and publish them."""
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.001)

    def _publish(self, step, layout, partials, numel, scale, found_inf, local=None) -> None:
        if found_inf:  # fused GradScaler path: this step will be skipped, grads are not real
            with self._lock:
                self.amp_skipped_steps += 1
            return
        if scale is not None and scale != 1.0:
            # Fused optimizers under GradScaler see still-scaled grads; report unscaled values.
            partials[:, SUMSQ] /= scale * scale
            partials[:, SUMABS] /= scale
            partials[:, MAXABS] /= scale
        readout = Readout(step, layout, partials, numel, local)
        with self._lock:
            self.latest = readout
            self.collected_steps += 1
            if readout.nonfinite:
                self.nonfinite_steps += 1


def collect_names(models: Sequence[torch.nn.Module]) -> Callable[[], dict[int, str]]:
    return lambda: _param_names(models)
