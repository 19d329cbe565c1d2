"""Settings hardening: strict integers, bools refused as ints, one bound per setting for the
environment and watch() alike, hosts parsed as addresses (IPv6 served), bad combinations and TLS
material refused when the settings are read, in both paths, with one line naming the setting."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import config as gwconfig
from gradwatch.config import FIELDS, Config, SettingError, from_env, parse_host

IN_CI = os.environ.get("CI", "").lower() == "true"
SRC = os.path.dirname(os.path.dirname(os.path.abspath(gradwatch.__file__)))

INT_VARS = ("GRADWATCH_PORT", "GRADWATCH_EVERY", "GRADWATCH_MAX_PARAMS", "LOCAL_RANK", "RANK")
MALFORMED_INTS = ["--5", "+-3", "-+3", "++1", "1_0", "5-", "1 2", " 5\u3000", "\u200b5", "5\n5"]


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without gradwatch/launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH", "OTEL_"))}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("GRADWATCH", "OTEL_")) or k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
            monkeypatch.delenv(k)
    return monkeypatch


def _tiny_step():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt


_START_STOP = re.compile(r"gradwatch: (watching .*; statistics on|stopped) ")


def _one_line(err: str) -> str:
    """The one line a bad setting or a refusal prints (besides the endpoint's start/stop)."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not _START_STOP.match(ln)]
    assert len(lines) == 1, err
    return lines[0]


# ---- 4. integers: strict everywhere ----------------------------------------------------------
@pytest.mark.parametrize("var", INT_VARS)
@pytest.mark.parametrize("raw", MALFORMED_INTS)
def test_malformed_integer_is_a_setting_error_naming_the_variable(var, raw):
    with pytest.raises(SettingError) as info:  # was: a raw ValueError from int()
        from_env({var: raw})
    assert var in str(info.value) and "accepted:" in str(info.value)


@pytest.mark.parametrize("raw,value", [(" +7 ", 7), ("\t7\n", 7), ("007", 7), ("-0", 0)])
def test_integer_with_sign_and_ascii_whitespace_is_read(raw, value):
    assert from_env({"RANK": raw}).rank == value


@pytest.mark.parametrize("var", INT_VARS)
def test_watch_with_malformed_integer_variable_is_one_line_and_training_goes_on(
    var, clean_env, capsys
):
    clean_env.setenv(var, "--5")
    model, opt = _tiny_step()
    handle = gradwatch.watch(model, opt, port=0)  # was: ValueError out of watch()
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert not handle.enabled
    line = _one_line(capsys.readouterr().err)
    assert var in line and "'--5'" in line and "training goes on" in line


_NO_CODE_SCRIPT = (
    "import torch; m = torch.nn.Linear(2, 2); o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
    "for _ in range(3):\n"
    "    o.zero_grad(); m(torch.ones(1, 2)).sum().backward(); o.step()\n"
    "import sys; print('done', 'gradwatch.session' in sys.modules)\n"
)


@pytest.mark.parametrize("var", ["GRADWATCH_EVERY", "LOCAL_RANK"])
def test_no_code_mode_malformed_integer_names_the_variable(var):
    env = _env(GRADWATCH="1", GRADWATCH_PORT="0")
    env[var] = "+-3"
    out = subprocess.run(
        [sys.executable, "-c", _NO_CODE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    line = _one_line(out.stderr)  # was: "autostart failed (ValueError(...))", no variable
    assert var in line and "'+-3'" in line and "accepted" in line
    assert out.stdout.split() == ["done", "False"]


# ---- 4. bools are not integers; one bound per setting -----------------------------------------
@pytest.mark.parametrize("name", ["port", "every", "max_params", "max_groups", "update_every"])
def test_bool_is_refused_where_an_integer_is_expected(name):
    with pytest.raises(SettingError, match=name):
        Config().with_overrides(**{name: True})


def test_watch_port_true_does_not_listen_on_port_1(clean_env, capsys):
    model, opt = _tiny_step()
    handle = gradwatch.watch(model, opt, port=True)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert not handle.enabled and handle.port == 0
    line = _one_line(capsys.readouterr().err)
    assert "port=True" in line and "accepted: an integer from 0 to 65535" in line


def _accepts_env(field_name: str, text: str) -> bool:
    try:  # port 0: no PORT + LOCAL_RANK limit
        from_env({"GRADWATCH_PORT": "0", FIELDS[field_name].var: text})
        return True
    except SettingError:
        return False


def _accepts_watch(field_name: str, value: object) -> bool:
    try:
        Config(port=0).with_overrides(**{field_name: value})
        return True
    except SettingError:
        return False


INT_FIELDS = {
    "port": (0, 65535),
    "every": (1, 10**9),
    "max_params": (1, 10**6),
    "max_groups": (2, 10**5),
    "update_every": (0, 10**9),
    "micro_batch_size": (1, 10**9),
    "local_rank": (0, 10**7),
    "rank": (0, 10**7),
    "world_size": (1, 10**7 + 1),
}


@pytest.mark.parametrize("field_name", sorted(INT_FIELDS))
def test_environment_and_watch_share_each_integer_bound(field_name):
    lo, hi = INT_FIELDS[field_name]
    for value in (lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, 10**12, -(10**12)):
        env_ok, watch_ok = _accepts_env(field_name, str(value)), _accepts_watch(field_name, value)
        assert env_ok == watch_ok == (lo <= value <= hi), (field_name, value)


@pytest.mark.parametrize(
    "field_name,good,bad",
    [
        ("vanishing_threshold", [0, 1e-7, 5], [-1e-9, float("inf"), float("nan")]),
        ("exploding_threshold", [1e-9, 100, 1e30], [0, -3, float("inf")]),
        ("noise_ema", [0, 0.5, 0.999], [1, 1.5, -0.1, float("nan")]),
    ],
)
def test_environment_and_watch_share_each_number_bound(field_name, good, bad):
    for value in good:
        assert _accepts_env(field_name, repr(float(value))) and _accepts_watch(field_name, value)
    for value in bad:
        assert not _accepts_env(field_name, repr(float(value)))
        assert not _accepts_watch(field_name, value), (field_name, value)
    assert not _accepts_watch(field_name, True)


def test_a_string_argument_is_read_like_its_variable():
    cfg = Config().with_overrides(backend=" TORCH ", every="10", host="[::1]", per_param="on")
    assert (cfg.backend, cfg.every, cfg.host, cfg.per_param) == ("torch", 10, "::1", True)
    with pytest.raises(SettingError, match="'--5'"):
        Config().with_overrides(every="--5")


# ---- 4. hosts: addresses, the all-interfaces warning, IPv6 -----------------------------------
@pytest.mark.parametrize("raw", ["0", "0x0", "0X0", "0.0.0.00", "127.1", "0177.0.0.1", "0x7f.1"])
def test_ambiguous_numeric_host_is_refused(raw):
    with pytest.raises(SettingError) as info:  # was: bound 0.0.0.0 with no warning
        from_env({"GRADWATCH_HOST": raw})
    assert "GRADWATCH_HOST" in str(info.value) and "ambiguous" in str(info.value)


@pytest.mark.parametrize(
    "raw,host",
    [
        ("0.0.0.0", "0.0.0.0"),
        ("::", "::"),
        ("0::0", "::"),
        ("0:0:0:0:0:0:0:0", "::"),
        ("[::1]", "::1"),
        (" ::1 ", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("localhost", "localhost"),
        ("node-7.cluster.local.", "node-7.cluster.local."),
        ("1e100.net", "1e100.net"),
    ],
)
def test_host_is_parsed_to_its_canonical_spelling(raw, host):
    assert from_env({"GRADWATCH_HOST": raw}).host == host
    assert Config().with_overrides(host=raw).host == host


def test_every_spelling_of_all_interfaces_is_recognised():
    for raw in ("0.0.0.0", "::", "0::0", "::0", "::ffff:0.0.0.0"):
        assert gwconfig.binds_all_interfaces(parse_host("h", raw)), raw
    for raw in ("127.0.0.1", "::1", "localhost", "10.1.2.3"):
        assert not gwconfig.binds_all_interfaces(parse_host("h", raw)), raw


def _require_ipv6() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        if IN_CI:
            pytest.fail(f"IPv6 loopback unavailable: {exc}")
        pytest.skip(f"IPv6 loopback unavailable: {exc}")


@pytest.mark.parametrize("host", ["::1", "::"])
def test_ipv6_literal_is_served(host, clean_env, caplog):
    _require_ipv6()
    model, opt = _tiny_step()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        handle = gradwatch.watch(model, opt, port=0, host=host)
        try:
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            assert handle.port  # was 0: AF_INET cannot bind an IPv6 address
            assert handle.session.exporter.server.socket.family == socket.AF_INET6
            url = f"http://[::1]:{handle.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                assert "grad_l2_norm" in r.read().decode()
        finally:
            handle.close()
    warned = [r for r in caplog.records if "all interfaces" in r.getMessage()]
    assert len(warned) == (1 if host == "::" else 0)


# ---- long values are cut --------------------------------------------------------------------
@pytest.mark.parametrize("var", ["GRADWATCH_EVERY", "GRADWATCH_HOST", "GRADWATCH_GROUPS"])
def test_a_5kb_value_is_not_echoed(var, clean_env, capsys):
    raw = {"GRADWATCH_EVERY": "9", "GRADWATCH_HOST": "h", "GRADWATCH_GROUPS": "a b="}[var] * 5000
    raw = raw[:5000]
    clean_env.setenv(var, raw)
    handle = gradwatch.watch(*_tiny_step(), port=0)
    assert not handle.enabled
    line = _one_line(capsys.readouterr().err)
    assert var in line and "(5000 characters)" in line and len(line) < 500


# ---- 2. one validation path: bad combinations refused the same way in both ------------------
@pytest.mark.parametrize("field_name", ["tls_client_ca", "tls_key"])
def test_tls_key_or_client_ca_without_cert_is_refused_in_both_paths(field_name, tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("not used\n")
    with pytest.raises(SettingError) as from_environment:
        from_env({FIELDS[field_name].var: str(pem)})  # was: accepted, plain HTTP served
    with pytest.raises(SettingError) as from_watch:
        Config().with_overrides(**{field_name: str(pem)})
    assert str(from_environment.value) == str(from_watch.value)
    msg = str(from_watch.value)
    assert FIELDS[field_name].var in msg and "GRADWATCH_TLS_CERT" in msg and "plain HTTP" in msg


def test_no_code_mode_client_ca_without_cert_serves_nothing(tmp_path):
    from util import free_port

    port = free_port()
    ca = tmp_path / "ca.pem"
    ca.write_text("unused\n")
    script = _NO_CODE_SCRIPT + (
        "import urllib.request\n"
        "try:\n"
        f"    urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=3); print('HTTP')\n"
        "except OSError:\n"
        "    print('none')\n"
    )
    env = _env(GRADWATCH="1", GRADWATCH_PORT=str(port), GRADWATCH_TLS_CLIENT_CA=str(ca))
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["done", "False", "none"]  # was: plain HTTP served
    line = _one_line(out.stderr)
    assert "GRADWATCH_TLS_CLIENT_CA" in line and "GRADWATCH_TLS_CERT" in line


def test_port_plus_local_rank_checked_for_watch_arguments_too():
    with pytest.raises(SettingError, match="GRADWATCH_PORT"):
        gwconfig.read_env({"LOCAL_RANK": "1"}).with_overrides(port=65535)


# ---- 3. TLS material loaded and checked when the settings are read --------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from util import openssl, require_tool

    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki-hardening")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    new_key = ("req", "-newkey", "rsa:2048", "-nodes")
    openssl(*new_key, "-x509", "-days", "2", "-subj", "/CN=ca", "-keyout", "ca.key", "-out",
             "ca.pem", cwd=d)  # fmt: skip
    for name in ("server", "other"):
        openssl(*new_key, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", cwd=d)  # fmt: skip
    sign = ("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-extfile", "san.cnf")  # fmt: skip
    openssl(*sign, "-days", "2", "-out", "server.pem", cwd=d)
    openssl(*sign, "-days", "-1", "-out", "expired.pem", cwd=d)  # notAfter before now
    (d / "ca.cnf").write_text(  # `openssl ca`: the one way to a start date in the future
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        "default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n"
    )
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    openssl("ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile",
             "ca.key", "-in", "server.csr", "-startdate", "20990101000000Z", "-enddate",
             "20990201000000Z", "-out", "future.pem", cwd=d)  # fmt: skip
    openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out",
             "encrypted.key", cwd=d)  # fmt: skip
    openssl("rsa", "-in", "server.key", "-aes256", "-traditional", "-passout", "pass:secret",
             "-out", "encrypted-traditional.key", cwd=d)  # fmt: skip
    (d / "combined.pem").write_bytes(
        (d / "server.key").read_bytes() + (d / "server.pem").read_bytes()
    )
    (d / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    return d


def test_good_tls_material_is_accepted(pki):
    env = {
        "GRADWATCH_TLS_CERT": str(pki / "server.pem"),
        "GRADWATCH_TLS_KEY": str(pki / "server.key"),
    }
    assert from_env(env).tls_cert == str(pki / "server.pem")
    assert from_env({**env, "GRADWATCH_TLS_CLIENT_CA": str(pki / "ca.pem")}).tls_client_ca
    assert from_env({"GRADWATCH_TLS_CERT": str(pki / "combined.pem")}).tls_key == ""


# case: (cert, key, client CA), the variable named (GRADWATCH_TLS_...), what the message says
TLS_CASES = {
    "missing cert": (("nope.pem", "server.key", None), "CERT", "No such file"),
    "cert is a dir": ((".", "server.key", None), "CERT", "not a regular file"),
    "missing key": (("server.pem", "nope.key", None), "KEY", "No such file"),
    "no cert in it": (("server.key", "server.key", None), "CERT", "no PEM certificate"),
    "garbage cert": (("garbage.pem", "server.key", None), "CERT", "no PEM certificate"),
    "mismatched key": (("server.pem", "other.key", None), "KEY", "does not match"),
    "not a key": (("server.pem", "ca.pem", None), "KEY", "no PEM private key"),
    "no key at all": (("server.pem", None, None), "CERT", "GRADWATCH_TLS_KEY/tls_key is not set"),
    "expired": (("expired.pem", "server.key", None), "CERT", "expired on"),
    "not yet valid": (("future.pem", "server.key", None), "CERT", "not valid before Jan  1"),
    "encrypted key": (("server.pem", "encrypted.key", None), "KEY", "passphrase-protected"),
    "encrypted, traditional": (
        ("server.pem", "encrypted-traditional.key", None),
        "KEY",
        "passphrase-protected",
    ),
    "client CA not a cert": (
        ("server.pem", "server.key", "server.key"),
        "CLIENT_CA",
        "no PEM CA certificate",
    ),
}


@pytest.mark.parametrize("case", sorted(TLS_CASES))
def test_bad_tls_material_is_one_clear_line_naming_the_variable(case, pki):
    (cert, key, ca), var, problem = TLS_CASES[case]
    var = "GRADWATCH_TLS_" + var
    kw = {"tls_cert": cert, "tls_key": key, "tls_client_ca": ca}
    kw = {k: str(pki / v) for k, v in kw.items() if v}
    env = {FIELDS[k].var: v for k, v in kw.items()}
    with pytest.raises(SettingError) as from_environment:  # was: accepted; failed at step 1
        from_env(env)
    with pytest.raises(SettingError) as from_watch:
        gwconfig.read_env({}).with_overrides(**kw)
    msg = str(from_environment.value)
    assert var in msg and problem in msg and "accepted:" in msg and "\n" not in msg, msg
    assert "PEM lib" not in msg and "_ssl.c" not in msg, msg
    if case not in ("missing cert", "cert is a dir", "missing key"):  # per-value: own name
        assert str(from_watch.value) == msg


def test_watch_with_bad_tls_turns_telemetry_off_and_training_goes_on(pki, clean_env, capsys):
    model, opt = _tiny_step()
    handle = gradwatch.watch(
        model, opt, port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "other.key")
    )
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert not handle.enabled
    line = _one_line(capsys.readouterr().err)
    assert "GRADWATCH_TLS_KEY" in line and "does not match" in line and "training goes on" in line


def _run_in_pty(argv: list[str], env: dict[str, str], timeout: float) -> tuple[str, int | None]:
    """Run argv with a pseudo-terminal as its controlling terminal (stdin, stdout and stderr);
    its output and exit code, or None when it had to be killed after ``timeout`` seconds."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    out, deadline, code, eof = b"", time.monotonic() + timeout, None, False
    try:
        while time.monotonic() < deadline:
            if not eof and select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: every copy of the terminal is closed
                    chunk = b""
                out += chunk
                eof = not chunk
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if eof:
                time.sleep(0.05)
    finally:
        if code is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    return out.decode(errors="replace"), code


def test_encrypted_key_under_a_terminal_never_prompts(pki):
    """With a terminal attached OpenSSL asks it for the passphrase: training blocked at step 1."""
    env = _env(
        GRADWATCH="1",
        GRADWATCH_PORT="0",
        GRADWATCH_TLS_CERT=str(pki / "server.pem"),
        GRADWATCH_TLS_KEY=str(pki / "encrypted.key"),
    )
    text, code = _run_in_pty([sys.executable, "-c", _NO_CODE_SCRIPT], env, timeout=90)
    assert code == 0, f"exit {code} (None: hung, e.g. at a passphrase prompt): {text}"
    assert "pass phrase" not in text.lower(), text
    assert "done False" in text, text  # the training loop ran to its end, telemetry off
    line = _one_line("\n".join(ln for ln in text.splitlines() if "gradwatch" in ln))
    assert "GRADWATCH_TLS_KEY" in line and "passphrase-protected" in line


# ---- 1. the native kernel is built and loaded only where no other local user can write -------
_PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
int gw_abi_version(void) { return 1; }
int gw_partials(long long n, void *p, void *c, void *d, void *o, int t, long long m) { return -1; }
"""

_KERNEL_SCRIPT = r"""
import json, math, urllib.request
import torch, gradwatch
from gradwatch.kernels import cpu_native
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
handle = gradwatch.watch(model, opt, port=0)
model(torch.randn(2, 4)).pow(2).sum().backward()
norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
opt.step()
with urllib.request.urlopen(f"http://127.0.0.1:{handle.port}/metrics", timeout=10) as r:
    lines = [ln for ln in r.read().decode().splitlines() if ln.startswith("grad_l2_norm{")]
print(json.dumps({
    "backends": sorted(handle.session.backend_names()),
    "lib": str(cpu_native._lib_path),
    "scraped": float(lines[0].rsplit(" ", 1)[1]) if lines else None,
    "norm": norm,
}))
handle.close()
"""


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
    """File name the real build gives the library (its key: source, compiler, flags, CPU)."""
    from gradwatch.kernels import cpu_native

    d = tmp_path_factory.mktemp("genuine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADWATCH_CACHE_DIR", str(d))
        cpu_native._reset_state()
        try:
            if not cpu_native.native_available():
                msg = f"native CPU kernel unavailable: {cpu_native._failure}"
                if IN_CI:
                    pytest.fail(msg)
                pytest.skip(msg)
            return cpu_native._lib_path.name
        finally:
            cpu_native._reset_state()


def _require_root() -> None:
    if os.geteuid() != 0:  # os.chown to another uid needs root (CI runs as root)
        if IN_CI:
            pytest.fail("this test plants files owned by another uid: run as root")
        pytest.skip("needs root to chown files to another uid")


def _plant(tmp_path, dest_dir, name: str) -> tuple:
    """A library with the kernel's name and symbols whose constructor writes a marker file."""
    from gradwatch.kernels import cpu_native

    marker = tmp_path / "planted-library-ran"
    src = tmp_path / "planted.c"
    src.write_text(_PLANTED_C)
    dest_dir.mkdir(parents=True, exist_ok=True)
    lib = dest_dir / name
    cc = cpu_native._compiler()
    cmd = [*cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    lib.chmod(0o755)
    return lib, marker


def _run_kernel_script(cache_dir, tmpdir) -> tuple[dict, str]:
    import json

    env = _env(GRADWATCH_CACHE_DIR=str(cache_dir), TMPDIR=str(tmpdir))
    cmd = [sys.executable, "-c", _KERNEL_SCRIPT]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


ATTACKS = ["world-writable dir", "dir of another uid", "file of another uid", "group-writable file"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_planted_kernel_in_the_tmp_fallback_is_never_loaded(attack, tmp_path, kernel_name):
    """~/.cache not creatable: the fallback /tmp/gradwatch-<uid> was prepared by someone else."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)  # like /tmp: everyone may create entries (sticky)
    fallback = tmpdir / f"gradwatch-{os.getuid()}"
    lib, marker = _plant(tmp_path, fallback, kernel_name)
    fallback.chmod(0o700)
    if attack == "world-writable dir":
        fallback.chmod(0o777)
    elif attack == "dir of another uid":
        _require_root()
        fallback.chmod(0o755)
        os.chown(lib, 65534, 65534)
        os.chown(fallback, 65534, 65534)
    elif attack == "file of another uid":
        _require_root()
        os.chown(lib, 65534, 65534)
    else:
        lib.chmod(0o775)
    got, err = _run_kernel_script(blocker / "cache", tmpdir)
    assert not marker.exists(), "the planted library was loaded"
    assert got["backends"] == ["torch"], got  # statistics through the torch fallback ...
    assert got["scraped"] == pytest.approx(got["norm"], rel=1e-12)  # ... and still right
    line = _one_line(err)
    assert "native CPU kernel unavailable" in line and "refused" in line and str(fallback) in line


def test_unsafe_cache_dir_is_refused_and_the_next_one_used(tmp_path, kernel_name):
    cache = tmp_path / "shared-cache"
    lib, marker = _plant(tmp_path, cache, kernel_name)
    cache.chmod(0o777)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    got, err = _run_kernel_script(cache, tmpdir)
    assert not marker.exists(), "the planted library was loaded"
    assert got["backends"] == ["native"]  # built afresh in the private fallback
    assert got["lib"] == str(tmpdir / f"gradwatch-{os.getuid()}" / kernel_name)
    assert got["scraped"] == pytest.approx(got["norm"], rel=1e-12)
    line = _one_line(err)
    assert "refused" in line and str(cache) in line and "mode 777" in line
    built = tmpdir / f"gradwatch-{os.getuid()}" / kernel_name
    st = built.stat()
    assert st.st_uid == os.geteuid() and not st.st_mode & 0o022
    assert not (tmpdir / f"gradwatch-{os.getuid()}").stat().st_mode & 0o077  # created 0700


def test_host_name_resolving_to_all_interfaces_warns(monkeypatch):
    def fake_getaddrinfo(host, *args, **kwargs):
        assert host == "everywhere.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("0.0.0.0", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert gwconfig.binds_all_interfaces("everywhere.example")


def test_path_objects_are_read_like_text(pki):
    cfg = Config().with_overrides(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    assert cfg.tls_cert == str(pki / "server.pem") and cfg.tls_key == str(pki / "server.key")


def test_tls_material_broken_after_the_check_is_one_log_line_at_the_endpoint(
    pki, tmp_path, clean_env, caplog
):
    """The endpoint loads the material again at the first step, through the same loader: a key
    replaced in between is one log line (an OSError, like a port taken), statistics go on."""
    key = tmp_path / "server.key"
    key.write_bytes((pki / "server.key").read_bytes())
    model, opt = _tiny_step()
    handle = gradwatch.watch(model, opt, port=0, tls_cert=str(pki / "server.pem"), tls_key=key)
    key.write_bytes((pki / "other.key").read_bytes())
    try:
        with caplog.at_level(logging.WARNING, logger="gradwatch"):
            for _ in range(3):
                opt.zero_grad()
                model(torch.ones(1, 2)).sum().backward()
                opt.step()
        assert handle.enabled and handle.port == 0
        assert handle.session.watches()[0].collected_steps == 3
        lines = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
        assert len(lines) == 1 and "GRADWATCH_TLS_KEY" in lines[0] and "does not match" in lines[0]
    finally:
        handle.close()
