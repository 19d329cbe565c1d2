"""CPU partials backends (native C via ctypes, pure torch) against the numpy reference."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gradwatch.kernels import cpu_native, torch_fallback
from gradwatch.kernels.torch_fallback import torch_partials
from reference import assert_partials_close, reference_partials

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Sizes around the C kernel's vector width (16 lanes) and NaN-check block (2048 elements).
SIZES = [0, 1, 2, 15, 16, 17, 31, 2047, 2048, 2049, 3 * 2048 + 5]


# the native kernel is built into a temporary cache dir (conftest.py), not ~/.cache
pytestmark = pytest.mark.usefixtures("native_cache_dir")


def _require_native() -> None:
    if not cpu_native.native_available():
        msg = f"native CPU kernel unavailable: {cpu_native._failure}"
        if IN_CI:
            pytest.fail(msg)  # CI must build the C kernel
        pytest.skip(msg)


@pytest.fixture(params=["native", "torch", "device"])
def partials(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    if request.param == "native":
        _require_native()
        return cpu_native.native_partials
    if request.param == "device":
        # The sync-free fallback for CUDA without Triton runs on any device: checked here on the
        # CPU, with small slices so multi-slice tensors take the combining path.
        monkeypatch.setattr(torch_fallback, "DEVICE_CHUNK", 1000)
        return torch_fallback.device_partials
    return torch_partials


def _check(partials: Callable, tensors: list[torch.Tensor]) -> torch.Tensor:
    got = partials(tensors)
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    assert got.shape == (len(tensors), 6)
    assert_partials_close(got, tensors)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_sizes(partials: Callable, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    ts = [(torch.randn(n, generator=g) * 3).to(dtype) for n in SIZES]
    _check(partials, ts)


def test_mixed_dtypes_one_call(partials: Callable) -> None:
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(100 + 37 * i, generator=g).to(DTYPES[i % 4]) for i in range(12)]
    ts[5][3] = float("nan")
    ts[6][0] = float("-inf")
    _check(partials, ts)


def test_empty_and_scalar(partials: Callable) -> None:
    ts = [torch.empty(0), torch.tensor(-2.5), torch.empty(0, 3, dtype=torch.float64)]
    got = _check(partials, ts)
    assert got[0].tolist() == [0.0] * 6
    assert partials([]).shape == (0, 6)


def test_special_values_at_block_boundaries(partials: Callable) -> None:
    ts = []
    for dtype in DTYPES:
        for n in (2047, 2049, 3 * 2048 + 5):
            x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
            for pos, v in [(0, "nan"), (15, "inf"), (16, "-inf"), (2047, "nan"), (n - 1, "-inf")]:
                if pos < n:
                    x[pos] = float(v)
            x[2046] = 0.0
            x[1000] = -0.0
            ts.append(x)
            y = torch.randn(n).to(dtype)
            y[n - 1] = float("inf")  # inf only, in the scalar tail: sums +inf, no NaN
            ts.append(y)
    got = _check(partials, ts)
    assert torch.isinf(got[1::2, 0]).all()


def test_all_nan_and_all_inf(partials: Callable) -> None:
    ts = [
        torch.full((40,), float("nan")),
        torch.full((3,), float("inf"), dtype=torch.bfloat16),
        torch.tensor([float("nan"), float("-inf"), float("inf")], dtype=torch.float16),
    ]
    got = _check(partials, ts)
    assert got[0, 2] == 0.0  # maxabs over no non-NaN element


def test_signed_zeros(partials: Callable) -> None:
    for dtype in DTYPES:
        x = torch.tensor([0.0, -0.0, 1.0, -0.0, 5e-324 if dtype == torch.float64 else 1e-40])
        got = _check(partials, [x.to(dtype)] * 3)
        assert got[0, 5] >= 3


def test_fp32_huge_magnitudes_exact_in_float64(partials: Callable) -> None:
    x = torch.full((5000,), 1e20)
    x[::3] = -3e38
    got = _check(partials, [x, torch.tensor([1e20, -1e20])])
    assert torch.isfinite(got[:, :3]).all()  # 1e40-ish sums would overflow in fp32
    assert got[1, 0] == pytest.approx(2e40, rel=1e-6)


def test_fp64_overflowing_squares_are_not_inf_elements(partials: Callable) -> None:
    x = torch.full((3000,), 1e200, dtype=torch.float64)
    x[7] = 1e-300
    got = _check(partials, [x])
    assert got[0, 0] == float("inf") and got[0, 4] == 0 and got[0, 3] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16bit_pattern(partials: Callable, dtype: torch.dtype) -> None:
    """All 65536 encodings: subnormals, +-0, +-inf, NaN payloads, in one tensor and shuffled."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))
    _check(partials, [x, x[perm].clone(), x[:999]])


def test_portable_fp16_converter_exhaustive() -> None:
    _require_native()
    lib = ctypes.CDLL(str(cpu_native._lib_path))
    bits = np.arange(2**16, dtype=np.uint16)
    out = np.empty(2**16, dtype=np.float32)
    lib.gw_f16_to_f32_portable(
        ctypes.c_void_p(bits.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(2**16)
    )
    want = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(
        out.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)]
    )
    assert np.isnan(out[np.isnan(want)]).all()


