"""LLaMA-family decoder block (LLaMA-2, Vicuna, LLaMA-3-style GQA, SmolLM2).

Pre-norm residual block: x + attn(rms(x)), then h + mlp(rms(h)) with a SwiGLU MLP.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from bita_jax.models.config import ModelConfig
from bita_jax.models.layers import Attention, AttnContext, RMSNorm, adapted, dense


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); [B, T, E] -> [B, T, E]."""

    cfg: ModelConfig
    transposed: bool = False  # kernels stored [F, K] (`DenseT`)

    @nn.compact
    def __call__(self, x, ctx: AttnContext, lora=None, mask_lora=None):
        cfg, dt, tr = self.cfg, self.cfg.jnp_compute_dtype, self.transposed
        pdt = cfg.jnp_dtype
        f, bias = cfg.intermediate_size, cfg.mlp_bias
        adapt = functools.partial(adapted, ctx=ctx, lora=lora, mask_lora=mask_lora)
        gate = adapt(dense(f, ("embed", "mlp"), ("mlp",), bias, dt, "gate_proj", transposed=tr,
                           param_dtype=pdt), x)
        up = adapt(dense(f, ("embed", "mlp"), ("mlp",), bias, dt, "up_proj", transposed=tr,
                         param_dtype=pdt), x)
        return adapt(dense(cfg.hidden_size, ("mlp", "embed"), ("embed",), bias, dt, "down_proj",
                           transposed=tr, param_dtype=pdt), jax.nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """One LLaMA layer, written for `nn.scan`: (x, layer_inputs) -> (x, (k, v))."""

    cfg: ModelConfig
    transposed: bool = False  # kernels stored [F, K] (`DenseT`)

    @nn.compact
    def __call__(self, x, layer: dict, ctx: AttnContext):
        """x [B, T, E]; layer holds this layer's 'cache' (k, v), 'prefix' [P, 2, N, D] or
        [B, P, 2, N, D], 'lora' and 'mask_lora' ({target: {"a", "b"}}), each if any."""
        cfg, dt, pdt = self.cfg, self.cfg.jnp_compute_dtype, self.cfg.jnp_dtype
        lora, mask_lora = layer.get("lora"), layer.get("mask_lora")
        attn_out, kv = Attention(cfg, self.transposed, name="attn")(
            RMSNorm(cfg.norm_eps, dt, pdt, name="attn_norm")(x), ctx, layer.get("cache"),
            layer.get("prefix"), lora, mask_lora)
        h = x + attn_out
        mlp_in = RMSNorm(cfg.norm_eps, dt, pdt, name="mlp_norm")(h)
        h = h + LlamaMLP(cfg, self.transposed, name="mlp")(mlp_in, ctx, lora, mask_lora)
        return h, kv
