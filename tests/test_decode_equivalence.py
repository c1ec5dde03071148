"""Cached decoding == the full causal forward: token by token, ragged rows, every tree path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.models import kv_cache
from bita_jax.models.config import ModelConfig

TOL = 1e-4  # fp32 logits
V = 128
P = 9  # prompt tokens; equal to the tree size, so that prefill and tree steps share one compile

CONFIGS = {
    "llama_gqa_bias": ModelConfig(
        arch="llama", vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True, norm_eps=1e-6),
    "llama_mqa_tied": ModelConfig(
        arch="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=1, head_dim=8, tie_word_embeddings=True, rope_theta=5e5),
    "falcon_new_arch": ModelConfig(
        arch="falcon", vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, new_decoder_architecture=True,
        parallel_attn=True, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "falcon_sequential": ModelConfig(
        arch="falcon", vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=4, head_dim=16, parallel_attn=False),
}


def _random_params(cfg: ModelConfig, seed: int = 0):
    """Params with O(1) activations, so that a wrong mask or position shows far beyond TOL."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * noise)
        if name == "bias":
            return jnp.asarray(0.1 * noise)
        if name == "embedding":
            return jnp.asarray(0.5 * noise)
        return jnp.asarray(0.2 * noise)

    return jax.tree_util.tree_map_with_path(draw, models.abstract_params(cfg))


@functools.partial(jax.jit, static_argnums=0)
def _step(cfg, params, tokens, positions, mask, cache):
    """fp32 logits [B, T, V] and the block's (k, v)."""
    hidden, kv = models.forward(cfg, params, tokens, positions, mask, cache=cache)
    return models.lm_logits(cfg, params, hidden), kv


@functools.partial(jax.jit, static_argnums=0)
def _causal(cfg, params, tokens):
    """Plain causal forward, no cache: logits [B, T, V]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _ = models.forward(cfg, params, tokens, positions, jnp.tril(jnp.ones((t, t), bool)))
    return models.lm_logits(cfg, params, hidden)


def _full(cfg, params, seqs, rows=8, width=16):
    """Causal-forward logits of each 1-D sequence in `seqs`, as a list of [len, V] arrays.

    Sequences are right-padded into one [rows, width] batch so that every call compiles once per
    config (causal attention: padding after a token never changes its logits).
    """
    assert len(seqs) <= rows and max(len(x) for x in seqs) <= width
    batch = np.zeros((rows, width), np.int32)
    for i, x in enumerate(seqs):
        batch[i, :len(x)] = x
    logits = np.asarray(_causal(cfg, params, jnp.asarray(batch)))
    return [logits[i, :len(x)] for i, x in enumerate(seqs)]


def _prefill(cfg, params, prompt, lengths, capacity=32):
    """Runs the [B, P] prompt into an empty cache, committing `lengths[b]` tokens of row b."""
    b, p = prompt.shape
    cache = kv_cache.init_cache(cfg, b, capacity)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, kv = _step(cfg, params, prompt, positions, jnp.tril(jnp.ones((p, p), bool)), cache)
    src = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    return logits, kv_cache.commit(cache, kv, src, jnp.asarray(lengths, jnp.int32))


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_full_forward(name):
    cfg = CONFIGS[name]
    params = _random_params(cfg)
    rng = np.random.default_rng(1)
    b, p, steps = 2, P, 6
    prompt = rng.integers(0, V, (b, p)).astype(np.int32)
    new = rng.integers(0, V, (b, steps)).astype(np.int32)
    # Row 1 commits only 5 of its 9 prompt tokens: rows advance independently, and the 4 stale
    # slots past its length must stay invisible until decode overwrites them.
    lengths = np.array([p, 5])
    prefill_logits, cache = _prefill(cfg, params, prompt, lengths)
    decoded = []
    for j in range(steps):
        logits, kv = _step(cfg, params, new[:, j:j + 1], cache.length[:, None],
                           jnp.ones((1, 1), bool), cache)
        cache = kv_cache.commit(cache, kv, jnp.zeros((b, 1), jnp.int32), jnp.ones((b,), jnp.int32))
        decoded.append(logits[:, 0])
    decoded = np.stack(decoded, axis=1)  # [B, steps, V]
    np.testing.assert_array_equal(np.asarray(cache.length), lengths + steps)

    seqs = [np.concatenate([prompt[row, :lengths[row]], new[row]]) for row in range(b)]
    for row, want in enumerate(_full(cfg, params, seqs)):  # want: [n + steps, V]
        n = int(lengths[row])
        assert np.abs(want).max() > 1.0
        np.testing.assert_allclose(np.asarray(prefill_logits)[row, :n], want[:n], rtol=0, atol=TOL)
        np.testing.assert_allclose(decoded[row], want[n:], rtol=0, atol=TOL)


# A token tree after the prompt: two roots (parent -1 = the last prompt token), nodes listed so
# that parents come first. Leaves 3, 5, 6, 8 give four root-to-leaf paths of depth 1 to 4.
PARENTS = np.array([-1, 0, 0, 1, 1, 2, 4, -1, 7])


def _tree_layout(parents):
    """(mask [T, T] ancestor-or-self, depth [T], root-to-leaf paths)."""
    t = len(parents)
    mask = np.eye(t, dtype=bool)
    depth = np.zeros(t, np.int32)
    for i, par in enumerate(parents):
        if par >= 0:
            mask[i] |= mask[par]
            depth[i] = depth[par] + 1
    leaves = sorted(set(range(t)) - set(parents.tolist()))
    paths = [np.flatnonzero(mask[leaf])[np.argsort(depth[mask[leaf]])] for leaf in leaves]
    return mask, depth, paths


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tree_mask_equals_full_forward_per_path(name):
    cfg = CONFIGS[name]
    params = _random_params(cfg, seed=2)
    rng = np.random.default_rng(3)
    b, p = 2, P
    mask, depth, paths = _tree_layout(PARENTS)
    assert [len(x) for x in paths] == [3, 3, 4, 2]
    prompt = rng.integers(0, V, (b, p)).astype(np.int32)
    tree = rng.integers(0, V, (b, len(PARENTS))).astype(np.int32)
    _, cache = _prefill(cfg, params, prompt, [p, p])
    positions = jnp.broadcast_to(jnp.asarray(p + depth), tree.shape)
    tree_logits, _ = _step(cfg, params, tree, positions, jnp.asarray(mask), cache)
    tree_logits = np.asarray(tree_logits)

    seqs = [np.concatenate([prompt[row], tree[row, path]]) for path in paths for row in range(b)]
    wants = iter(_full(cfg, params, seqs))
    for path in paths:
        for row in range(b):
            want = next(wants)[p:]  # [len(path), V]
            assert np.abs(want).max() > 1.0
            np.testing.assert_allclose(tree_logits[row, path], want, rtol=0, atol=TOL)
