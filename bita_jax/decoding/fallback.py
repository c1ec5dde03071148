"""Plain steps where the drafts do not pay: BiTA decoding that falls back to greedy's pace.

    engine = BitaGenerator(cfg, params, bita_params, tree, fallback=Fallback(break_even=1.49))

A BiTA step of T tokens costs more than a plain 1-token step (on the 2-core CPU an 8-token step
about 1.5x one), so it pays only while it emits more tokens per step than that ratio, its
break-even. Some texts are drafted poorly (a short answer, prose the masks never learned, a
long prompt whose cache makes every extra row dearer): there BiTA ran at 0.90x plain greedy
(docs/benchmarks.md, 2026-12-01). Measured with this switch, and why it is off by default:
docs/benchmarks.md, "Plain steps where the drafts do not pay".

With a `Fallback` the decode loop watches its own tree steps, on device, with no host round
trip: over each window of `window` tree steps it counts the tokens the live rows emitted. A
window below break-even switches the loop to plain steps for `pause` steps, then the tree is
tried again; every further window that loses doubles the pause (up to `max_pause`), a window
that wins resets it. The choice is the batch's (one forward per step for all rows).

Lossless either way. A plain step is `ar.ar_step`, the base model's own step. A tree step
verifies whatever drafts it holds, so the stale drafts that a pause leaves behind cost
acceptance, never correctness; the first tree step after a pause drafts afresh and is not
counted. The lookup branch's history and drafts are kept up to date through plain steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Fallback:
    """When the decode loop trades tree steps for plain ones (static: part of the compile key).

    break_even: tokens per tree step (per live row) below which plain steps are faster, i.e.
      the tree step's cost over a plain step's on this machine (`auto_tree.Choice.break_even`).
    window: tree steps per verdict; pause: plain steps after a losing window, doubled after
      each further loss up to max_pause.
    """

    break_even: float
    window: int = 32
    pause: int = 16
    max_pause: int = 64

    def __post_init__(self):
        if not self.break_even > 0:
            raise ValueError(f"fallback break-even must be > 0 tokens per step, got "
                             f"{self.break_even}")
        if not (self.window >= 1 and 1 <= self.pause <= self.max_pause):
            raise ValueError(f"fallback needs window >= 1 and 1 <= pause <= max-pause, got "
                             f"{self.window}, {self.pause}, {self.max_pause}")


@flax.struct.dataclass
class FallbackState:
    """The loop's bookkeeping, scalars shared by the batch. plain_left: plain steps to run
    before the tree is tried again (0: tree steps); pause: the next pause's length; window_steps:
    tree steps counted in this window (-1: the uncounted first step after a pause);
    window_tokens / window_rows: tokens the live rows emitted and live row-steps in it;
    plain_steps: plain steps run so far."""

    plain_left: jnp.ndarray
    pause: jnp.ndarray
    window_steps: jnp.ndarray
    window_tokens: jnp.ndarray
    window_rows: jnp.ndarray
    plain_steps: jnp.ndarray


def init_state(policy: Fallback | None) -> FallbackState:
    """Tree steps first, drafts fresh from the prefill (counted from the first step)."""
    zero = jnp.int32(0)
    pause = jnp.int32(policy.pause if policy is not None else 0)
    return FallbackState(plain_left=zero, pause=pause, window_steps=zero, window_tokens=zero,
                         window_rows=zero, plain_steps=zero)


def run_adaptive(tree_step: Callable, plain_step: Callable, policy: Fallback, state, max_steps):
    """`engine.run_steps` with the switch: until every row is done or `max_steps` more steps
    ran, a `lax.while_loop` of tree steps up to the window's verdict, then one of plain steps
    while a pause lasts (none after a winning window). Two loops in a loop, not a `lax.cond`
    per step: a conditional around the cache made XLA CPU copy it every step (6 ms of a 27 ms
    step at 300 cached tokens, 28 ms at 3,500). `state` is a `BitaState` (its `fallback`
    field is a `FallbackState`)."""
    stop_at = state.steps + max_steps

    def going(s):
        return (~jnp.all(s.done)) & (s.steps < stop_at)

    def tree_phase(s):
        return jax.lax.while_loop(lambda s: going(s) & (s.fallback.plain_left == 0),
                                  lambda s: _after_tree(policy, s, tree_step(s)), s)

    def plain_phase(s):
        return jax.lax.while_loop(lambda s: going(s) & (s.fallback.plain_left > 0),
                                  lambda s: _after_plain(policy, s, plain_step(s)), s)

    return jax.lax.while_loop(going, lambda s: plain_phase(tree_phase(s)), state)


def _after_tree(policy: Fallback, old, new):
    """`new` (after a tree step from `old`) with the window's count and, at its end, the
    verdict: a loss starts a pause (plain_left > 0), which ends the tree loop."""
    f = old.fallback
    live = ~old.done
    counted = f.window_steps >= 0
    tokens = f.window_tokens + jnp.where(
        counted, jnp.sum(jnp.where(live, new.num_new - old.num_new, 0)), 0)
    rows = f.window_rows + jnp.where(counted, jnp.sum(live), 0)
    steps = f.window_steps + 1
    full = steps >= policy.window
    loses = full & (tokens.astype(jnp.float32) < policy.break_even * rows.astype(jnp.float32))
    return new.replace(fallback=f.replace(
        plain_left=jnp.where(loses, f.pause, 0),
        pause=jnp.where(loses, jnp.minimum(2 * f.pause, policy.max_pause),
                        jnp.where(full, jnp.int32(policy.pause), f.pause)),
        window_steps=jnp.where(full, 0, steps), window_tokens=jnp.where(full, 0, tokens),
        window_rows=jnp.where(full, 0, rows)))


def _after_plain(policy: Fallback, old, new):
    """`new` (after a plain step) with the pause counted down; when it ends, the next tree
    step (stale drafts) goes uncounted."""
    f = old.fallback
    left = f.plain_left - 1
    return new.replace(fallback=f.replace(
        plain_left=left, window_steps=jnp.where(left == 0, -1, f.window_steps),
        plain_steps=f.plain_steps + 1))
