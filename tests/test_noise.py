"""Gradient noise scale (McCandlish et al. 2018, appendix A.1) from gradient accumulation.

Synthetic problem with a closed-form answer: linear regression y = x . w* + eps, x ~ N(0, I_d),
eps ~ N(0, sigma^2), loss = mean over the batch of (x . w - y)^2 / 2, evaluated at a fixed w
(lr = 0, so w stays put). With u = w - w*, the per-sample gradient is

    g_i = x_i (x_i . w - y_i) = x_i (x_i . u - eps_i).

Mean: G = E[x x^T] u - E[x eps] = u (x and eps independent, E[x x^T] = I).
Second moment: E|g_i|^2 = E[|x|^2 (x . u)^2] - 2 E[|x|^2 (x . u) eps] + E[|x|^2 eps^2].
The middle term is 0 (E eps = 0). The last is d sigma^2. For the first, per coordinate j,
E[x_j^2 (x . u)^2] = sum_kl u_k u_l E[x_j^2 x_k x_l] = u_j^2 E[x_j^4] + sum_(k != j) u_k^2
= 3 u_j^2 + (|u|^2 - u_j^2) = |u|^2 + 2 u_j^2 (Gaussian fourth moment 3); summed over j:
(d + 2)|u|^2. So E|g_i|^2 = (d + 2)|u|^2 + d sigma^2 and

    tr(Sigma) = E|g_i|^2 - |G|^2 = (d + 1)|u|^2 + d sigma^2,
    B_simple = tr(Sigma) / |G|^2 = (d + 1) + d sigma^2 / |u|^2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradwatch
from util import fetch, parse, value

D, SIGMA, MBS, K = 8, 1.0, 32, 4  # B_small = 32, B_big = 128
B_SIMPLE = (D + 1) + D * SIGMA**2  # |u| = 1: 17 samples
TRACE, G2 = (D + 1) + D * SIGMA**2, 1.0


def _problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=gen, dtype=torch.float64)
    u /= u.norm()
    w_star = torch.randn(D, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + u)[None])
    return gen, model, w_star


def _batch(gen, w_star, n=MBS):
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return x, x @ w_star + SIGMA * torch.randn(n, generator=gen, dtype=torch.float64)


def _train(model, opt, gen, w_star, steps, k=K, divide=True, record=None):
    for _ in range(steps):
        for _ in range(k):
            x, y = _batch(gen, w_star)
            if record is not None:
                record.append((x, y))
            loss = ((model(x).squeeze(-1) - y) ** 2).mean() / 2
            (loss / k if divide else loss).backward()
        opt.step()
        opt.zero_grad()


def _estimates(w, batches, mbs=MBS):
    """Reference: the unbiased estimators of one window in float64 numpy."""
    grads = []
    for x, y in batches:
        x, y = x.numpy(), y.numpy()
        grads.append(x.T @ (x @ w - y) / len(y))
    k = len(grads)
    small, big = np.sum(grads[0] ** 2), np.sum(np.mean(grads, axis=0) ** 2)
    b_s, b_b = mbs, mbs * k
    return (small - big) / (1 / b_s - 1 / b_b), (b_b * big - b_s * small) / (b_b - b_s)


@pytest.mark.parametrize("accumulation", ["mean", "sum"])
def test_one_window_matches_the_reference_estimators(accumulation):
    gen, model, w_star = _problem(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(
        model,
        opt,
        port=0,
        backend="torch",
        micro_batch_size=MBS,
        noise_ema=0.0,  # the last step's estimates alone
        loss_accumulation=accumulation,
    ) as h:
        _train(model, opt, gen, w_star, 2, divide=accumulation == "mean")  # first: hooks start
        batches: list = []
        _train(model, opt, gen, w_star, 1, k=3, divide=accumulation == "mean", record=batches)
        samples = parse(fetch(h.port))
    trace, g2 = _estimates(model.weight.detach().numpy()[0], batches)
    assert value(samples, "grad_accumulation_micro_batches") == 3
    assert value(samples, "grad_noise_trace_sigma") == pytest.approx(trace, rel=1e-9)
    assert value(samples, "grad_noise_true_grad_sq_norm") == pytest.approx(g2, rel=1e-9)
    if g2 > 0 and trace > 0:
        assert value(samples, "grad_noise_scale") == pytest.approx(trace / g2, rel=1e-9)
    else:
        assert value(samples, "grad_noise_scale") is None  # not a batch size


def test_clipping_and_loss_scale_are_undone():
    """Clipped steps are read before clipping; the first micro-batch's grads are unscaled."""
    gen, model, w_star = _problem(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gradwatch.watch(
        model, opt, port=0, backend="torch", micro_batch_size=MBS, noise_ema=0.0
    ) as h:
        batches: list = []
        for _ in range(2):
            batches.clear()
            for _ in range(K):
                x, y = _batch(gen, w_star)
                batches.append((x, y))
                loss = ((model(x).squeeze(-1) - y) ** 2).mean() / 2 / K
                scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # always bites
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        samples = parse(fetch(h.port))
    assert value(samples, "grad_clip_coefficient_ratio") < 0.01
    trace, g2 = _estimates(model.weight.detach().numpy()[0], batches)
    assert value(samples, "grad_noise_trace_sigma") == pytest.approx(trace, rel=1e-6)
    assert value(samples, "grad_noise_true_grad_sq_norm") == pytest.approx(g2, rel=1e-6)


def test_off_without_micro_batch_size_and_absent_without_accumulation():
    gen, model, w_star = _problem(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, port=0, backend="torch") as h:
        _train(model, opt, gen, w_star, 3)
        samples = parse(fetch(h.port))
    assert "grad_accumulation_micro_batches" not in samples
    assert "grad_noise_scale" not in samples
    with gradwatch.watch(model, opt, port=0, backend="torch", micro_batch_size=MBS) as h:
        _train(model, opt, gen, w_star, 3, k=1)  # no accumulation: B_big = B_small
        samples = parse(fetch(h.port))
        assert not h.session.errors.nonzero()
    assert value(samples, "grad_accumulation_micro_batches") == 1
    assert "grad_noise_scale" not in samples and "grad_noise_trace_sigma" not in samples


def _per_step_moments(replicates: int = 20000, seed: int = 0):
    """Mean and covariance of one window's (tr Sigma, |G|^2) estimates, by Monte Carlo in numpy
    (the estimators are unbiased; their spread sets the test's tolerance)."""
    rng = np.random.default_rng(seed)
    u = np.zeros(D)
    u[0] = 1.0  # the distribution depends on |u| only (x is isotropic)
    x = rng.standard_normal((replicates, K, MBS, D))
    eps = SIGMA * rng.standard_normal((replicates, K, MBS))
    g = (x * ((x @ u) - eps)[..., None]).mean(axis=2)  # micro-batch mean gradients
    small = (g[:, 0] ** 2).sum(-1)
    big = (g.mean(axis=1) ** 2).sum(-1)
    b_s, b_b = MBS, MBS * K
    trace = (small - big) / (1 / b_s - 1 / b_b)
    g2 = (b_b * big - b_s * small) / (b_b - b_s)
    est = np.stack([trace, g2])
    return est.mean(axis=1), np.cov(est)


def test_noise_scale_converges_to_the_closed_form():
    beta, steps = 0.999, 1500
    gen, model, w_star = _problem(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(
        model, opt, port=0, backend="torch", micro_batch_size=MBS, noise_ema=beta
    ) as h:
        _train(model, opt, gen, w_star, steps)
        samples = parse(fetch(h.port))
        assert not h.session.errors.nonzero()
    trace = value(samples, "grad_noise_trace_sigma")
    g2 = value(samples, "grad_noise_true_grad_sq_norm")
    scale = value(samples, "grad_noise_scale")
    assert scale == pytest.approx(trace / g2, rel=1e-12)

    mean, cov = _per_step_moments()
    # the Monte Carlo agrees with the closed form (within its own error)
    assert mean[0] == pytest.approx(TRACE, abs=5 * math.sqrt(cov[0, 0] / 20000))
    assert mean[1] == pytest.approx(G2, abs=5 * math.sqrt(cov[1, 1] / 20000))
    # The bias-corrected EMA of n i.i.d. estimates is a weighted mean with weights
    # w_i = (1 - beta) beta^(n - i) / (1 - beta^n): its covariance is cov * sum(w_i^2). The
    # first collected step has no window (hooks start there): n = steps - 1. The ratio's
    # standard deviation by the delta method.
    n = steps - 1
    w = (1 - beta) * beta ** np.arange(n) / (1 - beta**n)
    ema_cov = cov * float((w**2).sum())
    grad = np.array([1 / G2, -TRACE / G2**2])  # d(T/G)/dT, d(T/G)/dG
    sd = math.sqrt(grad @ ema_cov @ grad)
    # bias of a ratio of (unbiased) noisy terms is second order: Var(G)/G^2 relative
    assert ema_cov[1, 1] / G2**2 < 0.01
    print(
        f"noise scale {scale:.3f} (tr Sigma {trace:.3f}, |G|^2 {g2:.4f}) vs closed form"
        f" {B_SIMPLE:.3f}; sd of the estimate {sd:.3f}"
    )
    assert abs(trace - TRACE) < 4 * math.sqrt(ema_cov[0, 0])
    assert abs(g2 - G2) < 4 * math.sqrt(ema_cov[1, 1])
    assert abs(scale - B_SIMPLE) < 4 * sd


def test_failures_are_counted_never_raised():
    gen, model, w_star = _problem(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, port=0, backend="torch", micro_batch_size=MBS) as h:
        _train(model, opt, gen, w_star, 1)
        (watch,) = h.session.watches()

        def boom():
            raise RuntimeError("injected")

        watch._sumsq_now = boom
        _train(model, opt, gen, w_star, 3)  # training goes on
        samples = parse(fetch(h.port))
        assert h.session.errors.counts["collect"] == 3
    assert value(samples, "grad_accumulation_micro_batches") == K  # counting goes on
    assert value(samples, "grad_stats_step") == 4
