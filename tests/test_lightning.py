"""PyTorch Lightning automatic optimization (CPU): every step's exported values against
Lightning's own numbers for that step.

Lightning always steps with a closure: forward, backward, ``on_before_optimizer_step`` and
clipping (``gradient_clip_val``) run inside ``optimizer.step(closure)``. Oracles, per step:

- pre-clip: ``pytorch_lightning.utilities.grad_norm(module, 2)`` in ``on_before_optimizer_step``
  -> ``grad_preclip_l2_norm`` (and the clip coefficient and clipped-steps count from it);
- post-clip: ``configure_gradient_clipping`` calls ``self.clip_gradients`` and then records the
  clipped gradients in float64 and Lightning's ``grad_norm`` of them -> ``grad_l2_norm``, every
  global statistic (``reference_stats``) and, by the module's parameter names, Lightning's
  per-parameter norms -> ``grad_param_l2_norm``;
- the lr the step applies (a LambdaLR stepped by Lightning every optimizer step), read in
  ``on_before_optimizer_step`` -> ``optimizer_learning_rate``.

With ``update_every=1``: ``update_l2_norm`` / ``param_l2_norm`` against the float64 parameters
recorded in ``on_before_optimizer_step`` and after the step.

``/metrics`` is scraped after each optimizer step (``on_train_batch_end`` once ``global_step``
advanced): on the CPU gradwatch publishes inline, so the scrape holds that step. The data makes
the gradient norm swing by orders of magnitude from step to step, so a value one step off fails.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from reference import reference_stats
from util import IN_CI, assert_global_stats, fetch, parse, value

if IN_CI:
    import pytorch_lightning as pl
else:
    pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.utilities import grad_norm  # noqa: E402

MAX_NORM = 0.5
REL = 1e-5
# input scale of each optimizer step's batches: norms far apart, a few below MAX_NORM
SCALES = [3.0, 0.02, 8.0, 0.5, 20.0, 0.05, 1.5, 40.0, 0.2, 5.0]
TOTAL = "grad_2.0_norm_total"


class Tiny(pl.LightningModule):
    def __init__(self, watch: str, **settings) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.settings = {"port": 0, "update_every": 1, "per_param": True, **settings}
        self.windows: dict[int, list] = {}  # step -> float64 gradient of each micro-batch
        self._window: list = []
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
        self.watch_mode = watch
        self.handle = None
        self.pre: dict[int, float] = {}  # step -> Lightning's pre-clip total norm
        self.post_norm: dict[int, float] = {}  # step -> Lightning's norm of the clipped grads
        self.post: dict[int, list[torch.Tensor]] = {}  # step -> clipped grads, float64
        self.post_norms: dict[int, dict[str, float]] = {}  # step -> Lightning's per-param norms
        self.param_names = [n for n, _ in self.named_parameters()]
        self.scrapes: dict[int, dict] = {}  # step -> parsed /metrics after that step
        self.before: dict[int, list[torch.Tensor]] = {}  # step -> float64 params before it
        self.after: dict[int, list[torch.Tensor]] = {}  # step -> float64 params after it
        self.lr: dict[int, float] = {}  # step -> the lr the step applies
        self.loss_scale: dict[int, float] = {}  # step -> GradScaler's scale (16-mixed)
        self._seen = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if "micro_batch_size" in self.settings:  # this micro-batch's own mean gradient
            grads = torch.autograd.grad(loss, list(self.parameters()), retain_graph=True)
            self._window.append(_float64(grads))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)
        if self.watch_mode == "optimizer":
            self.handle = gradwatch.watch(self, opt, **self.settings)
        # a new lr every optimizer step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self):
        if self.watch_mode == "model":  # every optimizer of the process (global hooks)
            self.handle = gradwatch.watch(self, **self.settings)

    def on_before_optimizer_step(self, optimizer):
        step = self.trainer.global_step + 1
        self.pre[step] = float(grad_norm(self, norm_type=2)[TOTAL])
        self.lr[step] = optimizer.param_groups[0]["lr"]
        self.before[step] = _float64(self.parameters())
        self.windows[step], self._window = self._window, []
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.loss_scale[step] = scaler.get_scale()

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        self.clip_gradients(
            optimizer,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )
        step = self.trainer.global_step + 1
        self.post[step] = _float64(p.grad for p in self.parameters())
        norms = grad_norm(self, norm_type=2)
        self.post_norm[step] = float(norms[TOTAL])
        self.post_norms[step] = {n: float(norms[f"grad_2.0_norm/{n}"]) for n in self.param_names}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.trainer.global_step
        if step > self._seen:
            assert step == self._seen + 1
            self._seen = step
            self.scrapes[step] = parse(fetch(self.handle.port))
            self.after[step] = _float64(self.parameters())


def _float64(tensors) -> list[torch.Tensor]:
    return [t.detach().to(torch.float64).clone() for t in tensors]


def _data(accumulate: int, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for scale in SCALES:
        for _ in range(accumulate):
            xs.append(scale * torch.randn(batch, 6, generator=g))
            ys.append(scale * torch.randn(batch, 3, generator=g))
    ds = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def _fit(module: Tiny, accumulate: int, **trainer_args):
    trainer = pl.Trainer(
        **trainer_args,
        accelerator="cpu",
        devices=1,
        max_steps=len(SCALES),
        gradient_clip_val=MAX_NORM,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        try:
            trainer.fit(module, _data(accumulate))
        finally:
            if module.handle is not None:
                module.handle.close()
    return trainer


@pytest.mark.parametrize(
    "accumulate, watch", [(2, "optimizer"), (1, "model")], ids=["accumulate2", "accumulate1"]
)
def test_lightning_each_step_equals_lightnings_own_norms(accumulate, watch):
    module = Tiny(watch)
    trainer = _fit(module, accumulate)
    steps = list(range(1, len(SCALES) + 1))
    assert trainer.global_step == len(SCALES)
    assert sorted(module.scrapes) == steps and sorted(module.pre) == steps
    norms = [module.pre[s] for s in steps]
    assert max(norms) / min(norms) > 100  # a value one step off cannot pass
    clipped = 0
    for s in steps:
        samples, pre = module.scrapes[s], module.pre[s]
        assert value(samples, "grad_stats_step") == s
        assert value(samples, "grad_steps_total") == s
        # exactly one optimizer series (Lightning's LightningOptimizer is no torch Optimizer)
        assert {dict(k)["optimizer"] for k in samples["grad_l2_norm"]} == {"0"}
        assert value(samples, "grad_preclip_l2_norm") == pytest.approx(pre, rel=REL), s
        coef = min(1.0, MAX_NORM / (pre + 1e-6))
        assert value(samples, "grad_clip_coefficient_ratio") == pytest.approx(coef, rel=REL), s
        clipped += coef < 1.0
        assert value(samples, "grad_clipped_steps_total") == clipped, s
        # post-clip: Lightning's norm of the clipped grads and the float64 reference of them
        assert value(samples, "grad_l2_norm") == pytest.approx(module.post_norm[s], rel=REL), s
        assert_global_stats(samples, reference_stats(module.post[s]), rel=REL)
        # per parameter, by the LightningModule's names: Lightning's own per-parameter norms
        for name, grad in zip(module.param_names, module.post[s], strict=True):
            got = value(samples, "grad_param_l2_norm", param=name)
            assert got == pytest.approx(float(grad.norm()), rel=REL), (s, name)
            assert got == pytest.approx(module.post_norms[s][name], rel=REL), (s, name)
        assert module.lr[s] == pytest.approx(0.05 / s)
        assert value(samples, "optimizer_learning_rate", param_group="0") == module.lr[s]
        # the update the step applied, after the closure's clipping
        delta = [a - b for a, b in zip(module.after[s], module.before[s], strict=True)]
        update = reference_stats(delta)["grad_l2_norm"]
        assert value(samples, "update_stats_step") == s
        assert value(samples, "update_l2_norm") == pytest.approx(update, rel=REL), s
        param = reference_stats(module.after[s])["grad_l2_norm"]
        assert value(samples, "param_l2_norm") == pytest.approx(param, rel=REL), s
    assert len(steps) - 4 <= clipped < len(steps)  # clipping on most steps, not all


def _ema(values: list[float], beta: float = 0.95) -> float:
    """Bias-corrected exponential moving average (decay beta, started at 0) of values."""
    ema = 0.0
    for v in values:
        ema = beta * ema + (1 - beta) * v
    return ema / (1 - beta ** len(values))


def _sq(tensors) -> float:
    return float(sum((t * t).sum() for t in tensors))


@pytest.mark.parametrize("accumulate", [2, 3])
def test_lightning_accumulation_noise_scale_from_its_own_micro_batches(accumulate):
    """GRADWATCH_MICRO_BATCH_SIZE under Lightning's accumulation (the last backward of each
    window runs inside the closure, after the pre-step hook; the loss is divided by k): the
    window size k and the estimates of tr(Sigma) and |G|^2 (their definitions, McCandlish et al.
    2018, app. A.1) from each micro-batch's own gradient, taken with autograd in training_step,
    before Lightning's division and clipping."""
    mbs = 4  # samples per micro-batch (_data's batch)
    module = Tiny("optimizer", micro_batch_size=mbs)
    _fit(module, accumulate)
    b_small, b_big = mbs, mbs * accumulate
    traces, g2s = [], []
    for s in range(1, len(SCALES) + 1):
        samples, window = module.scrapes[s], module.windows[s]
        assert len(window) == accumulate
        k = value(samples, "grad_accumulation_micro_batches")
        if s == 1 and k is None:
            # the watch starts at the first step: its first window is not seen from its start
            assert value(samples, "grad_noise_trace_sigma") is None
            continue
        assert k == accumulate, s
        small = _sq(window[0])
        big = _sq([sum(gs) / accumulate for gs in zip(*window, strict=True)])
        traces.append((small - big) / (1 / b_small - 1 / b_big))
        g2s.append((b_big * big - b_small * small) / (b_big - b_small))
        trace, g2 = _ema(traces), _ema(g2s)
        scale = max(abs(t) for t in traces + g2s)  # the estimates are differences
        got = value(samples, "grad_noise_trace_sigma")
        assert got == pytest.approx(trace, rel=REL, abs=REL * scale), s
        got = value(samples, "grad_noise_true_grad_sq_norm")
        assert got == pytest.approx(g2, rel=REL, abs=REL * scale), s
        if trace > 0 and g2 > 0:
            assert value(samples, "grad_noise_scale") == pytest.approx(trace / g2, rel=1e-4), s
    assert len(traces) >= len(SCALES) - 1


