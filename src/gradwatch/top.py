"""``gradwatch top``: a live terminal view of one or many gradwatch endpoints.

Reads ``/metrics`` of each target (URLs, or a Prometheus ``file_sd`` JSON file listing every
rank), keeps a short history per rank and optimizer, and draws it with ``rich``: one row per
rank with the key statistics and a sparkline of the total gradient norm, the clip rate over
the history window, NaN/Inf incidents with the parameters named, and the largest per-parameter
norms when per-parameter series are exported. Ctrl-C exits cleanly.
"""

from __future__ import annotations

import json
import math
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 24  # scrapes kept per series (the sparkline's width)
WIDE = 110  # terminal columns from which every column is shown


@dataclass
class Series:
    """What the view keeps of one (target, rank, optimizer)."""

    target: str
    rank: str
    optimizer: str
    norms: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    steps: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # grad_steps_total
    clipped: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    latest: dict[str, float] = field(default_factory=dict)
    nonfinite_params: list[str] = field(default_factory=list)
    top_params: list[tuple[str, float]] = field(default_factory=list)


def targets_from(args: Sequence[str]) -> list[str]:
    """URLs as given (``/metrics`` added to a bare host:port URL); a file: file_sd targets."""
    out: list[str] = []
    for arg in args:
        if arg.startswith(("http://", "https://")):
            out.append(
                arg if arg.rstrip("/").endswith("/metrics") else arg.rstrip("/") + "/metrics"
            )
            continue
        with open(arg, encoding="utf-8") as f:
            groups = json.load(f)
        for group in groups:
            for target in group.get("targets", []):
                out.append(f"http://{target}/metrics")
    return out


