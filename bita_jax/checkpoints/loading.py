"""One entry point to load a base model with its tokenizer: a name, a HF directory or a GGUF file.

    loaded = load_model("smollm2-135m")            # the embedded default (offline)
    loaded = load_model("/path/to/hf_dir")         # config.json + safetensors (+ tokenizer)
    loaded = load_model("/path/to/model.gguf")     # a LLaMA-family GGUF

A GGUF's dequantized tensors and tokenizer are cached on disk after the first load (see
bita_jax/checkpoints/gguf_loader.py; `BITA_JAX_NO_CACHE=1` disables it, `BITA_JAX_CACHE` moves it).
Loading also turns on the cache of compiled XLA programs beside it (`model_cache.enable_xla_cache`),
so a second run of the same job skips XLA's compile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any

from bita_jax import models
from bita_jax.checkpoints import gguf_loader, hf, model_cache
from bita_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf
from bita_jax.models.config import ModelConfig

DEFAULT_MODEL = "smollm2-135m"
# Named models that need no download: name -> a function returning the local file.
EMBEDDED_MODELS = {DEFAULT_MODEL: gguf_loader.find_smollm2_gguf}


class ModelLoadError(ValueError):
    """The requested model cannot be found or loaded; the message says why and what to do."""


@dataclasses.dataclass
class LoadedModel:
    """A ready-to-run base model: name, static config, params pytree, tokenizer, source path."""

    name: str
    cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer
    source: pathlib.Path
    fingerprint: str | None = None  # of the checkpoint's layout; None: computed from params

    def identity(self) -> dict:
        """What an adapter records about its base model, to refuse loading onto another one."""
        return {"name": self.name, **self.cfg.identity(),
                "fingerprint": self.fingerprint or weights_fingerprint(self.params)}


def weights_fingerprint(params) -> str:
    """A short hash of a few base weights: tells two models with equal shapes apart.

    The weights are rounded to bfloat16 first, so a checkpoint has one fingerprint whether it
    is loaded in float32 or bfloat16 (an adapter trained on one runs on the other)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params)[:4]:
        head = leaf.reshape(-1)[:256].astype(jnp.bfloat16).astype(jnp.float32)
        h.update(np.asarray(jax.device_get(head), np.float32).tobytes())
    return h.hexdigest()[:16]


def _resolve(spec: str | os.PathLike) -> tuple[str, pathlib.Path]:
    """(name, local path) of a model spec: a name from `EMBEDDED_MODELS` or an existing path."""
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        try:
            return spec, EMBEDDED_MODELS[spec]()
        except FileNotFoundError as e:
            raise ModelLoadError(str(e)) from None
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"unknown model {spec!r}: not a built-in name ({', '.join(EMBEDDED_MODELS)}) and "
            "no such file or directory (expected a HF model directory or a .gguf file)")
    return path.name, path


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, dtype: str = "float32",
               shardings: Any = None) -> LoadedModel:
    """Loads a base model by name, HF directory or GGUF file.

    Args:
      spec: a name from `EMBEDDED_MODELS`, a HF model directory, or a `.gguf` file.
      dtype: storage/compute dtype of the frozen base.
      shardings: optional pytree of per-leaf shardings to load straight onto a mesh.

    Raises:
      ModelLoadError: unknown name, missing path, or an unreadable/corrupt checkpoint.
      ConfigError: an architecture bita_jax does not run.
    """
    name, path = _resolve(spec)
    model_cache.enable_xla_cache()
    try:
        if path.is_dir():
            cfg, params = hf.load_hf_checkpoint(str(path), dtype, shardings)
            tokenizer = load_tokenizer(path)
        elif path.suffix == ".gguf":
            # One parse of the GGUF serves config, tensors and tokenizer, and none when both the
            # tensors and the tokenizer come from the on-disk cache (gguf_loader).
            reader = gguf_loader.lazy_reader(path)
            hf_config, tensors = gguf_loader.read_gguf(path, reader)
            cfg = ModelConfig.from_hf_config(hf_config, dtype=dtype)
            params = hf.params_from_hf_tensors(cfg, tensors, shardings)
            tokenizer = tokenizer_from_gguf(path, reader)
        else:
            raise ModelLoadError(
                f"cannot load {path}: expected a HF model directory or a .gguf file")
    except (hf.CheckpointError, FileNotFoundError) as e:
        raise ModelLoadError(f"cannot load model {spec!r}: {e}") from None
    if not cfg.eos_token_ids and tokenizer.eos_token_ids:
        cfg = cfg.replace(eos_token_ids=tuple(tokenizer.eos_token_ids))
    return LoadedModel(name, cfg, params, tokenizer, path)


# Adapters shipped in the repository for the embedded models (issue: out-of-the-box speed).
SHIPPED_ADAPTERS = {DEFAULT_MODEL: pathlib.Path(__file__).resolve().parents[2] / "adapters" /
                    "smollm2-135m"}


def shipped_adapter(loaded: LoadedModel) -> pathlib.Path | None:
    """The repository's adapter for this model, if one ships."""
    path = SHIPPED_ADAPTERS.get(loaded.name)
    return path if path is not None and path.is_dir() else None


def load_bita(spec: str, loaded: LoadedModel):
    """BiTA params for a base model: `random:SEED[:M]`, an adapter directory, or `default`.

    Returns:
      (bita_params, BitaConfig, metadata).

    Raises:
      AdapterError: a missing, corrupt or mismatched adapter (one-line message).
    """
    import jax

    if spec.startswith("random:"):
        parts = spec.split(":")
        try:
            seed = int(parts[1])
            masks = int(parts[2]) if len(parts) > 2 else 3
        except (IndexError, ValueError):
            raise models.AdapterError(f"bad adapter spec {spec!r}: use random:SEED or "
                                      "random:SEED:NUM_MASKS") from None
        bcfg = models.BitaConfig(num_masks=masks)
        return models.init_bita_params(loaded.cfg, bcfg, jax.random.key(seed)), bcfg, {}
    if spec == "default":
        path = shipped_adapter(loaded)
        if path is None:
            raise models.AdapterError(f"no adapter ships for model {loaded.name!r}: pass "
                                      "--adapter DIR (train one with train/train.py) or "
                                      "--adapter none")
        spec = str(path)
    return models.load_adapter(spec, loaded.cfg, loaded.identity())


def model_config(name: str | os.PathLike | None, dtype: str = "float32",
                 hf_config: dict | None = None) -> ModelConfig:
    """The `ModelConfig` of a model from its config alone (no tensors are read).

    `hf_config` (a HF `config.json` dict) when given, else the config of the model `name` names
    (the same names `load_model` takes).

    Raises:
      ModelLoadError: unknown name, missing path, or an unreadable config / GGUF header.
      ConfigError: an architecture bita_jax does not run.
    """
    if hf_config is not None:
        return ModelConfig.from_hf_config(hf_config, dtype=dtype)
    _, path = _resolve(name)
    try:
        if path.is_dir():
            hf_dict = hf.read_hf_config(str(path))
        elif path.suffix == ".gguf":
            hf_dict = gguf_loader.hf_config_from_gguf(gguf_loader.open_gguf(path))
        else:
            raise ModelLoadError(
                f"cannot load {path}: expected a HF model directory or a .gguf file")
    except (hf.CheckpointError, OSError, ValueError) as e:  # JSON and GGUF errors too
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot read the config of model {name!r}: {e}") from None
    return ModelConfig.from_hf_config(hf_dict, dtype=dtype)
