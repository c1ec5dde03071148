"""Draft-tree templates and the static numpy buffers of one BiTA decode step.

A tree is a tuple of node paths. A path (r_0, ..., r_{d-1}) is a node at depth d whose token is
the rank-r_{d-1} candidate of mask d-1 (of the mask group that drafted this tree), child of the
node (r_0, ..., r_{d-2}); depth-1 nodes are children of the root (the newest real token).

One step feeds T = 1 + N_nodes + G * M tokens, laid out as

    [ root | nodes (level by level, rank within a level) | G mask groups of M masks ]

Group g hangs off an anchor row (the root or a node): if that anchor ends up the last accepted
token, the group's masks draft the next tree. `Tree.layout(M, pruned)` builds every buffer once on
the host: the [T, T] visibility mask, position offsets, parents, depths, paths to each node
("retrieve indices"), and for each possible last-accepted row the group (and mask shift) that
drafts the next tree.

Templates:
  upper-triangle  BiTA's default (K = 5): level m holds the top-(K - m) of mask m, each level
                  under the top-1 node of the level above: 5 + 4 + 3 nodes for M = 3.
  chain           SPACE's auto-correct layout: the top-1 candidate of every mask in a chain.
  full            every path up to depth M with ranks < K at every level (small K only).
  FILE.json       a JSON list of paths, e.g. [[0], [1], [0, 0]].

`dynamic:N[:K][@D]` is a dynamic tree (`dynamic_tree.py`, EAGLE-2 style): each step takes the N
most probable paths (product of the mask probabilities, ranks < K, depth <= D) from the drafting
group, every node with its own group of D masks; its `paths` are only a skeleton of the same size
and depth (the layout's shapes), the nodes themselves change from step to step.

A `+lookup:L[:N]` suffix (e.g. `chain@1+lookup:4`) adds a retrieval branch: a chain of L nodes
under the root whose tokens come from prompt lookup (`lookup.py`: the continuation of the latest
earlier occurrence of the last N <= 3 tokens), not from the masks. Its nodes are paths of rank
LOOKUP (-1) and come after the mask nodes; they are verified in the same forward and anchor mask
groups like any node, so the next drafts hang off a lookup endpoint too.

Pruned layouts hang mask groups only under the root and under nodes that have children; a
childless last-accepted node reuses its parent's group, shifted by one mask (mask k + 1 of the
parent predicts what mask k of the child would have). Still lossless: drafts never decide the
output, verification does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import numpy as np

Path = tuple[int, ...]
LOOKUP = -1  # the rank of a retrieval-branch node (its token comes from prompt lookup)
DEFAULT_NGRAM = 3
DYNAMIC_TOP_K = 4  # candidate ranks per level of a dynamic tree
MAX_DYNAMIC_CANDIDATES = 4096  # K + K^2 + ... + K^D paths scored per step


class TreeError(ValueError):
    """A malformed tree spec, or one that needs more masks than the adapter has."""


def upper_triangle(num_masks: int, top_k: int = 5) -> tuple[Path, ...]:
    paths = []
    for level in range(num_masks):
        for rank in range(max(top_k - level, 0)):
            paths.append((0,) * level + (rank,))
    return tuple(paths)


def chain(num_masks: int) -> tuple[Path, ...]:
    return tuple((0,) * (level + 1) for level in range(num_masks))


def full(num_masks: int, top_k: int = 2) -> tuple[Path, ...]:
    paths, frontier = [], [()]
    for _ in range(num_masks):
        frontier = [p + (r,) for p in frontier for r in range(top_k)]
        paths.extend(frontier)
    return tuple(paths)


TEMPLATES = ("upper-triangle", "chain", "full")


def auto_tree_name(backend: str) -> str:
    """The tree `--tree auto` picks for a jax backend: `chain@1` on CPU, where a step's cost
    grows with its tokens (docs/benchmarks.md), the paper's `upper-triangle` on GPU / TPU, where
    a 52-token step costs about as much as a 1-token one."""
    return "chain@1" if backend == "cpu" else "upper-triangle"


def named_tree(name: str, num_masks: int) -> tuple[Path, ...]:
    """A template name (optionally `name:K`, e.g. `upper-triangle:3`) or a JSON file of paths."""
    base, _, arg = name.partition(":")
    if base == "upper-triangle":
        return upper_triangle(num_masks, int(arg or 5))
    if base == "chain":
        return chain(num_masks)
    if base == "full":
        return full(num_masks, int(arg or 2))
    path = pathlib.Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise TreeError(f"tree file not found: {path}")
        try:
            return tuple(tuple(int(r) for r in p) for p in json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise TreeError(f"tree file {path} is not a JSON list of paths: {e}") from None
    raise TreeError(f"unknown tree {name!r}: use one of {', '.join(TEMPLATES)} or a .json file")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Numpy buffers of one step (built once; constants under jit).

    Row indices are into the step's T tokens. Let Nn = nodes (mask nodes, then the lookup
    branch), G = groups, M = masks, D = the deepest node's depth, X = D + 1.
      num_tokens: T.                     mask: [T, T] bool, row t sees column u.
      offsets: [T] position minus the cache length.
      node_parent_row: [Nn] the row whose prediction a node's token must match.
      node_depth: [Nn] 1.. ; node_level: [Nn] depth - 1; node_rank: [Nn] (LOOKUP: lookup node).
      ancestors: [Nn, Nn] float, ancestors[i, j] = 1 if node j is node i or an ancestor of it.
      path_rows: [1 + Nn, X] rows root..endpoint for each endpoint row (padded by repetition).
      group_rows: [G, M] rows of each group's masks; mask_ids: [G * M] mask index k per mask row.
      endpoint_group: [1 + Nn] group drafting the next tree when that row is the last accepted.
      endpoint_shift: [1 + Nn] mask shift for that group (0 own group, 1 parent's group).
      max_rank: largest mask-node rank + 1 (top-k width needed); max_depth: D.
      lookup_nodes: L, the retrieval branch's length (0: none).
      children: [1 + Nn, C] child node rows of each row in rank order, -1 padded (sampling).
    """

    num_tokens: int
    num_nodes: int
    num_masks: int
    mask: np.ndarray
    offsets: np.ndarray
    node_parent_row: np.ndarray
    node_depth: np.ndarray
    node_level: np.ndarray
    node_rank: np.ndarray
    ancestors: np.ndarray
    path_rows: np.ndarray
    group_rows: np.ndarray
    mask_ids: np.ndarray
    endpoint_group: np.ndarray
    endpoint_shift: np.ndarray
    max_rank: int
    children: np.ndarray
    max_depth: int
    lookup_nodes: int


