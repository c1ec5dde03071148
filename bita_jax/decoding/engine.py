"""The decode engine shared by plain and BiTA decoding: state, emission, loop, executables.

    engine = SomeEngine(cfg, params)                 # `ar.Generator` or `bita_step.BitaGenerator`
    result = engine.generate(prompt_ids, max_new_tokens, sp, seed)

A decoding method supplies two jittable functions (`Engine.prefill_fn`, `Engine.decode_fn`): the
prefill turns right-padded prompts into the first `DecodeState` (through `prefill.prefill`: the
cache and the first token), the decode function runs `run_steps` of its step. Everything else is
here, with the prompt buckets and cache sizes the prefill runs at: the state and its `emit` rule
(a step appends 1..A tokens per row, stopping at EOS and max-new-tokens), the `lax.while_loop`,
static shapes and the compiled executables.

Shapes are static per (batch B, prompt bucket Tp, cache slots S, output slots O); prompt lengths,
max-new-tokens, sampling knobs and the seed are traced values, so a new prompt (within its bucket)
or a new max-new-tokens never recompiles. Compiled executables are kept per shape key in
`EXECUTABLES` (the `MAX_EXECUTABLES` most recently used); `TRACES` counts how often each decode
loop was traced (tests prove "once").
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bita_jax import models
from bita_jax.decoding import placement
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.models import kv_cache, layers
from bita_jax.models.config import ModelConfig

HEADROOM = 16  # cache slots past the last committed token that a fixed-size block write may touch

# Compiled executables, shared by every engine: key = (cfg, engine, function, static args, shapes
# [, shardings]), least recently used first. At most MAX_EXECUTABLES are kept: each holds its
# machine code in a few hundred memory maps (SmolLM2's: ~600), and a process that compiles
# shape after shape would otherwise reach the kernel's map limit (vm.max_map_count, 65,530),
# where the next compile aborts.
EXECUTABLES: dict = {}
MAX_EXECUTABLES = 32
TRACES = collections.Counter()  # traces of each decode loop, keyed by (kind, cfg[, tree]),
# and of the prefill, keyed by ("prefill", cfg)


def decode_layout(params):
    """The base params as decoding runs them: on CPU the unrolled layout (`models.to_unrolled`:
    one subtree per layer, read in place where the layer scan's weight slices cost a third or
    more of a step, and kernels stored transposed, so a step of 2 to 16 tokens costs little
    more than one), elsewhere as given."""
    return models.to_unrolled(params) if jax.default_backend() == "cpu" else params


class GenerationError(ValueError):
    """Bad generation request (e.g. prompt + max-new-tokens longer than the cache)."""


@flax.struct.dataclass
class DecodeState:
    """Everything a decode step reads and writes; a pytree carried by `lax.while_loop`.

    cache: committed keys/values; out: [B, O] emitted token ids; num_new: [B] emitted so far;
    done: [B] row finished (EOS or max-new-tokens); last: [B] newest emitted token, the next
    step's input; steps: scalar model calls after prefill; row_steps: [B] calls while each row
    was live; rng: PRNG key.
    step_hist: [B, A + 1] decode steps of each row that emitted k = 0..A tokens (A: the most a
    step can emit, 1 for plain decoding); the prefill's token is not counted.
    Methods that carry more (BiTA's drafts) subclass it.
    """

    # Fields shared by the batch, not per row: replicated on a mesh (`placement`).
    replicated: ClassVar[tuple[str, ...]] = ("steps", "rng")

    cache: kv_cache.KVCache
    out: jnp.ndarray
    num_new: jnp.ndarray
    done: jnp.ndarray
    last: jnp.ndarray
    steps: jnp.ndarray
    row_steps: jnp.ndarray
    rng: jax.Array
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


def run_steps(step: Callable[[DecodeState], DecodeState], state: DecodeState, max_steps):
    """`lax.while_loop` of `step` until every row is done or `max_steps` more steps ran."""
    stop_at = state.steps + max_steps
    return jax.lax.while_loop(lambda s: (~jnp.all(s.done)) & (s.steps < stop_at), step, state)


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (>= minimum): the static shape a length is padded to."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


# Prompts longer than this many tokens are prefilled chunk by chunk (`prefill`).
PREFILL_CHUNK = 256


def prompt_bucket(n: int) -> int:
    """The padded prompt length Tp for a prompt of n tokens: a power of two (at least 16) up
    to `PREFILL_CHUNK`; above, the next of 2^k and 1.5 * 2^k that is a multiple of the chunk
    (1024, 1536, 2048, 3072, ...). The prefill runs only the chunks the prompt needs, so
    padding costs at most one chunk of compute; coarse buckets keep compiles few."""
    if n <= PREFILL_CHUNK:
        return bucket(n)
    return min(size for k in range(64) for size in (1 << k, 3 << k)
               if size % PREFILL_CHUNK == 0 and size >= n)


def cache_slots(n: int) -> int:
    """The cache capacity S for n slots: n itself up to one attention block, else the next
    multiple of `layers.CACHE_BLOCK`, so attention reads only the blocks that hold tokens."""
    block = layers.CACHE_BLOCK
    return n if n <= block else -(-n // block) * block


def request_slots(longest: int, out_slots: int) -> int:
    """The cache capacity S for a request whose longest prompt has `longest` tokens.

    A prompt of up to `PREFILL_CHUNK` tokens: its bucket plus the output slots and `HEADROOM`
    (`cache_slots`), as its one-shot prefill writes the whole bucket. A longer one: what the
    request needs, longest + out_slots + `HEADROOM`, rounded up to a whole `layers.CACHE_BLOCK`,
    not its prompt bucket's size: a chunked prefill writes only the chunks the prompt fills
    (rounded up to the chunk, which the block is a multiple of), and a decode step reads the
    whole capacity once the cache is half full. So a 4,000-token prompt with 64 new tokens
    gets 4,096 slots, not the 4,608 of its 4,096-token bucket (a greedy step there 33.4 instead
    of 35.3 ms on this CPU); a bucket of long prompts compiles for up to three capacities."""
    if longest <= PREFILL_CHUNK:
        return cache_slots(prompt_bucket(longest) + out_slots + HEADROOM)
    block = layers.CACHE_BLOCK
    return -(-(longest + out_slots + HEADROOM) // block) * block


def causal_mask(t: int) -> np.ndarray:
    """[T, T] bool lower triangle."""
    return np.tril(np.ones((t, t), bool))


def first_state(state_type: type[DecodeState], cache, first, rng, max_new, *, out_slots: int,
                eos_ids: tuple[int, ...], step_tokens: int, **extra) -> DecodeState:
    """The state after the prefill, with its first token emitted.

    Args:
      state_type: `DecodeState` or a subclass; `extra` fills the subclass's fields.
      step_tokens: A, the most tokens one decode step can emit (sizes `step_hist`).
    """
    b = first.shape[0]
    state = state_type(
        cache=cache, out=jnp.zeros((b, out_slots), jnp.int32), num_new=jnp.zeros((b,), jnp.int32),
        done=max_new <= 0, last=first, steps=jnp.int32(0), row_steps=jnp.zeros((b,), jnp.int32),
        rng=rng, step_hist=jnp.zeros((b, step_tokens + 1), jnp.int32), **extra)
    state, _ = emit(state, first[:, None], jnp.ones((b,), jnp.int32), max_new, eos_ids)
    return state


# ---------------------------------------------------------------------------------------------
# The engine: static shapes, compiled executables, generation.


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
    plain_steps: int = 0

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per decode step (bonus included; the prefill's token excluded)."""
        steps = sum(self.row_steps)
        return (self.new_tokens - len(self.tokens)) / steps if steps else 1.0


class Engine:
    """Jitted generation for one model; a decoding method subclasses it and supplies
    `prefill_fn` and `decode_fn` (and `run_params` / `static_args` when it needs more)."""

    state_type: type[DecodeState] = DecodeState  # what the decode loop carries

    def __init__(self, cfg: ModelConfig, params, eos_ids: Sequence[int] | None = None,
                 max_cache: int | None = None, mesh: Mesh | None = None):
        """`params`: the base params, on one device or sharded on a mesh (`mesh`, or the mesh
        they are already sharded on): on a mesh of more than one device every executable is
        compiled with explicit shardings (`placement`) and the batch is padded to its 'data'
        axis."""
        self.cfg = cfg
        mesh = mesh if mesh is not None else placement.params_mesh(params)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        if self.mesh is None:
            self.params, self.shardings = decode_layout(params), None
        else:
            self.params = placement.place_params(cfg, params, self.mesh)
            self.shardings = placement.StateShardings(cfg, self.mesh)
        self.eos_ids = tuple(int(e) for e in (eos_ids if eos_ids is not None
                                              else cfg.eos_token_ids))
        context = cfg.max_position_embeddings
        if max_cache is not None and not 1 <= max_cache <= context:
            raise GenerationError(f"max-cache {max_cache} must be between 1 and the model's "
                                  f"context length {context}")
        # Bounds prompt + max-new-tokens; the cache is sized per request (`shapes`).
        self.max_cache = max_cache or context
        self._compile_seconds = 0.0

    # -- what a decoding method supplies --------------------------------------------------------
    def run_params(self):
        """The params pytree passed (never closed over) to the jitted functions."""
        return self.params

    def static_args(self) -> dict:
        """Static (hashable) keyword arguments of both jitted functions."""
        return dict(eos_ids=self.eos_ids)

    def prefill_fn(self) -> Callable[..., DecodeState]:
        """`fn(params, prompt, lens, max_new, sp, rng, capacity, out_slots, **static_args)`;
        `sp` is None for greedy decoding."""
        raise NotImplementedError

    def decode_fn(self) -> Callable[..., DecodeState]:
        """`fn(params, state, max_new, sp, max_steps, **static_args)`: a `run_steps` loop."""
        raise NotImplementedError

    # -- shapes and executables -------------------------------------------------------------------
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
        tp = prompt_bucket(longest)
        out_slots = bucket(max_new_tokens, 64)
        return tp, request_slots(longest, out_slots), out_slots

    def _executable(self, name, fn, args, static, shardings=None, donate: tuple[int, ...] = ()):
        """`fn` compiled for `args` (and `static` keyword args), once per shape key; on a mesh,
        `shardings` = (in_shardings, out_shardings) are part of the key and of the jit. The
        args at `donate` are donated (their buffers reused for the outputs)."""
        key = (self.cfg, type(self).__name__, name, tuple(static.items()), jax.tree.structure(args),
               (PREFILL_CHUNK, layers.CACHE_BLOCK), donate,
               tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args) if hasattr(a, "shape")))
        jit_kwargs = {"donate_argnums": donate} if donate else {}
        if shardings is not None:
            key += (jax.tree.structure(shardings), tuple(jax.tree.leaves(shardings)))
            jit_kwargs.update(in_shardings=shardings[0], out_shardings=shardings[1])
        exe = EXECUTABLES.pop(key, None)
        if exe is None:
            t0 = time.perf_counter()
            bound = functools.partial(fn, **static)  # static args close over the function
            exe = jax.jit(bound, **jit_kwargs).lower(*args).compile()
            self._compile_seconds += time.perf_counter() - t0
        EXECUTABLES[key] = exe  # the most recently used, last
        while len(EXECUTABLES) > MAX_EXECUTABLES:
            del EXECUTABLES[next(iter(EXECUTABLES))]
        return exe

    def _host_inputs(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, tp: int):
        """(prompt [B', Tp], lens [B'], max_new [B']) as host arrays; on a mesh B' pads B to a
        multiple of the 'data' axis with one-token rows that may emit nothing (max_new 0)."""
        b = len(prompts)
        per = 1 if self.mesh is None else self.shardings.data_size
        rows = -(-b // per) * per
        prompt = np.zeros((rows, tp), np.int32)
        for i, p in enumerate(prompts):
            prompt[i, : len(p)] = p
        lens = np.ones((rows,), np.int32)
        lens[:b] = [len(p) for p in prompts]
        max_new = np.zeros((rows,), np.int32)
        max_new[:b] = max_new_tokens
        return prompt, lens, max_new

    def prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sp: SamplingParams,
                seed: int = 0, keep_state: bool = False):
        """Pads the prompts and compiles (once per shape) prefill and decode; runs nothing.

        Returns (start, decode): `start()` runs the prefill and returns the first `DecodeState`;
        `decode(state, max_steps)` runs up to `max_steps` steps in one `lax.while_loop` and
        returns the next state. It consumes `state` (donated: the cache is updated in place, not
        copied per call, which a streamed generation makes once per step), unless
        `keep_state` (then a timing loop may decode the same state again).
        """
        tp, capacity, out_slots = self.shapes([len(p) for p in prompts], max_new_tokens)
        prompt, lens, max_new = self._host_inputs(prompts, max_new_tokens, tp)
        # Greedy passes no sampling knobs: its executables hold no sampling code (BiTA's exact
        # rejection sampling doubles a step's compile time). Sampled knobs stay traced values.
        sp = sp if float(sp.temperature) > 0 else None
        rng = jax.random.key(seed)
        params = self.run_params()
        static = dict(capacity=capacity, out_slots=out_slots, **self.static_args())
        prefill_sh = decode_sh = None
        if self.mesh is not None:  # explicit shardings; inputs as global arrays
            sh = self.shardings
            params_sh, state_sh = placement.shardings_of(params), sh.state(self.state_type)
            prompt, lens, max_new = (placement.global_array(x, sh.batch)
                                     for x in (prompt, lens, max_new))
            sp = jax.tree.map(lambda x: placement.global_array(x, sh.replicated), sp)
            rng = jax.random.wrap_key_data(
                placement.global_array(jax.random.key_data(rng), sh.replicated))
            scalar = sh.replicated
            prefill_sh = ((params_sh, sh.batch, sh.batch, sh.batch, scalar, scalar), state_sh)
            decode_sh = ((params_sh, state_sh, sh.batch, scalar, scalar), state_sh)
        args = (params, prompt, lens, max_new, sp, rng)
        prefill_exe = self._executable("prefill", self.prefill_fn(), args, static, prefill_sh)
        state_shape = prefill_exe.out_info  # the first DecodeState, as shapes (no new trace)
        decode_args = (params, state_shape, max_new, sp, np.int32(0))
        decode_exe = self._executable("decode", self.decode_fn(), decode_args, self.static_args(),
                                      decode_sh, donate=() if keep_state else (1,))

        def steps(max_steps):
            if self.mesh is None:
                return np.int32(max_steps)
            return placement.global_array(np.int32(max_steps), self.shardings.replicated)

        return (lambda: prefill_exe(*args),
                lambda state, max_steps: decode_exe(params, state, max_new, sp, steps(max_steps)))

    # -- generation -------------------------------------------------------------------------------
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
            while True:  # one fetch per step: the tokens so far and which rows are done
                out, num, done = placement.fetch((state.out, state.num_new, state.done))
                on_tokens(_rows(out, num)[: len(prompts)])
                if done.all():
                    break
                state = decode(state, 1)
        b = len(prompts)
        tokens = _tokens(state)[:b]
        seconds = time.perf_counter() - t0
        steps, row_steps, step_hist = placement.fetch((state.steps, state.row_steps,
                                                       state.step_hist))
        return GenerationResult(tokens, int(steps), row_steps[:b].tolist(), seconds,
                                self._compile_seconds, step_hist[:b].tolist(),
                                self.plain_steps(state))

    def plain_steps(self, state: DecodeState) -> int:
        """How many of the loop's steps were plain steps in a method that can switch to them
        (BiTA's `Fallback`); 0 here."""
        return 0


def _tokens(state: DecodeState) -> list[list[int]]:
    return _rows(*placement.fetch((state.out, state.num_new)))


def _rows(out: np.ndarray, num: np.ndarray) -> list[list[int]]:
    """The emitted ids of each row: out [B, O] up to num [B]."""
    return [row[:n].tolist() for row, n in zip(out, num)]
