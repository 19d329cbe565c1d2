"""The command line as a new user meets it: demo output (plain and in a terminal), help with
defaults, clear errors instead of tracebacks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from util import IN_CI

CLI = [sys.executable, "-m", "gradwatch.cli"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_demo_prints_where_the_metrics_are_and_a_summary():
    out = _run("demo", "--seconds", "3", "--port", "0", "--nan-at", "3")
    assert out.returncode == 0, out.stderr
    url = re.search(r"live statistics on (http://127\.0\.0\.1:(\d+)/metrics)", out.stdout)
    assert url and int(url.group(2)) > 0, out.stdout
    assert f"gradwatch top {url.group(1)}" in out.stdout
    done, last = out.stdout.strip().splitlines()[-2:]
    assert re.fullmatch(r"gradwatch demo: \d+ steps done", done), done
    assert last.startswith("  last: grad_l2_norm "), last
    assert "NaN/Inf steps 1" in last and "clipped" in last  # clipping is on by default
    assert "Traceback" not in out.stderr


def test_demo_in_a_terminal_clears_its_progress_bar():
    if shutil.which("script") is None:
        if IN_CI:
            pytest.fail("script (util-linux) is not installed")
        pytest.skip("script is not installed")
    cmd = " ".join([*CLI, "demo", "--seconds", "3", "--port", "0"])
    out = subprocess.run(
        ["script", "-qec", f"stty cols 80; {cmd}", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout
    screen = out.stdout.replace("\r\n", "\n")
    assert "━" in screen  # a progress bar was drawn ...
    tail = screen.rsplit("\x1b[2K", 1)[-1]  # ... and erased: what follows the last line clear
    assert "━" not in tail and "gradwatch demo:" in tail, repr(tail[-300:])
    for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).split("\n"):
        assert len(line.rstrip("\r").split("\r")[-1]) <= 80 or "http" in line, line  # no wrap


def test_help_shows_every_default_and_readme_without_file_is_one_line(tmp_path):
    out = _run("demo", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for option, default in (("--seconds", "60.0"), ("--clip", "1.0"), ("--delay", "0.02")):
        assert re.search(re.escape(option) + r" .*?\(default: " + re.escape(default) + r"\)", text)
    top = " ".join(_run("top", "--help").stdout.split())
    assert "(default: 2.0)" in top and "file_sd" in top
    main = _run("--help").stdout
    assert "readme" in main and "top" in main and "``" not in main
    out = _run("readme", str(tmp_path / "missing.md"))
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr
