"""Retrieval drafts from the model's own answers: an n-gram table shipped with an adapter.

Prompt lookup (`lookup.py`) drafts well when the newest 2 or 3 tokens occurred earlier in the
prompt or the answer; when only the newest token did (a 1-gram match) or nothing did, its drafts
are weak. The table fills those gaps from the base model's greedy answers to the training
prompts (the self-distilled data that trains the adapter, never a held-out prompt): for every
context of the last n = 3, 2, 1 tokens seen there, the L tokens that most often followed it, one
token at a time (the most frequent next token, then the most frequent one after that among the
continuations that start so, and so on).

The table lives on device as one open-addressing hash table per order n: contexts [S_n, n] and
drafts [S_n, L], S_n a power of two, int32, empty slots -1. A context's home slot is a
multiplicative hash of its tokens (wrapping uint32 arithmetic, the same on host and device); it
sits in one of the `PROBES` slots from there. The lookup is fixed-shape gathers inside the
jitted step: no host round trip. `lookup.lookup_drafts(..., table=)` uses it for rows whose
prompt-lookup match is shorter than `MIN_PROMPT_NGRAM` tokens.

An adapter directory keeps it as `ngram.npz` (`save` / `load`); `python train/ngram_table.py`
builds it from a distilled dataset. The drafts only fill tree nodes: verification decides what
is emitted, so the output stays plain greedy decoding's whatever the table holds.
"""

from __future__ import annotations

import collections
import os
import pathlib
from collections.abc import Iterable, Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

FILE = "ngram.npz"
MAX_ORDER = 3
DRAFT_TOKENS = 4  # L stored per context: the longest lookup branch `--tree auto` tries
PROBES = 8  # slots searched from a context's home slot
MIN_PROMPT_NGRAM = 2  # prompt lookup's own drafts win from a match of this many tokens
_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)  # odd: one per context position
EMPTY = -1  # a free slot, or no draft: = `lookup.NO_DRAFT`, which verification never accepts


@flax.struct.dataclass
class NgramTable:
    """contexts[n - 1]: [S_n, n] int32 context tokens (EMPTY: a free slot); drafts[n - 1]:
    [S_n, L] the tokens that follow (EMPTY past a continuation's end)."""

    contexts: tuple
    drafts: tuple

    @property
    def max_order(self) -> int:
        return len(self.contexts)

    def num_entries(self) -> int:
        return sum(int(np.sum(np.asarray(c)[:, 0] != EMPTY)) for c in self.contexts)


def _home(ctx, bits: int, xp):
    """Home slots of contexts [..., n] (int) in a table of 2**bits slots."""
    h = xp.zeros(ctx.shape[:-1], xp.uint32)
    for k in range(ctx.shape[-1]):
        h = h + ctx[..., k].astype(xp.uint32) * xp.uint32(_MULTIPLIERS[k])
    return (h >> xp.uint32(32 - bits)).astype(xp.int32)


def _continuation(counts: collections.Counter, length: int) -> list[int]:
    """The most frequent next token, then the most frequent after it among the continuations
    that start so, ... (ties: the smaller token id), up to `length` tokens."""
    out: list[int] = []
    live = counts
    while len(out) < length:
        votes: collections.Counter = collections.Counter()
        for cont, c in live.items():
            if len(cont) > len(out):
                votes[cont[len(out)]] += c
        if not votes:
            break
        best = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        out.append(best)
        live = {cont: c for cont, c in live.items() if len(cont) > len(out) - 1
                and cont[len(out) - 1] == best}
    return out


