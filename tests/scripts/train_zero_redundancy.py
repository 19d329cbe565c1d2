"""2-rank DDP + ZeroRedundancyOptimizer under torchrun (gloo, CPU) for tests/test_wrappers.py.

ZeroRedundancyOptimizer is a torch Optimizer whose step calls an inner torch optimizer holding
only this rank's partition of the parameters; under DDP every rank holds the full (averaged)
gradients. gradwatch watches every optimizer of the process (``watch(model)``, global hooks: both
the outer and the inner step fire them). Each step (odd steps plain, even steps with a closure)
this rank records the float64 gradients the step applied and then scrapes its own /metrics;
at the end it writes OUT/rank<r>.json: [{"step", "grads", "lr", "update", "param",
"inner_params", "metrics"}] (update, param: float64 L2 norms of the full update and parameters).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradwatch  # noqa: E402
from util import fetch, l2_norm, write_json  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
out = Path(os.environ["OUT"])
torch.manual_seed(0)
model = DistributedDataParallel(
    nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 2))
)
opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-2)
handle = gradwatch.watch(model, port=0, update_every=1)


scales = [2.0, 0.01, 30.0, 0.3, 5.0, 0.05]
records = []
for step in range(1, len(scales) + 1):
    gen = torch.Generator().manual_seed(10 * step + rank)  # different data per rank
    x = scales[step - 1] * torch.randn(8, 5, generator=gen)
    applied = []

    def closure(x=x, applied=applied):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()  # DDP: averaged over both ranks
        applied.append([p.grad.detach().to(torch.float64).tolist() for p in model.parameters()])
        return loss

    before = [p.detach().to(torch.float64).clone() for p in model.parameters()]
    if step % 2:
        closure()
        opt.step()
    else:
        opt.step(closure)
    after = [p.detach().to(torch.float64) for p in model.parameters()]
    metrics = fetch(handle.port, timeout=10)
    records.append(
        {
            "step": step,
            "grads": applied[0],
            "lr": opt.param_groups[0]["lr"],
            # every rank's params after ZeRO's broadcast: the whole update, on every rank
            "update": l2_norm([a - b for a, b in zip(after, before, strict=True)]),
            "param": l2_norm(after),
            "inner_params": sum(p.numel() for g in opt.optim.param_groups for p in g["params"]),
            "metrics": metrics,
        }
    )
handle.close()
write_json(out / f"rank{rank}.json", records)
dist.destroy_process_group()
