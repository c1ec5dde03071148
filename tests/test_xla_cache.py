"""The persistent cache of compiled XLA programs that loading a model turns on.

Each case runs in a fresh process: JAX decides whether a process uses the cache at its first
compile, and this test process has compiled long before.
"""

import json
import os
import subprocess
import sys

from bita_jax.checkpoints import model_cache

# Turns the cache on as loading does, compiles one program, and reports where the cache is,
# its files, and JAX's cache hit and miss events for that compile.
PROBE = """
import json, sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from bita_jax.checkpoints import model_cache
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
where = model_cache.enable_xla_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((32, 32))).block_until_ready()
print(json.dumps({"dir": None if where is None else str(where),
                  "files": sorted(p.name for p in where.iterdir()) if where else [],
                  "hits": sum("cache_hits" in e for e in events),
                  "misses": sum("cache_misses" in e for e in events)}))
"""


def _probe(tmp_path, **env_changes):
    env = {k: v for k, v in os.environ.items()
           if k not in (model_cache.NO_XLA_CACHE_ENV, model_cache.NO_CACHE_ENV,
                        "JAX_COMPILATION_CACHE_DIR")}
    env[model_cache.CACHE_ENV] = str(tmp_path / "cache")
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_compiled_program(tmp_path):
    first = _probe(tmp_path)
    assert first["dir"] == str(tmp_path / "cache" / "xla")
    assert first["files"] and first["hits"] == 0 and first["misses"] >= 1
    second = _probe(tmp_path)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert second["files"] == first["files"]


def test_off_switches_and_the_users_own_directory(tmp_path):
    off = _probe(tmp_path, **{model_cache.NO_XLA_CACHE_ENV: "1"})
    assert off == {"dir": None, "files": [], "hits": 0, "misses": 0}
    assert _probe(tmp_path, **{model_cache.NO_CACHE_ENV: "1"})["dir"] is None
    assert not (tmp_path / "cache").exists()
    own = tmp_path / "mine"
    theirs = _probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(own))
    assert theirs["dir"] == str(own) and theirs["files"]
    assert not (tmp_path / "cache").exists()
