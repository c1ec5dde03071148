"""Test-wide settings, set before jax initialises.

The suite is bound by XLA CPU compile time (three quarters of it, measured with a warm
persistent cache): it compiles at `--xla_backend_optimization_level=0`, which ran six
test_decode cases in 69 s against 111 s. Every comparison in a test (BiTA against greedy, a mesh
against one device, ours against HF within its tolerance) runs under the same flags, and
subprocesses inherit them. The persistent cache of compiled programs that loading turns on
(`model_cache.enable_xla_cache`) does not touch the user's cache in the suite: the run keeps
its own, in a fresh temporary directory that the xdist workers and the subprocesses tests start
(the CLI runs of SmolLM2) share and that the run removes at its end, so a program compiled by
one test process (taking 1 s or more) is loaded by the next that compiles the same one
(`tests/test_xla_cache.py` tests the cache itself, in fresh processes without this one). A
different fast setting (`--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1`)
crashed XLA's CPU compiler on a scan in this jax version; the suite does not use it in-process.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
os.environ["BITA_JAX_NO_XLA_CACHE"] = "1"  # model_cache.NO_XLA_CACHE_ENV (no import before jax)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the run's own cache (this process made it)
    _SUITE_XLA_CACHE = tempfile.mkdtemp(prefix="bita_jax_suite_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SUITE_XLA_CACHE
    atexit.register(shutil.rmtree, _SUITE_XLA_CACHE, True)


# Compiled XLA programs keep their machine code in memory maps; one process running the whole
# suite compiles thousands of them. Past this many maps (the kernel allows 65,530 by default) a
# test module's end drops every cached program, so no later compile fails for want of maps.
MAX_MAPS = 30_000


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _bounded_memory_maps():
    yield
    if _memory_maps() > MAX_MAPS:
        import gc

        import jax

        from bita_jax.decoding import engine

        engine.EXECUTABLES.clear()
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="module")
def fresh_gguf_cache(tmp_path_factory):
    """A fresh GGUF cache directory for one test module (never the user's ~/.cache)."""
    from bita_jax.checkpoints import model_cache

    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("bita_jax_cache")
        mp.setenv(model_cache.CACHE_ENV, str(path))
        mp.delenv(model_cache.NO_CACHE_ENV, raising=False)
        yield path


@pytest.fixture(scope="module")
def gguf_path():
    from bita_jax.checkpoints import gguf_loader

    return gguf_loader.find_smollm2_gguf()
