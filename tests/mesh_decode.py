"""Decoding on a mesh of 8 simulated CPU devices against one device, run as a script.

    python tests/mesh_decode.py            # prints one JSON object (tests/test_mesh_decoding.py)

XLA_FLAGS must be set before JAX starts its backends, so this runs in its own process. For each
model (LLaMA with MHA and GQA, Falcon 7B-style MQA and the new decoder architecture) it decodes
a ragged batch of 3 prompts on one device, then on the meshes (data 1, model 8), (2, 4) and
(8, 1), and records the token ids of each and the per-device shard shapes of the KV cache, a
query kernel and the draft buffer. An 8-token prefill chunk and 16-slot cache blocks make the
tiny prompts run the chunked prefill and the block-wise cache reads; the batch of 3 is padded to
the data axis (2 and 8).
"""

from __future__ import annotations

import json
import os

# Fast compiles (the one-device reference is compiled with the same flags).
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"])

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bita_jax import models, sharding  # noqa: E402
from bita_jax.decoding import engine, memory_plan  # noqa: E402
from bita_jax.decoding.ar import Generator  # noqa: E402
from bita_jax.decoding.bita_step import BitaGenerator  # noqa: E402
from bita_jax.decoding.fallback import Fallback  # noqa: E402
from bita_jax.decoding.sampling import SamplingParams  # noqa: E402
from bita_jax.decoding.tree import Tree  # noqa: E402
from bita_jax.models import layers  # noqa: E402
from bita_jax.models.config import ModelConfig  # noqa: E402

LLAMA = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=8, num_kv_heads=8, head_dim=8, eos_token_ids=())
FALCON_NEW = ModelConfig(arch="falcon", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                         new_decoder_architecture=True, tie_word_embeddings=True,
                         attention_bias=True, mlp_bias=True, eos_token_ids=())
CONFIGS = {
    "llama_mha": LLAMA,
    "llama_gqa": LLAMA.replace(num_kv_heads=2),
    "falcon_mqa": FALCON_NEW.replace(new_decoder_architecture=False, num_kv_heads=1),
    "falcon_new": FALCON_NEW,
}
MESHES = ((1, 8), (2, 4), (8, 1))
TREE = "upper-triangle:2+lookup:3"  # the retrieval branch accepts drafts even when untrained
MAX_NEW = 24
SAMPLED = SamplingParams.make(0.8, 20, 0.95)


def _shard(x) -> list[int]:
    return list(x.sharding.shard_shape(x.shape))


def _bytes_on(tree, device) -> int:
    """Bytes of `tree`'s shards that live on `device`."""
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
               if shard.device == device)


def _runs(cfg, bita, prompts, sampled: bool) -> dict:
    """kind -> fn(base params) -> GenerationResult: greedy and BiTA, and with `sampled` both
    sampled too (the same seed gives the same draws on any mesh) and BiTA switching to plain
    steps (`Fallback`: its verdicts are the batch's, reduced over the data axis)."""
    tree = Tree.make(TREE, 3)
    runs = {"greedy": lambda p: Generator(cfg, p).generate(prompts, MAX_NEW),
            "bita": lambda p: BitaGenerator(cfg, p, bita, tree).generate(prompts, MAX_NEW)}
    if sampled:
        runs["sampled"] = lambda p: Generator(cfg, p).generate(prompts, MAX_NEW, SAMPLED, 3)
        runs["bita_sampled"] = lambda p: BitaGenerator(cfg, p, bita, tree).generate(
            prompts, MAX_NEW, SAMPLED, 3)
        fallback = Fallback(1.8, window=2, pause=2)
        runs["bita_fallback"] = lambda p: BitaGenerator(cfg, p, bita, tree,
                                                        fallback=fallback).generate(prompts,
                                                                                    MAX_NEW)
    return runs


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    engine.PREFILL_CHUNK, layers.CACHE_BLOCK = 8, 16
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 23, 11)]
    out: dict = {}
    for name, cfg in CONFIGS.items():
        params = models.init_params(cfg, jax.random.key(1))
        bita = models.init_bita_params(cfg, models.BitaConfig(num_prefix=4, num_masks=3),
                                       jax.random.key(2))
        runs = _runs(cfg, bita, prompts, sampled=name == "llama_gqa")
        single = {kind: run(params) for kind, run in runs.items()}
        case = {"one_device": {k: r.tokens for k, r in single.items()},
                "tokens_per_step": single["bita"].tokens_per_step,
                "plain_steps": {k: r.plain_steps for k, r in single.items()}}
        for data, model in MESHES:
            mesh = sharding.make_mesh(data, model)
            sharded = sharding.shard_params(params, sharding.param_shardings(cfg, mesh))
            got = {kind: run(sharded).tokens for kind, run in runs.items()}
            gen = BitaGenerator(cfg, sharded, bita, Tree.make(TREE, 3))
            start, _ = gen.prepare(prompts, MAX_NEW, SamplingParams.greedy())
            state = start()
            q = gen.params["layers"]["attn"]["q_proj"]["kernel"]
            slots = state.cache.k.shape[3]
            plan = memory_plan.decode_plan(cfg, data=data, model=model, batch=len(prompts),
                                           context=slots - engine.HEADROOM)
            device = jax.devices()[0]
            case[f"{data}x{model}"] = {
                "tokens": got,
                "cache_shape": list(state.cache.k.shape), "cache_shard": _shard(state.cache.k),
                "drafts_shape": list(state.drafts.shape), "drafts_shard": _shard(state.drafts),
                "q_shape": list(q.shape), "q_shard": _shard(q),
                "planned_bytes": plan["per_device_bytes"],
                "device0_bytes": {"base_params": _bytes_on(gen.params, device),
                                  "kv_cache": _bytes_on((state.cache.k, state.cache.v), device)},
                "bita_params_replicated": all(
                    x.sharding.is_fully_replicated for x in jax.tree.leaves(gen.bita_params)),
            }
        out[name] = case
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
