"""torchtitan (FSDP2 via its apply_fsdp_to_decoder, OptimizersContainer, its split-API clip) on 2
CPU ranks under torchrun with gloo: tests/scripts/train_torchtitan.py, a short loop over
torchtitan's own pieces (its full trainer needs CUDA).

Oracles, on every rank and every step:

- the float64 reference (``reference_stats``) of the post-clip ``full_tensor()`` gradients;
- the pre-clip norm torchtitan's ``clip_grad_norm_`` returned -> ``grad_preclip_l2_norm``,
  ``grad_clip_coefficient_ratio`` = min(1, max_norm / (norm + 1e-6)) and
  ``grad_clipped_steps_total``;
- the inner optimizers' lrs as the step applied them (changed every step by torchtitan's
  warm-up scheduler) -> ``optimizer_learning_rate`` param_group 0..n-1 in order (default AdamW:
  one; a container of Adam + AdamW: two); one ``optimizer`` label (the container);
- per parameter (rank 0), by torchtitan's parameter names: the float64 norm and abs max of
  the parameter's full gradient -> ``grad_param_l2_norm``, ``grad_param_abs_max``;
- the float64 norms of this rank's parameter shards after the step and of their update ->
  ``param_l2_norm``, ``update_l2_norm`` (per rank, as the catalog says).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from util import IN_CI, assert_global_stats, parse, value

if IN_CI:
    import torchtitan  # noqa: F401
else:
    pytest.importorskip("torchtitan")

SCRIPT = str(Path(__file__).parent / "scripts" / "train_torchtitan.py")
MAX_NORM = 1.0  # as in the script
REL = 1e-5


def _run(tmp: Path, watch: str, optimizers: str) -> list[list[dict]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH", "OTEL_"))}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OUT=str(tmp), WATCH=watch, OPTIMIZERS=optimizers)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize(
    "watch, optimizers", [("optimizer", "default"), ("all", "default"), ("optimizer", "two")]
)
def test_torchtitan_fsdp2_every_rank_every_step_equals_the_references(tmp_path, watch, optimizers):
    runs = _run(tmp_path, watch, optimizers)
    for r in (0, 1):
        clipped, norms, seen_lrs = 0, [], []
        for step, rec in enumerate(runs[r], start=1):
            samples = parse(rec["metrics"])
            assert rec["step"] == step
            assert rec["placements"] == ["(Shard(dim=0),)"]  # FSDP2: every gradient sharded
            assert rec["inner_optimizers"] == (1 if optimizers == "default" else 2)
            for name in ("grad_l2_norm", "grad_stats_step", "optimizer_learning_rate"):
                assert {dict(k)["optimizer"] for k in samples[name]} == {"0"}, name
            for labels in samples["grad_l2_norm"]:
                assert dict(labels)["rank"] == str(r)
            assert value(samples, "grad_stats_step") == step
            assert value(samples, "grad_steps_total") == step
            assert_global_stats(samples, rec["ref"], rel=REL)
            norm = rec["norm"]
            assert value(samples, "grad_preclip_l2_norm") == pytest.approx(norm, rel=REL)
            coef = min(1.0, MAX_NORM / (norm + 1e-6))
            assert value(samples, "grad_clip_coefficient_ratio") == pytest.approx(coef, rel=REL)
            clipped += coef < 1.0
            assert value(samples, "grad_clipped_steps_total") == clipped
            # the inner optimizers' groups, in order, as groups 0..n-1
            lrs = {dict(k)["param_group"]: v for k, v in samples["optimizer_learning_rate"].items()}
            assert lrs == {str(i): pytest.approx(lr, rel=1e-12) for i, lr in enumerate(rec["lrs"])}
            assert value(samples, "update_stats_step") == step
            assert value(samples, "update_l2_norm") == pytest.approx(rec["update"], rel=REL)
            assert value(samples, "param_l2_norm") == pytest.approx(rec["param"], rel=REL)
            # per parameter, by torchtitan's parameter names: rank 0 only (per_param_ranks)
            per_param = {
                dict(k)["param"]: v for k, v in samples.get("grad_param_l2_norm", {}).items()
            }
            if r == 0:
                assert sorted(per_param) == sorted(rec["per_param"])
                for name, (l2, amax) in rec["per_param"].items():
                    assert per_param[name] == pytest.approx(l2, rel=REL), name
                    got = value(samples, "grad_param_abs_max", param=name)
                    assert got == pytest.approx(amax, rel=REL), name
            else:
                assert per_param == {}
            norms.append(norm)
            seen_lrs.append(rec["lrs"][0])
        assert 0 < clipped < len(norms)
        assert max(norms) / min(norms) > 100  # a value one step off cannot pass
        assert len(set(seen_lrs)) > 2  # the lr changed from step to step
    # the same full gradients on both ranks
    for a, b in zip(runs[0], runs[1], strict=True):
        assert a["ref"] == b["ref"] and a["norm"] == b["norm"]
