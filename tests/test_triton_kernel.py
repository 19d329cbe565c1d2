"""Tests for the Triton multi-tensor partials kernel (gradwatch.kernels.triton_reduce).

CPU tests run the kernel under the Triton interpreter. Two things decide whether that works:

* ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates. The kernel module decorates its
  kernel lazily, per call, so it follows the variable whenever it was imported.
* triton's own jit-implemented library functions (``tl.sum``, ``tl.max``, ``tl.zeros``) are
  decorated when ``triton`` is first imported. If that happened without ``TRITON_INTERPRET=1``
  (another test module imported triton first), interpreted kernels fail ("Cannot call
  @triton.jit'd outside of the scope of a kernel"), and the reverse freezes them interpreted for
  every compiled kernel in the process.

So the variable is set here before triton is imported. If triton was already imported without
it, or a GPU is visible (importing triton in interpreter mode would break compiled Triton in other
test modules of the same pytest run), the in-process tests skip and
``test_interpreter_suite_in_subprocess`` runs this file in a fresh interpreter with
``TRITON_INTERPRET=1`` and no visible GPU. After the imports the variable is restored, so it does
not leak into other test modules; an autouse fixture sets it for each test here. The CUDA test
runs a subprocess without it: interpreted kernels must never see CUDA pointers.
"""

from __future__ import annotations

import os
import sys

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
_TRITON_PREIMPORTED = "triton" in sys.modules
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see the module docstring)

import dataclasses  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  (does not import triton)


def _restore_interpret_env() -> None:
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


if torch.cuda.is_available() and not _TRITON_PREIMPORTED:
    _restore_interpret_env()  # keep triton compiled for the GPU tests of this process

if os.environ.get("CI") == "true":
    import triton  # CI must fail, not skip, when triton is missing
else:
    triton = pytest.importorskip("triton")

from gradwatch.kernels import (  # noqa: E402
    INF,
    MAXABS,
    NAN,
    SUMABS,
    SUMSQ,
    ZERO,
    triton_reduce,
)
from gradwatch.kernels.contract import COLUMNS, Contract, constexprs  # noqa: E402
from gradwatch.kernels.triton_reduce import (  # noqa: E402
    launch_config,
    triton_available,
    triton_partials,
)
from reference import assert_partials_close, assert_triton_close, reference_partials  # noqa: E402

# triton's library functions were decorated for the interpreter iff this is an InterpretedFunction.
IN_PROCESS = type(triton.language.sum).__name__ == "InterpretedFunction"
_restore_interpret_env()

ROOT = Path(__file__).resolve().parents[1]
BLOCK, SUB, _ = launch_config(torch.device("cpu"))
CHUNK = BLOCK * SUB
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_NOT_INTERPRETED = {
    "test_interpreter_suite_in_subprocess",
    "test_cuda_mixed_noncontiguous_no_sync",
    "test_kernel_compiles_for_sm90_without_a_gpu",
}


@pytest.fixture(autouse=True)
def _interpret(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.originalname in _NOT_INTERPRETED:
        return
    if not IN_PROCESS:
        pytest.skip("triton was not imported in interpreter mode here: see the subprocess test")
    # The kernel module reads the variable per call; set it only while our tests run.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# Defined only where it is needed (triton imported compiled, e.g. with a GPU): where the interpreter
# tests run in this process (CI, via conftest.py) a duplicate run would only cost time.
if not IN_PROCESS:

    def test_interpreter_suite_in_subprocess() -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
        )
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-m",
            "not cuda",
            "-p",
            "no:cacheprovider",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
        passed = re.search(r"(\d+) passed", proc.stdout)
        assert passed and int(passed.group(1)) >= 25, proc.stdout[-5000:]


class _CountLaunches:
    """Wraps the interpreted kernel to count launches (one per dtype group expected)."""

    def __init__(self, kern) -> None:
        self.kern = kern
        self.launches: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(tuple(grid))
            return self.kern[grid](*args, **kwargs)

        return launch


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> _CountLaunches:
    counter = _CountLaunches(triton_reduce._kernel(True))
    monkeypatch.setitem(triton_reduce._KERNELS, True, counter)
    return counter


