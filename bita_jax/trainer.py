"""The BiTA training loop: frozen sharded base, optax on the BiTA pytree only, resumable.

    code = trainer.train(run_config.load_config("configs/smollm2-135m.yaml", overrides))

`train` writes into the run directory (`run.out_dir`): checkpoints/ (orbax: BiTA params, optimizer
state, step, data position; the last `run.checkpoint_keep` kept), metrics.jsonl, and at the end
adapter/ (`bita.save_adapter`). `resume=True` continues from the latest checkpoint exactly:
batches and dropout keys are functions of (seed, step), and a checkpoint whose run settings differ
raises `ResumeError` before the base model is loaded. SIGINT/SIGTERM saves a checkpoint after the
current step. Only process 0 writes logs, metrics and the adapter (orbax coordinates checkpoint
writes). `train/train.py` is the command-line entry point.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import sys
import time

import jax
import orbax.checkpoint as ocp
from tqdm import tqdm

from bita_jax import bita, distributed, loading, model, run_config, sar, sharding, train_step
from bita_jax.cli_util import status


class ResumeError(ValueError):
    """Checkpoints that do not fit this run (or a fresh run over existing checkpoints)."""


class Checkpoints:
    """orbax CheckpointManager of {"params", "opt_state"} + a JSON "meta" (step, data position)."""

    def __init__(self, directory: pathlib.Path, keep: int):
        self.manager = ocp.CheckpointManager(
            directory.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict):
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, params, opt_state):
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"params": params, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"]["params"], out["state"]["opt_state"], dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of a checkpoint alone (no arrays restored)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self):
        self.manager.close()


# Settings added after checkpoints were first written: an older checkpoint ran with these values.
_ADDED_SETTINGS = {"sample": {"anchors": "window"}}


def _check_resume(out, step: int, saved: dict, now: dict):
    """Refuses to resume when anything that decides the batches or the schedule changed."""
    for key, value in now.items():
        before = saved.get(key)
        if isinstance(before, dict) and key in _ADDED_SETTINGS:
            before = {**_ADDED_SETTINGS[key], **before}
        if before != value:
            raise ResumeError(f"cannot resume from {out / 'checkpoints'} step {step}: {key} was "
                              f"{before!r}, now {value!r} (keep the run's settings, or "
                              "start a new run with another --out)")


def load_base(tc, mesh, rules):
    """(cfg, base params sharded on `mesh`, identity dict for the adapter)."""
    spec = tc.model
    if spec.random_init:
        cfg = loading.model_config(spec)
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
    cfg = loading.model_config(dataclasses.replace(spec, hf_config=None))
    if spec.hf_config is not None:
        want = loading.model_config(spec)
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
    return {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def _check_vocab(batch, vocab_size: int):
    top = max(int(batch["tokens"].max()), int(batch["labels"].max()))
    if top >= vocab_size:
        raise sar.DataError(f"token id {top} in the training data is outside the model's "
                            f"vocabulary (V={vocab_size}): the dataset was made with another "
                            "tokenizer")


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


def train(tc, *, resume: bool = False, stop_at: int | None = None, quiet: bool = False
          ) -> int:
    """Runs (or, with `resume`, continues) the training run `tc`; returns the process exit code.

    0 when done (adapter exported) or stopped at `stop_at`; 130 when interrupted (a checkpoint is
    saved either way). `quiet` turns the progress bar and status lines off.
    """
    run, bcfg = tc.run, tc.bita
    main_proc = distributed.is_main_process()
    out = pathlib.Path(run.out_dir)
    if run.data is None:
        raise sar.DataError("no training data: pass --data DIR_OR_JSONL or set run.data")
    spec = sar.SampleSpec(bcfg.num_masks, run.max_groups, run.cutoff, run.real_len,
                         run.anchors)
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
        data_size, model_size = run.mesh_shape(jax.device_count())
        mesh = sharding.make_mesh(data_size, model_size)
    except ValueError as e:
        raise run_config.ConfigFileError(f"run.mesh: {e}") from None
    if run.batch_size % (data_size * run.grad_accum):
        raise run_config.ConfigFileError(
            f"run.batch_size={run.batch_size} must divide by mesh data={data_size} x "
            f"grad_accum={run.grad_accum}")
    total = run.total_steps(stream.num_usable)
    stop = min(total, stop_at) if stop_at is not None else total
    run_meta = {"seed": run.seed, "batch_size": run.batch_size, "total_steps": total,
                "usable_records": stream.num_usable, "num_records": len(records),
                "bita_config": bcfg.to_dict(), "sample": dataclasses.asdict(spec)}
    # Checkpoints are checked before the (possibly huge) base model is loaded.
    ckpt = Checkpoints(out / "checkpoints", run.checkpoint_keep)
    latest = ckpt.latest()
    if latest is not None and not resume:
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
    elif resume:
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
               f"model={model_size}", quiet)
        bar = tqdm(total=stop, initial=start, disable=quiet or not main_proc, unit="step",
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
        status(f"adapter written to {out / 'adapter'}", quiet)
        print(json.dumps({"adapter": str(out / "adapter"), **final}))
    return 0
