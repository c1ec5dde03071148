"""The BiTA training loop: frozen sharded base, optax on the BiTA pytree only, resumable.

    code = loop.train(run_config.load_config("configs/smollm2-135m.yaml", overrides))

`train` writes into the run directory (`run.out_dir`): checkpoints/ (orbax: BiTA params, optimizer
state, step, data position; the last `run.checkpoint_keep` kept), metrics.jsonl, and at the end
adapter/ (`models.save_adapter`). `resume=True` continues from the latest checkpoint exactly:
batches and dropout keys are functions of (seed, step), and a checkpoint whose run settings
(data, sampling of anchors, optimizer) differ raises `ResumeError` before the base model is
loaded. SIGINT/SIGTERM saves a checkpoint after the current step. Only process 0 writes logs,
metrics and the adapter (orbax coordinates checkpoint writes). `train/train.py` is the
command-line entry point.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import sys
import time

import jax
from tqdm import tqdm

from bita_jax import distributed, models, sharding
from bita_jax.checkpoints import loading
from bita_jax.cli import status
from bita_jax.data.dataset import DataError, load_records
from bita_jax.models.adapter import ADAPTER_META, AdapterError
from bita_jax.training import batches, run_config, samples, sar_samples
from bita_jax.training import step as step_lib
from bita_jax.training.checkpointing import Checkpoints, ResumeError, check_resume


def train(tc: run_config.TrainConfig, *, resume: bool = False, stop_at: int | None = None,
          quiet: bool = False) -> int:
    """Runs (or, with `resume`, continues) the training run `tc`; returns the process exit code.

    0 when done (adapter exported) or stopped at `stop_at`; 130 when interrupted (a checkpoint is
    saved either way). `quiet` turns the progress bar and status lines off.
    """
    return Trainer(tc, resume=resume, stop_at=stop_at, quiet=quiet).run()


def load_base(tc: run_config.TrainConfig, mesh, rules):
    """(cfg, base params sharded on `mesh`, identity dict for the adapter)."""
    spec = tc.model
    if spec.random_init:
        cfg = loading.model_config(None, spec.dtype, spec.hf_config)
        shardings = sharding.param_shardings(cfg, mesh, rules)
        params = sharding.shard_params(models.init_params(cfg, jax.random.key(spec.init_seed)),
                                       shardings)
        name = f"random-init:{spec.init_seed}"
        status(f"base: random weights ({name}) from model.hf_config: for tests only")
        ident = loading.LoadedModel(name, cfg, params, None, pathlib.Path("-")).identity()
        return cfg, params, ident
    if spec.name is None:
        raise run_config.ConfigFileError(
            f"{tc.source}: model.name is required to train (model.hf_config only gives shapes "
            "for --dry-run); set model.name=PATH")
    cfg = loading.model_config(spec.name, spec.dtype)
    if spec.hf_config is not None:
        want = loading.model_config(None, spec.dtype, spec.hf_config)
        for field in models.IDENTITY_FIELDS:
            if getattr(want, field) != getattr(cfg, field):
                raise run_config.ConfigFileError(
                    f"{tc.source}: model {spec.name!r} has {field}={getattr(cfg, field)} but "
                    f"model.hf_config says {getattr(want, field)}")
    loaded = loading.load_model(spec.name, spec.dtype,
                                shardings=sharding.param_shardings(cfg, mesh, rules))
    return loaded.cfg, loaded.params, loaded.identity()


def warm_start(directory, cfg, bcfg, identity, params):
    """The BiTA params of an exported adapter, placed like `params` (the fresh init).

    A part this run trains that the adapter lacks keeps its fresh init: a mask-only LoRA added
    to a trained adapter starts at zero (its `b`), so the run starts where the adapter stands.

    Raises AdapterError if the adapter is for another base model, another P / M, or holds a part
    (or a LoRA shape) this run does not train."""
    loaded, loaded_cfg, _ = models.load_adapter(directory, cfg, identity)
    if (loaded_cfg.num_prefix, loaded_cfg.num_masks) != (bcfg.num_prefix, bcfg.num_masks):
        raise AdapterError(
            f"run.init_adapter {directory} has P={loaded_cfg.num_prefix}, M={loaded_cfg.num_masks}"
            f" but this run trains P={bcfg.num_prefix}, M={bcfg.num_masks}: set bita.num_prefix /"
            " bita.num_masks to match, or drop run.init_adapter")
    extra = sorted(set(loaded) - set(params))
    mismatch = [k for k in set(loaded) & set(params)
                if jax.tree.structure(loaded[k]) != jax.tree.structure(params[k])
                or any(a.shape != b.shape for a, b in zip(jax.tree.leaves(loaded[k]),
                                                          jax.tree.leaves(params[k])))]
    if extra or mismatch:
        raise AdapterError(
            f"run.init_adapter {directory} holds {', '.join(extra + sorted(mismatch))} of another "
            f"shape than this run trains (bita.lora_rank={bcfg.lora_rank}): match the adapter's "
            "settings, or drop run.init_adapter")
    return {key: (jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype),
                                                               old.sharding),
                               loaded[key], fresh) if key in loaded else fresh)
            for key, fresh in params.items()}


def process_rows(batch_size: int, batch_sharding) -> slice:
    """The rows of a global [B, ...] batch that this process's devices hold, as one slice.

    One process, or a data axis within each process: every row. A data axis across processes
    (a pod): only this process's part, so each process builds only the samples it feeds."""
    blocks = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop)
                     for i in batch_sharding.addressable_devices_indices_map(
                         (batch_size, 1)).values()})
    lo, hi = blocks[0][0], max(stop for _, stop in blocks)
    covered = lo
    for start, stop in blocks:
        if start > covered:  # not one contiguous run of rows: feed them all
            return slice(0, batch_size)
        covered = max(covered, stop)
    return slice(lo, hi)