def test_available() -> None:
    assert triton_available()


def test_no_tensors() -> None:
    out = triton_partials([])
    assert out.shape == (0, 6) and out.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_random(dtype: torch.dtype, launches: _CountLaunches) -> None:
    g = torch.Generator().manual_seed(1)
    ts = [
        torch.randn(CHUNK + 77, generator=g).to(dtype),
        torch.randn(13, 7, generator=g).to(dtype),
        torch.rand(5, generator=g).to(dtype) * 1e3,
    ]
    out = triton_partials(ts)
    assert out.dtype == torch.float64 and out.shape == (3, 6)
    assert_triton_close(out, ts)
    assert len(launches.launches) == 1


def test_mixed_dtypes_one_launch_per_group(launches: _CountLaunches) -> None:
    g = torch.Generator().manual_seed(2)
    ts = [
        torch.randn(300, generator=g),
        torch.randn(200, generator=g).bfloat16(),
        torch.randn(9, 9, generator=g).half(),
        torch.randn(CHUNK + 5, generator=g, dtype=torch.float64),
        torch.randn(40, generator=g),
        torch.randn(3, generator=g).bfloat16(),
        torch.empty(0, dtype=torch.float16),
    ]
    out = triton_partials(ts)
    assert_triton_close(out, ts)
    assert len(launches.launches) == 4
    # Grid = chunks of the group (fresh CPU tensors are 64-byte aligned, so no head shift):
    # fp16 1, bf16 1 + 1, fp64 2, fp32 2 + 1; at most the persistent grid.
    programs = triton_reduce.persistent_programs(torch.device("cpu"))
    want = sorted(min(n, programs) for n in [1, 2, 2, 3])
    assert sorted(grid[0] for grid in launches.launches) == want


def test_empty_and_single_element(launches: _CountLaunches) -> None:
    ts = [
        torch.empty(0),
        torch.tensor([-3.5]),
        torch.empty(0, 5, dtype=torch.bfloat16),
        torch.tensor(2.0, dtype=torch.float16),  # 0-d
        torch.tensor([0.0], dtype=torch.float64),
    ]
    out = triton_partials(ts)
    assert_triton_close(out, ts)
    np.testing.assert_array_equal(out[0].numpy(), np.zeros(6))
    np.testing.assert_array_equal(out[1].numpy(), [12.25, 3.5, 3.5, 0, 0, 0])
    np.testing.assert_array_equal(out[4].numpy(), [0, 0, 0, 0, 0, 1])


def test_only_empty_tensors_launch_nothing(launches: _CountLaunches) -> None:
    out = triton_partials([torch.empty(0), torch.empty(3, 0, dtype=torch.float16)])
    assert torch.equal(out, torch.zeros(2, 6, dtype=torch.float64))
    assert launches.launches == []


@pytest.mark.parametrize("n", [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_chunk_boundaries(n: int) -> None:
    t = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert_triton_close(triton_partials([t]), [t])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_views_of_flat_buffer(dtype: torch.dtype) -> None:
    # Views into one flat buffer (like DDP/FSDP gradient buckets) start at odd offsets: the
    # first chunk is masked from a 16-byte aligned base, interior chunks are unmasked.
    flat = torch.randn(4 * CHUNK, generator=torch.Generator().manual_seed(3)).to(dtype)
    flat[::97] = 0.0
    views = [flat[1 : 1 + 2 * CHUNK + 3], flat[2 * CHUNK + 5 : 4 * CHUNK - 2], flat[3:4]]
    out = triton_partials(views)
    assert_triton_close(out, views)
    assert out[:, ZERO].sum() > 0


def test_noncontiguous_dense_reads_storage_span() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 30, generator=g)
    transposed = w.t()
    channels_last = torch.randn(2, 6, 5, 7, generator=g).to(memory_format=torch.channels_last)
    permuted = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).permute(2, 0, 1)
    ts = [transposed, channels_last, permuted]
    for t in ts:
        assert not t.is_contiguous() and triton_reduce._is_dense(t)
    assert_triton_close(triton_partials(ts), ts)


