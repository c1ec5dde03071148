"""Train BiTA adapters (prefix + mask embeddings) on a self-distilled dataset; the base is frozen.

    python train/train.py --config configs/smollm2-135m.yaml --data DIR_OR_JSONL
    python train/train.py --config configs/llama2-7b.yaml --dry-run  # counts + memory, no weights
    python train/train.py --config configs/tiny-test.yaml --data d.jsonl --out runs/t --resume
    python train/train.py --config ... run.batch_size=8 bita.num_masks=4  # overrides

Writes into the run directory (run.out_dir or --out): checkpoints/ (orbax: BiTA params, optimizer
state, step, data position; the last run.checkpoint_keep kept), metrics.jsonl, and at the end
adapter/ (`bita.save_adapter`). --resume continues from the latest checkpoint exactly: batches
and dropout keys are functions of (seed, step). Ctrl-C (or SIGTERM) saves a checkpoint and exits.
Only process 0 writes logs, metrics and the adapter (orbax coordinates checkpoint writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bita_jax.cli_util import fail, run_main, status  # noqa: E402  (also quiets XLA logs)


class ResumeError(ValueError):
    """Checkpoints that do not fit this run (or a fresh run over existing checkpoints)."""


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
    from bita_jax import run_config

    overrides = list(args.overrides)
    for flag, key in ((args.steps, "run.steps"), (args.out, "run.out_dir"),
                      (args.data, "run.data"), (args.eval_data, "run.eval_data")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    return run_config.load_config(args.config, overrides)


# ---------------------------------------------------------------------------------------------
# Model config without weights, and the dry run.


def model_config(spec):
    """The `ModelConfig` of a `ModelSpec` from its config alone (no tensors are read)."""
    from bita_jax import checkpoint, gguf_loader, loading
    from bita_jax.config import ModelConfig

    if spec.hf_config is not None:
        return ModelConfig.from_hf_config(spec.hf_config, dtype=spec.dtype)
    if spec.name in loading.EMBEDDED_MODELS:
        try:
            path = loading.EMBEDDED_MODELS[spec.name]()
        except FileNotFoundError as e:
            raise loading.ModelLoadError(str(e)) from None
    else:
        path = pathlib.Path(spec.name).expanduser()
    if path.is_dir():
        return ModelConfig.from_hf_config(checkpoint.read_hf_config(str(path)), dtype=spec.dtype)
    if path.suffix == ".gguf" and path.is_file():
        hf = gguf_loader.hf_config_from_gguf(gguf_loader.open_gguf(path))
        return ModelConfig.from_hf_config(hf, dtype=spec.dtype)
    raise loading.ModelLoadError(f"unknown model {spec.name!r}: not a built-in name, HF directory "
                                 "or .gguf file")


def mesh_shape(run, num_devices: int) -> tuple[int, int]:
    data, model = run.mesh
    if data == -1:
        if num_devices % model:
            raise ValueError(f"run.mesh model={model} does not divide the {num_devices} devices")
        data = num_devices // model
    return data, model


def dry_run(tc, devices: int | None = None) -> dict:
    """Counts and a per-device memory estimate from shapes only (`model.abstract_params`)."""
    import jax
    import numpy as np

    from bita_jax import bita, model, run_config, sar, sharding

    cfg, bcfg, run = model_config(tc.model), tc.bita, tc.run
    if devices is None:
        devices = max(jax.device_count(), run.mesh[1])
    try:
        data, msize = mesh_shape(run, devices)
    except ValueError as e:
        raise run_config.ConfigFileError(f"run.mesh: {e}") from None
    rules = sharding.FSDP_RULES if run.fsdp else sharding.DEFAULT_RULES
    abstract = model.abstract_params(cfg)
    specs = sharding.param_specs(cfg, {"data": data, "model": msize}, rules)
    axis = {"data": data, "model": msize}

    def shard_bytes(leaf, spec):
        shape = list(leaf.shape)
        for dim, axes in enumerate(spec):
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                shape[dim] //= axis[a]
        return math.prod(shape) * np.dtype(leaf.dtype).itemsize

    base_bytes = sum(jax.tree.leaves(jax.tree.map(
        shard_bytes, abstract, specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))))
    n_base = model.count_params(abstract)
    n_bita = bita.count_trainable(cfg, bcfg)
    spec = sar.SampleSpec(bcfg.num_masks, run.max_groups, run.cutoff, run.real_len)
    # Activations, rough: one micro-batch per device; fp32 scores; K and vocab split by 'model'.
    b = max(run.batch_size // (data * run.grad_accum), 1)
    tr, gm = spec.tr, spec.num_mask_tokens
    itemsize = np.dtype(cfg.jnp_dtype).itemsize
    heads = cfg.num_heads // msize if cfg.num_heads % msize == 0 else cfg.num_heads
    kv = cfg.num_kv_heads // msize if cfg.num_kv_heads % msize == 0 else cfg.num_kv_heads
    ffn = (cfg.intermediate_size // msize if cfg.intermediate_size % msize == 0
           else cfg.intermediate_size)
    vocab = cfg.vocab_size // msize if cfg.vocab_size % msize == 0 else cfg.vocab_size
    real_kv = 2 * cfg.num_layers * b * tr * kv * cfg.head_dim * itemsize
    pass1_layer = b * heads * tr * tr * 4 * 2 + b * tr * (4 * cfg.hidden_size + 3 * ffn) * itemsize
    keys = tr + gm + bcfg.num_prefix
    # per mask token and layer, kept for the backward pass: fp32 attention probabilities over
    # every key, and the residual / normed / attention / MLP activations in the compute dtype
    per_token = heads * keys * 4 + (4 * cfg.hidden_size + 3 * ffn
                                    + (heads + 2 * kv) * cfg.head_dim) * itemsize
    pass2_saved = cfg.num_layers * b * gm * per_token
    logits = 3 * b * gm * vocab * 4
    act = real_kv + pass1_layer + pass2_saved + logits
    state = 4 * n_bita * 4  # fp32 params, grads, Adam mu and nu (replicated)
    gib = 1024 ** 3
    return {
        "model": tc.model.name or "hf_config",
        "arch": cfg.arch,
        "base_params": n_base,
        "trainable_params": n_bita,
        "trainable_percent": round(100.0 * n_bita / n_base, 4),
        "bita": bcfg.to_dict(),
        "param_shapes": {k: list(v) for k, v in bita.param_shapes(cfg, bcfg).items()},
        "mesh": {"data": data, "model": msize, "fsdp": run.fsdp, "devices": data * msize},
        "per_device_batch": b,
        "sample": {"real_tokens": tr, "mask_tokens": gm},
        "memory_per_device_bytes": {
            "base_params": int(base_bytes),
            "bita_params_grads_adam": int(state),
            "activations_estimate": int(act),
            "activations_breakdown": {"real_kv": int(real_kv), "pass1_layer_peak": int(pass1_layer),
                                      "pass2_saved": int(pass2_saved), "mask_logits": int(logits)},
            "total_estimate": int(base_bytes + state + act),
        },
        "memory_per_device_gib": round((base_bytes + state + act) / gib, 3),
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints.


class Checkpoints:
    """orbax CheckpointManager of {"params", "opt_state"} + a JSON "meta" (step, data position)."""

    def __init__(self, directory: pathlib.Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            directory.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict):
        ocp = self.ocp
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, params, opt_state):
        import jax

        ocp = self.ocp
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"params": params, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"]["params"], out["state"]["opt_state"], dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of a checkpoint alone (no arrays restored)."""
        ocp = self.ocp
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self):
        self.manager.close()


