"""Falcon decoder block (Falcon-7B multi-query, Falcon-40B/180B new decoder architecture).

Falcon-7B: one LayerNorm feeds attention and MLP in parallel, out = x + attn + mlp.
Falcon-40B/180B (`new_decoder_architecture`): grouped KV; `ln_attn` and `ln_mlp` (or one
`input_layernorm` when `num_ln_in_parallel_attn == 1`), always parallel.
Sequential Falcon (parallel_attn false): x + attn(ln(x)), then h + mlp(post_ln(h)).
Rotary positions only; ALiBi configs are rejected in `ModelConfig.from_hf_config`.
The fused query_key_value weight is split into q/k/v in the checkpoint converter.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from bita_jax.models.config import ModelConfig
from bita_jax.models.layers import Attention, AttnContext, LayerNorm, adapted, dense


class FalconMLP(nn.Module):
    """GELU MLP: dense_4h_to_h(gelu(dense_h_to_4h(x))); [B, T, E] -> [B, T, E]."""

    cfg: ModelConfig
    transposed: bool = False  # kernels stored [F, K] (`DenseT`)

    @nn.compact
    def __call__(self, x, ctx: AttnContext, lora=None, mask_lora=None):
        cfg, dt, tr = self.cfg, self.cfg.jnp_compute_dtype, self.transposed
        pdt = cfg.jnp_dtype
        f, bias = cfg.intermediate_size, cfg.mlp_bias
        adapt = functools.partial(adapted, ctx=ctx, lora=lora, mask_lora=mask_lora)
        h = adapt(dense(f, ("embed", "mlp"), ("mlp",), bias, dt, "up_proj", transposed=tr,
                        param_dtype=pdt), x)
        return adapt(dense(cfg.hidden_size, ("mlp", "embed"), ("embed",), bias, dt, "down_proj",
                           transposed=tr, param_dtype=pdt), jax.nn.gelu(h, approximate=False))


class FalconBlock(nn.Module):
    """One Falcon layer, written for `nn.scan`: (x, layer_inputs) -> (x, (k, v))."""

    cfg: ModelConfig
    transposed: bool = False  # kernels stored [F, K] (`DenseT`)

    @nn.compact
    def __call__(self, x, layer: dict, ctx: AttnContext):
        cfg, dt, pdt = self.cfg, self.cfg.jnp_compute_dtype, self.cfg.jnp_dtype
        two_norms = cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2
        if two_norms:
            attn_in = LayerNorm(cfg.norm_eps, dt, pdt, name="ln_attn")(x)
            mlp_in = LayerNorm(cfg.norm_eps, dt, pdt, name="ln_mlp")(x)
        else:
            attn_in = mlp_in = LayerNorm(cfg.norm_eps, dt, pdt, name="input_layernorm")(x)
        lora, mask_lora = layer.get("lora"), layer.get("mask_lora")
        attn_out, kv = Attention(cfg, self.transposed, name="attn")(
            attn_in, ctx, layer.get("cache"), layer.get("prefix"), lora, mask_lora)
        mlp = functools.partial(FalconMLP(cfg, self.transposed, name="mlp"), ctx=ctx, lora=lora,
                                mask_lora=mask_lora)
        if cfg.new_decoder_architecture or cfg.parallel_attn:
            return (mlp(mlp_in) + attn_out) + x, kv  # HF's summation order
        h = x + attn_out
        return h + mlp(LayerNorm(cfg.norm_eps, dt, pdt, name="post_attention_layernorm")(h)), kv
