"""Settings: every environment variable gradwatch reads, parsed in one place.

A bad value raises :class:`SettingError`, whose message is one line naming the variable, the value
and what is accepted. Callers on the training path turn it into one line on stderr and switch
telemetry off; it never reaches the training loop.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
BACKENDS = ("auto", "native", "torch", "triton")
DISTRIBUTED_MODES = ("auto", "off")
LOSS_ACCUMULATIONS = ("mean", "sum")
METRICS_EXPORTERS = ("prometheus", "otlp", "none")
DEFAULT_PORT = 9464


class SettingError(ValueError):
    """A setting has a value gradwatch cannot use. ``str()`` is the one-line explanation."""

    def __init__(self, name: str, value: object, accepted: str) -> None:
        self.name, self.value, self.accepted = name, value, accepted
        super().__init__(f"gradwatch: {name}={value!r} is not valid; accepted: {accepted}")


@dataclass(frozen=True)
class Setting:
    """Documentation row for one environment variable (README's settings table is made from it)."""

    name: str
    default: str
    accepted: str
    meaning: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "GRADWATCH",
        "unset",
        "1/true/yes/on, 0/false/no/off",
        "1 turns on no-code mode (every optimizer is watched); 0 turns every form off,"
        " `watch()` included.",
    ),
    Setting(
        "GRADWATCH_PORT",
        str(DEFAULT_PORT),
        "integer 1-65535 (0: any free port)",
        "Port of `/metrics`; under torchrun each rank uses PORT + LOCAL_RANK.",
    ),
    Setting(
        "GRADWATCH_HOST",
        "127.0.0.1",
        "an IP address or host name",
        "Interface `/metrics` binds to. `0.0.0.0` exposes it to the network (a warning is logged).",
    ),
    Setting(
        "GRADWATCH_EVERY",
        "1",
        "integer >= 1",
        "Collect every N-th optimizer step (steps 1, N+1, 2N+1, ...).",
    ),
    Setting(
        "GRADWATCH_GROUPS",
        "optimizer param groups",
        "`name=prefix[|prefix...]` pairs separated by commas, e.g. `host=host.,seed=seed.`",
        "Groups of `grad_group_*` by parameter-name prefix; params matching no prefix go to"
        " group `other`.",
    ),
    Setting(
        "GRADWATCH_PER_PARAM",
        "0",
        "1/true/yes/on, 0/false/no/off",
        "Export the `grad_param_*` series, one per parameter tensor.",
    ),
    Setting(
        "GRADWATCH_MAX_PARAMS",
        "500",
        "integer >= 1",
        "Cap on parameters with `grad_param_*` series; a warning is logged when it bites.",
    ),
    Setting(
        "GRADWATCH_MAX_GROUPS",
        "100",
        "integer >= 2",
        "Cap on `grad_group_*` groups; groups past it are merged into group `_overflow`, with a"
        " warning.",
    ),
    Setting(
        "GRADWATCH_VANISHING_THRESHOLD",
        "1e-07",
        "finite number >= 0",
        "A tensor whose gradient L2 norm is below this counts in `grad_tensors_vanishing`.",
    ),
    Setting(
        "GRADWATCH_EXPLODING_THRESHOLD",
        "100",
        "finite number > 0",
        "A tensor whose gradient L2 norm is above this counts in `grad_tensors_exploding`.",
    ),
    Setting(
        "GRADWATCH_UPDATE_EVERY",
        "0",
        "integer >= 0 (0: off)",
        "Sample the parameter update every N-th optimizer step (steps 1, N+1, ...):"
        " `update_*` and `param_*` statistics. Opt-in because it costs one fp32 copy of the"
        " parameters with gradients, held from the step's pre-hook to its post-hook (28 GB for"
        " 7B parameters on one device): size it before turning it on.",
    ),
    Setting(
        "GRADWATCH_MICRO_BATCH_SIZE",
        "unset (off)",
        "integer >= 1",
        "Samples per micro-batch under gradient accumulation: turns on the gradient noise scale"
        " (`grad_noise_*`). gradwatch counts the backward passes between two optimizer steps"
        " (k) and reads the first one's gradient (B_small = this size) against the step's"
        " accumulated gradient (B_big = k x this size); steps with k = 1 add nothing. Costs one"
        " extra reduction over the gradients per collected step, at the end of the window's"
        " first backward. Single-process data only (see README, Gradient noise scale).",
    ),
    Setting(
        "GRADWATCH_LOSS_ACCUMULATION",
        "mean",
        "mean, sum",
        "How the loop accumulates micro-batch losses: mean, each micro-batch loss divided by"
        " the number of micro-batches (`loss / accum_steps`, the accumulated .grad is the"
        " window's mean gradient); sum, losses not divided (.grad is the sum of the"
        " micro-batch gradients).",
    ),
    Setting(
        "GRADWATCH_NOISE_EMA",
        "0.95",
        "number from 0 to 1, 1 excluded",
        "Decay of the exponential moving averages of the noise-scale estimates (0: the last"
        " step's estimates alone).",
    ),
    Setting(
        "GRADWATCH_BACKEND",
        "auto",
        "auto, native, torch, triton",
        "Reduction backend: auto picks Triton on CUDA and the compiled C kernel on the CPU,"
        " falling back to plain torch ops (on CUDA: device ops without host sync, ~10 launches"
        " per tensor).",
    ),
    Setting(
        "GRADWATCH_TLS_CERT",
        "unset",
        "path of a readable PEM certificate (chain) file",
        "Serve `/metrics` over HTTPS with this certificate.",
    ),
    Setting(
        "GRADWATCH_TLS_KEY",
        "unset (key inside the cert file)",
        "path of a readable PEM private key file",
        "Private key of the certificate.",
    ),
    Setting(
        "GRADWATCH_TLS_CLIENT_CA",
        "unset",
        "path of a readable PEM CA file",
        "Mutual TLS: only clients with a certificate signed by this CA may scrape.",
    ),
    Setting(
        "GRADWATCH_DISTRIBUTED",
        "auto",
        "auto, off",
        "auto: when torch.distributed is initialized with world size > 1 and some gradients are"
        " DTensors (FSDP2, tensor parallel), each rank reduces its local shards and one small"
        " all-reduce per collected step combines them into exact global statistics (identical on"
        " every rank); plain-tensor gradients (DDP) are already identical on every rank and need"
        " none. off: every rank reports its own local gradients. See docs/distributed.md.",
    ),
    Setting(
        "GRADWATCH_PER_PARAM_RANKS",
        "0",
        "`all`, or comma-separated global ranks, e.g. `0` or `0,8,16`",
        "Ranks that export the `grad_param_*` series when GRADWATCH_PER_PARAM=1 (combined"
        " statistics are identical on every rank, so one rank is enough).",
    ),
    Setting(
        "GRADWATCH_FILE_SD",
        "unset",
        "a file path",
        "Rank 0 writes a Prometheus `file_sd` target file there listing every rank's /metrics"
        " host:port with `rank` labels (gathered from all ranks at the first step; every rank"
        " must see the same setting).",
    ),
    Setting(
        "OTEL_METRICS_EXPORTER",
        "prometheus",
        "comma-separated: prometheus, otlp, none",
        "prometheus: the pull endpoint /metrics; otlp: push the same metrics over OTLP/HTTP"
        " (`pip install gradwatch[otlp]`; configured by the standard OTEL_EXPORTER_OTLP_* and"
        " OTEL_METRIC_EXPORT_INTERVAL variables); `otlp` alone turns the endpoint off, use"
        " `otlp,prometheus` for both.",
    ),
)


