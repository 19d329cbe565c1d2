"""torchtitan on 2 CPU ranks under torchrun (gloo) for tests/test_torchtitan.py.

torchtitan's full trainer (``torchtitan.train``) needs CUDA, so this is a short loop over its
own pieces, in the order its ``Trainer.train_step`` runs them:

- model: ``torchtitan.models.llama3.model_registry("debugmodel")``, shrunk (2 layers, vocab 128)
  and with its ``ScaledDotProductAttention`` inner attention (FlexAttention has no backward on
  the CPU); built on the meta device, sharded with
  ``torchtitan.distributed.fsdp.apply_fsdp_to_decoder``, then materialized and initialized;
  ``set_force_sum_reduction_for_comms(True)`` on the FSDP modules (gloo rejects PREMUL_SUM,
  which torchtitan's gradient divide factor 1.0 selects);
- optimizer: ``default_adamw`` -> ``OptimizersContainer`` (``.build(model_parts=[model])``), a
  torch Optimizer wrapping the inner AdamW, whose param groups carry no lr of their own;
  OPTIMIZERS=two: a container of two inner optimizers (Adam for the embedding and the output
  layer, AdamW for the rest, different lrs);
  ``LRSchedulersContainer`` with a linear warm-up, so the lr changes every step;
- loss: summed cross-entropy / global token count (torchtitan's normalization), times a
  per-step factor so the gradient norm swings from step to step (clipped on some steps only);
- clipping: ``torchtitan.distributed.utils.clip_grad_norm_`` (get_total_norm +
  clip_grads_with_norm_), whose returned pre-clip norm this script keeps.

WATCH=optimizer: ``gradwatch.watch(model, optimizers)``; WATCH=all: ``gradwatch.watch(model)``
(global hooks: the container's and the inner AdamW's steps both fire them).

After each step this rank scrapes its own /metrics. It writes OUT/rank<r>.json: one record per
step with the float64 reference of the post-clip ``full_tensor()`` gradients, torchtitan's norm,
the float64 L2 norm and abs max of each parameter's full gradient by name (per_param=True: rank
0 exports grad_param_*), the inner optimizers' lrs as the step applied them, the float64 L2 norms
of this rank's parameter shards after the step and of their update (gradwatch's update_* and
param_* are per rank), and the scrape text.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torchtitan.components.optimizer import (
    LRSchedulersContainer,
    OptimizersContainer,
    ParamGroupConfig,
    default_adamw,
)
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
from torchtitan.distributed.utils import clip_grad_norm_
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import model_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradwatch  # noqa: E402
from reference import reference_stats  # noqa: E402
from util import fetch, l2_norm, write_json  # noqa: E402

VOCAB, SEQ, BATCH, LAYERS = 128, 16, 2, 2
MAX_NORM = 1.0
FACTORS = [1.0, 0.05, 20.0, 0.3, 5.0]  # per-step loss factor (gradients scale with it)

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = Path(os.environ["OUT"])
mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))

spec = model_registry("debugmodel")
cfg = spec.model
cfg.layers = cfg.layers[:LAYERS]
for layer in cfg.layers:
    layer.attention.inner_attention = ScaledDotProductAttention.Config()
    layer.attention.rope.max_seq_len = SEQ
cfg.vocab_size = VOCAB
cfg.tok_embeddings.num_embeddings = VOCAB
cfg.lm_head.out_features = VOCAB

torch.manual_seed(0)
with torch.device("meta"):
    model = cfg.build()
apply_fsdp_to_decoder(
    model, mesh, param_dtype=torch.float32, reduce_dtype=torch.float32, pp_enabled=False
)
for module in model.modules():
    if isinstance(module, FSDPModule):
        module.set_force_sum_reduction_for_comms(True)
model.to_empty(device="cpu")
with torch.no_grad():
    model.init_weights(buffer_device=None)
model.train()

if os.environ.get("OPTIMIZERS", "default") == "default":
    opt_config = default_adamw(lr=1e-3)
else:  # two inner optimizers: Adam for the embedding and the output layer, AdamW for the rest
    opt_config = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r"tok_embeddings|lm_head",
                optimizer_name="Adam",
                optimizer_kwargs={"lr": 5e-4},
            ),
            ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
        ]
    )
opt_config.implementation = "foreach"  # "fused" (the default) is for CUDA
optimizers = opt_config.build(model_parts=[model])
lr_schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(
    optimizers=optimizers, training_steps=len(FACTORS)
)
watch = os.environ.get("WATCH", "optimizer")
handle = gradwatch.watch(
    model, optimizers if watch == "optimizer" else None, port=0, update_every=1, per_param=True
)

names, params = zip(*model.named_parameters(), strict=True)


def local_shards():
    return [p.detach().to_local().to(torch.float64).clone() for p in params]


records = []
for step in range(1, len(FACTORS) + 1):
    gen = torch.Generator().manual_seed(1000 * step + rank)  # different data per rank
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    global_tokens = torch.tensor(labels.numel())
    dist.all_reduce(global_tokens)
    optimizers.zero_grad()
    pred = model(inputs)
    loss = torch.nn.functional.cross_entropy(
        pred.flatten(0, 1).float(), labels.flatten(), reduction="sum"
    )
    (FACTORS[step - 1] * loss / global_tokens).backward()
    norm = clip_grad_norm_(params, MAX_NORM, foreach=True, pp_mesh=None, ep_enabled=False)
    grads = [p.grad.full_tensor().to(torch.float64) for p in params]  # collectives, all ranks
    ref = reference_stats(grads)
    per_param = {
        n: [float(g.norm()), float(g.abs().max())] for n, g in zip(names, grads, strict=True)
    }
    lrs = [g["lr"] for inner in optimizers.optimizers for g in inner.param_groups]
    before = local_shards()
    optimizers.step()
    after = local_shards()
    lr_schedulers.step()
    metrics = fetch(handle.port, timeout=10)
    records.append(
        {
            "step": step,
            "ref": ref,
            "norm": float(norm),
            "lrs": lrs,
            "update": l2_norm([a - b for a, b in zip(after, before, strict=True)]),
            "param": l2_norm(after),
            "per_param": per_param,  # name -> [L2 norm, abs max] of its full gradient
            "inner_optimizers": len(optimizers.optimizers),
            "placements": sorted({str(p.grad.placements) for p in params}),
            "metrics": metrics,
        }
    )
handle.close()
write_json(out / f"rank{rank}.json", records)
dist.destroy_process_group()
