"""gradwatch in a PyTorch Lightning ``Trainer``'s logger.

Example (needs ``lightning`` or ``pytorch_lightning``)::

    from gradwatch.integrations.lightning import GradwatchCallback
    trainer = Trainer(callbacks=[GradwatchCallback()], logger=CSVLogger("logs"))
    trainer.fit(module)        # metrics.csv now has gradwatch/grad_l2_norm, ...

The callback subclasses ``lightning.pytorch.Callback`` when ``lightning`` is installed, else
``pytorch_lightning.Callback``; :func:`callback_class` builds one on the other base.
"""

from __future__ import annotations

from typing import Any

import gradwatch
from gradwatch.session import live_session

try:
    from lightning.pytorch import Callback as _Base
except ImportError:
    from pytorch_lightning import Callback as _Base


def callback_class(base: type) -> type:
    """A gradwatch callback class on a given Lightning ``Callback`` base."""

    class GradwatchCallback(base):
        """Logs the latest gradwatch statistics once per collected optimizer step through
        ``LightningModule.log_dict`` (so they reach the Trainer's logger: TensorBoard, CSV,
        W&B, MLflow ...). ``settings`` go to :func:`gradwatch.watch` at fit start."""

        def __init__(self, prefix: str = "gradwatch/", **settings: Any) -> None:
            super().__init__()
            self.prefix = prefix
            self.settings = settings
            self.handle = None
            self._logged_step: int | None = None

        def on_fit_start(self, trainer, pl_module):
            running = live_session() is not None
            handle = gradwatch.watch(pl_module, **self.settings)
            self.handle = None if running else handle  # close only what it opened

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stats = gradwatch.latest()
            if stats.step is None or stats.step == self._logged_step:
                return  # no new collected step (gradient accumulation, or not yet published)
            self._logged_step = stats.step
            pl_module.log_dict(stats.flat(self.prefix), on_step=True, on_epoch=False)

        def on_fit_end(self, trainer, pl_module):
            if self.handle is not None:
                self.handle.close()
                self.handle = None

    return GradwatchCallback


GradwatchCallback = callback_class(_Base)