@dataclass(frozen=True)
class Config:
    """Resolved settings for one process."""

    enabled: bool | None = None  # None: GRADWATCH unset
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    every: int = 1
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    per_param: bool = False
    max_params: int = 500
    max_groups: int = 100
    vanishing_threshold: float = 1e-7
    exploding_threshold: float = 1e2
    backend: str = "auto"
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    distributed: str = "auto"
    per_param_ranks: tuple[int, ...] | None = (0,)  # None: all ranks
    file_sd: str | None = None
    exporters: tuple[str, ...] = ("prometheus",)
    update_every: int = 0  # opt-in: a sampled step holds an fp32 copy of the params
    micro_batch_size: int | None = None  # None: gradient noise scale off
    loss_accumulation: str = "mean"
    noise_ema: float = 0.95
    local_rank: int = 0
    rank: int = 0
    world_size: int = 1

    def with_overrides(self, **kw: object) -> Config:
        """Apply explicit `watch()` arguments (None means: keep the env/default value)."""
        kw = {k: v for k, v in kw.items() if v is not None}
        if "groups" in kw:
            kw["groups"] = normalize_groups(kw["groups"])  # type: ignore[arg-type]
        cfg = replace(self, **kw)  # type: ignore[arg-type]
        validate(cfg)
        return cfg

    @property
    def per_param_here(self) -> bool:
        """GRADWATCH_PER_PARAM is on and this rank is one of GRADWATCH_PER_PARAM_RANKS."""
        ranks = self.per_param_ranks
        return self.per_param and (ranks is None or self.rank in ranks)

    @property
    def serve_port(self) -> int:
        """Port this process serves on: one endpoint per local rank."""
        return 0 if self.port == 0 else self.port + self.local_rank


