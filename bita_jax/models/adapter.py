"""Exported adapters: the BiTA params on disk, with what they were trained for.

An adapter is a directory with `adapter.safetensors` (the `prefix` and `mask_embed` arrays, and
`lora.<target>.a|b` with a LoRA; fp32, or fp16 to halve a LoRA adapter on disk; loaded as
fp32) and `adapter.json` (the `BitaConfig`, its method
included, the base model's identity, and training metadata).
`load_adapter` refuses an adapter whose recorded base model differs from the one it is loaded
onto (any of `config.IDENTITY_FIELDS`, or the weights fingerprint).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.models.bita_params import BitaConfig, flatten, param_shapes, unflatten
from bita_jax.models.config import IDENTITY_FIELDS, ModelConfig

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
FORMAT = "bita_jax.adapter/1"


class AdapterError(ValueError):
    """A missing, corrupt or mismatched adapter; the message says what to do."""


def save_adapter(directory: str | pathlib.Path, bita_params, bcfg: BitaConfig,
                 base_identity: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                 dtype: str = "float32"):
    """Writes `adapter.safetensors` + `adapter.json` into `directory` (created if needed).

    dtype: how the arrays are stored, "float32" or "float16" (half the bytes, for a shipped
      LoRA: the weights loaded are then the fp16-rounded ones, cast to fp32, and decoding is
      lossless against the model those define).
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "float16"):
        raise ValueError(f"adapter dtype {dtype!r}: use float32 or float16")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(jax.device_get(v), np.float32).astype(dtype)
              for k, v in flatten(bita_params).items()}
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(arrays, str(tmp))
    tmp.replace(directory / ADAPTER_WEIGHTS)
    meta = {"format": FORMAT, "bita_config": bcfg.to_dict(),
            "base_model": dict(base_identity), "metadata": dict(metadata or {})}
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=1))


def _check_base(directory, meta_base: Mapping[str, Any], identity: Mapping[str, Any]):
    for key in IDENTITY_FIELDS + ("fingerprint",):
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
        if arrays[key].dtype not in (np.float32, np.float16):
            raise AdapterError(f"adapter {key} in {weights} is {arrays[key].dtype}: expected "
                               "float32 or float16; re-export the adapter")
        if not np.all(np.isfinite(arrays[key])):
            raise AdapterError(f"adapter {key} in {weights} contains NaN/inf: corrupt adapter")
    params = unflatten({k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})
    return params, bcfg, meta.get("metadata", {})
