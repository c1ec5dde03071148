"""Per-row cross-entropy of the LM head, computed in chunks of rows so [B, T, V] logits never exist.

    stats = token_stats(cfg, base_params, hidden, labels, chunk=1024, topk=5)
    stats.nll     # [B, T] -log p(label), 0 where label < 0 (differentiable)
    stats.hit     # [B, T] argmax == label (False where label < 0)
    stats.in_top  # [B, T] label among the top `topk` (None when topk == 1)

A SPACE step puts a next-token target on every real row: with SmolLM2's 49,152-token vocabulary a
batch of 8 x 384 rows holds 604 MB of fp32 logits, and the backward pass another softmax of the
same size. With `chunk` > 0 the positions go through the LM head `chunk` at a time, every batch
row together (a `lax.map` over position slices, so a batch sharded over 'data' stays sharded);
each slice's logits are reduced to a few numbers per row at once and rematerialised in the
backward pass (`jax.checkpoint`), so the live logits are [B, chunk, V]. The LM head runs once
more in the backward pass (4 products of its size instead of 3): on this 2-core CPU a SmolLM2
batch of 8 x 384 took 3.2 s for the head's loss and gradient in slices of 128 against 2.3 s in
one piece. `chunk` = 0, or at least T, runs in one piece.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bita_jax import models
from bita_jax.models.config import ModelConfig


class TokenStats(NamedTuple):
    """nll [B, T] (0 where unlabelled), hit [B, T] bool, in_top [B, T] bool or None."""

    nll: jax.Array
    hit: jax.Array
    in_top: jax.Array | None


def logit_stats(logits, labels, topk: int = 1) -> TokenStats:
    """`TokenStats` of logits [..., V] against labels [...] (< 0: no target)."""
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - gold, 0.0)
    hit = valid & (jnp.argmax(logits, axis=-1) == labels)
    in_top = None
    if topk > 1:
        _, top = jax.lax.top_k(logits, topk)
        in_top = valid & jnp.any(top == labels[..., None], axis=-1)
    return TokenStats(nll, hit, in_top)


def token_stats(cfg: ModelConfig, base_params, hidden, labels, *, chunk: int = 0,
                topk: int = 1) -> TokenStats:
    """`TokenStats` of the LM head over hidden [B, T, E] against labels [B, T], `chunk`
    positions of every row at a time (0: all at once; see the module doc)."""
    b, t, e = hidden.shape
    if chunk <= 0 or t <= chunk:
        return logit_stats(models.lm_logits(cfg, base_params, hidden), labels, topk)
    pad = -t % chunk
    n = (t + pad) // chunk
    # [B, T, E] -> [n, B, C, E]: the chunks split positions, never the (sharded) batch
    slices = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, e).swapaxes(0, 1)
    slice_labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
    slice_labels = slice_labels.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h, lab = args  # [B, C, E], [B, C]
        return logit_stats(models.lm_logits(cfg, base_params, h), lab, topk)

    out = jax.lax.map(one_chunk, (slices, slice_labels))  # each [n, B, C]
    return TokenStats(*(None if x is None else x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
                        for x in out))
