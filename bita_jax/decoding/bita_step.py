"""BiTA decoding: one jitted forward per step verifies the previous drafts and drafts the next tree.

A step feeds `[root | tree nodes | mask groups]` (see `tree.Layout`) at positions after each
row's cache, under the tree's [T, T] mask; mask rows alone see the BiTA prefix. Greedy
verification walks the tree: a node is accepted when it equals the base model's argmax at its
parent and all its ancestors were accepted; the deepest accepted node (or the root) is the
endpoint. The step emits the accepted tokens plus one bonus token (argmax at the endpoint), commits
the KV of the root and the accepted nodes into contiguous cache slots with a fixed-shape gather,
and takes the next drafts from the mask group hanging off the endpoint (top-k per level). A tree
with a retrieval branch (`+lookup:L`) fills that branch from the row's own history (`lookup.py`).
Every accepted or bonus token is the base model's own argmax given exactly the tokens before it,
so the output equals plain greedy decoding token for token.

Only the cache length and token values vary from step to step, so the `lax.while_loop` over
steps compiles once per (model, tree, batch, cache capacity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bita_jax import models
from bita_jax.decoding import ar, dynamic_tree, engine, lookup, ngram, placement, prefill
from bita_jax.decoding.engine import HEADROOM, DecodeState, GenerationError
from bita_jax.decoding.fallback import Fallback, FallbackState, init_state, run_adaptive
from bita_jax.decoding.sampling import SamplingParams, filtered_logits
from bita_jax.decoding.tree import Layout, Tree
from bita_jax.models import kv_cache
from bita_jax.models.config import ModelConfig

NO_DRAFT = lookup.NO_DRAFT


@flax.struct.dataclass
class BitaState(DecodeState):
    """`DecodeState` plus drafts: [B, Nn] the tree's node tokens for the next step, history:
    [B, S] every token by position (prompt and output; [B, 0] without a lookup branch),
    node_paths: [B, Nn] a dynamic tree's nodes as candidate indices ([B, 0] for a static tree),
    and fallback: the scalars of the switch to plain steps (`fallback.FallbackState`)."""

    replicated: ClassVar[tuple[str, ...]] = DecodeState.replicated + ("fallback",)

    drafts: jnp.ndarray
    history: jnp.ndarray
    node_paths: jnp.ndarray
    fallback: FallbackState


def next_drafts(logits, lay: Layout, group_rows, shift, retrieved=None):
    """Draft tokens [B, Nn] of the next tree from one mask group per row.

    logits: [B, T, V] of the step's rows; group_rows: [B, M] rows of the chosen group; shift:
    [B] mask offset; retrieved: [B, L] the lookup branch's tokens (when the tree has one).
    """
    rows = jnp.take_along_axis(logits, group_rows[:, :, None], axis=1)  # [B, M, V]
    top = jax.lax.top_k(rows, lay.max_rank)[1].astype(jnp.int32)  # [B, M, R]
    level = lay.node_level[None, :] + shift[:, None]  # [B, Nn] which mask drafts each node
    picked = jnp.take_along_axis(top, jnp.minimum(level, lay.num_masks - 1)[:, :, None], axis=1)
    # picked: [B, Nn, R] -> the node's rank
    rank = jnp.broadcast_to(np.maximum(lay.node_rank, 0), level.shape)
    tokens = jnp.take_along_axis(picked, rank[:, :, None], axis=2)[:, :, 0]
    tokens = jnp.where(level < lay.num_masks, tokens, NO_DRAFT)
    return with_lookup(tokens, lay, retrieved) if lay.lookup_nodes else tokens


def with_lookup(drafts, lay: Layout, retrieved):
    """drafts [B, Nn] with the lookup branch's nodes set to retrieved [B, L]."""
    return jnp.where(lay.node_rank < 0, jnp.take(retrieved, lay.node_level, axis=1), drafts)


def retrieve(tree: Tree, history, newest, table=None):
    """The lookup branch's tokens [B, L] (None without one), from history [B, S] up to position
    newest [B], and the adapter's n-gram table (`ngram.NgramTable` or None)."""
    if not tree.lookup:
        return None
    return lookup.lookup_drafts(history, newest, tree.lookup, tree.lookup_ngram, table)