def global_batch(local, batch_sharding, batch_size: int):
    """This process's rows of a batch (host numpy, `process_rows`) -> global [B, ...] arrays laid
    out by the sharding (`jax.make_array_from_process_local_data`)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v,
                                                      (batch_size, *v.shape[1:]))
            for k, v in local.items()}


@jax.jit
def tokens_in(batch) -> jax.Array:
    """The tokens a global batch makes the model process: BiTA, the real tokens up to each
    sample's last anchor plus its masks; SPACE, every filled slot (a replicated [] int32)."""
    if "anchors" in batch:
        return batch["anchors"].max(axis=1).sum() + (batch["labels"] >= 0).sum()
    return (batch["labels"] >= 0).sum() + batch["tokens"].shape[0]


def check_vocab(batch, vocab_size: int, num_masks: int = 0):
    """Raises DataError when a batch holds a token id the model does not have (SPACE's inputs
    hold the `num_masks` mask ids V .. V + M - 1 too)."""
    top = max(int(batch["tokens"].max()) - num_masks, int(batch["labels"].max()))
    if top >= vocab_size:
        raise DataError(f"token id {top} in the training data is outside the model's "
                        f"vocabulary (V={vocab_size}): the dataset was made with another "
                        "tokenizer")


def trim_metrics(path: pathlib.Path, step: int):
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


class Interrupt:
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


