"""Trainer integrations with the real trainers: gradwatch's statistics land in the logs the
trainer already writes (HF Trainer -> TensorBoard event files, Lightning -> CSVLogger), read
back from those files and compared with the trainer's own numbers for the same step."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from util import IN_CI

if not IN_CI:
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    pytest.importorskip("pytorch_lightning")


class _Regressor(nn.Module):
    """An HF-Trainer-compatible model: forward(x, labels) -> {"loss": ...}."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": (out - labels).pow(2).mean() * 20.0, "logits": out}


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randn(n, generator=g) * 5

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


@pytest.mark.slow
def test_hf_trainer_reports_gradwatch_to_tensorboard(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    from gradwatch.integrations.hf import attach

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=_Regressor(), args=args, train_dataset=_Data())
    attach(trainer, port=0)
    trainer.train()
    scalars = _tensorboard_scalars(tmp_path / "tb")
    ours = scalars["train/gradwatch/grad_preclip_l2_norm"]
    theirs = scalars["train/grad_norm"]  # the Trainer's own pre-clip norm
    assert sorted(ours) == sorted(theirs) == list(range(1, 7))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6), step  # TB stores float32
        assert scalars["train/gradwatch/grad_stats_step"][step] == step
        post = scalars["train/gradwatch/grad_l2_norm"][step]
        assert post == pytest.approx(min(theirs[step], 1.0), rel=1e-5), step
    assert any(v > 1.0 for v in theirs.values())  # clipping bites


@pytest.mark.slow
def test_lightning_callback_logs_to_the_csv_logger(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.utilities import grad_norm

    from gradwatch.integrations.lightning import GradwatchCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch["x"], batch["labels"]
            return (self.net(x).squeeze(-1) - y).pow(2).mean() * 20.0

        def on_before_optimizer_step(self, optimizer):
            # Lightning's own norm, before its clip: the oracle
            self.log("ref_preclip", grad_norm(self, norm_type=2)["grad_2.0_norm_total"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(
        max_steps=6,
        gradient_clip_val=1.0,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[GradwatchCallback(port=0)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    loader = torch.utils.data.DataLoader(_Data(), batch_size=8)
    trainer.fit(Module(), loader)
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        for k, v in row.items():
            if v not in ("", None) and k != "step":
                by_step.setdefault(int(row["step"]), {})[k] = float(v)
    checked = 0
    for step, values in by_step.items():
        if "gradwatch/grad_preclip_l2_norm" not in values or "ref_preclip" not in values:
            continue
        ref = values["ref_preclip"]
        assert values["gradwatch/grad_preclip_l2_norm"] == pytest.approx(ref, rel=1e-5), step
        assert values["gradwatch/grad_stats_step"] == step + 1  # Lightning counts from 0
        post = values["gradwatch/grad_l2_norm"]
        assert post == pytest.approx(min(ref, 1.0), rel=1e-5), step
        assert math.isfinite(values["gradwatch/grad_abs_max"])
        checked += 1
    assert checked == 6, by_step


def test_accelerate_loop_is_exact_with_its_own_clip():
    """A plain accelerate loop (prepare, accelerator.backward, accelerator.clip_grad_norm_, with
    gradient accumulation): every applied step against a float64 reference of the grads the
    step applied, and the pre-clip norm is the one accelerate's clip returned."""
    from accelerate import Accelerator

    import gradwatch
    from reference import reference_stats
    from util import fetch, parse, value

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(_Data(), batch_size=4)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    checked = 0
    with gradwatch.watch(model, port=0) as h:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(batch["x"], batch["labels"])["loss"]
                accelerator.backward(loss)
                norm = None
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    applied = [p.grad.detach().clone() for p in model.parameters()]
                opt.step()
                opt.zero_grad()
            if norm is not None:
                samples = parse(fetch(h.port))
                ref = reference_stats(applied)
                got = value(samples, "grad_l2_norm")
                assert got == pytest.approx(ref["grad_l2_norm"], rel=1e-12)
                assert value(samples, "grad_preclip_l2_norm") == float(norm)
                labels = {dict(k).get("optimizer") for k in samples["grad_l2_norm"]}
                assert labels == {"0"}  # accelerate's optimizer wrapper is not counted twice
                checked += 1
    assert checked == 8
