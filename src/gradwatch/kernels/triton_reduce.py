"""Triton multi-tensor reduction: the six partials of ``gradwatch.kernels`` in one pass.

One kernel launch per dtype group reads every element exactly once. Each tensor is cut into
chunks of ``CHUNK = BLOCK * SUB`` elements; each Triton program reduces one chunk of one tensor
and adds its six partials into the tensor's output row with atomics (``atomic_add`` in float64
for sums and counts, ``atomic_max`` on the int64 bit pattern for the max: abs values are >= 0
and never NaN here, and non-negative doubles order like their bit patterns).

The only host->device traffic is one int64 table of ``5 * S + 1`` entries (S = non-empty
tensors), built from ``data_ptr()``/``numel()`` (host metadata, no sync) and sent from pinned
memory with ``non_blocking=True``. Slots are grouped by dtype; per slot ``j``:

* ``base[j]``: the tensor's lowest address rounded down to 16 bytes;
* ``lo[j]``, ``hi[j]``: its elements relative to ``base`` (``lo`` in 0..7, ``hi = lo + numel``);
* ``row[j]``: its output row;
* ``cstart[j]``: its first chunk (prefix sum of chunk counts; ``cstart[S]`` = total).

Chunk ``k`` of a slot covers ``[k*CHUNK, (k+1)*CHUNK)`` relative to ``base``, clipped to
``[lo, hi)``. A program finds its slot by binary search over ``cstart`` (log2 of the group size
cached loads), so the table stays O(tensors), not O(chunks). The loaded int64 ``base`` is cast
to a typed pointer (``.to(tl.pointer_type(DTYPE))``); this works compiled and under
``TRITON_INTERPRET=1`` (the interpreter treats int<->pointer casts as bitcasts and reads CPU
tensors in place). Because ``base`` is 16-byte aligned every interior chunk starts aligned and
is loaded unmasked with 128-bit loads; only a tensor's first and last chunk take a masked path.

Dense but non-contiguous tensors (transposes, channels_last) are read as their flat storage span:
all six statistics are permutation-invariant. Tensors with gaps or overlap (strided slices,
expanded views) are the only ones copied, one ``.contiguous()`` each.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch

from . import N_PARTIALS

try:  # triton is optional: callers check triton_available() before using this backend
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing or broken
    triton = None
    tl = None

_ALIGN_BYTES = 16  # one 128-bit vector load

# (BLOCK, SUB, num_warps), CHUNK = BLOCK * SUB elements per program. CUDA: 8 elements per thread
# per load; a 124M-element gradient set gives ~15k programs, plenty to fill 132 SMs. Interpreter:
# small chunks so tests exercise multi-chunk tensors with a few thousand elements.
_CUDA_CONFIG: tuple[int, int, int] = (1024, 8, 4)
_INTERPRET_CONFIG: tuple[int, int, int] = (128, 2, 4)

_ITEMSIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


def _interpret_mode() -> bool:
    """Whether triton.jit would build an interpreted kernel now (it reads this at decoration)."""
    try:
        return bool(triton.knobs.runtime.interpret)  # triton >= 3.4: env var or a set knob
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def triton_available() -> bool:
    """True if triton imports and can run here: a CUDA device, or TRITON_INTERPRET=1."""
    try:
        if triton is None:
            return False
        return bool(torch.cuda.is_available() or _interpret_mode())
    except Exception:
        return False


def launch_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, SUB, num_warps) used for ``device``; CHUNK = BLOCK * SUB elements per program."""
    cfg = _CUDA_CONFIG if device.type == "cuda" else _INTERPRET_CONFIG
    assert cfg[1] < 1024, "SUB must fit the kernel's 10-bit packed counters"
    return cfg


