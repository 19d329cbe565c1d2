"""DeepSpeed ZeRO on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu) for tests/test_deepspeed.py.

STAGE=1|2|3, STEPS, OUT; FP16=1: fp16 with a loss scale that overflows at first. gradwatch is
on through GRADWATCH=1 (no code here) unless WATCH=1, which calls
gradwatch.watch(engine, engine.optimizer). After each engine.backward() the oracle is
DeepSpeed's own safe_get_full_grad(param) (full fp32 gradient, pre-clip), widened to float64;
after engine.step() the rank scrapes its own /metrics. Writes OUT/rank<r>.json.
"""

import os
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradwatch  # noqa: E402
from util import fetch, write_json  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
stage, steps, out = int(os.environ["STAGE"]), int(os.environ["STEPS"]), Path(os.environ["OUT"])
torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 5)  # no gradient: never counted
        self.frozen.requires_grad_(False)
        # 42 + 24 + 9 = 75 trainable elements: odd, so ZeRO pads its partitions
        self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.head = nn.Linear(3, 3, bias=False)

    def forward(self, x):
        return self.head(self.encoder(self.frozen(x)))


model = Net()
config = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_clipping": 0.5,
    "zero_optimization": {"stage": stage},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
}
fp16 = bool(os.environ.get("FP16"))
if fp16:  # 2**15: the first steps overflow and DeepSpeed skips them, halving the scale
    config["fp16"] = {"enabled": True, "initial_scale_power": 15}
engine, *_ = deepspeed.initialize(
    model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
)
handle = gradwatch.watch(engine, engine.optimizer, port=0) if os.environ.get("WATCH") else None
names = [n for n, p in model.named_parameters() if p.requires_grad]
params = [p for p in model.parameters() if p.requires_grad]
g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: grads differ per rank
records = []
for step in range(1, steps + 1):
    x, y = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
    if fp16:
        x, y = x.half(), y.half()
    loss = (engine(x) - y).pow(2).mean() * (4.0 * step)  # large and changing: clipping bites
    engine.backward(loss)
    full = [
        safe_get_full_grad(p).detach().to(torch.float64).numpy().ravel().tolist() for p in params
    ]
    scale = float(engine.optimizer.loss_scale)  # the scale of this step's backward
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    if handle is not None:
        port = handle.port
    else:
        port = gradwatch.session._SESSION.port
    text = fetch(port, timeout=10)
    records.append(
        {
            "step": step,
            "full_grads": full,
            "ds_norm": norm,
            "loss_scale": scale,
            "skipped": engine.skipped_steps,
            "scrape": text,
        }
    )
write_json(out / f"rank{rank}.json", {"names": names, "records": records})
if handle is not None:
    handle.close()
