"""The gradient noise scale's running state: EMAs of the unbiased one-step estimates.

Collection hands each published step's terms to :class:`NoiseEstimator`; the estimators
themselves are :func:`gradwatch.catalog.noise_estimates`, the exported values read the
:class:`~gradwatch.records.NoiseEstimate` it returns.
"""

from __future__ import annotations

import math

from .catalog import noise_estimates
from .records import NoiseEstimate


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
