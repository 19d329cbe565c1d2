"""Triton multi-tensor reduction: the six partials of ``gradwatch.kernels`` in one pass.

One kernel launch per dtype group reads every element exactly once. Each tensor is cut into
chunks of ``CHUNK = BLOCK * SUB`` elements. The grid is persistent: ``min(chunks, SMs x
PROGRAMS_PER_SM)`` programs (a small constant under the interpreter), each reducing a
contiguous run of the group's chunks in slot order. A program adds the partials of the chunks
of one tensor in registers (float64 sums, int64 counts, the max) and flushes them into the
tensor's output row with atomics when its run leaves the tensor or ends: one flush per
(program, tensor) instead of one per chunk (``atomic_add`` in float64 for sums and counts,
``atomic_max`` on the int64 bit pattern for the max: abs values are >= 0 and never NaN here,
and non-negative doubles order like their bit patterns). With ``PROGRAMS_PER_SM = 0`` the grid
is one program per chunk (the previous kernel, kept for comparison in the benchmarks).

The only host->device traffic is one int64 buffer: a table of ``5 * S + 1`` entries (S =
non-empty tensors), built from ``data_ptr()``/``numel()`` (host metadata, no sync), followed by
the zeroed output, sent from pinned memory with ``non_blocking=True``. Slots are grouped by
dtype; per slot ``j``:

* ``base[j]``: the tensor's lowest address rounded down to 16 bytes;
* ``lo[j]``, ``hi[j]``: its elements relative to ``base`` (``lo`` in 0..7, ``hi = lo + numel``);
* ``row[j]``: its output row;
* ``cstart[j]``: its first chunk (prefix sum of chunk counts; ``cstart[S]`` = total).

Chunk ``k`` of a slot covers ``[k*CHUNK, (k+1)*CHUNK)`` relative to ``base``, clipped to
``[lo, hi)``. A program finds the slot of its run's first chunk by a 64-ary search over
``cstart`` (one vector load per round, two rounds up to 4096 tensors), so the table stays
O(tensors), not O(chunks); the run's later chunks step through the following slots in order
(every slot has at least one chunk). The table is cached per layout (dtypes and element counts):
between steps only the base addresses are rewritten, and with unchanged addresses the device
table is reused as it is. The loaded
int64 ``base`` is cast to a typed pointer (``.to(tl.pointer_type(DTYPE))``); this works compiled and
under ``TRITON_INTERPRET=1`` (the interpreter treats int<->pointer casts as bitcasts and reads CPU
tensors in place). Because ``base`` is 16-byte aligned every interior chunk starts aligned and
is loaded unmasked with 128-bit loads; only a tensor's first and last chunk take a masked path.

Dense but non-contiguous tensors (transposes, channels_last) are read as their flat storage span:
all six statistics are permutation-invariant. Tensors with gaps or overlap (strided slices,
expanded views) are the only ones copied, one ``.contiguous()`` each.

Arithmetic. float32/float64 chunks widen every value to float64 and count NaN/inf/zeros exactly.
float16/bfloat16 chunks would be compute-bound that way (2e12 elements/s at 4 TB/s), so they
take a float32 fast path (squares exact, SUB-value lane sums in float32, relative error at most
``sum_relative_error_bound``) and are reread on the exact path only when the fast result
cannot be trusted (NaN/inf, float32 overflow, values too small for float32 squares).
Instruction counts (sm_90 SASS, interior chunk, measured on the per-chunk kernel): 14 per
bf16 element on the exact path, 7 on the fast path; fp32 13 (half the elements per byte, so
memory-bound either way). Chunks of a run add in float64 before the atomic, so the bound above
(float32 lanes within a chunk) holds whatever the grid.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .contract import (
    DTYPE_CODES,
    DTYPES,
    ITEMSIZE,
    N_PARTIALS,
    check_devices,
    check_dtypes,
    check_plain,
    constexprs,
)

try:  # triton is optional: callers check triton_available() before using this backend
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing or broken
    triton = None
    tl = None

_ALIGN_BYTES = 16  # one 128-bit vector load

# (BLOCK, SUB, num_warps) by element size; CHUNK = BLOCK * SUB = 16K elements per program
# (64 KB of fp32, 32 KB of 16-bit gradients). Every program starts with a search of the slot
# table (dependent loads) that the chunk must amortize: chosen with
# benchmarks/kernel_sweep.py on an H200 (GPT-2 small shapes): 8K-element chunks reached 67-78% of
# copy bandwidth, 16K-32K 75-82%, 64K and wider blocks (8-16 warps) less. Interpreter: small
# chunks so tests exercise multi-chunk tensors with a few thousand elements.
_CUDA_CONFIGS: dict[int, tuple[int, int, int]] = {
    2: (512, 32, 2),
    4: (1024, 16, 4),
    8: (1024, 8, 4),
}
_INTERPRET_CONFIG: tuple[int, int, int] = (128, 2, 4)

_ITEMSIZE = ITEMSIZE


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


def launch_config(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """(BLOCK, SUB, num_warps) for ``dtype`` on ``device``; CHUNK = BLOCK * SUB elements per
    program."""
    cfg = _CUDA_CONFIGS[_ITEMSIZE[dtype]] if device.type == "cuda" else _INTERPRET_CONFIG
    assert cfg[1] < 1024, "SUB must fit the kernel's 10-bit packed counters"
    return cfg


# Persistent grid: programs per SM on CUDA (each reduces a contiguous run of chunks). Not tuned
# on a GPU yet: benchmarks/kernel_sweep.py --programs sweeps it (0: one program per chunk, the
# previous kernel). Interpreter: a few programs, so tests see runs crossing tensor boundaries
# and tensors split over programs.
PROGRAMS_PER_SM = 8
_INTERPRET_PROGRAMS = 3
_SM_COUNT: dict[int, int] = {}


def persistent_programs(device: torch.device) -> int:
    """Programs per launch (at most one per chunk): SMs x PROGRAMS_PER_SM on CUDA; a large
    number when PROGRAMS_PER_SM is 0 (one program per chunk)."""
    if device.type != "cuda":
        return _INTERPRET_PROGRAMS
    if PROGRAMS_PER_SM <= 0:
        return 1 << 62
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SM_COUNT.get(index)
    if sms is None:  # device properties: host metadata, no sync; read once per device
        sms = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms * PROGRAMS_PER_SM


# Slot search fan-out: 64 cstart values per round, so 2 dependent rounds cover 4096 tensors of a
# dtype (a binary search took 12).
_SEARCH_FANOUT = 64


def _search_levels(n_slots: int) -> int:
    """Rounds of the kernel's slot search: the least L with _SEARCH_FANOUT**L >= n_slots."""
    levels = 0
    while _SEARCH_FANOUT**levels < n_slots:
        levels += 1
    return levels


