"""The partials contract, stated once: columns, dtype codes, input checks and the rules that
combine, unscale and check partials.

Every backend writes ``[T, N_PARTIALS]`` float64 rows whose column ``c.index`` holds
``c.meaning`` for each :class:`Column` ``c`` of :data:`COLUMNS`. Everything that treats columns
differently reads the records instead of restating them: the C kernel gets the indices and dtype
codes as ``-D`` flags (:func:`c_defines`), the Triton kernel as constexprs (:func:`constexprs`),
the torch fallback orders its rows with :meth:`Contract.ordered`; combining pieces of one tensor
(:meth:`Contract.combine_pieces`) and ranks (:meth:`Contract.split_by_combine` /
:meth:`Contract.join_by_combine`), the loss-scale unscale (:meth:`Contract.unscale`) and the
float64 reference of the tests (:meth:`Contract.reference`) follow ``combine`` and
``scale_power``. Adding a column: a record here, its computation in each kernel, and nothing else
outside the kernels (tests check the rules against permuted and extended records).

Every column is >= 0 (or a count), so an all-zero row is the identity of both combines: rows a
rank holds no piece of stay zero (distributed, ZeRO).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Combine = Literal["sum", "max"]


@dataclass(frozen=True)
class Column:
    """One column of the partials: where it is, what it means, how it behaves."""

    name: str  # the module constant (``SUMSQ``) and the kernels' name (``GW_SUMSQ``)
    index: int
    meaning: str
    combine: Combine  # across pieces of a tensor, tensors' pieces on ranks: sum or max
    scale_power: int  # a loss scale s multiplies the column by s**scale_power (0: a count)
    exact: bool  # every backend matches the float64 reference exactly (else to a stated rtol)
    reference: Callable[[np.ndarray], float]  # the value over a tensor's float64 elements


def _sumsq(x: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sum(x * x)) if x.size else 0.0


def _sumabs(x: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sum(np.abs(x))) if x.size else 0.0


def _maxabs(x: np.ndarray) -> float:
    not_nan = x[~np.isnan(x)]
    return float(np.max(np.abs(not_nan))) if not_nan.size else 0.0


COLUMNS: tuple[Column, ...] = (
    Column(
        "SUMSQ",
        0,
        "sum of x*x, accumulated in float64 (NaN if any element is NaN, +inf if any is +-inf)",
        "sum",
        2,
        False,
        _sumsq,
    ),
    Column("SUMABS", 1, "sum of abs(x), accumulated in float64", "sum", 1, False, _sumabs),
    Column(
        "MAXABS",
        2,
        "max of abs(x) over the non-NaN elements (+inf if any is +-inf; 0 if none)",
        "max",
        1,
        True,
        _maxabs,
    ),
    Column("NAN", 3, "number of NaN elements", "sum", 0, True, lambda x: float(np.isnan(x).sum())),
    Column(
        "INF", 4, "number of +-inf elements", "sum", 0, True, lambda x: float(np.isinf(x).sum())
    ),
    Column(
        "ZERO", 5, "number of elements equal to 0 (+0 and -0)", "sum", 0, True,
        lambda x: float((x == 0).sum()),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class DType:
    """A dtype the kernels read, with its code in the C and Triton kernels' tables."""

    torch_dtype: torch.dtype
    code: int
    c_name: str  # ``GW_F32``: the define the C kernel switches on
    itemsize: int


DTYPES: tuple[DType, ...] = (
    DType(torch.float32, 0, "GW_F32", 4),
    DType(torch.float16, 1, "GW_F16", 2),
    DType(torch.bfloat16, 2, "GW_BF16", 2),
    DType(torch.float64, 3, "GW_F64", 8),
)
DTYPE_CODES: dict[torch.dtype, int] = {d.torch_dtype: d.code for d in DTYPES}
"""The one dtype-code table (C kernel, Triton slot groups)."""
ITEMSIZE: dict[torch.dtype, int] = {d.torch_dtype: d.itemsize for d in DTYPES}


