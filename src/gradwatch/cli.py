"""gradwatch: exact gradient statistics of PyTorch training on Prometheus /metrics.

Commands: demo (a small training run with live /metrics), top (a live terminal view of
endpoints), catalog (every metric and its formula), dashboards (Grafana dashboards and alert
rules), readme (regenerate README's tables)."""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time


def _cmd_catalog(args: argparse.Namespace) -> int:
    from . import catalog

    table = catalog.markdown_table() if args.format == "markdown" else catalog.text_table()
    sys.stdout.write(table)
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    try:
        from .top import run, ssl_context, targets_from
    except ImportError as exc:  # rich is an optional extra
        print(f"gradwatch top needs rich: pip install rich ({exc})", file=sys.stderr)
        return 2
    try:
        targets = targets_from(args.targets)
    except (OSError, ValueError) as exc:
        print(f"gradwatch top: cannot read targets: {exc}", file=sys.stderr)
        return 2
    if not targets:
        print("gradwatch top: no targets (give URLs or a file_sd JSON file)", file=sys.stderr)
        return 2
    context = None
    if any(t.startswith("https://") for t in targets):
        try:
            context = ssl_context(args.cacert, args.cert, args.key)
        except (OSError, ValueError) as exc:
            print(f"gradwatch top: cannot load TLS material: {exc}", file=sys.stderr)
            return 2
    return run(targets, args.interval, args.once, context, args.timeout)