@dataclasses.dataclass(frozen=True)
class Tree:
    """A hashable tree spec (a static jit argument); `layout` holds its buffers."""

    paths: tuple[Path, ...]
    num_masks: int
    pruned: bool = False
    name: str = "custom"
    lookup: int = 0  # L: nodes of the retrieval branch
    lookup_ngram: int = DEFAULT_NGRAM  # N: the longest n-gram the lookup matches
    dynamic: int = 0  # N > 0: a dynamic tree of N nodes per step (`dynamic_tree.py`)
    dynamic_top_k: int = DYNAMIC_TOP_K  # K: candidate ranks per level of a dynamic tree

    def __post_init__(self):
        _validate(self.paths, self.num_masks)
        if self.dynamic and self.lookup:
            raise TreeError("a dynamic tree takes no +lookup branch: use a static tree with it")
        if self.lookup < 0 or self.lookup_ngram < 1:
            raise TreeError(f"bad lookup branch (lookup={self.lookup}, "
                            f"ngram={self.lookup_ngram}): use +lookup:L[:N] with L >= 1, N >= 1")

    @classmethod
    def make(cls, name: str, num_masks: int, pruned: bool = False) -> Tree:
        """`NAME[-pruned][@D][+lookup:L[:N]]`; `@D` builds the tree for D <= num_masks of the
        adapter's masks (a mask only sees earlier masks of its group, so dropping the last ones
        changes nothing else and makes the step smaller); `+lookup:L[:N]` adds a retrieval
        branch of L nodes matching n-grams of up to N tokens."""
        spec = name
        name, plus, extra = name.partition("+")
        lookup, ngram = (_parse_lookup(extra, spec) if plus else (0, DEFAULT_NGRAM))
        base, at, depth = name.rpartition("@")
        if at and depth.isdigit():
            if not 1 <= int(depth) <= num_masks:
                raise TreeError(f"tree {spec!r} needs {depth} masks but the adapter has "
                                f"{num_masks}: use @1 to @{num_masks}, or an adapter trained "
                                f"with bita.num_masks={depth}")
            name, num_masks = base, int(depth)
        if name.endswith("-pruned"):
            name, pruned = name[: -len("-pruned")], True
        if name.partition(":")[0] == "dynamic":
            if plus:
                raise TreeError(f"bad tree {spec!r}: a dynamic tree takes no +lookup branch")
            nodes, top_k = _parse_dynamic(name, spec, num_masks)
            return cls(dynamic_skeleton(nodes, num_masks, top_k), num_masks, False, spec,
                       dynamic=nodes, dynamic_top_k=top_k)
        return cls(named_tree(name, num_masks), num_masks, pruned,
                   spec if ("@" in spec or plus) else name + ("-pruned" if pruned else ""),
                   lookup, ngram)

    @property
    def layout(self) -> Layout:
        return _build_layout(self.paths, self.num_masks, self.pruned, self.lookup)