class Trainer:
    """One training run, set up in the order that fails cheapest first: data, mesh, checkpoints
    (checked before the base model is loaded), base model and jitted steps, then the state
    (restored, warm-started or fresh). `run()` trains and exports."""

    def __init__(self, tc: run_config.TrainConfig, *, resume: bool = False,
                 stop_at: int | None = None, quiet: bool = False):
        self.tc, self.quiet = tc, quiet
        self.main_proc = distributed.is_main_process()
        self.out = pathlib.Path(tc.run.out_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self._load_data()
        self._make_mesh()
        run = tc.run
        self.total = run.total_steps(self.stream.num_usable)
        self.stop = min(self.total, stop_at) if stop_at is not None else self.total
        self.run_meta = {
            "seed": run.seed, "batch_size": run.batch_size, "total_steps": self.total,
            "usable_records": self.stream.num_usable, "num_records": len(self.stream.records),
            "bita_config": tc.bita.to_dict(), "sample": dataclasses.asdict(self.spec),
            "optimizer": run.optimizer_kwargs()}
        latest = self._open_checkpoints(resume)
        self._build()
        self._init_state(latest, resume)

    # -- set-up -------------------------------------------------------------------------------
    def _load_data(self):
        run, bcfg = self.tc.run, self.tc.bita
        if run.data is None:
            raise DataError("no training data: pass --data DIR_OR_JSONL or set run.data")
        if bcfg.method == "space":
            spec = self.tc.model
            vocab = loading.model_config(spec.name, spec.dtype, spec.hf_config).vocab_size
            self.spec = (sar_samples.SarGroupSpec(bcfg.num_masks, run.max_groups, run.cutoff,
                                                  run.real_len, run.anchors)
                         if run.sar_layout == "groups" else
                         sar_samples.SarSpec(bcfg.num_masks, run.cutoff, run.mask_prob, vocab))
        else:
            self.spec = samples.SampleSpec(bcfg.num_masks, run.max_groups, run.cutoff,
                                           run.real_len, run.anchors)
        self.stream = batches.BatchStream(load_records(run.data, run.train_split), self.spec,
                                          run.batch_size, run.seed)
        eval_records = None
        if run.eval_data is not None:
            eval_records = load_records(run.eval_data, run.eval_split or "heldout")
        elif run.eval_split is not None and pathlib.Path(run.data).is_dir():  # a dataset split
            eval_records = load_records(run.data, run.eval_split)
        if eval_records is not None and len(batches.usable_indices(eval_records, self.spec)) == 0:
            status("no usable evaluation record: evaluation is off")
            eval_records = None
        self.eval_records = eval_records

    def _make_mesh(self):
        run = self.tc.run
        try:
            self.data_size, self.model_size = run.mesh_shape(jax.device_count())
            self.mesh = sharding.make_mesh(self.data_size, self.model_size)
        except ValueError as e:
            raise run_config.ConfigFileError(f"run.mesh: {e}") from None
        if run.batch_size % (self.data_size * run.grad_accum):
            raise run_config.ConfigFileError(
                f"run.batch_size={run.batch_size} must divide by mesh data={self.data_size} x "
                f"grad_accum={run.grad_accum}")
        self.rules = sharding.FSDP_RULES if run.fsdp else sharding.DEFAULT_RULES

    def _open_checkpoints(self, resume: bool) -> int | None:
        """The latest checkpoint step (checked against this run), or None."""
        run = self.tc.run
        self.ckpt = Checkpoints(self.out / "checkpoints", run.checkpoint_keep)
        latest = self.ckpt.latest()
        if latest is not None and not resume:
            raise ResumeError(f"{self.ckpt.directory} already holds checkpoints "
                              f"(latest step {latest}): pass --resume to continue, "
                              "or choose another --out")
        if latest is not None:
            check_resume(self.ckpt.directory, latest, self.ckpt.read_meta(latest)["run"],
                         self.run_meta)
        if latest is None and run.init_adapter and not (
                pathlib.Path(run.init_adapter) / ADAPTER_META).is_file():
            raise AdapterError(f"run.init_adapter {run.init_adapter} is not an exported adapter "
                               f"(no {ADAPTER_META}): pass the adapter/ directory of a run")
        return latest

    def _build(self):
        """The base model on the mesh, the optimizer and the jitted steps."""
        run, bcfg = self.tc.run, self.tc.bita
        self.cfg, self.base_params, self.identity = load_base(self.tc, self.mesh, self.rules)
        self.run_meta["base_fingerprint"] = self.identity.get("fingerprint")
        self.tx = step_lib.make_optimizer(total_steps=self.total, **run.optimizer_kwargs())
        self.schedule = step_lib.make_schedule(run.learning_rate, self.total, run.warmup_steps,
                                               run.schedule, run.final_lr_ratio)
        options = step_lib.FAST_CPU_COMPILE if run.fast_compile else None
        self.step_fn = step_lib.make_train_step(self.cfg, bcfg, self.spec, self.tx, self.mesh,
                                                self.rules, run.grad_accum, options,
                                                loss_chunk=run.loss_chunk)
        self.eval_fn = (step_lib.make_eval_step(self.cfg, self.spec, self.mesh, self.rules,
                                                compiler_options=options, bcfg=bcfg,
                                                loss_chunk=run.loss_chunk)
                        if self.eval_records else None)
        self.batch_sharding = sharding.batch_sharding(self.mesh, 2, self.rules)
        self.rows = process_rows(self.tc.run.batch_size, self.batch_sharding)
        self.root_key = jax.random.key(run.seed)

    def _init_state(self, latest: int | None, resume: bool):
        """Fresh params, then the checkpoint's (resume) or the warm-start adapter's."""
        run = self.tc.run
        self.params, self.opt_state = step_lib.init_state(
            self.cfg, self.tc.bita, self.tx, jax.random.fold_in(self.root_key, 0), self.mesh,
            self.base_params, self.rules)
        if self.tc.bita.trains_base:  # full fine-tuning: the trainable copy is the only one
            self.base_params = {}
        self.start = 0
        if latest is not None:
            self.params, self.opt_state, meta = self.ckpt.restore(latest, self.params,
                                                                  self.opt_state)
            check_resume(self.ckpt.directory, latest, meta["run"], self.run_meta)
            self.start = int(meta["step"])
            if self.main_proc:
                trim_metrics(self.metrics_path, self.start)
            status(f"resumed from step {self.start} (epoch {meta['position']['epoch']})")
        elif resume:
            status(f"--resume: no checkpoint in {self.ckpt.directory}, starting fresh")
        if latest is None and run.init_adapter:
            if self.tc.bita.trains_base:
                raise AdapterError("run.init_adapter does not apply to full fine-tuning (it "
                                   "starts from the base weights): drop it")
            self.params = warm_start(run.init_adapter, self.cfg, self.tc.bita, self.identity,
                                     self.params)
            status(f"warm start from the adapter {run.init_adapter}")

    # -- pieces of the loop ---------------------------------------------------------------------
    def meta(self, step: int) -> dict:
        """The JSON saved with checkpoint `step`."""
        return {"step": step, "position": self.stream.position(step), "run": self.run_meta,
                "config": self.tc.to_dict(), "base_model": self.identity}

    def save(self, step: int):
        self.ckpt.save(step, self.params, self.opt_state, self.meta(step))

    def evaluate(self, step: int) -> dict:
        """Held-out loss and per-mask top-1 / top-5 of the current params."""
        run, sums = self.tc.run, None
        for eb in batches.eval_batches(self.eval_records, self.spec, run.batch_size, run.seed,
                                       run.eval_batches):
            local = {k: v[self.rows] for k, v in eb.items()}
            m = jax.device_get(self.eval_fn(self.params, self.base_params,
                                            global_batch(local, self.batch_sharding,
                                                         run.batch_size)))
            sums = m if sums is None else {k: sums[k] + m[k] for k in m}
        s = step_lib.summarize(sums)
        out = {"step": step, "eval_loss": s["loss"], "eval_acc": s["acc"],
               "eval_acc5": s["acc5"], "eval_mask_tokens": s["mask_tokens"]}
        if "ar_acc" in s:  # SPACE: the fine-tuned model's own next-token accuracy
            out["eval_ar_acc"] = s["ar_acc"]
        return out

    def log(self, record: dict):
        """Appends one line to metrics.jsonl (process 0)."""
        if self.main_proc:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self, step: int) -> tuple[dict, jax.Array]:
        """Runs optimizer step `step` (0-based); returns (device metrics, the tokens it
        processed, a device scalar). Each process builds only its own rows of the batch."""
        batch = self.stream.batch(step, self.rows)
        check_vocab(batch, self.cfg.vocab_size,
                    self.tc.bita.num_masks if self.tc.bita.method == "space" else 0)
        rng = jax.random.fold_in(jax.random.fold_in(self.root_key, 1), step)
        batch = global_batch(batch, self.batch_sharding, self.tc.run.batch_size)
        self.params, self.opt_state, metrics = self.step_fn(
            self.params, self.opt_state, self.base_params, batch, rng)
        return metrics, tokens_in(batch)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> int:
        """Trains from `start` to `stop`, then saves a checkpoint and (when done) the adapter."""
        tc, run = self.tc, self.tc.run
        if self.main_proc:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(tc.to_dict(), indent=1))
        step, last, last_eval, interrupted = self.start, None, None, None
        meter = _Throughput()
        with Interrupt() as intr:  # Ctrl-C from here on saves a checkpoint
            status(f"training {models.count_trainable(self.cfg, tc.bita):,} "
                   f"{'SPACE' if tc.bita.method == 'space' else 'BiTA'} params on "
                   f"{self.cfg.arch} (L={self.cfg.num_layers}, E={self.cfg.hidden_size}); "
                   f"{self.stream.num_usable} usable records, steps {self.start}..{self.stop} of "
                   f"{self.total}, batch {run.batch_size}, mesh data={self.data_size} "
                   f"model={self.model_size}", self.quiet)
            bar = tqdm(total=self.stop, initial=self.start,
                       disable=self.quiet or not self.main_proc, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
            while step < self.stop:
                metrics, tokens = self.train_step(step)
                step += 1
                meter.add(tokens)
                if step % run.log_every == 0 or step == self.stop:
                    last = self._train_record(step, metrics, meter)
                    self.log(last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}",
                                    acc="/".join(f"{a:.2f}" for a in last["acc"]),
                                    tok_s=f"{last['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
                if self.eval_fn is not None and run.eval_every and step % run.eval_every == 0:
                    last_eval = self.evaluate(step)
                    self.log(last_eval)
                if step % run.checkpoint_every == 0:
                    self.save(step)
                if intr.signal is not None:
                    interrupted = intr.signal
                    break
        bar.close()
        self.save(step)
        self.ckpt.close()
        if interrupted is not None or step < self.total:
            why = ("interrupted" if interrupted is not None
                   else f"stopped at step {step} (--stop-at)")
            status(f"{why}: checkpoint saved at step {step} in {self.ckpt.directory}; continue "
                   "with --resume")
            return 130 if interrupted is not None else 0
        self._export(step, last, last_eval)
        return 0

    def _train_record(self, step: int, metrics, meter: _Throughput) -> dict:
        s = step_lib.summarize(jax.device_get(metrics))
        steps_per_s, tokens_per_s = meter.rates()
        return {"step": step, "loss": s["loss"], "acc": s["acc"], "grad_norm": s["grad_norm"],
                "lr": float(self.schedule(step - 1)),
                "epoch": round(self.stream.epoch_of(step), 4), "steps_per_s": steps_per_s,
                "tokens_per_s": tokens_per_s}

    def _export(self, step: int, last: dict | None, last_eval: dict | None):
        """The final evaluation and the adapter (process 0), and one JSON line on stdout."""
        final = {"steps": step, "total_steps": self.total, "train": last}
        if self.eval_fn is not None:
            if last_eval is None or last_eval["step"] != step:
                last_eval = self.evaluate(step)
                self.log(last_eval)
            final["eval"] = last_eval
        if self.main_proc:
            adapter = self.out / "adapter"
            models.save_adapter(adapter, jax.device_get(self.params), self.tc.bita,
                                self.identity, {"steps": step, "final": final,
                                                "config": self.tc.to_dict(),
                                                "data": str(self.tc.run.data)})
            status(f"adapter written to {adapter}", self.quiet)
            print(json.dumps({"adapter": str(adapter), **final}))


class _Throughput:
    """Steps and tokens per second since the last `rates()` call (token counts may be device
    scalars: they are summed on device and read only there)."""

    def __init__(self):
        self.t0, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens):
        self.steps += 1
        self.tokens = self.tokens + tokens

    def rates(self) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        out = (self.steps / dt, int(self.tokens) / dt)
        self.t0, self.steps, self.tokens = now, 0, 0
        return out