def _cmd_readme(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .docs import render

    path = Path(args.path)
    try:
        old = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"gradwatch readme: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    new = render(old)
    if args.check:
        if new != old:
            print(f"{path} is stale: run gradwatch readme {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    return 0


def _cmd_dashboards(args: argparse.Namespace) -> int:
    from .dashboards import write_all

    for path in write_all(args.out):
        print(path)
    return 0


class DemoNet:
    """Built lazily (torch import): an embedding, a `host` MLP and a small `seed` MLP."""

    @staticmethod
    def build(width: int):
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                # Only tokens < 200 ever occur: most embedding rows get exact-zero gradients.
                self.embed = nn.Embedding(1000, 32)
                self.host = nn.Sequential(
                    nn.Linear(32 + 16, width),
                    nn.GELU(),
                    nn.LayerNorm(width),
                    nn.Linear(width, width),
                    nn.GELU(),
                    nn.Linear(width, 1),
                )
                self.seed = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
                self.frozen = nn.Linear(16, 16)  # requires_grad=False: never counted
                self.frozen.requires_grad_(False)

            def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                h = torch.cat([self.embed(tokens), self.frozen(x)], dim=-1)
                return (self.host(h) + self.seed(x)).squeeze(-1)

        return Net()


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import gradwatch

    if not 1 <= args.accum <= args.batch:
        print(f"--accum {args.accum}: must be from 1 to --batch ({args.batch})", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = DemoNet.build(args.width)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    handle = gradwatch.watch(
        model,
        opt,
        port=args.port,
        host=args.host,
        every=args.every,
        per_param=args.per_param,
        groups={"host": "host.", "seed": "seed.", "embed": "embed."},
        # --accum micro-batches per step: shows the gradient noise scale (grad_noise_*)
        micro_batch_size=args.batch // args.accum if args.accum > 1 else None,
        update_every=args.update_every,
    )
    if not handle.enabled:
        print("gradwatch is off (GRADWATCH=0 or a bad setting); the demo trains without it")
    true_w = torch.randn(16)
    # --amp: torch.amp.GradScaler (works on the CPU too): shows amp_loss_scale
    scaler = (
        torch.amp.GradScaler("cpu" if not torch.cuda.is_available() else "cuda")
        if args.amp
        else None
    )
    # --steps N: N steps; --steps 0: until Ctrl-C; default: --seconds (about a minute)
    steps = math.inf if args.steps == 0 else (args.steps or math.inf)
    deadline = time.monotonic() + args.seconds if args.steps is None else math.inf
    step = 0
    progress = _Progress(handle, steps, args.seconds if args.steps is None else None)
    try:
        with progress:
            while step < steps and time.monotonic() < deadline:
                step += 1
                loss = _demo_step(args, model, opt, scaler, true_w, step)
                progress.update(step, loss)
                if args.delay:
                    time.sleep(args.delay)
    except KeyboardInterrupt:
        pass
    finally:
        summary = _summary(handle, step)
        handle.close()
        print(summary, flush=True)
    return 0


def _demo_step(args, model, opt, scaler, true_w, step: int) -> float:
    """One optimizer step of the demo (gradient accumulation, AMP, clipping, a NaN on demand)."""
    import torch

    tokens = torch.randint(0, 200, (args.batch,))
    x = torch.randn(args.batch, 16)
    y = x @ true_w + 0.1 * torch.randn(args.batch)
    opt.zero_grad(set_to_none=True)
    micro = args.batch // args.accum
    loss = 0.0
    for i in range(args.accum):  # gradient accumulation: loss averaged over the window
        part = slice(i * micro, (i + 1) * micro)
        micro_loss = torch.nn.functional.mse_loss(model(tokens[part], x[part]), y[part])
        micro_loss = micro_loss / args.accum
        loss += float(micro_loss.detach())
        if scaler is not None:
            scaler.scale(micro_loss).backward()
        else:
            micro_loss.backward()
    if scaler is not None:
        scaler.unscale_(opt)  # clip (and inject) on unscaled gradients
    if args.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    if args.nan_at and step == args.nan_at:
        # Show a non-finite step, then undo its update so the demo keeps training.
        saved = (
            {k: v.clone() for k, v in model.state_dict().items()},
            copy.deepcopy(opt.state_dict()),
        )
        model.seed[0].weight.grad[0, 0] = float("nan")
        scaler.step(opt) if scaler is not None else opt.step()
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
    else:
        scaler.step(opt) if scaler is not None else opt.step()
    if scaler is not None:
        scaler.update()
    return loss


class _Progress:
    """The demo's progress: a terminal-width bar that clears when done (rich), or a plain
    line every 100 steps when stdout is not a terminal."""

    def __init__(self, handle, steps: float, seconds: float | None) -> None:
        self.handle, self.steps, self.seconds = handle, steps, seconds
        self.interactive = sys.stdout.isatty()
        self.bar = None
        self.start = time.monotonic()

    def __enter__(self) -> _Progress:
        if self.interactive:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            total = self.seconds if self.seconds is not None else self.steps
            self.bar = Progress(
                BarColumn(bar_width=None),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                transient=True,  # cleared at the end: the summary takes its place
                expand=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(
                "demo", total=None if math.isinf(total) else total, status=""
            )
        return self

    def update(self, step: int, loss: float) -> None:
        if step == 1:  # the endpoint starts at the first step: now its URL is known
            url = self.handle.session.url if self.handle.enabled else ""
            self._print(f"gradwatch demo: live statistics on {url or '(telemetry off)'}")
            if url:
                self._print(f"  in a terminal: gradwatch top {url}")
        if step != 1 and step % 10:
            return
        stats = self.handle.latest() if self.handle.enabled else None
        pre = stats.get("grad_preclip_l2_norm") if stats is not None else None
        norm = stats.get("grad_l2_norm") if stats is not None else None
        status = f"step {step}  loss {loss:.3g}  grad norm " + (
            f"{pre:.3g} -> {norm:.3g}"
            if pre is not None and norm is not None
            else f"{norm:.3g}"
            if norm is not None
            else "-"
        )
        if self.bar is not None:
            done = time.monotonic() - self.start if self.seconds is not None else step
            self.bar.update(self.task, completed=done, status=status)
        elif step == 1 or step % 100 == 0:
            print(status, flush=True)

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _summary(handle, step: int) -> str:
    """Two short lines (they fit 80 columns): what ran, and the last statistics."""
    if not handle.enabled:
        return f"gradwatch demo: {step} steps (telemetry off)"
    stats = handle.latest()
    parts = []
    for name, label in (
        ("grad_l2_norm", "grad_l2_norm"),
        ("grad_preclip_l2_norm", "pre-clip"),
        ("grad_clipped_steps_total", "clipped"),
        ("grad_nonfinite_steps_total", "NaN/Inf steps"),
        ("amp_skipped_steps_total", "AMP-skipped"),
    ):
        v = stats.get(name)
        if v is not None and (v or not name.startswith("amp_")):
            parts.append(f"{label} {v:.4g}")
    return f"gradwatch demo: {step} steps done\n  last: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a small model on synthetic data with live /metrics",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (0: until Ctrl-C; default: run for --seconds)",
    )
    demo.add_argument(
        "--seconds", type=float, default=60.0, help="how long to train when --steps is not given"
    )
    demo.add_argument("--delay", type=float, default=0.02, help="seconds to sleep per step")
    demo.add_argument("--port", type=int, default=None, help="port of /metrics (default 9464)")
    demo.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    demo.add_argument("--every", type=int, default=None, help="collect every N steps")
    demo.add_argument(
        "--update-every",
        type=int,
        default=10,
        help="sample the parameter update (update_*, param_*) every N steps (0: off)",
    )
    demo.add_argument("--per-param", action="store_true", help="export grad_param_* series")
    demo.add_argument("--nan-at", type=int, default=0, help="inject a NaN gradient at this step")
    demo.add_argument("--width", type=int, default=256, help="hidden width of the host MLP")
    demo.add_argument("--batch", type=int, default=64, help="samples per optimizer step")
    demo.add_argument(
        "--accum",
        type=int,
        default=2,
        help="micro-batches accumulated per step (batch/accum samples each; 1: no accumulation)",
    )
    demo.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    demo.add_argument(
        "--clip", type=float, default=1.0, help="max_norm for clip_grad_norm_ (0: no clipping)"
    )
    demo.add_argument("--amp", action="store_true", help="scale the loss with torch.amp.GradScaler")
    demo.set_defaults(func=_cmd_demo)

    top = sub.add_parser(
        "top",
        help="live terminal view of gradwatch endpoints (Ctrl-C to quit)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    top.add_argument(
        "targets",
        nargs="*",
        default=["http://127.0.0.1:9464/metrics"],
        help="/metrics URLs, or a Prometheus file_sd JSON file (GRADWATCH_FILE_SD) for all ranks",
    )
    top.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes")
    top.add_argument("--timeout", type=float, default=5.0, help="seconds per scrape")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--cacert", default=None, help="CA file for https targets")
    top.add_argument("--cert", default=None, help="client certificate (mutual TLS)")
    top.add_argument("--key", default=None, help="client key (mutual TLS)")
    top.set_defaults(func=_cmd_top)

    cat = sub.add_parser("catalog", help="print every exported metric with its formula")
    cat.add_argument("--format", choices=("text", "markdown"), default="text")
    cat.set_defaults(func=_cmd_catalog)

    dash = sub.add_parser("dashboards", help="write the Grafana dashboards and alert rules")
    dash.add_argument("--out", default="dashboards")
    dash.set_defaults(func=_cmd_dashboards)

    readme = sub.add_parser("readme", help="regenerate README.md's metric and settings tables")
    readme.add_argument("path", nargs="?", default="README.md")
    readme.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    readme.set_defaults(func=_cmd_readme)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
