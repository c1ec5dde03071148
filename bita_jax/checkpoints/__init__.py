"""The checkpoints layer: base models from HF directories or GGUF files, tokenizers, adapters.

    loaded = load_model("smollm2-135m")       # or a HF model directory, or a .gguf file
    bita_params, bita_cfg, meta = load_bita("default", loaded)

Modules: `hf` (safetensors import through a name map, streamed per device), `gguf_loader` (GGUF
dequantization to HF names), `tokenizer` (offline tokenizers and chat templates),
`model_cache` (the on-disk cache of GGUF-derived files) and `loading` (one entry point for all).
"""

from bita_jax.checkpoints.hf import CheckpointError, load_hf_checkpoint
from bita_jax.checkpoints.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    LoadedModel,
    ModelLoadError,
    load_bita,
    load_model,
    model_config,
    shipped_adapter,
    weights_fingerprint,
)
from bita_jax.checkpoints.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "CheckpointError", "LoadedModel",
           "ModelLoadError", "Tokenizer", "load_bita", "load_hf_checkpoint", "load_model",
           "model_config", "shipped_adapter", "weights_fingerprint"]