def _partials_kernel(
    tab,  # int64[5*S+1]: base[S], lo[S], hi[S], row[S], cstart[S+1]
    out_ptr,  # float64[T, 6], zeroed: atomically accumulated
    out_bits_ptr,  # the same memory as int64, for the MAXABS atomic_max
    n_slots,  # S
    slot0,  # first slot of this dtype group
    chunk0,  # first chunk of this dtype group (= cstart[slot0])
    DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
    LOG_SLOTS: tl.constexpr,  # 2**LOG_SLOTS >= slots in this group
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * SUB
    c = tl.program_id(0) + chunk0
    cstart_tab = tab + 4 * n_slots

    # Largest slot j in the group with cstart[j] <= c (binary lifting; cstart[S] is a sentinel
    # above every chunk, so clamping to S never moves j past the group).
    j = slot0
    for i in tl.static_range(LOG_SLOTS):
        mid = tl.minimum(j + (1 << (LOG_SLOTS - 1 - i)), n_slots)
        j = tl.where(tl.load(cstart_tab + mid) <= c, mid, j)

    ptr = tl.load(tab + j).to(tl.pointer_type(DTYPE))
    lo = tl.load(tab + n_slots + j)
    hi = tl.load(tab + 2 * n_slots + j)
    row = tl.load(tab + 3 * n_slots + j)
    start = (c - tl.load(cstart_tab + j)) * CHUNK  # int64: tensors past 2**31 elements are fine

    # The float64 sums widen each value before squaring. NaN/inf/zero tests and the max run in
    # the float32 widening of 16/32-bit inputs (exact): float64 compares are far slower on GPUs.
    if IS_F64:
        ACC_T: tl.constexpr = tl.float64
    else:
        ACC_T: tl.constexpr = tl.float32
    offs = tl.arange(0, BLOCK)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float64)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float64)
    acc_max = tl.zeros([BLOCK], dtype=ACC_T)
    # Three per-lane counters packed in one int32 (fewer instructions and registers than three):
    # bits 0-9 NaN, 10-19 inf, 20-30 non-zero. A lane counts at most SUB (< 1024) elements.
    # Masked lanes load 0, so zeros are counted as n_valid - non-zero.
    acc_cnt = tl.zeros([BLOCK], dtype=tl.int32)

    if (start >= lo) & (start + CHUNK <= hi):
        # Interior chunk: unmasked loads. Alignment facts are lost through int_to_ptr, so
        # restate them: each sub-block starts 16-byte aligned (base is, and start is a multiple
        # of CHUNK) and is contiguous. Without this hint Triton emits scalar loads.
        for s in range(SUB):
            p = ptr + (start + s * BLOCK) + offs
            p = tl.max_contiguous(tl.multiple_of(p, [16]), [BLOCK])
            xf = tl.load(p).to(ACC_T)
            xd = xf.to(tl.float64)
            af = tl.abs(xf)
            acc_sq += xd * xd
            acc_abs += tl.abs(xd)
            acc_max = tl.where(af > acc_max, af, acc_max)  # NaN compares false: skipped
            acc_cnt += (
                tl.where(xf != xf, 1, 0)
                + tl.where(af == float("inf"), 1 << 10, 0)
                + tl.where(xf != 0.0, 1 << 20, 0)
            )
    else:
        # First/last chunk of a tensor: mask to [lo, hi). Fully masked sub-blocks touch no
        # memory. The loop variable is named apart from the other branch's: Triton 3.6 unifies
        # same-named variables across if/else.
        for u in range(SUB):
            idx = start + u * BLOCK + offs
            xf = tl.load(ptr + idx, mask=(idx >= lo) & (idx < hi), other=0.0).to(ACC_T)
            xd = xf.to(tl.float64)
            af = tl.abs(xf)
            acc_sq += xd * xd
            acc_abs += tl.abs(xd)
            acc_max = tl.where(af > acc_max, af, acc_max)
            acc_cnt += (
                tl.where(xf != xf, 1, 0)
                + tl.where(af == float("inf"), 1 << 10, 0)
                + tl.where(xf != 0.0, 1 << 20, 0)
            )

    n_valid = tl.minimum(hi, start + CHUNK) - tl.maximum(lo, start)
    n_nan = tl.sum(acc_cnt & 1023, axis=0)
    n_inf = tl.sum((acc_cnt >> 10) & 1023, axis=0)
    n_zero = n_valid - tl.sum(acc_cnt >> 20, axis=0)
    mx = tl.max(acc_max, axis=0).to(tl.float64)
    o = out_ptr + row * 6
    tl.atomic_add(o + 0, tl.sum(acc_sq, axis=0), sem="relaxed")
    tl.atomic_add(o + 1, tl.sum(acc_abs, axis=0), sem="relaxed")
    tl.atomic_max(out_bits_ptr + row * 6 + 2, mx.to(tl.int64, bitcast=True), sem="relaxed")
    # Counts per chunk are exact int32; float64 holds integer sums exactly up to 2**53. Zero
    # counts skip the atomic (usual for NaN/inf), which keeps same-address contention low.
    if n_nan != 0:
        tl.atomic_add(o + 3, n_nan.to(tl.float64), sem="relaxed")
    if n_inf != 0:
        tl.atomic_add(o + 4, n_inf.to(tl.float64), sem="relaxed")
    if n_zero != 0:
        tl.atomic_add(o + 5, n_zero.to(tl.float64), sem="relaxed")


# triton.jit decides compiled vs interpreted from TRITON_INTERPRET when it decorates, so the
# kernel is decorated lazily, per mode: importing this module before the env var is set (e.g.
# during test collection) must not freeze the wrong mode.
_KERNELS: dict[bool, Any] = {}


