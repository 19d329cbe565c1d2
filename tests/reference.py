"""Float64 references for the kernel partials and the statistics (numpy only).

The partials' reference is each contract column's own float64 definition
(``gradwatch.kernels.contract.Column.reference``), so a new column brings its reference along;
the statistics' reference below is independent of gradwatch's code."""

from __future__ import annotations

import numpy as np
import torch

from gradwatch.kernels.contract import COLUMNS, CONTRACT, to_float64_numpy

# Statistics checked against reference_stats by the end-to-end tests.
MAGNITUDES = [
    "grad_l2_norm",
    "grad_rms",
    "grad_abs_mean",
    "grad_abs_max",
    "grad_l2_norm_divided_by_tensors",
    "grad_tensor_l2_norm_min",
    "grad_tensor_l2_norm_max",
    "grad_tensor_l2_norm_mean",
]
COUNTS = ["grad_elements", "grad_tensors", "grad_tensors_vanishing", "grad_tensors_exploding"]


def reference_partials(tensors) -> np.ndarray:
    """Rows [T, N_PARTIALS] per tensor from each contract column's float64 definition (its
    ``reference``), see gradwatch.kernels.contract."""
    return CONTRACT.reference(tensors)


def assert_partials_close(got: torch.Tensor, tensors, rtol: float | list[float] = 1e-10) -> None:
    """Compare a [T, N_PARTIALS] result with the reference, column by column of the contract:
    the exact ones (max, counts) exactly, the others (sums) to rtol (one, or one per tensor)."""
    want = reference_partials(tensors)
    got_np = got.detach().to("cpu", torch.float64).numpy()
    assert got_np.shape == want.shape, (got_np.shape, want.shape)
    tol = np.broadcast_to(np.asarray(rtol, dtype=np.float64), (len(want),))
    for col in COLUMNS:
        c = col.index
        if col.exact:
            np.testing.assert_array_equal(got_np[:, c], want[:, c], err_msg=col.name)
            continue
        for i in range(len(want)):
            np.testing.assert_allclose(
                got_np[i, c], want[i, c], rtol=tol[i], atol=0, err_msg=f"{col.name} of tensor {i}"
            )


def assert_triton_close(got: torch.Tensor, tensors) -> None:
    """assert_partials_close for the Triton kernel: 16-bit tensors' sums to the kernel's stated
    error bound (float32 lane sums), the rest to 1e-10."""
    # imported here: the triton tests control when (and in which mode) triton is first imported
    from gradwatch.kernels.triton_reduce import sum_relative_error_bound

    rtol = [max(1e-10, sum_relative_error_bound(t.dtype, t.device)) for t in tensors]
    assert_partials_close(got, tensors, rtol)


def reference_stats(grads, vanishing: float = 1e-7, exploding: float = 1e2) -> dict:
    """Global statistics in float64 straight from their definitions (not from gradwatch's code).

    ``grads``: list of tensors (or float64 arrays) as the optimizer applies them (unscaled).
    Magnitudes are None when any element is NaN/Inf (gradwatch then exports no sample).
    """
    xs = [g if isinstance(g, np.ndarray) else to_float64_numpy(g) for g in grads]
    flat = np.concatenate(xs) if xs else np.zeros(0)
    n, t = flat.size, len(xs)
    nan, inf = int(np.isnan(flat).sum()), int(np.isinf(flat).sum())
    out = {
        "grad_elements": n,
        "grad_tensors": t,
        "grad_nonfinite_elements": {"nan": nan, "inf": inf},
        "grad_zero_ratio": float((flat == 0).sum()) / n if n else None,
    }
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.array([np.sqrt(np.sum(x * x)) for x in xs])
    out["grad_tensors_vanishing"] = int((norms < vanishing).sum())
    out["grad_tensors_exploding"] = int((norms > exploding).sum())
    finite = nan == 0 and inf == 0 and t > 0
    total = float(np.sqrt(np.sum(flat * flat))) if finite else None
    out.update(
        {
            "grad_l2_norm": total,
            "grad_rms": float(np.sqrt(np.mean(flat * flat))) if finite and n else None,
            "grad_abs_mean": float(np.mean(np.abs(flat))) if finite and n else None,
            "grad_abs_max": float(np.max(np.abs(flat))) if finite and n else None,
            "grad_l2_norm_divided_by_tensors": total / t if finite else None,
            "grad_tensor_l2_norm_min": float(norms.min()) if finite else None,
            "grad_tensor_l2_norm_max": float(norms.max()) if finite else None,
            "grad_tensor_l2_norm_mean": float(norms.mean()) if finite else None,
            "grad_tensor_l2_norm_max_to_min_ratio": (
                float(norms.max() / norms.min()) if finite and norms.min() > 0 else None
            ),
        }
    )
    return out
