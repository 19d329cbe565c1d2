"""The process-wide gradwatch session: hooks, watches, exporter and lifecycle.

One session per process. It hooks either the given optimizers or, in no-code mode, every
optimizer through PyTorch's global optimizer step pre-hook. The exporter and its HTTP endpoint
start lazily at the first optimizer step, so launchers and DataLoader workers never bind a port,
and never in a forked child of the process that started them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import os
import sys
import threading
from collections.abc import Iterable, Sequence

import torch

from . import distributed, hooks, imports, stacks
from .collector import ClipRecord, ErrorLog, OptimizerWatch
from .config import Config, SettingError, from_env, read_env
from .stacks import deepspeed

log = logging.getLogger("gradwatch")

_LEADING_WRAPPERS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
_INNER_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """Drop what torch.compile, DDP, FSDP1 and checkpoint wrappers add to parameter names."""
    for inner in _INNER_WRAPPERS:
        name = name.replace("." + inner, ".")
    while name.startswith(_LEADING_WRAPPERS):
        name = name.split(".", 1)[1]
    return name


def names_from_models(models: Iterable[torch.nn.Module]) -> dict[int, str]:
    names: dict[int, str] = {}
    for model in models:
        for name, p in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), clean_name(name))
    return names


def find_root_modules() -> list[torch.nn.Module]:
    """No-code mode: the live nn.Modules that are no other module's child (scanned once)."""
    module_type = torch.nn.Module  # type(), not isinstance: some objects warn on __class__
    modules = [o for o in gc.get_objects() if issubclass(type(o), module_type)]
    children = {id(c) for m in modules for c in m.children()}
    return [m for m in modules if id(m) not in children]


