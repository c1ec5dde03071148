"""What one decode step costs against T, beside the floor of reading every weight (one run).

    python infer/bench_step.py --out runs/step-cost
    python infer/bench_step.py --dtype float32,bfloat16 --tree chain@1,chain@1+lookup:4 --out /tmp/s

For each dtype, in one run, engines taking turns over --repeats rounds (the fastest kept):
  floor    jitted matrix-vector products over every weight matrix (the same bytes, nothing else),
           with 1 row and with T rows;
  forward  a cached forward of T new tokens (causal block mask, LM head on every row, commit);
  decode   the real decode loop: plain greedy, and BiTA with each --tree (T = its step tokens).
Prints a Markdown table per dtype (ms, x the 1-token forward, x the 1-row floor) and writes
OUT/results.json. bfloat16 casts weights and activations (the `--dtype bfloat16` of the other
tools).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli import dtype_list, fail, run_main, status  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), HF model directory, or .gguf file")
    p.add_argument("--adapter", default="default", help="default | DIR | random:SEED[:M]")
    p.add_argument("--tree", default="chain@1,chain@1+lookup:4,upper-triangle:3@1+lookup:4",
                   help="comma-separated BiTA trees whose real decode step is timed")
    p.add_argument("--tokens", default="1,2,4,8,16,32,52",
                   help="comma-separated T for the forward and floor rows")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated: float32, bfloat16, bfloat16-pure")
    p.add_argument("--context", type=int, default=300, help="cached tokens before each step")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the fastest is kept")
    p.add_argument("--out", required=True, help="directory for results.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    import bita_jax
    from bita_jax.decoding.tree import Tree
    from bita_jax.eval import step_cost

    try:
        dtypes = dtype_list(args.dtype)
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        if not tokens or min(tokens) < 1:
            raise ValueError(f"--tokens must be positive integers, got {args.tokens!r}")
    except ValueError as e:
        return fail(e)
    results = {"config": {"model": args.model, "adapter": args.adapter, "tree": args.tree,
                          "context": args.context, "repeats": args.repeats,
                          "machine": platform.processor() or platform.machine(),
                          "backend": jax.default_backend()}, "dtypes": {}}
    for dtype in dtypes:
        try:
            status(f"loading {args.model} ({dtype}) and adapter {args.adapter} ...")
            llm = bita_jax.load(args.model, adapter=args.adapter, tree="chain", dtype=dtype)
            if not llm.has_bita:
                raise ValueError(f"no adapter ({args.adapter!r}): pass --adapter DIR or "
                                 "random:SEED")
            trees = [Tree.make(n.strip(), llm.bita_config.num_masks)
                     for n in args.tree.split(",") if n.strip()]
        except (ValueError, FileNotFoundError, OSError) as e:
            return fail(e)
        mb = step_cost.weight_bytes(llm.params) / 1e6
        status(f"{dtype}: {mb:.0f} MB of weight matrices, context {args.context}")
        rows = step_cost.measure(llm.cfg, llm.params, llm.bita_params, trees, tokens,
                                 context=args.context, repeats=args.repeats, log=status)
        print(f"## {dtype} ({mb:.0f} MB of weights, {args.context} cached tokens, fastest of "
              f"{args.repeats})\n")
        print(step_cost.markdown_table(rows) + "\n", flush=True)
        results["dtypes"][dtype] = {"weight_mb": mb,
                                    "rows": [dataclasses.asdict(r) for r in rows]}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    status(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
