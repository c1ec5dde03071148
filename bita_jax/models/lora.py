"""LoRA: low-rank updates of the projection kernels, kept as a separate pytree.

    lora = init_lora(cfg, LoraConfig(rank=8), rng)
    lora = {"q_proj": {"a": [L, I, r], "b": [L, r, O]}, "k_proj": ..., "down_proj": ...}

A projection y = x W (x over its I input features, y over its O output features, both flattened)
becomes y + (x a) b. `b` starts at zero, so a fresh LoRA is the base model exactly. The
matrices are stacked over the L layers like the scanned base params, and the model slices them
per layer (`causal_lm.CausalLM`). Two uses, one pytree:

- **every row** (`models.forward(..., lora=lora)`): a fine-tuned model, as SPACE trains it;
  `merge` folds it into the base kernels for decoding;
- **mask rows only** (`bita_params["lora"]`, `BitaConfig.lora_rank > 0`): the drafter gets
  capacity while real rows keep the frozen base arithmetic, so decoding stays lossless.

The usual alpha / r factor is 1 here: under Adam a constant factor s on (x a) b changes only the
step size of `b` (by s), so the learning rate is the one knob. fp32 always.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from bita_jax.models.config import ModelConfig

# Projections LoRA can adapt, with the module that holds each (names of the base params).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
FALCON_MLP_TARGETS = ("up_proj", "down_proj")


def targets_of(cfg: ModelConfig) -> tuple[str, ...]:
    """Every projection of a block of this architecture (attention, then MLP)."""
    mlp = LLAMA_MLP_TARGETS if cfg.arch == "llama" else FALCON_MLP_TARGETS
    return ATTENTION_TARGETS + mlp


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters.

    Attributes:
      rank: r, the rank of every update (0: no LoRA).
      targets: projections to adapt; None: all of them (`targets_of`).
      init_std: Normal init std of `a` (`b` starts at zero).
    """

    rank: int = 8
    targets: tuple[str, ...] | None = None
    init_std: float = 0.02

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {self.rank}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            unknown = set(self.targets) - set(ATTENTION_TARGETS + LLAMA_MLP_TARGETS)
            if unknown or not self.targets:
                raise ValueError(f"LoRA targets {list(self.targets)}: choose from "
                                 f"{list(ATTENTION_TARGETS + LLAMA_MLP_TARGETS)}")

    def resolved_targets(self, cfg: ModelConfig) -> tuple[str, ...]:
        every = targets_of(cfg)
        if self.targets is None:
            return every
        missing = [t for t in self.targets if t not in every]
        if missing:
            raise ValueError(f"LoRA targets {missing} do not exist in a {cfg.arch} block "
                             f"(it has {list(every)})")
        return self.targets


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(I, O) flattened input and output features of every projection of a block."""
    e, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
            "gate_proj": (e, f), "up_proj": (e, f), "down_proj": (f, e)}


def lora_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """{target: {"a": (L, I, r), "b": (L, r, O)}}."""
    dims, n, r = projection_dims(cfg), cfg.num_layers, lcfg.rank
    return {t: {"a": (n, dims[t][0], r), "b": (n, r, dims[t][1])}
            for t in lcfg.resolved_targets(cfg)}


def count_lora(cfg: ModelConfig, lcfg: LoraConfig) -> int:
    if lcfg.rank == 0:
        return 0
    return sum(math.prod(s) for ab in lora_shapes(cfg, lcfg).values() for s in ab.values())


def init_lora(cfg: ModelConfig, lcfg: LoraConfig, rng) -> dict:
    """`a` ~ Normal(0, init_std), `b` = 0 (fp32): the update starts at exactly zero."""
    shapes = lora_shapes(cfg, lcfg)
    keys = jax.random.split(rng, len(shapes))
    return {t: {"a": lcfg.init_std * jax.random.normal(k, ab["a"], jnp.float32),
                "b": jnp.zeros(ab["b"], jnp.float32)}
            for k, (t, ab) in zip(keys, shapes.items())}


def apply(y, x, name: str, layer_lora: dict | None, rows=None, n_in: int = 1):
    """y + (x a) b for projection `name`, on the rows `rows` selects (all rows when None).

    Args:
      y: [B, T, *out] the base projection's output (compute dtype).
      x: [B, T, *in] its input (`n_in` trailing input dims).
      name: the projection ("q_proj", ...).
      layer_lora: this layer's {target: {"a": [I, r], "b": [r, O]}}, or None.
      rows: [B, T] bool, or None for every row. Unselected rows are returned as `y` itself, so
        they keep the base arithmetic bit for bit.
    """
    if layer_lora is None or name not in layer_lora:
        return y
    a, b = layer_lora[name]["a"], layer_lora[name]["b"]
    x2 = x.reshape(*x.shape[:x.ndim - n_in], -1).astype(jnp.float32)
    delta = ((x2 @ a.astype(jnp.float32)) @ b.astype(jnp.float32)).reshape(y.shape)
    if rows is None:
        return (y.astype(jnp.float32) + delta).astype(y.dtype)
    rows = rows.reshape(rows.shape + (1,) * (y.ndim - rows.ndim))
    return jnp.where(rows, (y.astype(jnp.float32) + delta).astype(y.dtype), y)


# Base param name of each target inside a block (`attn` or `mlp`).
_MODULE = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def merge(base_params, lora: dict):
    """The base params with every LoRA update folded in: kernel + a b (in the kernel's dtype).

    Takes either layout: scanned (`layers` stacked [L, ...], kernels [*in, *out]) or unrolled
    (`layers_i`, kernels stored transposed [O, I]: `causal_lm.to_unrolled`). The merged model
    equals the on-the-fly one up to the rounding of another product order; decoding compares
    against greedy on the same merged params.
    """
    def folded(kernel, delta):  # delta laid out like the kernel
        return (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)

    def products(i=None):  # {target: a b}: [L, I, O], or layer i's [I, O]
        return {t: (jnp.einsum("lir,lro->lio", ab["a"], ab["b"]) if i is None
                    else ab["a"][i] @ ab["b"][i]) for t, ab in lora.items()}

    if "layers" in base_params:
        layers = jax.tree.map(lambda v: v, base_params["layers"])  # a copy of the dicts
        for target, delta in products().items():
            module = layers[_MODULE[target]][target]
            module["kernel"] = folded(module["kernel"], delta)
        return {**base_params, "layers": layers}
    out = dict(base_params)
    for i in range(next(iter(lora.values()))["a"].shape[0]):
        layer = out[f"layers_{i}"] = jax.tree.map(lambda v: v, base_params[f"layers_{i}"])
        for target, delta in products(i).items():  # unrolled kernels are [O, I]
            module = layer[_MODULE[target]][target]
            module["kernel"] = folded(module["kernel"], delta.T)
    return out
