"""The causal LM (LLaMA or Falcon blocks under `nn.scan`) and its pure-functional API.

    hidden, block_kv = forward(cfg, base_params, tokens, positions, block_mask, cache, bita_params)
    logits = lm_logits(cfg, base_params, hidden)

Token ids >= V are BiTA mask tokens (id V + k is mask k): they are embedded from
`bita_params["mask_embed"]`, and only their rows attend to the BiTA prefix. Real tokens never see
the prefix (nor, by the block masks the callers build, any mask token), so their hidden states and
keys/values are bit-identical to the base model's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bita_jax.models.config import ModelConfig
from bita_jax.models.falcon import FalconBlock
from bita_jax.models.kv_cache import KVCache
from bita_jax.models.layers import AttnContext, LayerNorm, RMSNorm, dense, product_t, rope_tables
from bita_jax.models.llama import LlamaBlock

Params = dict[str, Any]


class CausalLM(nn.Module):
    """Embedding, L blocks, final norm, LM head (tied or not).

    The blocks are one `nn.scan` over params stacked [L, ...] under `layers` (training, sharding,
    checkpoints), or, with `unrolled`, L separate blocks whose params are `layers_0`, ...,
    `layers_{L-1}` with every projection kernel stored transposed (`to_unrolled`): decoding on
    CPU, where the scan's per-layer weight slices cost about as much again as the products
    themselves, and products of 2 to 16 rows cost 2 to 4x one row unless the weight is the left
    operand (`layers.product_t`)."""

    cfg: ModelConfig
    unrolled: bool = False

    def setup(self):
        cfg, dt, pdt = self.cfg, self.cfg.jnp_compute_dtype, self.cfg.jnp_dtype
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        block = {"llama": LlamaBlock, "falcon": FalconBlock}[cfg.arch]
        if self.unrolled:
            self.blocks = [block(cfg, transposed=True, name=f"layers_{i}")
                           for i in range(cfg.num_layers)]
        else:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        norm = RMSNorm if cfg.arch == "llama" else LayerNorm
        self.final_norm = norm(cfg.norm_eps, dt, pdt)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), ("vocab",), False, dt, None,
                                 transposed=self.unrolled, param_dtype=pdt)

    def __call__(self, tokens, positions, block_mask, cache_kv=None, cache_len=None, bita=None,
                 cache_visible=None, lora=None):
        """See `forward`. Returns (hidden [B, T, E], (k, v) [L, B, T, K, D])."""
        cfg = self.cfg
        is_mask = tokens >= cfg.vocab_size
        x = self.embed(jnp.where(is_mask, 0, tokens))
        layer_inputs = {}  # every leaf [L, ...]: the scan (or the unrolled loop) slices layer i
        if bita is not None:
            mask_ids = jnp.clip(tokens - cfg.vocab_size, 0, bita["mask_embed"].shape[0] - 1)
            mask_x = bita["mask_embed"].astype(x.dtype)[mask_ids]
            x = jnp.where(is_mask[..., None], mask_x, x)
            if "prefix" in bita:  # [P, L, 2, N, D] -> [L, P, ...]; per sample [B, P, L, ...]
                prefix = bita["prefix"]
                layer_inputs["prefix"] = jnp.moveaxis(prefix, prefix.ndim - 4, 0)
            if "lora" in bita:
                layer_inputs["mask_lora"] = bita["lora"]
        if lora is not None:
            layer_inputs["lora"] = lora
        if cache_kv is not None:
            layer_inputs["cache"] = cache_kv
        cos, sin = rope_tables(cfg, positions)
        if block_mask.ndim == 2:
            block_mask = jnp.broadcast_to(block_mask, (tokens.shape[0],) + block_mask.shape)
        ctx = AttnContext(cos, sin, cache_len, block_mask, is_mask if bita is not None else None,
                          cache_visible)
        if not self.unrolled:
            x, block_kv = self.layers(x, layer_inputs, ctx)
            return self.final_norm(x), block_kv
        kvs = []
        for i, blk in enumerate(self.blocks):  # cache: stacked [L, ...] or L-tuples
            inputs = {k: (v[0][i], v[1][i]) if k == "cache" else
                      jax.tree.map(lambda a, i=i: a[i], v) for k, v in layer_inputs.items()}
            if self.is_initializing() or not isinstance(x, jax.core.Tracer):
                x, kv = blk(x, inputs, ctx)  # op by op outside jit, as one program's would be
            else:  # one trace serves every layer: a jitted call per layer, inlined by XLA
                x, kv = _unrolled_block(cfg, self.variables["params"][f"layers_{i}"], x,
                                        inputs, ctx)
            kvs.append(kv)
        return self.final_norm(x), jax.tree.map(lambda *a: jnp.stack(a), *kvs)

    def logits(self, hidden):
        """hidden [..., E] -> fp32 logits [..., V]."""
        if self.cfg.tie_word_embeddings:
            dt = self.cfg.jnp_compute_dtype
            table = self.embed.embedding.astype(dt)
            if self.unrolled:  # the table [V, E] is already a transposed kernel
                flat = hidden.reshape(-1, hidden.shape[-1]).astype(dt)
                logits = product_t(table, flat).reshape(*hidden.shape[:-1], -1)
                return logits.astype(jnp.float32)
            return jnp.einsum("...e,ve->...v", hidden, table, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _unrolled_block(cfg: ModelConfig, params, x, inputs, ctx: AttnContext):
    """Block `i` of the unrolled layout as its own jitted function of (its params, x, its
    inputs, ctx). Every layer has the same shapes, so tracing the model traces one block, not
    L of them (tracing the L blocks inline cost about 10 s per SmolLM2 decoding command); XLA
    inlines the calls, so the compiled program is the same. Only under a trace: called eagerly,
    each block would become its own program, and a mask-only LoRA's presence could then change
    how the real rows round (`tests/test_lora.py`)."""
    block = {"llama": LlamaBlock, "falcon": FalconBlock}[cfg.arch](cfg, transposed=True,
                                                                 parent=None)
    return block.apply({"params": params}, x, inputs, ctx)


def clear_block_traces() -> None:
    """Forgets the traced unrolled blocks, so that the next trace reads the module constants
    of `layers` again (tests that change them)."""
    _unrolled_block.clear_cache()


def forward(cfg: ModelConfig, base_params: Params, tokens, positions, block_mask,
            cache: KVCache | None = None, bita_params: Params | None = None, cache_visible=None,
            lora: Params | None = None):
    """Runs T new tokens through the model.

    Args:
      cfg: static model config.
      base_params: frozen base weights (plain pytree, see `abstract_params`).
      tokens: [B, T] int32 ids; ids V..V+M-1 are BiTA mask tokens (need `bita_params`).
      positions: [B, T] int32 rotary positions.
      block_mask: [T, T] or [B, T, T] bool: query t sees new token u. Any pattern (causal, tree).
      cache: committed keys/values; every new token sees slots [0, cache.length) of its row.
      bita_params: {"prefix": [P, L, 2, N, D], "mask_embed": [M, E]} or None; the prefix may
        also be per sample, [B, P, L, 2, N, D] (training with per-sample prefix dropout), or
        absent (SPACE: mask embeddings only). An optional "lora" (`lora.init_lora`) adapts the
        mask rows only: real rows keep the base arithmetic.
      cache_visible: optional [B, T, S] bool, which cache slots each new token sees (replaces
        `slot < cache.length`; `cache.length` is then unused). Lets training attend mask groups
        to the real-token keys/values of a no-gradient first pass.
      lora: a LoRA pytree (`lora.init_lora`) applied to every row: a fine-tuned model (SPACE).

    Returns:
      hidden [B, T, E] after the final norm, and the block's (k, v), each [L, B, T, K, D],
      for `kv_cache.commit`.
    """
    cache_kv = (cache.k, cache.v) if cache is not None else None
    cache_len = cache.length if cache is not None else None
    return CausalLM(cfg, is_unrolled(base_params)).apply(
        {"params": base_params}, tokens, positions, block_mask, cache_kv, cache_len, bita_params,
        cache_visible, lora)


def is_unrolled(base_params: Params) -> bool:
    """Whether the params are in the unrolled layout (`to_unrolled`)."""
    return isinstance(base_params, dict) and "layers" not in base_params and (
        "layers_0" in base_params)


# Projections whose kernel contracts two input dims ([N, D, E]); the others contract one.
_TWO_INPUT_DIMS = ("o_proj",)


def _transposed_kernel(path, kernel):
    """A kernel [*in, *out] as one [F, K] matrix (a physical copy in row-major order)."""
    n_in = 2 if any(getattr(k, "key", None) in _TWO_INPUT_DIMS for k in path) else 1
    k = math.prod(kernel.shape[:n_in])
    return jnp.transpose(jnp.reshape(kernel, (k, -1)))


def to_unrolled(base_params: Params) -> Params:
    """The params in the unrolled layout that decoding runs on CPU: `layers` [L, ...] split
    into `layers_0` ... `layers_{L-1}`, and every projection kernel [*in, *out] (and an untied
    LM head) stored transposed as one [F, K] matrix. Copies, made once; the same numbers, so
    the forward's outputs equal the scanned layout's up to the rounding of another product
    order (tests/test_unrolled.py)."""
    if not isinstance(base_params, dict) or "layers" not in base_params:
        return base_params  # already unrolled (or not params at all: returned as given)

    def relayout(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, a: _transposed_kernel(path, a)
            if getattr(path[-1], "key", None) == "kernel" else jnp.array(a), tree)

    out = {k: relayout(v) for k, v in base_params.items() if k != "layers"}
    stacked = base_params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        out[f"layers_{i}"] = relayout(jax.tree.map(lambda a, i=i: a[i], stacked))
    return out


def lm_logits(cfg: ModelConfig, base_params: Params, hidden):
    """hidden [..., E] -> fp32 logits [..., V]. Call it only on the rows you need."""
    return CausalLM(cfg, is_unrolled(base_params)).apply({"params": base_params}, hidden,
                                                          method=CausalLM.logits)


def _init_boxed(cfg: ModelConfig, rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1), bool)
    model = CausalLM(cfg)

    def all_params(module):  # touch every submodule, the LM head included
        hidden, _ = module(tokens, tokens, mask)
        return module.logits(hidden)

    return model.init(rng, method=all_params)["params"]


@functools.lru_cache(maxsize=32)
def boxed_abstract_params(cfg: ModelConfig):
    """Param shapes with their logical-axis metadata (`nn.Partitioned` boxes), no allocation."""
    return jax.eval_shape(lambda: _init_boxed(cfg, jax.random.key(0)))


def abstract_params(cfg: ModelConfig):
    """Pytree of `jax.ShapeDtypeStruct` for the base params."""
    return nn.meta.unbox(boxed_abstract_params(cfg))


def logical_axes(cfg: ModelConfig):
    """Pytree (same structure as the params) of logical axis-name tuples, one per dimension."""
    specs = nn.get_partition_spec(boxed_abstract_params(cfg))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def init_params(cfg: ModelConfig, rng) -> Params:
    """Random base params (tests and dry runs; real weights come from `checkpoint`)."""
    return nn.meta.unbox(jax.jit(functools.partial(_init_boxed, cfg))(rng))


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
