"""The prefill: right-padded prompts into a fresh KV cache, and the first token.

    cache, first, rng = prefill(cfg, base_params, prompt, lens, sp, rng, capacity=S)

Prompts of up to `engine.PREFILL_CHUNK` tokens go through one forward; longer ones chunk by
chunk through the cached forward that decoding uses (`engine.prompt_bucket` and
`engine.request_slots` size them). Only real tokens run here, for every decoding method: BiTA's
first drafts come from its first step (`bita_step.bita_prefill`), so its first token costs what
plain greedy's does. The decoding methods (`ar`, `bita_step`) build their first
`engine.DecodeState` from what this returns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bita_jax import models
from bita_jax.decoding import engine
from bita_jax.decoding.sampling import SamplingParams, sample
from bita_jax.models import kv_cache
from bita_jax.models.config import ModelConfig


def prefill(cfg: ModelConfig, base_params, prompt, prompt_len, sp: SamplingParams | None, rng, *,
            capacity: int):
    """Runs the prompts [B, Tp] (right-padded, lengths [B]) into a fresh cache of `capacity`
    slots and samples the first token.

    Prompts of up to `engine.PREFILL_CHUNK` tokens go through one forward. Longer ones (Tp a
    multiple of the chunk, see `engine.prompt_bucket`) go chunk by chunk through the cached
    forward that decoding uses, as many chunks as the longest prompt needs (a traced count, so
    one compile serves every length of a bucket).

    Returns:
      (cache, first [B] int32, rng).
    """
    engine.TRACES[("prefill", cfg)] += 1
    b, _ = prompt.shape
    cache = kv_cache.init_cache(cfg, b, capacity, per_layer=models.is_unrolled(base_params))
    run = _chunked_prefill if prompt.shape[1] > engine.PREFILL_CHUNK else _one_shot_prefill
    cache, last_hidden = run(cfg, base_params, prompt, prompt_len, cache)
    rng, key = jax.random.split(rng)
    first = sample(models.lm_logits(cfg, base_params, last_hidden), key, sp)
    return cache, first, rng


def _one_shot_prefill(cfg, base_params, prompt, prompt_len, cache):
    """The whole padded prompt in one causal forward: (cache, last_hidden [B, E])."""
    b, tp = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
    hidden, block_kv = models.forward(cfg, base_params, prompt, positions, engine.causal_mask(tp),
                                      None)
    last_hidden = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)[:, 0]
    cache = kv_cache.commit(cache, block_kv, jnp.broadcast_to(jnp.arange(tp), (b, tp)), prompt_len)
    return cache, last_hidden


def _chunked_prefill(cfg, base_params, prompt, prompt_len, cache):
    """The prompts [B, Tp] in chunks of `PREFILL_CHUNK` tokens through the cached forward, up
    to the longest prompt: (cache holding every prompt, last_hidden [B, E] of each prompt's
    last token). A row whose prompt ended runs the later chunks too, but commits none of it.

    The cache needs the longest prompt rounded up to the chunk, which may be less than Tp
    (`engine.request_slots`): every chunk's write then stays inside it, a finished row's too (it
    writes at its length, below the last chunk's start)."""
    chunk = engine.PREFILL_CHUNK
    b, tp = prompt.shape
    if tp % chunk:  # engine shapes are multiples of the chunk (`prompt_bucket`); others padded
        prompt = jnp.pad(prompt, ((0, 0), (0, chunk - tp % chunk)))
    if cache.capacity % chunk:  # a chunk's fixed-size write must stay in the cache
        raise ValueError(f"a chunked prefill needs a cache of whole {chunk}-slot chunks, got "
                         f"{cache.capacity} slots")
    mask = engine.causal_mask(chunk)

    def run_chunk(i, carry):
        cache, last_hidden = carry
        start = i * chunk
        tokens = jax.lax.dynamic_slice_in_dim(prompt, start, chunk, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        hidden, block_kv = models.forward(cfg, base_params, tokens, positions, mask, cache)
        real = jnp.clip(prompt_len - start, 0, chunk)
        cache = kv_cache.commit(cache, block_kv, jnp.broadcast_to(jnp.arange(chunk), (b, chunk)),
                                real)
        last = prompt_len - 1 - start  # the last prompt token's index in this chunk, if there
        here = jnp.take_along_axis(hidden, jnp.clip(last, 0, chunk - 1)[:, None, None], axis=1)
        last_hidden = jnp.where(((last >= 0) & (last < chunk))[:, None], here[:, 0], last_hidden)
        return cache, last_hidden

    chunks = (jnp.max(prompt_len) + chunk - 1) // chunk
    last_hidden = jnp.zeros((b, cfg.hidden_size), cfg.jnp_compute_dtype)
    return jax.lax.fori_loop(0, chunks, run_chunk, (cache, last_hidden))