def _check_resume(out, step: int, saved: dict, now: dict):
    """Refuses to resume when anything that decides the batches or the schedule changed."""
    for key, value in now.items():
        if saved.get(key) != value:
            raise ResumeError(f"cannot resume from {out / 'checkpoints'} step {step}: {key} was "
                              f"{saved.get(key)!r}, now {value!r} (keep the run's settings, or "
                              "start a new run with another --out)")


# ---------------------------------------------------------------------------------------------
# Training.


def load_base(tc, mesh, rules):
    """(cfg, base params sharded on `mesh`, identity dict for the adapter)."""
    import jax

    from bita_jax import loading, model, run_config, sharding

    spec = tc.model
    if spec.random_init:
        cfg = model_config(spec)
        shardings = sharding.param_shardings(cfg, mesh, rules)
        params = sharding.shard_params(model.init_params(cfg, jax.random.key(spec.init_seed)),
                                       shardings)
        name = f"random-init:{spec.init_seed}"
        status(f"base: random weights ({name}) from model.hf_config: for tests only")
        ident = loading.LoadedModel(name, cfg, params, None, pathlib.Path("-")).identity()
        return cfg, params, ident
    if spec.name is None:
        raise run_config.ConfigFileError(
            f"{tc.source}: model.name is required to train (model.hf_config only gives shapes "
            "for --dry-run); set model.name=PATH")
    cfg = model_config(dataclasses.replace(spec, hf_config=None))
    if spec.hf_config is not None:
        want = model_config(spec)
        for field in ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "intermediate_size"):
            if getattr(want, field) != getattr(cfg, field):
                raise run_config.ConfigFileError(
                    f"{tc.source}: model {spec.name!r} has {field}={getattr(cfg, field)} but "
                    f"model.hf_config says {getattr(want, field)}")
    loaded = loading.load_model(spec.name, spec.dtype,
                                shardings=sharding.param_shardings(cfg, mesh, rules))
    return loaded.cfg, loaded.params, loaded.identity()


