"""Wrapper optimizers, whose ``step`` calls another optimizer's ``step``, are reported once, by
the outer one: one ``optimizer`` label value, and values equal to the float64 reference of the
full gradients the step applied (captured by the test), and update statistics equal to those of
the float64 parameters before and after the step.

- ``torch.distributed.optim.ZeroRedundancyOptimizer``, world size 1 in this process (gloo over
  tcp://127.0.0.1) and world size 2 under torchrun with DDP
  (tests/scripts/train_zero_redundancy.py), where the inner optimizer holds half the params;
- user wrappers whose inner optimizer is no attribute of theirs (found while their step runs);
- SAM (sharpness-aware minimization), whose step moves the weights before calling its closure
  and puts them back by assigning ``p.data``.

Both ways of watching are covered where it matters: explicitly (``watch(model, outer)``: only the
outer one is hooked) and every optimizer of the process (``watch(model)``: the global hooks
fire for the outer and the inner step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

import gradwatch
from reference import reference_stats
from util import assert_global_stats, fetch, free_port, parse, value

REL = 1e-5
SCALES = [2.0, 0.01, 30.0, 0.3, 5.0, 0.05]  # per-step input scale: norms far apart
SCRIPT = str(Path(__file__).parent / "scripts" / "train_zero_redundancy.py")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 2))


def _check(samples: dict, step: int, grads, lr: float | None) -> None:
    assert {dict(k)["optimizer"] for k in samples["grad_l2_norm"]} == {"0"}
    assert {dict(k)["optimizer"] for k in samples["grad_stats_step"]} == {"0"}
    assert value(samples, "grad_stats_step") == step
    assert value(samples, "grad_steps_total") == step
    assert_global_stats(samples, reference_stats(grads), rel=REL)
    if lr is not None:
        assert value(samples, "optimizer_learning_rate", param_group="0") == lr


def _train(model: nn.Module, opt: torch.optim.Optimizer, port_of, lr: float | None) -> None:
    """Odd steps plain, even steps with a closure; scrape and check after each (with
    ``update_every=1``: the update too, from the float64 parameters before and after)."""
    for step in range(1, len(SCALES) + 1):
        gen = torch.Generator().manual_seed(step)
        x = SCALES[step - 1] * torch.randn(8, 5, generator=gen)
        applied: list = []

        def closure(x=x, applied=applied):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            applied.append([p.grad.detach().to(torch.float64).clone() for p in model.parameters()])
            return loss

        before = [p.detach().to(torch.float64).clone() for p in model.parameters()]
        if step % 2:
            closure()
            opt.step()
        else:
            opt.step(closure)
        samples = parse(fetch(port_of()))
        _check(samples, step, applied[0], lr)
        after = [p.detach().to(torch.float64) for p in model.parameters()]
        delta = [a - b for a, b in zip(after, before, strict=True)]
        update = reference_stats(delta)["grad_l2_norm"]
        assert value(samples, "update_l2_norm") == pytest.approx(update, rel=REL)
        param = reference_stats(after)["grad_l2_norm"]
        assert value(samples, "param_l2_norm") == pytest.approx(param, rel=REL)


@pytest.fixture
def gloo_world_1():
    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("explicit", [True, False], ids=["watch_optimizer", "watch_all"])
def test_zero_redundancy_world_1_one_series_equal_to_the_reference(gloo_world_1, explicit):
    model = _net()
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-2)
    with gradwatch.watch(model, opt if explicit else None, port=0, update_every=1) as h:
        _train(model, opt, lambda: h.port, lr=1e-2)
        (watch,) = h.session.watches()
        assert watch.optimizer_ref is opt
        assert h.session.errors.nonzero() == {}


# ---- user wrappers whose inner optimizer is no attribute ----
_INNER: dict = {}  # (a weird key, id(wrapper)) -> inner optimizer


class DictHeld(torch.optim.Optimizer):
    """Shares its param groups with an inner Adam kept in a module-level dict."""

    def __init__(self, params, lr: float) -> None:
        inner = torch.optim.Adam(params, lr=lr)
        super().__init__(inner.param_groups, {})
        _INNER[("inner", "#", id(self))] = inner

    def step(self, closure=None):
        return _INNER[("inner", "#", id(self))].step(closure)


class ClosureHeld(torch.optim.Optimizer):
    """Param groups of its own (no lr); steps an inner SGD reachable only from a closure."""

    def __init__(self, params, lr: float) -> None:
        params = list(params)
        super().__init__(params, {})
        inner = torch.optim.SGD(params, lr=lr, momentum=0.9)
        self._step_inner = lambda closure: inner.step(closure)

    def step(self, closure=None):
        return self._step_inner(closure)


@pytest.mark.parametrize("explicit", [True, False], ids=["watch_optimizer", "watch_all"])
@pytest.mark.parametrize("wrapper", [DictHeld, ClosureHeld])
def test_user_wrapper_with_a_hidden_inner_optimizer_one_series(wrapper, explicit):
    model = _net()
    opt = wrapper(model.parameters(), lr=1e-2)
    assert gradwatch.stacks.inner_optimizers(opt) == []  # not found among its attributes
    lr = 1e-2 if wrapper is DictHeld else None  # ClosureHeld's own groups have no lr
    with gradwatch.watch(model, opt if explicit else None, port=0, update_every=1) as h:
        _train(model, opt, lambda: h.port, lr=lr)
        (watch,) = h.session.watches()
        assert watch.optimizer_ref is opt
        assert h.session.errors.nonzero() == {}
    _INNER.clear()


# ---- SAM: a wrapper whose step(closure) moves the weights before calling the closure ----
class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization as the widely used implementation (davda54/sam) writes it:
    ``step(closure)`` perturbs the weights along the gradient, re-evaluates the gradient there
    with the closure, puts the weights back by assigning ``p.data`` and steps the base optimizer
    (an attribute, sharing the param groups) with the perturbed-point gradient."""

    def __init__(self, params, base_optimizer, rho: float, **kwargs) -> None:
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def step(self, closure):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        scale = self.param_groups[0]["rho"] / (torch.stack([g.norm() for g in grads]).norm())
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.data.clone()
                    p.add_(p.grad * scale)
        with torch.enable_grad():
            closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()


