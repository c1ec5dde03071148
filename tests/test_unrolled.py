"""The unrolled layout (one params subtree and one cache buffer per layer, kernels stored
transposed: what decoding runs on CPU) computes what the scanned, stacked layout computes: hidden
states, block keys/values, logits and the committed cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding.engine import causal_mask, decode_layout
from bita_jax.models import kv_cache, layers
from tests.test_decode import FALCON, LLAMA


@pytest.mark.parametrize("cfg", [LLAMA, FALCON], ids=["llama", "falcon"])
def test_unrolled_forward_and_cache_equal_the_scanned_ones(cfg):
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(0)))
    flat = models.to_unrolled(params)
    assert models.is_unrolled(flat) and not models.is_unrolled(params)
    assert models.to_unrolled(flat) is flat
    assert sorted(k for k in flat if k.startswith("layers_")) == sorted(
        f"layers_{i}" for i in range(cfg.num_layers))
    # Every kernel [*in, *out] is stored as one [F, K] matrix; the rest is copied as it is.
    e, n, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn, stacked = flat["layers_1"]["attn"], params["layers"]["attn"]
    assert attn["q_proj"]["kernel"].shape == (n * d, e)
    assert attn["k_proj"]["kernel"].shape == (kv * d, e)
    assert attn["o_proj"]["kernel"].shape == (e, n * d)
    np.testing.assert_array_equal(attn["q_proj"]["kernel"],
                                  stacked["q_proj"]["kernel"][1].reshape(e, n * d).T)
    np.testing.assert_array_equal(attn["o_proj"]["kernel"],
                                  stacked["o_proj"]["kernel"][1].reshape(n * d, e).T)
    np.testing.assert_array_equal(flat["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  params["layers"]["mlp"]["up_proj"]["kernel"][1].T)
    if not cfg.tie_word_embeddings:
        np.testing.assert_array_equal(flat["lm_head"]["kernel"], params["lm_head"]["kernel"].T)
    np.testing.assert_array_equal(flat["embed"]["embedding"], params["embed"]["embedding"])
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=2, init_std=1.0),
                                 jax.random.key(1))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    caches = {}
    for name, p in (("stacked", params), ("unrolled", flat)):
        cache = kv_cache.init_cache(cfg, 2, 32, per_layer=models.is_unrolled(p))
        pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
        _, kv = models.forward(cfg, p, prompt, pos, causal_mask(9))
        cache = kv_cache.commit(cache, kv, jnp.broadcast_to(jnp.arange(9), (2, 9)),
                                jnp.asarray([9, 6]))
        tokens = jnp.asarray([[5, 7, cfg.vocab_size, cfg.vocab_size + 1]] * 2, jnp.int32)
        hidden, kv = models.forward(cfg, p, tokens, cache.length[:, None] + jnp.arange(4),
                                    causal_mask(4), cache, bp)
        cache = kv_cache.commit(cache, kv, jnp.asarray([[0, 1]] * 2), jnp.asarray([2, 1]))
        caches[name] = (hidden, kv, models.lm_logits(cfg, p, hidden), cache)
    (h0, kv0, l0, c0), (h1, kv1, l1, c1) = caches["stacked"], caches["unrolled"]
    np.testing.assert_allclose(h1, h0, atol=1e-5)
    np.testing.assert_allclose(l1, l0, atol=1e-4)
    for a, b in zip(kv1, kv0):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert isinstance(c1.k, tuple) and len(c1.k) == cfg.num_layers and c1.capacity == c0.capacity
    np.testing.assert_array_equal(c1.length, c0.length)
    np.testing.assert_allclose(jnp.stack(c1.k), c0.k, atol=1e-5)
    np.testing.assert_allclose(jnp.stack(c1.v), c0.v, atol=1e-5)


@pytest.mark.parametrize("cfg", [LLAMA, FALCON], ids=["llama", "falcon"])
def test_many_rows_take_the_plain_product_and_equal_the_scanned_layout(cfg):
    """A forward of 2 x 160 tokens (320 rows: `layers.product_t`'s plain form, and the per-head
    attention) on the unrolled layout equals the scanned one's, hidden states and keys/values."""
    b, t = 2, 160
    assert b * t >= layers.PLAIN_PRODUCT_ROWS
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(2)))
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    want, want_kv = models.forward(cfg, params, prompt, pos, causal_mask(t))
    got, got_kv = models.forward(cfg, models.to_unrolled(params), prompt, pos, causal_mask(t))
    assert np.abs(np.asarray(want)).max() > 1.0
    np.testing.assert_allclose(got, want, atol=1e-5)
    for a, w in zip(got_kv, want_kv):
        np.testing.assert_allclose(a, w, atol=1e-5)


def test_decoding_uses_the_unrolled_layout_on_cpu():
    params = models.init_params(LLAMA, jax.random.key(0))
    assert models.is_unrolled(decode_layout(params)) == (jax.default_backend() == "cpu")