def warm_start(directory, cfg, bcfg, identity, params):
    """The BiTA params of an exported adapter, placed like `params` (the fresh init).

    Raises AdapterError if the adapter is for another base model or another P / M."""
    import jax

    from bita_jax import bita

    loaded, loaded_cfg, _ = bita.load_adapter(directory, cfg, identity)
    if (loaded_cfg.num_prefix, loaded_cfg.num_masks) != (bcfg.num_prefix, bcfg.num_masks):
        raise bita.AdapterError(
            f"run.init_adapter {directory} has P={loaded_cfg.num_prefix}, M={loaded_cfg.num_masks}"
            f" but this run trains P={bcfg.num_prefix}, M={bcfg.num_masks}: set bita.num_prefix /"
            " bita.num_masks to match, or drop run.init_adapter")
    return jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                        loaded, params)


def _global_batch(batch, batch_sharding):
    """Host numpy [B, ...] (same on every process) -> global arrays laid out by the sharding."""
    import jax

    return {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def _check_vocab(batch, vocab_size: int):
    from bita_jax.sar import DataError

    top = max(int(batch["tokens"].max()), int(batch["labels"].max()))
    if top >= vocab_size:
        raise DataError(f"token id {top} in the training data is outside the model's vocabulary "
                        f"(V={vocab_size}): the dataset was made with another tokenizer")


def _trim_metrics(path: pathlib.Path, step: int):
    """Drops metric lines past `step` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(x + "\n" for x in keep))


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        status("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(tc, args) -> int:
    import jax
    from tqdm import tqdm

    from bita_jax import bita, distributed, run_config, sar, sharding, train_step

    run, bcfg = tc.run, tc.bita
    main_proc = distributed.is_main_process()
    out = pathlib.Path(run.out_dir)
    if run.data is None:
        raise sar.DataError("no training data: pass --data DIR_OR_JSONL or set run.data")
    spec = sar.SampleSpec(bcfg.num_masks, run.max_groups, run.cutoff, run.real_len)
    records = sar.load_records(run.data, run.train_split)
    stream = sar.BatchStream(records, spec, run.batch_size, run.seed)
    eval_records = None
    if run.eval_data is not None:
        eval_records = sar.load_records(run.eval_data, run.eval_split or "heldout")
    elif run.eval_split is not None and pathlib.Path(run.data).is_dir():  # a split of the dataset
        eval_records = sar.load_records(run.data, run.eval_split)
    if eval_records is not None and len(sar.usable_indices(eval_records, spec)) == 0:
        status("no usable evaluation record: evaluation is off")
        eval_records = None

    try:
        data_size, model_size = mesh_shape(run, jax.device_count())
        mesh = sharding.make_mesh(data_size, model_size)
    except ValueError as e:
        raise run_config.ConfigFileError(f"run.mesh: {e}") from None
    if run.batch_size % (data_size * run.grad_accum):
        raise run_config.ConfigFileError(
            f"run.batch_size={run.batch_size} must divide by mesh data={data_size} x "
            f"grad_accum={run.grad_accum}")
    total = run.total_steps(stream.num_usable)
    stop = min(total, args.stop_at) if args.stop_at is not None else total
    run_meta = {"seed": run.seed, "batch_size": run.batch_size, "total_steps": total,
                "usable_records": stream.num_usable, "num_records": len(records),
                "bita_config": bcfg.to_dict(), "sample": dataclasses.asdict(spec)}
    # Checkpoints are checked before the (possibly huge) base model is loaded.
    ckpt = Checkpoints(out / "checkpoints", run.checkpoint_keep)
    latest = ckpt.latest()
    if latest is not None and not args.resume:
        raise ResumeError(f"{out / 'checkpoints'} already holds checkpoints "
                          f"(latest step {latest}): pass --resume to continue, "
                          "or choose another --out")
    if latest is not None:
        _check_resume(out, latest, ckpt.read_meta(latest)["run"], run_meta)

    if latest is None and run.init_adapter and not (
            pathlib.Path(run.init_adapter) / bita.ADAPTER_META).is_file():
        raise bita.AdapterError(f"run.init_adapter {run.init_adapter} is not an exported adapter "
                                f"(no {bita.ADAPTER_META}): pass the adapter/ directory of a run")
    rules = sharding.FSDP_RULES if run.fsdp else sharding.DEFAULT_RULES
    cfg, base_params, identity = load_base(tc, mesh, rules)
    run_meta["base_fingerprint"] = identity.get("fingerprint")
    tx = train_step.make_optimizer(total_steps=total, **run.optimizer_kwargs())
    options = train_step.FAST_CPU_COMPILE if run.fast_compile else None
    step_fn = train_step.make_train_step(cfg, bcfg, spec, tx, mesh, rules, run.grad_accum,
                                         options)
    eval_fn = (train_step.make_eval_step(cfg, spec, mesh, rules, compiler_options=options)
               if eval_records else None)
    batch_sharding = sharding.batch_sharding(mesh, 2, rules)
    root = jax.random.key(run.seed)
    params, opt_state = train_step.init_state(cfg, bcfg, tx, jax.random.fold_in(root, 0), mesh)

    metrics_path = out / "metrics.jsonl"
    start = 0
    if latest is not None:
        params, opt_state, meta = ckpt.restore(latest, params, opt_state)
        _check_resume(out, latest, meta["run"], run_meta)
        start = int(meta["step"])
        if main_proc:
            _trim_metrics(metrics_path, start)
        status(f"resumed from step {start} (epoch {meta['position']['epoch']})")
    elif args.resume:
        status(f"--resume: no checkpoint in {out / 'checkpoints'}, starting fresh")
    if latest is None and run.init_adapter:
        params = warm_start(run.init_adapter, cfg, bcfg, identity, params)
        status(f"warm start from the adapter {run.init_adapter}")

    def meta(step):
        return {"step": step, "position": stream.position(step), "run": run_meta,
                "config": tc.to_dict(), "base_model": identity}

    def evaluate(step):
        sums = None
        for eb in sar.eval_batches(eval_records, spec, run.batch_size, run.seed, run.eval_batches):
            m = jax.device_get(eval_fn(params, base_params, _global_batch(eb, batch_sharding)))
            sums = m if sums is None else {k: sums[k] + m[k] for k in m}
        s = train_step.summarize(sums)
        return {"step": step, "eval_loss": s["loss"], "eval_acc": s["acc"],
                "eval_acc5": s["acc5"], "eval_mask_tokens": s["mask_tokens"]}

    def log(record):
        if main_proc:
            out.mkdir(parents=True, exist_ok=True)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(tc.to_dict(), indent=1))
    schedule = train_step.make_schedule(run.learning_rate, total, run.warmup_steps, run.schedule,
                                        run.final_lr_ratio)
    step, last, last_eval = start, None, None
    window_t, window_steps, window_tokens = time.perf_counter(), 0, 0
    interrupted = None
    with _Interrupt() as intr:  # Ctrl-C from here on saves a checkpoint
        status(f"training {bita.count_trainable(cfg, bcfg):,} BiTA params on {cfg.arch} "
               f"(L={cfg.num_layers}, E={cfg.hidden_size}); {stream.num_usable} usable records, "
               f"steps {start}..{stop} of {total}, batch {run.batch_size}, mesh data={data_size} "
               f"model={model_size}", args.quiet)
        bar = tqdm(total=stop, initial=start, disable=args.quiet or not main_proc, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        while step < stop:
            batch = stream.batch(step)
            _check_vocab(batch, cfg.vocab_size)
            rng = jax.random.fold_in(jax.random.fold_in(root, 1), step)
            params, opt_state, metrics = step_fn(params, opt_state, base_params,
                                                 _global_batch(batch, batch_sharding), rng)
            step += 1
            window_steps += 1
            window_tokens += int(batch["anchors"].max(axis=1).sum() + (batch["labels"] >= 0).sum())
            if step % run.log_every == 0 or step == stop:
                s = train_step.summarize(jax.device_get(metrics))
                now = time.perf_counter()
                dt = max(now - window_t, 1e-9)
                last = {"step": step, "loss": s["loss"], "acc": s["acc"],
                        "grad_norm": s["grad_norm"], "lr": float(schedule(step - 1)),
                        "epoch": round(stream.epoch_of(step), 4), "steps_per_s": window_steps / dt,
                        "tokens_per_s": window_tokens / dt}
                window_t, window_steps, window_tokens = now, 0, 0
                log(last)
                bar.set_postfix(loss=f"{s['loss']:.3f}",
                                acc="/".join(f"{a:.2f}" for a in s["acc"]),
                                tok_s=f"{last['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if eval_fn is not None and run.eval_every and step % run.eval_every == 0:
                last_eval = evaluate(step)
                log(last_eval)
            if step % run.checkpoint_every == 0:
                ckpt.save(step, params, opt_state, meta(step))
            if intr.signal is not None:
                interrupted = intr.signal
                break
    bar.close()
    ckpt.save(step, params, opt_state, meta(step))
    ckpt.close()
    if interrupted is not None or step < total:
        why = "interrupted" if interrupted is not None else f"stopped at step {step} (--stop-at)"
        status(f"{why}: checkpoint saved at step {step} in {out / 'checkpoints'}; continue with "
               "--resume")
        return 130 if interrupted is not None else 0
    final = {"steps": step, "total_steps": total, "train": last}
    if eval_fn is not None:
        if last_eval is None or last_eval["step"] != step:
            last_eval = evaluate(step)
            log(last_eval)
        final["eval"] = last_eval
    if main_proc:
        bita.save_adapter(out / "adapter", jax.device_get(params), bcfg, identity,
                          {"steps": step, "final": final, "config": tc.to_dict(),
                           "data": str(run.data)})
        status(f"adapter written to {out / 'adapter'}", args.quiet)
        print(json.dumps({"adapter": str(out / "adapter"), **final}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from bita_jax import bita, distributed, loading, run_config, sar
    from bita_jax.config import ConfigError

    user_errors = (run_config.ConfigFileError, sar.DataError, loading.ModelLoadError, ConfigError,
                   bita.AdapterError, ResumeError)
    try:
        distributed.initialize()
        tc = load_train_config(args)
        if args.dry_run:
            print(json.dumps(dry_run(tc, args.devices)))
            return 0
        return train(tc, args)
    except user_errors as e:
        return fail(e)
    except KeyboardInterrupt:
        return fail(KeyboardInterrupt("aborted"), 130)


if __name__ == "__main__":
    run_main(main)
