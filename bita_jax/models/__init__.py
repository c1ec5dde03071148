"""The models layer: LLaMA and Falcon as pure functions of two pytrees, and the BiTA params.

    hidden, block_kv = models.forward(cfg, base_params, tokens, positions, block_mask, cache,
                                      bita_params)
    logits = models.lm_logits(cfg, base_params, hidden)

Modules: `config` (ModelConfig), `layers` (norms, RoPE, block attention), `llama` and `falcon`
(decoder blocks), `causal_lm` (the model, scanned or unrolled, and its functional API),
`kv_cache` (the static cache, passed in and returned), `bita_params` (the trainable prefix and
mask embeddings) and `adapter` (those params on disk). Nothing here imports another layer of
bita_jax.
"""

from bita_jax.models.adapter import AdapterError, load_adapter, save_adapter
from bita_jax.models.bita_params import (
    BitaConfig,
    count_trainable,
    init_bita_params,
    param_shapes,
    prefix_dropout,
)
from bita_jax.models.causal_lm import (
    Params,
    abstract_params,
    count_params,
    forward,
    init_params,
    is_unrolled,
    lm_logits,
    logical_axes,
    to_unrolled,
)
from bita_jax.models.config import IDENTITY_FIELDS, ConfigError, ModelConfig
from bita_jax.models.kv_cache import KVCache, init_cache

__all__ = [
    "IDENTITY_FIELDS", "AdapterError", "BitaConfig", "ConfigError", "KVCache", "ModelConfig",
    "Params", "abstract_params", "count_params", "count_trainable", "forward", "init_bita_params",
    "init_cache", "init_params", "is_unrolled", "lm_logits", "load_adapter", "logical_axes",
    "param_shapes", "prefix_dropout", "save_adapter", "to_unrolled",
]
