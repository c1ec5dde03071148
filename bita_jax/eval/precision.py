"""Is BiTA lossless in a given precision? BiTA against plain greedy of the same base, in the same
dtype, prompt by prompt, and at each first difference the top-2 logit gap.

    report = precision.compare(llm.engine(False), llm.engine(True), prompt_ids, 256)
    report["identical"], report["divergences"]     # [{"prompt", "token", "gap"}, ...]

Lossless means BiTA's output equals plain greedy decoding of the same model in the same dtype.
In fp32 it does, token for token (tests). In other precisions a tree step and a one-token step
may round differently; where the two outputs part, the gap between the two best logits at that
token (taken from one plain forward over the prompt and the common prefix, in that precision)
says whether it was a near tie (a rounding-level gap) or a real difference (a bug).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax import models
from bita_jax.decoding import engine


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where a and b differ (a length counts: one may end earlier), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(cfg, params, ids: Sequence[int]) -> float:
    """top-1 minus top-2 logit (fp32) of the next token after `ids`, from one plain forward."""
    n = len(ids)
    width = engine.bucket(n)  # padding after the last token leaves causal logits unchanged
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = ids
    logits = _last_logits(cfg, params, tokens, np.int32(n - 1))
    top = np.sort(np.asarray(logits, np.float32))[-2:]
    return float(top[1] - top[0])


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(cfg, params, tokens, last):
    t = tokens.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32)[None, :]
    hidden, _ = models.forward(cfg, params, tokens, positions, engine.causal_mask(t))
    return models.lm_logits(cfg, params, hidden[0, last])


def compare(greedy_engine, bita_engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """BiTA (`bita_engine`) against plain greedy (`greedy_engine`, the same model) for each
    prompt, batch 1. Returns a JSON-ready dict: precision, prompts, identical, and for each
    prompt whose outputs differ, the token index and the top-2 gap there."""
    cfg, params = greedy_engine.cfg, greedy_engine.params
    divergences, outputs = [], []
    for i, ids in enumerate(prompts):
        greedy = greedy_engine.generate([list(ids)], max_new_tokens).tokens[0]
        bita = bita_engine.generate([list(ids)], max_new_tokens).tokens[0]
        outputs.append(greedy)
        k = first_difference(greedy, bita)
        if k is not None:
            gap = top2_gap(cfg, params, list(ids) + greedy[:k])
            divergences.append({"prompt": i, "token": k, "gap": round(gap, 5)})
        if progress is not None:
            progress(i + 1, len(prompts))
    return {"precision": cfg.precision_name, "prompts": len(prompts),
            "max_new_tokens": max_new_tokens, "identical": len(prompts) - len(divergences),
            "divergences": divergences, "greedy_outputs": outputs}


def markdown(reports: Sequence[dict], reference: str = "float32") -> str:
    """One row per precision: identical count, divergences with their gaps, and how many plain
    greedy outputs equal the `reference` precision's (how far the precision itself moves)."""
    ref = next((r for r in reports if r["precision"] == reference), None)
    lines = ["| precision | prompts x new tokens | BiTA = greedy (same precision) | first "
             "differences: token (top-2 gap) | greedy = fp32 greedy |", "|---|---|---|---|---|"]
    for r in reports:
        gaps = ", ".join(f"{d['token']} ({d['gap']:.3g})" for d in r["divergences"]) or "none"
        same = ("-" if ref is None else
                f"{sum(a == b for a, b in zip(r['greedy_outputs'], ref['greedy_outputs']))}"
                f"/{r['prompts']}")
        lines.append(f"| {r['precision']} | {r['prompts']} x {r['max_new_tokens']} | "
                     f"{r['identical']}/{r['prompts']} | {gaps} | {same} |")
    return "\n".join(lines)
