"""Speed report: HF greedy, HF prompt lookup, our plain greedy and BiTA trees, side by side.

    python infer/report.py --out runs/report                       # ShareGPT test split + HumanEval
    python infer/report.py --sets sharegpt --limit 4 --max-new-tokens 64 --no-hf --out /tmp/r

On the same prompts and lengths, in one run, after warm-up, batch 1, each prompt runs every
engine in turn (see bita_jax/report.py). Before that, the tree-selection helper picks a tree for
this machine from the candidates (--trees) using calibration prompts that the report does not
time (--calibration); the picked tree is marked. ShareGPT prompts (like code-alpaca and
alpaca-seeds, the other training sources) come from the held-out split, never trained on: the
timed set from its `test` part, the calibration prompts from its `selection` part
(bita_jax/data/prompts.py), so the tree is not chosen on the prompts it is reported on. For
other sources the calibration prompts are the ones after the first set's own.

Writes OUT/results.json, OUT/report.md (one Markdown table per prompt set) and three PNGs:
tokens_per_step_hist.png, speedup_per_prompt.png, step_time_vs_tokens_per_step.png.
Exits 1 if any BiTA output differs from plain greedy (it never should: BiTA is lossless), or a
SPACE chain's from its fine-tuned model's greedy (--space-adapter).
The HF engines need torch (requirements-test.txt); --no-hf leaves them out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli import (  # noqa: E402
    add_mesh_argument,
    fail,
    only_main_process_prints,
    run_main,
    status,
)

DEFAULT_TREES = "chain@1,chain,upper-triangle-pruned,upper-triangle"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", default="sharegpt,humaneval",
                   help="comma-separated prompt sets: sharegpt (the held-out test split), "
                        "humaneval (raw code), or JSON/JSONL files (chat template)")
    p.add_argument("--limit", type=int, default=6, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="skip longer prompts")
    p.add_argument("--trees", default=DEFAULT_TREES, help=f"BiTA trees (default {DEFAULT_TREES})")
    p.add_argument("--no-select", action="store_true", help="do not run the tree selection")
    p.add_argument("--calibration", type=int, default=3,
                   help="prompts for the tree selection, from the first set: its held-out "
                        "selection split for a training source (sharegpt, code-alpaca, "
                        "alpaca-seeds), else the prompts after the set's own")
    p.add_argument("--no-hf", action="store_true", help="leave out the HF transformers engines")
    p.add_argument("--fallback", action="store_true",
                   help="also run each BiTA tree switching to plain steps where its drafts do not "
                        "pay (break-even: the tree's step cost over a plain step's on this "
                        "machine, the --tree auto curve)")
    p.add_argument("--ngram", choices=("on", "off", "both"), default="on",
                   help="the adapter's n-gram table in retrieval branches: on (default), off, or "
                        "both (adds each lookup tree without it, 'BiTA TREE -ngram')")
    p.add_argument("--prompt-lookup", type=int, default=10,
                   help="HF prompt_lookup_num_tokens (default 10)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per prompt and engine, engines taking turns; the fastest is kept")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), HF model directory, or .gguf file")
    p.add_argument("--adapter", default="default", help="default | DIR | random:SEED[:M]")
    p.add_argument("--space-adapter", default=None,
                   help="a SPACE adapter directory: adds SPACE greedy (its fine-tuned model) and "
                        "SPACE engines (--space-trees), with their drift from the base model's "
                        "greedy")
    p.add_argument("--space-trees", default="chain,chain@2",
                   help="trees of the SPACE engines (default chain,chain@2: every mask, or two)")
    p.add_argument("--max-cache", type=int, default=None,
                   help="longest prompt + --max-new-tokens accepted (default: the model's context "
                        "length); the cache itself is sized per request: prompt and output "
                        "rounded up to powers of two, plus headroom")
    p.add_argument("--out", required=True, help="output directory")
    add_mesh_argument(p)
    return p.parse_args(argv)


def _set_prompts(source: str, limit: int, max_chars: int, tokenizer, role: str = "test",
                 skip: int = 0):
    """Prompts of one set: `source`'s `role` split (`bench.default_split`), after `skip`."""
    from bita_jax.data.prompts import load_prompts
    from bita_jax.eval import bench

    split = bench.default_split(source, role)
    texts = load_prompts(source, split, skip + limit, max_chars)[skip:]
    if not texts:
        raise ValueError(f"no prompts from {source!r} (split {split})")
    return texts, bench.encode_prompts(tokenizer, texts, raw=source == "humaneval")


