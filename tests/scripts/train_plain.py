"""A training script that knows nothing of gradwatch (used with GRADWATCH=1 by the tests).

Trains a few steps, prints one JSON line with float64 reference values computed here from the
last step's gradients, then waits until stdin closes so the test can scrape /metrics.
"""

import json
import os
import sys

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


torch.manual_seed(int(os.environ.get("LOCAL_RANK", "0")))
model = torch.compile(Net()) if os.environ.get("COMPILE") == "1" else Net()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
steps = int(os.environ.get("STEPS", "4"))
x = torch.randn(16, 6)
last = []
for _ in range(steps):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    last = [p.grad.detach().double().clone() for p in model.parameters()]
    opt.step()
norm = torch.sqrt(sum((g * g).sum() for g in last)).item()
print(
    json.dumps(
        {
            "grad_l2_norm": norm,
            "steps": steps,
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "gradwatch_loaded": "gradwatch" in sys.modules,
        }
    ),
    flush=True,
)
if os.environ.get("WAIT") == "1":
    sys.stdin.read()
