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
