"""Token selection: greedy, and sampling with temperature / top-k / top-p.

All knobs are traced scalars (`SamplingParams`), so changing them never recompiles. The
filtering is written once as `filtered_logits` so that exact speculative sampling (rejection over a
draft tree) can use the very same target distribution as plain sampling.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bita_jax.models.layers import MASKED


class SamplingParams(NamedTuple):
    """temperature <= 0 means greedy; top_k <= 0 and top_p >= 1 disable those filters."""

    temperature: jnp.ndarray
    top_k: jnp.ndarray
    top_p: jnp.ndarray

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls.make()


def filtered_logits(logits: jnp.ndarray, sp: SamplingParams) -> jnp.ndarray:
    """Temperature, then top-k, then top-p (HF's order); [..., V] -> [..., V] with -1e30 holes."""
    vocab = logits.shape[-1]
    x = logits.astype(jnp.float32) / jnp.maximum(sp.temperature, 1e-6)
    desc = -jnp.sort(-x, axis=-1)
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, vocab), vocab)
    kth = jnp.take(desc, k - 1, axis=-1)[..., None]
    x = jnp.where(x < kth, MASKED, x)
    desc = jnp.where(jnp.arange(vocab) < k, desc, MASKED)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < sp.top_p  # always keeps the top token
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x < cutoff, MASKED, x)


def sample(logits: jnp.ndarray, rng: jax.Array, sp: SamplingParams | None) -> jnp.ndarray:
    """Picks one token per row of logits [B, V] -> [B] int32.

    `sp` None is greedy and compiles nothing else; otherwise greedy when temperature <= 0 (a
    traced choice: both branches are compiled).
    """
    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    if sp is None:
        return greedy(None)

    def draw(_):
        return jax.random.categorical(rng, filtered_logits(logits, sp), axis=-1).astype(jnp.int32)

    return jax.lax.cond(sp.temperature > 0, draw, greedy, None)
