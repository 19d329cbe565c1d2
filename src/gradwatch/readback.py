"""Readback: device results to the host without a host sync.

Every producer of device values (the gradient partials with the loop's device values, the
sampled update's partials) hands its tensors to a :class:`Readback`: they are packed into one
pinned float64 buffer by non-blocking copies on the current stream, an event is recorded after
them, and :meth:`Readback.pop_ready` returns them, oldest first, once that event has completed.
The ring is bounded: a producer that finds it full drops its sample and counts it, the training
thread never waits. Publishing what comes out happens in one place
(:meth:`gradwatch.collector.OptimizerWatch.poll`), in step order, under one lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

Payload = TypeVar("Payload")


@dataclass(frozen=True)
class Packet:
    """Where each part lives in one flat float64 buffer: packs device tensors, unpacks arrays."""

    shapes: tuple[tuple[int, ...], ...]

    @staticmethod
    def of(parts: Sequence[torch.Tensor]) -> Packet:
        return Packet(tuple(tuple(p.shape) for p in parts))

    @property
    def size(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)

    def pack(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """A pinned host buffer receiving every part by a non-blocking copy on the current
        stream (no host sync; the caching host allocator keeps it until the copies are done).
        Parts already on the host (tests that emulate the device path) need no pinning."""
        pinned = any(p.is_cuda for p in parts)
        host = torch.empty(self.size, dtype=torch.float64, pin_memory=pinned)
        offset = 0
        for part in parts:
            n = part.numel()
            host[offset : offset + n].copy_(part.reshape(-1), non_blocking=True)
            offset += n
        return host

    def unpack(self, flat: np.ndarray) -> list[np.ndarray]:
        """The parts again, as float64 arrays of their shapes (copies: the buffer is reused)."""
        out, offset = [], 0
        for shape in self.shapes:
            n = int(np.prod(shape))
            out.append(flat[offset : offset + n].reshape(shape).copy())
            offset += n
        return out


class Completion(Protocol):
    def query(self) -> bool: ...


@dataclass
class InFlight(Generic[Payload]):
    payload: Payload  # what the publisher needs besides the values (step, layout, ...)
    packet: Packet
    host: torch.Tensor  # the pinned buffer
    done: Completion  # the CUDA event recorded after the copies


class Readback(Generic[Payload]):
    """A bounded FIFO of device results on their way to the host, shared by the training thread
    (which pushes) and every poller (training and scrape threads, which pop)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._ring: deque[InFlight[Payload]] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ring)

    def full(self) -> bool:
        with self._lock:
            return len(self._ring) >= self.slots

    def push(self, parts: Sequence[torch.Tensor], payload: Payload, device: torch.device) -> None:
        """Copy ``parts`` (on ``device``) to pinned memory on its current stream and queue them;
        call it in the stream context whose work produced them."""
        packet = Packet.of(parts)
        host = packet.pack(parts)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        self.put(InFlight(payload, packet, host, done))

    def put(self, item: InFlight[Payload]) -> None:
        with self._lock:
            self._ring.append(item)

    def pop_ready(self) -> tuple[Payload, list[np.ndarray]] | None:
        """The oldest result whose copies have completed, unpacked; None if there is none yet
        (a later result never overtakes an earlier one)."""
        with self._lock:
            if not self._ring or not self._ring[0].done.query():
                return None
            item = self._ring.popleft()
        return item.payload, item.packet.unpack(item.host.numpy())


class SideStreams:
    """One side stream per CUDA device, created at its first use."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def __call__(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream
