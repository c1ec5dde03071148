"""Train BiTA adapters (prefix + mask embeddings) on a self-distilled dataset; the base is frozen.

    python train/train.py --config configs/smollm2-135m.yaml --data DIR_OR_JSONL
    python train/train.py --config configs/llama2-7b.yaml --dry-run  # counts + memory, no weights
    python train/train.py --config configs/tiny-test.yaml --data d.jsonl --out runs/t --resume
    python train/train.py --config ... run.batch_size=8 bita.num_masks=4  # overrides

Writes into the run directory (run.out_dir or --out): checkpoints/ (orbax: BiTA params, optimizer
state, step, data position; the last run.checkpoint_keep kept), metrics.jsonl, and at the end
adapter/ (`models.save_adapter`). --resume continues from the latest checkpoint exactly: batches
and dropout keys are functions of (seed, step). Ctrl-C (or SIGTERM) saves a checkpoint and exits.
Only process 0 writes logs, metrics and the adapter (orbax coordinates checkpoint writes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli import fail, run_main  # noqa: E402  (also quiets XLA logs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameter counts and a per-device memory estimate as JSON; "
                        "loads no weights")
    p.add_argument("--devices", type=int, default=None,
                   help="--dry-run: plan for this many devices (default: the local count, or the "
                        "mesh's model size when that is larger)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (run.steps)")
    p.add_argument("--out", default=None, help="run directory (run.out_dir)")
    p.add_argument("--data", default=None, help="training data: tfds data dir or .jsonl (run.data)")
    p.add_argument("--eval-data", default=None, help="evaluation data (run.eval_data)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP as if interrupted: checkpoint, no adapter export "
                        "(time-limited jobs; continue with --resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. run.batch_size=8 bita.num_masks=4")
    return p.parse_args(argv)


def load_train_config(args):
    from bita_jax.training import run_config

    overrides = list(args.overrides)
    for flag, key in ((args.steps, "run.steps"), (args.out, "run.out_dir"),
                      (args.data, "run.data"), (args.eval_data, "run.eval_data")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    return run_config.load_config(args.config, overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bita_jax import distributed, models
    from bita_jax.checkpoints import ModelLoadError
    from bita_jax.data.dataset import DataError
    from bita_jax.training import loop, memory_plan, run_config
    from bita_jax.training.checkpointing import ResumeError

    user_errors = (run_config.ConfigFileError, DataError, ModelLoadError, models.ConfigError,
                   models.AdapterError, ResumeError)
    try:
        distributed.initialize()
        tc = load_train_config(args)
        if args.dry_run:
            print(json.dumps(memory_plan.estimate(tc, args.devices)))
            return 0
        return loop.train(tc, resume=args.resume, stop_at=args.stop_at, quiet=args.quiet)
    except user_errors as e:
        return fail(e)
    except KeyboardInterrupt:
        return fail(KeyboardInterrupt("aborted"), 130)


if __name__ == "__main__":
    run_main(main)
