"""Helpers shared by the tests: free ports, scraping and parsing /metrics."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from reference import COUNTS, MAGNITUDES

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """Path of an external program; missing: skip locally, fail in CI."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (apt-get install -y prometheus)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def assert_promtool_clean(text: str) -> None:
    """`promtool check metrics` on an exposition: exit 0 and no finding at all."""
    import subprocess

    promtool = require_tool("promtool")
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def openssl(*args: str, cwd=None) -> None:
    """Run ``openssl args`` (missing: skip locally, fail in CI), bounded in time."""
    import subprocess

    subprocess.run(
        [require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60
    )


def self_signed(directory, common_name: str) -> tuple:
    """(cert, key) paths of a 2-day self-signed certificate for 127.0.0.1 in ``directory``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={common_name}", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def write_json(path, data) -> None:
    """Write ``data`` as JSON so that a reader polling for ``path`` never sees it half written
    (the torchrun scripts' results)."""
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def l2_norm(tensors) -> float:
    """sqrt(sum of x^2) over tensors, in their own dtype (the scripts pass float64 copies)."""
    return float(torch.stack([(t * t).sum() for t in tensors]).sum().sqrt())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port: int, path: str = "/metrics", timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def parse(text: str) -> dict[str, dict[frozenset, float]]:
    """{sample name: {frozenset(label items): value}}."""
    out: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def help_texts(text: str) -> dict[str, str]:
    return {f.name: f.documentation for f in text_string_to_metric_families(text)}


def value(samples: dict, name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels`; None if absent."""
    hits = [v for k, v in samples.get(name, {}).items() if set(labels.items()) <= set(k)]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else None


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free now (one endpoint per local rank)."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@contextlib.contextmanager
def no_host_sync(device: str):
    """On CUDA a host sync in the block raises (sync debug mode "error"); on the CPU: nothing."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def assert_global_stats(samples: dict, ref: dict, rel: float, extra: tuple[str, ...] = ()) -> None:
    """A scrape's global statistics against reference_stats: MAGNITUDES (and ``extra``) to
    ``rel`` (absent where the reference has none), COUNTS and non-finite counts exactly."""
    for name in [*MAGNITUDES, *extra]:
        got, want = value(samples, name), ref[name]
        if want is None:
            assert got is None, (name, got)
        else:
            assert got == pytest.approx(want, rel=rel, abs=0), name
    for name in COUNTS:
        assert value(samples, name) == ref[name], name
    for kind in ("nan", "inf"):
        got = value(samples, "grad_nonfinite_elements", kind=kind)
        assert got == ref["grad_nonfinite_elements"][kind], kind
