"""The latest statistics as a Python object: what ``/metrics`` would show now, without HTTP.

Read by :meth:`gradwatch.session.Handle.latest`, :func:`gradwatch.latest` and the trainer
integrations. It publishes finished device work first but never waits for the device: on CUDA
the values are those of the latest step whose reduction has completed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from . import catalog

# Scopes a trainer's logger receives by default: the run-level values, not one per tensor.
LOGGER_SCOPES = (catalog.GLOBAL, catalog.TRAINING, catalog.GROUP)


@dataclass(frozen=True)
class Sample:
    """One exported value: the metric's Prometheus name, its labels, its value."""

    name: str
    labels: tuple[tuple[str, str], ...]  # sorted (label, value) pairs
    value: float

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class Statistics:
    """The statistics of the latest completed step of every watched optimizer.

    ``step`` is the largest ``grad_stats_step`` (None before the first collected step).
    Labels are those of the exposition without the process labels (``rank``, ``local_rank``,
    ``world_size``, which are the same for every sample of one process).

    Example::

        import torch, gradwatch
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradwatch.watch(model, opt, port=0) as handle:
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
            stats = handle.latest()
            print(stats.step, stats.get("grad_l2_norm", optimizer="0"))
    """

    step: int | None
    samples: tuple[Sample, ...] = ()
    _index: Mapping[str, tuple[Sample, ...]] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def names(self) -> list[str]:
        return list(self._index)

    def of(self, name: str) -> tuple[Sample, ...]:
        """Every sample of one metric (all label sets)."""
        return self._index.get(name, ())

    def get(self, name: str, **labels: str) -> float | None:
        """The value of ``name`` whose labels include ``labels``; None if there is none.
        Raises ValueError if several samples match (give more labels)."""
        want = set(labels.items())
        hits = [s for s in self.of(name) if want <= set(s.labels)]
        if len(hits) > 1:
            raise ValueError(
                f"{len(hits)} samples of {name} match {labels}: give more labels, e.g."
                f" {dict(hits[0].labels)}"
            )
        return hits[0].value if hits else None

    def flat(self, prefix: str = "gradwatch/", scopes=LOGGER_SCOPES) -> dict[str, float]:
        """``{key: value}`` for a logger: ``prefix + name`` and, for labelled samples, the label
        values joined by ``/`` (``gradwatch/grad_l2_norm``, ``gradwatch/grad_group_l2_norm/1``).
        The ``optimizer`` label is left out when only optimizer ``"0"`` is watched."""
        optimizers = {dict(s.labels).get("optimizer") for s in self.samples} - {None}
        one = optimizers <= {"0"}
        out: dict[str, float] = {}
        for s in self.samples:
            if catalog.BY_PROM_NAME[s.name].scope not in scopes:
                continue
            parts = [v for k, v in s.labels if not (one and k == "optimizer")]
            out["/".join([prefix + s.name, *parts])] = s.value
        return out


def build(session) -> Statistics:
    """The statistics of ``session`` now (empty before its first step)."""
    exporter = session.exporter if session is not None else None
    if exporter is None:
        return Statistics(None)
    pinned = [(w.index, w.snapshot(drain=False)) for w in session.watches()]
    samples: list[Sample] = []
    for stat in catalog.CATALOG:
        if stat.instrument == "histogram":
            continue  # a distribution over steps: read it from /metrics
        if stat.scope == catalog.PARAM and not session.config.per_param_here:
            continue
        for labels, value in exporter.values(stat, pinned):
            if math.isfinite(value):
                samples.append(Sample(stat.prom_name, tuple(sorted(labels.items())), value))
    steps = [s.value for s in samples if s.name == catalog.STEP.prom_name]
    index: dict[str, list[Sample]] = {}
    for s in samples:
        index.setdefault(s.name, []).append(s)
    return Statistics(
        int(max(steps)) if steps else None,
        tuple(samples),
        {k: tuple(v) for k, v in index.items()},
    )
