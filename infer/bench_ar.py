"""Plain greedy decoding speed: our jitted engine vs HF transformers `generate` (torch, CPU).

Same prompts, same lengths, same run, both after a warm-up; prints a per-prompt table and the
ratio of summed times, and checks that both produce the same tokens.

    python infer/bench_ar.py --prompts sharegpt --limit 8 --max-new-tokens 128

torch is a test/benchmark-only dependency (requirements-test.txt).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli import run_main, status  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", default="sharegpt", help="sharegpt | humaneval | FILE.jsonl")
    p.add_argument("--split", default="test",
                   help="train | heldout | selection | test | all (default: test, the held-out "
                        "prompts kept for headline numbers)")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-chars", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default=None, help="write results JSON here")
    args = p.parse_args(argv)

    import torch

    import bita_jax
    from bita_jax.data.prompts import load_prompts
    from bita_jax.eval.report import load_hf_model

    if args.threads:
        torch.set_num_threads(args.threads)
    split = "all" if args.prompts == "humaneval" else args.split
    texts = load_prompts(args.prompts, split, args.limit, args.max_prompt_chars)
    llm = bita_jax.load("smollm2-135m", adapter=None)
    prompts = [llm.encode(t, chat=args.prompts != "humaneval") for t in texts]
    status("loading the HF transformers model from the same GGUF ...")
    hf = load_hf_model(llm.loaded.source)
    eos = llm.cfg.eos_token_ids[0]
    gen = llm.engine(use_bita=False)

    def run_hf(ids):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=eos)
        return out[0, len(ids):].tolist(), time.perf_counter() - t0

    status("warm-up ...")
    run_hf(prompts[0])
    for ids in prompts:  # compile every bucket before timing
        gen.generate([ids], args.max_new_tokens)
    rows = []
    for text, ids in zip(texts, prompts):
        hf_tokens, hf_s = run_hf(ids)
        ours = gen.generate([ids], args.max_new_tokens)
        rows.append({"prompt": text[:60], "prompt_tokens": len(ids), "new_tokens": len(hf_tokens),
                     "hf_seconds": hf_s, "ours_seconds": ours.seconds,
                     "identical": ours.tokens[0] == hf_tokens})
        status(f"  {len(ids):4d} prompt tok, {len(hf_tokens):4d} new: HF {hf_s:6.2f}s  "
               f"ours {ours.seconds:6.2f}s  x{hf_s / ours.seconds:5.2f}  "
               f"identical={rows[-1]['identical']}")
    hf_total = sum(r["hf_seconds"] for r in rows)
    ours_total = sum(r["ours_seconds"] for r in rows)
    new = sum(r["new_tokens"] for r in rows)
    summary = {"prompts": len(rows), "new_tokens": new, "hf_tokens_per_second": new / hf_total,
               "ours_tokens_per_second": new / ours_total, "speedup_vs_hf": hf_total / ours_total,
               "identical": sum(r["identical"] for r in rows),
               "max_new_tokens": args.max_new_tokens,
               "source": args.prompts, "torch_threads": torch.get_num_threads()}
    print("| engine | tokens/s | speedup |\n|---|---|---|")
    print(f"| HF transformers greedy (torch {torch.__version__}) | "
          f"{summary['hf_tokens_per_second']:.1f} | 1.00 |")
    print(f"| bita_jax greedy (jax) | {summary['ours_tokens_per_second']:.1f} | "
          f"{summary['speedup_vs_hf']:.2f} |")
    print(f"identical outputs: {summary['identical']}/{len(rows)}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