def bita_prefill(cfg: ModelConfig, params, prompt, prompt_len, max_new, sp: SamplingParams | None,
                 rng, *, capacity: int, out_slots: int, eos_ids: tuple[int, ...],
                 tree: Tree, fallback: Fallback | None = None) -> BitaState:
    """Prompts [B, Tp] through plain greedy's prefill: the first token, and no mask drafts yet.

    The first step's mask nodes hold NO_DRAFT (never accepted; a lookup branch holds what the
    prompt offers), and its mask groups draft the second step's tree. So the first token costs
    what plain greedy's does, with no mask rows (and no BiTA prefix) in the prefill, for about
    one step's worth of unused mask drafts per request."""
    base_params, _, table = params
    lay = tree.layout
    b = prompt.shape[0]
    cache, first, rng = prefill.prefill(cfg, base_params, prompt, prompt_len, sp, rng,
                                        capacity=capacity)
    history = (lookup.init_history(prompt, prompt_len, first, capacity) if tree.lookup
               else jnp.zeros((b, 0), jnp.int32))
    drafts = jnp.full((b, lay.num_nodes), NO_DRAFT, jnp.int32)
    if tree.dynamic:  # the first candidates, shallow first: a valid tree of NO_DRAFT nodes
        node_paths = jnp.broadcast_to(jnp.arange(tree.dynamic, dtype=jnp.int32), (b, tree.dynamic))
    else:
        if lay.lookup_nodes:
            drafts = with_lookup(drafts, lay, retrieve(tree, history, prompt_len, table))
        node_paths = jnp.zeros((b, 0), jnp.int32)
    return engine.first_state(BitaState, cache, first, rng, max_new, out_slots=out_slots,
                              eos_ids=eos_ids, step_tokens=lay.max_depth + 1, drafts=drafts,
                              history=history, node_paths=node_paths,
                              fallback=init_state(fallback))


def verify_greedy(pred, drafts, lay: Layout):
    """Greedy tree verification.

    Args:
      pred: [B, 1 + Nn] argmax of the base model at the root and every node row.
      drafts: [B, Nn] node tokens.

    Returns:
      endpoint [B] (row of the deepest accepted node, 0 = root) and its depth [B].
    """
    parent_pred = jnp.take(pred, lay.node_parent_row, axis=1)  # [B, Nn]
    wrong = ((drafts != parent_pred) | (drafts < 0)).astype(jnp.float32)
    accepted = (wrong @ lay.ancestors.T) == 0  # every ancestor-or-self matched
    depth = jnp.where(accepted, lay.node_depth, 0)
    best = jnp.argmax(depth, axis=1)
    best_depth = jnp.max(depth, axis=1)
    return jnp.where(best_depth > 0, best + 1, 0).astype(jnp.int32), best_depth.astype(jnp.int32)


def node_key(rng, level: int, j: int):
    """The key of the acceptance draw for child `j` at tree level `level`.

    Two `fold_in`s: no two (level, j) pairs fold in the same data, however many children a node
    has (a single `fold_in(rng, level * 64 + j)` gave level 0 child 64 and level 1 child 0 the
    same key). Levels fold in from 1, so the bonus draw (`bonus_key`, 0) shares no input either.
    """
    return jax.random.fold_in(jax.random.fold_in(rng, level + 1), j)


def bonus_key(rng):
    """The key of the bonus-token draw of `verify_sampling`."""
    return jax.random.fold_in(rng, 0)


