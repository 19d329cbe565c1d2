"""Training stacks: where a stack's step starts, where its final gradients are, which norm it
clipped with. The generic rules live here; a stack that needs more (DeepSpeed ZeRO, whose
optimizer is not a torch ``Optimizer`` and steps flat partitions) has a module of its own.

Rules every stack follows (README, "Training stacks"):

- **Closures.** ``step(closure)`` runs forward and backward inside ``step``, after the pre-step
  hook. The hook replaces the closure by one that collects after the closure's *first* call
  returns (clipping inside the closure, as Lightning does, included). LBFGS calls it several
  times per step: gradwatch reports the first evaluation, the gradient at the parameters the
  step starts from; line-search evaluations are not reported. A step that never calls its
  closure is collected at its post-step hook.
- **Wrappers.** An optimizer whose ``step`` calls another watched optimizer's ``step``
  (``ZeroRedundancyOptimizer``, torchtitan's ``OptimizersContainer``, a user's wrapper) is
  reported once, by the outer one, which holds the whole model's parameters; the inner ones get
  no series. Inner optimizers are found among the outer one's attributes when it is first seen,
  or, failing that, when their step runs inside the outer one's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

_MAX_FRAMES = 64  # how far up the Python stack a running outer step is looked for

# torch's clip API whose norm is the step's pre-clip norm (the split API exists from torch 2.6)
CLIP_FUNCTIONS = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_")
# (module, class) of the DeepSpeed ZeRO optimizers whose step() gradwatch wraps
ZERO_OPTIMIZERS = (
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"),
)


def clip_functions():
    """(name, original, modules that hold it) of each clip function torch has: the same
    function object is ``torch.nn.utils.<name>`` and, for ``clip_grad_norm_``, also
    ``torch.nn.utils.clip_grad.<name>``."""
    from torch.nn.utils import clip_grad

    for name in CLIP_FUNCTIONS:
        original = getattr(torch.nn.utils, name, None) or getattr(clip_grad, name, None)
        if original is None:
            continue  # torch < 2.6 has no split API
        owners = [m for m in (clip_grad, torch.nn.utils) if getattr(m, name, None) is original]
        yield name, original, owners


def closure_of(args: tuple, kwargs: dict) -> Callable[[], Any] | None:
    """The closure passed to ``optimizer.step`` (positional or ``closure=``), if any. A step
    pre-hook's ``args`` start with the optimizer itself."""
    if "closure" in kwargs:
        closure = kwargs["closure"]
    else:
        closure = args[1] if len(args) > 1 else None
    return closure if callable(closure) else None


def with_closure(args: tuple, kwargs: dict, closure: Callable[[], Any]) -> tuple[tuple, dict]:
    """The (args, kwargs) a pre-step hook returns to hand ``step`` another closure."""
    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure}
    return (args[0], closure, *args[2:]), kwargs


def inner_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """Optimizers held by ``optimizer`` as attributes (one level: an attribute or a list, tuple
    or dict of them): ``ZeroRedundancyOptimizer.optim``, ``OptimizersContainer.optimizers``."""
    found: list[torch.optim.Optimizer] = []
    try:
        attrs = vars(optimizer).values()
    except TypeError:
        return found
    for value in attrs:
        if isinstance(value, dict):
            values = list(value.values())
        elif isinstance(value, (list, tuple)):
            values = list(value)
        else:
            values = [value]
        for v in values:
            if isinstance(v, torch.optim.Optimizer) and v is not optimizer and v not in found:
                found.append(v)
    return found


def step_running(optimizer: object) -> bool:
    """``optimizer.step`` is on the current thread's call stack (checked once per optimizer,
    the first time another optimizer's step starts)."""
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return False
        if frame.f_code.co_name == "step" and frame.f_locals.get("self") is optimizer:
            return True
        frame = frame.f_back
    return False
