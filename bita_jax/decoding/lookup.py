"""Retrieval drafts: prompt-lookup n-gram candidates found on device, for a branch of the tree.

Every BiTA row keeps its token history (prompt, then every emitted token) in a [B, S] buffer
indexed by position, so history[b, p] is the token at cache position p and history[b, n] is the
newest token (`DecodeState.last`, not yet in the cache; n = `cache.length`). Before each step the
lookup takes the last g tokens (g = N, N - 1, ..., 1: the longest n-gram that occurred before),
finds their latest earlier occurrence in the history, and proposes the L tokens that followed it.
When that occurrence ends P < L tokens before the newest one, the text just repeated with period
P, and the tokens past the newest one continue that period (a run of one token, or of a short
phrase, drafts L tokens of itself). All of it is fixed-shape array work inside the jitted
`lax.while_loop`: no host round trip per step.

The candidates only fill tree nodes; verification decides what is emitted, so the output stays
plain greedy decoding's whatever the lookup proposes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bita_jax.decoding import ngram

NO_DRAFT = -1  # a placeholder node token: never equals a prediction, fed as token 0


def init_history(prompt, prompt_len, first, capacity: int):
    """The history after the prefill: prompts [B, Tp] (right-padded, lengths [B]) and the first
    token [B] at position `prompt_len`, in a [B, S] buffer of `capacity` slots."""
    b, tp = prompt.shape
    if tp > capacity:  # a long prompt's bucket may pass the cache (`engine.request_slots`);
        prompt = prompt[:, :capacity]  # its prompts themselves fit
    history = jnp.zeros((b, capacity), jnp.int32).at[:, :prompt.shape[1]].set(prompt)
    return history.at[jnp.arange(b), prompt_len].set(first)


def append(history, start, tokens, count):
    """Writes tokens [B, A] at positions start + 1 .. start + count [B] of each row (the tokens
    that follow the newest one at `start`); the rest of `tokens` is dropped."""
    b, a = tokens.shape
    j = jnp.arange(a)[None, :]
    slots = jnp.where(j < count[:, None], start[:, None] + 1 + j, history.shape[1])
    return history.at[jnp.arange(b)[:, None], slots].set(tokens, mode="drop")


def lookup_drafts(history, newest, num_tokens: int, max_ngram: int, table=None):
    """The L = `num_tokens` tokens that followed the latest earlier occurrence of each row's
    last n-gram, for the longest n <= `max_ngram` that has one.

    Args:
      history: [B, S] tokens by position; newest: [B] position of each row's newest token.
      table: an `ngram.NgramTable` of device arrays, or None: rows whose match is shorter than
        `ngram.MIN_PROMPT_NGRAM` tokens take the table's drafts where it holds their context.

    Returns:
      [B, L] int32 draft tokens; NO_DRAFT for a row without any match.
    """
    b, s = history.shape
    rows = jnp.arange(b)
    pos = jnp.arange(s)[None, :]
    end = jnp.full((b,), -1, jnp.int32)  # position where the chosen earlier occurrence ends
    order = jnp.zeros((b,), jnp.int32)  # the n of that occurrence (0: none)
    for g in range(max_ngram, 0, -1):
        # An occurrence ending at j < newest: history[j - k] == history[newest - k], k < g.
        match = (pos >= g - 1) & (pos < newest[:, None]) & (newest[:, None] >= g - 1)
        for k in range(g):
            earlier = jnp.pad(history, ((0, 0), (k, 0)), constant_values=NO_DRAFT)[:, :s]
            suffix = history[rows, jnp.maximum(newest - k, 0)]
            match = match & (earlier == suffix[:, None])
        latest = jnp.max(jnp.where(match, pos, -1), axis=1).astype(jnp.int32)
        order = jnp.where((end < 0) & (latest >= 0), g, order)
        end = jnp.where(end < 0, latest, end)
    period = jnp.maximum(newest - end, 1)[:, None]  # the continuation is known up to the newest
    follow = end[:, None] + 1 + jnp.arange(num_tokens)[None, :] % period  # [B, L]
    tokens = jnp.take_along_axis(history, jnp.clip(follow, 0, s - 1), axis=1)
    tokens = jnp.where(end[:, None] >= 0, tokens, NO_DRAFT).astype(jnp.int32)
    if table is None:
        return tokens
    from_table, found = ngram.table_drafts(table, history, newest, num_tokens)
    use = found & (order < ngram.MIN_PROMPT_NGRAM)
    return jnp.where(use[:, None], from_table, tokens)


def host_lookup_drafts(history, num_tokens: int, max_ngram: int, table=None) -> np.ndarray:
    """`lookup_drafts` of one row on the host, in numpy: history [n + 1] holds the prompt and
    every token so far, the newest last; `table` a host `ngram.NgramTable` or None. Returns [L]
    tokens, NO_DRAFT without any match. The replay of `--tree auto` uses it
    (`eval.tree_select.replay`); a test holds it to the device version."""
    h = np.asarray(history, np.int64)
    newest = len(h) - 1
    end, order = -1, 0
    for g in range(max_ngram, 0, -1):
        if newest < g:  # no room for an earlier occurrence of g tokens
            continue
        suffix = h[newest - g + 1: newest + 1]
        # occurrences ending at j in [g - 1, newest): h[j - g + 1 .. j] == suffix
        windows = np.lib.stride_tricks.sliding_window_view(h[:newest], g)
        hits = np.nonzero(np.all(windows == suffix, axis=1))[0]
        if len(hits):
            end, order = int(hits[-1]) + g - 1, g
            break
    if table is not None and order < ngram.MIN_PROMPT_NGRAM:
        from_table, found = ngram.table_drafts(table, h[None, :], np.asarray([newest]),
                                               num_tokens, xp=np)
        if found[0]:
            return from_table[0]
    if end < 0:
        return np.full((num_tokens,), NO_DRAFT, np.int32)
    period = max(newest - end, 1)
    follow = end + 1 + np.arange(num_tokens) % period
    return h[np.clip(follow, 0, newest)].astype(np.int32)