def parse_bool(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingError(name, raw, ", ".join(TRUE_WORDS) + " or " + ", ".join(FALSE_WORDS))


def parse_int(name: str, raw: str, lo: int, hi: int | None = None) -> int:
    accepted = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    text = raw.strip()
    if not text.isascii() or not text.lstrip("+-").isdigit() or len(text) > 12:
        raise SettingError(name, raw, accepted)
    value = int(text)
    if value < lo or (hi is not None and value > hi):
        raise SettingError(name, raw, accepted)
    return value


def parse_float(name: str, raw: str, lo: float, lo_inclusive: bool) -> float:
    accepted = f"a finite number {'>=' if lo_inclusive else '>'} {lo:g}"
    try:
        if not raw.isascii():  # float() would accept other scripts' digits
            raise ValueError(raw)
        value = float(raw.strip())
    except ValueError:
        raise SettingError(name, raw, accepted) from None
    if not math.isfinite(value) or value < lo or (value == lo and not lo_inclusive):
        raise SettingError(name, raw, accepted)
    return value


def parse_file(name: str, raw: str) -> str:
    path = raw.strip()
    if not path or not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise SettingError(name, raw, "the path of an existing, readable PEM file")
    return path


def parse_host(name: str, raw: str) -> str:
    host = raw.strip()
    ok = host and host.isascii() and all(c.isalnum() or c in ".-:_[]" for c in host)
    if not ok or len(host) > 253:
        raise SettingError(name, raw, "an IP address or host name such as 127.0.0.1 or 0.0.0.0")
    return host.strip("[]")


_GROUPS_ACCEPTED = "comma-separated name=prefix pairs, e.g. host=host.,seed=seed. (name: letters,"
_GROUPS_ACCEPTED += " digits, _ or -; several prefixes joined by |)"


def parse_groups(name: str, raw: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    groups: dict[str, tuple[str, ...]] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        label, sep, prefixes = item.partition("=")
        label = label.strip()
        valid_label = label and label.isascii() and all(c.isalnum() or c in "_-" for c in label)
        parts = tuple(p.strip() for p in prefixes.split("|") if p.strip())
        if not sep or not valid_label or not parts or label in groups or label == "other":
            raise SettingError(name, raw, _GROUPS_ACCEPTED)
        groups[label] = parts
    if not groups:
        raise SettingError(name, raw, _GROUPS_ACCEPTED)
    return tuple(groups.items())


def normalize_groups(groups: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Accept {"host": "host."} or {"host": ["host.", "stem."]} or the parsed tuple form."""
    if isinstance(groups, str):
        return parse_groups("groups", groups)
    items = groups.items() if isinstance(groups, Mapping) else groups
    out = []
    for label, prefixes in items:  # type: ignore[union-attr]
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        out.append((str(label), tuple(str(p) for p in prefixes)))
    text = ",".join(f"{k}={'|'.join(v)}" for k, v in out)
    return parse_groups("groups", text) if out else ()


def validate(cfg: Config) -> None:
    """Checks for values given as Python arguments (env values are checked while parsing)."""
    if not (isinstance(cfg.every, int) and cfg.every >= 1):
        raise SettingError("every", cfg.every, "an integer >= 1")
    if not (isinstance(cfg.port, int) and 0 <= cfg.port <= 65535):
        raise SettingError("port", cfg.port, "an integer from 0 to 65535")
    if not (isinstance(cfg.max_params, int) and cfg.max_params >= 1):
        raise SettingError("max_params", cfg.max_params, "an integer >= 1")
    if not (isinstance(cfg.max_groups, int) and cfg.max_groups >= 2):
        raise SettingError("max_groups", cfg.max_groups, "an integer >= 2")
    if not (isinstance(cfg.update_every, int) and cfg.update_every >= 0):
        raise SettingError("update_every", cfg.update_every, "an integer >= 0")
    mbs = cfg.micro_batch_size
    if mbs is not None and not (isinstance(mbs, int) and not isinstance(mbs, bool) and mbs >= 1):
        raise SettingError("micro_batch_size", mbs, "an integer >= 1")
    if cfg.loss_accumulation not in LOSS_ACCUMULATIONS:
        raise SettingError("loss_accumulation", cfg.loss_accumulation, "mean, sum")
    ema = cfg.noise_ema
    if not (isinstance(ema, int | float) and math.isfinite(ema) and 0 <= ema < 1):
        raise SettingError("noise_ema", ema, "a number from 0 to 1, 1 excluded")
    if cfg.backend not in BACKENDS:
        raise SettingError("backend", cfg.backend, ", ".join(BACKENDS))
    if not (math.isfinite(cfg.vanishing_threshold) and cfg.vanishing_threshold >= 0):
        raise SettingError("vanishing_threshold", cfg.vanishing_threshold, "a finite number >= 0")
    if not (math.isfinite(cfg.exploding_threshold) and cfg.exploding_threshold > 0):
        raise SettingError("exploding_threshold", cfg.exploding_threshold, "a finite number > 0")
    parse_host("host", cfg.host)
    for field_name in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(cfg, field_name):
            parse_file(field_name, getattr(cfg, field_name))
    if (cfg.tls_key or cfg.tls_client_ca) and not cfg.tls_cert:
        raise SettingError("tls_cert", "", "a certificate whenever a TLS key or client CA is set")
    if cfg.distributed not in DISTRIBUTED_MODES:
        raise SettingError("distributed", cfg.distributed, ", ".join(DISTRIBUTED_MODES))


def parse_rank_list(name: str, raw: str) -> tuple[int, ...] | None:
    accepted = "all, or comma-separated ranks (integers >= 0), e.g. 0 or 0,8,16"
    text = raw.strip().lower()
    if text == "all":
        return None
    items = [x.strip() for x in text.split(",")]
    if not text or any(not x for x in items):
        raise SettingError(name, raw, accepted)
    ranks = []
    for x in items:
        try:
            ranks.append(parse_int(name, x, 0, 10**7))
        except SettingError:
            raise SettingError(name, raw, accepted) from None
    return tuple(sorted(set(ranks)))


def parse_path(name: str, raw: str) -> str:
    path = raw.strip()
    if not path or "\0" in path or len(path) > 4096 or path.endswith(("/", "\\")):
        raise SettingError(name, raw, "a file path (not a directory)")
    return path


def parse_exporters(name: str, raw: str) -> tuple[str, ...]:
    accepted = "comma-separated: " + ", ".join(METRICS_EXPORTERS)
    items = [x.strip().lower() for x in raw.split(",")]
    if not raw.strip() or any(x not in METRICS_EXPORTERS for x in items):
        raise SettingError(name, raw, accepted)
    if "none" in items and len(set(items)) > 1:
        raise SettingError(name, raw, accepted + " (none alone)")
    return tuple(x for x in dict.fromkeys(items) if x != "none")


def _rank_var(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    return default if raw is None or raw == "" else parse_int(name, raw, 0)


def from_env(env: Mapping[str, str] | None = None) -> Config:
    """Read every GRADWATCH_* variable (and torchrun's rank variables). Raises SettingError."""
    env = os.environ if env is None else env
    kw: dict[str, object] = {}
    if (raw := env.get("GRADWATCH")) is not None:
        kw["enabled"] = parse_bool("GRADWATCH", raw)
    if (raw := env.get("GRADWATCH_PORT")) is not None:
        kw["port"] = parse_int("GRADWATCH_PORT", raw, 0, 65535)
    if (raw := env.get("GRADWATCH_HOST")) is not None:
        kw["host"] = parse_host("GRADWATCH_HOST", raw)
    if (raw := env.get("GRADWATCH_EVERY")) is not None:
        kw["every"] = parse_int("GRADWATCH_EVERY", raw, 1, 10**9)
    if (raw := env.get("GRADWATCH_GROUPS")) is not None:
        kw["groups"] = parse_groups("GRADWATCH_GROUPS", raw)
    if (raw := env.get("GRADWATCH_PER_PARAM")) is not None:
        kw["per_param"] = parse_bool("GRADWATCH_PER_PARAM", raw)
    if (raw := env.get("GRADWATCH_MAX_PARAMS")) is not None:
        kw["max_params"] = parse_int("GRADWATCH_MAX_PARAMS", raw, 1, 10**6)
    if (raw := env.get("GRADWATCH_MAX_GROUPS")) is not None:
        kw["max_groups"] = parse_int("GRADWATCH_MAX_GROUPS", raw, 2, 10**5)
    if (raw := env.get("GRADWATCH_VANISHING_THRESHOLD")) is not None:
        kw["vanishing_threshold"] = parse_float("GRADWATCH_VANISHING_THRESHOLD", raw, 0.0, True)
    if (raw := env.get("GRADWATCH_EXPLODING_THRESHOLD")) is not None:
        kw["exploding_threshold"] = parse_float("GRADWATCH_EXPLODING_THRESHOLD", raw, 0.0, False)
    if (raw := env.get("GRADWATCH_UPDATE_EVERY")) is not None:
        kw["update_every"] = parse_int("GRADWATCH_UPDATE_EVERY", raw, 0, 10**9)
    if (raw := env.get("GRADWATCH_MICRO_BATCH_SIZE")) is not None:
        kw["micro_batch_size"] = parse_int("GRADWATCH_MICRO_BATCH_SIZE", raw, 1, 10**9)
    if (raw := env.get("GRADWATCH_LOSS_ACCUMULATION")) is not None:
        if raw.strip().lower() not in LOSS_ACCUMULATIONS:
            raise SettingError("GRADWATCH_LOSS_ACCUMULATION", raw, ", ".join(LOSS_ACCUMULATIONS))
        kw["loss_accumulation"] = raw.strip().lower()
    if (raw := env.get("GRADWATCH_NOISE_EMA")) is not None:
        kw["noise_ema"] = parse_float("GRADWATCH_NOISE_EMA", raw, 0.0, True)
        if kw["noise_ema"] >= 1:
            raise SettingError("GRADWATCH_NOISE_EMA", raw, "a number from 0 to 1, 1 excluded")
    if (raw := env.get("GRADWATCH_BACKEND")) is not None:
        if raw.strip().lower() not in BACKENDS:
            raise SettingError("GRADWATCH_BACKEND", raw, ", ".join(BACKENDS))
        kw["backend"] = raw.strip().lower()
    for field_name in ("tls_cert", "tls_key", "tls_client_ca"):
        var = "GRADWATCH_" + field_name.upper()
        if (raw := env.get(var)) is not None:
            kw[field_name] = parse_file(var, raw)
    if (raw := env.get("GRADWATCH_DISTRIBUTED")) is not None:
        if raw.strip().lower() not in DISTRIBUTED_MODES:
            raise SettingError("GRADWATCH_DISTRIBUTED", raw, ", ".join(DISTRIBUTED_MODES))
        kw["distributed"] = raw.strip().lower()
    if (raw := env.get("GRADWATCH_PER_PARAM_RANKS")) is not None:
        kw["per_param_ranks"] = parse_rank_list("GRADWATCH_PER_PARAM_RANKS", raw)
    if (raw := env.get("GRADWATCH_FILE_SD")) is not None:
        kw["file_sd"] = parse_path("GRADWATCH_FILE_SD", raw)
    if (raw := env.get("OTEL_METRICS_EXPORTER")) is not None:
        kw["exporters"] = parse_exporters("OTEL_METRICS_EXPORTER", raw)
    kw["local_rank"] = _rank_var(env, "LOCAL_RANK", 0)
    kw["rank"] = _rank_var(env, "RANK", 0)
    world = _rank_var(env, "WORLD_SIZE", 1)
    if world < 1:
        raise SettingError("WORLD_SIZE", env.get("WORLD_SIZE"), "an integer >= 1")
    kw["world_size"] = world
    cfg = Config(**kw)  # type: ignore[arg-type]
    if cfg.port and cfg.serve_port > 65535:
        raise SettingError(
            "GRADWATCH_PORT",
            env.get("GRADWATCH_PORT"),
            "a port that leaves room for PORT + LOCAL_RANK <= 65535",
        )
    return cfg


def settings_markdown() -> str:
    """README's settings table, generated from SETTINGS."""
    rows = ["| variable | default | accepted values | meaning |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | `{s.default}` | {s.accepted} | {s.meaning} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"