class Session:
    """Everything gradwatch runs in one process. Create through :func:`gradwatch.watch`."""

    def __init__(
        self,
        config: Config,
        models: Sequence[torch.nn.Module] = (),
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
        global_hooks: bool = True,
    ) -> None:
        self.config = config
        self.errors = ErrorLog()
        self.models: list[torch.nn.Module] = list(models)
        self._watches: dict[int, OptimizerWatch] = {}
        self._explicit: set[int] | None = None
        self._inner: set[int] = set()  # ids of optimizers stepped by a watched outer one
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._hooks = hooks.HookSet()
        self.exporter = None
        self._exporter_failed = False
        self.closed = False
        self._clips: list[ClipRecord] = []  # clip_grad_norm_ calls not yet matched to a step
        if optimizers is None:
            if global_hooks:  # else no-code mode's dispatchers forward to this session
                from torch.optim.optimizer import (
                    register_optimizer_step_post_hook,
                    register_optimizer_step_pre_hook,
                )

                self._hooks.add(register_optimizer_step_pre_hook, self._pre_step_hook)
                self._hooks.add(register_optimizer_step_post_hook, self._post_step_hook)
        else:
            self._explicit = set()
            for opt in optimizers:
                self.add_optimizer(opt)
        self._patch_grad_scaler()
        self._patch_clip_grad_norm()
        self._scopes = threading.local()  # .stack: the stack steps running on this thread
        self._zero_patches: list[tuple[type, dict[str, object]]] = []
        for module_name, _ in stacks.ZERO_OPTIMIZERS:
            imports.after_import(module_name, self._patch_zero)
        atexit.register(self.close)

    # ---- watches ----
    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        with self._lock:
            if self._explicit is None or id(optimizer) in self._explicit:
                return
            self._explicit.add(id(optimizer))
            if not isinstance(optimizer, torch.optim.Optimizer):
                # a stack's optimizer (DeepSpeed ZeRO): its step is patched; the torch
                # optimizers it steps are hooked, their steps routed to its watch
                inner = deepspeed.inner_optimizers(optimizer)
                self.mark_inner(inner)
                for opt in inner:
                    self._hooks.add(opt.register_step_pre_hook, self._pre_step_hook)
                return
            self._hooks.add(optimizer.register_step_pre_hook, self._pre_step_hook)
            self._hooks.add(optimizer.register_step_post_hook, self._post_step_hook)

    def watches(self) -> list[OptimizerWatch]:
        with self._lock:
            return list(self._watches.values())

    def backend_names(self) -> set[str]:
        return {n for w in self.watches() for n in w.backend_names}

    def _names(self) -> dict[int, str]:
        try:
            return names_from_models(self.models or find_root_modules())
        except Exception as exc:  # noqa: BLE001
            self.errors.record("names", exc)
            return {}

    def watch_for(self, optimizer: torch.optim.Optimizer) -> OptimizerWatch | None:
        return self._watch_of(optimizer, OptimizerWatch)

    def _watch_of(self, owner, kind: type[OptimizerWatch]) -> OptimizerWatch | None:
        """The watch of a torch optimizer, or of a stack's own optimizer (``kind``), created at
        its first step; None for one this session does not report."""
        if self.closed or os.getpid() != self._pid:
            return None  # a forked child (e.g. a DataLoader worker) never exports
        with self._lock:
            watch = self._watches.get(id(owner))
            if watch is None:
                if self._explicit is not None and id(owner) not in self._explicit:
                    return None
                is_torch = isinstance(owner, torch.optim.Optimizer)
                if is_torch and self._is_inner(owner):
                    return None
                watch = kind(owner, len(self._watches), self.config, self.errors, self._names)
                watch.norm_sink = self._record_norms
                if is_torch:
                    watch.inner_optimizers = stacks.inner_optimizers(owner)
                    self.mark_inner(watch.inner_optimizers)
                self._watches[id(owner)] = watch
            return watch

    def _is_inner(self, optimizer: torch.optim.Optimizer) -> bool:
        """Wrapper rule (see :mod:`gradwatch.stacks`): ``optimizer`` is stepped by a watched
        outer one. Decided at its first step; called with the lock held."""
        if id(optimizer) in self._inner:
            return True
        for outer in self._watches.values():
            if stacks.step_running(outer.optimizer_ref):
                self._inner.add(id(optimizer))
                outer.inner_optimizers.append(optimizer)
                return True
        return False

    def _record_norms(self, index: str, norms) -> None:
        exporter = self.exporter
        if exporter is not None:
            exporter.record_norms(index, norms)

    def mark_inner(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Optimizers a stack steps itself: never reported on their own."""
        with self._lock:
            self._inner.update(id(o) for o in optimizers)

    def zero_watch_for(self, zero) -> OptimizerWatch | None:
        """The watch of a DeepSpeed ZeRO optimizer (see :mod:`gradwatch.stacks.deepspeed`)."""
        watch = self._watch_of(zero, deepspeed.ZeroWatch)
        if watch is None:
            return None
        try:
            self._start_endpoint()
        except Exception as exc:  # noqa: BLE001
            self.errors.record("server", exc)
        return watch

    @contextlib.contextmanager
    def inner_scope(self, watch):
        """While a stack's own step runs: the torch optimizers it steps are routed to
        ``watch.on_inner_step`` (``watch`` None: ignored) instead of being watched."""
        stack = self._scopes.__dict__.setdefault("stack", [])
        stack.append(watch)
        try:
            yield
        finally:
            stack.pop()

    def _patch_zero(self, module) -> None:
        """Post-import hook of DeepSpeed's ZeRO modules. Never raises."""
        try:
            if self.closed:
                return
            for module_name, class_name in stacks.ZERO_OPTIMIZERS:
                if module.__name__ == module_name:
                    patched = deepspeed.patch(self, module, class_name)
                    if patched is not None:
                        self._zero_patches.append(patched)
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)

    def _start_endpoint(self) -> None:
        self._ensure_exporter()
        if self.exporter is not None:
            self.exporter.ensure_serving()

    # ---- hooks ----
    def _pre_step_hook(self, optimizer, args, kwargs):
        stack = getattr(self._scopes, "stack", None)
        if stack:  # inside a stack's own step: its inner optimizer
            try:
                if stack[-1] is not None:
                    stack[-1].on_inner_step(optimizer)
            except Exception as exc:  # noqa: BLE001 - never raise into training
                self.errors.record("collect", exc)
            return None
        try:
            watch = self.watch_for(optimizer)
            if watch is None:
                return None
            self._start_endpoint()
        except Exception as exc:  # noqa: BLE001 - never raise into training
            self.errors.record("collect", exc)
            return None
        watch.begin_step()
        try:
            closure = stacks.closure_of(args, kwargs)
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)
            closure = None
        if closure is None:
            watch.collect_step(self._take_clip(optimizer))
            return None
        watch.closure_pending = True
        watch.snapshot_before_closure()
        return stacks.with_closure(args, kwargs, self._collecting(closure, watch, optimizer))

    def _collecting(self, closure, watch: OptimizerWatch, optimizer):
        """The closure the step runs instead: the user's, then (first call only) collection of
        the gradients it left, clipping inside it included."""
        session = self

        @functools.wraps(closure)
        def closure_then_collect(*args, **kwargs):
            result = closure(*args, **kwargs)
            if watch.closure_pending:
                watch.closure_pending = False
                watch.collect_step(session._take_clip(optimizer))
            return result

        return closure_then_collect

    def _post_step_hook(self, optimizer, args, kwargs) -> None:
        if getattr(self._scopes, "stack", None):
            return  # a stack's inner optimizer
        try:
            watch = self._watches.get(id(optimizer))
            if watch is None or self.closed:
                return
            if watch.closure_pending:  # the step never called its closure
                watch.closure_pending = False
                watch.collect_step(self._take_clip(optimizer), sample_update=False)
            watch.on_step_post()
        except Exception as exc:  # noqa: BLE001 - never raise into training
            self.errors.record("collect", exc)

    # ---- clip_grad_norm_: keep the pre-clip norm it returns (a tensor: no sync) ----
    def _take_clip(self, optimizer) -> ClipRecord | None:
        """The last clip_grad_norm_ call since the previous step that clipped one of the
        optimizer's params; it and older unmatched calls of those params are consumed."""
        try:
            with self._lock:
                if not self._clips:
                    return None
                ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
                mine = [c for c in self._clips if not c.param_ids.isdisjoint(ids)]
                if not mine:
                    return None
                self._clips = [c for c in self._clips if c.param_ids.isdisjoint(ids)]
                return mine[-1]
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)
            return None

    def _note_clip(self, params, max_norm, norm_type, total_norm) -> None:
        try:
            if self.closed or os.getpid() != self._pid:
                return
            if float(norm_type) != 2.0 or not isinstance(total_norm, torch.Tensor):
                return
            total_norm = distributed.replicated_value(total_norm)  # FSDP2: a DTensor
            if total_norm is None:
                return
            if isinstance(max_norm, torch.Tensor):
                if max_norm.device.type != "cpu":
                    return  # reading it would synchronize
                max_norm = float(max_norm)
            record = ClipRecord(frozenset(id(p) for p in params), total_norm, float(max_norm))
            with self._lock:
                self._clips.append(record)
                del self._clips[:-8]  # calls whose params no watched optimizer holds
        except Exception as exc:  # noqa: BLE001
            self.errors.record("collect", exc)

    def _patch_clip_grad_norm(self) -> None:
        """Wrap torch's clip API: ``clip_grad_norm_``, and the split API ``get_total_norm`` +
        ``clip_grads_with_norm_`` (torchtitan's clip). Results are bitwise identical."""
        from torch.nn.utils import clip_grad

        if getattr(clip_grad.clip_grad_norm_, "_gradwatch_session", None) is not None:
            return  # another session patched it; it restores on close
        session = self
        self._clip_originals: dict[str, object] = {}
        self._total_norm_type: float | None = None  # norm_type of the last get_total_norm call

        def as_list(parameters):
            # The same list the originals build themselves.
            if isinstance(parameters, torch.Tensor):
                return [parameters]
            return list(parameters)

        def patched_clip_grad_norm_(original):
            @functools.wraps(original)
            def clip_grad_norm_(parameters, max_norm, norm_type=2.0, *args, **kwargs):
                parameters = as_list(parameters)
                total_norm = original(parameters, max_norm, norm_type, *args, **kwargs)
                session._note_clip(parameters, max_norm, norm_type, total_norm)
                return total_norm

            return clip_grad_norm_

        def patched_get_total_norm(original):
            @functools.wraps(original)
            def get_total_norm(tensors, norm_type=2.0, *args, **kwargs):
                session._total_norm_type = norm_type
                return original(tensors, norm_type, *args, **kwargs)

            return get_total_norm

        def patched_clip_grads_with_norm_(original):
            @functools.wraps(original)
            def clip_grads_with_norm_(parameters, max_norm, total_norm, *args, **kwargs):
                parameters = as_list(parameters)
                result = original(parameters, max_norm, total_norm, *args, **kwargs)
                # A norm from get_total_norm carries that call's norm_type; one computed
                # elsewhere is taken as an L2 norm (README, "Clipping").
                norm_type = session._total_norm_type
                session._total_norm_type = None
                session._note_clip(
                    parameters, max_norm, 2.0 if norm_type is None else norm_type, total_norm
                )
                return result

            return clip_grads_with_norm_

        factories = {
            "clip_grad_norm_": patched_clip_grad_norm_,
            "get_total_norm": patched_get_total_norm,
            "clip_grads_with_norm_": patched_clip_grads_with_norm_,
        }
        for name, original, owners in stacks.clip_functions():
            wrapper = factories[name](original)
            wrapper._gradwatch_session = self  # type: ignore[attr-defined]
            self._clip_originals[name] = original
            for module in owners:
                setattr(module, name, wrapper)

    def _unpatch_clip_grad_norm(self) -> None:
        from torch.nn.utils import clip_grad

        for name, original in getattr(self, "_clip_originals", {}).items():
            for module in (clip_grad, torch.nn.utils):
                if getattr(getattr(module, name, None), "_gradwatch_session", None) is self:
                    setattr(module, name, original)

    def _ensure_exporter(self) -> None:
        if self.exporter is not None or self._exporter_failed:
            return
        with self._lock:
            if self.exporter is not None or self._exporter_failed:
                return
            from .export import Exporter

            try:
                exporter = Exporter(self, self.config)
            except Exception as exc:  # noqa: BLE001
                self._exporter_failed = True
                self.errors.record("export", exc)
                self._discovery(0)
                return
            try:
                exporter.start_server()
            except OSError as exc:
                self.errors.record("server", exc, logged=True)
                log.error(
                    "gradwatch: cannot serve /metrics on %s:%d: %s (statistics are still"
                    " collected; training goes on)",
                    self.config.host,
                    self.config.serve_port,
                    exc,
                )
            self.exporter = exporter
            self._discovery(exporter.port)
            if exporter.port:
                self._say(f"watching {self._what()}; statistics on {self.url}")

    @property
    def url(self) -> str:
        """Address of /metrics once the endpoint is up ('' before)."""
        if self.exporter is None or not self.exporter.port:
            return ""
        host = self.config.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # reachable from this host
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{distributed._target(host, self.exporter.port)}/metrics"

    def _what(self) -> str:
        if self._explicit is None:
            return "every optimizer (no-code mode)"
        n = len(self._explicit)
        return f"{n} optimizer{'s' if n != 1 else ''}"

    def _say(self, text: str) -> None:
        """One line on stderr for the person running the training (start and end)."""
        cfg = self.config
        where = f" [rank {cfg.rank}/{cfg.world_size}]" if cfg.world_size > 1 else ""
        try:
            print(f"gradwatch{where}: {text}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - a closed stderr never stops training
            pass

    def _discovery(self, port: int) -> None:
        """GRADWATCH_FILE_SD: every rank takes part in the gather (even without an endpoint, so
        that no rank waits for it); rank 0 writes the file_sd target file."""
        cfg = self.config
        if not cfg.file_sd:
            return
        try:
            from . import distributed

            targets = distributed.gather_targets(
                cfg.host, port, cfg.rank, cfg.local_rank, cfg.world_size
            )
            if cfg.rank == 0:
                live = [t for t in targets if not t["targets"][0].endswith(":0")]
                distributed.write_file_sd(cfg.file_sd, live)
                log.info("gradwatch: wrote %d scrape targets to %s", len(live), cfg.file_sd)
        except Exception as exc:  # noqa: BLE001 - discovery never stops training
            self.errors.record("server", exc)

    # ---- GradScaler: count the steps it skips ----
    def _patch_grad_scaler(self) -> None:
        scaler_cls = torch.amp.GradScaler
        original = scaler_cls.step
        if getattr(original, "_gradwatch_session", None) is not None:
            return  # another session patched it; it restores on close
        session = self

        def step(scaler, optimizer, *args, **kwargs):
            watch = None
            try:
                watch = session.watch_for(optimizer) if scaler.is_enabled() else None
                if watch is not None:
                    watch.scaler = scaler  # its loss scale is read with the step's partials
                    # up from the first step even if GradScaler skips every one of them
                    session._start_endpoint()
            except Exception as exc:  # noqa: BLE001 - never raise into training
                session.errors.record("collect", exc)
            before = watch.steps if watch is not None else None
            result = original(scaler, optimizer, *args, **kwargs)
            if watch is not None and watch.steps == before:
                watch.note_amp_skipped()
            return result

        step._gradwatch_session = self  # type: ignore[attr-defined]
        step.__wrapped__ = original  # type: ignore[attr-defined]
        scaler_cls.step = step
        self._scaler_original = original

    def _unpatch_grad_scaler(self) -> None:
        scaler_cls = torch.amp.GradScaler
        if getattr(scaler_cls.step, "_gradwatch_session", None) is self:
            scaler_cls.step = self._scaler_original

    def _summary(self, url: str) -> str:
        watches = self.watches()
        steps = sum(w.steps for w in watches)
        collected = sum(w.collected_steps for w in watches)
        skipped = sum(w.amp_skipped_steps for w in watches)
        errors = sum(self.errors.counts.values())
        parts = [f"{steps} optimizer steps", f"{collected} collected"]
        if skipped:
            parts.append(f"{skipped} skipped by the loss scaler")
        if errors:
            parts.append(f"{errors} internal errors (gradwatch_errors_total)")
        return f"stopped {url} after " + ", ".join(parts)

    # ---- lifecycle ----
    @property
    def port(self) -> int:
        return self.exporter.port if self.exporter is not None else 0

    def close(self) -> None:
        """Remove hooks, publish what is in flight, stop the endpoint and free its port."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._hooks.remove_all()
        self._unpatch_grad_scaler()
        self._unpatch_clip_grad_norm()
        imports.cancel(self._patch_zero)
        for cls, originals in self._zero_patches:
            deepspeed.unpatch(self, cls, originals)
        for w in self.watches():
            try:
                w.remove_hooks()
            except Exception as exc:  # noqa: BLE001
                self.errors.record("collect", exc)
        if os.getpid() == self._pid:
            for w in self.watches():
                try:
                    w.flush()
                except Exception as exc:  # noqa: BLE001
                    self.errors.record("readout", exc)
            if self.exporter is not None:
                url = self.url
                self.exporter.close()
                if url:
                    self._say(self._summary(url))
        atexit.unregister(self.close)
        global _SESSION
        if _SESSION is self:
            _SESSION = None


_SESSION: Session | None = None


def live_session() -> Session | None:
    """This process's session, if one is running (not closed)."""
    current = _SESSION
    return current if current is not None and not current.closed else None


class Handle:
    """What :func:`gradwatch.watch` returns: the live session, or a no-op when disabled."""

    def __init__(self, session: Session | None) -> None:
        self.session = session

    @property
    def enabled(self) -> bool:
        return self.session is not None and not self.session.closed

    @property
    def port(self) -> int:
        """Port of /metrics once the first optimizer step has started the endpoint, else 0."""
        return self.session.port if self.session is not None else 0

    def latest(self):
        """The statistics of the latest completed step, as a typed object
        (:class:`gradwatch.values.Statistics`); never waits for the device."""
        from .values import build

        return build(self.session if self.enabled else None)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _report_setting_error(exc: SettingError) -> None:
    print(f"{exc}; gradwatch telemetry is off, training goes on", file=sys.stderr)


def watch(model: object = None, optimizer: object = None, **settings: object) -> Handle:
    """:func:`gradwatch.watch` (typed and documented there): ``settings`` are the arguments it
    was given, checked against the settings table by :meth:`Config.with_overrides`."""
    with _module_lock:
        return _watch(model, optimizer, **settings)


_module_lock = threading.RLock()  # watch() may start the no-code session under it


def _as_list(obj) -> list:
    if obj is None:
        return []
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def _watch(model: object, optimizer: object, **settings: object) -> Handle:
    global _SESSION
    try:
        # One path for both sources: each argument is parsed like its variable, then the merged
        # settings are checked once (combinations, TLS material) exactly as from_env() does.
        config = read_env().with_overrides(**settings)
    except SettingError as exc:
        _report_setting_error(exc)
        return Handle(None)
    except TypeError as exc:  # an unknown keyword argument: a bug in the caller's code
        raise TypeError(f"gradwatch.watch(): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - never raise into training
        print(f"gradwatch: cannot read settings ({exc!r}); telemetry is off", file=sys.stderr)
        return Handle(None)
    if config.enabled is False:
        log.info("gradwatch: GRADWATCH=0, telemetry is off")
        return Handle(None)
    models, optimizers = _as_list(model), _as_list(optimizer)
    from . import activation

    if activation.armed() and (_SESSION is None or _SESSION.closed):
        activation.claim()  # GRADWATCH=1 and watch(): one session, every optimizer
        start_from_env(global_hooks=False)  # sets _SESSION (the lock is reentrant)
    if _SESSION is not None and not _SESSION.closed:
        if settings and _SESSION.config != config:
            log.warning("gradwatch: already watching with other settings; keeping the first")
        _SESSION.models.extend(m for m in models if m not in _SESSION.models)
        for opt in optimizers:
            _SESSION.add_optimizer(opt)
        return Handle(_SESSION)
    _SESSION = Session(config, models, optimizers or None)
    return Handle(_SESSION)


def start_from_env(global_hooks: bool = True) -> Session | None:
    """No-code mode (GRADWATCH=1): watch every optimizer of this process. ``global_hooks``
    False: the armed dispatchers of :mod:`gradwatch.activation` forward to the session."""
    global _SESSION
    with _module_lock:
        try:
            config = from_env()
        except SettingError as exc:
            _report_setting_error(exc)
            return None
        if not config.enabled or (_SESSION is not None and not _SESSION.closed):
            return _SESSION
        _SESSION = Session(config, global_hooks=global_hooks)
        return _SESSION