def main(argv=None) -> int:
    args = parse_args(argv)
    import bita_jax
    from bita_jax import distributed
    from bita_jax.checkpoints import loading
    from bita_jax.decoding import GenerationError, Generator
    from bita_jax.eval import bench, plots
    from bita_jax.eval import report as report_lib

    distributed.initialize()
    only_main_process_prints(distributed.is_main_process())
    try:
        if args.limit < 1 or (args.calibration < 1 and not args.no_select):
            raise ValueError("--limit and --calibration must be >= 1")
        sources = [s.strip() for s in args.sets.split(",") if s.strip()]
        if not sources:
            raise ValueError("--sets is empty")
        status(f"loading {args.model} and adapter {args.adapter} ...")
        llm = bita_jax.load(args.model, adapter=args.adapter, tree="chain", mesh=args.mesh)
        if not llm.has_bita:
            raise ValueError(f"no adapter ({args.adapter!r}): pass --adapter DIR or random:SEED")
        loaded, bita_params, bcfg = llm.loaded, llm.bita_params, llm.bita_config
        space = None
        if args.space_adapter:
            space_params, space_cfg, _ = loading.load_bita(args.space_adapter, loaded)
            if space_cfg.method != "space":
                raise ValueError(f"--space-adapter {args.space_adapter} is a {space_cfg.method} "
                                 "adapter: pass it with --adapter")
            space = (space_params, space_cfg,
                     [bench.make_tree(n.strip(), space_cfg.num_masks)
                      for n in args.space_trees.split(",") if n.strip()])
        trees = [bench.make_tree(n.strip(), bcfg.num_masks) for n in args.trees.split(",")
                 if n.strip()]
        sets = {s: _set_prompts(s, args.limit, args.max_prompt_chars, loaded.tokenizer)
                for s in sources}
        calibration = None
        if not args.no_select:
            # disjoint from the timed set: another split, or (one split) the prompts after it
            same = bench.default_split(sources[0], "selection") == \
                bench.default_split(sources[0], "test")
            calibration = _set_prompts(sources[0], args.calibration, args.max_prompt_chars,
                                       loaded.tokenizer, role="selection",
                                       skip=args.limit if same else 0)[1]
        check = Generator(loaded.cfg, loaded.params, max_cache=args.max_cache)
        for _, ids in list(sets.values()) + [([], calibration or [])]:
            for p in ids:  # fail fast, before compiling
                check.shapes([len(p)], args.max_new_tokens)
        hf = None
        if not args.no_hf:
            try:
                import torch
            except ImportError:
                raise ValueError("the HF engines need torch: pip install -r requirements-test.txt"
                                 " (torch first), or pass --no-hf") from None
            status("loading the same weights in HF transformers ...")
            hf = report_lib.hf_engines(loaded.source, loaded.cfg.eos_token_ids[0],
                                       args.prompt_lookup)
    except (ValueError, FileNotFoundError, OSError, GenerationError) as e:
        return fail(e)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": loaded.name, "adapter": args.adapter, "num_masks": bcfg.num_masks,
              "sets": sources, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
              "splits": {s: bench.default_split(s, "test") for s in sources},
              "calibration_split": None if calibration is None else
              bench.default_split(sources[0], "selection"),
              "trees": [t.name for t in trees], "ngram": args.ngram,
              "ngram_table": llm.ngram_table is not None, "prompt_lookup": None if args.no_hf else
              args.prompt_lookup, "repeats": args.repeats, **bench.environment()}
    if hf is not None:
        import torch

        config.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    selection = None
    if calibration:
        status(f"tree selection on {len(calibration)} calibration prompts ...")
        selection = bench.select_tree(loaded.cfg, loaded.params, bita_params, trees,
                                      calibration, args.max_new_tokens,
                                      max_cache=args.max_cache, log=status,
                                      ngram_table=None if args.ngram == "off"
                                      else llm.ngram_table)
        status(f"selected: {selection.chosen.tree}")
    fallbacks = None
    if args.fallback:
        from bita_jax.decoding.fallback import Fallback
        from bita_jax.eval import auto_tree

        cost = auto_tree.CostCurve(loaded.cfg, llm.params, loaded.fingerprint).at(
            auto_tree.CONTEXT)
        fallbacks = {t.name: Fallback(round(cost(t.layout.num_tokens) / cost(1), 3))
                     for t in trees}
        config["fallback_break_even"] = {n: f.break_even for n, f in fallbacks.items()}
    report = report_lib.run_report(loaded, bita_params, trees, sets, args.max_new_tokens,
                                   selection=selection, hf=hf, max_cache=args.max_cache,
                                   repeats=args.repeats, log=status, space=space,
                                   fallbacks=fallbacks,
                                   ngram_table=None if args.ngram == "off" else llm.ngram_table,
                                   without_table=args.ngram == "both")
    report["config"] = config
    if selection is not None:
        report["selection"] = selection.to_dict()
    (out / "results.json").write_text(json.dumps(report_lib.slim(report), indent=1))
    table = report_lib.markdown(report)
    (out / "report.md").write_text(table)
    paths = plots.report_plots(report, out)
    print(table)
    status(f"wrote {out / 'results.json'}, {out / 'report.md'}, " +
           ", ".join(p.name for p in paths))
    failures = report_lib.lossless_failures(report)
    if failures:
        status(f"error: BiTA output differs from plain greedy: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
