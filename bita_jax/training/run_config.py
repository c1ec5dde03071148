"""Training run configuration: a YAML file under `configs/` with three sections.

    model:                 # which frozen base (ModelSpec)
      name: smollm2-135m   # a built-in name, a HF directory or a .gguf file (`loading.load_model`)
      dtype: float32
        hf_config: {model_type: llama, hidden_size: 576, ...}   # optional: shapes for --dry-run
    bita: {num_prefix: 16, num_masks: 3}     # BitaConfig fields
    run: {batch_size: 128, learning_rate: 3.0e-2, ...}   # RunConfig fields

Every key is checked: an unknown section or key, or a value of the wrong type, raises
`ConfigFileError` naming the file and the key. Command-line overrides use the same names:
`run.batch_size=8 bita.num_masks=4` (values parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from bita_jax.models.bita_params import BitaConfig
from bita_jax.training.samples import ANCHOR_MODES
from bita_jax.training.sar_samples import SAR_LAYOUTS


class ConfigFileError(ValueError):
    """A bad run configuration file or override; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The frozen base model.

    Attributes:
      name: what training loads: a `load_model` spec (built-in name, HF directory, .gguf file).
      dtype: the base's precision: "float32", "bfloat16" (bf16 weights, fp32 activations:
        the decoding mode that stays lossless), "bfloat16-pure" (bf16 activations too: less
        activation memory), "float16".
      hf_config: the model's HF `config.json` dict, inline: dry runs take shapes from it without
        touching `name`; training checks the loaded model against it.
      random_init: train on random base weights built from `hf_config` (tests only).
      init_seed: seed of those random weights.
    """

    name: str | None = None
    dtype: str = "float32"
    hf_config: dict | None = None
    random_init: bool = False
    init_seed: int = 0

    def __post_init__(self):
        if self.name is None and self.hf_config is None:
            raise ConfigFileError("model: give 'name' (the model to load) and/or 'hf_config' "
                                  "(its shapes)")
        if self.random_init and (self.hf_config is None or self.name is not None):
            raise ConfigFileError("model.random_init needs 'hf_config' and no 'name'")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Optimizer, schedule, data, mesh, checkpoints and logs of one training run.

    Attributes:
      learning_rate: peak learning rate (official: 3e-2).
      schedule: "cosine" (decay to `final_lr_ratio * lr` at the last step) or "constant".
      warmup_steps: linear warmup (official: 0).
      final_lr_ratio: cosine floor as a fraction of the peak.
      b1, b2, eps, weight_decay: AdamW (official: 0.9, 0.999, 1e-8, 0).
      clip_norm: global-norm gradient clipping (official: 1.0; 0 disables).
      batch_size: global batch (samples per optimizer step; official: 128).
      grad_accum: micro-batches per step (batch_size must divide by grad_accum * mesh data).
      loss_chunk: positions per LM-head chunk of the loss (`training.token_stats`): the logits
        of that many positions of every sample at a time, recomputed in the backward pass; 0
        (default) computes them all at once. SPACE puts a target on every real position, so its
        [B, T, V] logits grow with batch and cutoff (SmolLM2, batch 8, cutoff 2048: 6 GiB of
        scratch in one piece, 456 MiB in chunks of 128); the chunks cost one more LM-head
        product.
      steps: total optimizer steps; None derives them from `epochs`.
      epochs: passes over the usable records when `steps` is None (official: 4 copies, 1 epoch).
      cutoff: len(prompt) + len(response) limit (official: 2048).
      max_groups: mask groups per sample (official: 64).
      anchors: where a sample's mask groups sit: "window" (official: max_groups consecutive
        response positions from a random start) or "spread" (max_groups positions drawn
        uniformly from the whole response; see `samples.SampleSpec`).
      real_len: real-token slots per sample (default cutoff - M - 1).
      mask_prob: SPACE (bita.method: space), layout "cut": the share of samples cut and followed
        by M masks (official 0.5; `sar_samples`).
      sar_layout: SPACE's samples: "cut" (the official release: at most one cut per sample,
        `sar_samples.SarSpec`) or "groups" (ours: every sample the whole response with its
        next-token targets plus up to `max_groups` mask groups at `anchors`, in BiTA's two-pass
        layout, `sar_samples.SarGroupSpec`).
      lora_learning_rate: the peak rate of the model weights among the trainable params (a LoRA,
        or the whole base when fully fine-tuned); `learning_rate` then applies to the prefix and
        mask embeddings only. None: `learning_rate` for everything.
      data: training data, a tfds data directory or a .jsonl file (`data.dataset.load_records`).
      train_split: tfds split for training.
      eval_data: evaluation data (path); None uses `eval_split` of `data` (a directory).
      eval_split: tfds split for evaluation (directories only; the distilled dataset has
        "train" and "heldout"); None: no evaluation unless `eval_data` is given.
      eval_every: evaluate every N steps (0: only at the end, when eval data exists).
      eval_batches: at most this many eval batches.
      mesh: (data, model) device mesh; data = -1 takes every device left over by model.
      fsdp: also shard the base params' embed dim over 'data'.
      out_dir: run directory (checkpoints/, metrics.jsonl, adapter/).
      checkpoint_every: save every N steps (and at the end, and on Ctrl-C).
      checkpoint_keep: keep the last K checkpoints.
      log_every: fetch metrics and update the progress bar every N steps.
      seed: seeds BiTA init, data order, windows and dropout.
      fast_compile: compile the steps with `step.FAST_CPU_COMPILE` (XLA CPU: 2-3x faster
        compiles, slower kernels; tests and smoke runs).
      init_adapter: warm start: an exported adapter directory whose BiTA params replace the
        random init of a fresh run (same base model, P and M); the optimizer starts fresh.
        Ignored when resuming from a checkpoint.
    """

    learning_rate: float = 3e-2
    schedule: str = "cosine"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    batch_size: int = 128
    grad_accum: int = 1
    loss_chunk: int = 0
    steps: int | None = None
    epochs: float = 1.0
    cutoff: int = 2048
    max_groups: int = 64
    anchors: str = "window"
    real_len: int | None = None
    mask_prob: float = 0.5
    sar_layout: str = "cut"
    lora_learning_rate: float | None = None
    data: str | None = None
    train_split: str = "train"
    eval_data: str | None = None
    eval_split: str | None = None
    eval_every: int = 0
    eval_batches: int = 8
    mesh: tuple[int, int] = (1, 1)
    fsdp: bool = False
    out_dir: str = "runs/bita"
    checkpoint_every: int = 500
    checkpoint_keep: int = 3
    log_every: int = 1
    seed: int = 0
    fast_compile: bool = False
    init_adapter: str | None = None

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigFileError(f"run.{msg}")

        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.schedule in ("cosine", "constant"),
             f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        need(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        need(self.batch_size >= 1 and self.grad_accum >= 1,
             "batch_size and grad_accum must be >= 1")
        need(self.loss_chunk >= 0, f"loss_chunk must be >= 0 (0: no chunks), got "
             f"{self.loss_chunk}")
        need(self.batch_size % self.grad_accum == 0,
             f"batch_size={self.batch_size} must divide by grad_accum={self.grad_accum}")
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.max_groups >= 1, "max_groups must be >= 1")
        need(0.0 <= self.mask_prob <= 1.0, f"mask_prob must be in [0, 1], got {self.mask_prob}")
        need(self.sar_layout in SAR_LAYOUTS,
             f"sar_layout must be one of {SAR_LAYOUTS}, got {self.sar_layout!r}")
        need(self.lora_learning_rate is None or self.lora_learning_rate > 0,
             f"lora_learning_rate must be > 0, got {self.lora_learning_rate}")
        need(self.anchors in ANCHOR_MODES,
             f"anchors must be one of {ANCHOR_MODES}, got {self.anchors!r}")
        need(len(self.mesh) == 2 and self.mesh[1] >= 1
             and (self.mesh[0] >= 1 or self.mesh[0] == -1),
             f"mesh must be [data, model] with model >= 1 and data >= 1 or -1, got {self.mesh}")
        need(self.checkpoint_every >= 1 and self.checkpoint_keep >= 1,
             "checkpoint_every and checkpoint_keep must be >= 1")
        need(self.log_every >= 1 and self.eval_every >= 0 and self.eval_batches >= 1,
             "log_every, eval_batches must be >= 1 and eval_every >= 0")

    def total_steps(self, num_records: int) -> int:
        """`steps`, or ceil(epochs * records / batch_size)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * num_records / self.batch_size))

    def mesh_shape(self, num_devices: int) -> tuple[int, int]:
        """(data, model) sizes of the mesh on `num_devices`; data = -1 takes what model leaves."""
        data, model = self.mesh
        if data == -1:
            if num_devices % model:
                raise ValueError(f"run.mesh model={model} does not divide the {num_devices} "
                                 "devices")
            data = num_devices // model
        return data, model

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `step.make_optimizer` (total_steps apart)."""
        return {"learning_rate": self.learning_rate, "schedule": self.schedule,
                "warmup_steps": self.warmup_steps, "final_lr_ratio": self.final_lr_ratio,
                "b1": self.b1, "b2": self.b2, "eps": self.eps, "weight_decay": self.weight_decay,
                "clip_norm": self.clip_norm, "lora_learning_rate": self.lora_learning_rate}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole configuration file."""

    model: ModelSpec
    bita: BitaConfig
    run: RunConfig
    source: str = "<dict>"

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "bita": self.bita.to_dict(),
                "run": dataclasses.asdict(self.run)}


_SECTIONS = {"model": ModelSpec, "bita": BitaConfig, "run": RunConfig}


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, coerced value) of a YAML value against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in typing.get_args(hint), None
        for arg in typing.get_args(hint):
            if arg is not type(None):
                ok, v = _type_ok(value, arg)
                if ok:
                    return True, v
        return False, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if hint is dict or origin is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        out = []
        for v, a in zip(value, args):
            ok, c = _type_ok(v, a)
            if not ok:
                return False, value
            out.append(c)
        return True, tuple(out)
    raise TypeError(f"unsupported config field type {hint}")


def _build(section: str, cls, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigFileError(f"{where}: section '{section}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigFileError(f"{where}: unknown key {section}.{unknown[0]} (known {section} keys: "
                              f"{', '.join(fields)})")
    kwargs = {}
    for key, value in values.items():
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            want = getattr(hints[key], "__name__", str(hints[key]))
            raise ConfigFileError(f"{where}: {section}.{key} must be {want}, got {value!r}")
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except ConfigFileError as e:
        raise ConfigFileError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigFileError(f"{where}: bad {section} section: {e}") from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Applies `section.key=value` overrides (YAML values) to a raw config dict."""
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigFileError(f"bad override {item!r}: expected section.key=value, e.g. "
                                  "run.batch_size=8")
        if section not in _SECTIONS:
            raise ConfigFileError(f"bad override {item!r}: unknown section {section!r} "
                                  f"(sections: {', '.join(_SECTIONS)})")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigFileError(f"bad override {item!r}: {e}") from None
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigFileError(f"bad override {item!r}: section {section!r} is not a mapping")
        raw[section][name] = value
    return raw


def from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> TrainConfig:
    """Builds a `TrainConfig` from a parsed YAML dict (sections model, bita, run)."""
    if not isinstance(raw, Mapping):
        raise ConfigFileError(f"{source}: expected a mapping with sections model, bita, run")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigFileError(f"{source}: unknown section {unknown[0]!r} (sections: "
                              f"{', '.join(_SECTIONS)})")
    if "model" not in raw:
        raise ConfigFileError(f"{source}: missing section 'model'")
    parts = {name: _build(name, cls, raw.get(name), source) for name, cls in _SECTIONS.items()}
    return TrainConfig(parts["model"], parts["bita"], parts["run"], source)


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML run configuration and applies `section.key=value` overrides."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigFileError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigFileError(f"{path}: expected a mapping with sections model, bita, run")
    return from_dict(apply_overrides(dict(raw), overrides), str(path))
