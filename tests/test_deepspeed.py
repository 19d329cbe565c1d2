"""DeepSpeed ZeRO 1, 2 and 3 on 2 CPU ranks: every rank exports the global statistics of the
real model, checked against DeepSpeed's own full gradients and norm
(tests/scripts/train_deepspeed.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reference import reference_stats
from util import IN_CI, assert_global_stats, free_port_pair, parse, value

if not IN_CI:
    pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).parent / "scripts" / "train_deepspeed.py"
STEPS = 4
MAX_NORM = 0.5  # the script's gradient_clipping
REL = 1e-5  # DeepSpeed clips in float32


def _run(tmp: Path, stage: int, watch: bool, steps: int = STEPS, **extra: str) -> list[dict]:
    port = free_port_pair()
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "STAGE": str(stage),
        "STEPS": str(steps),
        "OUT": str(tmp),
        "GRADWATCH_PER_PARAM": "1",
        "GRADWATCH_PORT": str(port),
        # not supported under ZeRO (DeepSpeed updates flat fp32 copies): asked for, never shown
        "GRADWATCH_UPDATE_EVERY": "1",
        **extra,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path]),
    }
    if watch:
        env["WATCH"] = "1"
        env.pop("GRADWATCH", None)
    else:
        env["GRADWATCH"] = "1"  # no code change
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=400, cwd=tmp
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    failures = [ln for ln in proc.stderr.splitlines() if "gradwatch" in ln and "fail" in ln]
    assert not failures, proc.stderr[-3000:]  # no failure logged
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,watch",
    [(1, False), (2, False), (3, False), (3, True)],
    ids=["zero1", "zero2", "zero3", "zero3-watch"],
)
def test_zero_exports_the_global_statistics_on_every_rank(tmp_path, stage, watch):
    ranks = _run(tmp_path, stage, watch)
    names = ranks[0]["names"]
    per_rank_values = []
    for r, data in enumerate(ranks):
        seen = []
        for rec in data["records"]:
            full = [np.array(g, dtype=np.float64) for g in rec["full_grads"]]
            pre = math.sqrt(sum(float((g * g).sum()) for g in full))
            coef = min(1.0, MAX_NORM / (pre + 1e-6))
            applied = [g * coef for g in full]  # what DeepSpeed clips to
            ref = reference_stats(applied)
            samples = parse(rec["scrape"])
            where = f"stage {stage} rank {r} step {rec['step']}"
            # one optimizer: the ZeRO optimizer, not its inner one over flat partitions
            labels = {dict(k).get("optimizer") for k in samples["grad_l2_norm"]}
            assert labels == {"0"}, where
            assert value(samples, "grad_stats_step") == rec["step"], where
            assert "update_l2_norm" not in samples and "param_l2_norm" not in samples, where
            assert value(samples, "grad_steps_total") == rec["step"], where
            assert_global_stats(samples, ref, REL)
            assert value(samples, "grad_tensors") == 5  # the model's, frozen ones excluded
            assert value(samples, "grad_elements") == 75  # odd: no ZeRO padding
            assert value(samples, "grad_zero_ratio") == ref["grad_zero_ratio"], where
            # pre-clip norm: the one DeepSpeed clipped with, and the float64 oracle
            got_pre = value(samples, "grad_preclip_l2_norm")
            assert got_pre == pytest.approx(rec["ds_norm"], rel=1e-12), where
            assert got_pre == pytest.approx(pre, rel=REL), where
            got_coef = value(samples, "grad_clip_coefficient_ratio")
            assert got_coef == pytest.approx(coef, rel=REL), where
            assert coef < 1.0  # the scenario clips every step
            assert value(samples, "grad_clipped_steps_total") == rec["step"], where
            if r == 0:  # per-param series (rank 0 by default) with the real dotted names
                params = {dict(k)["param"]: v for k, v in samples["grad_param_l2_norm"].items()}
                assert sorted(params) == sorted(names), where
                for name, g in zip(names, applied, strict=True):
                    want = float(np.sqrt((g * g).sum()))
                    assert params[name] == pytest.approx(want, rel=REL), (where, name)
            seen.append(value(samples, "grad_l2_norm"))
        per_rank_values.append(seen)
    assert per_rank_values[0] == per_rank_values[1]  # the same global values on every rank


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_zero_fp16_loss_scale_and_skipped_steps_are_deepspeeds(tmp_path, stage):
    ranks = _run(tmp_path, stage, watch=False, steps=9, FP16="1")
    for r, data in enumerate(ranks):
        records = data["records"]
        assert records[0]["skipped"] >= 1 and records[-1]["skipped"] < 9  # both kinds happen
        applied = 0
        for rec in records:
            samples = parse(rec["scrape"])
            where = f"stage {stage} rank {r} step {rec['step']}"
            assert value(samples, "amp_skipped_steps_total") == rec["skipped"], where
            applied = rec["step"] - rec["skipped"]
            assert value(samples, "grad_steps_total") == applied, where
            if applied and rec["ds_norm"] is not None and math.isfinite(rec["ds_norm"]):
                if value(samples, "grad_stats_step") == rec["step"]:  # this step was applied
                    assert value(samples, "amp_loss_scale") == rec["loss_scale"], where
                    got = value(samples, "grad_preclip_l2_norm")
                    assert got == pytest.approx(rec["ds_norm"], rel=1e-12), where
        assert applied >= 2
