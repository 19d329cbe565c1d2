"""Distributed training: exact global statistics from sharded gradients, and target discovery.

**Combining** (GRADWATCH_DISTRIBUTED=auto). Under FSDP2 (``fully_shard``) and other DTensor
parallelisms each rank holds shards of every gradient. Each rank reduces its *local* shards
(``grad.to_local()``) with the usual kernel, giving the six per-tensor partials. A shard that is
replicated over some mesh dimension (HSDP's replicate dimension, a param left replicated) is
counted on the rank whose coordinate on every ``Replicate`` dimension is 0 and zeroed elsewhere,
so every element counts exactly once; FSDP2's padding is never part of ``to_local()``. Then one
small all-reduce per collected step on a dedicated process group (gloo for CPU partials, the
default backend for device partials) combines the ``[T, 6]`` partials: one SUM all-reduce of the
columns the contract sums (SUMSQ, SUMABS, NAN, INF, ZERO) and one MAX all-reduce of those it
maxes (MAXABS, ``T`` numbers), see ``kernels.contract``. Every rank then holds the
same full per-tensor partials, and every statistic (per-tensor norms included) is computed from
them; the element count of a row is the full parameter's ``numel``.

Plain-tensor gradients (DDP, or no data parallelism) are taken as they are: DDP's gradients are
already identical on every rank after backward, so no collective is needed. When plain tensors
and DTensors are mixed, the plain ones are counted on rank 0 only (taken as replicated).

All ranks of the default process group must hold the same list of parameters with gradients
(true for DDP, FSDP2, HSDP and tensor parallelism; not for pipeline stages, where each stage is
reported on its own with GRADWATCH_DISTRIBUTED=off).

**Discovery** (GRADWATCH_FILE_SD). At the first step every rank contributes its ``host:port``
with ``all_gather_object`` on the gloo group; rank 0 writes a Prometheus ``file_sd`` JSON file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from .kernels import join_by_combine, split_by_combine

log = logging.getLogger("gradwatch")

GROUP_TIMEOUT = timedelta(seconds=120)  # a mismatched collective fails instead of hanging forever

_groups: dict[str, object] = {}


def active() -> bool:
    """torch.distributed is initialized with more than one rank."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def group(kind: str):
    """The dedicated process group of gradwatch (created once, by every rank, in step order).

    kind "gloo": CPU collectives (partials of CPU tensors, discovery); "device": the default
    backend (NCCL for CUDA partials).
    """
    pg = _groups.get(kind)
    if pg is None:
        backend = "gloo" if kind == "gloo" else None
        pg = torch.distributed.new_group(backend=backend, timeout=GROUP_TIMEOUT)
        _groups[kind] = pg
    return pg


def reset() -> None:
    """Forget the groups (after destroy_process_group, or in tests)."""
    _groups.clear()
    _owned_cache.clear()


@dataclass
class LocalView:
    """What one rank reduces: local tensors, which rows it owns, and full element counts."""

    tensors: list[torch.Tensor]
    owned: np.ndarray | None  # bool [T]; None: every row owned (no combination)
    numel: np.ndarray  # float64 [T]: full parameter numel when combining, else local numel
    combine: bool


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def replicated_value(t: torch.Tensor) -> torch.Tensor | None:
    """A plain tensor holding t's value without communication: t itself, or a replicated
    DTensor's local copy (what clip_grad_norm_ returns under FSDP2). None for a DTensor with
    Partial/Shard placements: reading those needs a collective, never issued from a hook."""
    if not _is_dtensor(t):
        return t
    if all(p.is_replicate() for p in t.placements):
        return t.to_local()
    return None


_owned_cache: dict[tuple, bool] = {}


