"""Results in flight are published in step order, by one thread at a time: concurrent polls
(training thread and scrape threads) never make ``latest`` go back to an older step."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from gradwatch.collector import ErrorLog, GradResult, Layout, OptimizerWatch
from gradwatch.config import from_env
from gradwatch.readback import InFlight, Packet
from gradwatch.records import LoopValues


class _Done:
    def query(self) -> bool:
        return True


def test_concurrent_polls_publish_in_step_order(monkeypatch):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = OptimizerWatch(opt, 0, from_env({}), ErrorLog(), dict)
    layout = Layout.build(["w", "b"], ["0", "0"])
    seen: list[int] = []
    real = watch._log_incident

    def slow_log(readout):  # widen the window between popping an item and publishing it
        time.sleep(0.002)
        seen.append(readout.step)
        real(readout)

    monkeypatch.setattr(watch, "_log_incident", slow_log)
    for step in range(1, 201):
        host = torch.zeros(2 * 6, dtype=torch.float64)
        host[0] = float(step)  # SUMSQ of row 0: tells the step apart
        result = GradResult(step, layout, np.ones(2), LoopValues(), (), False)
        watch._grad_results.put(InFlight(result, Packet(((2, 6),)), host, _Done()))
    threads = [threading.Thread(target=watch.poll) for _ in range(8)]
    for t in threads:
        t.start()
    while len(watch._grad_results):
        watch.poll()
    for t in threads:
        t.join()
    assert seen == list(range(1, 201))  # every step once, in order
    assert watch.latest.step == 200 and watch.collected_steps == 200