def verify_sampling(logits, drafts, lay: Layout, sp: SamplingParams, rng):
    """Exact speculative sampling over the tree (recursive rejection, SpecInfer / EAGLE style).

    The drafts are deterministic (top-k), so trying child c of the current node accepts it with
    probability p(c) / sum(p); a rejection zeroes p(c) (the residual of p minus a one-hot draft)
    and the next sibling is tried. When every child is rejected, or the walk reaches a leaf, the
    bonus token is drawn from what is left of p. Each emitted token is thereby distributed as
    the base model's (filtered) sampling distribution given the tokens before it.

    Args:
      logits: [B, 1 + Nn, V] base-model logits at the root and node rows.
      drafts: [B, Nn] node tokens (NO_DRAFT never accepted).

    Returns:
      endpoint [B] row of the last accepted node (0 = root), its depth [B], bonus token [B].
    """
    probs = jax.nn.softmax(filtered_logits(logits, sp), axis=-1)  # [B, 1 + Nn, V]
    b = logits.shape[0]
    rows = jnp.arange(b)
    cur = jnp.zeros((b,), jnp.int32)
    p = probs[:, 0]
    walking = jnp.ones((b,), bool)
    depth = jnp.zeros((b,), jnp.int32)
    node_tokens = jnp.concatenate([jnp.full((b, 1), NO_DRAFT, jnp.int32), drafts], axis=1)
    for level in range(lay.max_depth):
        moved = jnp.zeros((b,), bool)
        for j in range(lay.children.shape[1]):
            child = jnp.take(lay.children[:, j], cur)  # [B]
            tok = jnp.take_along_axis(node_tokens, jnp.maximum(child, 0)[:, None], axis=1)[:, 0]
            valid = walking & ~moved & (child >= 0) & (tok >= 0)
            tok = jnp.maximum(tok, 0)
            u = jax.random.uniform(node_key(rng, level, j), (b,))
            accept = valid & (u * jnp.sum(p, axis=-1) < p[rows, tok])
            reject = valid & ~accept
            p = jnp.where(accept[:, None], probs[rows, jnp.maximum(child, 0)],
                          jnp.where(reject[:, None] & (jnp.arange(p.shape[-1]) == tok[:, None]),
                                    0.0, p))
            cur = jnp.where(accept, child, cur)
            moved = moved | accept
        depth = depth + moved
        walking = walking & moved
    bonus = jax.random.categorical(bonus_key(rng), jnp.log(p), axis=-1)
    return cur, depth, bonus.astype(jnp.int32)


def bita_step(cfg: ModelConfig, tree: Tree, params, state: BitaState, max_new,
              eos_ids: tuple[int, ...], sp: SamplingParams | None = None) -> BitaState:
    """One BiTA step: verify `state.drafts`, emit 1..M+1 tokens, draft the next tree.

    Greedy verification unless `sp` has temperature > 0 (then exact rejection sampling).
    `params`: (base params, BiTA params, the n-gram table or None), as `run_params` passes them.
    """
    if tree.dynamic:
        return dynamic_step(cfg, tree, params, state, max_new, eos_ids)
    lay = tree.layout
    nn_ = state.drafts.shape[1]
    n = state.cache.length
    tokens, logits, block_kv = step_forward(cfg, params, state, lay.mask_ids, lay.offsets,
                                            lay.mask)
    node_logits = logits[:, : 1 + nn_]  # [B, 1 + Nn, V]
    rng, key = jax.random.split(state.rng)

    def greedy(_):
        pred = jnp.argmax(node_logits, axis=-1).astype(jnp.int32)
        endpoint, depth = verify_greedy(pred, state.drafts, lay)
        return endpoint, depth, jnp.take_along_axis(pred, endpoint[:, None], axis=1)[:, 0]

    def sampled(_):
        return verify_sampling(node_logits, state.drafts, lay, sp, key)

    if sp is None:
        endpoint, depth, bonus = greedy(None)
    else:
        endpoint, depth, bonus = jax.lax.cond(sp.temperature > 0, sampled, greedy, None)
    path = jnp.take(lay.path_rows, endpoint, axis=0)  # [B, D + 1] rows root..endpoint
    emitted, count, cache = accept(state, tokens, block_kv, path, depth, bonus)
    history = state.history
    if tree.lookup:
        history = lookup.append(history, n, emitted, count)
    group_rows = jnp.take(lay.group_rows, jnp.take(lay.endpoint_group, endpoint), axis=0)
    drafts = next_drafts(logits, lay, group_rows, jnp.take(lay.endpoint_shift, endpoint),
                         retrieve(tree, history, cache.length, params[2]))
    return advance(state, cache, emitted, depth, {"drafts": drafts}, max_new, eos_ids, rng=rng,
                   history=history)