@pytest.mark.parametrize("explicit", [True, False], ids=["watch_optimizer", "watch_all"])
def test_sam_reports_the_gradient_and_update_the_step_applied(explicit):
    """The gradient is the one the base optimizer applied (at the perturbed point, from the
    closure); the update is theta after the step - theta before it (not from the perturbed
    weights, and not from the tensors SAM's p.data assignment let go)."""
    model = _net()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    with gradwatch.watch(model, opt if explicit else None, port=0, update_every=1) as h:
        for step in range(1, len(SCALES) + 1):
            gen = torch.Generator().manual_seed(step)
            x = SCALES[step - 1] * torch.randn(8, 5, generator=gen)
            opt.zero_grad()
            model(x).pow(2).mean().backward()  # the gradient SAM perturbs along
            at_start = [p.grad.detach().to(torch.float64).clone() for p in model.parameters()]
            applied: list = []

            def closure(x=x, applied=applied):
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                applied.append(
                    [p.grad.detach().to(torch.float64).clone() for p in model.parameters()]
                )
                return loss

            before = [p.detach().to(torch.float64).clone() for p in model.parameters()]
            opt.step(closure)
            after = [p.detach().to(torch.float64) for p in model.parameters()]
            samples = parse(fetch(h.port))
            _check(samples, step, applied[0], lr=0.1)
            start = reference_stats(at_start)["grad_l2_norm"]
            assert start != pytest.approx(reference_stats(applied[0])["grad_l2_norm"], rel=1e-3)
            delta = [a - b for a, b in zip(after, before, strict=True)]
            update = reference_stats(delta)["grad_l2_norm"]
            assert update > 0
            assert value(samples, "update_l2_norm") == pytest.approx(update, rel=REL), step
            param = reference_stats(after)["grad_l2_norm"]
            assert value(samples, "param_l2_norm") == pytest.approx(param, rel=REL), step
        (watch,) = h.session.watches()
        assert watch.optimizer_ref is opt
        assert h.session.errors.nonzero() == {}


# ---- world size 2: torchrun, DDP + ZeroRedundancyOptimizer ----
def test_zero_redundancy_world_2_every_rank_one_series_equal_to_the_full_grads(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH", "OTEL_"))}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["OUT"] = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in (0, 1):
        assert [rec["step"] for rec in runs[r]] == list(range(1, len(SCALES) + 1))
        for rec in runs[r]:
            samples = parse(rec["metrics"])
            for name in samples["grad_l2_norm"]:
                assert dict(name)["rank"] == str(r) and dict(name)["world_size"] == "2"
            grads = [torch.tensor(g, dtype=torch.float64) for g in rec["grads"]]
            _check(samples, rec["step"], grads, rec["lr"])
            assert value(samples, "grad_elements") == sum(g.numel() for g in grads)
            assert 0 < rec["inner_params"] < sum(g.numel() for g in grads)  # a partition
            assert value(samples, "update_l2_norm") == pytest.approx(rec["update"], rel=REL)
            assert value(samples, "param_l2_norm") == pytest.approx(rec["param"], rel=REL)
    # DDP: the same gradients, hence the same values, on both ranks
    for a, b in zip(runs[0], runs[1], strict=True):
        assert a["grads"] == b["grads"]
        assert value(parse(a["metrics"]), "grad_l2_norm") == value(
            parse(b["metrics"]), "grad_l2_norm"
        )
