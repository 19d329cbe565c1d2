"""Session set-up shared by all tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Triton decides at its first import whether its library functions run interpreted. Without a
# GPU the kernel tests need the interpreter, and torch.compile (test_compile.py) would otherwise
# import triton first in compiled mode; so import it here, interpreted, before any test module.
# With a GPU nothing is forced: the interpreter tests then run in a subprocess of their own.
if not torch.cuda.is_available():
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        pass  # test_triton_kernel.py reports it (and fails in CI)
    finally:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(scope="module")
def native_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The native kernel built into a temporary cache dir, not the user's ~/.cache, for one test
    module (its modules use it through ``pytestmark``); the loaded kernel is forgotten after."""
    from gradwatch.kernels import cpu_native

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADWATCH_CACHE_DIR", str(tmp_path_factory.mktemp("gw-cache")))
        cpu_native._reset_state()
        yield
    cpu_native._reset_state()