def ssl_context(cacert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cacert)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def scrape(url: str, context: ssl.SSLContext | None, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
        return r.read().decode()


class View:
    """The state of the terminal view; :meth:`update` folds one scrape of one target in."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], Series] = {}
        self.errors: dict[str, str] = {}

    def update(self, target: str, text: str) -> None:
        self.errors.pop(target, None)
        rows: dict[tuple[str, str], dict] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                rank = s.labels.get("rank", "0")
                opt = s.labels.get("optimizer")
                if opt is None:
                    continue
                row = rows.setdefault((rank, opt), {"values": {}, "nan": [], "params": []})
                if s.name == "grad_nonfinite_param_info":
                    row["nan"].append((int(s.labels.get("position", 0)), s.labels.get("param")))
                elif s.name == "grad_param_l2_norm":
                    row["params"].append((s.labels.get("param", "?"), s.value))
                elif s.name == "grad_nonfinite_elements":
                    key = f"nonfinite_{s.labels.get('kind')}"
                    row["values"][key] = s.value
                elif s.name == "optimizer_learning_rate":
                    row["values"].setdefault("lr", s.value)
                elif len(s.labels.keys() - {"rank", "local_rank", "world_size", "optimizer"}) == 0:
                    row["values"][s.name] = s.value
        for (rank, opt), row in rows.items():
            key = (target, rank, opt)
            series = self.series.get(key) or self.series.setdefault(key, Series(target, rank, opt))
            values = row["values"]
            series.latest = values
            norm = values.get("grad_l2_norm")
            series.norms.append(norm if norm is not None else math.nan)
            series.steps.append(values.get("grad_steps_total", math.nan))
            series.clipped.append(values.get("grad_clipped_steps_total", math.nan))
            series.nonfinite_params = [p for _, p in sorted(row["nan"])]
            series.top_params = sorted(row["params"], key=lambda kv: -kv[1])[:5]

    def failed(self, target: str, exc: Exception) -> None:
        self.errors[target] = f"{type(exc).__name__}: {exc}"[:100]

    # ---- rendering ----
    def render(self, width: int | None = None):
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(
            title="gradwatch top", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False
        )
        # (header, justify, min width): numbers never shrink; the sparkline gives way first.
        # Under WIDE columns the less urgent ones (abs max, lr, loss scale) are left out.
        columns = [
            ("rank", "right", 4),
            ("opt", "right", 3),
            ("step", "right", 6),
            ("norm", "right", 9),
            ("history", "left", 0),
            ("pre-clip", "right", 9),
            ("clip%", "right", 5),
            ("abs max", "right", 9),
            ("lr", "right", 9),
            ("scale", "right", 7),
            ("NaN", "right", 3),
        ]
        wide = width is None or width >= WIDE
        if not wide:
            columns = [c for c in columns if c[0] not in ("abs max", "lr", "scale")]
        if len({k[2] for k in self.series}) <= 1:
            columns = [c for c in columns if c[0] != "opt"]
        names = [c[0] for c in columns]
        for name, justify, width_ in columns:
            table.add_column(
                name,
                justify=justify,
                no_wrap=True,
                min_width=width_ or None,
                overflow="crop" if not width_ else "fold",
                ratio=1 if not width_ else None,
            )
        parts: list = [table]
        for key in sorted(self.series, key=lambda k: (int(k[1]) if k[1].isdigit() else 0, k)):
            s = self.series[key]
            v = s.latest
            nonfinite = v.get("grad_nonfinite_steps_total", 0.0)
            cells = {
                "rank": s.rank,
                "opt": s.optimizer,
                "step": _fmt(v.get("grad_stats_step"), "d"),
                "norm": _fmt(v.get("grad_l2_norm")),
                "history": sparkline(s.norms),
                "pre-clip": _fmt(v.get("grad_preclip_l2_norm")),
                "clip%": clip_rate(s.steps, s.clipped),
                "abs max": _fmt(v.get("grad_abs_max")),
                "lr": _fmt(v.get("lr")),
                "scale": _fmt(v.get("amp_loss_scale")),
                "NaN": Text(_fmt(nonfinite, "d"), style="bold red" if nonfinite else ""),
            }
            table.add_row(*(cells[n] for n in names))
            if s.nonfinite_params:
                parts.append(
                    Text(
                        f"rank {s.rank} optimizer {s.optimizer}: NaN/Inf in "
                        + ", ".join(s.nonfinite_params),
                        style="bold red",
                    )
                )
            if s.top_params:
                top = ", ".join(f"{name} {value:.3g}" for name, value in s.top_params)
                parts.append(Text(f"rank {s.rank} largest grad_param_l2_norm: {top}"))
        for target, err in sorted(self.errors.items()):
            parts.append(Text(f"{target}: {err}", style="yellow"))
        if not self.series and not self.errors:
            parts.append(Text("waiting for the first scrape ..."))
        return Group(*parts)


def _fmt(v: float | None, kind: str = "g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{int(v)}" if kind == "d" else f"{v:.4g}"


def sparkline(values) -> str:
    """One block character per value, scaled between the finite min and max (log scale when
    they span more than a decade); gaps for missing or non-finite values."""
    finite = [x for x in values if x is not None and math.isfinite(x)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    use_log = lo > 0 and hi / lo > 10

    def pos(x: float) -> float:
        if hi == lo:
            return 0.5
        if use_log:
            return (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (x - lo) / (hi - lo)

    return "".join(
        SPARK[min(len(SPARK) - 1, int(pos(x) * len(SPARK)))]
        if x is not None and math.isfinite(x)
        else " "
        for x in values
    )


def clip_rate(steps, clipped) -> str:
    """Share of the collected steps in the history window that were clipped."""
    pairs = [(s, c) for s, c in zip(steps, clipped, strict=True) if math.isfinite(s)]
    if len(pairs) < 2 or not math.isfinite(pairs[0][1]) or not math.isfinite(pairs[-1][1]):
        return "-"
    ds, dc = pairs[-1][0] - pairs[0][0], pairs[-1][1] - pairs[0][1]
    return f"{dc / ds:.0%}" if ds > 0 else "-"


def run(
    targets: list[str],
    interval: float,
    once: bool,
    context: ssl.SSLContext | None,
    timeout: float,
) -> int:
    from rich.console import Console
    from rich.live import Live

    view = View()
    console = Console()

    def poll() -> None:
        for target in targets:
            try:
                view.update(target, scrape(target, context, timeout))
            except Exception as exc:  # noqa: BLE001 - one dead rank never stops the view
                view.failed(target, exc)

    if once:
        poll()
        console.print(view.render(console.width))
        return 0 if view.series else 1
    try:
        with Live(
            view.render(console.width), console=console, screen=False, auto_refresh=False
        ) as live:
            while True:
                poll()
                live.update(view.render(console.width), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
