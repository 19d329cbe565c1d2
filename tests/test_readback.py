"""The device readback path (pinned packet, events, ring, publishing), run on the CPU with the
CUDA stream and event calls emulated: what is packed is what is published, loop values that
travel on the device included. The real device path runs in tests/test_cuda*.py on a GPU."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from gradwatch.collector import RING_SLOTS, ErrorLog, OptimizerWatch
from gradwatch.config import from_env
from gradwatch.readback import Packet
from gradwatch.records import DeviceValue, Layout, LoopValues
from gradwatch.updates import UpdateResult


class _Event:
    completed = True  # flipped by a test to hold results "in flight"

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return _Event.completed


class _Stream:
    waited: list = []  # events the (emulated) main stream was told to wait for

    def __init__(self, device=None) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        _Stream.waited.append(event)


@pytest.fixture
def emulated_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    _Event.completed = True
    _Stream.waited = []
    yield
    _Event.completed = True


def _watch() -> OptimizerWatch:
    opt = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    return OptimizerWatch(opt, 0, from_env({}), ErrorLog(), dict)


def test_packet_round_trip():
    parts = [torch.arange(12.0).reshape(2, 6), torch.tensor([7.0, 8.0]), torch.ones(2, 6)]
    packet = Packet.of(parts)
    out = packet.unpack(packet.pack(parts).numpy())
    for a, b in zip(out, parts, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
        assert a.shape == tuple(b.shape)


def test_partials_and_device_loop_values_are_published_as_packed(emulated_cuda):
    watch = _watch()
    watch.steps = 3
    layout = Layout.build(["w", "b"], ["0", "0"])
    partials = torch.tensor(
        [[4.0, 2.0, 1.5, 0, 0, 1], [9.0, 3.0, 2.5, 0, 0, 0]], dtype=torch.float64
    )
    loop = LoopValues(clip_max_norm=1.0, learning_rates=(0.1, math.nan))
    device_values = [
        DeviceValue("preclip_norm", None, torch.tensor(3.0)),
        DeviceValue("learning_rates", 1, torch.tensor(0.25, dtype=torch.float32)),
        DeviceValue("loss_scale", None, torch.tensor(1024.0)),
    ]
    cpu = torch.device("cpu")
    watch._launch_cuda(
        cpu, lambda: partials.clone(), layout, np.array([6.0, 4.0]), loop, device_values
    )
    assert watch.latest is None  # in flight until polled
    watch.poll()
    r = watch.latest
    assert r.step == 3
    np.testing.assert_array_equal(r.partials, partials.numpy())
    assert r.loop.preclip_norm == 3.0 and r.loop.loss_scale == 1024.0
    assert r.loop.learning_rates == (0.1, 0.25) and r.loop.clip_max_norm == 1.0
    assert watch.clipped_steps == 1  # 1.0 / 3.0 < 1
    assert watch.errors.nonzero() == {}


def test_full_ring_drops_and_counts_and_order_is_kept(emulated_cuda):
    watch = _watch()
    layout = Layout.build(["w"], ["0"])
    cpu = torch.device("cpu")
    _Event.completed = False
    for step in range(1, RING_SLOTS + 3):
        watch.steps = step
        rows = torch.zeros(1, 6, dtype=torch.float64)
        rows[0, 0] = step
        watch._launch_cuda(cpu, lambda rows=rows: rows, layout, np.ones(1), LoopValues(), [])
    assert watch.dropped_steps == 2 and len(watch._grad_results) == RING_SLOTS
    watch.poll()
    assert watch.latest is None  # nothing completed: nothing published, nothing waited for
    _Event.completed = True
    watch.poll()
    assert watch.latest.step == RING_SLOTS and watch.collected_steps == RING_SLOTS


def test_sampled_update_goes_through_the_same_readback(emulated_cuda):
    watch = _watch()
    layout = Layout.build(["w", "b"], ["0", "1"])
    rows = torch.zeros(4, 6, dtype=torch.float64)
    rows[:2, 0] = torch.tensor([1.0, 4.0])  # update sums of squares
    rows[2:, 0] = torch.tensor([9.0, 16.0])  # parameter sums of squares
    watch.updates.results.push([rows], UpdateResult(5, layout), torch.device("cpu"))
    watch.poll()
    u = watch.updates.latest
    assert u.step == 5
    np.testing.assert_array_equal(u.delta[:, 0], [1.0, 4.0])
    np.testing.assert_array_equal(u.param[:, 0], [9.0, 16.0])


def test_a_full_ring_never_skips_the_ranks_combine(emulated_cuda, monkeypatch):
    """Combining across ranks: the all-reduce is issued at every collected step even when this
    rank drops the sample (its peers would pair their next all-reduce with this one)."""
    from gradwatch import distributed

    combines = []
    monkeypatch.setattr(
        distributed, "start_combine", lambda p, owned: (combines.append(len(combines)) or p, [])
    )
    monkeypatch.setattr(distributed, "finish_combine", lambda result: result)
    watch = _watch()
    layout = Layout.build(["w"], ["0"])
    owned = np.ones(1, dtype=bool)
    _Event.completed = False
    for step in range(1, RING_SLOTS + 3):
        watch.steps = step
        rows = torch.zeros(1, 6, dtype=torch.float64)
        watch._launch_cuda(
            torch.device("cpu"), lambda rows=rows: rows, layout, np.ones(1), LoopValues(), [], owned
        )
    assert len(combines) == RING_SLOTS + 2  # one per step, dropped or not
    assert watch.dropped_steps == 2 and len(watch._grad_results) == RING_SLOTS
    assert len(_Stream.waited) == RING_SLOTS + 2  # the main stream waited every time


def test_the_main_stream_waits_even_when_the_launch_fails(emulated_cuda):
    watch = _watch()

    def failing_reduce():
        raise RuntimeError("injected launch failure")

    with pytest.raises(RuntimeError):  # the caller (collect_step) counts it
        watch._launch_cuda(
            torch.device("cpu"), failing_reduce, Layout.build(["w"], ["0"]), np.ones(1),
            LoopValues(), [],
        )  # fmt: skip
    assert len(_Stream.waited) == 1  # later writes to the grads wait for what was queued
