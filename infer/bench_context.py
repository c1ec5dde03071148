"""Speed against prompt length: time to first token and decode speed, HF beside ours (one run).

    python infer/bench_context.py --out runs/context
    python infer/bench_context.py --lengths 250,1000 --max-new-tokens 64 --no-hf --out /tmp/c

For each --lengths, a chat prompt of about that many tokens is built from held-out ShareGPT
prompts (the `test` split: questions people asked, then "summarize them"). HF transformers
greedy, our plain greedy and BiTA (--tree, default auto: the tree chosen for each prompt length,
or plain decoding where none is predicted to win) take turns over --repeats rounds, the fastest
run kept. Prints a Markdown table (time to first token, decode ms/step, tokens/step,
decode and end-to-end tokens/s, against the FLOP and byte floors measured in the same run) and
writes OUT/results.json and OUT/context.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli import fail, run_main, status  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), HF model directory, or .gguf file")
    p.add_argument("--adapter", default="default", help="default | DIR | random:SEED[:M] | none")
    p.add_argument("--tree", default="auto", help="the BiTA tree (default: auto)")
    p.add_argument("--lengths", default="250,1000,2000,4000", help="comma-separated prompt tokens")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="rounds; the fastest run is kept")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers (needs torch)")
    p.add_argument("--out", required=True, help="directory for results.json and context.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    import bita_jax
    from bita_jax.data.prompts import load_prompts
    from bita_jax.eval import context_bench

    try:
        lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
        if not lengths or min(lengths) < 16:
            raise ValueError(f"--lengths must be integers >= 16, got {args.lengths!r}")
        if args.max_new_tokens < 2:
            raise ValueError("--max-new-tokens must be at least 2")
        status(f"loading {args.model} and adapter {args.adapter} ...")
        llm = bita_jax.load(args.model, adapter=args.adapter, tree=args.tree,
                            max_cache=None)
        context = llm.cfg.max_position_embeddings
        if max(lengths) + args.max_new_tokens > context:
            raise ValueError(f"--lengths up to {max(lengths)} plus --max-new-tokens "
                             f"{args.max_new_tokens} exceed the model's context of {context}")
        texts = load_prompts("sharegpt", split="test")
        prompts = {n: context_bench.long_prompt(llm.tokenizer, texts, n) for n in lengths}
    except (ValueError, FileNotFoundError, OSError) as e:
        return fail(e)
    trees = {len(p): llm.tree_for(len(p)) if llm.has_bita else None for p in prompts.values()}
    status(f"prompts of {', '.join(str(n) for n in trees)} tokens; trees "
           f"{', '.join(t.name if t else 'plain' for t in trees.values())}; "
           f"{args.repeats} rounds")
    rows, floors = context_bench.run_context_bench(
        llm, prompts, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        hf=not args.no_hf, log=status)
    print(f"\nFloors measured in this run: {floors.flops_per_s / 1e9:.0f} GFLOP/s (256-row "
          f"products), {floors.bytes_per_s / 1e9:.1f} GB/s (1-row products).\n")
    print(context_bench.markdown_table(rows), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": {**vars(args), "machine": platform.processor() or platform.machine(),
                          "backend": jax.default_backend(),
                          "tree": llm.tree.name if llm.has_bita else None,
                          "trees_by_length": {n: t.name if t else None
                                              for n, t in trees.items()}},
               "floors": dataclasses.asdict(floors), "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    context_bench.plot(rows, out / "context.png")
    status(f"wrote {out / 'results.json'} and {out / 'context.png'}")
    return 0


if __name__ == "__main__":
    run_main(main)
