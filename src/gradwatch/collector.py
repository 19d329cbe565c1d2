"""Collection: from an optimizer's gradients to a published :class:`~gradwatch.records.Readout`.

At each collected optimizer step (the pre-step hook, so after any clipping the loop did) the
watch lists the gradients the optimizer is about to apply (:mod:`gradwatch.listing`), runs the
fused reduction once over them (six float64 partials per tensor, see :mod:`gradwatch.kernels`)
and publishes the result with the loop's values of the step (:mod:`gradwatch.loop_values`).

On the CPU the reduction runs inline and is published at once. On CUDA it runs on a side stream
that waits for the producing stream; the main stream waits (on the device, never the host) for
the reduction before it goes on, so no later in-place write or free of a gradient can race with
it; the small result goes through :mod:`gradwatch.readback` (pinned copy, event, bounded ring)
and is published a step later, or by a scrape, once its copy has completed. If results are still
in flight when the ring is full the sample is dropped and counted: the training thread never
waits for telemetry. Publishing is :meth:`OptimizerWatch.poll` / ``_publish``: one thread at a
time, in step order.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import catalog, distributed, updates
from .config import Config
from .kernels import N_PARTIALS, SUMSQ, unscale
from .kernels.dispatch import Backend, select_backend
from .listing import GradientListing
from .loop_values import ClipRecord, StepWindow, read_loop_values, with_host_values
from .noise import BackwardWindows, NoiseEstimator
from .readback import Readback, SideStreams
from .records import (
    NONFINITE_NAMES,
    DeviceValue,
    Layout,
    LoopValues,
    Readout,
    UpdateReadout,
    WatchSnapshot,
)
from .updates import UpdateSampler

__all__ = [
    "NONFINITE_NAMES",
    "ClipRecord",
    "ErrorLog",
    "Layout",
    "OptimizerWatch",
    "Readout",
    "UpdateReadout",
    "WatchSnapshot",
]

log = logging.getLogger("gradwatch")

RING_SLOTS = 2  # gradient results in flight per watch before a new sample is dropped
INCIDENT_LOG_INTERVAL_S = 60.0  # at most one non-finite incident line per this many seconds
PENDING_NORMS = 1 << 16  # per-step norms held between scrapes before they go to the histogram


@dataclass(frozen=True)
class GradResult:
    """What the publisher needs of one step's gradient reduction besides its values."""

    step: int
    layout: Layout
    numel: np.ndarray
    loop: LoopValues  # host-known values
    device_slots: tuple[DeviceValue, ...]  # loop values that travel after the partials
    combined: bool  # this rank's uncombined partials travel last


class ErrorLog:
    """Counts failures by stage and logs each stage's first one, then every 1000th."""

    # Exported at 0 from the start, so rate()/increase() see the first failure too.
    STAGES = ("collect", "readout", "export", "server", "names", "http")

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


