"""Per-tensor reduction kernels: one read of each gradient element, six partials per tensor.

The contract lives in :mod:`gradwatch.kernels.contract` (re-exported here): one
:class:`~gradwatch.kernels.contract.Column` record per column (name, index, meaning, how it
combines across pieces and ranks, how a loss scale scales it, its float64 reference), one
dtype-code table, the input checks and the combine/unscale helpers.

``partials(tensors) -> Tensor[T, N_PARTIALS] float64`` on the tensors' device, one row per
tensor, columns

=========  ==============================================================
SUMSQ  0   sum of x*x over the tensor, accumulated in float64 (NaN if any
           element is NaN, +inf if any is +-inf); the Triton kernel adds
           float16/bfloat16 values in float32 lanes of SUB values first
           (relative error <= (SUB - 1) * 2**-24, see triton_reduce)
SUMABS 1   sum of abs(x), accumulated in float64 (same NaN/inf and
           16-bit rules)
MAXABS 2   max of abs(x) over the non-NaN elements (+inf if any is +-inf);
           0 for an empty tensor or one holding only NaN
NAN    3   number of NaN elements (exact)
INF    4   number of +-inf elements (exact)
ZERO   5   number of elements exactly equal to 0 (+0 and -0)
=========  ==============================================================

Pieces of a tensor and ranks combine by sum, MAXABS by max; a loss scale s scales SUMSQ by s**2,
SUMABS and MAXABS by s (``unscale``). Tensors of one call share a device but may mix dtypes
(float16, bfloat16, float32, float64); they may be empty, hold one element, or be
non-contiguous. Element counts are known on the host (``numel()``) and are not part of the
result. No backend copies all gradients into one buffer: extra memory is O(T), never
O(elements) (the torch fallback on a device adds one reused buffer of a fixed size).
"""

from __future__ import annotations

from .contract import (
    COLUMNS,
    CONTRACT,
    DTYPE_CODES,
    DTYPES,
    INF,
    MAXABS,
    N_PARTIALS,
    NAN,
    SUMABS,
    SUMSQ,
    ZERO,
    Column,
    check_inputs,
    combine_pieces,
    join_by_combine,
    reference_partials,
    split_by_combine,
    unscale,
)

__all__ = [
    "COLUMNS",
    "CONTRACT",
    "DTYPE_CODES",
    "DTYPES",
    "INF",
    "MAXABS",
    "N_PARTIALS",
    "NAN",
    "SUMABS",
    "SUMSQ",
    "ZERO",
    "Column",
    "check_inputs",
    "combine_pieces",
    "join_by_combine",
    "reference_partials",
    "split_by_combine",
    "unscale",
]
