"""gradwatch in a Hugging Face ``Trainer``'s logs.

Example (needs ``transformers``)::

    from transformers import Trainer
    from gradwatch.integrations.hf import attach

    trainer = Trainer(model=model, args=args, train_dataset=data)
    attach(trainer)            # watches the model (unless GRADWATCH=1 already does)
    trainer.train()            # every log line now carries gradwatch/grad_l2_norm, ...
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

import gradwatch
from gradwatch.session import live_session


class GradwatchCallback(TrainerCallback):
    """Adds the latest gradwatch statistics to every ``logs`` dict the Trainer logs.

    It must run before the reporting callbacks (TensorBoard, W&B, ...), which the Trainer
    registers first: add it with :func:`attach`, which puts it in front. ``settings`` go to
    :func:`gradwatch.watch` when the training starts (``port=0``, ``per_param=True``, ...).
    """

    def __init__(self, prefix: str = "gradwatch/", **settings: Any) -> None:
        self.prefix = prefix
        self.settings = settings
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        running = live_session() is not None
        handle = gradwatch.watch(model, **self.settings)
        self.handle = None if running else handle  # close only what it opened

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or any(k.startswith("eval_") for k in logs):
            return
        stats = gradwatch.latest()
        if stats.step is not None:
            logs.update(stats.flat(self.prefix))

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def attach(trainer, prefix: str = "gradwatch/", **settings: Any) -> GradwatchCallback:
    """Add a :class:`GradwatchCallback` to ``trainer`` ahead of its reporting callbacks."""
    callback = GradwatchCallback(prefix, **settings)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