def test_lightning_16_mixed_grad_scaler_skipped_steps_and_loss_scale():
    """Lightning's 16-mixed path (its MixedPrecision plugin with a GradScaler; Lightning picks
    bf16 on the CPU unless given the plugin): the closure runs before ``scaler.step``, which
    skips the steps whose fp16 gradients overflowed (the large-scale batches). Applied steps:
    values of that step's unscaled, clipped gradients and the loss scale GradScaler used;
    skipped steps: counted, and the gauges stay at the last applied step."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    module = Tiny("optimizer")
    trainer = _fit(module, 1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.global_step == len(SCALES)
    applied, skipped, clipped, last = 0, 0, 0, None
    for s in range(1, len(SCALES) + 1):
        samples = module.scrapes[s]
        if math.isfinite(module.pre[s]):
            applied, last = applied + 1, s
            assert value(samples, "grad_preclip_l2_norm") == pytest.approx(module.pre[s], rel=REL)
            assert_global_stats(samples, reference_stats(module.post[s]), rel=REL)
            assert value(samples, "amp_loss_scale") == module.loss_scale[s]
            clipped += MAX_NORM / (module.pre[s] + 1e-6) < 1.0
        else:  # GradScaler skipped it: the optimizer did not step
            skipped += 1
            pairs = zip(module.after[s], module.before[s], strict=True)
            assert all(torch.equal(a, b) for a, b in pairs), s
        assert value(samples, "grad_stats_step") == last, s
        assert value(samples, "grad_steps_total") == applied, s
        assert value(samples, "amp_skipped_steps_total") == skipped, s
        assert value(samples, "grad_clipped_steps_total") == clipped, s
    assert skipped >= 2 and applied >= 5
    assert len(set(module.loss_scale.values())) > 2  # the scale went down after each overflow
