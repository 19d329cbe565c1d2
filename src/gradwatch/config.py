"""Settings: every environment variable gradwatch reads, parsed in one place.

Each setting is declared once, as a field of :class:`Config` made by :func:`setting`: its type,
default, variable, parser and README row. The environment's parsing, ``watch()``'s arguments and
their check, README's settings table and ``watch()``'s docstring are all read from that table.

A bad value raises :class:`SettingError`, whose message is one line naming the variable, the value
and what is accepted. Callers on the training path turn it into one line on stderr and switch
telemetry off; it never reaches the training loop.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import numbers
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
BACKENDS = ("auto", "native", "torch", "triton")
DISTRIBUTED_MODES = ("auto", "off")
LOSS_ACCUMULATIONS = ("mean", "sum")
METRICS_EXPORTERS = ("prometheus", "otlp", "none")
DEFAULT_PORT = 9464


MAX_SHOWN = 80  # a value is cut to about this many characters in messages


def shown(value: object) -> str:
    """repr() of a value for a one-line message, cut when long (a 5 kB value is not echoed)."""
    text = repr(value)
    if len(text) <= MAX_SHOWN:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return text[: MAX_SHOWN - 3] + "..." + size


def _message(name: str, value: object, accepted: str, problem: str) -> str:
    what = f": {problem}" if problem else ""
    return f"gradwatch: {name}={shown(value)} is not valid{what}; accepted: {accepted}"


class SettingError(ValueError):
    """A setting has a value gradwatch cannot use. ``str()`` is the one-line explanation."""

    def __init__(self, name: str, value: object, accepted: str, problem: str = "") -> None:
        self.name, self.value, self.accepted, self.problem = name, value, accepted, problem
        super().__init__(_message(name, value, accepted, problem))


class TLSError(OSError):
    """TLS material gradwatch cannot use (raised by :func:`tls_context`). An OSError, so that
    the endpoint's start treats it like a port already taken: one log line, training goes on.
    Settings validation turns it into a :class:`SettingError`."""

    def __init__(self, name: str, value: object, accepted: str, problem: str) -> None:
        self.name, self.value, self.accepted, self.problem = name, value, accepted, problem
        super().__init__(_message(name, value, accepted, problem))


# ---- values: one parser per kind, for environment text and watch() arguments alike ----------

_SPACE = "[ \t\r\n\f\v]*"  # ASCII whitespace only (str.strip() would take U+3000 too)
_INT_RE = re.compile(f"{_SPACE}([+-]?[0-9]{{1,12}}){_SPACE}")
_FLOAT_RE = re.compile(
    f"{_SPACE}([+-]?(?:[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+)(?:[eE][+-]?[0-9]{{1,4}})?){_SPACE}"
)


def _int_accepted(lo: int, hi: int) -> str:
    return f"an integer from {lo} to {hi}"


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """A Python integer (not a bool: True would be port 1) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingError(name, value, _int_accepted(lo, hi))
    number = int(value)
    if not lo <= number <= hi:
        raise SettingError(name, value, _int_accepted(lo, hi))
    return number


def parse_int(name: str, raw: str, lo: int, hi: int) -> int:
    """Strict: optional sign, ASCII digits, surrounding whitespace; nothing else (`--5`, `+-3`,
    `1_0`, `0x10`, `٣` are refused, never passed to int())."""
    match = _INT_RE.fullmatch(raw)
    if match is None:
        raise SettingError(name, raw, _int_accepted(lo, hi))
    value = int(match.group(1))
    if not lo <= value <= hi:
        raise SettingError(name, raw, _int_accepted(lo, hi))
    return value


def _float_accepted(lo: float, lo_inclusive: bool, hi: float | None) -> str:
    if hi is not None:
        return f"a number from {lo:g} to {hi:g}, {hi:g} excluded"
    return f"a finite number {'>=' if lo_inclusive else '>'} {lo:g}"


