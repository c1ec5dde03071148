"""One process of a multi-process decoding job on localhost (tests/test_multiprocess.py).

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=I \\
        python tests/multiprocess_decode.py DEVICES_PER_PROCESS DATA MODEL

Every process starts the distributed runtime (`distributed.initialize`, as the entry points
do), builds the same tiny model, decodes a ragged batch of 3 prompts, plain greedy and BiTA,
on a (DATA, MODEL) mesh spanning every process's devices, and again on its own first device
alone. It prints one JSON line: both results, what it holds of the KV cache, and its place in
the job.
"""

from __future__ import annotations

import json
import os
import sys

devices_per_process, data, model = (int(x) for x in sys.argv[1:4])
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    f"--xla_force_host_platform_device_count={devices_per_process}",
    "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"])

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bita_jax import distributed, models, sharding  # noqa: E402
from bita_jax.decoding import engine  # noqa: E402
from bita_jax.decoding.ar import Generator  # noqa: E402
from bita_jax.decoding.bita_step import BitaGenerator  # noqa: E402
from bita_jax.decoding.sampling import SamplingParams  # noqa: E402
from bita_jax.decoding.tree import Tree  # noqa: E402
from bita_jax.models import layers  # noqa: E402
from bita_jax.models.config import ModelConfig  # noqa: E402

# 6 query and 3 kv heads: a model axis of 3 splits both.
CFG = ModelConfig(arch="llama", vocab_size=256, hidden_size=48, intermediate_size=96,
                  num_layers=2, num_heads=6, num_kv_heads=3, head_dim=8, eos_token_ids=())
TREE = "upper-triangle:2+lookup:3"
MAX_NEW = 20


def main() -> dict:
    assert distributed.initialize(), "no multi-process job in the environment"
    engine.PREFILL_CHUNK, layers.CACHE_BLOCK = 8, 16  # the chunked prefill and block reads too
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 19, 11)]
    params = models.init_params(CFG, jax.random.key(1))
    bita = models.init_bita_params(CFG, models.BitaConfig(num_prefix=4, num_masks=3),
                                   jax.random.key(2))
    tree = Tree.make(TREE, 3)
    local = jax.local_devices()[0]
    one = jax.device_put((params, bita), local)
    with jax.default_device(local):
        want = {"greedy": Generator(CFG, one[0]).generate(prompts, MAX_NEW).tokens,
                "bita": BitaGenerator(CFG, one[0], one[1], tree).generate(prompts,
                                                                          MAX_NEW).tokens}
    mesh = sharding.make_mesh(data, model)
    plain = Generator(CFG, params, mesh=mesh)
    bita_gen = BitaGenerator(CFG, params, bita, tree, mesh=mesh)
    got = {"greedy": plain.generate(prompts, MAX_NEW).tokens,
           "bita": bita_gen.generate(prompts, MAX_NEW).tokens}
    start, _ = bita_gen.prepare(prompts, MAX_NEW, SamplingParams.greedy())
    k = start().cache.k
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "one_device": want, "mesh": got, "cache_shape": list(k.shape),
            "cache_shard": list(k.sharding.shard_shape(k.shape)),
            "cache_shards_here": len(k.addressable_shards)}


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