def test_noncontiguous_non_dense_falls_back_to_copy() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(30, 40, generator=g)
    ts = [
        base[:, ::3],  # gaps
        base[2:9, 5:31],  # rows with gaps between them
        torch.randn(1, 25, generator=g).bfloat16().expand(6, 25),  # stride 0: overlap
        base.t()[::2],  # transposed and strided
    ]
    for t in ts:
        assert not triton_reduce._is_dense(t)
    assert_triton_close(triton_partials(ts), ts)


def test_large_magnitude_fp32_sums_in_float64() -> None:
    t = torch.full((CHUNK + 10,), 1e20, dtype=torch.float32)
    t[::2] = -1e20
    out = triton_partials([t])
    assert_triton_close(out, [t])
    v = float(np.float32(1e20)) ** 2 * t.numel()
    assert np.isfinite(out[0, SUMSQ].item()) and out[0, SUMSQ].item() == pytest.approx(v, rel=1e-12)
    assert out[0, MAXABS].item() == float(np.float32(1e20))


@pytest.mark.parametrize("fanout", [2, 4, 64])
def test_slot_search_finds_every_chunk(fanout: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FANOUT-ary slot search over several rounds: 70 tensors in two dtype groups (the fp32
    group starts at slot 35), sizes from 1 element to several chunks, each chunk counted once."""
    monkeypatch.setattr(triton_reduce, "_SEARCH_FANOUT", fanout)
    assert triton_reduce._search_levels(35) == {2: 6, 4: 3, 64: 1}[fanout]  # rounds per group
    g = torch.Generator().manual_seed(fanout)
    ts = [
        (torch.randn(1 + (i * 997) % (3 * CHUNK), generator=g) + 1).to(
            torch.bfloat16 if i % 2 else torch.float32
        )
        for i in range(70)
    ]
    out = triton_partials(ts)
    assert_triton_close(out, ts)
    # zero counts are exact per tensor: a chunk read twice or missed would show here
    np.testing.assert_array_equal(out[:, ZERO].numpy(), reference_partials(ts)[:, ZERO])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_fast_path_error_bound_and_exact_redo(dtype: torch.dtype) -> None:
    """16-bit chunks sum in float32 lanes (error within the stated bound); chunks the float32
    path cannot sum (non-finite values, squares that overflow or underflow float32) are redone
    exactly in float64."""
    g = torch.Generator().manual_seed(9)
    normal = torch.randn(3 * CHUNK + 3, generator=g).to(dtype)
    bound = triton_reduce.sum_relative_error_bound(dtype, normal.device)
    assert 0 < bound < 1e-6
    out = triton_partials([normal])
    want = reference_partials([normal])
    assert_triton_close(out, [normal])
    for col in (SUMSQ, SUMABS):
        assert abs(out[0, col].item() / want[0, col] - 1) <= bound

    special = torch.randn(CHUNK - 1, generator=g).to(dtype)
    special[5] = float("nan")
    special[9] = float("-inf")
    redo = [special]
    if dtype == torch.bfloat16:  # float32's exponent range: squares leave float32's range
        redo += [
            torch.randn(CHUNK + 7, generator=g).to(dtype) * 1e30,  # squares overflow float32
            torch.full((CHUNK,), 2.0**64, dtype=dtype),  # the smallest square that overflows
            torch.randn(2 * CHUNK, generator=g).to(dtype) * 1e-25,  # squares underflow
            torch.full((5,), 2.0**-41, dtype=dtype),  # just below the fast path's min
        ]
    out = triton_partials(redo)
    # float64 accumulation throughout: the exact tolerance, not the 16-bit bound
    assert_partials_close(out, redo, rtol=1e-10)
    assert out[0, NAN].item() == 1 and out[0, INF].item() == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_injection(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    a = torch.randn(2 * CHUNK + 3, generator=g).to(dtype)
    nan_idx = [0, 5, CHUNK - 1, CHUNK, 2 * CHUNK + 2]
    a[nan_idx] = float("nan")
    a[[7, CHUNK + 1]] = float("inf")
    a[9] = float("-inf")
    only_nan = torch.full((50,), float("nan"), dtype=dtype)
    neg_inf = torch.randn(20, generator=g).to(dtype)
    neg_inf[3] = float("-inf")
    nan_small = torch.tensor([float("nan"), -2.0, 1.0], dtype=dtype)
    ts = [a, only_nan, neg_inf, nan_small]
    out = triton_partials(ts)
    assert_triton_close(out, ts)
    assert out[0, NAN].item() == 5 and out[0, INF].item() == 3
    assert np.isnan(out[0, SUMSQ].item()) and np.isnan(out[0, SUMABS].item())
    assert out[0, MAXABS].item() == float("inf")
    assert out[1, MAXABS].item() == 0.0 and out[1, NAN].item() == 50
    assert out[2, SUMSQ].item() == float("inf") and out[2, SUMABS].item() == float("inf")
    assert out[2, MAXABS].item() == float("inf") and out[2, INF].item() == 1
    assert out[3, MAXABS].item() == 2.0 and out[3, NAN].item() == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_zeros(dtype: torch.dtype) -> None:
    t = torch.randn(CHUNK + 50, generator=torch.Generator().manual_seed(7)).to(dtype)
    t[::3] = 0.0
    t[1::7] = -0.0
    zeros = torch.zeros(CHUNK + 1, dtype=dtype)
    neg_zeros = torch.full((33,), -0.0, dtype=dtype)
    tiny = torch.tensor([torch.finfo(dtype).tiny, -torch.finfo(dtype).tiny, 0.0], dtype=dtype)
    ts = [t, zeros, neg_zeros, tiny]
    out = triton_partials(ts)
    assert_triton_close(out, ts)
    assert out[0, ZERO].item() == int((t == 0).sum())
    assert out[1, ZERO].item() == CHUNK + 1 and out[2, ZERO].item() == 33
    assert out[3, ZERO].item() == 1


def test_random_many_tensors_against_reference() -> None:
    g = torch.Generator().manual_seed(8)
    shapes = [(64, 33), (700,), (1,), (5, 3, 2), (CHUNK * 2 + 1,), (0,), (17,), (11, 11)]
    ts = []
    for i, shape in enumerate(shapes * 2):
        t = (torch.randn(shape, generator=g) * 10.0 ** (i % 5 - 2)).to(DTYPES[i % 4])
        ts.append(t)
    out = triton_partials(ts)
    assert_triton_close(out, ts)
    want = reference_partials(ts)
    np.testing.assert_array_equal(out[:, 2:].numpy(), want[:, 2:])


def _contract_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ts = []
    for dt in DTYPES:
        for n in (0, 1, CHUNK + 3):
            x = (torch.randn(n, generator=g) * 3).to(dt)
            if n > 10:
                x[2], x[5], x[6:9] = float("nan"), float("-inf"), 0.0
            ts.append(x)
    return ts


@pytest.mark.parametrize("column", COLUMNS, ids=lambda c: c.name)
def test_every_contract_column_matches_the_reference(column) -> None:
    ts = _contract_tensors()
    got = triton_partials(ts).numpy()[:, column.index]
    want = reference_partials(ts)[:, column.index]
    if column.exact:
        np.testing.assert_array_equal(got, want)
    else:
        rtol = [max(1e-10, triton_reduce.sum_relative_error_bound(t.dtype, t.device)) for t in ts]
        for i in range(len(ts)):
            np.testing.assert_allclose(got[i], want[i], rtol=rtol[i], atol=0)


def test_kernel_reads_the_columns_from_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the contract's columns in another order (as constexprs), each lands where the
    records say."""
    order = [4, 0, 5, 2, 1, 3]
    permuted = Contract([dataclasses.replace(c, index=order[c.index]) for c in COLUMNS])
    monkeypatch.setattr(triton_reduce, "_COLUMN_CONSTEXPRS", constexprs(permuted))
    ts = _contract_tensors()
    got = triton_partials(ts).numpy()
    want = permuted.reference(ts)
    for c in permuted.columns:
        if c.exact:
            np.testing.assert_array_equal(got[:, c.index], want[:, c.index], err_msg=c.name)


def _layout_of(ts: list[torch.Tensor]):
    key = next(k for k in triton_reduce._LAYOUTS if k[3] == tuple(t.dtype for t in ts))
    return triton_reduce._LAYOUTS[key]


def test_layout_cache_new_pointers_same_pointers_and_new_alignment() -> None:
    """Same layout: the cached table with new base addresses; same addresses: the device table
    as it is (values changed in place are still read); another alignment: rebuilt."""
    triton_reduce.clear_layout_cache()
    g = torch.Generator().manual_seed(5)
    shapes = [(3, CHUNK + 5), (0,), (7,), (CHUNK,)]
    ts = [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, DTYPES, strict=True)]
    assert_triton_close(triton_partials(ts), ts)
    layout = _layout_of(ts)
    first_table = layout.sent[1]
    other = [t.clone() * 2 for t in ts]  # same layout, other addresses
    assert_triton_close(triton_partials(other), other)
    assert _layout_of(ts) is layout and layout.sent[1] is not first_table
    table = layout.sent[1]
    for t in other:
        t.mul_(-3)  # same addresses, new values
    other[0][1, 2] = float("nan")
    assert_triton_close(triton_partials(other), other)
    assert layout.sent[1] is table  # reused, not sent again
    assert len(triton_reduce._LAYOUTS) == 1
    # the same element counts at another alignment within 16 bytes: lo/hi/cstart differ
    flat = torch.randn(3 * (CHUNK + 5) + 1, generator=g).to(DTYPES[0])
    shifted = [flat[1:].view(3, CHUNK + 5)] + other[1:]
    assert_triton_close(triton_partials(shifted), shifted)
    assert _layout_of(ts) is not layout