def _owned(g) -> bool:
    """This rank holds the copy of ``g``'s local shard that counts (coordinate 0 on every
    Replicate mesh dimension). Cached per (mesh, placements)."""
    mesh, placements = g.device_mesh, g.placements
    key = (id(mesh), placements)
    owned = _owned_cache.get(key)
    if owned is None:
        coord = mesh.get_coordinate()
        owned = coord is not None and all(
            c == 0 for c, p in zip(coord, placements, strict=True) if p.is_replicate()
        )
        _owned_cache[key] = owned
    return owned


def _no_partial(g):
    """Partial placements (unreduced sums) cannot be reduced shard by shard: reduce them first."""
    if any(p.is_partial() for p in g.placements):
        from torch.distributed.tensor import Replicate

        placements = [Replicate() if p.is_partial() else p for p in g.placements]
        return g.redistribute(placements=placements)
    return g


def _local(g) -> torch.Tensor:
    """The local shard without an autograd node (to_local() costs ~10 us per tensor)."""
    local = getattr(g, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else g.to_local()


def local_view(grads: list[torch.Tensor], mode: str) -> LocalView:
    dts = [_is_dtensor(g) for g in grads]
    if not any(dts):
        numel = np.fromiter((g.numel() for g in grads), dtype=np.float64, count=len(grads))
        return LocalView(list(grads), None, numel, False)
    combine = mode == "auto" and active()
    rank0 = not active() or torch.distributed.get_rank() == 0
    tensors, owned, numel = [], [], []
    for g, is_dt in zip(grads, dts, strict=True):
        if is_dt:
            if combine:
                g = _no_partial(g)
            local = _local(g)
            tensors.append(local)
            owned.append(_owned(g))
            numel.append(g.numel() if combine else local.numel())
        else:
            tensors.append(g)
            owned.append(rank0)
            numel.append(g.numel())
    return LocalView(
        tensors,
        np.array(owned, dtype=bool) if combine else None,
        np.array(numel, dtype=np.float64),
        combine,
    )


def start_combine(partials: torch.Tensor, owned: np.ndarray):
    """Launch the combination of local [T, 6] partials; returns (result, works).

    ``result`` holds the combined partials once every work in ``works`` has completed. Rows this
    rank does not own are zeroed first (their max abs too: every abs is >= 0).
    """
    mask = torch.from_numpy(owned)
    if partials.device.type != "cpu":
        mask = mask.pin_memory()  # a pageable host-to-device copy would sync the stream
    mask = mask.to(partials.device, non_blocking=True)
    counted = torch.where(mask[:, None], partials, torch.zeros_like(partials))
    # Column slices, never a list index: a Python list indexing a CUDA tensor is first copied to
    # the device from pageable memory, which synchronizes the host.
    # One contiguous tensor per combine kind of the contract's columns, one all-reduce each.
    parts = split_by_combine(counted)
    pg = group("gloo" if partials.device.type == "cpu" else "device")
    dist = torch.distributed
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    works = [
        dist.all_reduce(part, op=ops[kind], group=pg, async_op=True) for kind, part in parts.items()
    ]
    return parts, works


def finish_combine(parts) -> torch.Tensor:
    """Reassemble [T, N_PARTIALS] from the reduced parts (after the works completed)."""
    return join_by_combine(parts)


# ---- discovery ----
def advertised_host(bind_host: str) -> str:
    if bind_host in ("0.0.0.0", "::", ""):
        return socket.getfqdn() or socket.gethostname()
    return bind_host


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gather_targets(host: str, port: int, rank: int, local_rank: int, world: int) -> list[dict]:
    """Every rank's target (one all_gather_object on the gloo group when distributed)."""
    mine = {
        "targets": [_target(advertised_host(host), port)],
        "labels": {"rank": str(rank), "local_rank": str(local_rank), "world_size": str(world)},
    }
    if not active():
        return [mine]
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine, group=group("gloo"))
    return sorted((t for t in everyone if t), key=lambda t: int(t["labels"]["rank"]))


def write_file_sd(path: str, targets: list[dict]) -> None:
    """Write atomically (Prometheus re-reads the file when it changes)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gradwatch-sd-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(targets, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
