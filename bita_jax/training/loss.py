"""The BiTA loss: two passes over a sample of the efficient layout (see `samples`).

    logits = mask_logits(cfg, spec, bita_params, base_params, batch)     # [B, G*M, V]
    loss, metrics = loss_fn(bita_params, base_params, batch, keys, cfg=cfg, bcfg=bcfg, spec=spec)
    loss, metrics = loss_fn(..., loss_chunk=128)  # the LM head 128 positions at a time

The real tokens run through the frozen base under `stop_gradient`, then the G*M mask tokens with
the real keys/values as a cache that each mask group sees up to its anchor. Gradients are taken
w.r.t. the BiTA pytree only, so the real-token pass needs no backward at all. The same
teacher-forced mask logits measure an adapter's acceptance statistics (`eval.tree_select`).

The loss goes through `token_stats`: with `loss_chunk` > 0 the LM head and cross-entropy run that
many positions at a time and the [B, G*M, V] logits never exist at once.

Metrics are sums (so they add across micro-batches, steps and hosts):
    nll [], count [M], correct [M] (top-1 per mask index), and with `topk` > 1 correct{k} [M].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bita_jax import models
from bita_jax.models.config import ModelConfig
from bita_jax.models.kv_cache import KVCache
from bita_jax.training.samples import SampleSpec, group_mask, mask_ids, mask_offsets
from bita_jax.training.token_stats import TokenStats, token_stats

Batch = dict[str, jax.Array]


def mask_logits(cfg: ModelConfig, spec: SampleSpec, bita_params, base_params, batch: Batch):
    """fp32 logits [B, G*M, V] of every mask slot (two passes, see module doc)."""
    return models.lm_logits(cfg, base_params,
                            mask_hidden(cfg, spec, bita_params, base_params, batch))


def mask_hidden(cfg: ModelConfig, spec: SampleSpec, bita_params, base_params, batch: Batch):
    """Final hidden states [B, G*M, E] of every mask slot (two passes, see module doc)."""
    tokens, anchors = batch["tokens"], batch["anchors"]
    b, tr = tokens.shape
    # Pass 1: the real tokens, plain causal, no BiTA. Nothing here depends on the BiTA params.
    positions = jnp.broadcast_to(jnp.arange(tr, dtype=jnp.int32), (b, tr))
    causal = jnp.tril(jnp.ones((tr, tr), bool))
    _, (k_real, v_real) = models.forward(cfg, base_params, tokens, positions, causal)
    k_real, v_real = jax.lax.stop_gradient(k_real), jax.lax.stop_gradient(v_real)
    # Pass 2: the mask groups over the real keys/values, each group up to its anchor.
    return mask_pass(cfg, spec, base_params, bita_params, (k_real, v_real), anchors)


def mask_pass(cfg: ModelConfig, spec: SampleSpec, base_params, bita_params, real_kv, anchors,
              lora=None):
    """Pass 2: hidden states [B, G*M, E] of the mask groups over the real tokens' keys/values
    `real_kv` (each [L, B, Tr, K, D]), each group seeing the real slots before its anchor
    (anchors [B, G]); `lora` adapts every row (SPACE's fine-tuned model)."""
    k_real, v_real = real_kv
    b, tr = anchors.shape[0], k_real.shape[2]
    group_anchor = jnp.repeat(anchors, spec.num_masks, axis=1)  # [B, G*M]
    mask_tokens = jnp.broadcast_to(jnp.asarray(mask_ids(spec, cfg.vocab_size)), group_anchor.shape)
    mask_pos = group_anchor + jnp.asarray(mask_offsets(spec))
    visible = jnp.arange(tr, dtype=jnp.int32)[None, None, :] < group_anchor[:, :, None]
    # [L, B, T, K, D] -> the cache's heads-major [L, B, K, T, D]
    cache = KVCache(jnp.swapaxes(k_real, 2, 3), jnp.swapaxes(v_real, 2, 3),
                    jnp.zeros((b,), jnp.int32))
    hidden, _ = models.forward(cfg, base_params, mask_tokens, mask_pos,
                              jnp.asarray(group_mask(spec)), cache=cache,
                              bita_params=bita_params, cache_visible=visible, lora=lora)
    return hidden


def mask_metrics(stats: TokenStats, labels, num_masks: int, topk: int = 1
                 ) -> dict[str, jax.Array]:
    """Summed NLL and per-mask-index counts of the mask slots' `TokenStats` ([B, G*M] each, of
    that `topk`) against labels [B, G*M]: nll [], count [M], correct [M], with `topk` > 1
    correct{topk} [M]."""
    b, gm = labels.shape

    def by_k(x):  # -> [M]
        return jnp.sum(x.reshape(b, gm // num_masks, num_masks).astype(jnp.int32), axis=(0, 1))

    out = {"nll": jnp.sum(stats.nll), "count": by_k(labels >= 0), "correct": by_k(stats.hit)}
    if topk > 1:
        out[f"correct{topk}"] = by_k(stats.in_top)
    return out


def loss_fn(bita_params, base_params, batch: Batch, rng, *, cfg: ModelConfig,
            bcfg: models.BitaConfig,
            spec: SampleSpec, train: bool = True, denom=None, loss_chunk: int = 0):
    """Mean cross-entropy over the batch's mask tokens (sum / `denom` when given).

    Args:
      bita_params: the trainable pytree (differentiate w.r.t. this argument only).
      base_params: the frozen base weights.
      batch: {"tokens" [B, Tr], "anchors" [B, G], "labels" [B, G*M]}.
      rng: [B] prefix-dropout keys, one per sample (used when `train`).
      denom: number of mask tokens the loss is averaged over (micro-batching passes the whole
        batch's count so that micro-batch gradients add up exactly).
      loss_chunk: positions per LM-head chunk (`token_stats`; 0: all at once).

    Returns:
      (loss, metrics) with the summed metrics of `mask_metrics`.
    """
    if train:
        bita_params = models.prefix_dropout(bita_params, rng, bcfg.prefix_dropout)
    hidden = mask_hidden(cfg, spec, bita_params, base_params, batch)
    stats = token_stats(cfg, base_params, hidden, batch["labels"], chunk=loss_chunk)
    metrics = mask_metrics(stats, batch["labels"], spec.num_masks)
    if denom is None:
        denom = jnp.maximum(jnp.sum(batch["labels"] >= 0), 1)
    return metrics["nll"] / denom, metrics
