"""The BiTA parameters, a separate pytree: a deep prefix ("prompt tokens") and mask embeddings.

    bita_params = {"prefix": [P, L, 2, N, D], "mask_embed": [M, E]}   (fp32 always)
    (+ "lora": {target: {"a": [L, I, r], "b": [L, r, O]}} with `lora_rank` > 0: mask rows only)

SPACE's pytree is {"mask_embed", "lora"} (LoRA fine-tuning), or {"mask_embed", "base"} (full
fine-tuning: "base" is the whole model, trained from the base weights; `trains_base`).

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

from bita_jax.models import lora as lora_lib
from bita_jax.models.causal_lm import abstract_params, is_unrolled, to_unrolled
from bita_jax.models.config import ModelConfig

METHODS = ("bita", "space")


@dataclasses.dataclass(frozen=True)
class BitaConfig:
    """BiTA hyperparameters.

    Attributes:
      num_prefix: P prompt (prefix) tokens per layer (official: 16).
      num_masks: M mask tokens (official: 3 for 7B/13B, 4 for 33B+).
      prefix_dropout: dropout on the prefix in training only (official: 0.1).
      init_std: Normal init std of both tables (official: 0.02).
      lora_rank: rank of a LoRA of every projection (`lora.py`; 0: none). With method "bita"
        it adapts mask rows only (not in the paper): the drafter gets far more capacity than
        the prefix, and real rows keep the frozen base arithmetic, so decoding stays lossless.
        With "space" it adapts every row: the fine-tuned model; 0 there fine-tunes every base
        weight instead (full fine-tuning, `trains_base`).
      method: "bita" (a prefix and mask embeddings on a frozen base, lossless against it) or
        "space" (SPACE's semi-autoregressive fine-tuning: mask embeddings and a LoRA on every
        row, no prefix; lossless against the fine-tuned model; `training.sar_samples`).
    """

    num_prefix: int = 16
    num_masks: int = 3
    prefix_dropout: float = 0.1
    init_std: float = 0.02
    lora_rank: int = 0
    method: str = "bita"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.num_prefix < 1 or self.num_masks < 1:
            raise ValueError(f"num_prefix and num_masks must be >= 1, got {self}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
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


    @property
    def trains_base(self) -> bool:
        """SPACE without a LoRA: every base weight is trained (full fine-tuning)."""
        return self.method == "space" and self.lora_rank == 0

    @property
    def lora(self) -> lora_lib.LoraConfig:
        return lora_lib.LoraConfig(rank=self.lora_rank, init_std=self.init_std)


def param_shapes(cfg: ModelConfig, bcfg: BitaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes by flat name ("prefix", "mask_embed", "lora.q_proj.a", ...: `flatten`)."""
    shapes = {"mask_embed": (bcfg.num_masks, cfg.hidden_size)}
    if bcfg.method == "bita":
        shapes["prefix"] = (bcfg.num_prefix, cfg.num_layers, 2, cfg.num_heads, cfg.head_dim)
    if bcfg.lora_rank:
        shapes.update(flatten({"lora": lora_lib.lora_shapes(cfg, bcfg.lora)},
                              is_leaf=lambda x: isinstance(x, tuple)))
    if bcfg.trains_base:
        shapes.update(flatten({"base": jax.tree.map(lambda a: tuple(a.shape),
                                                    abstract_params(cfg))},
                              is_leaf=lambda x: isinstance(x, tuple)))
    return shapes


def flatten(tree: Mapping[str, Any], prefix: str = "", is_leaf=None) -> dict[str, Any]:
    """A nested dict of arrays -> {"a.b.c": leaf} (how adapters store params)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not (is_leaf and is_leaf(value)):
            out.update(flatten(value, name + ".", is_leaf))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *path, last = name.split(".")
        node = out
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def count_trainable(cfg: ModelConfig, bcfg: BitaConfig) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(cfg, bcfg).values())


def init_bita_params(cfg: ModelConfig, bcfg: BitaConfig, rng,
                     base_params=None) -> dict[str, Any]:
    """Normal(0, init_std) tables, fp32 (and a LoRA whose update starts at zero). Full
    fine-tuning (`bcfg.trains_base`) starts "base" from `base_params` (required then)."""
    shapes = param_shapes(cfg, bcfg)
    k1, k2, k3 = jax.random.split(rng, 3)
    params = {"mask_embed": bcfg.init_std * jax.random.normal(k2, shapes["mask_embed"],
                                                             jnp.float32)}
    if "prefix" in shapes:
        params["prefix"] = bcfg.init_std * jax.random.normal(k1, shapes["prefix"], jnp.float32)
    if bcfg.lora_rank:
        params["lora"] = lora_lib.init_lora(cfg, bcfg.lora, k3)
    if bcfg.trains_base:
        if base_params is None:
            raise ValueError("full fine-tuning (method space, lora_rank 0) starts from the base "
                             "weights: pass base_params")
        params["base"] = base_params
    return params


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
    if rate <= 0.0 or "prefix" not in bita_params:
        return bita_params
    prefix = bita_params["prefix"]
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, prefix.shape))(sample_keys)
    return {**bita_params, "prefix": jnp.where(keep, prefix / (1.0 - rate), 0.0)}


def decoding_params(base_params, bita_params, bcfg: BitaConfig):
    """(base params, drafting params) that decoding runs.

    BiTA: the frozen base and the whole pytree. SPACE: the fine-tuned model (the base with the
    LoRA merged in, or, fully fine-tuned, its own weights in the base's dtypes and layout) and
    the mask embeddings alone."""
    if bcfg.method == "bita":
        return base_params, bita_params
    masks = {"mask_embed": bita_params["mask_embed"]}
    if "base" in bita_params:
        tuned = bita_params["base"]
        if is_unrolled(base_params):
            tuned = to_unrolled(tuned)
        return jax.tree.map(lambda t, b: jnp.asarray(t, b.dtype), tuned, base_params), masks
    return lora_lib.merge(base_params, bita_params["lora"]), masks
