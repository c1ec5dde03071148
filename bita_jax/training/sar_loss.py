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

The cross-entropy goes through `token_stats`: with `loss_chunk` > 0 the LM head runs that many
positions at a time, so the [B, T, V] logits of every real row never exist at once (SmolLM2 at
batch 8 and cutoff 2048: 6 GiB of scratch memory for the head's gradient in one piece, 456 MiB
in chunks of 128 positions).

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
from bita_jax.training.token_stats import TokenStats, token_stats

Batch = dict[str, jax.Array]


def sar_logits(cfg: ModelConfig, params, base_params, batch: Batch):
    """fp32 logits [B, T, V] of every slot (see `sar_hidden`)."""
    return models.lm_logits(cfg, params.get("base", base_params),
                            sar_hidden(cfg, params, base_params, batch))


def sar_hidden(cfg: ModelConfig, params, base_params, batch: Batch):
    """Final hidden states [B, T, E] of every slot of a cut batch, the LoRA on every row (or,
    fully fine-tuned, the trainable "base" in place of `base_params`)."""
    base_params = params.get("base", base_params)
    tokens = batch["tokens"]
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    causal = jnp.tril(jnp.ones((t, t), bool))
    hidden, _ = models.forward(cfg, base_params, tokens, positions, causal,
                               bita_params={"mask_embed": params["mask_embed"]},
                               lora=params.get("lora"))
    return hidden


def sar_group_logits(cfg: ModelConfig, spec: SarGroupSpec, params, base_params, batch: Batch):
    """fp32 (real logits [B, Tr, V], mask logits [B, G*M, V]) of a many-cuts batch (see
    `sar_group_hidden`)."""
    head = params.get("base", base_params)
    return tuple(models.lm_logits(cfg, head, h)
                 for h in sar_group_hidden(cfg, spec, params, base_params, batch))


def sar_group_hidden(cfg: ModelConfig, spec: SarGroupSpec, params, base_params, batch: Batch):
    """Final hidden states (real [B, Tr, E], masks [B, G*M, E]) of a many-cuts batch, the LoRA
    (or the fully fine-tuned "base") on every row; gradients flow through both passes."""
    base_params = params.get("base", base_params)
    lora = params.get("lora")
    tokens = batch["tokens"]
    b, tr = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(tr, dtype=jnp.int32), (b, tr))
    causal = jnp.tril(jnp.ones((tr, tr), bool))
    hidden, real_kv = models.forward(cfg, base_params, tokens, positions, causal, lora=lora)
    mask_hidden = mask_pass(cfg, spec, base_params, {"mask_embed": params["mask_embed"]},
                            real_kv, batch["anchors"], lora=lora)
    return hidden, mask_hidden


def sar_group_metrics(real: TokenStats, masks: TokenStats, batch: Batch, spec: SarGroupSpec,
                      topk: int = 1) -> dict[str, jax.Array]:
    """`sar_metrics`'s sums for a many-cuts batch from the real rows' next-token stats and the
    mask rows' stats: the mask rows by mask index, the real rows as ar_count / ar_correct."""
    out = mask_metrics(masks, batch["labels"], spec.num_masks, topk)
    out["nll"] = out["nll"] + jnp.sum(real.nll)
    out["ar_count"] = jnp.sum(batch["ar_labels"] >= 0).astype(jnp.int32)
    out["ar_correct"] = jnp.sum(real.hit).astype(jnp.int32)
    return out


def num_targets(batch: Batch):
    """Every target of a SAR batch of either layout (the loss's denominator)."""
    count = jnp.sum(batch["labels"] >= 0)
    if "ar_labels" in batch:
        count = count + jnp.sum(batch["ar_labels"] >= 0)
    return jnp.maximum(count, 1)


def sar_eval_metrics(cfg: ModelConfig, spec: SarSpec | SarGroupSpec, params, base_params,
                     batch: Batch, topk: int = 1, loss_chunk: int = 0) -> dict[str, jax.Array]:
    """The summed metrics of a SAR batch of either layout, the LM head `loss_chunk` rows at a
    time (`token_stats`; 0: all at once)."""
    head = params.get("base", base_params)
    if isinstance(spec, SarGroupSpec):
        real_h, mask_h = sar_group_hidden(cfg, spec, params, base_params, batch)
        real = token_stats(cfg, head, real_h, batch["ar_labels"], chunk=loss_chunk)
        masks = token_stats(cfg, head, mask_h, batch["labels"], chunk=loss_chunk, topk=topk)
        return sar_group_metrics(real, masks, batch, spec, topk)
    stats = token_stats(cfg, head, sar_hidden(cfg, params, base_params, batch), batch["labels"],
                        chunk=loss_chunk, topk=topk)
    return sar_metrics(stats, batch["tokens"], batch["labels"], spec, topk)


def sar_metrics(stats: TokenStats, tokens, labels, spec: SarSpec, topk: int = 1
                ) -> dict[str, jax.Array]:
    """Summed NLL, per-mask counts and the real rows' next-token counts of a cut batch's
    `TokenStats` (of that `topk`)."""
    valid = labels >= 0
    mask_k = tokens - spec.vocab_size  # [B, T]: k on mask rows, < 0 on real rows
    onehot = (mask_k[..., None] == jnp.arange(spec.num_masks)) & valid[..., None]  # [B, T, M]
    real = valid & (mask_k < 0)
    out = {"nll": jnp.sum(stats.nll),
           "count": jnp.sum(onehot, axis=(0, 1)).astype(jnp.int32),
           "correct": jnp.sum(onehot & stats.hit[..., None], axis=(0, 1)).astype(jnp.int32),
           "ar_count": jnp.sum(real).astype(jnp.int32),
           "ar_correct": jnp.sum(real & stats.hit).astype(jnp.int32)}
    if topk > 1:
        out[f"correct{topk}"] = jnp.sum(onehot & stats.in_top[..., None],
                                        axis=(0, 1)).astype(jnp.int32)
    return out


def sar_loss_fn(params, base_params, batch: Batch, rng=None, *, cfg: ModelConfig,
                spec: SarSpec | SarGroupSpec, denom=None, loss_chunk: int = 0):
    """Mean cross-entropy over the batch's targets (sum / `denom` when given: micro-batches),
    the LM head `loss_chunk` positions at a time (0: all at once).

    `rng` is unused (SPACE has no dropout here); it keeps the BiTA loss's signature."""
    del rng
    metrics = sar_eval_metrics(cfg, spec, params, base_params, batch, loss_chunk=loss_chunk)
    if denom is None:
        denom = num_targets(batch)
    return metrics["nll"] / denom, metrics
