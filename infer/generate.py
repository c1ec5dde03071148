"""Generate text: lossless BiTA decoding (with an adapter) or plain decoding, jitted.

    python infer/generate.py --prompt "Write a haiku about JAX."            # shipped adapter
    python infer/generate.py --prompt "Hi" --compare                        # BiTA vs plain greedy
    python infer/generate.py --prompt "def fib(n):" --raw --adapter none --json
    python infer/generate.py --prompt "Hi" --adapter random:0 --tree chain
    python infer/generate.py --prompt "Hi" --adapter none --temperature 0.8 --top-p 0.9 --seed 1

Streams the answer to the terminal; with --json prints one JSON object instead.
--adapter: `default` (the adapter shipped for the built-in model, if any), an adapter directory,
`random:SEED[:M]` (untrained, still lossless), or `none` (plain decoding).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli_util import fail, run_main, status  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), HF model directory, or .gguf file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--max-cache", type=int, default=None,
                   help="cache slots per sequence (default: the model's context length)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    p.add_argument("--adapter", default="default",
                   help="default | DIR | random:SEED[:M] | none (plain decoding)")
    p.add_argument("--tree", default="auto",
                   help="upper-triangle[:K] | chain | full[:K] (+ -pruned, @D) | FILE.json | auto "
                        "(auto: chain@1 on CPU, where a step's cost grows with its tokens; "
                        "upper-triangle on GPU/TPU; see docs/benchmarks.md)")
    p.add_argument("--compare", action="store_true",
                   help="also run plain greedy on the same prompt: times, speedup, identical ids")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bita_jax.decode import BitaGenerator
    from bita_jax.generate import GenerationError, Generator
    from bita_jax.loading import load_bita, load_model, shipped_adapter
    from bita_jax.sampling import SamplingParams
    from bita_jax.tree import Tree

    try:
        sp = SamplingParams.make(args.temperature, args.top_k, args.top_p)
        status(f"loading {args.model} ...", quiet=args.json)
        loaded = load_model(args.model, dtype=args.dtype)
        tok = loaded.tokenizer
        prompt_ids = tok.encode(args.prompt) if args.raw else tok.chat_ids(args.prompt, args.system)
        plain = Generator(loaded.cfg, loaded.params, max_cache=args.max_cache)
        plain.shapes([len(prompt_ids)], args.max_new_tokens)  # fail fast, before compiling
        adapter = args.adapter
        if adapter == "default" and shipped_adapter(loaded) is None:
            adapter = "none"  # no adapter ships for this model: plain decoding
        gen, tree = plain, None
        if adapter != "none":
            bita_params, bcfg, _ = load_bita(adapter, loaded)
            tree_name = args.tree
            if tree_name == "auto":
                import jax

                tree_name = "chain@1" if jax.default_backend() == "cpu" else "upper-triangle"
            tree = Tree.make(tree_name, bcfg.num_masks)
            gen = BitaGenerator(loaded.cfg, loaded.params, bita_params, tree,
                                max_cache=args.max_cache)
    except (ValueError, FileNotFoundError, OSError) as e:
        return fail(e)
    if args.compare and gen is plain:
        return fail(ValueError("--compare needs an adapter (--adapter default|DIR|random:SEED)"))

    printed = [""]

    def stream(tokens):
        text = tok.decode(tokens[0], skip_special_tokens=True)
        if text.startswith(printed[0]):
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    try:
        if not args.json:
            status(f"[{'BiTA, tree ' + tree.name if tree else 'plain decoding'}; compiling ...]")
        result = gen.generate([prompt_ids], args.max_new_tokens, sp, args.seed,
                              on_tokens=None if args.json else stream)
        baseline = plain.generate([prompt_ids], args.max_new_tokens, sp, args.seed) \
            if args.compare else None
        if args.compare and not args.json:  # time BiTA without the streaming round trips too
            result = gen.generate([prompt_ids], args.max_new_tokens, sp, args.seed)
    except GenerationError as e:
        return fail(e)
    ids = result.tokens[0]
    text = tok.decode(ids, skip_special_tokens=True)
    report = {
        "model": loaded.name,
        "mode": ("bita" if tree else "greedy") if args.temperature == 0 else "sample",
        "tree": tree.name if tree else None,
        "adapter": adapter,
        "text": text,
        "token_ids": ids,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(ids),
        "steps": result.steps,
        "tokens_per_step": round(result.tokens_per_step, 3),
        "seconds": round(result.seconds, 4),
        "tokens_per_second": round(len(ids) / max(result.seconds, 1e-9), 2),
        "compile_seconds": round(result.compile_seconds, 2),
    }
    if baseline is not None:
        report.update({
            "greedy_seconds": round(baseline.seconds, 4),
            "greedy_tokens_per_second": round(len(baseline.tokens[0]) / baseline.seconds, 2),
            "speedup": round(baseline.seconds / result.seconds, 3),
            "identical": baseline.tokens[0] == ids,
        })
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    if text != printed[0]:
        sys.stdout.write(text[len(printed[0]):] if text.startswith(printed[0]) else "\n" + text)
    print()
    line = (f"[{report['new_tokens']} tokens in {report['seconds']:.2f}s = "
            f"{report['tokens_per_second']:.1f} tok/s; {report['steps']} steps after prefill, "
            f"{report['tokens_per_step']:.2f} tokens/step")
    if baseline is not None:
        line += (f"; plain greedy {report['greedy_seconds']:.2f}s -> speedup "
                 f"x{report['speedup']:.2f}, identical tokens: {report['identical']}")
    status(line + "]")
    return 0


if __name__ == "__main__":
    run_main(main)