def check_float(
    name: str, value: object, lo: float, lo_inclusive: bool, hi: float | None = None
) -> float:
    """A finite real number (not a bool) above lo and, when given, below hi."""
    accepted = _float_accepted(lo, lo_inclusive, hi)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingError(name, value, accepted)
    number = float(value)
    ok = math.isfinite(number) and (number > lo or (lo_inclusive and number == lo))
    if not ok or (hi is not None and number >= hi):
        raise SettingError(name, value, accepted)
    return number


def parse_float(
    name: str, raw: str, lo: float, lo_inclusive: bool, hi: float | None = None
) -> float:
    """Strict decimal notation (float() would also take `1_0`, `infinity`, other scripts)."""
    match = _FLOAT_RE.fullmatch(raw)
    if match is None:
        raise SettingError(name, raw, _float_accepted(lo, lo_inclusive, hi))
    try:
        return check_float(name, float(match.group(1)), lo, lo_inclusive, hi)
    except SettingError:
        raise SettingError(name, raw, _float_accepted(lo, lo_inclusive, hi)) from None


def parse_bool(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingError(name, raw, ", ".join(TRUE_WORDS) + " or " + ", ".join(FALSE_WORDS))


def parse_choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    word = raw.strip().lower()
    if word not in choices:
        raise SettingError(name, raw, ", ".join(choices))
    return word


_FILE_ACCEPTED = "the path of an existing, readable PEM file"


def parse_file(name: str, raw: str) -> str:
    path = raw.strip()
    if not path or "\0" in path:
        raise SettingError(name, raw, _FILE_ACCEPTED)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SettingError(name, raw, _FILE_ACCEPTED, exc.strerror or "cannot stat it") from None
    if not stat.S_ISREG(mode):
        raise SettingError(name, raw, _FILE_ACCEPTED, "not a regular file")
    try:
        with open(path, "rb") as f:  # a real read: os.access() says yes to root for mode 000
            f.read(1)
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
        raise SettingError(name, raw, _FILE_ACCEPTED, problem) from None
    return path


_HOST_ACCEPTED = (
    "an IPv4 address (127.0.0.1, 0.0.0.0 for all interfaces), an IPv6 address (::1, :: for all"
    " interfaces) or a host name"
)
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


def parse_host(name: str, raw: str) -> str:
    """An IP address (returned in its canonical spelling: `0::0` -> `::`, `[::1]` -> `::1`,
    `::ffff:1.2.3.4` -> `1.2.3.4`) or a host name. Numeric spellings that are not a plain address
    (`0`, `0x0`, `127.1`, `0.0.0.00`) are refused: the C library would read `0` as 0.0.0.0 and
    bind every interface with no warning."""
    host = raw.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not host.isascii() or len(host) > 253:
        raise SettingError(name, raw, _HOST_ACCEPTED)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return str(address)
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        problem = "a numeric spelling that is not a plain IPv4 or IPv6 address (ambiguous)"
        raise SettingError(name, raw, _HOST_ACCEPTED, problem)
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise SettingError(name, raw, _HOST_ACCEPTED)
    return host


def is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def binds_all_interfaces(host: str) -> bool:
    """True when binding ``host`` listens on every interface: 0.0.0.0, :: (any spelling, once
    parsed by :func:`parse_host`), or a host name the system resolves to 0.0.0.0."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        pass
    if not host:
        return True
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False  # the bind will fail and say so
    return any(ipaddress.ip_address(info[4][0]).is_unspecified for info in infos)


def server_class(cls: type, host: str) -> type:
    """``cls`` (a socketserver class, AF_INET) or its AF_INET6 twin when ``host`` is an IPv6
    literal such as ``::1`` or ``::``."""
    return _inet6_twin(cls) if is_ipv6(host) else cls


@functools.cache
def _inet6_twin(cls: type) -> type:
    return type(cls.__name__ + "6", (cls,), {"address_family": socket.AF_INET6})


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


def normalize_groups(
    groups: object, name: str = "groups"
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Accept {"host": "host."} or {"host": ["host.", "stem."]} or the parsed tuple form."""
    if isinstance(groups, str):
        return parse_groups(name, groups)
    try:
        items = list(groups.items() if isinstance(groups, Mapping) else groups)  # type: ignore
        out = []
        for label, prefixes in items:
            if isinstance(prefixes, str):
                prefixes = (prefixes,)
            out.append((str(label), tuple(str(p) for p in prefixes)))
    except (TypeError, ValueError):
        raise SettingError(name, groups, _GROUPS_ACCEPTED) from None
    text = ",".join(f"{k}={'|'.join(v)}" for k, v in out)
    return parse_groups(name, text) if out else ()


MAX_RANK = 10**7
_RANKS_ACCEPTED = "all, or comma-separated ranks (integers >= 0), e.g. 0 or 0,8,16"


def parse_rank_list(name: str, raw: str) -> tuple[int, ...] | None:
    text = raw.strip().lower()
    if text == "all":
        return None
    items = [x.strip() for x in text.split(",")]
    if not text or any(not x for x in items):
        raise SettingError(name, raw, _RANKS_ACCEPTED)
    ranks = []
    for x in items:
        try:
            ranks.append(parse_int(name, x, 0, MAX_RANK))
        except SettingError:
            raise SettingError(name, raw, _RANKS_ACCEPTED) from None
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


# ---- parsers: one per setting, for environment text and watch() arguments alike --------------

Parser = Callable[[str, object], object]  # (name shown in messages, text or Python value)


def _text_or(kind: str, from_text: Callable[[str, str], object], other: Callable | None = None):
    """A parser: text goes through ``from_text`` (as the environment's does); other Python
    values through ``other``, or are refused."""

    def parse(name: str, value: object) -> object:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            return from_text(name, value)
        if other is None:
            raise SettingError(name, value, kind)
        return other(name, value)

    return parse


def _int_field(lo: int, hi: int) -> Parser:
    return _text_or(
        _int_accepted(lo, hi),
        lambda n, v: parse_int(n, v, lo, hi),
        lambda n, v: check_int(n, v, lo, hi),
    )


def _float_field(lo: float, lo_inclusive: bool, hi: float | None = None) -> Parser:
    return _text_or(
        _float_accepted(lo, lo_inclusive, hi),
        lambda n, v: parse_float(n, v, lo, lo_inclusive, hi),
        lambda n, v: check_float(n, v, lo, lo_inclusive, hi),
    )


def _check_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise SettingError(name, value, "True or False")


def _choice_field(choices: tuple[str, ...]) -> Parser:
    return _text_or(", ".join(choices), lambda n, v: parse_choice(n, v, choices))


def _check_ranks(name: str, value: object) -> tuple[int, ...]:
    try:
        items = list(value)  # type: ignore[call-overload]
    except TypeError:
        raise SettingError(name, value, _RANKS_ACCEPTED) from None
    if not items:
        raise SettingError(name, value, _RANKS_ACCEPTED)
    return tuple(sorted({check_int(name, r, 0, MAX_RANK) for r in items}))


def _check_exporters(name: str, value: object) -> tuple[str, ...]:
    items = list(value) if isinstance(value, (list, tuple, set, frozenset)) else None
    if items is None or not all(isinstance(x, str) for x in items):
        raise SettingError(name, value, "comma-separated: " + ", ".join(METRICS_EXPORTERS))
    return parse_exporters(name, ",".join(items) if items else "none")


# ---- the settings table: every setting declared once, as a Config field ---------------------

# What watch() takes for a setting besides its variable's text (a str is parsed exactly like the
# variable). watch()'s signature spells the same types; a test holds the two together.
PathArg = str | os.PathLike[str]
GroupsArg = str | Mapping[str, str | Iterable[str]] | Iterable[tuple[str, str | Iterable[str]]]
RanksArg = str | Iterable[int]
ExportersArg = str | Sequence[str] | AbstractSet[str]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Setting:
    """One row of the settings table: a :class:`Config` field, the variable it is read from, its
    one parser, and how README and ``watch()``'s docstring describe it."""

    name: str  # the Config field, and watch()'s keyword when it is one
    var: str  # the environment variable
    parse: Parser
    default: object  # the field's typed default
    shown_default: str  # the default as README shows it
    accepted: str  # README's accepted values ("" for launcher variables)
    meaning: str
    argument: object  # watch()'s annotation for the keyword (None, "keep", added)
    launcher: bool  # set by torchrun and the like: no README row, set but empty means unset


def setting(
    default: _T,
    var: str,
    parse: Parser,
    *,
    accepted: str = "",
    meaning: str = "",
    shown_default: str | None = None,
    argument: object,
    launcher: bool = False,
) -> _T:
    """A Config field with its settings-table row in the field's metadata (see :data:`TABLE`).
    Typed as the default so that a type checker reads ``port: int = setting(9464, ...)`` as a
    plain int field with a default."""
    row = {
        "var": var,
        "parse": parse,
        "shown_default": str(default) if shown_default is None else shown_default,
        "accepted": accepted,
        "meaning": meaning,
        "argument": argument,
        "launcher": launcher,
    }
    return field(default=default, metadata={"setting": row})


_BOOL_ACCEPTED = "1/true/yes/on, 0/false/no/off"
_BOOL = _text_or("", parse_bool, _check_bool)


@dataclass(frozen=True)
class Config:
    """Resolved settings for one process, and the settings table: each field is one setting (its
    variable, parser, README row and ``watch()`` keyword), in README's order."""

    enabled: bool | None = setting(  # None: GRADWATCH unset
        None,
        "GRADWATCH",
        _BOOL,
        shown_default="unset",
        accepted=_BOOL_ACCEPTED,
        meaning="1 turns on no-code mode (every optimizer is watched); 0 turns every form off,"
        " `watch()` included.",
        argument=bool | str,
    )
    port: int = setting(
        DEFAULT_PORT,
        "GRADWATCH_PORT",
        _int_field(0, 65535),
        accepted="integer 1-65535 (0: any free port)",
        meaning="Port of `/metrics`; under torchrun each rank uses PORT + LOCAL_RANK.",
        argument=int | str,
    )
    host: str = setting(
        "127.0.0.1",
        "GRADWATCH_HOST",
        _text_or(_HOST_ACCEPTED, parse_host),
        accepted="an IPv4 or IPv6 address, or a host name",
        meaning="Interface `/metrics` binds to. `0.0.0.0` or `::` exposes it to the network (a"
        " warning is logged); an IPv6 address (`::1`) is served over IPv6. Numeric spellings that"
        " are not a plain address (`0`, `0x0`, `127.1`, `0.0.0.00`) are refused: the system reads"
        " `0` as 0.0.0.0.",
        argument=str,
    )
    every: int = setting(
        1,
        "GRADWATCH_EVERY",
        _int_field(1, 10**9),
        accepted="integer from 1 to 10^9",
        meaning="Collect every N-th optimizer step (steps 1, N+1, 2N+1, ...).",
        argument=int | str,
    )
    groups: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (),
        "GRADWATCH_GROUPS",
        lambda n, v: normalize_groups(v, n),
        shown_default="optimizer param groups",
        accepted="`name=prefix[|prefix...]` pairs separated by commas, e.g."
        " `host=host.,seed=seed.`",
        meaning="Groups of `grad_group_*` by parameter-name prefix; params matching no prefix go"
        " to group `other`.",
        argument=GroupsArg,
    )
    per_param: bool = setting(
        False,
        "GRADWATCH_PER_PARAM",
        _BOOL,
        shown_default="0",
        accepted=_BOOL_ACCEPTED,
        meaning="Export the `grad_param_*` series, one per parameter tensor.",
        argument=bool | str,
    )
    max_params: int = setting(
        500,
        "GRADWATCH_MAX_PARAMS",
        _int_field(1, 10**6),
        accepted="integer from 1 to 10^6",
        meaning="Cap on parameters with `grad_param_*` series; a warning is logged when it bites.",
        argument=int | str,
    )
    max_groups: int = setting(
        100,
        "GRADWATCH_MAX_GROUPS",
        _int_field(2, 10**5),
        accepted="integer from 2 to 10^5",
        meaning="Cap on `grad_group_*` groups; groups past it are merged into group `_overflow`,"
        " with a warning.",
        argument=int | str,
    )
    vanishing_threshold: float = setting(
        1e-7,
        "GRADWATCH_VANISHING_THRESHOLD",
        _float_field(0.0, True),
        accepted="finite number >= 0",
        meaning="A tensor whose gradient L2 norm is below this counts in `grad_tensors_vanishing`.",
        argument=float | str,
    )
    exploding_threshold: float = setting(
        1e2,
        "GRADWATCH_EXPLODING_THRESHOLD",
        _float_field(0.0, False),
        shown_default="100",
        accepted="finite number > 0",
        meaning="A tensor whose gradient L2 norm is above this counts in `grad_tensors_exploding`.",
        argument=float | str,
    )
    update_every: int = setting(  # opt-in: a sampled step holds an fp32 copy of the params
        0,
        "GRADWATCH_UPDATE_EVERY",
        _int_field(0, 10**9),
        accepted="integer from 0 to 10^9 (0: off)",
        meaning="Sample the parameter update every N-th optimizer step (steps 1, N+1, ...):"
        " `update_*` and `param_*` statistics. Opt-in because it costs one fp32 copy of the"
        " parameters with gradients, held from the step's pre-hook to its post-hook (28 GB for"
        " 7B parameters on one device): size it before turning it on.",
        argument=int | str,
    )
    micro_batch_size: int | None = setting(  # None: gradient noise scale off
        None,
        "GRADWATCH_MICRO_BATCH_SIZE",
        _int_field(1, 10**9),
        shown_default="unset (off)",
        accepted="integer from 1 to 10^9",
        meaning="Samples per micro-batch under gradient accumulation: turns on the gradient noise"
        " scale (`grad_noise_*`). gradwatch counts the backward passes between two optimizer"
        " steps (k) and reads the first one's gradient (B_small = this size) against the step's"
        " accumulated gradient (B_big = k x this size); steps with k = 1 add nothing. Costs one"
        " extra reduction over the gradients per collected step, at the end of the window's"
        " first backward. Single-process data only (see README, Gradient noise scale).",
        argument=int | str,
    )
    loss_accumulation: str = setting(
        "mean",
        "GRADWATCH_LOSS_ACCUMULATION",
        _choice_field(LOSS_ACCUMULATIONS),
        accepted=", ".join(LOSS_ACCUMULATIONS),
        meaning="How the loop accumulates micro-batch losses: mean, each micro-batch loss divided"
        " by the number of micro-batches (`loss / accum_steps`, the accumulated .grad is the"
        " window's mean gradient); sum, losses not divided (.grad is the sum of the micro-batch"
        " gradients).",
        argument=str,
    )
    noise_ema: float = setting(
        0.95,
        "GRADWATCH_NOISE_EMA",
        _float_field(0.0, True, 1.0),
        accepted="number from 0 to 1, 1 excluded",
        meaning="Decay of the exponential moving averages of the noise-scale estimates (0: the"
        " last step's estimates alone).",
        argument=float | str,
    )
    backend: str = setting(
        "auto",
        "GRADWATCH_BACKEND",
        _choice_field(BACKENDS),
        accepted=", ".join(BACKENDS),
        meaning="Reduction backend: auto picks Triton on CUDA and the compiled C kernel on the"
        " CPU, falling back to plain torch ops (on CUDA: device ops without host sync, ~10"
        " launches per tensor).",
        argument=str,
    )
    tls_cert: str = setting(
        "",
        "GRADWATCH_TLS_CERT",
        _text_or(_FILE_ACCEPTED, parse_file),
        shown_default="unset",
        accepted="path of a readable PEM certificate (chain) file, valid now",
        meaning="Serve `/metrics` over HTTPS with this certificate. Certificate, key and client CA"
        " are loaded when the settings are read: a missing or unreadable file, an expired or not"
        " yet valid certificate, a key that does not match it or is passphrase-protected (never"
        " prompted for) is one line naming the variable, and telemetry is off.",
        argument=PathArg,
    )
    tls_key: str = setting(
        "",
        "GRADWATCH_TLS_KEY",
        _text_or(_FILE_ACCEPTED, parse_file),
        shown_default="unset (key inside the cert file)",
        accepted="path of a readable, unencrypted PEM private key file",
        meaning="Private key of the certificate; only with GRADWATCH_TLS_CERT.",
        argument=PathArg,
    )
    tls_client_ca: str = setting(
        "",
        "GRADWATCH_TLS_CLIENT_CA",
        _text_or(_FILE_ACCEPTED, parse_file),
        shown_default="unset",
        accepted="path of a readable PEM CA file",
        meaning="Mutual TLS: only clients with a certificate signed by this CA may scrape; only"
        " with GRADWATCH_TLS_CERT (without it the setting is refused, never served as plain"
        " HTTP).",
        argument=PathArg,
    )
    distributed: str = setting(
        "auto",
        "GRADWATCH_DISTRIBUTED",
        _choice_field(DISTRIBUTED_MODES),
        accepted=", ".join(DISTRIBUTED_MODES),
        meaning="auto: when torch.distributed is initialized with world size > 1 and some"
        " gradients are DTensors (FSDP2, tensor parallel), each rank reduces its local shards and"
        " one small all-reduce per collected step combines them into exact global statistics"
        " (identical on every rank); plain-tensor gradients (DDP) are already identical on every"
        " rank and need none. off: every rank reports its own local gradients. See"
        " docs/distributed.md.",
        argument=str,
    )
    per_param_ranks: tuple[int, ...] | None = setting(  # None: all ranks
        (0,),
        "GRADWATCH_PER_PARAM_RANKS",
        _text_or(_RANKS_ACCEPTED, parse_rank_list, _check_ranks),
        shown_default="0",
        accepted="`all`, or comma-separated global ranks, e.g. `0` or `0,8,16`",
        meaning="Ranks that export the `grad_param_*` series when GRADWATCH_PER_PARAM=1 (combined"
        " statistics are identical on every rank, so one rank is enough).",
        argument=RanksArg,
    )
    file_sd: str | None = setting(
        None,
        "GRADWATCH_FILE_SD",
        _text_or("a file path", parse_path),
        shown_default="unset",
        accepted="a file path",
        meaning="Rank 0 writes a Prometheus `file_sd` target file there listing every rank's"
        " /metrics host:port with `rank` labels (gathered from all ranks at the first step; every"
        " rank must see the same setting).",
        argument=PathArg,
    )
    exporters: tuple[str, ...] = setting(
        ("prometheus",),
        "OTEL_METRICS_EXPORTER",
        _text_or("", parse_exporters, _check_exporters),
        shown_default="prometheus",
        accepted="comma-separated: " + ", ".join(METRICS_EXPORTERS),
        meaning="prometheus: the pull endpoint /metrics; otlp: push the same metrics over"
        " OTLP/HTTP (`pip install gradwatch[otlp]`; configured by the standard"
        " OTEL_EXPORTER_OTLP_* and OTEL_METRIC_EXPORT_INTERVAL variables); `otlp` alone turns the"
        " endpoint off, use `otlp,prometheus` for both.",
        argument=ExportersArg,
    )
    local_rank: int = setting(
        0, "LOCAL_RANK", _int_field(0, MAX_RANK), argument=int | str, launcher=True
    )
    rank: int = setting(0, "RANK", _int_field(0, MAX_RANK), argument=int | str, launcher=True)
    world_size: int = setting(
        1, "WORLD_SIZE", _int_field(1, MAX_RANK + 1), argument=int | str, launcher=True
    )

    def with_overrides(self, **kw: object) -> Config:
        """Apply explicit `watch()` arguments (None means: keep the env/default value).

        Each argument goes through the same parser, with the same bounds, as its environment
        variable (a string argument is read exactly like the variable's text); then the merged
        settings get the same combination and TLS checks as :func:`from_env`."""
        unknown = [k for k in kw if k not in FIELDS]
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        parsed = {k: FIELDS[k].parse(k, v) for k, v in kw.items() if v is not None}
        return validate(replace(self, **parsed))  # type: ignore[arg-type]

    @property
    def per_param_here(self) -> bool:
        """GRADWATCH_PER_PARAM is on and this rank is one of GRADWATCH_PER_PARAM_RANKS."""
        ranks = self.per_param_ranks
        return self.per_param and (ranks is None or self.rank in ranks)

    @property
    def serve_port(self) -> int:
        """Port this process serves on: one endpoint per local rank."""
        return 0 if self.port == 0 else self.port + self.local_rank