class OptimizerWatch:
    """Watches one optimizer: collects at its pre-step hook, publishes :class:`Readout` s."""

    samples_updates = True  # GRADWATCH_UPDATE_EVERY applies (a stack's own watch may say no)
    noise_scale_unsupported = ""  # where GRADWATCH_MICRO_BATCH_SIZE does not apply (logged)

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
        self.listing = GradientListing(optimizer, self.index, config, name_source)
        self._backends: dict[torch.device, Backend] = {}
        self._streams = SideStreams()
        self._grad_results: Readback[GradResult] = Readback(RING_SLOTS)
        self._lock = threading.Lock()  # counters and latest: held briefly
        self._publish_lock = threading.RLock()  # one publisher at a time, in step order
        self.steps = 0  # optimizer.step() calls seen
        self.collected_steps = 0
        self.nonfinite_steps = 0
        self.amp_skipped_steps = 0
        self.dropped_steps = 0
        self.clipped_steps = 0
        self.preclip_nonfinite_steps = 0
        self.collect_seconds = math.nan
        self.latest: Readout | None = None
        self.last_nonfinite: Readout | None = None
        self.backend_names: set[str] = set()
        self.scaler = None  # the GradScaler whose step() called this optimizer (set by session)
        # optimizers this one wraps (their own steps are not reported: see stacks.wrapped)
        self.inner_optimizers: list[torch.optim.Optimizer] = []
        self.closure_pending = False  # step(closure) began; collect after the closure's first call
        self._norms: list[float] = []  # finite per-step norms since the last scrape
        self._max_norm = math.nan  # their max (kept when a full list is handed over early)
        # Receives the norms when PENDING_NORMS pile up between scrapes (the exporter's
        # histogram): no finite step is ever dropped from it.
        self.norm_sink: Callable[[str, Sequence[float]], None] | None = None
        self._was_nonfinite = False
        self._last_incident = -math.inf
        self._suppressed_incidents = 0
        # parameter updates, sampled every config.update_every steps
        self.updates = UpdateSampler(optimizer, self.listing, self._backend, self._count_dropped)
        # gradient noise scale (config.micro_batch_size): the accumulation windows and EMAs
        self._windows: BackwardWindows | None = None
        self._step_window: StepWindow | None = None
        self._noise: NoiseEstimator | None = None
        if config.micro_batch_size is not None:
            if config.world_size > 1:  # B_big would need the ranks' samples: not done yet
                log.warning(
                    "gradwatch: GRADWATCH_MICRO_BATCH_SIZE is set but WORLD_SIZE is %d: the"
                    " gradient noise scale is computed for single-process training only",
                    config.world_size,
                )
            elif self.noise_scale_unsupported:
                log.warning(
                    "gradwatch: GRADWATCH_MICRO_BATCH_SIZE is not supported %s: no gradient"
                    " noise scale",
                    self.noise_scale_unsupported,
                )
            else:
                self._noise = NoiseEstimator(
                    config.micro_batch_size, config.noise_ema, config.loss_accumulation
                )
                self._windows = BackwardWindows(
                    optimizer,
                    self.steps + 1,
                    lambda: self._sumsq_now(),  # late-bound: tests replace the method
                    lambda: self._due(config.every, self.steps + 1),  # the coming step
                    errors,
                )

    def remove_hooks(self) -> None:
        if self._windows is not None:
            self._windows.remove()

    def _sumsq_now(self) -> torch.Tensor | None:
        """Sum of squares of the current gradients, float64, as a 0-dim tensor on their device
        (one launch of the fused reduction; nothing is copied to the host here)."""
        _, grads, _ = self.listing.params_with_grads()
        if not grads:
            return None
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        sums = [self._backend(d).reduce(gs)[:, SUMSQ].sum() for d, gs in by_device.items()]
        if len(sums) == 1:
            return sums[0]
        return torch.stack([x.to("cpu") for x in sums]).sum()  # several devices: rare, syncs

    # ---- training thread ----
    def begin_step(self) -> None:
        """First half of a step (its pre-step hook): count it and publish finished device work.

        The step number is the count of ``step()`` calls, applied or skipped by GradScaler
        (see :meth:`note_amp_skipped`), the same on fused and non-fused paths."""
        self.steps += 1
        self.closure_pending = False  # a closure that raised last step never collected
        self.updates.early = None
        try:
            self.poll()
        except Exception as exc:  # noqa: BLE001
            self.errors.record("readout", exc)

    def _due(self, every: int, step: int | None = None) -> bool:
        """This step (or ``step``) is one of 1, every + 1, 2 every + 1, ... (every 0: none is)."""
        step = self.steps if step is None else step
        return every > 0 and (step - 1) % every == 0

    def collect_step(self, clip: ClipRecord | None = None, sample_update: bool = True) -> None:
        """Second half: the gradients the step will apply are final. At the pre-step hook
        without a closure; after the closure's first call with one. Never raises."""
        try:
            windows = self._windows
            self._step_window = None if windows is None else windows.take(self.steps)
        except Exception as exc:  # noqa: BLE001
            self._step_window = None
            self.errors.record("collect", exc)
        try:
            if self._due(self.config.every):
                t0 = time.perf_counter()
                self._collect(clip)
                self.collect_seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - telemetry never raises into training
            self.errors.record("collect", exc)
        updates = self.updates
        try:
            updates.pending = None  # an earlier step whose post hook never ran
            early = updates.early is not None  # taken before the params could change
            wanted = self.samples_updates and (sample_update or early)
            if wanted and self._due(self.config.update_every):
                updates.snapshot(self.steps)
        except Exception as exc:  # noqa: BLE001
            updates.pending = None
            self.errors.record("collect", exc)
        updates.early = None

    def snapshot_before_closure(self) -> None:
        """Pre-step hook of a step with a closure: theta_(t-1) now if the step samples the
        update (see :meth:`UpdateSampler.snapshot_before_closure`). Never raises."""
        self.updates.early = None
        if not self.samples_updates or not self._due(self.config.update_every):
            return
        try:
            self.updates.snapshot_before_closure()
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)

    def on_step_post(self) -> None:
        """Post-step hook body: difference the sampled step's snapshot; never raises."""
        pending, self.updates.pending = self.updates.pending, None
        if pending is None:
            return
        try:
            self.updates.reduce(pending, self._publish_update)
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)

    def _count_dropped(self) -> None:
        with self._lock:
            self.dropped_steps += 1

    def note_amp_skipped(self) -> None:
        """GradScaler skipped optimizer.step() (non-fused path): the hook never fired. The
        call still takes a step number, as it does on the fused path (where step() runs)."""
        self.steps += 1
        self.count_skipped()

    def count_skipped(self) -> None:
        """A step whose gradients were not applied (loss-scale overflow)."""
        with self._lock:
            self.amp_skipped_steps += 1
        if self._windows is not None:
            self._windows.reset()  # the skipped step ends its window

    def _backend(self, device: torch.device) -> Backend:
        backend = self._backends.get(device)
        if backend is None:
            backend = select_backend(device, self.config.backend)
            self._backends[device] = backend
            self.backend_names.add(backend.name)
        return backend

    # ---- the gradient reduction ----
    def _collect(self, clip: ClipRecord | None = None) -> None:
        params, grads, group_of = self.listing.params_with_grads()
        if not grads:
            return
        device = grads[0].device
        layout = self.listing.layout_for(params, group_of)
        counts = self.listing.plain_cpu_counts(grads)
        if counts is not None:  # plain CPU tensors (no DTensor): the kernel's checks are done
            view = distributed.LocalView(grads, None, counts[1], False)
        else:
            # DTensor grads (FSDP2): local shards, rows owned by this rank, full numel.
            view = distributed.local_view(grads, self.config.distributed)
        grads, numel = view.tensors, view.numel
        loop, device_values = self._loop_values(clip)
        if counts is not None:
            local = self._backend(device).reduce(grads, (self.listing.listed_dtypes, counts[0]))
            self._publish_host(local, layout, numel, with_host_values(loop, device_values))
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        if len(by_device) == 1 and device.type == "cuda":
            backend = self._backend(device)
            self._launch_cuda(
                device,
                lambda: backend.reduce(grads),
                layout,
                numel,
                loop,
                device_values,
                view.owned,
            )
            return
        parts = [self._backend(d).reduce(gs).to("cpu") for d, gs in by_device.items()]
        local = torch.cat(parts) if len(parts) > 1 else parts[0]
        # this path already copies to the host synchronously
        loop = with_host_values(loop, device_values)
        self._publish_host(local, layout, numel, loop, view.owned if view.combine else None)

    def _loop_values(self, clip: ClipRecord | None) -> tuple[LoopValues, list[DeviceValue]]:
        return read_loop_values(
            self.optimizer_ref,
            self.scaler,
            clip,
            self.inner_optimizers,
            self.listing.unreduced_now,
            self._step_window,
        )

    def _publish_host(self, local, layout, numel, loop: LoopValues, owned=None) -> None:
        """Publish CPU partials of this step, combined across ranks first if ``owned`` is given
        (one small gloo all-reduce pair; waiting for it on the CPU is cheap)."""
        host = local.numpy().reshape(-1, N_PARTIALS)
        if owned is None:
            self._publish(self.steps, layout, host, numel, loop)
            return
        result, works = distributed.start_combine(local, owned)
        for work in works:
            work.wait()
        combined = distributed.finish_combine(result).numpy()
        self._publish(self.steps, layout, combined, numel, loop, local=host)

    def _launch_cuda(
        self, device, reduce, layout, numel, loop: LoopValues, device_values, owned=None
    ) -> None:
        """``reduce()`` gives the [T, 6] partials (launched on the side stream, which waits for
        the main one); they are combined across ranks if ``owned`` is given, then go through the
        readback with the loop's device values and are published by :meth:`poll`.

        A full ring drops the sample, but never before a collective: whether this rank's
        earlier results have completed is its own, and a rank that skipped the all-reduce
        would pair its next one with its peers' current one (or leave them waiting)."""
        combine = owned is not None
        dropped = self._grad_results.full()
        if dropped and not combine:
            self._count_dropped()
            return
        stream = self._streams(device)
        main = torch.cuda.current_stream(device)
        stream.wait_stream(main)  # read grads only once their producer (maybe FSDP's) is done
        reduced = None
        try:
            with torch.cuda.stream(stream):
                partials = reduce()
                if partials.device.type == "cuda":
                    # made on the main stream by some callers (ZeRO's rows): read here after
                    # main goes on, so its memory must not be reused before this stream is done
                    partials.record_stream(stream)
                extra = None
                if device_values:
                    # before the event the main stream waits for: the loop may change these
                    # tensors in place once it goes on (GradScaler.update() writes its scale)
                    extra = torch.stack(
                        [d.tensor.reshape(()).to(device, torch.float64) for d in device_values]
                    )
                reduced = torch.cuda.Event()
                reduced.record(stream)
                parts = [partials]
                if combine:
                    # Collectives on the dedicated group; wait() orders this side stream after
                    # them on the device (NCCL), the host goes on.
                    result, works = distributed.start_combine(partials, owned)
                    for work in works:
                        work.wait()
                    parts = [distributed.finish_combine(result)]
                if dropped:
                    self._count_dropped()
                    return
                if extra is not None:
                    parts.append(extra)
                if combine:
                    parts.append(partials)  # this rank's own, uncombined
                slots = tuple(d.without_tensor() for d in device_values)  # read from the packet
                result_of = GradResult(self.steps, layout, numel, loop, slots, combine)
                self._grad_results.push(parts, result_of, device)
        finally:
            # Later in-place writes (clip, unscale_, fused steps, zero_grad) and frees are
            # ordered after the reduction on the device; the host does not wait. Also when
            # something above raised: what the side stream already queued reads the grads.
            if reduced is None:
                reduced = torch.cuda.Event()
                reduced.record(stream)
            main.wait_event(reduced)

    def _publish_update(self, readout: UpdateReadout) -> None:
        with self._publish_lock:
            with self._lock:
                self.updates.latest = readout

    # ---- publishing: one thread at a time, in step order ----
    def poll(self) -> None:
        """Publish every in-flight result whose copy has completed; never blocks.

        The training thread and scrape threads all poll; one at a time publishes (the others
        return at once: the one holding the lock publishes what they would have), so results
        are published in step order and the published state (latest, counters, noise EMAs,
        incident log) changes in one thread at a time."""
        if not self._publish_lock.acquire(blocking=False):
            return
        try:
            self._poll_locked()
        finally:
            self._publish_lock.release()

    def _poll_locked(self) -> None:
        while (ready := self._grad_results.pop_ready()) is not None:
            result, parts = ready
            try:
                t, k = len(result.layout.names), len(result.device_slots)
                partials = parts[0]
                loop = result.loop
                if k:
                    loop = loop.resolved(result.device_slots, parts[1].tolist())
                local = parts[-1] if result.combined else None
                self._publish(
                    result.step,
                    result.layout,
                    partials.reshape(t, N_PARTIALS),
                    result.numel,
                    loop,
                    local=local,
                )
            except Exception as exc:  # noqa: BLE001
                self.errors.record("readout", exc)
        while (ready := self.updates.results.pop_ready()) is not None:
            update, parts = ready
            try:
                rows = parts[0].reshape(-1, N_PARTIALS)
                self._publish_update(updates.readout(update.step, update.layout, rows))
            except Exception as exc:  # noqa: BLE001
                self.errors.record("readout", exc)

    def snapshot(self, drain: bool = False) -> WatchSnapshot:
        """Publish finished device work, then one consistent view of readout and counters.

        ``drain``: hand over (and forget) the per-step norms collected since the last drain: the
        exporter does so once per scrape, for the histogram and the max since the last scrape.
        """
        self.poll()
        with self._lock:
            norms: tuple[float, ...] = ()
            max_norm = self._max_norm  # since the last drain, also when not draining now
            if drain:
                norms = tuple(self._norms)
                self._norms, self._max_norm = [], math.nan
            return WatchSnapshot(
                self.latest,
                self.collected_steps,
                self.nonfinite_steps,
                self.amp_skipped_steps,
                self.dropped_steps,
                self.collect_seconds,
                self.clipped_steps,
                self.preclip_nonfinite_steps,
                max_norm,
                norms,
                self.updates.latest,
                self.last_nonfinite,
            )

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (off the training path: at close) for in-flight results and publish them."""
        deadline = time.monotonic() + timeout
        while (self._grad_results or self.updates.results) and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.001)

    def _publish(self, step, layout, partials, numel, loop: LoopValues, local=None) -> None:
        with self._publish_lock:  # reentrant: poll() already holds it
            self._publish_locked(step, layout, partials, numel, loop, local)

    def _publish_locked(self, step, layout, partials, numel, loop: LoopValues, local=None) -> None:
        if loop.found_inf:  # fused GradScaler path: this step is skipped
            with self._lock:
                self.amp_skipped_steps += 1
            return
        scale = loop.grad_scale
        if scale is not None and scale != 1.0:
            # Fused optimizers under GradScaler see still-scaled grads; report unscaled values.
            unscale(partials, scale)
        readout = Readout(step, layout, partials, numel, loop, local)
        total_norm = math.nan if readout.nonfinite else catalog.total_l2_norm(readout.aggregate())
        coefficient = catalog.clip_coefficient(loop)
        try:
            if self._noise is not None:
                readout.noise = self._noise.update(
                    loop.micro_batches,
                    loop.first_micro_batch_sumsq,
                    None if readout.nonfinite else float(partials[:, SUMSQ].sum()),
                    coefficient,
                    loop.loss_scale,
                )
        except Exception as exc:  # noqa: BLE001
            self.errors.record("readout", exc)
        with self._lock:
            self.latest = readout
            self.collected_steps += 1
            if readout.nonfinite:
                self.nonfinite_steps += 1
                self.last_nonfinite = readout
            else:
                self._norms.append(total_norm)
                if not total_norm <= self._max_norm:  # also when the max is still NaN
                    self._max_norm = total_norm
            if coefficient < 1.0:
                self.clipped_steps += 1
            if catalog.preclip_nonfinite(loop):
                self.preclip_nonfinite_steps += 1
            hand_over = None
            if len(self._norms) >= PENDING_NORMS:
                if self.norm_sink is not None:
                    hand_over, self._norms = self._norms, []
                else:  # no exporter to hand them to: stay bounded
                    del self._norms[:-PENDING_NORMS]
        if hand_over is not None:
            try:
                self.norm_sink(self.index, hand_over)
            except Exception as exc:  # noqa: BLE001
                self.errors.record("export", exc)
        self._log_incident(readout)

    def _log_incident(self, readout: Readout) -> None:
        """One line when a step turns non-finite after finite ones (at most one a minute)."""
        was, self._was_nonfinite = self._was_nonfinite, readout.nonfinite
        if not readout.nonfinite or was:
            return
        now = time.monotonic()
        if now - self._last_incident < INCIDENT_LOG_INTERVAL_S:
            self._suppressed_incidents += 1
            return
        self._last_incident = now
        agg = readout.aggregate()
        names = readout.nonfinite_params
        more = int(((agg.nan > 0) | (agg.inf > 0)).sum()) - len(names)
        log.warning(
            "gradwatch: optimizer %s step %d: gradients turned non-finite (%d NaN, %d Inf"
            " elements) in %s%s%s",
            self.index,
            readout.step,
            int(agg.nan.sum()),
            int(agg.inf.sum()),
            ", ".join(names),
            f" and {more} more" if more > 0 else "",
            f" ({self._suppressed_incidents} earlier incidents not logged)"
            if self._suppressed_incidents
            else "",
        )
        self._suppressed_incidents = 0
