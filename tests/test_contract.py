"""The partials contract (gradwatch.kernels.contract): every rule that treats columns differently
is driven by the Column records, so adding a column touches the contract, the kernels and the
reference only. Checked by building contracts with permuted and extra columns and by running
the C kernel built for a permuted column order."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

import gradwatch.kernels as kernels
from gradwatch.kernels import contract, cpu_native, torch_fallback
from gradwatch.kernels.contract import COLUMNS, CONTRACT, Column, Contract
from reference import reference_partials


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ts = []
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for n in (0, 1, 33, 3000):
            x = (torch.randn(n, generator=g) * 4).to(dt)
            if n > 100:
                x[3], x[9], x[11:40] = float("nan"), float("inf"), 0.0
            ts.append(x)
    ts.append(torch.full((7,), float("nan")))
    ts.append(torch.randn(40, 30, generator=g).t())  # dense, not contiguous
    return ts


def _permuted(seed: int, extra: Column | None = None) -> Contract:
    """The contract's columns in another order (and optionally one more column)."""
    cols = list(COLUMNS) + ([extra] if extra else [])
    order = list(range(len(cols)))
    random.Random(seed).shuffle(order)
    return Contract([dataclasses.replace(c, index=order[i]) for i, c in enumerate(cols)])


# A seventh column of the kind a new partial would be: a max with scale power 1.
_MAX_X = Column("MAXX", 6, "max of x", "max", 1, True, lambda x: float(np.max(x, initial=0.0)))
_SUM_POS = Column(
    "SUMPOS", 6, "sum of max(x, 0)", "sum", 1, False, lambda x: float(np.maximum(x, 0).sum())
)


def test_records_match_the_module_constants() -> None:
    assert kernels.N_PARTIALS == len(COLUMNS) == CONTRACT.n
    assert [c.index for c in COLUMNS] == list(range(len(COLUMNS)))
    for c in COLUMNS:
        assert getattr(kernels, c.name) == getattr(contract, c.name) == c.index
        assert c.combine in ("sum", "max") and c.scale_power in (0, 1, 2) and c.meaning
    assert {d.code for d in contract.DTYPES} == set(range(len(contract.DTYPES)))
    assert torch_fallback.DTYPE_CODES is contract.DTYPE_CODES  # one table
    defines = contract.c_defines()
    for c in COLUMNS:
        assert f"-DGW_{c.name}={c.index}" in defines
    for d in contract.DTYPES:
        assert f"-D{d.c_name}={d.code}" in defines


def test_bad_records_are_refused() -> None:
    with pytest.raises(ValueError):
        Contract([dataclasses.replace(COLUMNS[0], index=1), COLUMNS[1]])
    with pytest.raises(ValueError):
        Contract([COLUMNS[0], dataclasses.replace(COLUMNS[0], index=1)])
    with pytest.raises(ValueError):
        Contract([dataclasses.replace(COLUMNS[0], combine="mean")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "con",
    [CONTRACT, _permuted(1), _permuted(2, _MAX_X), _permuted(5, _SUM_POS)],
    ids=["contract", "permuted", "permuted+max", "permuted+sum"],
)
def test_rules_follow_the_records(con: Contract) -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(5, con.n, generator=g, dtype=torch.float64) * 10
    combined = con.combine_pieces(rows)
    parts = con.split_by_combine(rows)
    assert set(parts) == {c.combine for c in con.columns}  # one all-reduce per kind
    assert all(p.is_contiguous() for p in parts.values())
    assert torch.equal(con.join_by_combine(parts), rows)
    for c in con.columns:
        col = rows[:, c.index]
        want = col.sum() if c.combine == "sum" else col.max()
        assert combined[c.index].item() == pytest.approx(want.item(), rel=1e-15)
        assert parts[c.combine].shape[1] == sum(x.combine == c.combine for x in con.columns)
    for scale in (1024.0, 3.0, 0.5):
        got = rows.numpy().copy()
        con.unscale(got, scale)
        for c in con.columns:
            want = rows[:, c.index].numpy() / scale**c.scale_power
            np.testing.assert_allclose(got[:, c.index], want, rtol=1e-15, atol=0)
    # the reference is the same per column name, wherever the column sits
    ts = _tensors()
    ref, base = con.reference(ts), CONTRACT.reference(ts)
    for c in con.columns:
        if c.name in CONTRACT.by_name:
            np.testing.assert_array_equal(ref[:, c.index], base[:, CONTRACT.by_name[c.name].index])
    assert con.ordered({c.name: c.index for c in con.columns}) == list(range(con.n))
    with pytest.raises(KeyError):
        con.ordered({})


def test_unscale_is_the_written_out_division() -> None:
    """Bit for bit what collector._publish_locked did before it called unscale."""
    p = np.random.default_rng(0).random((50, kernels.N_PARTIALS)) * 1e6
    for scale in (65536.0, 3.7, 1e-3):
        want = p.copy()
        want[:, kernels.SUMSQ] /= scale * scale
        want[:, kernels.SUMABS] /= scale
        want[:, kernels.MAXABS] /= scale
        got = p.copy()
        kernels.unscale(got, scale)
        assert np.array_equal(got.view(np.int64), want.view(np.int64))


# the native kernel is built into a temporary cache dir (conftest.py), not ~/.cache
pytestmark = pytest.mark.usefixtures("native_cache_dir")


def _backends() -> dict[str, Callable]:
    return {
        "native": cpu_native.native_partials,
        "torch": torch_fallback.torch_partials,
        "device": torch_fallback.device_partials,
    }


@pytest.mark.parametrize("column", COLUMNS, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["native", "torch", "device"])
def test_every_backend_matches_every_column(backend: str, column: Column, monkeypatch) -> None:
    if backend == "native" and not cpu_native.native_available():
        pytest.skip(f"native CPU kernel unavailable: {cpu_native._failure}")
    monkeypatch.setattr(torch_fallback, "DEVICE_CHUNK", 1000)
    ts = _tensors()
    got = _backends()[backend](ts).numpy()[:, column.index]
    want = reference_partials(ts)[:, column.index]
    if column.exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)


def test_c_kernel_reads_the_columns_from_the_contract(monkeypatch, tmp_path) -> None:
    """Built for a permuted column order, the C kernel writes each column where the records
    say; the contract's flags key the cache, so that build is a separate library."""
    if not cpu_native.native_available():
        pytest.skip(f"native CPU kernel unavailable: {cpu_native._failure}")
    default_lib = cpu_native._lib_path
    permuted = _permuted(7)
    assert [c.name for c in permuted.columns] != [c.name for c in CONTRACT.columns]
    monkeypatch.setattr(cpu_native, "c_defines", lambda: contract.c_defines(permuted))
    monkeypatch.setenv("GRADWATCH_CACHE_DIR", str(tmp_path))
    cpu_native._reset_state()
    try:
        assert cpu_native.native_available(), cpu_native._failure
        assert cpu_native._lib_path is not None and cpu_native._lib_path.name != default_lib.name
        ts = _tensors()
        got = cpu_native.native_partials(ts).numpy()
        want = permuted.reference(ts)
        for c in permuted.columns:
            if c.exact:
                np.testing.assert_array_equal(got[:, c.index], want[:, c.index], err_msg=c.name)
            else:
                np.testing.assert_allclose(got[:, c.index], want[:, c.index], rtol=1e-10)
    finally:
        cpu_native._reset_state()
