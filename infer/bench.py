"""BiTA vs plain greedy decoding: per-prompt speed, tokens per step, identical ids (batch 1).

    python infer/bench.py --prompts sharegpt --limit 8 --max-new-tokens 128 --out runs/bench
    python infer/bench.py --prompts humaneval --tree chain,upper-triangle --out runs/bench-he
    python infer/bench.py --prompts my.jsonl --adapter random:0 --tree chain@2 --out /tmp/b
    python infer/bench.py --prompts sharegpt --select --out runs/select     # pick the tree
    python infer/bench.py --prompts sharegpt --limit 30 --max-new-tokens 256 --save-acceptance \
        --out runs/acc    # the adapter's acceptance statistics, which --tree auto reads

Both engines are the same jitted code (`Generator`, `BitaGenerator`), compiled and run once per
shape bucket before any timing; each prompt then runs plain greedy and every tree in turn.
Writes OUT/results.json (per-tree summary and per-prompt rows) and prints a Markdown table.
ShareGPT prompts (and code-alpaca, alpaca-seeds: the other training sources) come from the
held-out `selection` split by default (never trained on; kept apart from the `test` split that
the report's headline numbers use, see bita_jax/data/prompts.py), since this tool is for choosing
trees and adapters; HumanEval prompts are raw code, other sources get the chat template.

--tree: comma-separated `upper-triangle[:K] | chain | full[:K]` (+ `-pruned`) | FILE.json, each
optionally `@D` to build it for D of the adapter's masks (e.g. `chain@2`).
--select: measure acceptance statistics (teacher forcing on the prompts' greedy continuations)
and the step time of each candidate on this machine, predict tokens/step and speedup, choose the
fastest, then bench the candidates (--select-bench; `none` writes OUT/selection.json only)
and print predicted vs measured.
Candidates: --tree if given, else a default list from a 1-mask chain to the paper's tree.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli import (  # noqa: E402
    add_dtype_argument,
    add_mesh_argument,
    fail,
    only_main_process_prints,
    run_main,
    status,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", default="sharegpt",
                   help="sharegpt | humaneval | code-alpaca | alpaca-seeds | FILE.jsonl")
    p.add_argument("--split", default=None,
                   help="train | heldout | selection | test | all (heldout = selection + test; "
                        "default: selection for the training sources sharegpt, code-alpaca and "
                        "alpaca-seeds, else all)")
    p.add_argument("--limit", type=int, default=8, help="number of prompts")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="skip longer prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", required=True, help="directory for results.json")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), HF model directory, or .gguf file")
    p.add_argument("--adapter", default="default", help="default | DIR | random:SEED[:M]")
    p.add_argument("--tree", default=None,
                   help="comma-separated trees (default: upper-triangle; with --select: a list)")
    p.add_argument("--select", action="store_true",
                   help="predict the best tree for this machine, then bench the candidates")
    p.add_argument("--method", default="replay", choices=["replay", "independent"],
                   help="--select: tokens/step predictor (see bita_jax/tree_select.py)")
    p.add_argument("--select-bench", default="all", choices=["all", "chosen", "none"],
                   help="--select: which candidates to bench afterwards (default all)")
    p.add_argument("--save-acceptance", action="store_true",
                   help="only measure the adapter's acceptance statistics (teacher-forced mask "
                        "ranks on the prompts' greedy continuations) and save them beside it as "
                        "acceptance.npz, which `--tree auto` reads; prints each candidate tree's "
                        "predicted tokens per step")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per prompt and engine, engines taking turns; the fastest is kept")
    p.add_argument("--max-cache", type=int, default=None,
                   help="longest prompt + --max-new-tokens accepted (default: the model's context "
                        "length); the cache itself is sized per request: prompt and output "
                        "rounded up to powers of two, plus headroom")
    add_dtype_argument(p)
    add_mesh_argument(p)
    return p.parse_args(argv)


def save_acceptance(llm, prompts, args) -> int:
    """--save-acceptance: the adapter's rank statistics into ADAPTER/acceptance.npz."""
    from bita_jax.eval import auto_tree, bench, tree_select

    adapter = pathlib.Path(llm.adapter)
    if not adapter.is_dir():
        return fail(ValueError(f"--save-acceptance needs an adapter directory, got "
                               f"{llm.adapter!r}"))
    stats = bench.acceptance_stats(llm.cfg, llm.params, llm.bita_params, prompts,
                                   args.max_new_tokens, max_cache=args.max_cache, log=status)
    path = auto_tree.save_acceptance(adapter, stats)
    stats.ngram = llm.ngram_table  # what decoding's retrieval branches use beside the lookup
    summary = stats.to_dict()
    print(f"top-1 per mask {summary['top1']}, top-5 {summary['top5']} "
          f"({summary['anchors']} anchors of {summary['texts']} texts)")
    for tree in auto_tree.candidates_for(llm.method, llm.bita_config.num_masks, lookup=True,
                                         dynamic=True):
        tps = tree_select.predicted_tokens_per_step(tree, stats)
        print(f"  {tree.name:24s} {tree.layout.num_tokens:3d} step tokens, predicted "
              f"{tps:.2f} tokens/step")
    status(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import bita_jax
    from bita_jax import distributed
    from bita_jax.data.prompts import load_prompts
    from bita_jax.decoding import Generator
    from bita_jax.eval import bench, tree_select

    distributed.initialize()
    only_main_process_prints(distributed.is_main_process())
    try:
        split = args.split or bench.default_split(args.prompts)
        texts = load_prompts(args.prompts, split, args.limit, args.max_prompt_chars)
        if not texts:
            raise ValueError(f"no prompts from {args.prompts!r} (split {split})")
        status(f"loading {args.model} and adapter {args.adapter} ...")
        llm = bita_jax.load(args.model, adapter=args.adapter, tree="chain", dtype=args.dtype,
                            mesh=args.mesh)
        if not llm.has_bita:
            raise ValueError(f"no adapter ({args.adapter!r}): pass --adapter DIR or random:SEED")
        bita_params, bcfg = llm.bita_params, llm.bita_config
        names = args.tree.split(",") if args.tree else (
            bench.default_candidates(bcfg.num_masks) if args.select else ["upper-triangle"])
        trees = [bench.make_tree(n.strip(), bcfg.num_masks) for n in names if n.strip()]
        too_wide = [t.name for t in trees if t.dynamic and t.dynamic_top_k > tree_select.TOP_LOGP]
        if args.select and too_wide:  # the replay has the top TOP_LOGP log-probabilities only
            raise ValueError(f"--select replays dynamic trees of up to K={tree_select.TOP_LOGP} "
                             f"ranks per level, not {', '.join(too_wide)}: lower K")
        prompts = bench.encode_prompts(llm.tokenizer, texts, raw=args.prompts == "humaneval")
        check = Generator(llm.cfg, llm.params, max_cache=args.max_cache)
        for ids in prompts:  # fail fast, before compiling
            check.shapes([len(ids)], args.max_new_tokens)
    except (ValueError, FileNotFoundError, OSError) as e:
        return fail(e)
    cfg, params = llm.cfg, llm.params
    status(f"{len(prompts)} prompts ({args.prompts}, {split}), {args.max_new_tokens} new tokens, "
           f"M={bcfg.num_masks}, trees: {', '.join(t.name for t in trees)}")
    if args.save_acceptance:
        return save_acceptance(llm, prompts, args)
    selection = None
    if args.select:
        selection = bench.select_tree(cfg, params, bita_params, trees, prompts,
                                      args.max_new_tokens, max_cache=args.max_cache,
                                      method=args.method, log=status,
                                      ngram_table=llm.ngram_table)
        print(f"## Predicted (chosen: {selection.chosen.tree})\n")
        print(tree_select.table(selection.predictions, chosen=selection.chosen.tree) + "\n",
              flush=True)
        print("## Mask accuracy by response position\n")
        print(tree_select.position_table(selection.stats) + "\n", flush=True)
    config = {"model": llm.name, "adapter": args.adapter, "num_masks": bcfg.num_masks,
              "source": args.prompts, "split": split, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
              "repeats": args.repeats, **bench.environment()}
    if selection is not None and args.select_bench == "none":
        path = pathlib.Path(args.out) / "selection.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config": config, "selection": selection.to_dict()}, indent=1))
        status(f"wrote {path}")
        return 0
    if selection is not None and args.select_bench == "chosen":
        trees = [t for t in trees if t.name == selection.chosen.tree]
    results = bench.run_bench(cfg, params, bita_params, trees, prompts, args.max_new_tokens,
                              texts=texts, max_cache=args.max_cache, repeats=args.repeats,
                              log=status, ngram_table=llm.ngram_table)
    results["config"] = config
    if selection is not None:
        results["selection"] = selection.to_dict()
    path = bench.write_results(args.out, results)
    print(bench.markdown_table(results))
    if selection is not None:
        measured = {n: t["summary"] for n, t in results["trees"].items()}
        print(f"\n## Predicted vs measured (chosen: {selection.chosen.tree})\n")
        print(tree_select.table(selection.predictions, measured, selection.chosen.tree))
    status(f"wrote {path}")
    g = results["greedy"]["summary"]
    mismatched = [n for n, t in results["trees"].items()
                  if t["summary"]["identical"] != g["prompts"]]
    if mismatched:
        status(f"error: BiTA output differs from plain greedy for {', '.join(mismatched)}")
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