TABLE: tuple[Setting, ...] = tuple(
    Setting(name=f.name, default=f.default, **f.metadata["setting"]) for f in fields(Config)
)
FIELDS: dict[str, Setting] = {s.name: s for s in TABLE}  # field name -> its row
SETTINGS: tuple[Setting, ...] = tuple(s for s in TABLE if not s.launcher)  # README's rows
# watch() takes every setting as a keyword: first the documented ones, in README's order, then
# the stand-ins for GRADWATCH (whose meaning is no-code mode's) and the launcher variables.
ARGUMENTS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.name != "enabled")
KEYWORDS: tuple[Setting, ...] = ARGUMENTS + tuple(s for s in TABLE if s not in ARGUMENTS)


def arguments_doc() -> str:
    """The keyword arguments of :func:`gradwatch.watch`, one paragraph each, made from the same
    table as the README's settings table (``watch()``'s docstring carries it)."""
    out = []
    for s in ARGUMENTS:
        meaning = s.meaning.replace("`", "")
        out.append(
            f"    ``{s.name}`` ({s.var}; default {s.shown_default}): {s.accepted}. {meaning}"
        )
    names = ", ".join(f"``{s.name}`` ({s.var})" for s in KEYWORDS[len(ARGUMENTS) :])
    out.append(
        f"    {names}: read like their variables and in their place, for tests and launchers"
        " that set none (``enabled=False``: telemetry off)."
    )
    return "\n".join(out)


