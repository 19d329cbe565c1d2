"""Native CPU backend: ``_partials.c`` compiled on first use, cached on disk, called via ctypes.

The C source is built with the system compiler (``$CC``, else ``cc``/``gcc``) into a shared
library cached under ``$GRADWATCH_CACHE_DIR`` or ``$XDG_CACHE_HOME/gradwatch`` (default
``~/.cache/gradwatch``), keyed by a hash of source, compiler, flags and CPU, so one build serves
every later process on the same machine; ``$TMPDIR/gradwatch-<uid>`` when that cannot be
created. A library is built into and loaded from a directory only when no other local user can
write there (the directory ours and not group/world-writable, every directory above it ours or
root's and writable by nobody else unless sticky, the file itself ours and not writable by
others): otherwise the place is refused, with one log line, and the torch fallback runs. ctypes
releases the GIL for the call; the C side splits large inputs over ``torch.get_num_threads()``
threads: those of torch's own OpenMP pool where torch runs on GNU OpenMP and the compiler is gcc
(built with ``-fopenmp``; see :func:`_torch_openmp`), else pthreads started per call.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gradwatch.kernels.contract import DTYPE_CODES, N_PARTIALS, c_defines, check_inputs
from gradwatch.kernels.torch_fallback import is_non_overlapping_and_dense

__all__ = ["native_available", "native_partials", "native_partials_prepared"]

_LOG = logging.getLogger("gradwatch")

_ABI_VERSION = 1  # must match GW_ABI_VERSION in _partials.c
_SOURCE_NAME = "_partials.c"
_COMMON_FLAGS = (
    "-O3",
    "-std=gnu11",
    "-shared",
    "-fPIC",
    "-pthread",
    # Lets isnan/fabs/max vectorise without -ffast-math, which would break NaN/inf semantics.
    "-fno-math-errno",
    "-fno-trapping-math",
)
_OPENMP_FLAGS = ("-fopenmp", "-DGW_OPENMP")
MIN_ELEMENTS_PER_THREAD = 1 << 20
"""The C side adds one thread per this many elements, up to torch.get_num_threads(). Measured
(2 vCPUs, benchmarks/cpu_kernels.py --sweep): a pthread create + join costs 30-40 us, so a
second one lost at 1M elements (225 vs 171 us) and won from 2M (302 vs 553 us). On torch's
OpenMP pool a second thread already wins from 64K elements in wall time (12 vs 18 us at 128K,
72 vs 138 us at 1M), but waking it costs the CPU of its spin-wait afterwards: in SGD steps over
4000 tensors (0.3M elements), split at 64K elements per thread vs not split, the same added wall
time and +3.5 ms of CPU per step (21 interleaved rounds, twice). The same threshold for both:
a second thread only where it saves ~100 us or more."""

_lock = threading.Lock()
_fn: ctypes._CFuncPtr | None = None  # gw_partials once loaded
_failure: str | None = None  # why the native path is unavailable (memoized, warned once)
_lib_path: Path | None = None
_openmp = False  # the loaded library runs its threads on torch's OpenMP pool
_build_count = 0  # compiler runs in this process (tests check that a cached build is reused)


# ---- build -------------------------------------------------------------------------------------


def _compiler() -> list[str]:
    """Compiler command (``$CC`` may hold arguments, e.g. ``ccache gcc``); raises if none."""
    cc = os.environ.get("CC")
    if cc:
        cmd = shlex.split(cc)
        exe = shutil.which(cmd[0]) if cmd else None
        if exe is None:
            raise RuntimeError(f"CC={cc!r} not found")
        return [exe, *cmd[1:]]
    for name in ("cc", "gcc", "clang"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise RuntimeError("no C compiler found (set CC, or install cc/gcc)")


def _cpu_id() -> str:
    """Identifies the CPU's instruction set: ``-march=native`` output is only valid there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            keep = ("model name", "flags", "features", "cpu implementer", "cpu part", "isa")
            lines = []
            for line in f:
                if not line.strip():
                    break  # the first processor's block describes the ISA
                if line.lower().startswith(keep):
                    lines.append(line.strip())
            return "\n".join(lines)
    except OSError:
        return platform.processor()


