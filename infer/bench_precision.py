"""Is BiTA lossless in each precision? BiTA against plain greedy of the same base, same dtype.

    python infer/bench_precision.py --out runs/precision                  # 80 prompts x 256
    python infer/bench_precision.py --dtypes bfloat16 --limit 8 --max-new-tokens 64 --out /tmp/p

For each --dtypes (float32; bfloat16: bf16 weights, fp32 activations, the accelerator mode;
bfloat16-pure: bf16 activations too), decodes held-out ShareGPT `test` prompts with plain greedy
and with BiTA (--tree), batch 1, and counts the prompts whose outputs are identical; at each first
difference it reports the top-2 logit gap (a rounding-level gap: a near tie; a large one: a bug).
Also counts how many greedy outputs equal fp32 greedy (how far the precision itself moves).
Prints a Markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli import dtype_list, fail, run_main, status  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), HF model directory, or .gguf file")
    p.add_argument("--adapter", default="default", help="default | DIR | random:SEED[:M]")
    p.add_argument("--tree", default="upper-triangle",
                   help="the BiTA tree (default: the paper's upper-triangle, the accelerator "
                        "default, whose 52-token steps differ most from one-token steps)")
    p.add_argument("--dtypes", default="float32,bfloat16,bfloat16-pure",
                   help="comma-separated: float32, bfloat16, bfloat16-pure")
    p.add_argument("--limit", type=int, default=80, help="held-out chat prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="skip longer prompts")
    p.add_argument("--out", required=True, help="directory for results.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import bita_jax
    from bita_jax.data.prompts import load_prompts
    from bita_jax.eval import bench, precision

    try:
        dtypes = dtype_list(args.dtypes, "--dtypes")
        texts = load_prompts("sharegpt", "test", args.limit, args.max_prompt_chars)
        if not texts:
            raise ValueError("no held-out ShareGPT test prompts")
    except (ValueError, FileNotFoundError, OSError) as e:
        return fail(e)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for dtype in dtypes:
        try:
            status(f"{dtype}: loading {args.model} and adapter {args.adapter} ...")
            llm = bita_jax.load(args.model, adapter=args.adapter, tree=args.tree, dtype=dtype)
            if not llm.has_bita:
                raise ValueError(f"no adapter ({args.adapter!r}): pass --adapter DIR")
        except (ValueError, FileNotFoundError, OSError) as e:
            return fail(e)
        prompts = bench.encode_prompts(llm.tokenizer, texts, raw=False)

        def show(done, total, dtype=dtype):
            status(f"  {dtype}: {done}/{total} prompts")

        reports.append(precision.compare(llm.engine(use_bita=False), llm.engine(use_bita=True),
                                         prompts, args.max_new_tokens, show))
        (out / "results.json").write_text(json.dumps(
            {"model": args.model, "tree": args.tree, "reports": reports}, indent=1))
    print(precision.markdown(reports))
    status(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