def sum_relative_error_bound(dtype: torch.dtype, device: torch.device) -> float:
    """Bound on the relative error of one tensor's SUMSQ and SUMABS from this kernel.

    float16/bfloat16: each lane adds SUB values in float32 before float64 takes over (see the
    kernel), at most (SUB - 1) * 2**-24. float32/float64: float64 accumulation, the error
    of summing n values in float64 (n * 2**-53; callers treat it as zero).
    """
    if dtype in (torch.float16, torch.bfloat16):
        return (launch_config(device, dtype)[1] - 1) * 2.0**-24
    return 0.0


def _partials_kernel(
    tab,  # int64[5*S+1]: base[S], lo[S], hi[S], row[S], cstart[S+1]
    out_ptr,  # float64[T, 6], zeroed: atomically accumulated
    out_bits_ptr,  # the same memory as int64, for the MAXABS atomic_max
    n_slots,  # S
    slot0,  # first slot of this dtype group
    chunk0,  # first chunk of this dtype group (= cstart[slot0])
    n_chunks,  # chunks of this dtype group, split into one run per program
    DTYPE: tl.constexpr,
    IS_HALF: tl.constexpr,  # float16/bfloat16: float32 fast path, float64 redo when needed
    IS_F64: tl.constexpr,
    FANOUT: tl.constexpr,  # slot search: cstart values probed per round (a power of 2)
    LEVELS: tl.constexpr,  # search rounds: FANOUT**LEVELS >= slots in this group
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
    # the output columns, from kernels.contract (constexprs())
    COL_SUMSQ: tl.constexpr,
    COL_SUMABS: tl.constexpr,
    COL_MAXABS: tl.constexpr,
    COL_NAN: tl.constexpr,
    COL_INF: tl.constexpr,
    COL_ZERO: tl.constexpr,
    N_COLS: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * SUB
    # Persistent: this program reduces the contiguous run [c, c_end) of the group's chunks
    # (runs of equal length, +-1). With one program per chunk this is the per-chunk kernel.
    pid = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    c = chunk0 + pid * n_chunks // n_prog
    c_end = chunk0 + (pid + 1) * n_chunks // n_prog
    cstart_tab = tab + 4 * n_slots

    # The slot of the run's first chunk, the largest j in the group with cstart[j] <= c (later
    # chunks of the run step to the next slots in order): a FANOUT-ary search, one vector load of
    # FANOUT cstart values per round (LEVELS dependent round trips instead of log2(slots): the
    # search is latency the program's loads cannot start before). Invariant: cstart[j] <= c <
    # cstart[j + FANOUT**(levels left)]; cstart[S] is a sentinel above every chunk, and probes
    # past it are clamped to it, so j never leaves the group.
    j = slot0
    probes = tl.arange(0, FANOUT)
    for lvl in tl.static_range(LEVELS):
        stride = FANOUT ** (LEVELS - 1 - lvl)
        at = tl.minimum(j + probes * stride, n_slots)
        below = tl.sum((tl.load(cstart_tab + at) <= c).to(tl.int32), axis=0)  # >= 1: probe 0
        j = j + (below - 1) * stride

    offs = tl.arange(0, BLOCK)
    # One pass per tensor (slot) the run touches: its partials add up in registers over the
    # run's chunks of that tensor, then one atomic flush per (program, tensor). Every slot has
    # at least one chunk, so slot j + 1 starts where the run leaves slot j.
    while c < c_end:
        ptr = tl.load(tab + j).to(tl.pointer_type(DTYPE))
        lo = tl.load(tab + n_slots + j)
        hi = tl.load(tab + 2 * n_slots + j)
        row = tl.load(tab + 3 * n_slots + j)
        first = tl.load(cstart_tab + j)
        s_end = tl.minimum(tl.load(cstart_tab + j + 1), c_end)
        zero_i = c * 0  # int64 scalars of the loop's type
        t_sq = zero_i.to(tl.float64)
        t_abs = zero_i.to(tl.float64)
        t_mx = zero_i.to(tl.float64)
        t_nan = zero_i
        t_inf = zero_i
        t_zero = zero_i
        for k in range(c, s_end):
            start = (k - first) * CHUNK  # int64: tensors past 2**31 elements are fine
            n_valid = tl.minimum(hi, start + CHUNK) - tl.maximum(lo, start)
            interior = (start >= lo) & (start + CHUNK <= hi)

            if IS_HALF:
                # 16-bit inputs: 4 TB/s of bf16 is 2e12 elements/s, too many for float64 arithmetic
                # and three exact counts per element. Fast path in float32 instead: a 16-bit value's
                # square is exact in float32 (at most 22 significant bits); each lane sums its SUB
                # squares (and abs values) in float32, then lanes and chunks add in float64. All
                # terms are >= 0, so the relative error is at most (SUB - 1) * 2**-24 (1.8e-6 at SUB
                # = 32); float64 accumulation of the same values would give ~1e-16, and torch's own
                # norm of a 16-bit tensor accumulates everything in float32. Per element: a
                # multiply-add, an add, a max and one compare for the zero count; no NaN/inf tests
                # (see the redo below).
                f_sq = tl.zeros([BLOCK], dtype=tl.float32)
                f_abs = tl.zeros([BLOCK], dtype=tl.float32)
                f_max = tl.zeros([BLOCK], dtype=tl.float32)
                f_nz = tl.zeros([BLOCK], dtype=tl.float32)  # non-zeros; exact: a lane sees <= SUB
                if interior:
                    for s in range(SUB):
                        p = ptr + (start + s * BLOCK) + offs
                        p = tl.max_contiguous(tl.multiple_of(p, [16]), [BLOCK])
                        x = tl.load(p).to(tl.float32)
                        f_sq += x * x
                        f_abs += tl.abs(x)
                        f_max = tl.maximum(f_max, tl.abs(x))
                        f_nz += tl.where(x != 0.0, 1.0, 0.0)
                else:
                    for v in range(SUB):
                        idv = start + v * BLOCK + offs
                        x = tl.load(ptr + idv, mask=(idv >= lo) & (idv < hi), other=0.0).to(
                            tl.float32
                        )
                        f_sq += x * x
                        f_abs += tl.abs(x)
                        f_max = tl.maximum(f_max, tl.abs(x))
                        f_nz += tl.where(x != 0.0, 1.0, 0.0)
                sumsq = tl.sum(f_sq.to(tl.float64), axis=0)
                sumabs = tl.sum(f_abs.to(tl.float64), axis=0)
                mx = tl.max(f_max, axis=0).to(tl.float64)
                n_nan = (n_valid * 0).to(tl.int64)
                n_inf = (n_valid * 0).to(tl.int64)
                n_zero = n_valid - tl.sum(f_nz, axis=0).to(tl.int64)
                # Redo the chunk exactly (below) when the fast path may be wrong: a sum of squares
                # that is not finite (NaN/inf values, to be counted apart, or float32 lane sums that
                # overflowed) or a non-zero max below 2**-40 (squares would fall below float32's
                # normal range; above it, lost subnormal parts are under 2**-50 of the sum). Rare in
                # training: one extra read of this chunk only.
                redo = (
                    (sumsq != sumsq)
                    | (sumsq == float("inf"))
                    | ((mx < 9.094947017729282e-13) & (mx > 0.0))
                )
            else:
                # constexpr: a static branch, its results defined after it
                redo: tl.constexpr = True

            if redo:
                # Exact path: float64 sums (each value widened before squaring), exact NaN/inf/zero
                # counts. NaN/inf/zero tests and the max run in the float32 widening of 16/32-bit
                # inputs (exact): float64 compares are far slower on GPUs.
                if IS_F64:
                    ACC_T: tl.constexpr = tl.float64
                else:
                    ACC_T: tl.constexpr = tl.float32
                acc_sq = tl.zeros([BLOCK], dtype=tl.float64)
                acc_abs = tl.zeros([BLOCK], dtype=tl.float64)
                acc_max = tl.zeros([BLOCK], dtype=ACC_T)
                # Three per-lane counters packed in one int32 (fewer instructions and registers than
                # three): bits 0-9 NaN, 10-19 inf, 20-30 non-zero. A lane counts at most SUB (<
                # 1024) elements. Masked lanes load 0, so zeros are counted as n_valid - non-zero.
                acc_cnt = tl.zeros([BLOCK], dtype=tl.int32)
                if interior & (not IS_HALF):
                    # Interior chunk: unmasked loads. Alignment facts are lost through int_to_ptr,
                    # so restate them: each sub-block starts 16-byte aligned (base is, and start is
                    # a multiple of CHUNK) and is contiguous. Without this hint Triton emits scalar
                    # loads. (16-bit redos are rare: they take the masked loop, which keeps the
                    # kernel small.)
                    for r in range(SUB):
                        q = ptr + (start + r * BLOCK) + offs
                        q = tl.max_contiguous(tl.multiple_of(q, [16]), [BLOCK])
                        xf = tl.load(q).to(ACC_T)
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
                    # First/last chunk of a tensor: mask to [lo, hi). Fully masked sub-blocks touch
                    # no memory. Loop variables are all named apart: Triton 3.6 unifies same-named
                    # variables across if/else.
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
                sumsq = tl.sum(acc_sq, axis=0)
                sumabs = tl.sum(acc_abs, axis=0)
                mx = tl.max(acc_max, axis=0).to(tl.float64)
                n_nan = tl.sum(acc_cnt & 1023, axis=0).to(tl.int64)
                n_inf = tl.sum((acc_cnt >> 10) & 1023, axis=0).to(tl.int64)
                n_zero = n_valid - tl.sum(acc_cnt >> 20, axis=0).to(tl.int64)

            t_sq += sumsq
            t_abs += sumabs
            t_mx = tl.maximum(t_mx, mx)  # both >= 0 and never NaN
            t_nan += n_nan
            t_inf += n_inf
            t_zero += n_zero

        o = out_ptr + row * N_COLS
        tl.atomic_add(o + COL_SUMSQ, t_sq, sem="relaxed")
        tl.atomic_add(o + COL_SUMABS, t_abs, sem="relaxed")
        m_bits = t_mx.to(tl.int64, bitcast=True)
        tl.atomic_max(out_bits_ptr + row * N_COLS + COL_MAXABS, m_bits, sem="relaxed")
        # Counts are exact; float64 holds integer sums exactly up to 2**53. Zero counts skip
        # the atomic (usual for NaN/inf), which keeps same-address contention low.
        if t_nan != 0:
            tl.atomic_add(o + COL_NAN, t_nan.to(tl.float64), sem="relaxed")
        if t_inf != 0:
            tl.atomic_add(o + COL_INF, t_inf.to(tl.float64), sem="relaxed")
        if t_zero != 0:
            tl.atomic_add(o + COL_ZERO, t_zero.to(tl.float64), sem="relaxed")
        c = s_end
        j = j + 1


# triton.jit decides compiled vs interpreted from TRITON_INTERPRET when it decorates, so the
# kernel is decorated lazily, per mode: importing this module before the env var is set (e.g.
# during test collection) must not freeze the wrong mode.
_KERNELS: dict[bool, Any] = {}


def _kernel(interpret: bool) -> Any:
    kern = _KERNELS.get(interpret)
    if kern is None:
        runtime = ["n_slots", "slot0", "chunk0", "n_chunks"]  # never specialize: one compile
        kern = triton.jit(_partials_kernel, do_not_specialize=runtime)
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


# Slot groups in the contract's dtype-code order (indexed by code).
_DTYPES = tuple(d.torch_dtype for d in sorted(DTYPES, key=lambda d: d.code))
_DTYPE_CODE = DTYPE_CODES
_ITEMSIZE_BY_CODE = np.array([_ITEMSIZE[dt] for dt in _DTYPES], dtype=np.int64)
_get_dtype = operator.attrgetter("dtype")
_COLUMN_CONSTEXPRS = constexprs()


@dataclass
class _Layout:
    """The slot table of one layout (dtypes and element counts, in order) but for the base
    addresses, and the table last sent to the device."""

    rows: np.ndarray  # per slot: its tensor's row (non-empty tensors, grouped by dtype code)
    itemsize: np.ndarray  # per slot
    shift: np.ndarray  # per slot: elements between base and the tensor's first (0..7)
    template: np.ndarray  # int64 [5*S+1 + T*6]: base (left 0), lo, hi, row, cstart; zeroed out
    launches: tuple[tuple[int, int, int], ...]  # (dtype code, first slot, slots) per group
    cstart: np.ndarray
    # (tensor addresses, device table) of the last call: a call with the same addresses reuses
    # the table as it is. Replaced, never written: a launch still in flight may read it.
    sent: tuple[np.ndarray, torch.Tensor] | None = None


# Layouts by (device, stream, launch settings, dtypes, element counts); a few, for several
# models or watches. Per stream: a table reused on another stream would not be ordered after its
# H2D copy, nor would the allocator know that stream still reads it.
_LAYOUTS: OrderedDict[tuple, _Layout] = OrderedDict()
_MAX_LAYOUTS = 8
_LAYOUTS_LOCK = threading.Lock()
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous
_WHO = "triton_partials"


def clear_layout_cache() -> None:
    """Forget every cached table (benchmarks: time the uncached path)."""
    with _LAYOUTS_LOCK:
        _LAYOUTS.clear()


def _settings(device: torch.device) -> tuple:
    """What the table depends on besides the tensors: chunk sizes and the search fan-out."""
    return (tuple(launch_config(device, dt) for dt in _DTYPES), _SEARCH_FANOUT)


def _build_layout(
    dtypes: Sequence[torch.dtype], numel: np.ndarray, addr: np.ndarray, device: torch.device
) -> _Layout:
    codes = np.fromiter(map(_DTYPE_CODE.__getitem__, dtypes), dtype=np.int64, count=len(dtypes))
    n_tensors = len(dtypes)
    rows = np.flatnonzero(numel)  # empty tensors keep an all-zero row
    # Slots: the non-empty tensors, grouped by dtype (stable: tensor order within a group).
    rows = rows[np.argsort(codes[rows], kind="stable")]
    itemsize = _ITEMSIZE_BY_CODE[codes[rows]]
    shift = (addr[rows] % _ALIGN_BYTES) // itemsize
    hi = shift + numel[rows]
    configs = [launch_config(device, dt) for dt in _DTYPES]
    chunk = np.array([blk * sub for blk, sub, _ in configs], dtype=np.int64)[codes[rows]]
    n_slots = rows.size
    cstart = np.zeros(n_slots + 1, dtype=np.int64)
    np.cumsum(-(-hi // chunk), out=cstart[1:])
    n_tab = 5 * n_slots + 1
    template = np.zeros(n_tab + n_tensors * N_PARTIALS, dtype=np.int64)
    template[n_slots:n_tab] = np.concatenate([shift, hi, rows, cstart])
    group_sizes = np.bincount(codes[rows], minlength=len(_DTYPES)).tolist()
    launches, slot0 = [], 0
    for code, n_g in enumerate(group_sizes):
        if n_g:
            launches.append((code, slot0, n_g))
            slot0 += n_g
    return _Layout(rows, itemsize, shift, template, tuple(launches), cstart)


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
    # Host cost matters (it runs every step, per tensor): per-tensor metadata is read with
    # map() over C methods, the table is built with numpy and cached per layout (same dtypes and
    # element counts: only the base addresses change between steps, if anything).
    check_plain(tensors, _WHO)
    check_devices(tensors, _WHO, cpu=False)
    device = tensors[0].device
    interpret = _interpret_mode()
    is_cuda = device.type == "cuda"
    if is_cuda and interpret:
        # The interpreter would copy our table to the host and dereference device addresses.
        raise RuntimeError("triton_partials on CUDA tensors needs TRITON_INTERPRET unset")
    if not is_cuda and not interpret:
        raise RuntimeError(f"triton_partials on {device} tensors needs TRITON_INTERPRET=1")
    dtypes = tuple(map(_get_dtype, tensors))
    counts = tuple(map(_numel, tensors))
    stream = torch.cuda.current_stream(device).cuda_stream if is_cuda else 0
    key = (device, stream, _settings(device), dtypes, counts)
    with _LAYOUTS_LOCK:
        layout = _LAYOUTS.get(key)
        if layout is not None:
            _LAYOUTS.move_to_end(key)
    if layout is None:
        check_dtypes(set(dtypes), _WHO)  # a cached layout's dtypes passed when it was built

    n_tensors = len(tensors)
    # data_ptr() is element [0,...,0], the lowest address (torch strides are >= 0).
    addr = np.fromiter(map(_data_ptr, tensors), dtype=np.int64, count=n_tensors)
    keep_alive: list[torch.Tensor] = []  # contiguous copies must outlive the launch
    if not all(map(_is_contiguous, tensors)):
        for i, t in enumerate(tensors):
            if counts[i] and not _is_dense(t):
                # Gaps or overlap: no flat span holds exactly its elements. Copy just this one.
                copy = t.detach().contiguous()
                keep_alive.append(copy)
                addr[i] = copy.data_ptr()
    if layout is not None and layout.rows.size:
        slot_addr = addr[layout.rows]
        if not np.array_equal((slot_addr % _ALIGN_BYTES) // layout.itemsize, layout.shift):
            layout = None  # another alignment within 16 bytes: other lo/hi/cstart
    if layout is None:
        layout = _build_layout(dtypes, np.array(counts, dtype=np.int64), addr, device)
        with _LAYOUTS_LOCK:
            _LAYOUTS[key] = layout
            while len(_LAYOUTS) > _MAX_LAYOUTS:
                _LAYOUTS.popitem(last=False)
        slot_addr = addr[layout.rows]
    n_slots = layout.rows.size
    if n_slots == 0:
        return torch.zeros((n_tensors, N_PARTIALS), dtype=torch.float64, device=device)
    n_tab = 5 * n_slots + 1
    sent = layout.sent
    if sent is not None and np.array_equal(sent[0], addr):
        # Same addresses: the table on the device is this call's table. Only a fresh zeroed
        # output (one fill, no H2D copy); the caller owns the output of the earlier call.
        tab = sent[1]
        out = torch.zeros((n_tensors, N_PARTIALS), dtype=torch.float64, device=device)
        out_bits = out.view(torch.int64)
    else:
        # One buffer, one H2D copy: the table, then the zeroed [T, 6] output (int64 zeros are
        # float64 zeros), so no separate fill kernel runs before the reduction. On CUDA it is
        # pinned: a non_blocking copy from pinned memory is an async DMA ordered on the current
        # stream before the kernels, and the caching host allocator keeps the block until that
        # copy has finished. From pageable memory the same copy would block the host.
        if is_cuda:
            buf = torch.empty(layout.template.size, dtype=torch.int64, pin_memory=True)
            host = buf.numpy()
            np.copyto(host, layout.template)
        else:
            host = layout.template.copy()
            buf = torch.from_numpy(host)
        np.subtract(slot_addr, layout.shift * layout.itemsize, out=host[:n_slots])  # base
        if is_cuda:
            buf = buf.to(device, non_blocking=True)
        tab = buf[:n_tab]
        out_bits = buf[n_tab:].view(n_tensors, N_PARTIALS)
        out = out_bits.view(torch.float64)
        layout.sent = (addr, tab)

    kern = _kernel(interpret)
    cstart = layout.cstart
    programs = persistent_programs(device)
    guard = torch.cuda.device(device) if is_cuda else contextlib.nullcontext()
    with guard:  # triton launches on the current device's current stream
        for code, slot0, n_g in layout.launches:
            dtype = _DTYPES[code]
            block, sub, num_warps = launch_config(device, dtype)
            chunk0 = int(cstart[slot0])
            n_chunks = int(cstart[slot0 + n_g]) - chunk0
            kern[(min(n_chunks, programs),)](
                tab,
                out,
                out_bits,
                n_slots,
                slot0,
                chunk0,
                n_chunks,
                DTYPE=_tl_dtype(dtype),
                IS_HALF=dtype in (torch.float16, torch.bfloat16),
                IS_F64=dtype == torch.float64,
                FANOUT=_SEARCH_FANOUT,
                LEVELS=_search_levels(n_g),
                BLOCK=block,
                SUB=sub,
                num_warps=num_warps,
                **_COLUMN_CONSTEXPRS,
            )
    del keep_alive  # stream-ordered allocator: freeing after the launch is safe
    return out
