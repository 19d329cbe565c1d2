"""2-rank training under torchrun (gloo, CPU) for tests/test_distributed.py.

MODE=ddp | fsdp2. Trains STEPS steps with gradwatch.watch(), then writes OUT/rank<r>.phase1.json
with float64 references computed here from the full gradients of the last step (DDP: p.grad;
FSDP2: DTensor.full_tensor()). With NAN_STEP=1 it then waits for OUT/go, runs one more step in
which rank 1 writes one NaN into its own local shard of the first parameter's gradient, and
writes OUT/rank<r>.phase2.json. It then waits for OUT/done (or 120 s) so the test can scrape.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradwatch  # noqa: E402
from reference import reference_stats  # noqa: E402
from util import write_json  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mode = os.environ["MODE"]
out = Path(os.environ["OUT"])
torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # odd sizes: uneven FSDP2 shards (padding must never count)
        self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


model = Net()
if mode == "ddp":
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(model)
else:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    flat = init_device_mesh("cpu", (world,))
    # head: HSDP-style 2-D mesh, replicated over every rank (placements Replicate, Shard(0))
    hsdp = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    fully_shard(model.head, mesh=hsdp)
    fully_shard(model.encoder[0], mesh=flat)
    fully_shard(model, mesh=flat)

opt = torch.optim.SGD(model.parameters(), lr=1e-2)
handle = gradwatch.watch(model, opt)
steps = int(os.environ.get("STEPS", "3"))
torch.manual_seed(100 + rank)  # different data per rank
x = torch.randn(8, 5)


def full_grads():
    grads = []
    for p in model.parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()  # a collective: every rank calls it in the same order
        grads.append(g.detach().to(torch.float64).clone())
    return grads


def write(phase, grads, extra=None):
    ref = reference_stats(grads)
    ref["get_total_norm"] = float(torch.nn.utils.get_total_norm(grads, 2.0))
    ref.update(rank=rank, port=handle.port, placements=placements(), **(extra or {}))
    write_json(out / f"rank{rank}.{phase}.json", ref)


def placements():
    return [str(getattr(p.grad, "placements", "plain")) for p in model.parameters()]


def wait_for(name, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not (out / name).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


for _ in range(steps):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    grads = full_grads()
    opt.step()
write("phase1", grads)

if os.environ.get("NAN_STEP") == "1":
    wait_for("go")
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    first = next(iter(model.parameters())).grad
    if rank == 1:
        local = first.to_local() if hasattr(first, "to_local") else first
        local.view(-1)[0] = float("nan")
    grads = full_grads()
    opt.step()
    write("phase2", grads)

wait_for("done")
handle.close()
dist.destroy_process_group()