def _flag_sets(cpu: str, openmp: bool = False) -> list[tuple[str, ...]]:
    """Flag sets to try in order: tuned for this CPU first, then generic; with ``openmp`` (see
    :func:`_torch_openmp`) the OpenMP builds first, then the pthread ones."""
    machine = platform.machine().lower()
    native: tuple[str, ...] = ()
    if machine in ("x86_64", "amd64"):
        native = ("-march=native",)
        if " avx512f" in cpu:
            # gcc defaults to 256-bit vectors; 512-bit measured ~1.3x faster in cache here.
            native += ("-mprefer-vector-width=512",)
    elif machine in ("aarch64", "arm64"):
        native = ("-mcpu=native",)
    generic = _COMMON_FLAGS
    sets = [generic + native, generic] if native else [generic]
    if openmp:
        sets = [s + _OPENMP_FLAGS for s in sets] + sets
    return sets


def _mapped_libgomp() -> set[str]:
    """Paths of the GNU OpenMP runtimes mapped into this process."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if "libgomp" in line}
    except OSError:
        return set()
    return {p for p in paths if os.path.basename(p).startswith("libgomp")}


def _torch_openmp(compiler_version: str) -> bool:
    """Build the OpenMP variant: torch runs its intra-op threads on GNU OpenMP, the one libgomp
    in the process is ``libgomp.so.1`` (so the library's dependency resolves to torch's copy,
    already loaded, and shares its thread pool instead of starting a second one), and the
    compiler is gcc (clang's -fopenmp would link another runtime, libomp)."""
    if not sys.platform.startswith("linux") or "clang" in compiler_version.lower():
        return False
    try:
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return False
        gomp = _mapped_libgomp()
        if len(gomp) != 1 or os.path.basename(next(iter(gomp))) != "libgomp.so.1":
            return False
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except Exception:  # noqa: BLE001 - not loaded, or no way to tell: per-call pthreads
        return False
    return True


def _cache_dir() -> Path:
    env = os.environ.get("GRADWATCH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gradwatch"


def _fallback_cache_dir() -> Path:
    uid = getattr(os, "getuid", lambda: "u")()
    return Path(tempfile.gettempdir()) / f"gradwatch-{uid}"


# ---- where a library may be loaded from: only places no other local user can write ------------


def _chain(path: Path) -> list[Path]:
    """``path`` and every directory above it, as written and as resolved (symlinks followed)."""
    absolute = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    seen: dict[Path, None] = {}
    for p in (absolute, *absolute.parents, real, *real.parents):
        seen.setdefault(p, None)
    return list(seen)


def _unsafe_dir(path: Path) -> str | None:
    """Why another local user could put or replace a file in directory ``path``, or None.

    The directory itself must be ours (owner == euid) and not group/world-writable; every
    directory above it must belong to us or root and be writable by nobody else, unless sticky
    (like /tmp, where others cannot rename or delete our entries); a symlink on the way must
    belong to us or root."""
    if not hasattr(os, "geteuid"):
        return None  # no POSIX owners to compare (Windows)
    euid = os.geteuid()
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        if st.st_uid != euid:
            return f"{path} is owned by uid {st.st_uid}, not by this process's uid {euid}"
        if st.st_mode & 0o022:
            return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
        for p in _chain(path)[1:]:
            st = os.lstat(p)
            if st.st_uid not in (0, euid):
                return f"{p}, above {path}, is owned by uid {st.st_uid}"
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                mode = stat.S_IMODE(st.st_mode)
                return f"{p}, above {path}, is writable by other users (mode {mode:o})"
    except OSError as e:
        return f"{path}: cannot check its owner ({e.strerror or e})"
    return None


def _unsafe_file(path: Path) -> str | None:
    """Why the library file ``path`` may not be ours alone, or None (owner == euid, a regular
    file, not group/world-writable)."""
    if not hasattr(os, "geteuid"):
        return None
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path}: cannot check its owner ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this process's uid {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _key(source: bytes, cc: list[str], version: str, flags: tuple[str, ...], cpu: str) -> str:
    h = hashlib.sha256()
    for part in (
        source,
        "\0".join(cc).encode(),
        version.encode(),
        "\0".join(flags).encode(),
        f"{sys.platform}|{platform.machine()}|{_ABI_VERSION}".encode(),
        cpu.encode(),
    ):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:20]


def _load(path: Path) -> ctypes._CFuncPtr:
    lib = ctypes.CDLL(str(path))
    if lib.gw_abi_version() != _ABI_VERSION:
        raise OSError(f"{path}: ABI version mismatch")
    fn = lib.gw_partials
    fn.argtypes = [
        ctypes.c_int64,  # n tensors
        ctypes.c_void_p,  # uint64 data pointers
        ctypes.c_void_p,  # int64 element counts
        ctypes.c_void_p,  # int8 dtype codes
        ctypes.c_void_p,  # double out[n * N_PARTIALS]
        ctypes.c_int,  # max threads
        ctypes.c_int64,  # min elements per thread
    ]
    fn.restype = ctypes.c_int
    global _openmp
    _openmp = bool(lib.gw_openmp())
    return fn