def _parse_dynamic(name: str, spec: str, depth: int) -> tuple[int, int]:
    parts = name.split(":")[1:]
    if not 1 <= len(parts) <= 2 or not all(x.isdigit() and int(x) >= 1 for x in parts):
        raise TreeError(f"bad tree {spec!r}: use dynamic:N or dynamic:N:K (N >= 1 nodes per "
                        f"step, K >= 1 candidate ranks per level), optionally @D")
    nodes, top_k = int(parts[0]), int(parts[1]) if len(parts) == 2 else DYNAMIC_TOP_K
    count = sum(top_k ** d for d in range(1, depth + 1))
    if nodes > count:
        raise TreeError(f"bad tree {spec!r}: {nodes} nodes but only {count} candidate paths "
                        f"(K={top_k}, depth {depth}): raise K or lower N")
    if count > MAX_DYNAMIC_CANDIDATES:
        raise TreeError(f"bad tree {spec!r}: {count} candidate paths per step (K={top_k}, depth "
                        f"{depth}); at most {MAX_DYNAMIC_CANDIDATES}: lower K or use @D")
    return nodes, top_k


def dynamic_skeleton(nodes: int, depth: int, top_k: int) -> tuple[Path, ...]:
    """A static tree of `nodes` nodes reaching `depth` (when nodes allow): the shapes of a
    dynamic tree's step. The top-1 chain first, then the other candidates shallow first."""
    chain_paths = [(0,) * d for d in range(1, min(nodes, depth) + 1)]
    others = [p for p in sorted(full(depth, top_k), key=lambda p: (len(p), p))
              if p not in chain_paths]
    return tuple(chain_paths + others[: nodes - len(chain_paths)])


def _parse_lookup(extra: str, spec: str) -> tuple[int, int]:
    kind, _, args = extra.partition(":")
    parts = args.split(":") if args else []
    if (kind != "lookup" or not 1 <= len(parts) <= 2 or not all(x.isdigit() for x in parts)
            or min(int(x) for x in parts) < 1):
        raise TreeError(f"bad tree {spec!r}: the only extra branch is +lookup:L or "
                        f"+lookup:L:N (L >= 1 lookup nodes, n-grams of up to N >= 1 tokens)")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else DEFAULT_NGRAM


def _validate(paths: tuple[Path, ...], num_masks: int):
    if not paths:
        raise TreeError("a tree needs at least one node")
    seen = set()
    for p in paths:
        if not p or any(r < 0 for r in p):
            raise TreeError(f"bad path {p}: ranks must be >= 0 and paths non-empty")
        if len(p) > num_masks:
            raise TreeError(f"path {p} has depth {len(p)} but the adapter has only {num_masks} "
                            f"masks: use a tree of depth <= {num_masks} (e.g. upper-triangle)")
        if p in seen:
            raise TreeError(f"duplicate path {p}")
        if len(p) > 1 and p[:-1] not in set(paths):
            raise TreeError(f"path {p} has no parent {p[:-1]} in the tree")
        seen.add(p)


