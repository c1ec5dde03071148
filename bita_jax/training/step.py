"""The optimizer and the jitted train / eval steps with explicit shardings.

    tx = make_optimizer(learning_rate=3e-2, total_steps=n)
    opt_state = tx.init(bita_params)                     # optimizer state: BiTA params only
    step = make_train_step(cfg, bcfg, spec, tx, mesh)
    bita_params, opt_state, metrics = step(bita_params, opt_state, base_params, batch, rng)

Gradients of `loss.loss_fn` are taken w.r.t. the BiTA pytree only
(`jax.value_and_grad(loss, argnums=0)`); micro-batches (`grad_accum`) add up exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bita_jax import models, sharding
from bita_jax.models.bita_params import BitaConfig
from bita_jax.models.config import ModelConfig
from bita_jax.training.loss import Batch, loss_fn, mask_hidden, mask_metrics
from bita_jax.training.samples import SampleSpec
from bita_jax.training.sar_loss import num_targets, sar_eval_metrics, sar_loss_fn
from bita_jax.training.sar_samples import SarGroupSpec, SarSpec
from bita_jax.training.token_stats import token_stats

AnySpec = SampleSpec | SarSpec | SarGroupSpec  # what a sample is: BiTA's, SPACE's two layouts

# XLA CPU options that cut compile time 2-3x for small models (tests, CPU smoke runs); numerics
# stay IEEE fp32 (no fast-math), only the LLVM optimisation level and fusion codegen change.
FAST_CPU_COMPILE = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}


def make_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                  schedule: str = "cosine", final_lr_ratio: float = 0.0) -> optax.Schedule:
    """Cosine decay to `final_lr_ratio * lr` over `total_steps` (official: no warmup), or
    constant."""
    if schedule == "constant":
        if warmup_steps:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, learning_rate, warmup_steps),
                 optax.constant_schedule(learning_rate)], [warmup_steps])
        return optax.constant_schedule(learning_rate)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}: expected 'cosine' or 'constant'")
    total_steps = max(int(total_steps), 1)
    if warmup_steps:
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
            end_value=final_lr_ratio * learning_rate)
    return optax.cosine_decay_schedule(learning_rate, total_steps, alpha=final_lr_ratio)


def make_optimizer(learning_rate: float = 3e-2, total_steps: int = 1, *, warmup_steps: int = 0,
                   schedule: str = "cosine", final_lr_ratio: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0,
                   lora_learning_rate: float | None = None) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on a schedule (the official BiTA recipe by default).

    With `lora_learning_rate`, the model weights among the trainable params (the top-level
    "lora" or "base" subtree) take that peak rate on the same schedule and every other param
    (prefix, mask embeddings) `learning_rate`: AdamW's update of a weight is scaled by the
    ratio of the two, which is AdamW at that rate (its weight decay included)."""
    lr = make_schedule(learning_rate, total_steps, warmup_steps, schedule, final_lr_ratio)
    parts = [optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)]
    if lora_learning_rate is not None:
        parts.append(scale_weights(lora_learning_rate / learning_rate))
    if clip_norm is not None and clip_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(clip_norm))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


WEIGHT_KEYS = ("lora", "base")  # trainable subtrees that are model weights


def scale_weights(ratio: float) -> optax.GradientTransformation:
    """Multiplies the updates under a top-level "lora" or "base" key by `ratio` (stateless)."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * ratio if getattr(path[0], "key", None) in WEIGHT_KEYS else u,
            updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _split_micro(tree, accum: int):
    """[B, ...] leaves -> [accum, B/accum, ...]; micro-batch a takes rows a, a+accum, ... so that
    every data shard keeps an equal share of each micro-batch."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, tree)


def method_loss(cfg: ModelConfig, bcfg: BitaConfig, spec: AnySpec,
                train: bool = True, loss_chunk: int = 0):
    """`loss(params, base_params, batch, rng, denom=None) -> (loss, summed metrics)` of the
    method: BiTA's two-pass mask loss (`loss.loss_fn`) or SPACE's SAR loss
    (`sar_loss.sar_loss_fn`), the LM head `loss_chunk` positions at a time (0: all at once)."""
    if bcfg.method == "space":
        return functools.partial(sar_loss_fn, cfg=cfg, spec=spec, loss_chunk=loss_chunk)
    return functools.partial(loss_fn, cfg=cfg, bcfg=bcfg, spec=spec, train=train,
                             loss_chunk=loss_chunk)


