"""What a decode step costs on this machine, beside the floor of reading every weight once.

    rows = measure(cfg, params, bita_params, trees, tokens=(1, 2, 4, 8, 16, 32, 52))
    print(markdown_table(rows))

Three kinds of row, all measured in one run, engines taking turns over `repeats` rounds (the
fastest round is kept, since this box's single runs swing by about 15%):

  floor    jitted matrix-vector products over every weight matrix of the model (the same
           bytes a decode step reads, nothing else): one row, and T rows.
  forward  one cached forward of T new tokens under a causal block mask (after `context`
           cached tokens), the LM head on every row, the argmax, the cache commit: the step
           cost for any T.
  decode   the real decode loop of plain greedy (T = 1) and of each BiTA tree (T = its step
           tokens): `lax.while_loop` steps with the tree mask, cache commit, the LM head only on
           the rows it needs, drafting; ms per step over `steps` steps.

Each timed call runs `loops` forwards (or products) inside one jitted `fori_loop`, so dispatch
is not timed; the decode rows time whole loops of real steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax import models
from bita_jax.decoding import engine
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree
from bita_jax.models import kv_cache
from bita_jax.models.config import ModelConfig
from bita_jax.models.layers import product_t

TOKENS = (1, 2, 4, 8, 16, 32, 52)


@dataclasses.dataclass
class CostRow:
    """kind: floor | forward | decode; name: what ran; tokens: T (rows per product, step
    tokens); ms: the fastest time per call of one forward / step / set of products."""

    kind: str
    name: str
    tokens: int
    ms: float


def weight_matrices(params) -> list[jnp.ndarray]:
    """Every weight matrix a step multiplies by, as one [F, K] array (K = the input dim), as
    the unrolled layout stores them (`models.to_unrolled`; copies made once, outside timed
    calls): one per layer and projection, and the LM head (the [V, E] embedding when tied; an
    untied model's embedding is only gathered from, so it is left out). Norm scales and biases
    are skipped."""
    flat = models.to_unrolled(params)
    if "lm_head" in flat:
        flat = {k: v for k, v in flat.items() if k != "embed"}
    return [x for x in jax.tree.leaves(flat) if x.ndim == 2]


def weight_bytes(params) -> int:
    """Bytes of every weight matrix: what a decode step must read."""
    return sum(m.size * m.dtype.itemsize for m in weight_matrices(params))


def floor_fn(params, rows: int, loops: int) -> Callable[[], jax.Array]:
    """A call that runs `loops` rounds of products of `rows` rows with every weight matrix, in
    the form decoding uses on CPU (`layers.product_t`: W [F, K] @ x^T [K, rows]), and nothing
    else."""
    mats = weight_matrices(params)

    @jax.jit
    def run(mats):
        def body(i, acc):
            x = jnp.full((rows, max(m.shape[1] for m in mats)), 1e-3, jnp.float32) + acc
            total = acc
            for m in mats:
                y = product_t(m, x[:, : m.shape[1]].astype(m.dtype))
                total = total + y[0, 0].astype(jnp.float32) * 1e-9
            return total

        return jax.lax.fori_loop(0, loops, body, jnp.float32(0))

    return lambda: run(mats)


def forward_fn(cfg: ModelConfig, params, tokens: int, context: int, loops: int,
               bita_params=None) -> Callable[[], jax.Array]:
    """A call that runs `loops` cached forwards of `tokens` new tokens after `context` cached
    ones (batch 1): causal block mask, LM head on every row, argmax, the rows written into the
    cache (which stays at `context` tokens, sized as for a 128-token request). The cache is
    donated to each call and the next call takes the one it returns, so no call copies it (a
    copy of a 4,096-token cache would add its own time to every size alike)."""
    capacity = engine.cache_slots(engine.bucket(context) + 128 + engine.HEADROOM)
    mask = engine.causal_mask(tokens)

    @functools.partial(jax.jit, donate_argnums=1)
    def run(params, cache):
        def body(i, carry):
            cache, last = carry
            ids = jnp.broadcast_to(last, (1, tokens))
            positions = cache.length[:, None] + jnp.arange(tokens)[None, :]
            hidden, block_kv = models.forward(cfg, params, ids, positions, mask, cache,
                                              bita_params)
            pred = jnp.argmax(models.lm_logits(cfg, params, hidden), axis=-1).astype(jnp.int32)
            src = jnp.broadcast_to(jnp.arange(tokens), (1, tokens))
            cache = kv_cache.commit(cache, block_kv, src, jnp.zeros((1,), jnp.int32))
            return cache, pred[0, -1]

        return jax.lax.fori_loop(0, loops, body, (cache, jnp.int32(1)))

    cache = kv_cache.init_cache(cfg, 1, capacity, per_layer=models.is_unrolled(params))
    held = {"cache": cache.replace(length=jnp.full((1,), context, jnp.int32))}

    def call():
        held["cache"], last = run(params, held["cache"])
        return last

    return call


def decode_fn(gen: engine.Engine, prompt: Sequence[int], steps: int,
              step_tokens: int = 1) -> Callable[[], jax.Array]:
    """A call that runs `steps` real decode steps of `gen` (an engine built with no EOS ids,
    emitting at most `step_tokens` per step) after the prefill of `prompt`."""
    start, decode = gen.prepare([list(prompt)], steps * step_tokens + 1, SamplingParams.greedy(),
                                keep_state=True)
    state = start()
    return lambda: decode(state, steps).steps


def time_call(fn: Callable[[], jax.Array]) -> float:
    """Seconds of one call of `fn`, until its result is ready."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def measure(cfg: ModelConfig, params, bita_params=None, trees: Sequence[Tree] = (),
            tokens: Sequence[int] = TOKENS, context: int = 300, loops: int = 8, steps: int = 32,
            repeats: int = 3, log: Callable[[str], None] = print) -> list[CostRow]:
    """Times floors, forwards and real decode steps side by side (see the module docstring).

    Returns one `CostRow` per measurement, ms per forward / step / round of products.
    """
    calls: list[tuple[CostRow, Callable[[], jax.Array], int]] = []
    for t in sorted({1, *tokens}):
        calls.append((CostRow("floor", f"matvec x{t}", t, 0.0), floor_fn(params, t, loops), loops))
    for t in tokens:
        calls.append((CostRow("forward", f"forward T={t}", t, 0.0),
                      forward_fn(cfg, params, t, context, loops), loops))
    prompt = (np.arange(context) % 1000 + 100).tolist()
    calls.append((CostRow("decode", "plain greedy", 1, 0.0),
                  decode_fn(Generator(cfg, params, eos_ids=()), prompt, steps), steps))
    for tree in trees:
        gen = BitaGenerator(cfg, params, bita_params, tree, eos_ids=())
        calls.append((CostRow("decode", tree.name, tree.layout.num_tokens, 0.0),
                      decode_fn(gen, prompt, steps, tree.layout.max_depth + 1), steps))
    best = [float("inf")] * len(calls)
    log(f"compiling and warming {len(calls)} measurements ...")
    for _, fn, _ in calls:
        time_call(fn)
    for r in range(repeats):
        for i, (_, fn, n) in enumerate(calls):
            best[i] = min(best[i], time_call(fn) / n)
        log(f"  round {r + 1}/{repeats} done")
    rows = []
    for (row, _, _), secs in zip(calls, best):
        rows.append(dataclasses.replace(row, ms=secs * 1e3))
    return rows


def markdown_table(rows: Sequence[CostRow]) -> str:
    """Step cost against T, relative to the 1-token forward and to the 1-row floor."""
    one = {r.kind: r.ms for r in rows if r.tokens == 1 and r.kind in ("floor", "forward")}
    lines = ["| kind | what | T | ms | x 1-token forward | x 1-row floor |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rel = r.ms / one["forward"] if "forward" in one else float("nan")
        lines.append(f"| {r.kind} | {r.name} | {r.tokens} | {r.ms:.1f} | {rel:.2f} | "
                     f"{r.ms / one['floor']:.2f} |")
    return "\n".join(lines)
