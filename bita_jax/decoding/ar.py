"""Plain autoregressive decoding: one token per model call, greedy or sampled.

    result = Generator(cfg, params).generate(prompt_ids, max_new_tokens, sp, seed)

The reference that BiTA decoding must equal token for token (greedy), and the baseline of every
speed measurement. Prefill, loop and executables are the shared `engine`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax import models
from bita_jax.decoding import engine, prefill
from bita_jax.decoding.engine import DecodeState
from bita_jax.decoding.sampling import SamplingParams, sample
from bita_jax.models import kv_cache
from bita_jax.models.config import ModelConfig


def ar_prefill(cfg: ModelConfig, params, prompt, prompt_len, max_new, sp: SamplingParams | None,
               rng, *, capacity: int, out_slots: int, eos_ids: tuple[int, ...]) -> DecodeState:
    """Runs the prompts [B, Tp] (right-padded, lengths [B]) and emits the first token."""
    cache, first, rng = prefill.prefill(cfg, params, prompt, prompt_len, sp, rng,
                                       capacity=capacity)
    return engine.first_state(DecodeState, cache, first, rng, max_new, out_slots=out_slots,
                              eos_ids=eos_ids, step_tokens=1)


def ar_step(cfg: ModelConfig, params, state: DecodeState, max_new, sp: SamplingParams | None,
            eos_ids: tuple[int, ...]) -> DecodeState:
    """One plain decoding step: feed `last`, commit its KV, emit one token per live row
    (greedy when `sp` is None)."""
    b = state.last.shape[0]
    hidden, block_kv = models.forward(cfg, params, state.last[:, None],
                                      state.cache.length[:, None], np.ones((1, 1), bool),
                                      state.cache)
    live = (~state.done).astype(jnp.int32)
    cache = kv_cache.commit(state.cache, block_kv, jnp.zeros((b, 1), jnp.int32), live,
                            after=hidden)
    rng, key = jax.random.split(state.rng)
    token = sample(models.lm_logits(cfg, params, hidden[:, 0]), key, sp)
    state = state.replace(cache=cache, rng=rng, steps=state.steps + 1,
                          row_steps=state.row_steps + live)
    state, emitted = engine.emit(state, token[:, None], live, max_new, eos_ids)
    return engine.count_step(state, emitted, live)


class Generator(engine.Engine):
    """Plain (non-speculative) jitted generation for one model; executables cached per shape."""

    def prefill_fn(self):
        cfg = self.cfg

        def fn(params, prompt, lens, max_new, sp, rng, capacity, out_slots, eos_ids):
            return ar_prefill(cfg, params, prompt, lens, max_new, sp, rng, capacity=capacity,
                              out_slots=out_slots, eos_ids=eos_ids)

        return fn

    def decode_fn(self):
        cfg = self.cfg

        def decode(params, state, max_new, sp, max_steps, eos_ids):
            engine.TRACES[("ar", cfg)] += 1
            return engine.run_steps(lambda s: ar_step(cfg, params, s, max_new, sp, eos_ids),
                                    state, max_steps)

        return decode