class Contract:
    """The combine/unscale/reference rules for a list of columns (:data:`CONTRACT` is the real
    one; tests build others to check that nothing depends on the order or number of columns)."""

    def __init__(self, columns: Sequence[Column]) -> None:
        cols = tuple(sorted(columns, key=lambda c: c.index))
        if [c.index for c in cols] != list(range(len(cols))):
            raise ValueError("column indices must be 0..n-1, each once")
        if len({c.name for c in cols}) != len(cols):
            raise ValueError("column names must be unique")
        for c in cols:
            if c.combine not in ("sum", "max") or c.scale_power not in (0, 1, 2):
                raise ValueError(f"column {c.name}: combine sum/max, scale_power 0/1/2")
        self.columns = cols
        self.n = len(cols)
        self.by_name = {c.name: c for c in cols}
        # Runs of adjacent columns that combine alike, as slices: a list index on a CUDA tensor
        # would be copied from pageable memory first (a host sync); slices never are.
        runs: list[tuple[int, int, Combine]] = []
        for c in cols:
            if runs and runs[-1][2] == c.combine:
                runs[-1] = (runs[-1][0], c.index + 1, c.combine)
            else:
                runs.append((c.index, c.index + 1, c.combine))
        self.runs = tuple(runs)
        self.kinds: tuple[Combine, ...] = tuple(k for k in ("sum", "max") if any(
            c.combine == k for c in cols))  # fmt: skip

    def ordered(self, values: Mapping[str, Any]) -> list[Any]:
        """``values`` by column name, in column order (a missing or unknown name raises)."""
        if values.keys() != self.by_name.keys():
            raise KeyError(f"need exactly the columns {sorted(self.by_name)}, got {sorted(values)}")
        return [values[c.name] for c in self.columns]

    def combine_pieces(self, rows: torch.Tensor) -> torch.Tensor:
        """The row of a tensor from the rows ``[k, n]`` of its pieces (sum or max per column)."""
        return torch.cat(
            [rows[:, a:b].sum(0) if k == "sum" else rows[:, a:b].amax(0) for a, b, k in self.runs]
        )

    def split_by_combine(self, partials: torch.Tensor) -> dict[Combine, torch.Tensor]:
        """``[T, n]`` -> one contiguous ``[T, columns of that kind]`` tensor per combine kind
        present (in column order): one all-reduce each (SUM, MAX) combines ranks."""
        return {
            kind: torch.cat([partials[:, a:b] for a, b, k in self.runs if k == kind], dim=1)
            for kind in self.kinds
        }

    def join_by_combine(self, parts: Mapping[Combine, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split_by_combine`."""
        taken = dict.fromkeys(parts, 0)
        pieces = []
        for a, b, kind in self.runs:
            pieces.append(parts[kind][:, taken[kind] : taken[kind] + b - a])
            taken[kind] += b - a
        return torch.cat(pieces, dim=1)

    def unscale(self, partials: Any, scale: float) -> None:
        """In place: partials of gradients multiplied by a loss scale -> those of the gradients
        (each column divided by ``scale ** scale_power``; counts unchanged). numpy or torch."""
        for c in self.columns:
            if c.scale_power:
                factor = 1.0
                for _ in range(c.scale_power):  # scale * scale, exactly as written out
                    factor *= scale
                partials[:, c.index] /= factor

    def reference(self, tensors: Iterable[torch.Tensor]) -> np.ndarray:
        """Float64 reference ``[T, n]`` from the columns' definitions (numpy, exact widening)."""
        rows = [[c.reference(to_float64_numpy(t)) for c in self.columns] for t in tensors]
        return np.array(rows, dtype=np.float64).reshape(len(rows), self.n)

    def zeros(self, t: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``t`` identity rows (no piece): zero in every column."""
        return torch.zeros((t, self.n), dtype=torch.float64, device=device)


def to_float64_numpy(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy of any floating tensor's values (bf16/fp16/fp32 all widen exactly)."""
    return t.detach().to("cpu", torch.float64).contiguous().numpy().reshape(-1)


CONTRACT = Contract(COLUMNS)
N_PARTIALS = CONTRACT.n
_IDX = {c.name: c.index for c in COLUMNS}
SUMSQ, SUMABS, MAXABS, NAN, INF, ZERO = (
    _IDX["SUMSQ"], _IDX["SUMABS"], _IDX["MAXABS"], _IDX["NAN"], _IDX["INF"], _IDX["ZERO"]
)  # fmt: skip
combine_pieces = CONTRACT.combine_pieces
split_by_combine = CONTRACT.split_by_combine
join_by_combine = CONTRACT.join_by_combine
unscale = CONTRACT.unscale
reference_partials = CONTRACT.reference


def c_defines(contract: Contract = CONTRACT) -> tuple[str, ...]:
    """Compiler flags giving the C kernel the column indices and dtype codes."""
    cols = [f"-DGW_{c.name}={c.index}" for c in contract.columns]
    codes = [f"-D{d.c_name}={d.code}" for d in DTYPES]
    return (*cols, f"-DGW_N_PARTIALS={contract.n}", *codes, f"-DGW_N_DTYPES={len(DTYPES)}")


def constexprs(contract: Contract = CONTRACT) -> dict[str, int]:
    """The Triton kernel's column constexprs: ``COL_SUMSQ=0, ..., N_COLS=6``."""
    return {**{f"COL_{c.name}": c.index for c in contract.columns}, "N_COLS": contract.n}


# ---- input checks shared by every backend --------------------------------------------------

_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
_get_dtype = torch.Tensor.dtype.__get__
_get_is_cpu = torch.Tensor.is_cpu.__get__
_get_device = torch.Tensor.device.__get__
_get_is_cuda = torch.Tensor.is_cuda.__get__
_get_device_index = torch.Tensor.get_device
_SUPPORTED = "float32/float16/bfloat16/float64"


def check_inputs(
    tensors: Sequence[torch.Tensor], who: str, *, cpu: bool, plain: bool = True
) -> set[torch.dtype]:
    """The checks before any backend reads ``tensors``; returns the set of their dtypes.

    TypeError: not a tensor, a wrapper subclass when ``plain`` (a DTensor's data_ptr() is not
    its data: callers pass local shards), or a dtype outside :data:`DTYPES`. ValueError: with
    ``cpu`` a tensor not on the CPU, else tensors on more than one device. map() over C-level
    accessors: ~2x cheaper than a Python loop, and this runs per step over every gradient."""
    if plain:
        check_plain(tensors, who)
    check_devices(tensors, who, cpu=cpu)
    dtypes = set(map(_get_dtype, tensors))
    check_dtypes(dtypes, who)
    return dtypes


def check_plain(tensors: Sequence[torch.Tensor], who: str) -> None:
    """TypeError unless every one is a plain ``torch.Tensor`` (or ``Parameter``)."""
    types = set(map(type, tensors))
    if not types <= _PLAIN_TYPES:
        bad = next(t for t in types if t not in _PLAIN_TYPES)
        if not issubclass(bad, torch.Tensor):
            raise TypeError(f"{who}: expected torch.Tensor, got {bad.__name__}")
        raise TypeError(f"{who} needs plain tensors, got a {bad.__name__}")


def check_devices(tensors: Sequence[torch.Tensor], who: str, *, cpu: bool) -> None:
    """ValueError: with ``cpu`` a tensor not on the CPU, else tensors on several devices."""
    if cpu:
        if not all(map(_get_is_cpu, tensors)):
            bad_dev = next(t.device for t in tensors if not t.is_cpu)
            raise ValueError(f"{who} needs CPU tensors, got one on {bad_dev}")
        return
    if not tensors:
        return
    if tensors[0].is_cuda:  # two cheap C getters instead of one torch.device object per tensor
        same = all(map(_get_is_cuda, tensors)) and len(set(map(_get_device_index, tensors))) == 1
    elif tensors[0].is_cpu:
        same = all(map(_get_is_cpu, tensors))
    else:
        same = len(set(map(_get_device, tensors))) == 1
    if not same:
        got = sorted(map(str, set(map(_get_device, tensors))))
        raise ValueError(f"{who}: all tensors must share one device, got {got}")


def check_dtypes(dtypes: Iterable[torch.dtype], who: str) -> None:
    """TypeError for a dtype outside :data:`DTYPES`."""
    for dt in dtypes:
        if dt not in DTYPE_CODES:
            raise TypeError(f"{who}: unsupported dtype {dt}: need {_SUPPORTED}")
