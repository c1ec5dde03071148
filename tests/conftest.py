"""Test-wide settings (set before jax initialises). XLA flags stay at their defaults: a faster
compile setting (`--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1`) crashed
XLA's CPU compiler on a scan in this jax version, so the suite does not use it."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
