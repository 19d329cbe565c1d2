"""No-code mode in real subprocesses: GRADWATCH=1 python train.py, torchrun, bad settings, off."""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

from util import assert_promtool_clean, fetch, free_port, parse, value

SCRIPT = str(Path(__file__).parent / "scripts" / "train_plain.py")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH", "OTEL_"))}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    env.update(extra)
    return env


def test_startup_hook_is_installed():
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    found = [d for d in dirs if (Path(d) / "gradwatch_autostart.pth").exists()]
    assert found, "gradwatch_autostart.pth missing: install the package (pip install -e .)"


def _run_until_ready(env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, SCRIPT],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError("script died: " + proc.stderr.read())
    return proc, json.loads(line)


def _finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate("", timeout=60)
    assert proc.returncode == 0, err
    return err


def test_env_var_mode_exports_with_real_names_and_promtool_clean():
    port = free_port()
    proc, ref = _run_until_ready(
        _env(GRADWATCH="1", GRADWATCH_PORT=str(port), WAIT="1", GRADWATCH_PER_PARAM="1", STEPS="5")
    )
    try:
        text = fetch(port)
    finally:
        err = _finish(proc)
    samples = parse(text)
    assert value(samples, "grad_l2_norm") == pytest.approx(ref["grad_l2_norm"], rel=1e-12)
    assert value(samples, "grad_stats_step") == 5
    params = {dict(k)["param"] for k in samples["grad_param_l2_norm"]}
    assert params == {"encoder.0.weight", "encoder.0.bias", "head.weight", "head.bias"}
    assert "Traceback" not in err
    assert_promtool_clean(text)


def test_unset_variable_imports_nothing():
    out = subprocess.run(
        [sys.executable, SCRIPT], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["gradwatch_loaded"] is False


@pytest.mark.parametrize("off", ["0", "off"])
def test_gradwatch_0_turns_every_form_off(off):
    port = free_port()
    code = (
        "import gradwatch, torch; m = torch.nn.Linear(2, 2);"
        "o = torch.optim.SGD(m.parameters(), lr=0.1);"
        f"h = gradwatch.watch(m, o, port={port}); m(torch.ones(1, 2)).sum().backward();"
        "o.step(); print(h.enabled, h.port)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(GRADWATCH=off),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0"]


@pytest.mark.parametrize(
    "var,raw",
    [
        ("GRADWATCH_EVERY", "abc"),
        ("GRADWATCH_PORT", "-1"),
        ("GRADWATCH", "maybe"),
        ("GRADWATCH_HOST", "é"),
    ],
)
def test_bad_setting_one_line_and_training_goes_on(var, raw):
    env = _env(GRADWATCH="1", GRADWATCH_PORT=str(free_port()))
    env[var] = raw
    out = subprocess.run(
        [sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert var in lines[0] and repr(raw) in lines[0] and "accepted" in lines[0]
    assert json.loads(out.stdout)["steps"] == 4


def test_port_taken_logs_and_training_goes_on():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, SCRIPT],
            capture_output=True,
            text=True,
            env=_env(GRADWATCH="1", GRADWATCH_PORT=str(port)),
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    assert "cannot serve /metrics" in out.stderr and "Traceback" not in out.stderr


def test_torchrun_one_endpoint_per_rank():
    base = free_port()
    while True:  # two consecutive free ports
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            break
        except OSError:
            base = free_port()
    env = _env(GRADWATCH="1", GRADWATCH_PORT=str(base), WAIT="1", STEPS="3")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        SCRIPT,
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        refs: list[dict] = []
        while len(refs) < 2:  # both ranks write to one pipe: lines can run together
            line = proc.stdout.readline()
            assert line, "torchrun ended early: " + proc.stderr.read()
            refs += [json.loads(m) for m in re.findall(r"\{[^{}]*\}", line)]
        got = {}
        deadline = time.monotonic() + 30
        for local_rank in (0, 1):
            while True:
                try:
                    got[local_rank] = parse(fetch(base + local_rank))
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()
    norms = {r["local_rank"]: r["grad_l2_norm"] for r in refs}
    for local_rank, samples in got.items():
        labels = dict(next(iter(samples["grad_l2_norm"])))
        assert labels["local_rank"] == str(local_rank) and labels["world_size"] == "2"
        assert labels["rank"] == str(local_rank)
        assert value(samples, "grad_l2_norm") == pytest.approx(norms[local_rank], rel=1e-12)


def test_autostart_runs_once_per_process():
    """A venv's lib64 -> lib symlink makes `site` run the .pth line twice: one message only."""
    code = "import gradwatch.activation as a; a.autostart(); a.autostart()"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(GRADWATCH="1", GRADWATCH_EVERY="abc"),
    )
    assert out.returncode == 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr


_PROBE = """
import json, sys, torch
def loaded():
    return {
        "dynamo": "torch._dynamo" in sys.modules,
        "otel": any(m.startswith("opentelemetry") for m in sys.modules),
        "session": "gradwatch.session" in sys.modules,
    }
before = loaded()
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.ones(2, 3)).sum().backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # the first step's clip is seen
opt.step()
import gradwatch.session as s
import urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{s._SESSION.port}/metrics").read().decode()
pre = [ln for ln in text.splitlines() if ln.startswith("grad_preclip_l2_norm{")]
print(json.dumps({"before": before, "after": loaded(), "port": s._SESSION.port, "pre": pre}))
"""


def test_armed_no_code_mode_costs_nothing_until_the_first_step():
    """GRADWATCH=1: importing torch builds no session, imports neither dynamo nor OpenTelemetry
    (a spawned DataLoader worker pays nothing); the first step starts everything, and the clip
    before it is still attached to it."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=_env(GRADWATCH="1", GRADWATCH_PORT="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == {"dynamo": False, "otel": False, "session": False}
    assert got["after"]["session"] and got["after"]["otel"] and got["port"] > 0
    # (dynamo is loaded "after": torch.optim.Optimizer.__init__ imports it itself)
    assert len(got["pre"]) == 1, got  # the clip called before the session existed


def test_first_run_lines_start_end_and_no_step_warning():
    """One line with the real URL when /metrics starts, one at exit; a process that imports
    torch and never steps gets one warning (a DataLoader worker would not: it is a child)."""
    out = subprocess.run(
        [sys.executable, SCRIPT],
        env=_env(GRADWATCH="1", GRADWATCH_PORT="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("gradwatch")]
    assert len(lines) == 2, lines
    start = re.fullmatch(
        r"gradwatch: watching every optimizer \(no-code mode\); statistics on"
        r" http://127\.0\.0\.1:(\d+)/metrics",
        lines[0],
    )
    assert start and int(start.group(1)) > 0, lines[0]  # the real port, not 0
    assert lines[1].startswith(f"gradwatch: stopped http://127.0.0.1:{start.group(1)}/metrics")
    assert "4 optimizer steps, 4 collected" in lines[1]
    idle = (
        "import gradwatch.activation as a; a.NO_STEP_WARNING_S = 0.5\n"
        "import time, torch\ntime.sleep(2)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", idle],
        env=_env(GRADWATCH="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    warned = [ln for ln in out.stderr.splitlines() if "no optimizer has stepped" in ln]
    assert len(warned) == 1, out.stderr
