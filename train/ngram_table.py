"""Build an adapter's n-gram table from a self-distilled dataset (its `train` split only).

    python train/ngram_table.py --data runs/distill-smollm2 --out adapters/smollm2-135m

Writes OUT/ngram.npz: for every context of the last 1 to 3 tokens in the base model's own greedy
answers, the 4 tokens that most often followed it (`bita_jax.decoding.ngram`). A tree with a
retrieval branch (`+lookup:L`) drafts from it where prompt lookup finds no 2-gram; `--tree auto`
replays with it (`infer/bench.py --save-acceptance` does not need to run again). Held-out
records never go in: the table would otherwise have seen the answers it is scored on.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="a dataset built by train/distill.py")
    p.add_argument("--out", required=True, help="the adapter directory to write ngram.npz into")
    p.add_argument("--max-order", type=int, default=3, help="longest context, tokens (default 3)")
    args = p.parse_args(argv)
    from bita_jax.data import dataset
    from bita_jax.decoding import ngram

    if not pathlib.Path(args.out).is_dir():
        print(f"error: {args.out} is not a directory: pass the adapter directory", file=sys.stderr)
        return 2
    if not 1 <= args.max_order <= 4:
        print(f"error: --max-order must be 1 to 4, got {args.max_order}", file=sys.stderr)
        return 2
    try:
        records = dataset.load_split(args.data, "train")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = [r["response_ids"] for r in records]
    if not texts:
        print(f"error: {args.data} has no train records: distill more prompts "
              "(train/distill.py --extend with a larger --limit)", file=sys.stderr)
        return 2
    tokens = sum(len(t) for t in texts)
    print(f"{len(texts)} answers, {tokens:,} tokens (train split of {args.data})")
    start = time.perf_counter()
    table = ngram.build(texts, max_order=args.max_order)
    path = ngram.save(args.out, table)
    sizes = ", ".join(f"{c.shape[0]:,}" for c in table.contexts)
    print(f"wrote {path}: {table.num_entries():,} contexts (slots per order: {sizes}), "
          f"{path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
