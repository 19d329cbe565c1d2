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
        print(f"gradwatch top needs rich: pip install 'gradwatch[top]' ({exc})", file=sys.stderr)
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


def _bar(frac: float, width: int = 24) -> str:
    filled = int(round(frac * width))
    return "#" * filled + "-" * (width - filled)


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import gradwatch

    from .catalog import BY_PROM_NAME

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
    steps = math.inf if args.steps == 0 else args.steps
    step = 0
    interactive = sys.stdout.isatty()
    stats = [BY_PROM_NAME[n] for n in ("grad_l2_norm", "grad_rms", "grad_abs_max")]
    try:
        while step < steps:
            step += 1
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
                loss += micro_loss.detach()
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
            if handle.enabled and (step == 1 or step % 10 == 0 or step == steps):
                line = _status_line(handle, step, steps, loss.item(), stats)
                if interactive:
                    print("\r" + line, end="", flush=True)
                elif step == 1 or step % 100 == 0 or step == steps:
                    print(line, flush=True)
            if args.delay:
                time.sleep(args.delay)
    except KeyboardInterrupt:
        pass
    finally:
        if interactive:
            print()
        handle.close()
    return 0


def _status_line(handle, step: int, steps: float, loss: float, stats) -> str:
    from .catalog import Thresholds

    watch = handle.session.watches()[0] if handle.session.watches() else None
    readout = watch.latest if watch else None
    parts = [
        f"step {step}" + ("" if math.isinf(steps) else f"/{steps} [{_bar(step / steps)}]"),
        f"loss {loss:.4f}",
    ]
    if readout is not None:
        agg = readout.aggregate()
        for stat in stats:
            v = stat.compute(agg, Thresholds())
            parts.append(f"{stat.prom_name} {v:.4g}" if math.isfinite(v) else f"{stat.prom_name} -")
        nan, inf = int(agg.nan.sum()), int(agg.inf.sum())
        parts.append(f"nonfinite {nan + inf}")
    parts.append(f"http://{handle.session.config.host}:{handle.port}/metrics")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small model on synthetic data with live /metrics")
    demo.add_argument("--steps", type=int, default=3000, help="optimizer steps (0: until Ctrl-C)")
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
    demo.add_argument("--width", type=int, default=256)
    demo.add_argument("--batch", type=int, default=64, help="samples per optimizer step")
    demo.add_argument(
        "--accum",
        type=int,
        default=2,
        help="micro-batches accumulated per step (batch/accum samples each; 1: no accumulation)",
    )
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument(
        "--clip", type=float, default=0.0, help="max_norm for clip_grad_norm_ (0: no clipping)"
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