def label(field_name: str) -> str:
    """How checks of the merged settings name a field: the same words whether it came from the
    environment or from watch()."""
    return f"{FIELDS[field_name].var}/{field_name}"


# ---- the merged settings: combinations and TLS material, for both paths ----------------------


def validate(cfg: Config) -> Config:
    """Checks that need more than one value, run on the final settings of either path (the
    environment alone, or the environment with watch() arguments): raises SettingError."""
    if (cfg.tls_key or cfg.tls_client_ca) and not cfg.tls_cert:
        field_name = "tls_client_ca" if cfg.tls_client_ca else "tls_key"
        raise SettingError(
            label(field_name),
            getattr(cfg, field_name),
            f"{label('tls_key')} and {label('tls_client_ca')} only with {label('tls_cert')}",
            f"set without {label('tls_cert')}: /metrics would be plain HTTP",
        )
    if cfg.port and cfg.serve_port > 65535:
        raise SettingError(
            label("port"),
            cfg.port,
            "a port that leaves room for PORT + LOCAL_RANK <= 65535",
            f"LOCAL_RANK={cfg.local_rank}",
        )
    if cfg.tls_cert:
        try:
            tls_context(cfg)
        except TLSError as exc:
            raise SettingError(exc.name, exc.value, exc.accepted, exc.problem) from None
    return cfg