def test_non_contiguous(partials: Callable) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(37, 53, generator=g)
    ts = [
        base.t(),  # dense, transposed
        torch.randn(2, 3, 5, 7, generator=g).to(memory_format=torch.channels_last),
        base[::2, 1::3],  # strided slice: not dense
        base[5:9],  # contiguous with a storage offset
        torch.randn(4, 1, generator=g).expand(4, 1000),  # overlapping (stride 0)
        torch.randn(64, 40, dtype=torch.float64, generator=g).t()[3:30],  # dense-less, offset
        base.to(torch.bfloat16).t()[:, 10:20],
    ]
    ts[0][3, 4] = float("nan")  # visible through the transposed view
    _check(partials, ts)


def test_dense_non_contiguous_read_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transposed / channels_last tensors are read as their storage span, without a copy."""
    _require_native()
    dense = [torch.randn(30, 40).t(), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)]
    strided = [torch.randn(30, 40)[:, ::2]]
    calls: list[int] = []
    orig = torch.Tensor.contiguous

    def spy(t: torch.Tensor, *a, **k) -> torch.Tensor:
        calls.append(1)
        return orig(t, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "contiguous", spy)
        got_dense = cpu_native.native_partials(dense)
        n_dense = len(calls)
        got_strided = cpu_native.native_partials(strided)
    assert n_dense == 0 and len(calls) == 1
    assert_partials_close(got_dense, dense)
    assert_partials_close(got_strided, strided)


def test_many_threads_and_chunk_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny per-thread minimum + 7 threads: split points land inside tensors of every dtype."""
    _require_native()
    monkeypatch.setattr(cpu_native, "MIN_ELEMENTS_PER_THREAD", 1000)
    g = torch.Generator().manual_seed(3)
    ts = [
        torch.randn(n, generator=g).to(DTYPES[i % 4])
        for i, n in enumerate([5, 0, 12345, 3, 7001, 1, 0, 999, 4096])
    ]
    ts[2][6000] = float("nan")
    ts[4][3500] = float("inf")
    ts[4][::7] = 0.0
    before = torch.get_num_threads()
    try:
        for nt in (2, 3, 7):
            torch.set_num_threads(nt)
            assert_partials_close(cpu_native.native_partials(ts), ts)
            one = ts[2:3]  # a single tensor must be split over all threads too
            assert_partials_close(cpu_native.native_partials(one), one)
    finally:
        torch.set_num_threads(before)


def _torch_on_gnu_openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info() and [
        os.path.basename(p) for p in cpu_native._mapped_libgomp()
    ] == ["libgomp.so.1"]


def test_threads_share_torchs_openmp_pool() -> None:
    """Where torch runs on libgomp.so.1 (Linux wheels) the kernel is built with -fopenmp and
    joins torch's pool: still one OpenMP runtime in the process, no thread of its own left."""
    _require_native()
    if not _torch_on_gnu_openmp():
        assert not cpu_native._openmp
        pytest.skip("torch does not run on GNU OpenMP (libgomp.so.1) here")
    assert cpu_native._openmp
    before = threading.active_count()
    x = torch.randn(3_000_001, generator=torch.Generator().manual_seed(8))
    assert_partials_close(cpu_native.native_partials([x, x[1:]]), [x, x[1:]])
    assert len(cpu_native._mapped_libgomp()) == 1
    assert threading.active_count() == before


def test_pthread_build_when_openmp_is_not_torchs(fresh_native: pytest.MonkeyPatch) -> None:
    """Without torch's libgomp (another OpenMP runtime, or none) the per-call pthread build."""
    fresh_native.setattr(cpu_native, "_torch_openmp", lambda version: False)
    _require_native()
    assert not cpu_native._openmp
    x = torch.randn(2_500_000, generator=torch.Generator().manual_seed(9))
    x[1_700_000] = float("inf")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_partials_close(cpu_native.native_partials([x]), [x])
    finally:
        torch.set_num_threads(before)


def test_openmp_flags_first_then_pthreads() -> None:
    sets = cpu_native._flag_sets("", openmp=True)
    omp = [s for s in sets if "-fopenmp" in s]
    assert omp and sets[: len(omp)] == omp and len(sets) == 2 * len(omp)
    assert all("-fopenmp" not in s for s in cpu_native._flag_sets("", openmp=False))
    assert not cpu_native._torch_openmp("clang version 18.1.3")


def test_large_tensor_default_threads(partials: Callable) -> None:
    x = torch.randn(1_500_007, generator=torch.Generator().manual_seed(4))
    x[750_000] = float("nan")
    _check(partials, [x, x[:-1].to(torch.bfloat16)])


def test_4000_small_tensors(partials: Callable) -> None:
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)) for _ in range(1000)]
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in model.parameters()]
    assert len(grads) == 4000
    grads[1234][3] = float("nan")
    _check(partials, grads)


