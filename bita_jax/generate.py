"""Jitted autoregressive generation: bucketed prefill, then a `lax.while_loop` of decode steps.

Shapes are static per (batch B, prompt bucket Tp, cache slots S, output slots O); prompt lengths,
max-new-tokens, sampling knobs and the seed are traced values, so a new prompt (within its bucket)
or a new max-new-tokens never recompiles. Compiled executables are kept per shape key.

The state (`DecodeState`) and the emission rule (`emit`) are shared with BiTA decoding, which
emits up to M + 1 tokens per step through the same function.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bita_jax import kv_cache, model
from bita_jax.config import ModelConfig
from bita_jax.sampling import SamplingParams, sample

HEADROOM = 8  # cache slots past the last committed token that a fixed-size block write may touch

# Compiled executables, shared by every Generator: key = (cfg, function, static args, shapes).
_EXECUTABLES: dict = {}
TRACES = collections.Counter()  # how often each decode loop was traced (tests prove "once")


class GenerationError(ValueError):
    """Bad generation request (e.g. prompt + max-new-tokens longer than the cache)."""


@flax.struct.dataclass
class DecodeState:
    """Everything a decode step reads and writes; a pytree carried by `lax.while_loop`.

    cache: committed keys/values; out: [B, O] emitted token ids; num_new: [B] emitted so far;
    done: [B] row finished (EOS or max-new-tokens); last: [B] newest emitted token, the next
    step's input; steps: scalar model calls after prefill; rng: PRNG key.
    drafts: [B, X] draft tokens for the next step (BiTA; width 0 for plain decoding).
    step_hist: [B, A + 1] decode steps of each row that emitted k = 0..A tokens (A: the most a
    step can emit, 1 for plain decoding); the prefill's token is not counted.
    """

    cache: kv_cache.KVCache
    out: jnp.ndarray
    num_new: jnp.ndarray
    done: jnp.ndarray
    last: jnp.ndarray
    steps: jnp.ndarray
    row_steps: jnp.ndarray
    rng: jax.Array
    drafts: jnp.ndarray
    step_hist: jnp.ndarray


def emit(state: DecodeState, tokens: jnp.ndarray, count: jnp.ndarray, max_new: jnp.ndarray,
         eos_ids: tuple[int, ...]):
    """Appends up to `count` of `tokens` [B, A] per row, stopping at EOS and at max_new.

    Returns (state with out/num_new/done/last updated, emitted [B] the number really appended).
    Finished rows append nothing.
    """
    b, a = tokens.shape
    j = jnp.arange(a)[None, :]
    is_eos = jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(
        tokens, bool)
    first_eos = jnp.min(jnp.where(is_eos & (j < count[:, None]), j, a), axis=1)
    emitted = jnp.minimum(jnp.minimum(count, first_eos + 1), max_new - state.num_new)
    emitted = jnp.where(state.done, 0, jnp.maximum(emitted, 0))
    slots = jnp.where(j < emitted[:, None], state.num_new[:, None] + j, state.out.shape[1])
    out = state.out.at[jnp.arange(b)[:, None], slots].set(tokens, mode="drop")
    num_new = state.num_new + emitted
    newest = jnp.take_along_axis(tokens, jnp.maximum(emitted - 1, 0)[:, None], axis=1)[:, 0]
    done = state.done | (first_eos < emitted) | (num_new >= max_new)
    last = jnp.where(emitted > 0, newest, state.last)
    return state.replace(out=out, num_new=num_new, done=done, last=last), emitted


def count_step(state: DecodeState, emitted: jnp.ndarray, live: jnp.ndarray) -> DecodeState:
    """Adds one step to `step_hist` for every live row [B], at its emitted count [B]."""
    rows = jnp.arange(emitted.shape[0])
    return state.replace(step_hist=state.step_hist.at[rows, emitted].add(live.astype(jnp.int32)))


def causal_mask(t: int) -> np.ndarray:
    return np.tril(np.ones((t, t), bool))


def prefill(cfg: ModelConfig, params, prompt, prompt_len, max_new, sp: SamplingParams, rng, *,
            capacity: int, out_slots: int, eos_ids: tuple[int, ...]) -> DecodeState:
    """Runs the prompts [B, Tp] (right-padded, lengths [B]) and emits the first token."""
    b, tp = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
    hidden, block_kv = model.forward(cfg, params, prompt, positions, causal_mask(tp))
    last_hidden = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)[:, 0]
    cache = kv_cache.init_cache(cfg, b, capacity)
    cache = kv_cache.commit(cache, block_kv, jnp.broadcast_to(jnp.arange(tp), (b, tp)), prompt_len)
    rng, key = jax.random.split(rng)
    first = sample(model.lm_logits(cfg, params, last_hidden), key, sp)
    state = DecodeState(
        cache=cache, out=jnp.zeros((b, out_slots), jnp.int32), num_new=jnp.zeros((b,), jnp.int32),
        done=max_new <= 0, last=first, steps=jnp.int32(0), row_steps=jnp.zeros((b,), jnp.int32),
        rng=rng, drafts=jnp.zeros((b, 0), jnp.int32), step_hist=jnp.zeros((b, 2), jnp.int32))
    state, _ = emit(state, first[:, None], jnp.ones((b,), jnp.int32), max_new, eos_ids)
    return state


def ar_step(cfg: ModelConfig, params, state: DecodeState, max_new, sp: SamplingParams,
            eos_ids: tuple[int, ...]) -> DecodeState:
    """One plain decoding step: feed `last`, commit its KV, emit one token per live row."""
    b = state.last.shape[0]
    hidden, block_kv = model.forward(cfg, params, state.last[:, None], state.cache.length[:, None],
                                     np.ones((1, 1), bool), state.cache)
    live = (~state.done).astype(jnp.int32)
    cache = kv_cache.commit(state.cache, block_kv, jnp.zeros((b, 1), jnp.int32), live)
    rng, key = jax.random.split(state.rng)
    token = sample(model.lm_logits(cfg, params, hidden[:, 0]), key, sp)
    state = state.replace(cache=cache, rng=rng, steps=state.steps + 1,
                          row_steps=state.row_steps + live)
    state, emitted = emit(state, token[:, None], live, max_new, eos_ids)
    return count_step(state, emitted, live)


def run_steps(step: Callable[[DecodeState], DecodeState], state: DecodeState, max_steps):
    """`lax.while_loop` of `step` until every row is done or `max_steps` more steps ran."""
    stop_at = state.steps + max_steps
    return jax.lax.while_loop(lambda s: (~jnp.all(s.done)) & (s.steps < stop_at), step, state)


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (>= minimum): the static shape a length is padded to."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass
class GenerationResult:
    """tokens: new token ids per prompt (EOS included when hit); steps: model calls after the
    prefill (the batch's loop count); row_steps: calls while each row was still live;
    step_hist: per row, how many of its steps emitted k = 0, 1, ... tokens."""

    tokens: list[list[int]]
    steps: int
    row_steps: list[int]
    seconds: float
    compile_seconds: float
    step_hist: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per decode step (bonus included; the prefill's token excluded)."""
        steps = sum(self.row_steps)
        return (self.new_tokens - len(self.tokens)) / steps if steps else 1.0


class Generator:
    """Plain (non-speculative) jitted generation for one model; executables cached per shape."""

    def __init__(self, cfg: ModelConfig, params, eos_ids: Sequence[int] | None = None,
                 max_cache: int | None = None):
        self.cfg, self.params = cfg, params
        self.eos_ids = tuple(int(e) for e in (eos_ids if eos_ids is not None
                                              else cfg.eos_token_ids))
        self.max_cache = max_cache or cfg.max_position_embeddings
        self._compile_seconds = 0.0

    # -- shapes ------------------------------------------------------------------------------
    def shapes(self, prompt_lens: Sequence[int], max_new_tokens: int) -> tuple[int, int, int]:
        """(Tp, S, O) static sizes for a request; raises GenerationError if it cannot fit."""
        longest = max(prompt_lens)
        if min(prompt_lens) < 1:
            raise GenerationError("empty prompt: at least one token is needed")
        if max_new_tokens < 1:
            raise GenerationError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        if longest + max_new_tokens > self.max_cache:
            raise GenerationError(
                f"prompt ({longest} tokens) + max-new-tokens ({max_new_tokens}) = "
                f"{longest + max_new_tokens} exceeds the cache size {self.max_cache}; "
                "shorten the prompt or lower --max-new-tokens")
        tp = bucket(longest)
        out_slots = bucket(max_new_tokens, 64)
        return tp, tp + out_slots + HEADROOM, out_slots

    def _executable(self, name, fn, *args, **static):
        key = (self.cfg, type(self).__name__, name, tuple(static.items()), tuple(
            (a.shape, str(a.dtype)) for a in jax.tree.leaves(args) if hasattr(a, "shape")))
        if key not in _EXECUTABLES:
            t0 = time.perf_counter()
            _EXECUTABLES[key] = jax.jit(fn, static_argnames=tuple(static)).lower(
                *args, **static).compile()
            self._compile_seconds += time.perf_counter() - t0
        return _EXECUTABLES[key]

    # -- public --------------------------------------------------------------------------------
    def prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sp: SamplingParams,
                seed: int = 0):
        """Pads the prompts and compiles (once per shape) prefill and decode; runs nothing.

        Returns (start, decode): `start()` runs the prefill and returns the first `DecodeState`;
        `decode(state, max_steps)` runs up to `max_steps` steps in one `lax.while_loop`.
        """
        tp, capacity, out_slots = self.shapes([len(p) for p in prompts], max_new_tokens)
        b = len(prompts)
        prompt = np.zeros((b, tp), np.int32)
        for i, p in enumerate(prompts):
            prompt[i, : len(p)] = p
        lens = np.asarray([len(p) for p in prompts], np.int32)
        max_new = np.full((b,), max_new_tokens, np.int32)
        params = self.run_params()
        args = (params, prompt, lens, max_new, sp, jax.random.key(seed))
        static = dict(capacity=capacity, out_slots=out_slots, **self.static_args())
        prefill_fn = self.prefill_fn()
        prefill_exe = self._executable("prefill", prefill_fn, *args, **static)
        state_shape = jax.eval_shape(lambda *a: prefill_fn(*a, **static), *args)
        decode_args = (params, state_shape, max_new, sp, np.int32(0))
        decode_exe = self._executable("decode", self.decode_fn(), *decode_args,
                                      **self.static_args())
        return (lambda: prefill_exe(*args),
                lambda state, max_steps: decode_exe(params, state, max_new, sp,
                                                    np.int32(max_steps)))

    # -- hooks that speculative decoding overrides ----------------------------------------------
    def run_params(self):
        """The params pytree passed (never closed over) to the jitted functions."""
        return self.params

    def static_args(self) -> dict:
        return dict(eos_ids=self.eos_ids)

    def prefill_fn(self):
        cfg = self.cfg

        def fn(params, prompt, lens, max_new, sp, rng, capacity, out_slots, eos_ids):
            return prefill(cfg, params, prompt, lens, max_new, sp, rng, capacity=capacity,
                           out_slots=out_slots, eos_ids=eos_ids)

        return fn

    def decode_fn(self):
        cfg = self.cfg

        def decode(params, state, max_new, sp, max_steps, eos_ids):
            TRACES[("ar", cfg)] += 1
            return run_steps(lambda s: ar_step(cfg, params, s, max_new, sp, eos_ids), state,
                             max_steps)

        return decode

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sp: SamplingParams | None = None, seed: int = 0,
                 on_tokens: Callable[[list[list[int]]], None] | None = None) -> GenerationResult:
        """Generates for a batch of token-id prompts.

        Args:
          prompts: B prompts of token ids (any lengths).
          max_new_tokens: cap on new tokens per prompt (EOS may stop a row earlier).
          sp: sampling knobs (default greedy).
          seed: PRNG seed for sampling.
          on_tokens: if given, called after every step with the tokens so far (streaming); the
            same compiled loop then runs one step per call.

        Returns:
          A `GenerationResult`; `seconds` excludes compilation (`compile_seconds`).
        """
        sp = sp or SamplingParams.greedy()
        self._compile_seconds = 0.0
        start, decode = self.prepare(prompts, max_new_tokens, sp, seed)
        t0 = time.perf_counter()
        state = start()
        if on_tokens is None:
            state = decode(state, max_new_tokens)
        else:
            while True:
                on_tokens(_tokens(state))
                if bool(jnp.all(state.done)):
                    break
                state = decode(state, 1)
        tokens = _tokens(state)
        seconds = time.perf_counter() - t0
        row_steps, step_hist = jax.device_get((state.row_steps, state.step_hist))
        return GenerationResult(tokens, int(state.steps), row_steps.tolist(), seconds,
                                self._compile_seconds, step_hist.tolist())


def _tokens(state: DecodeState) -> list[list[int]]:
    out, num = jax.device_get((state.out, state.num_new))
    return [row[:n].tolist() for row, n in zip(out, num)]
