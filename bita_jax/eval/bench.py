"""Benchmark BiTA against plain greedy decoding: same prompts, same jitted engine, batch 1.

    trees = [make_tree(name, num_masks) for name in ("chain", "upper-triangle")]
    results = run_bench(cfg, params, bita_params, trees, prompt_ids, max_new_tokens=128)
    print(markdown_table(results)); write_results(out_dir, results)

Every engine is warmed up first (each prompt-length bucket compiled and run), then each prompt is
decoded by plain greedy and by every tree in turn, so that a change of machine load hits all of
them alike. A row records time, new tokens, steps, tokens per step and whether the ids equal plain
greedy's (BiTA is lossless: they must). `run_engine` runs one engine over a prompt list and is the
piece a report script reuses. `select_tree` measures what `tree_select` needs to pick a tree.

Tree names are those of `Tree.make` plus an optional `@D`: build the tree for D <= M masks
(`chain@2` is a two-node chain whose mask groups hold 2 masks: 9 step tokens instead of 16). A mask
only sees the masks before it in its group, so dropping the last ones changes nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
from collections.abc import Callable, Sequence

import jax
import numpy as np

from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.engine import Engine
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree
from bita_jax.eval import tree_select
from bita_jax.models.config import ModelConfig

Log = Callable[[str], None]
GREEDY = "plain greedy"


def quiet(_: str) -> None:
    """A `Log` that prints nothing."""


# ---------------------------------------------------------------------------------------------
# Trees and prompts.


def make_tree(spec: str, num_masks: int) -> Tree:
    """`Tree.make` names, `NAME@D` included (the tree built for D <= num_masks masks)."""
    return Tree.make(spec, num_masks)


def default_candidates(num_masks: int) -> list[str]:
    """Trees worth comparing for an adapter of M masks (cheap chains to the paper's tree)."""
    names = [f"chain@{d}" for d in range(1, num_masks)] + ["chain", "chain-pruned"]
    if num_masks >= 2:
        names.append("upper-triangle:2@2")
    names += ["upper-triangle:3", "upper-triangle:3-pruned", "upper-triangle:4", "upper-triangle",
              "upper-triangle-pruned"]
    out, seen = [], set()
    for n in names:  # drop names that build the same step (e.g. upper-triangle:3 when M = 2)
        t = make_tree(n, num_masks)
        if (t.paths, t.num_masks, t.pruned) not in seen:
            seen.add((t.paths, t.num_masks, t.pruned))
            out.append(n)
    return out


SPLIT_ROLES = ("selection", "test")
# The named sources the shipped adapter was distilled from (train/distill.py's default).
TRAINED_SOURCES = ("sharegpt", "code-alpaca", "alpaca-seeds")


def default_split(source: str, role: str = "selection") -> str:
    """The prompt split a tool reads by default (`bita_jax.data.prompts`).

    A source of the training recipe (`TRAINED_SOURCES`): a part of its held-out split (never
    trained on): `selection` for choosing trees and adapters (`infer/bench.py`, the report's
    calibration), `test` for headline numbers only (the report's timed sets). Other sources
    (HumanEval, files) were not trained on: every prompt.
    """
    if role not in SPLIT_ROLES:
        raise ValueError(f"role must be one of {', '.join(SPLIT_ROLES)}, got {role!r}")
    return role if source in TRAINED_SOURCES else "all"


def encode_prompts(tokenizer, texts: Sequence[str], raw: bool) -> list[list[int]]:
    """Token ids: the chat template (chat sources) or the raw text (code prompts)."""
    return [tokenizer.encode(t) if raw else tokenizer.chat_ids(t) for t in texts]


# ---------------------------------------------------------------------------------------------
# Running engines.


def warm_up(gen: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Compiles every shape bucket the prompts need and runs each compiled loop once."""
    seen = set()
    for ids in prompts:
        shape = gen.shapes([len(ids)], max_new_tokens)
        if shape in seen:
            continue
        seen.add(shape)
        start, decode = gen.prepare([list(ids)], max_new_tokens, SamplingParams.greedy())
        jax.block_until_ready(decode(start(), 2))


def run_one(gen: Engine, ids: Sequence[int], max_new_tokens: int) -> dict:
    """One greedy generation: {tokens, new_tokens, seconds, steps, tokens_per_step}."""
    r = gen.generate([list(ids)], max_new_tokens)
    return {"tokens": r.tokens[0], "new_tokens": len(r.tokens[0]), "seconds": r.seconds,
            "steps": r.row_steps[0], "tokens_per_step": r.tokens_per_step}


def run_engine(gen: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               warm: bool = True) -> list[dict]:
    """Runs one engine (plain `Generator` or `BitaGenerator`) over a prompt list; one row each."""
    if warm:
        warm_up(gen, prompts, max_new_tokens)
    return [dict(run_one(gen, ids, max_new_tokens), prompt_tokens=len(ids)) for ids in prompts]


def summarize(rows: Sequence[dict], greedy_rows: Sequence[dict] | None = None) -> dict:
    """Totals of an engine's rows; against `greedy_rows`: speedup and identical count.

    tokens_per_step counts as `GenerationResult.tokens_per_step` (the prefill's token excluded);
    ms_per_step is wall time over decode steps (the prefill amortised into it).
    """
    new = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    out = {"prompts": len(rows), "new_tokens": new, "seconds": seconds, "steps": steps,
           "tokens_per_step": (new - len(rows)) / steps if steps else 1.0,
           "tokens_per_second": new / seconds if seconds else 0.0,
           "ms_per_step": 1e3 * seconds / steps if steps else 0.0}
    if greedy_rows is not None:
        g_seconds = sum(r["seconds"] for r in greedy_rows)
        g_new = sum(r["new_tokens"] for r in greedy_rows)
        out.update(
            identical=sum(r["tokens"] == g["tokens"] for r, g in zip(rows, greedy_rows)),
            speedup=g_seconds / seconds if seconds else 0.0,
            greedy_seconds=g_seconds,
            greedy_tokens_per_second=g_new / g_seconds if g_seconds else 0.0)
    return out


def run_bench(cfg: ModelConfig, params, bita_params, trees: Sequence[Tree],
              prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
              texts: Sequence[str] | None = None, max_cache: int | None = None,
              repeats: int = 1, log: Log = quiet, ngram_table=None) -> dict:
    """Plain greedy and every tree on every prompt (interleaved per prompt), after a warm-up.

    Args:
      cfg, params: the base model.
      bita_params: the adapter (its M bounds the trees' masks).
      trees: BiTA trees to compare (names must differ).
      prompts: token ids per prompt (batch 1 each).
      max_new_tokens: cap per prompt.
      texts: the prompts' text, recorded (first 80 chars) in the rows.
      max_cache: the longest prompt + max_new_tokens accepted (default: the model's context).
      repeats: runs per prompt and engine (engines take turns); the fastest run is kept.
      log: progress lines.
      ngram_table: the adapter's n-gram table (`decoding.ngram`) for retrieval branches, or None.

    Returns:
      {"greedy": {"summary"}, "trees": {name: {"summary", "step_tokens", "nodes", "num_masks"}},
       "rows": [per prompt: prompt, prompt_tokens, greedy {...}, trees {name: {...}}]}.
      Row dicts hold the generated ids under "tokens" (`write_results` keeps only greedy's).
    """
    names = [t.name for t in trees]
    if len(set(names)) != len(names):
        raise ValueError(f"tree names must differ: {names}")
    engines = {GREEDY: Generator(cfg, params, max_cache=max_cache)}
    for t in trees:
        engines[t.name] = BitaGenerator(cfg, params, bita_params, t, max_cache=max_cache,
                                        ngram_table=ngram_table)
    for name, gen in engines.items():
        log(f"warm-up: {name} ...")
        warm_up(gen, prompts, max_new_tokens)
    rows = []
    for i, ids in enumerate(prompts):
        best: dict[str, dict] = {}
        for _ in range(repeats):
            for name, gen in engines.items():
                r = run_one(gen, ids, max_new_tokens)
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        greedy = best.pop(GREEDY)
        for r in best.values():
            r["identical"] = r["tokens"] == greedy["tokens"]
        row = {"prompt": texts[i][:80] if texts else None, "prompt_tokens": len(ids),
               "greedy": greedy, "trees": best}
        rows.append(row)
        log(f"  prompt {i + 1}/{len(prompts)}: {len(ids)} tok, {greedy['new_tokens']} new, greedy "
            f"{greedy['seconds']:.2f}s; " + ", ".join(
                f"{n} {r['seconds']:.2f}s x{r['tokens_per_step']:.2f}/step"
                + ("" if r["identical"] else " MISMATCH") for n, r in row["trees"].items()))
    greedy_rows = [r["greedy"] for r in rows]
    out = {"greedy": {"summary": summarize(greedy_rows)}, "trees": {}, "rows": rows}
    for t in trees:
        lay = t.layout
        out["trees"][t.name] = {
            "summary": summarize([r["trees"][t.name] for r in rows], greedy_rows),
            "step_tokens": lay.num_tokens, "nodes": lay.num_nodes, "num_masks": t.num_masks}
    return out


def markdown_table(results: dict) -> str:
    """One row for plain greedy and one per tree."""
    g = results["greedy"]["summary"]
    lines = ["| engine | step tokens | tokens/step | ms/step | tokens/s | speedup | identical |",
             "|---|---|---|---|---|---|---|",
             (f"| {GREEDY} | 1 | 1.00 | {g['ms_per_step']:.1f} | {g['tokens_per_second']:.1f} | "
              f"1.00 | {g['prompts']}/{g['prompts']} |")]
    for name, t in results["trees"].items():
        s = t["summary"]
        lines.append(f"| BiTA {name} | {t['step_tokens']} | {s['tokens_per_step']:.2f} | "
                     f"{s['ms_per_step']:.1f} | {s['tokens_per_second']:.1f} | {s['speedup']:.2f} "
                     f"| {s['identical']}/{s['prompts']} |")
    return "\n".join(lines)


def environment() -> dict:
    """Where the numbers were taken (timings are only comparable on the same machine and load)."""
    dev = jax.devices()[0]
    env = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
           "jax": jax.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if hasattr(os, "getloadavg"):
        env["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return env


def write_results(out_dir: str | os.PathLike, results: dict) -> pathlib.Path:
    """Writes `out_dir/results.json` (per-tree ids dropped: `identical` says what they were)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slim = dict(results, rows=[
        dict(r, trees={n: {k: v for k, v in t.items() if k != "tokens"}
                       for n, t in r["trees"].items()}) for r in results["rows"]])
    path = out_dir / "results.json"
    path.write_text(json.dumps(plain(slim), indent=1))
    return path


def plain(x):
    """A JSON-ready copy: numpy scalars and arrays become Python numbers and lists; dicts, lists
    and tuples are copied."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


# ---------------------------------------------------------------------------------------------
# Tree selection (see `tree_select`).


@dataclasses.dataclass
class Selection:
    """What `select_tree` measured and predicted."""

    stats: tree_select.RankStats
    predictions: list[tree_select.Prediction]
    chosen: tree_select.Prediction
    timing_prompt_tokens: int
    method: str

    def to_dict(self) -> dict:
        return {"chosen": self.chosen.tree, "method": self.method,
                "timing_prompt_tokens": self.timing_prompt_tokens,
                "stats": self.stats.to_dict(),
                "predictions": [p.to_dict() for p in self.predictions]}


def acceptance_stats(cfg: ModelConfig, params, bita_params, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int, *, greedy_tokens: Sequence[Sequence[int]] | None = None,
                     max_rank: int = tree_select.MAX_RANK, max_cache: int | None = None,
                     log: Log = quiet) -> tree_select.RankStats:
    """Teacher-forced mask ranks on the prompts' greedy continuations (generated when None)."""
    if greedy_tokens is None:
        log("greedy continuations for the acceptance statistics ...")
        ar = Generator(cfg, params, max_cache=max_cache)
        greedy_tokens = [r["tokens"] for r in run_engine(ar, prompts, max_new_tokens)]
    log("teacher-forced mask ranks ...")
    return tree_select.rank_stats(cfg, params, bita_params, list(zip(prompts, greedy_tokens)),
                                  max_rank)


def select_tree(cfg: ModelConfig, params, bita_params, trees: Sequence[Tree],
                prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                greedy_tokens: Sequence[Sequence[int]] | None = None,
                max_cache: int | None = None, method: str = "replay", timing_steps: int = 32,
                repeats: int = 3, log: Log = quiet, ngram_table=None) -> Selection:
    """Acceptance statistics on the prompts' greedy continuations, step times per tree, choice.

    Args:
      greedy_tokens: the base model's greedy continuations of `prompts` (generated when None).
      method: "replay" or "independent" (see `tree_select`).
      timing_steps, repeats: decode steps per timing, best of `repeats`; timed on the prompt with
        the longest continuation, at the bench's shape bucket.
      ngram_table: the adapter's n-gram table, in the replay and the engines, or None.
    """
    ar = Generator(cfg, params, max_cache=max_cache)
    if greedy_tokens is None:
        log("greedy continuations for the acceptance statistics ...")
        greedy_tokens = [r["tokens"] for r in run_engine(ar, prompts, max_new_tokens)]
    max_rank = max([tree_select.MAX_RANK] + [t.layout.max_rank for t in trees])
    stats = acceptance_stats(cfg, params, bita_params, prompts, max_new_tokens,
                             greedy_tokens=greedy_tokens, max_rank=max_rank, log=log)
    stats.ngram = ngram_table
    ids = prompts[int(np.argmax([len(t) for t in greedy_tokens]))]
    gens = {GREEDY: ar, **{t.name: BitaGenerator(cfg, params, bita_params, t, max_cache=max_cache,
                                                 ngram_table=ngram_table) for t in trees}}
    for name, gen in gens.items():
        log(f"compiling {name} ...")
        warm_up(gen, [ids], max_new_tokens)
    log(f"timing {timing_steps} steps x {repeats} per engine ({len(ids)} prompt tokens) ...")
    times = tree_select.step_seconds(gens, ids, max_new_tokens, timing_steps, repeats)
    t_ar = times.pop(GREEDY)
    preds = tree_select.predict(trees, stats, times, t_ar, method)
    return Selection(stats, preds, tree_select.select(preds), len(ids), method)
