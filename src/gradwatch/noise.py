"""The gradient noise scale's running state: the accumulation window and the EMAs.

:class:`BackwardWindows` counts the backward passes of each window and reads |g_small|^2 after
its first; collection hands each published step's terms to :class:`NoiseEstimator`. The
estimators themselves are :func:`gradwatch.catalog.noise_estimates`; the exported values read
the :class:`~gradwatch.records.NoiseEstimate` it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .catalog import noise_estimates
from .loop_values import StepWindow
from .records import NoiseEstimate

if TYPE_CHECKING:
    from .collector import ErrorLog


class NoiseEstimator:
    """Bias-corrected EMAs (decay ``beta``) of |G|^2 and tr(Sigma) over the steps with k >= 2."""

    def __init__(self, micro_batch_size: int, beta: float, loss_accumulation: str) -> None:
        self.micro_batch_size = micro_batch_size
        self.beta = beta
        self.loss_accumulation = loss_accumulation
        self._n = 0
        self._ema_trace = 0.0
        self._ema_g2 = 0.0

    def update(
        self,
        k: int | None,
        small: float | None,
        big: float | None,
        clip_coefficient: float,
        loss_scale: float | None,
    ) -> NoiseEstimate | None:
        """Fold one step in and return the estimate after it (None before the first usable step).

        ``k``: backward passes of the window; ``small``: |.grad|^2 after its first (still times
        the loss scale); ``big``: |.grad|^2 at the step (unscaled, after any clip by
        ``clip_coefficient``), None for a step that held NaN/Inf. Such a step, or k < 2, adds
        nothing."""
        usable = k is not None and k >= 2 and big is not None
        if usable and small is not None and math.isfinite(small):
            if clip_coefficient < 1.0:  # clip_grad_norm_ scaled every gradient by coef: undo it
                big /= clip_coefficient * clip_coefficient
            if loss_scale:  # the first micro-batch's grads are still multiplied by the loss scale
                small /= loss_scale * loss_scale
            if self.loss_accumulation == "mean":
                # loss / k per micro-batch: the first backward left g_small / k in .grad, the
                # accumulated .grad is the window's mean gradient g_big
                small_sq, big_sq = k * k * small, big
            else:  # losses summed: .grad is g_small after the first, k * g_big at the step
                small_sq, big_sq = small, big / (k * k)
            b_small = float(self.micro_batch_size)
            g2, trace = noise_estimates(small_sq, big_sq, b_small, b_small * k)
            beta = self.beta
            self._n += 1
            self._ema_g2 = beta * self._ema_g2 + (1.0 - beta) * g2
            self._ema_trace = beta * self._ema_trace + (1.0 - beta) * trace
        if not self._n:
            return None
        corr = 1.0 - self.beta**self._n  # bias correction of an EMA started at 0
        return NoiseEstimate(self._ema_trace / corr, self._ema_g2 / corr)


class BackwardWindows:
    """The accumulation window between two optimizer steps: backward passes counted by
    post-accumulate-grad hooks (the first to fire in a pass queues one callback for its end),
    and |g_small|^2 read after the window's first pass when the step will be collected."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        first_step: int,
        sumsq_now: Callable[[], torch.Tensor | None],
        will_collect: Callable[[], bool],
        errors: ErrorLog,
    ) -> None:
        self._sumsq_now = sumsq_now  # |.grad|^2 now, a 0-dim device tensor (no host sync)
        self._will_collect = will_collect  # the coming step is collected (steps 1, every+1, ..)
        self._errors = errors
        # The watch (hence the hooks) starts at ``first_step``, inside that step's window: the
        # backward passes before it were not seen, so that window is not reported.
        self._first_step = first_step
        self._queued = False
        self._passes = 0
        self._first_sumsq: torch.Tensor | None = None
        self._hooks: list = []
        try:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        except Exception as exc:  # noqa: BLE001
            errors.record("collect", exc)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _on_grad(self, _param: torch.Tensor) -> None:
        if self._queued:
            return
        try:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        except Exception as exc:  # noqa: BLE001
            self._queued = False
            self._errors.record("collect", exc)

    def _on_backward_end(self) -> None:
        """End of one backward pass: count it; after the window's first, keep |g_small|^2."""
        self._queued = False
        try:
            self._passes += 1
            if self._passes == 1 and self._will_collect():
                self._first_sumsq = self._sumsq_now()
        except Exception as exc:  # noqa: BLE001
            self._first_sumsq = None
            self._errors.record("collect", exc)

    def take(self, step: int) -> StepWindow | None:
        """At step ``step``: the window's (k, |g_small|^2) for its collection; a new window."""
        window = None
        if self._hooks and step > self._first_step:
            window = StepWindow(self._passes, self._first_sumsq)
        # else e.g. a closure step: its own backward was counted, the window's earlier not
        self.reset()
        return window

    def reset(self) -> None:
        """A skipped step ends its window too."""
        self._passes, self._first_sumsq = 0, None
        self._queued = False  # a backward that raised never ran its callback
