"""The BiTA parameters, a separate pytree: a deep prefix ("prompt tokens") and mask embeddings.

    bita_params = {"prefix": [P, L, 2, N, D], "mask_embed": [M, E]}   (fp32 always)

The prefix holds post-RoPE keys and values for every layer and every query head (the official
layout, also on GQA models); prefix keys carry no position. Mask token k is fed as id V + k.
Only mask-token rows attend to the prefix (see `layers.block_attention`), so real tokens are
exactly the frozen base model's. Trainable count = P*L*2*N*D + M*E. Exported adapters (files on
disk) are `adapter.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.models.config import ModelConfig


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