def plain_step(cfg: ModelConfig, tree: Tree, params, state: BitaState, max_new,
               eos_ids: tuple[int, ...], sp: SamplingParams | None = None) -> BitaState:
    """A plain 1-token step of the base model (`ar.ar_step`) on BiTA's state, for `Fallback`.
    The mask drafts are left as they are (stale); a lookup branch's history gets the new token
    and its drafts are looked up afresh, so the first tree step after a pause can accept them."""
    base_params, _, table = params
    new = ar.ar_step(cfg, base_params, state, max_new, sp, eos_ids)
    if not tree.lookup:
        return new
    count = new.num_new - state.num_new
    history = lookup.append(state.history, state.cache.length, new.last[:, None], count)
    drafts = with_lookup(new.drafts, tree.layout,
                         retrieve(tree, history, new.cache.length, table))
    return new.replace(history=history, drafts=drafts)


def step_forward(cfg: ModelConfig, params, state: BitaState, mask_ids, offsets, mask):
    """The step's forward: tokens [B, T] (`[root | nodes | masks]`), logits [B, T, V] and the
    block's keys/values. offsets [T] or [B, T], mask [T, T] or [B, T, T] (static or per row)."""
    base_params, bita_params, _ = params
    b = state.drafts.shape[0]
    masks = jnp.broadcast_to(cfg.vocab_size + mask_ids, (b, mask_ids.shape[0]))
    tokens = jnp.concatenate(
        [state.last[:, None], jnp.maximum(state.drafts, 0), masks], axis=1)  # [B, T]
    positions = state.cache.length[:, None] + offsets
    hidden, block_kv = models.forward(cfg, base_params, tokens, positions, mask, state.cache,
                                      bita_params)
    # One LM head over every row (nodes and mask groups): the weight is read once, and on CPU
    # (`layers.product_t`) extra rows cost little.
    return tokens, models.lm_logits(cfg, base_params, hidden), block_kv


def accept(state: BitaState, tokens, block_kv, path, depth, bonus):
    """The accepted path [B, X] (rows root..endpoint) of depth [B] plus the bonus token [B]:
    the emitted tokens [B, X], how many each live row emits [B], and the cache with the root and
    the accepted nodes committed (after the verification: `kv_cache.commit`'s `after`)."""
    accepted_tokens = jnp.take_along_axis(tokens, path[:, 1:], axis=1)  # [B, X - 1]
    j = jnp.arange(path.shape[1])[None, :]
    emitted = jnp.where(j < depth[:, None],
                        jnp.concatenate([accepted_tokens, bonus[:, None]], axis=1),
                        bonus[:, None])
    count = jnp.where(~state.done, depth + 1, 0)
    return emitted, count, kv_cache.commit(state.cache, block_kv, path, count, after=bonus)


def advance(state: BitaState, cache, emitted, depth, next_tree: dict, max_new, eos_ids,
            **fields):
    """The next state: the new cache and `fields`, the next tree's arrays (`next_tree`, e.g.
    drafts [B, Nn]) for the live rows only, the emitted tokens appended (`engine.emit`), the step
    counted."""
    live = ~state.done
    kept = {k: jnp.where(live[:, None], v, getattr(state, k)) for k, v in next_tree.items()}
    state = state.replace(cache=cache, steps=state.steps + 1, row_steps=state.row_steps + live,
                          **kept, **fields)
    state, count = engine.emit(state, emitted, depth + 1, max_new, eos_ids)
    return engine.count_step(state, count, live)


def dynamic_step(cfg: ModelConfig, tree: Tree, params, state: BitaState, max_new,
                 eos_ids: tuple[int, ...]) -> BitaState:
    """`bita_step` for a dynamic tree (greedy): the same forward, verification, commit and
    drafting, over the per-row layout of each row's chosen nodes (`dynamic_tree.row_layout`)."""
    lay = tree.layout  # the skeleton: static sizes and mask ids only
    d, x = tree.num_masks, lay.max_depth + 1
    nn_ = state.drafts.shape[1]
    rows = dynamic_tree.row_layout(state.node_paths, d, tree.dynamic_top_k)
    tokens, logits, block_kv = step_forward(cfg, params, state, lay.mask_ids, rows.offsets,
                                            rows.mask)
    pred = jnp.argmax(logits[:, : 1 + nn_], axis=-1).astype(jnp.int32)  # [B, 1 + Nn]
    endpoint, depth = dynamic_tree.verify(pred, state.drafts, rows)
    bonus = jnp.take_along_axis(pred, endpoint[:, None], axis=1)[:, 0]
    path = dynamic_tree.path_rows(rows, endpoint, d)[:, :x]  # [B, X] rows root..endpoint
    emitted, _, cache = accept(state, tokens, block_kv, path, depth, bonus)
    group = dynamic_tree.group_rows(endpoint, nn_, d)  # [B, D]
    group_logits = jnp.take_along_axis(logits, group[:, :, None], axis=1)
    node_paths, drafts = dynamic_tree.select(group_logits, tree.dynamic, tree.dynamic_top_k)
    return advance(state, cache, emitted, depth, {"drafts": drafts, "node_paths": node_paths},
                   max_new, eos_ids)


