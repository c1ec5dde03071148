"""What a training run needs, from shapes alone: parameter counts and per-device memory.

`train/train.py --dry-run` prints `estimate(config)` (with the plan of decoding on the same
devices, `decoding.memory_plan`); no weights are read
(`models.abstract_params`), so a 70B plan runs on a laptop. The activation figure is a rough
upper estimate of one micro-batch per device: for BiTA the real-token KV of pass 1, the peak of
one pass-1 layer, what pass 2 keeps for the backward pass of the mask rows, and the mask logits;
for SPACE what its one pass keeps for the backward pass over every slot, and the logits.
"""

from __future__ import annotations

import jax
import numpy as np

from bita_jax import models, sharding
from bita_jax.checkpoints import loading
from bita_jax.decoding.memory_plan import base_shard_bytes, decode_plan, default_mesh
from bita_jax.decoding.tree import Tree
from bita_jax.training import run_config, samples


def estimate(tc, devices: int | None = None) -> dict:
    """Parameter counts and a per-device memory estimate of a training run, from shapes only.

    `tc` is a `run_config.TrainConfig`; `devices` defaults to the local device count (or the
    mesh's model size when that is larger). Returns a JSON-ready dict."""
    cfg = loading.model_config(tc.model.name, tc.model.dtype, tc.model.hf_config)
    bcfg, run = tc.bita, tc.run
    if devices is None:
        devices = max(jax.device_count(), run.mesh[1])
    try:
        data, msize = run.mesh_shape(devices)
    except ValueError as e:
        raise run_config.ConfigFileError(f"run.mesh: {e}") from None
    rules = sharding.FSDP_RULES if run.fsdp else sharding.DEFAULT_RULES
    abstract = models.abstract_params(cfg)
    base_bytes = base_shard_bytes(cfg, data, msize, rules)
    n_base = models.count_params(abstract)
    n_bita = models.count_trainable(cfg, bcfg)
    # Activations, rough: one micro-batch per device; fp32 scores; K and vocab split by 'model'.
    b = max(run.batch_size // (data * run.grad_accum), 1)
    itemsize = np.dtype(cfg.jnp_compute_dtype).itemsize  # activations
    heads = cfg.num_heads // msize if cfg.num_heads % msize == 0 else cfg.num_heads
    kv = cfg.num_kv_heads // msize if cfg.num_kv_heads % msize == 0 else cfg.num_kv_heads
    ffn = (cfg.intermediate_size // msize if cfg.intermediate_size % msize == 0
           else cfg.intermediate_size)
    vocab = cfg.vocab_size // msize if cfg.vocab_size % msize == 0 else cfg.vocab_size

    def logit_bytes(rows: int) -> int:
        """fp32 logits, their softmax and its gradient over `rows` rows of the micro-batch, or
        one `run.loss_chunk` slice of positions of every sample (`training.token_stats`)."""
        if run.loss_chunk:
            rows = min(rows, b * run.loss_chunk)
        return 3 * rows * vocab * 4

    def saved_per_token(keys: int) -> int:
        """Bytes one token keeps per layer for the backward pass: fp32 attention probabilities
        over `keys` keys, and the residual / normed / attention / MLP activations."""
        return heads * keys * 4 + (4 * cfg.hidden_size + 3 * ffn
                                   + (heads + 2 * kv) * cfg.head_dim) * itemsize

    if bcfg.method == "space":  # one causal pass over every slot, the backward through it all
        groups = run.sar_layout == "groups"
        t = run.real_len if groups and run.real_len is not None else run.cutoff
        saved = cfg.num_layers * b * t * saved_per_token(t)
        gm = run.max_groups * bcfg.num_masks if groups else 0
        if gm:  # the mask groups' second pass over the real keys/values
            saved += cfg.num_layers * b * gm * saved_per_token(t + gm)
        logits = logit_bytes(b * t) + logit_bytes(b * gm)
        breakdown = {"saved_for_backward": int(saved), "logits": int(logits)}
        sample = {"tokens": t, "mask_tokens": gm} if gm else {"tokens": t}
        tree = "chain"
    else:
        spec = samples.SampleSpec(bcfg.num_masks, run.max_groups, run.cutoff, run.real_len,
                                  run.anchors)
        tr, gm = spec.tr, spec.num_mask_tokens
        real_kv = 2 * cfg.num_layers * b * tr * kv * cfg.head_dim * itemsize
        pass1_layer = (b * heads * tr * tr * 4 * 2
                       + b * tr * (4 * cfg.hidden_size + 3 * ffn) * itemsize)
        pass2_saved = cfg.num_layers * b * gm * saved_per_token(tr + gm + bcfg.num_prefix)
        logits = logit_bytes(b * gm)
        breakdown = {"real_kv": int(real_kv), "pass1_layer_peak": int(pass1_layer),
                     "pass2_saved": int(pass2_saved), "mask_logits": int(logits)}
        sample = {"real_tokens": tr, "mask_tokens": gm}
        tree = "upper-triangle"
    act = sum(breakdown.values())
    state = 4 * n_bita * 4  # fp32 params, grads, Adam mu and nu (replicated)
    if bcfg.trains_base:  # full fine-tuning: the base, its grads and moments, sharded like it
        state = 4 * base_bytes + 4 * 4 * bcfg.num_masks * cfg.hidden_size
        base_bytes = 0  # no frozen copy
    gib = 1024 ** 3
    return {
        "model": tc.model.name or "hf_config",
        "arch": cfg.arch,
        "base_params": n_base,
        "trainable_params": n_bita,
        "trainable_percent": round(100.0 * n_bita / n_base, 4),
        "bita": bcfg.to_dict(),
        "param_shapes": {k: list(v) for k, v in models.param_shapes(cfg, bcfg).items()},
        "mesh": {"data": data, "model": msize, "fsdp": run.fsdp, "devices": data * msize},
        "per_device_batch": b,
        "sample": sample,
        "memory_per_device_bytes": {
            "base_params": int(base_bytes),
            "bita_params_grads_adam": int(state),
            "activations_estimate": int(act),
            "activations_breakdown": breakdown,
            "total_estimate": int(base_bytes + state + act),
        },
        "memory_per_device_gib": round((base_bytes + state + act) / gib, 3),
        # Decoding with the trained adapter on the same devices (weights over up to 8 of them,
        # the rest data parallel), the paper's upper-triangle tree (SPACE: its chain), the
        # model's context.
        "decoding": decode_plan(cfg, **dict(zip(("data", "model"), default_mesh(devices, cfg))),
                                context=cfg.max_position_embeddings,
                                step_tokens=len(Tree.make(tree, bcfg.num_masks).layout.offsets)),
    }
