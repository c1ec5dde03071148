"""The speed report: BiTA against what a user would pick instead, measured side by side.

Engines, per prompt set, on the same prompts and lengths, batch 1, after warm-up:

    HF greedy          transformers `generate(do_sample=False)` on the same weights (torch, CPU)
    HF prompt lookup   transformers prompt-lookup decoding (`prompt_lookup_num_tokens`)
    plain greedy       our jitted greedy loop (`Generator`)
    BiTA <tree>        our lossless BiTA loop (`BitaGenerator`), one per tree, plus the tree that
                       `bench.select_tree` picks for this machine (marked `selected`)
    SPACE greedy       with a SPACE adapter: plain greedy of the fine-tuned model (LoRA merged)
    SPACE <tree>       SPACE's decoding of that model (its chain, or `chain@D` with D masks),
                       which must equal SPACE greedy

Each prompt runs every engine in turn (engines interleaved per prompt), so a change of machine
load hits all of them alike. Per engine: tokens/s, tokens per step (model calls after the
prefill; HF calls are counted with a forward hook), ms per step, speedup over HF greedy and over
our plain greedy, and how many outputs equal HF greedy's and our greedy's token for token. The
SPACE engines add their speedup over and equality with the fine-tuned model's own greedy, and
how far they drift from the base model's: the mean common prefix with our (base) greedy.

torch and transformers are only needed for the two HF engines (`hf=False` skips them).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.engine import Engine
from bita_jax.eval import bench
from bita_jax.models.bita_params import decoding_params

HF_GREEDY = "HF greedy"
HF_LOOKUP = "HF prompt lookup"
OURS = bench.GREEDY  # "plain greedy"
SPACE_GREEDY = "SPACE greedy"  # the fine-tuned model's own greedy
Log = Callable[[str], None]


class HFEngine:
    """transformers greedy `generate` (optionally with prompt lookup), one prompt at a time."""

    def __init__(self, hf_model, eos_id: int, prompt_lookup: int = 0):
        self.model, self.eos_id, self.prompt_lookup = hf_model, eos_id, prompt_lookup
        self.calls = 0
        hf_model.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def run(self, ids: Sequence[int], max_new_tokens: int) -> dict:
        import torch

        kw = {"prompt_lookup_num_tokens": self.prompt_lookup} if self.prompt_lookup else {}
        calls0 = self.calls
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(torch.tensor([list(ids)]), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=self.eos_id,
                                      pad_token_id=self.eos_id, **kw)
        seconds = time.perf_counter() - t0
        tokens = out[0, len(ids):].tolist()
        steps = max(self.calls - calls0 - 1, 0)  # the first call is the prefill
        return {"tokens": tokens, "new_tokens": len(tokens), "seconds": seconds, "steps": steps,
                "tokens_per_step": (len(tokens) - 1) / steps if steps else 1.0}


def load_hf_model(source: pathlib.Path):
    """The same weights in transformers (fp32, eval): a .gguf file or a HF model directory."""
    import torch
    import transformers

    source = pathlib.Path(source)
    if source.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    return model.eval()


def hf_engines(source: pathlib.Path, eos_id: int, prompt_lookup: int = 10) -> dict:
    """{HF greedy, HF prompt lookup} sharing one transformers model."""
    model = load_hf_model(source)
    return {HF_GREEDY: HFEngine(model, eos_id), HF_LOOKUP: HFEngine(model, eos_id, prompt_lookup)}


def _ours_run(gen: Engine) -> Callable[[Sequence[int], int], dict]:
    def run(ids, max_new_tokens):
        r = gen.generate([list(ids)], max_new_tokens)
        return {"tokens": r.tokens[0], "new_tokens": len(r.tokens[0]), "seconds": r.seconds,
                "steps": r.row_steps[0], "tokens_per_step": r.tokens_per_step,
                "step_hist": r.step_hist[0], "plain_steps": r.plain_steps}

    return run


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(rows: Sequence[dict], hf_rows: Sequence[dict] | None,
              ours_rows: Sequence[dict], own_rows: Sequence[dict] | None = None) -> dict:
    """Totals of one engine over a prompt set, with speedups and identical counts (`own_rows`:
    the fine-tuned model's greedy that a SPACE engine is lossless against)."""
    out = bench.summarize(rows)
    seconds = out["seconds"]
    ours_s = sum(r["seconds"] for r in ours_rows)
    out.update(speedup_vs_ours=ours_s / seconds if seconds else 0.0,
               identical_ours=sum(r["tokens"] == o["tokens"] for r, o in zip(rows, ours_rows)),
               common_prefix_ours=float(np.mean([common_prefix(r["tokens"], o["tokens"])
                                                 for r, o in zip(rows, ours_rows)])))
    if own_rows is not None:
        own_s = sum(r["seconds"] for r in own_rows)
        out.update(speedup_vs_own=own_s / seconds if seconds else 0.0,
                   identical_own=sum(r["tokens"] == o["tokens"] for r, o in zip(rows, own_rows)))
    if hf_rows is not None:
        hf_s = sum(r["seconds"] for r in hf_rows)
        out["speedup_vs_hf"] = hf_s / seconds if seconds else 0.0
        out["identical_hf"] = sum(r["tokens"] == h["tokens"] for r, h in zip(rows, hf_rows))
    if rows and "step_hist" in rows[0]:
        out["step_hist"] = np.sum([r["step_hist"] for r in rows], axis=0).tolist()
        out["plain_steps"] = sum(r.get("plain_steps", 0) for r in rows)
    return out


def run_set(engines: dict[str, Callable[[Sequence[int], int], dict]],
            prompts: Sequence[Sequence[int]], max_new_tokens: int, *, repeats: int = 1,
            log: Log = bench.quiet) -> dict:
    """Every engine on every prompt, engines taking turns per prompt; the fastest of `repeats`.

    Returns {"rows": [per prompt {prompt_tokens, engines: {name: row}}], "summary": {name: ...}}.
    Rows keep the generated ids under "tokens".
    """
    rows = []
    for i, ids in enumerate(prompts):
        best: dict[str, dict] = {}
        for _ in range(repeats):
            for name, run in engines.items():
                r = run(ids, max_new_tokens)
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        rows.append({"prompt_tokens": len(ids), "engines": best})
        ours = best[OURS]
        log(f"  prompt {i + 1}/{len(prompts)}: {len(ids)} tok, {ours['new_tokens']} new; " +
            ", ".join(f"{n} {r['seconds']:.2f}s" + (
                f" x{r['tokens_per_step']:.2f}/step" if r["steps"] else "") +
                ("" if r["tokens"] == ours["tokens"] else " (differs)")
                for n, r in best.items()))
    per = {n: [r["engines"][n] for r in rows] for n in engines}
    hf, own = per.get(HF_GREEDY), per.get(SPACE_GREEDY)
    return {"rows": rows, "summary": {
        n: summarize(per[n], hf, per[OURS], own if n.startswith("SPACE") else None)
        for n in engines}}


def run_report(loaded, bita_params, trees,
               prompt_sets: dict[str, tuple[list[str], list[list[int]]]],
               max_new_tokens: int, *, selection=None, hf: dict | None = None,
               max_cache: int | None = None, repeats: int = 1, log: Log = bench.quiet,
               space: tuple | None = None, fallbacks: dict | None = None,
               ngram_table=None, without_table: bool = False) -> dict:
    """The whole report.

    Args:
      loaded: the base model (`checkpoints.LoadedModel`).
      bita_params: the adapter.
      trees: BiTA trees (`bench.make_tree`); the selected tree is added if not among them.
      prompt_sets: {set name: (prompt texts, prompt ids)}.
      max_new_tokens: new tokens per prompt.
      selection: a `bench.Selection` (its chosen tree is marked), or None.
      hf: `hf_engines(...)`, or None to leave the HF engines out.
      repeats: runs per prompt and engine (the fastest kept).
      space: (params, BitaConfig, trees) of a SPACE adapter, or None: adds SPACE greedy and
        one SPACE engine per tree.
      fallbacks: {tree name: `Fallback`}: adds "BiTA {tree} +fallback", that tree switching to
        plain steps where its drafts do not pay.
      ngram_table: the adapter's n-gram table (`decoding.ngram`), which the BiTA engines'
        retrieval branches use, or None; `without_table` adds "BiTA {tree} -ngram" for each tree
        with a retrieval branch: the same tree on prompt lookup alone (the table's share).

    Returns a JSON-ready dict: {"engines": {name: {kind, tree, step_tokens, nodes}},
    "selected": name or None, "sets": {set: {"prompts", "rows", "summary"}}}.
    """
    cfg, params = loaded.cfg, loaded.params
    trees = list(trees)
    selected = None
    if selection is not None:
        selected = selection.chosen.tree
        if selected not in [t.name for t in trees]:
            trees.append(bench.make_tree(selected, bita_params["mask_embed"].shape[0]))
    ours = Generator(cfg, params, max_cache=max_cache)
    gens = {OURS: ours, **{f"BiTA {t.name}": BitaGenerator(cfg, params, bita_params, t,
                                                           max_cache=max_cache,
                                                           ngram_table=ngram_table)
                           for t in trees}}
    info = {n: {"kind": "hf"} for n in (hf or {})}
    info[OURS] = {"kind": "ours", "tree": None, "step_tokens": 1}
    for t in trees:
        info[f"BiTA {t.name}"] = {"kind": "bita", "tree": t.name,
                                  "step_tokens": t.layout.num_tokens,
                                  "nodes": t.layout.num_nodes, "selected": t.name == selected}
        fallback = (fallbacks or {}).get(t.name)
        if fallback is not None:
            name = f"BiTA {t.name} +fallback"
            gens[name] = BitaGenerator(cfg, params, bita_params, t, max_cache=max_cache,
                                       fallback=fallback, ngram_table=ngram_table)
            info[name] = {**info[f"BiTA {t.name}"], "selected": False,
                          "break_even": fallback.break_even}
        if without_table and ngram_table is not None and t.lookup:
            name = f"BiTA {t.name} -ngram"
            gens[name] = BitaGenerator(cfg, params, bita_params, t, max_cache=max_cache)
            info[name] = {**info[f"BiTA {t.name}"], "selected": False}
    if space is not None:
        space_params, space_cfg, space_trees = space
        tuned, masks = decoding_params(params, space_params, space_cfg)
        gens[SPACE_GREEDY] = Generator(cfg, tuned, max_cache=max_cache)
        info[SPACE_GREEDY] = {"kind": "space-greedy", "tree": None, "step_tokens": 1}
        for t in space_trees:
            gens[f"SPACE {t.name}"] = BitaGenerator(cfg, tuned, masks, t, max_cache=max_cache)
            info[f"SPACE {t.name}"] = {"kind": "space", "tree": t.name,
                                       "step_tokens": t.layout.num_tokens,
                                       "nodes": t.layout.num_nodes}
    engines = {**{n: e.run for n, e in (hf or {}).items()},
               **{n: _ours_run(g) for n, g in gens.items()}}
    all_prompts = [ids for _, ids in prompt_sets.values() for ids in ids]
    for name, gen in gens.items():
        log(f"warm-up: {name} ...")
        bench.warm_up(gen, all_prompts, max_new_tokens)
    for name, e in (hf or {}).items():
        log(f"warm-up: {name} ...")
        e.run(all_prompts[0], 8)
    sets = {}
    for set_name, (texts, prompts) in prompt_sets.items():
        log(f"{set_name}: {len(prompts)} prompts, {max_new_tokens} new tokens")
        res = run_set(engines, prompts, max_new_tokens, repeats=repeats, log=log)
        sets[set_name] = {"prompts": [t[:80] for t in texts], **res}
    return {"engines": info, "selected": f"BiTA {selected}" if selected else None, "sets": sets}


def lossless_failures(report: dict) -> list[str]:
    """'set: engine' for every BiTA engine whose ids differ from our plain greedy on a prompt,
    and every SPACE chain whose ids differ from its fine-tuned model's greedy."""
    def fails(name, sm):
        kind = report["engines"][name]["kind"]
        return ((kind == "bita" and sm["identical_ours"] != sm["prompts"])
                or (kind == "space" and sm["identical_own"] != sm["prompts"]))

    return [f"{s}: {n}" for s, res in report["sets"].items() for n, sm in res["summary"].items()
            if fails(n, sm)]


def markdown(report: dict) -> str:
    """One table per prompt set."""
    out = []
    for set_name, res in report["sets"].items():
        summary = res["summary"]
        hf = HF_GREEDY in summary
        out += [(f"**{set_name}** ({summary[OURS]['prompts']} prompts, "
                 f"{summary[OURS]['new_tokens']} new tokens per engine)"), "",
                ("| engine | step tokens | tokens/step | ms/step | tokens/s | vs HF greedy | "
                 "vs our greedy | = HF greedy | = our greedy |"),
                "|---|---|---|---|---|---|---|---|---|"]
        for name, s in summary.items():
            e = report["engines"][name]
            label = name + (" (selected)" if e.get("selected") else "")
            if "break_even" in e:
                label += (f" (break-even {e['break_even']:.2f}; {s['plain_steps']} of "
                          f"{s['steps']} steps plain)")
            n = s["prompts"]
            out.append(
                f"| {label} | {e.get('step_tokens', '-')} | {s['tokens_per_step']:.2f} | "
                f"{s['ms_per_step']:.1f} | {s['tokens_per_second']:.1f} | "
                + (f"{s['speedup_vs_hf']:.2f}x | " if hf else "- | ")
                + f"{s['speedup_vs_ours']:.2f}x | "
                + (f"{s['identical_hf']}/{n} | " if hf else "- | ")
                + f"{s['identical_ours']}/{n} |")
        out.append("")
        space = [n for n in summary if n.startswith("SPACE")]
        if space:
            out += ["SPACE against its fine-tuned model's greedy (lossless) and the base model's "
                    "(drift):", "",
                    "| engine | tokens/step | vs own greedy | vs base greedy | = own greedy | "
                    "= base greedy | common prefix with base greedy (tokens) |",
                    "|---|---|---|---|---|---|---|"]
            for name in space:
                s, n = summary[name], summary[name]["prompts"]
                out.append(f"| {name} | {s['tokens_per_step']:.2f} | {s['speedup_vs_own']:.2f}x | "
                           f"{s['speedup_vs_ours']:.2f}x | {s['identical_own']}/{n} | "
                           f"{s['identical_ours']}/{n} | {s['common_prefix_ours']:.1f} |")
            out.append("")
    return "\n".join(out)


def slim(report: dict) -> dict:
    """The report without generated ids (the identical counts say what they were); our greedy's
    ids are kept so a later run can be compared."""
    out = bench.plain(report)
    for res in out["sets"].values():
        for row in res["rows"]:
            for name, r in row["engines"].items():
                if name != OURS:
                    r.pop("tokens", None)
    return out
