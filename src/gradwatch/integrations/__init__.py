"""Trainer integrations: gradwatch's statistics in the logs a trainer already writes.

- :mod:`gradwatch.integrations.hf`: a Hugging Face ``TrainerCallback``
  (``report_to`` W&B, TensorBoard, MLflow, ... then receive them);
- :mod:`gradwatch.integrations.lightning`: a PyTorch Lightning ``Callback`` (to whatever logger
  the Trainer has).

Both read :func:`gradwatch.latest` (no extra reduction, no host sync) and log the run-level
statistics (global, training signals, groups; not the per-tensor series) under
``gradwatch/<metric>[/<label values>]``.
"""
