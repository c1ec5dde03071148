"""Generate text: lossless BiTA decoding (with an adapter) or plain decoding, jitted.

    python infer/generate.py --prompt "Write a haiku about JAX."            # shipped adapter
    python infer/generate.py --prompt "Hi" --compare                        # BiTA vs plain greedy
    python infer/generate.py --prompt "def fib(n):" --raw --adapter none --json
    python infer/generate.py --prompt "Hi" --adapter random:0 --tree chain
    python infer/generate.py --prompt "Hi" --adapter none --temperature 0.8 --top-p 0.9 --seed 1

Streams the answer to the terminal; with --json prints one JSON object instead.
--adapter: `default` (the adapter shipped for the built-in model, if any), an adapter directory,
`random:SEED[:M]` (untrained, still lossless), or `none` (plain decoding).
--compare then times plain greedy (of the same model: the fine-tuned one for a SPACE adapter)
and the adapter's decoding again, taking turns, --compare-runs times each (default 2); each
keeps its fastest run, and the speedup is their ratio.
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
    p.add_argument("--prompt", help="the user message (or raw text with --raw)")
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
                   help="longest prompt + --max-new-tokens accepted (default: the model's context "
                        "length); the cache itself is sized per request: prompt and output "
                        "rounded up to powers of two, plus headroom")
    add_dtype_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    p.add_argument("--adapter", default="default",
                   help="default | DIR | random:SEED[:M] | none (plain decoding)")
    p.add_argument("--tree", default="auto",
                   help="upper-triangle[:K] | chain | full[:K] (+ -pruned, @D) | FILE.json | auto "
                        "(auto: chain@1 on CPU, where a step's cost grows with its tokens; "
                        "upper-triangle on GPU/TPU; see docs/benchmarks.md)")
    p.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="--tree auto: switch to plain steps where the drafts accept fewer tokens "
                        "per step than the tree's measured cost, and back after a pause "
                        "(lossless; default: for prompts past chat length only; see "
                        "docs/benchmarks.md for when it pays)")
    p.add_argument("--compare", action="store_true",
                   help="also run plain greedy on the same prompt: times, speedup, identical ids")
    p.add_argument("--compare-runs", type=int, default=2,
                   help="--compare: timed runs per engine, the two taking turns; each keeps its "
                        "fastest (default 2: single runs on a busy machine swing by ~15%%)")
    add_mesh_argument(p)
    p.add_argument("--dry-run", action="store_true",
                   help="read no weights: print the per-device memory plan of decoding (base "
                        "shard, KV cache, activation peak; fits on 16/80/141 GiB) for "
                        "--devices, --batch, --context and --tree; --model may also be a "
                        "YAML run config (configs/llama2-70b.yaml)")
    p.add_argument("--devices", default="1,8,64",
                   help="--dry-run: device counts to plan for (mesh: --mesh, else weights over "
                        "up to 8 devices, the rest data parallel)")
    p.add_argument("--batch", type=int, default=None,
                   help="--dry-run: rows decoded together (default: one per data shard)")
    p.add_argument("--context", type=int, default=4096,
                   help="--dry-run: prompt + new tokens per row (default 4096)")
    args = p.parse_args(argv)
    if args.compare_runs < 1:
        p.error(f"--compare-runs must be at least 1, got {args.compare_runs}")
    if args.fallback and args.tree != "auto":
        p.error(f"--fallback needs --tree auto (its break-even is the auto tree's measured step "
                f"cost), got --tree {args.tree}")
    if args.prompt is None and not args.dry_run:
        p.error("--prompt is required (or --dry-run for a memory plan)")
    return args


def dry_run(args) -> int:
    """Prints the decoding memory plan as one JSON object (and a Markdown table on stderr)."""
    from bita_jax import sharding
    from bita_jax.checkpoints import loading
    from bita_jax.decoding import memory_plan
    from bita_jax.decoding.tree import Tree, auto_tree_name
    from bita_jax.training import run_config

    if args.model.endswith((".yaml", ".yml")):
        tc = run_config.load_config(args.model)
        cfg = loading.model_config(tc.model.name if tc.model.hf_config is None else None,
                                   tc.model.dtype, tc.model.hf_config)
    else:
        cfg = loading.model_config(args.model, args.dtype)
    tree = auto_tree_name("gpu") if args.tree == "auto" else args.tree
    step_tokens = len(Tree.make(tree, 3).layout.offsets)  # with the paper's M = 3 masks
    counts = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not counts or not all(d.isdigit() and int(d) > 0 for d in counts):
        raise ValueError(f"--devices must be positive integers, e.g. 1,8,64; got {args.devices!r}")
    plans = []
    for n in map(int, counts):
        data, model = (sharding.mesh_sizes(args.mesh, n) if args.mesh
                       else memory_plan.default_mesh(n, cfg))
        plans.append(memory_plan.decode_plan(cfg, data=data, model=model,
                                             batch=args.batch or data, context=args.context,
                                             step_tokens=step_tokens))
    print(json.dumps({"model": args.model, "arch": cfg.arch, "dtype": cfg.precision_name,
                      "tree": tree, "plans": plans}))
    status(memory_plan.HEADER + "\n" + memory_plan.markdown(args.model, plans))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import bita_jax
    from bita_jax import distributed
    from bita_jax.decoding import GenerationError
    from bita_jax.eval import auto_tree

    if args.dry_run:
        try:
            return dry_run(args)
        except (ValueError, FileNotFoundError, OSError) as e:
            return fail(e)
    distributed.initialize()
    only_main_process_prints(distributed.is_main_process())

    sampled = args.temperature > 0
    try:
        status(f"loading {args.model} ...", quiet=args.json)
        llm = bita_jax.load(args.model, adapter=args.adapter, tree=args.tree, dtype=args.dtype,
                            max_cache=args.max_cache, mesh=args.mesh,
                            fallback=args.fallback)
        if llm.mesh is not None:
            status(f"mesh {dict(llm.mesh.shape)} over {llm.mesh.size} devices", quiet=args.json)
        prompt_ids = llm.encode(args.prompt, chat=not args.raw, system=args.system)
        llm.engine(use_bita=False).shapes([len(prompt_ids)], args.max_new_tokens)  # fail fast
    except (ValueError, FileNotFoundError, OSError) as e:
        return fail(e)
    if args.compare and not llm.has_bita:
        return fail(ValueError("--compare needs an adapter (--adapter default|DIR|random:SEED)"))

    printed = []

    def show(piece: str) -> None:
        printed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    def run(use_bita: bool, stream: bool = False):
        return llm.generate(args.prompt, args.max_new_tokens, use_bita=use_bita,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, chat=not args.raw, system=args.system,
                            on_text=show if stream else None)

    try:
        if not args.json:
            tree = llm.tree_for(len(prompt_ids)) if llm.has_bita else None
            what = (f"{llm.method.upper() if llm.method == 'space' else 'BiTA'}, tree "
                    f"{tree.name}" if tree is not None else "plain decoding")
            choice = llm.auto_choice(len(prompt_ids))
            if choice is not None and tree is not None:  # --tree auto chose by measurement
                best = next(p for p in choice.predictions if p.tree == tree.name)
                what += (f" (auto: predicted {best.tokens_per_step:.2f} tokens/step at "
                         f"{best.step_ms / best.ar_step_ms:.2f}x a greedy step's cost" +
                         ("; plain steps where fewer are accepted)"
                          if llm.fallback_for(len(prompt_ids)) else ")"))
            elif choice is not None:
                what += (f" (auto: at {len(prompt_ids)} prompt tokens no tree is predicted "
                         f"{auto_tree.MIN_SPEEDUP:.1f}x faster than plain greedy; best "
                         f"{choice.tree.name}, {choice.speedup:.2f}x)")
            if args.fallback and llm.fallback_for(len(prompt_ids)) is None:
                what += ("; --fallback off: no tree was chosen by measurement (the adapter has "
                         "no acceptance.npz, or plain decoding)")
            status(f"[{what}; compiling ...]")
        first = result = run(True, stream=not args.json)
        baseline = None
        if args.compare:  # the engines take turns, each keeps its fastest run
            timed = []  # as many runs each (the first, streamed or not, also compiled)
            for _ in range(args.compare_runs):
                greedy = run(False)
                if baseline is None or greedy.seconds < baseline.seconds:
                    baseline = greedy
                timed.append(run(True))
            result = min(timed, key=lambda r: r.seconds)
    except GenerationError as e:
        return fail(e)
    report = {
        "model": llm.name,
        "mode": ("greedy" if result.mode == "plain" else result.mode) if not sampled else "sample",
        "tree": result.tree,
        "adapter": llm.adapter,
        "text": result.text,
        "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "steps": result.steps,
        "tokens_per_step": round(result.tokens_per_step, 3),
        "plain_steps": result.plain_steps,
        "seconds": round(result.seconds, 4),
        "tokens_per_second": round(result.tokens_per_second, 2),
        "compile_seconds": round(first.compile_seconds, 2),
    }
    if baseline is not None:
        report.update({
            "greedy_seconds": round(baseline.seconds, 4),
            "greedy_tokens_per_second": round(baseline.tokens_per_second, 2),
            "speedup": round(baseline.seconds / result.seconds, 3),
            # Sampled, the two engines draw from different random streams: each output is an
            # exact sample of the model's distribution, but the two need not be equal.
            "identical": None if sampled else baseline.token_ids == result.token_ids,
        })
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    if "".join(printed) != result.text:  # decoding revised earlier text: show it whole
        sys.stdout.write("\n" + result.text)
    print()
    line = (f"[{report['new_tokens']} tokens in {report['seconds']:.2f}s = "
            f"{report['tokens_per_second']:.1f} tok/s; {report['steps']} steps after prefill, "
            f"{report['tokens_per_step']:.2f} tokens/step")
    if result.plain_steps:
        line += f" ({result.plain_steps} of the steps plain: the drafts did not pay there)"
    if baseline is not None:
        of = " of the fine-tuned model" if llm.method == "space" else ""
        line += (f"; plain {'sampling' if sampled else 'greedy'}{of} "
                 f"{report['greedy_seconds']:.2f}s "
                 f"-> speedup x{report['speedup']:.2f}")
        if args.compare_runs > 1:
            line += f" (fastest of {args.compare_runs} runs each)"
        line += ("; sampled: the two outputs are independent draws, compared in distribution "
                 "(tests), not token by token" if sampled
                 else f", identical tokens: {report['identical']}")
    status(line + "]")
    return 0


if __name__ == "__main__":
    run_main(main)
