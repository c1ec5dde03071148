"""The SPACE loss: one causal pass of a SAR sample (`sar_samples`) through the fine-tuned model.

    loss, metrics = sar_loss_fn(params, base_params, batch, None, cfg=cfg, spec=spec)

`params` is the trainable pytree {"mask_embed": [M, E], "lora": {...}}: the LoRA adapts every row
(the fine-tuned model), the mask embeddings feed the masks. Full fine-tuning trains
{"mask_embed", "base"}: the whole model, which then replaces the frozen `base_params`. The loss
is the mean cross-entropy over every target of the batch, real next tokens and masks alike (the
official recipe: plain SFT's loss with the masks' targets added).

A sample of the many-cuts layout (`sar_samples.SarGroupSpec`) runs in two passes, as BiTA's
(`loss.mask_logits`), but with gradients through both: the real tokens causally through the
fine-tuned model (their next-token logits, and their keys/values), then the G * M mask tokens
over those keys/values, each group up to its anchor. The loss is the same mean over every target.

Metrics are sums, as the BiTA loss's (`loss.mask_metrics`), so steps, micro-batches and hosts
add up: nll [], count [M] and correct [M] per mask index, ar_count [] and ar_correct [] for the
real tokens' next-token predictions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bita_jax import models
from bita_jax.models.config import ModelConfig
from bita_jax.training.loss import mask_metrics, mask_pass
from bita_jax.training.sar_samples import SarGroupSpec, SarSpec

Batch = dict[str, jax.Array]


def sar_logits(cfg: ModelConfig, params, base_params, batch: Batch):
    """fp32 logits [B, T, V] of every slot, the LoRA on every row (or, fully fine-tuned, the
    trainable "base" in place of `base_params`)."""
    base_params = params.get("base", base_params)
    tokens = batch["tokens"]
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    causal = jnp.tril(jnp.ones((t, t), bool))
    hidden, _ = models.forward(cfg, base_params, tokens, positions, causal,
                               bita_params={"mask_embed": params["mask_embed"]},
                               lora=params.get("lora"))
    return models.lm_logits(cfg, base_params, hidden)


def sar_group_logits(cfg: ModelConfig, spec: SarGroupSpec, params, base_params, batch: Batch):
    """fp32 (real logits [B, Tr, V], mask logits [B, G*M, V]) of a many-cuts batch, the LoRA (or
    the fully fine-tuned "base") on every row; gradients flow through both passes."""
    base_params = params.get("base", base_params)
    lora = params.get("lora")
    tokens = batch["tokens"]
    b, tr = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(tr, dtype=jnp.int32), (b, tr))
    causal = jnp.tril(jnp.ones((tr, tr), bool))
    hidden, real_kv = models.forward(cfg, base_params, tokens, positions, causal, lora=lora)
    mask_hidden = mask_pass(cfg, spec, base_params, {"mask_embed": params["mask_embed"]},
                            real_kv, batch["anchors"], lora=lora)
    return models.lm_logits(cfg, base_params, hidden), models.lm_logits(cfg, base_params,
                                                                        mask_hidden)


def sar_group_metrics(real_logits, mask_logits, batch: Batch, spec: SarGroupSpec,
                      topk: int = 1) -> dict[str, jax.Array]:
    """`sar_metrics`'s sums for a many-cuts batch: the mask rows by mask index, the real rows'
    next tokens as ar_count / ar_correct."""
    out = mask_metrics(mask_logits, batch["labels"], spec.num_masks, topk)
    ar = batch["ar_labels"]
    valid = ar >= 0
    safe = jnp.where(valid, ar, 0)
    logz = jax.nn.logsumexp(real_logits, axis=-1)
    gold = jnp.take_along_axis(real_logits, safe[..., None], axis=-1)[..., 0]
    out["nll"] = out["nll"] + jnp.sum(jnp.where(valid, logz - gold, 0.0))
    out["ar_count"] = jnp.sum(valid).astype(jnp.int32)
    out["ar_correct"] = jnp.sum(valid & (jnp.argmax(real_logits, -1) == ar)).astype(jnp.int32)
    return out


def num_targets(batch: Batch):
    """Every target of a SAR batch of either layout (the loss's denominator)."""
    count = jnp.sum(batch["labels"] >= 0)
    if "ar_labels" in batch:
        count = count + jnp.sum(batch["ar_labels"] >= 0)
    return jnp.maximum(count, 1)


def sar_eval_metrics(cfg: ModelConfig, spec: SarSpec | SarGroupSpec, params, base_params,
                     batch: Batch, topk: int = 1) -> dict[str, jax.Array]:
    """The summed metrics of a SAR batch of either layout."""
    if isinstance(spec, SarGroupSpec):
        real_logits, mask_logits = sar_group_logits(cfg, spec, params, base_params, batch)
        return sar_group_metrics(real_logits, mask_logits, batch, spec, topk)
    logits = sar_logits(cfg, params, base_params, batch)
    return sar_metrics(logits, batch["tokens"], batch["labels"], spec, topk)


def sar_metrics(logits, tokens, labels, spec: SarSpec, topk: int = 1) -> dict[str, jax.Array]:
    """Summed NLL, per-mask counts and the real rows' next-token counts."""
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    hit = jnp.argmax(logits, -1) == labels
    mask_k = tokens - spec.vocab_size  # [B, T]: k on mask rows, < 0 on real rows
    onehot = (mask_k[..., None] == jnp.arange(spec.num_masks)) & valid[..., None]  # [B, T, M]
    real = valid & (mask_k < 0)
    out = {"nll": jnp.sum(jnp.where(valid, logz - gold, 0.0)),
           "count": jnp.sum(onehot, axis=(0, 1)).astype(jnp.int32),
           "correct": jnp.sum(onehot & hit[..., None], axis=(0, 1)).astype(jnp.int32),
           "ar_count": jnp.sum(real).astype(jnp.int32),
           "ar_correct": jnp.sum(real & hit).astype(jnp.int32)}
    if topk > 1:
        _, top = jax.lax.top_k(logits, topk)
        in_top = jnp.any(top == labels[..., None], axis=-1)
        out[f"correct{topk}"] = jnp.sum(onehot & in_top[..., None], axis=(0, 1)).astype(jnp.int32)
    return out


def sar_loss_fn(params, base_params, batch: Batch, rng=None, *, cfg: ModelConfig,
                spec: SarSpec | SarGroupSpec, denom=None):
    """Mean cross-entropy over the batch's targets (sum / `denom` when given: micro-batches).

    `rng` is unused (SPACE has no dropout here); it keeps the BiTA loss's signature."""
    del rng
    metrics = sar_eval_metrics(cfg, spec, params, base_params, batch)
    if denom is None:
        denom = num_targets(batch)
    return metrics["nll"] / denom, metrics
