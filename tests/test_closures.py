"""``optimizer.step(closure)``: the values of each step are those of the gradients that step
applied, captured by the test inside the closure (float64 reference, ``reference_stats``).

- SGD: one closure call per step; clipping inside the closure pairs with the same step.
- LBFGS (max_iter=5): several closure calls per step; gradwatch reports the first evaluation,
  the gradient at the parameters the step starts from.
- A user optimizer whose ``step`` ignores the closure: collected at the post-step hook, the
  gradients present when the step ran.

With ``update_every=1`` the update statistics of a closure step are checked too: the whole
step's update, theta_after - theta_before (all of LBFGS's iterations), in float64.

``/metrics`` is scraped after every step and the data changes the gradient norm by orders of
magnitude from step to step, so a value one step (or one evaluation) off fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from reference import reference_stats
from util import assert_global_stats, fetch, parse, value

REL = 1e-5
SCALES = [2.0, 0.01, 30.0, 0.3, 5.0, 0.05]  # per-step input scale


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    s = SCALES[step % len(SCALES)]
    return s * torch.randn(6, 5, generator=g), s * torch.randn(6, 2, generator=g)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().to(torch.float64).clone() for p in model.parameters()]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().to(torch.float64).clone() for p in model.parameters()]


def _check_step(samples: dict, step: int, grads: list[torch.Tensor]) -> None:
    assert value(samples, "grad_stats_step") == step
    assert value(samples, "grad_steps_total") == step
    assert {dict(k)["optimizer"] for k in samples["grad_l2_norm"]} == {"0"}
    assert_global_stats(samples, reference_stats(grads), rel=REL)


def _check_update(samples: dict, step: int, before: list, after: list) -> None:
    """update_* / param_* of the step against the float64 parameters before and after it."""
    update = reference_stats([a - b for a, b in zip(after, before, strict=True)])["grad_l2_norm"]
    param = reference_stats(after)["grad_l2_norm"]
    assert value(samples, "update_stats_step") == step
    assert value(samples, "update_l2_norm") == pytest.approx(update, rel=REL)
    assert value(samples, "param_l2_norm") == pytest.approx(param, rel=REL)
    assert value(samples, "update_to_param_ratio") == pytest.approx(update / param, rel=REL)


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clip_in_closure"])
def test_sgd_closure_each_step_equals_the_grads_it_applied(clip):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    norms, clipped = [], 0
    with gradwatch.watch(model, opt, port=0, update_every=1) as h:
        for step in range(1, len(SCALES) + 1):
            x, y = _batch(step)
            applied: list = []
            pre: list = []
            before = _params(model)

            def closure(x=x, y=y, applied=applied, pre=pre):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                if clip:
                    pre.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
                applied.append(_grads(model))
                return loss

            opt.step(closure)
            assert len(applied) == 1
            samples = parse(fetch(h.port))
            _check_step(samples, step, applied[0])
            _check_update(samples, step, before, _params(model))
            norms.append(reference_stats(applied[0])["grad_l2_norm"])
            if clip:
                assert value(samples, "grad_preclip_l2_norm") == pytest.approx(pre[0], rel=REL)
                coef = min(1.0, 0.5 / (pre[0] + 1e-6))
                clipped += coef < 1.0
                assert value(samples, "grad_clip_coefficient_ratio") == pytest.approx(coef, rel=REL)
                assert value(samples, "grad_clipped_steps_total") == clipped
            else:
                assert value(samples, "grad_preclip_l2_norm") is None
        assert h.session.errors.nonzero() == {}
    if clip:
        assert 2 <= clipped < len(SCALES)
    else:
        assert max(norms) / min(norms) > 100


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clip_in_closure"])
def test_lbfgs_reports_the_first_closure_evaluation_of_each_step(clip):
    """With clipping in the closure every evaluation clips: the first one's norm is reported."""
    model = _net()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, history_size=4)
    calls_per_step, clipped = [], 0
    with gradwatch.watch(model, opt, port=0, update_every=1) as h:
        for step in range(1, 5):
            x, y = _batch(step)
            evaluations: list = []
            pre: list = []
            before = _params(model)

            def closure(x=x, y=y, evaluations=evaluations, pre=pre):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                if clip:
                    pre.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
                evaluations.append(_grads(model))
                return loss

            opt.step(closure)
            calls_per_step.append(len(evaluations))
            samples = parse(fetch(h.port))
            _check_step(samples, step, evaluations[0])
            _check_update(samples, step, before, _params(model))
            # the later evaluations' gradients are different: reporting one of them would fail
            last = reference_stats(evaluations[-1])["grad_abs_max"]
            first = reference_stats(evaluations[0])["grad_abs_max"]
            assert last != pytest.approx(first, rel=1e-3)
            if clip:
                assert value(samples, "grad_preclip_l2_norm") == pytest.approx(pre[0], rel=REL)
                assert pre[-1] != pytest.approx(pre[0], rel=1e-3)
                coef = min(1.0, 0.5 / (pre[0] + 1e-6))
                clipped += coef < 1.0
                assert value(samples, "grad_clip_coefficient_ratio") == pytest.approx(coef, rel=REL)
                assert value(samples, "grad_clipped_steps_total") == clipped
        assert h.session.errors.nonzero() == {}
    assert all(n > 1 for n in calls_per_step), calls_per_step  # several evaluations per step
    assert clipped or not clip


class IgnoresClosure(torch.optim.Optimizer):
    """A user optimizer whose step takes a closure argument and never calls it."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return None


def test_step_that_ignores_its_closure_reports_the_grads_present_at_the_step():
    model = _net()
    opt = IgnoresClosure(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, port=0, update_every=1) as h:
        for step in range(1, 5):
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            present = _grads(model)
            called = []
            before = _params(model)
            opt.step(lambda called=called: called.append(1))
            assert not called
            samples = parse(fetch(h.port))
            _check_step(samples, step, present)
            # the update, from the copy taken at the pre-step hook
            _check_update(samples, step, before, _params(model))
        assert h.session.errors.nonzero() == {}


def test_accumulation_window_whose_last_backward_runs_in_the_closure():
    """Lightning's shape of accumulation: k - 1 backwards before step, the last inside the
    closure (after the pre-step hook). Every reported window has k; the first step's window
    began before the watch existed and is not reported (it counted 1 of 2 before the fix)."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, port=0, micro_batch_size=6) as h:
        for step in range(1, 5):
            x, y = _batch(step)
            opt.zero_grad()
            (nn.functional.mse_loss(model(x), y) / 2).backward()

            def closure(x=x, y=y):
                loss = nn.functional.mse_loss(model(-x), y) / 2
                loss.backward()
                return loss

            opt.step(closure)
            k = value(parse(fetch(h.port)), "grad_accumulation_micro_batches")
            assert k == (None if step == 1 else 2), step
        assert h.session.errors.nonzero() == {}