class _PassphraseRefused(Exception):
    pass


def _refuse_passphrase(*_: object) -> bytes:
    """load_cert_chain's password callback: never a prompt (OpenSSL would read the terminal)."""
    raise _PassphraseRefused


def _check_dates(field_name: str, path: str, what: str) -> None:
    """The first certificate of ``path``: present, and valid now (not expired, not yet valid)."""
    import ssl

    accepted = f"a PEM file whose {what} is valid now"
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # a private CPython helper; without it only the load below checks
        return
    try:
        info = decode(path)
    except (ssl.SSLError, OSError):
        raise TLSError(label(field_name), path, accepted, f"no PEM {what} in it") from None
    try:
        not_before = ssl.cert_time_to_seconds(info["notBefore"])
        not_after = ssl.cert_time_to_seconds(info["notAfter"])
    except (KeyError, ValueError):
        return
    now = time.time()
    if now > not_after:
        problem = f"the {what} expired on {info['notAfter']}"
        raise TLSError(label(field_name), path, accepted, problem)
    if now < not_before:
        problem = f"the {what} is not valid before {info['notBefore']}"
        raise TLSError(label(field_name), path, accepted, problem)


def tls_context(cfg: Config):
    """The server SSLContext of /metrics (mutual TLS with a client CA), loaded and checked.

    Raises :class:`TLSError` naming the setting for a missing certificate, an expired or not yet
    valid one, a key that does not match it, a passphrase-protected key (never a prompt) or a
    client CA file with no certificate."""
    import ssl

    _check_dates("tls_cert", cfg.tls_cert, "certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    key_field = "tls_key" if cfg.tls_key else "tls_cert"
    key_path = cfg.tls_key or cfg.tls_cert
    key_accepted = f"an unencrypted PEM private key matching {label('tls_cert')}"
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None, password=_refuse_passphrase)
    except _PassphraseRefused:
        problem = "the private key is passphrase-protected and gradwatch never prompts for it"
        raise TLSError(label(key_field), key_path, key_accepted, problem) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"the private key does not match the certificate in {label('tls_cert')}"
        elif cfg.tls_key:
            problem = "no PEM private key in it"
        else:
            problem = f"no PEM private key in it, and {label('tls_key')} is not set"
        raise TLSError(label(key_field), key_path, key_accepted, problem) from None
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
        raise TLSError(label(key_field), key_path, key_accepted, problem) from None
    if cfg.tls_client_ca:
        _check_dates("tls_client_ca", cfg.tls_client_ca, "CA certificate")
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=cfg.tls_client_ca)
        except (ssl.SSLError, OSError):
            accepted = "a PEM file of the CA certificate(s) that sign client certificates"
            raise TLSError(
                label("tls_client_ca"), cfg.tls_client_ca, accepted, "no PEM CA certificate in it"
            ) from None
    return ctx


# ---- reading the environment -----------------------------------------------------------------


def read_env(env: Mapping[str, str] | None = None) -> Config:
    """Every variable parsed on its own (no combination checks: see :func:`from_env`)."""
    env = os.environ if env is None else env
    kw: dict[str, object] = {}
    for s in TABLE:
        raw = env.get(s.var)
        if raw is None or (raw == "" and s.launcher):
            continue
        kw[s.name] = s.parse(s.var, raw)
    return Config(**kw)  # type: ignore[arg-type]


def from_env(env: Mapping[str, str] | None = None) -> Config:
    """Read every GRADWATCH_* variable (and torchrun's rank variables) and check the result as
    watch() does (TLS material included). Raises SettingError."""
    return validate(read_env(env))


def settings_markdown() -> str:
    """README's settings table, generated from SETTINGS."""
    rows = ["| variable | default | accepted values | meaning |", "|---|---|---|---|"]
    rows += [f"| `{s.var}` | `{s.shown_default}` | {s.accepted} | {s.meaning} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"