class BitaGenerator(engine.Engine):
    """Lossless BiTA generation (greedy, or exact sampling) with the same API as `Generator`;
    on a mesh the BiTA params (and the n-gram table) are replicated."""

    state_type = BitaState

    def __init__(self, cfg: ModelConfig, params, bita_params, tree: Tree,
                 eos_ids: Sequence[int] | None = None, max_cache: int | None = None,
                 mesh=None, fallback: Fallback | None = None,
                 ngram_table: ngram.NgramTable | None = None):
        """`fallback`: switch to plain steps where the drafts do not pay (`fallback.py`);
        None: tree steps throughout. `ngram_table`: the adapter's table (`ngram.load`), which a
        retrieval branch consults where prompt lookup finds no 2-gram; None: prompt lookup
        only."""
        super().__init__(cfg, params, eos_ids, max_cache, mesh)
        self.fallback = fallback
        masks = bita_params["mask_embed"].shape[0]
        if tree.num_masks > masks:
            raise GenerationError(f"tree {tree.name!r} needs {tree.num_masks} masks but the "
                                  f"adapter has {masks}: build the tree for M={masks}")
        depth = tree.layout.max_depth
        if depth + 1 > HEADROOM:  # a step commits up to D + 1 slots past the length
            raise GenerationError(f"tree {tree.name!r} is {depth} nodes deep: trees deeper than "
                                  f"{HEADROOM - 1} need more cache headroom")
        table = None
        if ngram_table is not None and tree.lookup:  # only a retrieval branch reads it
            table = jax.tree.map(jnp.asarray, ngram_table)
        if self.mesh is not None:
            bita_params, table = placement.replicate((bita_params, table), self.mesh)
        self.bita_params, self.tree, self.ngram_table = bita_params, tree, table

    def run_params(self):
        return (self.params, self.bita_params, self.ngram_table)

    def prepare(self, prompts, max_new_tokens, sp, seed=0, keep_state=False):
        if self.tree.dynamic and float(sp.temperature) > 0:
            raise GenerationError(f"tree {self.tree.name!r} is dynamic, which decodes greedily "
                                  "only: sample with a static tree (e.g. upper-triangle)")
        return super().prepare(prompts, max_new_tokens, sp, seed, keep_state)

    def static_args(self) -> dict:
        return dict(eos_ids=self.eos_ids, tree=self.tree, fallback=self.fallback)

    def plain_steps(self, state: BitaState) -> int:
        return int(placement.fetch(state.fallback.plain_steps))

    def prefill_fn(self):
        cfg = self.cfg

        def fn(params, prompt, lens, max_new, sp, rng, capacity, out_slots, eos_ids, tree,
               fallback):
            return bita_prefill(cfg, params, prompt, lens, max_new, sp, rng, capacity=capacity,
                                out_slots=out_slots, eos_ids=eos_ids, tree=tree,
                                fallback=fallback)

        return fn

    def decode_fn(self):
        cfg = self.cfg

        def decode(params, state, max_new, sp, max_steps, eos_ids, tree, fallback):
            engine.TRACES[("bita", cfg, tree)] += 1

            def step(s):
                return bita_step(cfg, tree, params, s, max_new, eos_ids, sp)

            if fallback is not None:
                def plain(s):
                    return plain_step(cfg, tree, params, s, max_new, eos_ids, sp)

                return run_adaptive(step, plain, fallback, state, max_steps)
            return engine.run_steps(step, state, max_steps)

        return decode