@functools.lru_cache(maxsize=64)
def _build_layout(paths: tuple[Path, ...], num_masks: int, pruned: bool, lookup: int = 0
                  ) -> Layout:
    # Mask nodes level by level, rank within a level; then the lookup branch, root downwards.
    nodes = (sorted(paths, key=lambda p: (len(p), p))
             + [(LOOKUP,) * d for d in range(1, lookup + 1)])
    nn_ = len(nodes)
    row_of = {(): 0, **{p: 1 + i for i, p in enumerate(nodes)}}
    has_children = {p[:-1] for p in nodes}
    anchors = [()] + [p for p in nodes if (not pruned or p in has_children)]
    group_of = {a: g for g, a in enumerate(anchors)}
    m = num_masks
    t = 1 + nn_ + len(anchors) * m
    mask = np.zeros((t, t), bool)
    offsets = np.zeros((t,), np.int32)

    def chain_rows(p: Path) -> list[int]:  # root, ancestors, node itself
        return [row_of[p[:i]] for i in range(len(p) + 1)]

    for p in [()] + nodes:
        r = row_of[p]
        mask[r, chain_rows(p)] = True
        offsets[r] = len(p)
    group_rows = np.zeros((len(anchors), m), np.int32)
    for g, a in enumerate(anchors):
        base = 1 + nn_ + g * m
        for k in range(m):
            r = base + k
            group_rows[g, k] = r
            mask[r, chain_rows(a)] = True
            mask[r, base: base + k + 1] = True
            offsets[r] = len(a) + 1 + k
    max_depth = max(len(p) for p in nodes)
    x = max_depth + 1
    path_rows = np.zeros((1 + nn_, x), np.int32)
    endpoint_group = np.zeros((1 + nn_,), np.int32)
    endpoint_shift = np.zeros((1 + nn_,), np.int32)
    for p in [()] + nodes:
        rows = chain_rows(p)
        path_rows[row_of[p]] = rows + [rows[-1]] * (x - len(rows))
        owner, shift = p, 0
        while owner not in group_of:  # pruned: walk up to the nearest anchor
            owner, shift = owner[:-1], shift + 1
        endpoint_group[row_of[p]] = group_of[owner]
        endpoint_shift[row_of[p]] = shift
    ancestors = np.zeros((nn_, nn_), np.float32)
    for i, p in enumerate(nodes):
        for d in range(1, len(p) + 1):
            ancestors[i, row_of[p[:d]] - 1] = 1.0
    return Layout(
        num_tokens=t, num_nodes=nn_, num_masks=m, mask=mask, offsets=offsets,
        node_parent_row=np.array([row_of[p[:-1]] for p in nodes], np.int32),
        node_depth=np.array([len(p) for p in nodes], np.int32),
        node_level=np.array([len(p) - 1 for p in nodes], np.int32),
        node_rank=np.array([p[-1] for p in nodes], np.int32),
        ancestors=ancestors, path_rows=path_rows, group_rows=group_rows,
        mask_ids=np.tile(np.arange(m, dtype=np.int32), len(anchors)),
        endpoint_group=endpoint_group, endpoint_shift=endpoint_shift,
        max_rank=max(p[-1] for p in paths) + 1,
        children=_children(nodes, row_of), max_depth=max_depth, lookup_nodes=lookup)


def _children(nodes: list[Path], row_of: dict) -> np.ndarray:
    kids: dict[Path, list[int]] = {(): []}
    for p in nodes:  # siblings come in rank order (a lookup node after the mask nodes)
        kids.setdefault(p[:-1], []).append(row_of[p])
    width = max(len(v) for v in kids.values())
    table = np.full((1 + len(nodes), width), -1, np.int32)
    for parent, rows in kids.items():
        table[row_of[parent], : len(rows)] = rows
    return table
