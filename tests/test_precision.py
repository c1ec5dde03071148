"""Precision modes (issue 14): `bfloat16` keeps bf16 weights and computes in fp32, so BiTA stays
equal to plain greedy decoding of the same bf16 model; `bfloat16-pure` computes in bf16 too.

On SmolLM2 (`infer/bench_precision.py`, docs/benchmarks.md) the bf16 mode's identical count and
the pure mode's near ties are measured; here, on tiny random models, the mode's arithmetic is
pinned down exactly and BiTA's output is compared token for token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding import engine
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.tree import Tree
from bita_jax.eval import precision
from bita_jax.models.config import ConfigError, ModelConfig

HF_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 97, "max_position_embeddings": 512}
FALCON = ModelConfig(arch="falcon", vocab_size=89, hidden_size=32, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     new_decoder_architecture=True, tie_word_embeddings=True,
                     max_position_embeddings=512)
PROMPTS = [[5, 17, 33, 2, 80], [44], list(range(1, 21)), [7] * 8 + [60, 61, 62],
           [3, 9, 27, 81, 3, 9, 27, 81, 3]]
TREES = ["upper-triangle:3", "upper-triangle:2+lookup:3"]


def test_precision_names():
    cfg = ModelConfig.from_hf_config(HF_LLAMA, dtype="bfloat16")
    assert (cfg.dtype, cfg.compute_dtype) == ("bfloat16", "float32")
    assert cfg.jnp_dtype == jnp.bfloat16 and cfg.jnp_compute_dtype == jnp.float32
    pure = ModelConfig.from_hf_config(HF_LLAMA, dtype="bfloat16-pure")
    assert (pure.dtype, pure.compute_dtype) == ("bfloat16", None)
    assert pure.jnp_compute_dtype == jnp.bfloat16
    assert ModelConfig.from_hf_config(HF_LLAMA).compute_dtype is None
    for name in ("float32", "bfloat16", "bfloat16-pure"):
        assert ModelConfig.from_hf_config(HF_LLAMA, dtype=name).precision_name == name
    with pytest.raises(ConfigError, match="'bf16' not in"):
        ModelConfig.from_hf_config(HF_LLAMA, dtype="bf16")


def _modes(cfg: ModelConfig, seed: int = 3):
    """(fp32 config, fp32 params holding bf16-representable weights, bf16-weights config and
    its bf16 params): the same numbers, stored two ways."""
    cfg32 = cfg.replace(dtype="float32", compute_dtype=None)
    params = jax.tree.map(lambda x: (3 * x).astype(jnp.bfloat16),
                          models.init_params(cfg32, jax.random.key(seed)))
    cfg16 = cfg32.replace(dtype="bfloat16", compute_dtype="float32")
    return cfg32, jax.tree.map(lambda x: x.astype(jnp.float32), params), cfg16, params


@pytest.mark.parametrize("unrolled", [False, True], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_bf16_weights_compute_exactly_what_fp32_computes_on_them(arch, unrolled):
    """The mode upcasts each weight where it is used: logits equal those of the fp32 model whose
    weights are the same (bf16-representable) numbers."""
    base = ModelConfig.from_hf_config(HF_LLAMA) if arch == "llama" else FALCON
    cfg32, p32, cfg16, p16 = _modes(base)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    if unrolled:
        p32, p16 = models.to_unrolled(p32), models.to_unrolled(p16)
    tokens = jnp.asarray([PROMPTS[2]], jnp.int32)
    t = tokens.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    out = {}
    for name, cfg, params in (("fp32", cfg32, p32), ("bf16", cfg16, p16)):
        hidden, (k, _) = models.forward(cfg, params, tokens, positions, engine.causal_mask(t))
        assert hidden.dtype == k.dtype == jnp.float32  # activations and the cache's rows
        out[name] = np.asarray(models.lm_logits(cfg, params, hidden))
    np.testing.assert_allclose(out["bf16"], out["fp32"], rtol=0, atol=1e-5)
    cache = models.init_cache(cfg16, 1, 8)
    assert cache.k.dtype == jnp.float32


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_bita_equals_greedy_in_the_bf16_mode(arch, tree):
    base = ModelConfig.from_hf_config(HF_LLAMA) if arch == "llama" else FALCON
    cfg32, p32, cfg16, p16 = _modes(base)
    bita = models.init_bita_params(cfg16, models.BitaConfig(num_prefix=4, num_masks=3),
                                   jax.random.key(5))
    greedy = Generator(cfg16, p16).generate(PROMPTS, 40)
    got = BitaGenerator(cfg16, p16, bita, Tree.make(tree, 3)).generate(PROMPTS, 40)
    assert got.tokens == greedy.tokens
    assert len({tuple(t) for t in greedy.tokens}) == len(PROMPTS)  # varied texts
    if "lookup" in tree:
        assert got.tokens_per_step > 1.2  # drafts were accepted: the verify path really ran
    # and the bf16 mode decodes what fp32 decodes on the same weights
    assert Generator(cfg32, p32).generate(PROMPTS, 40).tokens == greedy.tokens


def test_compare_reports_identical_outputs_and_gaps_at_differences():
    cfg32, p32, cfg16, p16 = _modes(ModelConfig.from_hf_config(HF_LLAMA))
    bita = models.init_bita_params(cfg16, models.BitaConfig(num_prefix=4, num_masks=3),
                                   jax.random.key(5))
    report = precision.compare(Generator(cfg16, p16),
                               BitaGenerator(cfg16, p16, bita, Tree.make("chain", 3)),
                               PROMPTS[:3], 16)
    assert report["precision"] == "bfloat16" and report["identical"] == 3
    assert report["divergences"] == []
    # a "BiTA" that is really another model differs, and the gap is measured where it does
    other = Generator(cfg32, jax.tree.map(lambda x: x * 1.5, p32))
    report = precision.compare(Generator(cfg32, p32), other, PROMPTS[:3], 16)
    assert report["identical"] < 3
    for d in report["divergences"]:
        assert d["gap"] >= 0 and 0 <= d["token"] < 16
    assert "| float32 | 3 x 16 |" in precision.markdown([report])
    assert precision.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert precision.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert precision.first_difference([1, 2], [1, 2, 3]) == 2