def test_layout_cache_is_bounded_and_keyed_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_reduce.clear_layout_cache()
    for n in range(1, triton_reduce._MAX_LAYOUTS + 4):
        x = [torch.randn(n)]
        assert_triton_close(triton_partials(x), x)
    assert len(triton_reduce._LAYOUTS) == triton_reduce._MAX_LAYOUTS
    x = [torch.randn(5 * CHUNK) for _ in range(70)]
    triton_partials(x)
    before = len(triton_reduce._LAYOUTS)
    monkeypatch.setattr(triton_reduce, "_SEARCH_FANOUT", 2)  # another table search: new entry
    assert_triton_close(triton_partials(x), x)
    assert {k[2][1] for k in triton_reduce._LAYOUTS} >= {2, 64}
    assert len(triton_reduce._LAYOUTS) == min(before + 1, triton_reduce._MAX_LAYOUTS)


def test_cached_layout_still_rejects_bad_inputs() -> None:
    x = [torch.randn(10), torch.randn(3)]
    triton_partials(x)
    with pytest.raises(ValueError):
        triton_partials([torch.randn(10), torch.empty(3, device="meta")])
    with pytest.raises(TypeError):
        triton_partials([torch.randn(10), torch.zeros(3, dtype=torch.int32)])


# ---- persistent grid: each program a contiguous run of chunks, one flush per tensor ---------