def _compile(cc: list[str], flags: tuple[str, ...], source: bytes, dest: Path) -> None:
    """Compile into a temp file in dest's dir, then rename: concurrent builders never expose a
    partial library, and the last rename wins with an identical file."""
    global _build_count
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=dest.parent)
    os.close(fd)
    src = Path(tmp).with_suffix(".c")
    try:
        src.write_bytes(source)
        cmd = [*cc, *flags, "-o", tmp, str(src), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        _build_count += 1
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise RuntimeError(f"compile failed ({' '.join(cmd)}): {' | '.join(msg[-5:])}")
        os.chmod(tmp, 0o755)  # whatever the umask: never group/world-writable
        os.replace(tmp, dest)
    finally:
        for p in (tmp, src):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _build_and_load() -> tuple[ctypes._CFuncPtr, Path]:
    cc = _compiler()
    try:
        res = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run compiler {cc[0]}: {e}") from e
    if res.returncode != 0:
        raise RuntimeError(f"compiler {cc[0]} --version failed: {res.stderr.strip()[:200]}")
    version = res.stdout.strip()
    source = importlib.resources.files("gradwatch.kernels").joinpath(_SOURCE_NAME).read_bytes()
    cpu = _cpu_id()
    openmp = _torch_openmp(version)
    errors: list[str] = []
    refused: list[str] = []  # directories or files another local user could have written
    dirs = [_cache_dir(), _fallback_cache_dir()]
    for flags in _flag_sets(cpu, openmp):
        # The column indices and dtype codes come from the contract: part of the flags, so of
        # the cache key, and a library built for another contract is never loaded.
        flags = (*flags, *c_defines())
        name = f"partials-{_key(source, cc, version, flags, cpu)}.so"
        for d in list(dirs):
            path = d / name
            try:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:  # not creatable (or not a dir): try the next one
                errors.append(f"{d}: {e}")
                dirs.remove(d)
                continue
            problem = _unsafe_dir(d)
            if problem is None and (path.exists() or path.is_symlink()):
                problem = _unsafe_file(path)
            if problem is not None:  # never build into, nor load from, such a place
                refused.append(problem)
                dirs.remove(d)
                continue
            if path.is_file():
                try:
                    return _loaded(path, refused)
                except (OSError, AttributeError) as e:  # corrupt or foreign file: rebuild
                    _LOG.debug("gradwatch: ignoring unusable cached %s: %s", path, e)
            try:
                _compile(cc, flags, source, path)
            except OSError as e:  # dir not writable: try the next one
                errors.append(f"{d}: {e}")
                continue
            except (RuntimeError, subprocess.SubprocessError) as e:
                errors.append(str(e))
                break  # these flags do not build: try the next flag set
            try:
                return _loaded(path, refused)
            except (OSError, AttributeError) as e:  # e.g. a noexec mount: try the next dir
                errors.append(f"{path}: {e}")
    reasons = [f"refused {r} (another local user could plant a library there)" for r in refused]
    raise RuntimeError("; ".join(reasons + errors) or "build failed")


def _loaded(path: Path, refused: list[str]) -> tuple[ctypes._CFuncPtr, Path]:
    fn = _load(path)
    if refused:  # one line: where gradwatch would not build nor load, and why
        _LOG.warning(
            "gradwatch: native CPU kernel loaded from %s; refused %s (other local users could"
            " write there)",
            path,
            "; ".join(refused),
        )
    return fn, path


def _get_fn() -> ctypes._CFuncPtr | None:
    global _fn, _failure, _lib_path
    if _fn is not None or _failure is not None:
        return _fn
    with _lock:
        if _fn is None and _failure is None:
            try:
                _fn, _lib_path = _build_and_load()
            except Exception as e:  # noqa: BLE001 - any failure means "use the fallback"
                _failure = f"{type(e).__name__}: {e}"
                _LOG.warning("gradwatch: native CPU kernel unavailable: %s", _failure)
    return _fn


def native_available() -> bool:
    """Build (once per machine) and load the native kernel; False, never raises, if impossible."""
    return _get_fn() is not None


def _reset_state() -> None:
    """Forget the loaded library / memoized failure (tests: switch CC or cache dir)."""
    global _fn, _failure, _lib_path, _openmp
    with _lock:
        _fn = None
        _failure = None
        _lib_path = None
        _openmp = False


# ---- call --------------------------------------------------------------------------------------


class _Buffers(threading.local):
    """Per-thread argument arrays, grown geometrically and reused across calls (the pointers are
    still read every call: gradients are reallocated between steps)."""

    cap = 0

    def ensure(self, n: int) -> None:
        if n > self.cap:
            cap = max(n, 2 * self.cap, 64)
            self.ptrs = np.zeros(cap, np.int64)
            self.counts = np.zeros(cap, np.int64)
            self.codes = np.zeros(cap, np.int8)
            self.addrs = (self.ptrs.ctypes.data, self.counts.ctypes.data, self.codes.ctypes.data)
            self.cap = cap


_bufs = _Buffers()
# Unbound C-level accessors: map() over them is ~2x cheaper than a Python-level loop.
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous


def native_partials(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Partials [T, 6] float64 (see ``gradwatch.kernels``) of CPU fp32/fp16/bf16/fp64 tensors.

    Raises RuntimeError if the native kernel is unavailable (check ``native_available()``),
    TypeError for non-floating dtypes, ValueError for tensors not on the CPU.
    """
    fn = _get_fn()
    if fn is None:
        raise RuntimeError(f"native CPU kernel unavailable: {_failure}")
    ts = tensors if isinstance(tensors, (list, tuple)) else list(tensors)
    n = len(ts)
    out = torch.empty((n, N_PARTIALS), dtype=torch.float64)
    if n == 0:
        return out
    # Plain tensors only: a wrapper subclass (DTensor, ...) has no storage of its own, its
    # data_ptr() is not the data, and reading it would crash.
    dtypes = check_inputs(ts, "native_partials", cpu=True)
    ptrs = list(map(_data_ptr, ts))
    keep: list[torch.Tensor] = []  # contiguous copies must outlive the call
    if not all(map(_is_contiguous, ts)):
        for i, t in enumerate(ts):
            # Dense layouts (transposed, channels_last) are read in place as their storage span:
            # the statistics do not depend on element order. Strides are >= 0 in torch, so
            # data_ptr() is the span's lowest address.
            if not t.is_contiguous() and not is_non_overlapping_and_dense(t):
                c = t.contiguous()
                keep.append(c)
                ptrs[i] = c.data_ptr()
    b = _bufs
    b.ensure(n)
    b.counts[:n] = list(map(_numel, ts))
    _call(fn, ts, ptrs, b.addrs[1], dtypes, out)
    del keep
    return out


def native_partials_prepared(
    tensors: Sequence[torch.Tensor], dtypes: set[torch.dtype], counts: np.ndarray
) -> torch.Tensor:
    """:func:`native_partials` without its checks, for a caller that has made them: every
    tensor a contiguous plain CPU tensor, ``dtypes`` the set of their dtypes (all in
    DTYPE_CODES), ``counts`` a C-contiguous int64 array of their ``numel()``."""
    fn = _get_fn()
    if fn is None:
        raise RuntimeError(f"native CPU kernel unavailable: {_failure}")
    n = len(tensors)
    if counts.dtype != np.int64 or counts.shape != (n,) or not counts.flags.c_contiguous:
        raise ValueError("counts must be a C-contiguous int64 array of one count per tensor")
    out = torch.empty((n, N_PARTIALS), dtype=torch.float64)
    if n:
        _bufs.ensure(n)
        _call(fn, tensors, list(map(_data_ptr, tensors)), counts.ctypes.data, dtypes, out)
    return out


def _call(fn, ts: Sequence[torch.Tensor], ptrs: list[int], counts_addr: int, dtypes, out) -> None:
    """One gw_partials call over ``ts`` (n >= 1; this thread's buffers hold room for n)."""
    n = len(ts)
    b = _bufs
    b.ptrs[:n] = ptrs
    if len(dtypes) == 1:
        b.codes[:n] = DTYPE_CODES[next(iter(dtypes))]
    else:
        b.codes[:n] = [DTYPE_CODES[t.dtype] for t in ts]
    threads = torch.get_num_threads()
    rc = fn(
        n, b.addrs[0], counts_addr, b.addrs[2], out.data_ptr(), threads, MIN_ELEMENTS_PER_THREAD
    )
    if rc < 0:
        raise RuntimeError(f"gw_partials failed with code {rc}")
