"""Dynamic draft trees (EAGLE-2 style): each step picks its nodes from the drafts' own
probabilities, within a fixed node budget.

`dynamic:N[:K][@D]`: N nodes per step, chosen among every path of depth <= D (default: the
adapter's M masks) whose rank at each level is < K (default 4). A path's score is the sum over its
levels of the log-probability of its token under that level's mask: the product of the mask
probabilities along it, the drafts' own estimate that the path is accepted. The N best paths form
the next tree. A parent scores strictly above its children (a log-probability is <= 0, and each
level costs a tiny extra `DEPTH_PENALTY`), and candidates are listed shallow first so that exact
ties keep the parent too: the chosen set is always a tree, parents before children.

Every node anchors a group of D masks, as the root does, so a step feeds

    T = 1 + N + (N + 1) * D tokens:   [ root | N nodes | (N + 1) groups x D masks ]

a static shape. Only the selection varies, kept per row as candidate indices (`BitaState.
node_paths`, [B, N]); what a static tree holds as numpy buffers (`tree.Layout`) is built per row on
device each step (`row_layout`). Verification, the cache commit and the next drafts then work as
for a static tree: an accepted node equals the base model's argmax at its parent, so the output
stays plain greedy decoding's, whichever nodes the drafts pick. Greedy decoding only.

Shapes: B rows, N nodes, C candidates, D levels, K ranks per level, T step tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.decoding.tree import full

NO_DRAFT = -1
DEPTH_PENALTY = 1e-6  # per level, so that a child never ties its parent
LOG_FLOOR = -1e9  # log-probabilities are clipped here (no -inf arithmetic)


@dataclasses.dataclass(frozen=True)
class Candidates:
    """The static candidate paths of `dynamic:N:K@D`, shallow first (numpy).

    paths: C paths; depth [C]; ranks [C, D] (rank at each level, 0 past the depth);
    parent [C] index of the parent path (-1 for depth 1); last_rank [C] rank at the deepest level.
    """

    paths: tuple[tuple[int, ...], ...]
    depth: np.ndarray
    ranks: np.ndarray
    parent: np.ndarray
    last_rank: np.ndarray


@functools.lru_cache(maxsize=16)
def candidates(depth: int, top_k: int) -> Candidates:
    paths = tuple(sorted(full(depth, top_k), key=lambda p: (len(p), p)))
    index = {p: i for i, p in enumerate(paths)}
    ranks = np.zeros((len(paths), depth), np.int32)
    for i, p in enumerate(paths):
        ranks[i, : len(p)] = p
    return Candidates(
        paths=paths, depth=np.array([len(p) for p in paths], np.int32), ranks=ranks,
        parent=np.array([index.get(p[:-1], -1) for p in paths], np.int32),
        last_rank=np.array([p[-1] for p in paths], np.int32))


def select(group_logits, num_nodes: int, top_k: int):
    """The next tree from one mask group per row.

    Args:
      group_logits: [B, D, V] logits of the D masks of the drafting group.

    Returns:
      node_paths [B, N] candidate indices (best first: parents before children) and their tokens
      [B, N].
    """
    b, d, _ = group_logits.shape
    cand = candidates(d, top_k)
    logp = jax.nn.log_softmax(group_logits.astype(jnp.float32), axis=-1)
    top_lp, top_tok = jax.lax.top_k(logp, top_k)  # [B, D, K]
    top_lp = jnp.maximum(top_lp, LOG_FLOOR)
    level = np.arange(d)[None, :]
    inside = level < cand.depth[:, None]  # [C, D]
    lp = top_lp[:, level, cand.ranks]  # [B, C, D]: each level's log-probability
    score = jnp.sum(jnp.where(inside[None], lp, 0.0), axis=-1) - DEPTH_PENALTY * cand.depth
    _, node_paths = jax.lax.top_k(score, num_nodes)  # ties: the lower (shallower) index first
    node_paths = node_paths.astype(jnp.int32)
    lvl = jnp.take(cand.depth - 1, node_paths)
    rank = jnp.take(cand.last_rank, node_paths)
    tokens = top_tok[jnp.arange(b)[:, None], lvl, rank].astype(jnp.int32)
    return node_paths, tokens


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """One step's layout per row (device arrays), from the rows' selections.

    depth [B, 1 + N] of each tree row (root 0); parent_row [B, N] of each node;
    ancestors [B, 1 + N, 1 + N] bool, row i sees tree row j (ancestor or self);
    mask [B, T, T] bool; offsets [B, T] position minus the cache length.
    """

    depth: jax.Array
    parent_row: jax.Array
    ancestors: jax.Array
    mask: jax.Array
    offsets: jax.Array


def row_layout(node_paths, depth_limit: int, top_k: int) -> RowLayout:
    """The per-row layout of trees given as candidate indices [B, N] (see module doc)."""
    b, n = node_paths.shape
    cand = candidates(depth_limit, top_k)
    d = depth_limit
    node_depth = jnp.take(cand.depth, node_paths)  # [B, N]
    parent_cand = jnp.take(cand.parent, node_paths)  # [B, N]
    # the parent's slot: the node whose candidate is this node's parent (depth 1: the root)
    is_parent = node_paths[:, None, :] == parent_cand[:, :, None]  # [B, N(child), N(parent)]
    found = jnp.any(is_parent, axis=-1)
    parent_row = jnp.where(found, 1 + jnp.argmax(is_parent, axis=-1), 0).astype(jnp.int32)
    parent_all = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), parent_row], axis=1)  # [B, 1+N]
    depth = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), node_depth], axis=1)
    rows = jnp.arange(1 + n)
    ancestors = rows[None, :, None] == rows[None, None, :]
    cur = jnp.broadcast_to(rows, (b, 1 + n))
    for _ in range(d):  # walk up D times: every ancestor of every row
        cur = jnp.take_along_axis(parent_all, cur, axis=1)
        ancestors = ancestors | (cur[:, :, None] == rows[None, None, :])
    # groups: group g hangs off tree row g; its mask k sees g's ancestors-or-self and masks 0..k
    group_sees_tree = jnp.repeat(ancestors, d, axis=1)  # [B, (1+N)*D, 1+N]
    k = np.arange((1 + n) * d) % d
    g = np.arange((1 + n) * d) // d
    own = (g[:, None] == g[None, :]) & (k[None, :] <= k[:, None])
    t = 1 + n + (1 + n) * d
    mask = jnp.zeros((b, t, t), bool)
    mask = mask.at[:, : 1 + n, : 1 + n].set(ancestors)
    mask = mask.at[:, 1 + n:, : 1 + n].set(group_sees_tree)
    mask = mask.at[:, 1 + n:, 1 + n:].set(jnp.broadcast_to(own, (b,) + own.shape))
    offsets = jnp.concatenate([depth, jnp.take(depth, g, axis=1) + 1 + k[None, :]], axis=1)
    return RowLayout(depth, parent_row, ancestors, mask, offsets.astype(jnp.int32))


def verify(pred, drafts, lay: RowLayout):
    """Greedy verification of per-row trees: pred [B, 1 + N] argmax at every tree row, drafts
    [B, N]. Returns the endpoint row [B] (0 = root) and its depth [B]."""
    parent_pred = jnp.take_along_axis(pred, lay.parent_row, axis=1)
    wrong = (drafts != parent_pred) | (drafts < 0)  # [B, N]
    node_anc = lay.ancestors[:, 1:, 1:]  # [B, N, N]
    accepted = ~jnp.any(node_anc & wrong[:, None, :], axis=-1)
    depth = jnp.where(accepted, lay.depth[:, 1:], 0)
    best = jnp.argmax(depth, axis=1)
    best_depth = jnp.max(depth, axis=1)
    return jnp.where(best_depth > 0, best + 1, 0).astype(jnp.int32), best_depth.astype(jnp.int32)


def path_rows(lay: RowLayout, endpoint, depth_limit: int):
    """Rows root..endpoint [B, D + 1] by depth (past the endpoint's depth: the root, never
    committed)."""
    anc = jnp.take_along_axis(lay.ancestors, endpoint[:, None, None], axis=1)[:, 0]  # [B, 1+N]
    at = anc[:, None, :] & (lay.depth[:, None, :] == jnp.arange(depth_limit + 1)[None, :, None])
    return jnp.argmax(at, axis=-1).astype(jnp.int32)


def group_rows(endpoint, num_nodes: int, depth_limit: int):
    """Rows [B, D] of the masks hanging off each row's endpoint."""
    return (1 + num_nodes + endpoint[:, None] * depth_limit
            + jnp.arange(depth_limit)[None, :]).astype(jnp.int32)