def _kernel(interpret: bool) -> Any:
    kern = _KERNELS.get(interpret)
    if kern is None:
        kern = triton.jit(_partials_kernel, do_not_specialize=["n_slots", "slot0", "chunk0"])
        _KERNELS[interpret] = kern
    return kern


def _tl_dtype(dtype: torch.dtype) -> Any:
    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill [data_ptr, data_ptr + numel) exactly."""
    if t.is_contiguous():
        return True
    expected = 1
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def triton_partials(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, 6] float64 partials (SUMSQ, SUMABS, MAXABS, NAN, INF, ZERO) on the tensors' device.

    One kernel launch per dtype present, no host synchronisation, extra memory O(T) (plus a
    contiguous copy of each tensor that has gaps or overlapping elements).
    """
    tensors = list(tensors)
    if triton is None:
        raise RuntimeError("triton is not importable")
    if not tensors:
        return torch.zeros((0, N_PARTIALS), dtype=torch.float64)
    if not isinstance(tensors[0], torch.Tensor):
        raise TypeError(f"expected torch.Tensor, got {type(tensors[0]).__name__}")
    for t in tensors:  # wrapper subclasses (DTensor) have no data of their own at data_ptr()
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            raise TypeError(f"triton_partials needs plain tensors, got a {type(t).__name__}")
    device = tensors[0].device
    interpret = _interpret_mode()
    is_cuda = device.type == "cuda"
    if is_cuda and interpret:
        # The interpreter would copy our table to the host and dereference device addresses.
        raise RuntimeError("triton_partials on CUDA tensors needs TRITON_INTERPRET unset")
    if not is_cuda and not interpret:
        raise RuntimeError(f"triton_partials on {device} tensors needs TRITON_INTERPRET=1")

    block, sub, num_warps = launch_config(device)
    chunk = block * sub
    keep_alive: list[torch.Tensor] = []  # contiguous copies must outlive the launch
    groups: dict[torch.dtype, list[tuple[int, int, int, int]]] = {}  # [(row, base, lo, hi)]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected torch.Tensor, got {type(t).__name__}")
        esize = _ITEMSIZE.get(t.dtype)
        if esize is None:
            raise TypeError(
                f"triton_partials supports float16/bfloat16/float32/float64, got {t.dtype}"
            )
        if t.device != device:
            raise ValueError(f"all tensors must share one device, got {device} and {t.device}")
        n = t.numel()
        if n == 0:
            continue  # row stays all zeros
        if not _is_dense(t):
            # Gaps or overlap: no flat span holds exactly its elements. Copy just this one.
            t = t.detach().contiguous()
            keep_alive.append(t)
        # data_ptr() is element [0,...,0], the lowest address (torch strides are >= 0).
        addr = t.data_ptr()
        shift = (addr % _ALIGN_BYTES) // esize
        groups.setdefault(t.dtype, []).append((i, addr - shift * esize, shift, shift + n))

    out = torch.zeros((len(tensors), N_PARTIALS), dtype=torch.float64, device=device)
    if not groups:
        return out

    slots = [s for g in groups.values() for s in g]
    n_slots = len(slots)
    cstart = [0] * (n_slots + 1)
    for j, (_, _, _, hi) in enumerate(slots):
        cstart[j + 1] = cstart[j] + -(-hi // chunk)
    flat = [s[1] for s in slots] + [s[2] for s in slots] + [s[3] for s in slots]
    flat += [s[0] for s in slots] + cstart
    # One table, one H2D copy. On CUDA it is pinned: a non_blocking copy from pinned memory is
    # an async DMA ordered on the current stream before the kernels, and the caching host
    # allocator keeps the block until that copy has finished. From pageable memory the same
    # copy would block the host.
    tab = torch.tensor(flat, dtype=torch.int64, pin_memory=is_cuda)
    if is_cuda:
        tab = tab.to(device, non_blocking=True)

    kern = _kernel(interpret)
    out_bits = out.view(torch.int64)
    guard = torch.cuda.device(device) if is_cuda else contextlib.nullcontext()
    with guard:  # triton launches on the current device's current stream
        slot0 = 0
        for dtype, g in groups.items():
            n_g = len(g)
            chunk0 = cstart[slot0]
            kern[(cstart[slot0 + n_g] - chunk0,)](
                tab,
                out,
                out_bits,
                n_slots,
                slot0,
                chunk0,
                DTYPE=_tl_dtype(dtype),
                IS_F64=dtype == torch.float64,
                LOG_SLOTS=(n_g - 1).bit_length(),
                BLOCK=block,
                SUB=sub,
                num_warps=num_warps,
            )
            slot0 += n_g
    del keep_alive  # stream-ordered allocator: freeing after the launch is safe
    return out
