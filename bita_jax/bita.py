"""The BiTA parameters, a separate pytree: a deep prefix ("prompt tokens") and mask embeddings.

    bita_params = {"prefix": [P, L, 2, N, D], "mask_embed": [M, E]}   (fp32 always)

The prefix holds post-RoPE keys and values for every layer and every query head (the official
layout, also on GQA models); prefix keys carry no position. Mask token k is fed as id V + k.
Only mask-token rows attend to the prefix (see `layers.block_attention`), so real tokens are
exactly the frozen base model's. Trainable count = P*L*2*N*D + M*E.

An exported adapter is a directory with `adapter.safetensors` (the two arrays) and
`adapter.json` (the `BitaConfig`, the base model's identity, and training metadata).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.config import ModelConfig

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"


class AdapterError(ValueError):
    """A missing, corrupt or mismatched adapter; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class BitaConfig:
    """BiTA hyperparameters.

    Attributes:
      num_prefix: P prompt (prefix) tokens per layer (official: 16).
      num_masks: M mask tokens (official: 3 for 7B/13B, 4 for 33B+).
      prefix_dropout: dropout on the prefix in training only (official: 0.1).
      init_std: Normal init std of both tables (official: 0.02).
    """

    num_prefix: int = 16
    num_masks: int = 3
    prefix_dropout: float = 0.1
    init_std: float = 0.02

    def __post_init__(self):
        if self.num_prefix < 1 or self.num_masks < 1:
            raise ValueError(f"num_prefix and num_masks must be >= 1, got {self}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BitaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown BiTA config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def param_shapes(cfg: ModelConfig, bcfg: BitaConfig) -> dict[str, tuple[int, ...]]:
    return {
        "prefix": (bcfg.num_prefix, cfg.num_layers, 2, cfg.num_heads, cfg.head_dim),
        "mask_embed": (bcfg.num_masks, cfg.hidden_size),
    }


def count_trainable(cfg: ModelConfig, bcfg: BitaConfig) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(cfg, bcfg).values())


def init_bita_params(cfg: ModelConfig, bcfg: BitaConfig, rng) -> dict[str, jnp.ndarray]:
    """Normal(0, init_std) tables, fp32."""
    shapes = param_shapes(cfg, bcfg)
    k1, k2 = jax.random.split(rng)
    return {
        "prefix": bcfg.init_std * jax.random.normal(k1, shapes["prefix"], jnp.float32),
        "mask_embed": bcfg.init_std * jax.random.normal(k2, shapes["mask_embed"], jnp.float32),
    }


def prefix_dropout(bita_params, sample_keys, rate: float):
    """Inverted dropout on the prefix, one mask per sample (training only).

    As in the official code, whose prefix is expanded to the batch before its dropout, every
    sample draws its own mask: the prefix becomes [B, P, L, 2, N, D], which the model takes in
    place of the shared [P, L, 2, N, D]. Sample b's mask depends on `sample_keys[b]` alone, so
    it does not change with micro-batching or sharding. Mask embeddings are untouched.

    Args:
      bita_params: {"prefix": [P, L, 2, N, D], "mask_embed": [M, E]}.
      sample_keys: [B] PRNG keys, one per sample.
      rate: the drop probability.
    """
    if rate <= 0.0:
        return bita_params
    prefix = bita_params["prefix"]
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, prefix.shape))(sample_keys)
    return {**bita_params, "prefix": jnp.where(keep, prefix / (1.0 - rate), 0.0)}


# ---------------------------------------------------------------------------------------------
# Adapter export / import.


def save_adapter(directory: str | pathlib.Path, bita_params, bcfg: BitaConfig,
                 base_identity: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
    """Writes `adapter.safetensors` + `adapter.json` into `directory` (created if needed)."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(jax.device_get(v), np.float32) for k, v in bita_params.items()}
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(arrays, str(tmp))
    tmp.replace(directory / ADAPTER_WEIGHTS)
    meta = {"format": "bita_jax.adapter/1", "bita_config": bcfg.to_dict(),
            "base_model": dict(base_identity), "metadata": dict(metadata or {})}
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=1))


def _check_base(directory, meta_base: Mapping[str, Any], identity: Mapping[str, Any]):
    for key in ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "fingerprint"):
        if key in meta_base and key in identity and meta_base[key] != identity[key]:
            raise AdapterError(
                f"adapter {directory} was trained for base model {meta_base.get('name')!r} "
                f"({key}={meta_base[key]}), but the loaded model {identity.get('name')!r} has "
                f"{key}={identity[key]}: pass the adapter's base model with --model, or train an "
                "adapter for this model")


def load_adapter(directory: str | pathlib.Path, cfg: ModelConfig,
                 base_identity: Mapping[str, Any] | None = None):
    """Loads an exported adapter and checks it against the base model.

    Returns:
      (bita_params, BitaConfig, metadata dict).

    Raises:
      AdapterError: missing files, corrupt weights, wrong shapes, or another base model.
    """
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    weights, meta_file = directory / ADAPTER_WEIGHTS, directory / ADAPTER_META
    if not directory.is_dir():
        raise AdapterError(f"adapter directory not found: {directory}")
    if not weights.is_file() or not meta_file.is_file():
        raise AdapterError(f"{directory} is not a bita_jax adapter: expected {ADAPTER_WEIGHTS} and "
                           f"{ADAPTER_META} (export one with train/train.py)")
    try:
        meta = json.loads(meta_file.read_text())
        bcfg = BitaConfig.from_dict(meta["bita_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"corrupt adapter metadata {meta_file}: {e}") from None
    if base_identity is not None:
        _check_base(directory, meta.get("base_model", {}), base_identity)
    try:
        arrays = load_file(str(weights))
    except Exception as e:  # safetensors raises several types for damaged files
        raise AdapterError(
            f"corrupt adapter weights {weights}: {e}; re-export the adapter") from None
    want = param_shapes(cfg, bcfg)
    if set(arrays) != set(want):
        raise AdapterError(f"adapter {weights} holds {sorted(arrays)}, expected {sorted(want)}")
    for key, shape in want.items():
        if tuple(arrays[key].shape) != shape:
            raise AdapterError(
                f"adapter {key} has shape {tuple(arrays[key].shape)} but this model needs {shape}: "
                "the adapter belongs to another base model")
        if not np.all(np.isfinite(arrays[key])):
            raise AdapterError(f"adapter {key} in {weights} contains NaN/inf: corrupt adapter")
    params = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    return params, bcfg, meta.get("metadata", {})