def train_step(bita_params, opt_state, base_params, batch: Batch, rng, *, cfg: ModelConfig,
               bcfg: BitaConfig, spec: AnySpec, tx: optax.GradientTransformation,
               grad_accum: int = 1, loss_chunk: int = 0):
    """One optimizer step on a [B, ...] batch (see `make_train_step`; this is the unjitted body).

    `bita_params` is the trainable pytree of the method (BiTA: prefix, masks and an optional
    mask-only LoRA; SPACE: masks and the LoRA); gradients are taken w.r.t. it alone."""
    denom = (num_targets(batch) if bcfg.method == "space"
             else jnp.maximum(jnp.sum(batch["labels"] >= 0), 1))
    # one dropout key per sample, split with the batch: a sample's mask is the same whatever the
    # micro-batching or the mesh
    sample_keys = jax.random.split(rng, batch["tokens"].shape[0])
    grad_fn = jax.value_and_grad(
        functools.partial(method_loss(cfg, bcfg, spec, train=True, loss_chunk=loss_chunk),
                          denom=denom),
        argnums=0, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(bita_params, base_params, batch, sample_keys)
    else:
        def body(carry, micro):
            grads, loss, metrics = carry
            mb, keys = micro
            (micro_loss, mt), g = grad_fn(bita_params, base_params, mb, keys)
            carry = (jax.tree.map(jnp.add, grads, g), loss + micro_loss,
                     jax.tree.map(jnp.add, metrics, mt))
            return carry, None

        micro = _split_micro((batch, sample_keys), grad_accum)
        first = jax.tree.map(lambda x: x[0], micro)
        _, metric_shapes = jax.eval_shape(lambda: grad_fn(bita_params, base_params, *first)[0])
        zeros = (jax.tree.map(jnp.zeros_like, bita_params), jnp.zeros((), jnp.float32),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
        (grads, loss, metrics), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = tx.update(grads, opt_state, bita_params)
    bita_params = optax.apply_updates(bita_params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return bita_params, opt_state, metrics


def eval_step(bita_params, base_params, batch: Batch, *, cfg: ModelConfig,
              spec: AnySpec, topk: int = 5, bcfg: BitaConfig | None = None,
              loss_chunk: int = 0):
    """Summed eval metrics (no dropout): nll, count, correct (top-1), correct{topk}."""
    if bcfg is not None and bcfg.method == "space":
        return sar_eval_metrics(cfg, spec, bita_params, base_params, batch, topk, loss_chunk)
    hidden = mask_hidden(cfg, spec, bita_params, base_params, batch)
    stats = token_stats(cfg, base_params, hidden, batch["labels"], chunk=loss_chunk, topk=topk)
    return mask_metrics(stats, batch["labels"], spec.num_masks, topk)


# ---------------------------------------------------------------------------------------------
# Jitted, sharded steps.


def trainable_shardings(cfg: ModelConfig, bcfg: BitaConfig, tx: optax.GradientTransformation,
                        mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES):
    """(trainable params, optimizer state) shardings: replicated (BiTA, SPACE's LoRA), or, for
    full fine-tuning, the base weights and their Adam moments by the logical-axis `rules` (use
    `sharding.FSDP_RULES` to split them over 'data' too) and the mask embeddings replicated."""
    rep = sharding.replicated(mesh)
    if not bcfg.trains_base:
        return rep, rep
    params = {"mask_embed": rep, "base": sharding.param_shardings(cfg, mesh, rules)}
    shapes = {"mask_embed": jax.ShapeDtypeStruct((bcfg.num_masks, cfg.hidden_size), jnp.float32),
              "base": models.abstract_params(cfg)}
    opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, shapes), params,
                                transform_non_params=lambda _: rep)
    return params, opt


def make_train_step(cfg: ModelConfig, bcfg: BitaConfig, spec: AnySpec,
                    tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules = sharding.DEFAULT_RULES, grad_accum: int = 1,
                    compiler_options: dict[str, Any] | None = None, loss_chunk: int = 0):
    """`step(bita_params, opt_state, base_params, batch, rng) -> (bita_params, opt_state, metrics)`.

    Base params are sharded by the logical-axis `rules`, the batch over 'data', the BiTA params,
    optimizer state, rng and metrics replicated. The BiTA params and optimizer state are donated.
    Full fine-tuning (`bcfg.trains_base`) shards the trainable base and its optimizer state like
    the base (`trainable_shardings`) and takes `{}` for `base_params`.
    The batch size must divide by `grad_accum * mesh.shape['data']`. `compiler_options` go to
    XLA for this function only (e.g. `FAST_CPU_COMPILE`). `loss_chunk` > 0 runs the LM head and
    the cross-entropy that many positions at a time (`token_stats`).
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    rep = sharding.replicated(mesh)
    body = functools.partial(train_step, cfg=cfg, bcfg=bcfg, spec=spec, tx=tx,
                             grad_accum=grad_accum, loss_chunk=loss_chunk)
    params, opt = trainable_shardings(cfg, bcfg, tx, mesh, rules)
    base = {} if bcfg.trains_base else sharding.param_shardings(cfg, mesh, rules)
    return jax.jit(
        body,
        in_shardings=(params, opt, base, sharding.batch_sharding(mesh, 2, rules), rep),
        out_shardings=(params, opt, rep),
        donate_argnums=(0, 1),
        compiler_options=compiler_options)


def make_eval_step(cfg: ModelConfig, spec: AnySpec, mesh: Mesh,
                   rules: sharding.Rules = sharding.DEFAULT_RULES, topk: int = 5,
                   compiler_options: dict[str, Any] | None = None,
                   bcfg: BitaConfig | None = None, loss_chunk: int = 0):
    """`evaluate(bita_params, base_params, batch) -> summed metrics` (no dropout), the LM head
    `loss_chunk` positions at a time (0: all at once)."""
    rep = sharding.replicated(mesh)
    trains_base = bcfg is not None and bcfg.trains_base
    params = (rep if not trains_base else
              {"mask_embed": rep, "base": sharding.param_shardings(cfg, mesh, rules)})
    return jax.jit(
        functools.partial(eval_step, cfg=cfg, spec=spec, topk=topk, bcfg=bcfg,
                          loss_chunk=loss_chunk),
        in_shardings=(params, {} if trains_base else sharding.param_shardings(cfg, mesh, rules),
                      sharding.batch_sharding(mesh, 2, rules)),
        out_shardings=rep,
        compiler_options=compiler_options)


def init_state(cfg: ModelConfig, bcfg: BitaConfig, tx: optax.GradientTransformation, rng,
               mesh: Mesh | None = None, base_params=None,
               rules: sharding.Rules = sharding.DEFAULT_RULES) -> tuple[Any, Any]:
    """Fresh trainable params and their optimizer state, placed on `mesh` when given
    (`trainable_shardings`). Full fine-tuning starts from `base_params`."""
    params = models.init_bita_params(cfg, bcfg, rng, base_params)
    if mesh is None:
        return params, tx.init(params)
    params_sh, opt_sh = trainable_shardings(cfg, bcfg, tx, mesh, rules)
    params = jax.device_put(params, params_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return params, opt_state


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """Summed metrics (host numpy) -> loss and per-mask accuracies as plain floats/lists."""
    import numpy as np

    count = [float(n) for n in np.asarray(metrics["count"])]

    def rate(key):
        return [float(c) / max(n, 1.0) for c, n in zip(np.asarray(metrics[key]), count)]

    out = {"mask_tokens": int(sum(count)), "acc": rate("correct")}
    ar_count = float(metrics.get("ar_count", 0))  # SPACE: the real rows' next tokens
    out["loss"] = (float(metrics["loss"]) if "loss" in metrics
                   else float(metrics["nll"]) / max(sum(count) + ar_count, 1.0))
    if "ar_count" in metrics:
        out["ar_acc"] = float(metrics["ar_correct"]) / max(ar_count, 1.0)
    for key in metrics:
        if key.startswith("correct") and key != "correct":
            out["acc" + key[len("correct"):]] = rate(key)
    if "grad_norm" in metrics:
        out["grad_norm"] = float(metrics["grad_norm"])
    return out
