"""gradwatch top against a real run, in a real terminal (tmux): the row shows the scrape's
values, the NaN incident names its parameter, per-parameter norms are listed, Ctrl-C exits 0."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from util import IN_CI, fetch, free_port, parse, self_signed, value

if not IN_CI:
    pytest.importorskip("rich")

TRAIN = """
import sys, time, torch, gradwatch
from pathlib import Path
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
h = gradwatch.watch(model, opt, port=int(sys.argv[1]), per_param=True)
for i in range(12):
    opt.zero_grad()
    model(torch.randn(16, 4)).pow(2).sum().mul(i + 1).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    saved = [p.detach().clone() for p in model.parameters()]
    if i == 5:  # one NaN step, undone after it (plain SGD: restoring the weights undoes it)
        model[2].weight.grad[0, 0] = float("nan")
    opt.step()
    if i == 5:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
    time.sleep(0.1)
Path(sys.argv[2]).write_text("trained")
while not Path(sys.argv[3]).exists():
    time.sleep(0.1)
h.close()
"""


def _tmux(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30)


def test_top_in_tmux_shows_the_scrape_and_exits_on_ctrl_c(tmp_path: Path):
    if shutil.which("tmux") is None:
        if IN_CI:
            pytest.fail("tmux is not installed (apt-get install -y tmux)")
        pytest.skip("tmux is not installed")
    port = free_port()
    trained, done, exit_file = tmp_path / "trained", tmp_path / "done", tmp_path / "exit"
    run = subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(port), str(trained), str(done)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    session = f"gwtop{port}"
    try:
        deadline = time.monotonic() + 60
        while not trained.exists():
            assert run.poll() is None and time.monotonic() < deadline, "training did not run"
            time.sleep(0.1)
        cmd = (
            f"{sys.executable} -m gradwatch.cli top http://127.0.0.1:{port}/metrics"
            f" --interval 0.3; echo $? > {exit_file}"
        )
        assert (
            _tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "30", cmd).returncode == 0
        )
        samples = parse(fetch(port))
        want_step = int(value(samples, "grad_stats_step"))
        want_norm = f"{value(samples, 'grad_l2_norm'):.4g}"
        screen = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            screen = _tmux("capture-pane", "-p", "-t", session).stdout
            if want_norm in screen:
                break
            time.sleep(0.3)
        assert "gradwatch top" in screen, screen
        row = next(ln for ln in screen.splitlines() if want_norm in ln)
        assert f" {want_step} " in row, row  # the step of those values
        assert "NaN/Inf in 2.weight" in screen, screen  # the incident, named
        assert "largest grad_param_l2_norm" in screen, screen
        assert value(samples, "grad_nonfinite_steps_total") == 1
        _tmux("send-keys", "-t", session, "C-c")
        deadline = time.monotonic() + 15
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert exit_file.read_text().strip() == "0"  # a clean exit, no traceback
    finally:
        _tmux("kill-session", "-t", session)
        done.write_text("done")
        run.wait(timeout=30)


def test_top_once_and_bad_targets(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "gradwatch.cli", "top", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "cannot read targets" in out.stderr
    assert "Traceback" not in out.stderr
    sd = tmp_path / "sd.json"
    sd.write_text(f'[{{"targets": ["127.0.0.1:{free_port()}"], "labels": {{"rank": "0"}}}}]')
    out = subprocess.run(
        [sys.executable, "-m", "gradwatch.cli", "top", str(sd), "--once", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stdout + out.stderr  # nothing answered
    assert "Connection refused" in out.stdout or "URLError" in out.stdout, out.stdout


def test_top_over_tls(tmp_path: Path):
    """https targets: the view verifies the server with --cacert (a self-signed certificate for
    127.0.0.1 made here with openssl) and shows the run's numbers."""
    import torch

    import gradwatch

    cert, key = self_signed(tmp_path, "127.0.0.1")
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, port=0, tls_cert=str(cert), tls_key=str(key)) as h:
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        url = f"https://127.0.0.1:{h.port}/metrics"
        out = subprocess.run(
            [sys.executable, "-m", "gradwatch.cli", "top", url, "--once", "--cacert", str(cert)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        norm = h.latest().get("grad_l2_norm")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{norm:.4g}" in out.stdout, out.stdout
    # without the CA the certificate is refused, shown in the view, and nothing is trusted
    with gradwatch.watch(model, opt, port=0, tls_cert=str(cert), tls_key=str(key)) as h:
        opt.step()
        out = subprocess.run(
            [sys.executable, "-m", "gradwatch.cli", "top", f"https://127.0.0.1:{h.port}/metrics",
             "--once"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stdout, out.stdout