ONE_PER_CHUNK = 1 << 40  # more programs than chunks: the grid is one program per chunk


@pytest.mark.parametrize("programs", [1, 2, 3, 7, ONE_PER_CHUNK])
def test_runs_cross_tensor_boundaries(programs: int, monkeypatch, launches) -> None:
    """Tensors of 1 element to several chunks, empty ones between them, in runs that start and
    end inside tensors and span several: every chunk counted once, in its own tensor's row."""
    monkeypatch.setattr(triton_reduce, "_INTERPRET_PROGRAMS", programs)
    g = torch.Generator().manual_seed(programs % 1000)
    sizes = [CHUNK + 3, 0, 5, 2 * CHUNK, 1, 0, 3 * CHUNK - 1, 17, CHUNK, 0, 2]
    ts = [torch.randn(n, generator=g) for n in sizes]
    for t in ts[::3]:
        t[: t.numel() // 3] = 0.0
    out = triton_partials(ts)
    assert_triton_close(out, ts)
    n_chunks = sum(-(-n // CHUNK) for n in sizes)
    assert launches.launches == [(min(programs, n_chunks),)]


@pytest.mark.parametrize("programs", [1, 3, 7])
def test_many_tiny_tensors_in_few_runs(programs: int, monkeypatch) -> None:
    monkeypatch.setattr(triton_reduce, "_INTERPRET_PROGRAMS", programs)
    g = torch.Generator().manual_seed(7)
    ts = [torch.randn(1 + i % 19, generator=g).to(DTYPES[i % 4]) for i in range(300)]
    ts[10][0] = float("nan")
    ts[11][0] = float("-inf")
    ts[12].zero_()
    out = triton_partials(ts)
    assert_triton_close(out, ts)


@pytest.mark.parametrize("programs", [2, 3, 5, 13, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_huge_tensor_split_over_programs(programs: int, dtype: torch.dtype, monkeypatch):
    """One tensor of 13 chunks (+ a partial one) over several runs, NaN/inf/zeros planted at
    both sides of every run boundary: each run's flush adds its part once."""
    monkeypatch.setattr(triton_reduce, "_INTERPRET_PROGRAMS", programs)
    n_chunks = 14
    x = torch.randn(13 * CHUNK + 100, generator=torch.Generator().manual_seed(programs)).to(dtype)
    p = min(programs, n_chunks)
    for k in range(1, p):
        e = (k * n_chunks // p) * CHUNK  # first element of run k (the tensor is 64-byte aligned)
        x[e - 1] = float("nan")
        x[e] = float("inf") if k % 2 else float("-inf")
        x[e + 1] = 0.0
    x[0] = float("nan")
    x[-1] = float("inf")
    out = triton_partials([x])
    assert_triton_close(out, [x])


@pytest.mark.parametrize("programs", [1, 2, 3, 5])
def test_mixed_dtype_groups_each_split(programs: int, monkeypatch, launches) -> None:
    monkeypatch.setattr(triton_reduce, "_INTERPRET_PROGRAMS", programs)
    g = torch.Generator().manual_seed(11)
    ts = []
    for i, n in enumerate([2 * CHUNK + 9, 0, 30, CHUNK - 1, 3 * CHUNK, 4, 1, CHUNK + 1]):
        t = torch.randn(n, generator=g).to(DTYPES[i % 4])
        if n > 10:
            t[-1] = float("nan")
            t[0] = float("inf")
        ts.append(t)
    ts.append(torch.randn(40, 30, generator=g).t())  # dense transpose, read in place
    out = triton_partials(ts)
    assert_triton_close(out, ts)
    assert len(launches.launches) == 4 and all(g[0] <= programs for g in launches.launches)


def test_persistent_grid_on_cuda_from_the_sm_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_reduce, "_SM_COUNT", {0: 132})
    monkeypatch.setattr(triton_reduce, "PROGRAMS_PER_SM", 8)
    assert triton_reduce.persistent_programs(torch.device("cuda", 0)) == 132 * 8
    monkeypatch.setattr(triton_reduce, "PROGRAMS_PER_SM", 0)  # one program per chunk
    assert triton_reduce.persistent_programs(torch.device("cuda", 0)) >= 1 << 40


_SM90_COMPILE = textwrap.dedent(
    """
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gradwatch.kernels import triton_reduce as tr
    from gradwatch.kernels.contract import constexprs

    kern = triton.jit(tr._partials_kernel)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        block, sub, warps = tr._CUDA_CONFIGS[tr._ITEMSIZE[dt]]
        half = dt in (torch.float16, torch.bfloat16)
        cons = dict(DTYPE=tr._tl_dtype(dt), IS_HALF=half, IS_F64=dt == torch.float64,
                    FANOUT=tr._SEARCH_FANOUT, LEVELS=2, BLOCK=block, SUB=sub, **constexprs())
        sig = {"tab": "*i64", "out_ptr": "*fp64", "out_bits_ptr": "*i64", "n_slots": "i32",
               "slot0": "i32", "chunk0": "i32", "n_chunks": "i32"}
        sig.update(dict.fromkeys(cons, "constexpr"))
        src = ASTSource(fn=kern, signature=sig, constexprs=cons)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx = k.asm["ptx"]
        # interior chunks take 128-bit loads (the alignment hints survive the persistent loops)
        assert "ld.global.v4" in ptx or "ld.global.v2.b64" in ptx or "ld.global.v2.u64" in ptx
        print(dt, "ok", len(k.asm["cubin"]))
    """
)


def test_kernel_compiles_for_sm90_without_a_gpu() -> None:
    """The compiled path (not the interpreter) of every dtype builds to sm_90 PTX and cubin:
    triton compiles ahead of time for a named target, no device needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "No module named" in proc.stderr):
        pytest.skip(f"no CUDA compiler backend in this triton: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout.count(" ok ") == 4, proc.stdout


def test_requires_grad_tensor() -> None:
    p = torch.randn(100, requires_grad=True)
    assert_triton_close(triton_partials([p]), [p.detach()])


def test_rejects_non_floating() -> None:
    with pytest.raises(TypeError):
        triton_partials([torch.randn(3), torch.arange(4)])
    with pytest.raises(TypeError):
        triton_partials([torch.zeros(3, dtype=torch.complex64)])


def test_cpu_tensors_need_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_partials([torch.randn(3)])


def test_rejects_mixed_devices() -> None:
    with pytest.raises(ValueError):
        triton_partials([torch.randn(3), torch.empty(3, device="meta")])


_CUDA_CHECK = textwrap.dedent(
    """
    import os, sys
    import torch
    from gradwatch.kernels.triton_reduce import triton_partials
    sys.path.insert(0, os.environ["GW_TESTS_DIR"])
    from reference import assert_triton_close

    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    w = torch.randn(300, 200, generator=g)
    w[3, 4] = float("nan")
    w[7, 9] = float("-inf")
    w[0, :50] = 0.0
    flat = torch.randn(50_001, generator=g).bfloat16().to(dev)
    cpu = [
        w.t(),                                                   # dense transpose
        torch.randn(4, 8, 9, 10, generator=g).half(),            # channels_last below
        torch.randn(2000, 33, generator=g, dtype=torch.float64)[:, ::2],  # gaps: copied
        torch.full((70_000,), 1e20),
        torch.empty(0),
        torch.tensor([-0.0]),
        torch.randn(3 * 8192 + 5, generator=g).bfloat16(),
        torch.full((20_000,), float("nan")).half(),              # maxabs 0
        torch.tensor([1e200, -1e300, 0.0, 5.0], dtype=torch.float64),  # sumsq overflows: inf
    ]
    b = torch.randn(40_000, generator=g).bfloat16()
    b[::7] = float("inf")
    b[3::11] = float("nan")
    cpu.append(b)
    ts = [t.to(dev) for t in cpu]
    ts[1] = ts[1].to(memory_format=torch.channels_last)
    ts += [flat[1:30_001], flat[30_003:]]                          # unaligned bucket views
    dense = [t for i, t in enumerate(ts) if i != 2]  # no copied tensor: stable addresses
    triton_partials(ts)  # compile outside the sync check
    triton_partials(dense)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = triton_partials(ts)  # cached layout, the copied tensor's new base address
        before = [t.clone() for t in ts]  # stream-ordered after the kernel: its inputs
        for t in dense:
            t.mul_(-2)
        again = triton_partials(dense)  # same addresses: the device table as it is
        moved = [t.clone() for t in dense]
        out_moved = triton_partials(moved)  # same layout, new addresses
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.device == ts[0].device and out.dtype == torch.float64
    assert_triton_close(out, before)
    assert_triton_close(again, dense)
    assert_triton_close(out_moved, moved)
    # a persistent grid smaller than the chunks: runs cross tensors and split the big ones
    from gradwatch.kernels import triton_reduce as tr
    tr._SM_COUNT[torch.cuda.current_device()] = 1
    for per_sm in (1, 3, 7):
        tr.PROGRAMS_PER_SM = per_sm
        assert_triton_close(triton_partials(ts), ts)
    print("cuda ok")
    """
)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_noncontiguous_no_sync() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["GW_TESTS_DIR"] = str(ROOT / "tests")
    proc = subprocess.run(
        [sys.executable, "-c", _CUDA_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cuda ok" in proc.stdout