def test_concurrent_python_threads() -> None:
    """Per-thread argument buffers: concurrent calls (GIL released in C) do not interfere."""
    _require_native()
    sets = [[torch.randn(100 + i + j) for j in range(50 + 10 * i)] for i in range(4)]
    want = [reference_partials(s) for s in sets]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(30):
                np.testing.assert_allclose(
                    cpu_native.native_partials(sets[i]).numpy(), want[i], rtol=1e-10
                )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8]
)
def test_rejects_non_float(partials: Callable, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError):
        partials([torch.zeros(3), torch.zeros(4, dtype=dtype)])


def test_rejects_non_cpu(partials: Callable) -> None:
    with pytest.raises(ValueError):
        partials([torch.zeros(3), torch.empty(4, device="meta")])


# ---- build cache ------------------------------------------------------------------------------


@pytest.fixture
def fresh_native(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[pytest.MonkeyPatch]:
    """Isolated cache dir and forgotten module state; state forgotten again afterwards."""
    monkeypatch.setenv("GRADWATCH_CACHE_DIR", str(tmp_path / "cache"))
    cpu_native._reset_state()
    yield monkeypatch
    cpu_native._reset_state()


def test_cache_reused_without_rebuild(fresh_native: pytest.MonkeyPatch, tmp_path) -> None:
    n0 = cpu_native._build_count
    _require_native()
    assert cpu_native._build_count == n0 + 1  # fresh cache dir: one compiler run
    path = cpu_native._lib_path
    assert path is not None and path.parent == tmp_path / "cache"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # temp files cleaned up
    mtime = path.stat().st_mtime_ns
    cpu_native._reset_state()
    assert cpu_native.native_available()
    assert cpu_native._build_count == n0 + 1  # second load: no compiler run
    assert cpu_native._lib_path == path and path.stat().st_mtime_ns == mtime
    x = [torch.randn(100)]
    assert_partials_close(cpu_native.native_partials(x), x)


_RANK_SCRIPT = """
import sys, torch
from gradwatch.kernels import cpu_native
assert cpu_native.native_available(), cpu_native._failure
x = torch.arange(1000, dtype=torch.float32)
got = cpu_native.native_partials([x])[0]
assert got[0].item() == float((x.double() ** 2).sum()), got
print(cpu_native._lib_path, cpu_native._build_count)
"""


def test_concurrent_processes_share_one_cache(tmp_path) -> None:
    """Several ranks starting at once on an empty cache: all load a complete library."""
    _require_native()
    src_dir = str(Path(cpu_native.__file__).resolve().parents[2])
    env = dict(os.environ, GRADWATCH_CACHE_DIR=str(tmp_path / "shared"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_dir, env.get("PYTHONPATH")) if p)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, outs
    assert len({o.split()[0] for o in outs}) == 1  # same cached path
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [Path(outs[0].split()[0]).name]


def test_corrupted_cache_file_is_rebuilt(fresh_native: pytest.MonkeyPatch, tmp_path) -> None:
    _require_native()
    name = cpu_native._lib_path.name  # same key in any cache dir
    cpu_native._reset_state()
    bad = tmp_path / "other"
    bad.mkdir()
    (bad / name).write_bytes(b"not an ELF file")
    fresh_native.setenv("GRADWATCH_CACHE_DIR", str(bad))
    n0 = cpu_native._build_count
    assert cpu_native.native_available()
    assert cpu_native._build_count == n0 + 1
    assert cpu_native._lib_path == bad / name and (bad / name).stat().st_size > 1000
    x = [torch.randn(10)]
    assert_partials_close(cpu_native.native_partials(x), x)


def test_unusable_cache_dir_falls_back_to_tmp(fresh_native: pytest.MonkeyPatch, tmp_path) -> None:
    _require_native()
    cpu_native._reset_state()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    fresh_native.setenv("GRADWATCH_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    alt = tmp_path / "tmp"
    alt.mkdir()
    fresh_native.setattr(tempfile, "tempdir", str(alt))
    assert cpu_native.native_available()
    assert cpu_native._lib_path is not None and cpu_native._lib_path.parent.parent == alt
    x = [torch.randn(10)]
    assert_partials_close(cpu_native.native_partials(x), x)


def test_no_compiler_returns_false(
    fresh_native: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fresh_native.setenv("CC", "/nonexistent/bin/cc-gradwatch")
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        assert cpu_native.native_available() is False
        assert cpu_native.native_available() is False  # memoized, warned once
    warnings = [r for r in caplog.records if r.name == "gradwatch"]
    assert len(warnings) == 1 and "cc-gradwatch" in warnings[0].getMessage()
    with pytest.raises(RuntimeError):
        cpu_native.native_partials([torch.zeros(2)])
    assert_partials_close(torch_partials([torch.ones(3)]), [torch.ones(3)])


def test_broken_compiler_returns_false(fresh_native: pytest.MonkeyPatch, tmp_path) -> None:
    fake = tmp_path / "fakecc"
    fake.write_text(
        '#!/bin/sh\necho fakecc 1.0\n[ "$1" = --version ] && exit 0\necho boom >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    fresh_native.setenv("CC", str(fake))
    assert cpu_native.native_available() is False
    assert "boom" in (cpu_native._failure or "")