def build(texts: Iterable[Sequence[int]], max_order: int = MAX_ORDER,
          num_tokens: int = DRAFT_TOKENS) -> NgramTable:
    """The table of token texts (each an answer's ids): every context of 1..max_order tokens
    and the `num_tokens` tokens that most often followed it (`_continuation`). Contexts are
    inserted most frequent first; one whose `PROBES` slots are all taken is dropped (a table
    at most half full makes that rare)."""
    texts = [np.asarray(t, np.int64).tolist() for t in texts]
    contexts, drafts = [], []
    for n in range(1, max_order + 1):
        follow: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
        for t in texts:
            for i in range(n - 1, len(t) - 1):
                follow[tuple(t[i - n + 1: i + 1])][tuple(t[i + 1: i + 1 + num_tokens])] += 1
        order = sorted(follow, key=lambda c: (-sum(follow[c].values()), c))
        bits = max(int(np.ceil(np.log2(max(2 * len(order), 2)))), 4)
        size = 1 << bits
        ctx = np.full((size, n), EMPTY, np.int32)
        dr = np.full((size, num_tokens), EMPTY, np.int32)
        keys = np.asarray(order, np.int64).reshape(-1, n)
        homes = _home(keys, bits, np) if len(order) else np.zeros(0, np.int32)
        for key, home in zip(order, homes):
            for p in range(PROBES):
                slot = (int(home) + p) & (size - 1)
                if ctx[slot, 0] == EMPTY:
                    ctx[slot] = key
                    cont = _continuation(follow[key], num_tokens)
                    dr[slot, : len(cont)] = cont
                    break
        contexts.append(ctx)
        drafts.append(dr)
    return NgramTable(contexts=tuple(contexts), drafts=tuple(drafts))


def table_drafts(table: NgramTable, history, newest, num_tokens: int, xp=jnp):
    """The table's drafts for each row's last n <= max_order tokens (the longest n found).

    Args:
      history: [B, S] tokens by position; newest: [B] position of each row's newest token.
      xp: jnp (on device, inside the step) or np (the host replay's twin).

    Returns:
      [B, L] int32 drafts (L = num_tokens; EMPTY past what the table holds), and [B] bool:
      whether any context was found.
    """
    b, s = history.shape
    rows = xp.arange(b)
    out = xp.full((b, num_tokens), EMPTY, xp.int32)
    found = xp.zeros((b,), bool)
    for n in range(1, table.max_order + 1):  # longer contexts overwrite shorter ones
        ctx_table, draft_table = table.contexts[n - 1], table.drafts[n - 1]
        size = ctx_table.shape[0]
        bits = size.bit_length() - 1
        pos = newest[:, None] - (n - 1) + xp.arange(n)[None, :]  # [B, n]
        ctx = history[rows[:, None], xp.clip(pos, 0, s - 1)]
        slots = (_home(ctx, bits, xp)[:, None] + xp.arange(PROBES)[None, :]) & (size - 1)
        stored = ctx_table[slots]  # [B, P, n]
        hit = xp.all(stored == ctx[:, None, :], axis=-1) & (newest[:, None] >= n - 1)
        first = xp.argmax(hit, axis=1)
        any_hit = xp.any(hit, axis=1)
        row_drafts = draft_table[xp.take_along_axis(slots, first[:, None], axis=1)[:, 0]]
        width = min(num_tokens, row_drafts.shape[1])
        row_drafts = xp.concatenate(
            [row_drafts[:, :width],
             xp.full((b, num_tokens - width), EMPTY, xp.int32)], axis=1)
        out = xp.where(any_hit[:, None], row_drafts, out)
        found = found | any_hit
    return out.astype(xp.int32), found


def save(adapter_dir: str | os.PathLike, table: NgramTable) -> pathlib.Path:
    path = pathlib.Path(adapter_dir) / FILE
    arrays = {}
    for n, (c, d) in enumerate(zip(table.contexts, table.drafts), start=1):
        arrays[f"contexts_{n}"] = np.asarray(c, np.int32)
        arrays[f"drafts_{n}"] = np.asarray(d, np.int32)
    np.savez_compressed(path, **arrays)
    return path


def load(adapter_dir: str | os.PathLike | None) -> NgramTable | None:
    """The adapter directory's table as host numpy arrays, or None if it has none."""
    if adapter_dir is None:
        return None
    path = pathlib.Path(adapter_dir) / FILE
    if not path.is_file():
        return None
    with np.load(path) as z:
        orders = sorted(int(k.split("_")[1]) for k in z.files if k.startswith("contexts_"))
        if orders != list(range(1, len(orders) + 1)) or not orders:
            raise ValueError(f"{path}: not an n-gram table (orders {orders}); rebuild it with "
                             "python train/ngram_table.py")
        return NgramTable(contexts=tuple(z[f"contexts_{n}"] for n in orders),
                          drafts=tuple(z[f"drafts_{n}"] for n in orders))
