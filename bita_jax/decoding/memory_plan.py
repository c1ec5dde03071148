"""What decoding needs per device, from shapes alone: the base shard, the KV cache, the peaks.

    plan = memory_plan.decode_plan(cfg, data=1, model=8, batch=8, context=4096, step_tokens=52)
    plan["per_device_gib"]["total"], plan["fits"]    # {"16": False, "80": True, "141": True}

`infer/generate.py --dry-run` and `train/train.py --dry-run` print these; no weights are read
(`models.abstract_params`), so a 70B plan runs on a laptop. The base shard follows the
logical-axis rules exactly (`sharding.param_specs`; a dimension the axis does not divide stays
whole). The KV cache holds `context` tokens plus headroom per row, split by rows over 'data'
and kv heads over 'model' (`placement.StateShardings`). The activation peak is the larger of a
decode step (T tokens: fp32 logits over the vocab shard, one layer's fp32 attention scores over
the cache, the MLP's hidden rows) and a prefill chunk (`engine.PREFILL_CHUNK` tokens against
one cache block at a time); XLA's own scratch comes on top, so keep a margin (`RESERVE`).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from bita_jax import models, sharding
from bita_jax.decoding import engine
from bita_jax.models import layers
from bita_jax.models.config import ModelConfig

DEVICE_GIB = (16, 80, 141)  # a v5e / T4-class chip, an A100/H100 80GB, an H200
RESERVE = 0.10  # of a device's memory kept free for XLA's scratch and fragmentation
GIB = 1024 ** 3


def _split(size: int, parts: int) -> int:
    """A dimension's per-device size: divided when `parts` divides it, else whole (replicated)."""
    return size // parts if size % parts == 0 else size


def base_shard_bytes(cfg: ModelConfig, data: int, model: int,
                     rules=sharding.DEFAULT_RULES) -> int:
    """Bytes of the base params on one device of a (data, model) mesh."""
    axes = {"data": data, "model": model}
    specs = sharding.param_specs(cfg, axes, rules)

    def shard(leaf, spec):
        shape = list(leaf.shape)
        for dim, names in enumerate(spec):
            for name in (names,) if isinstance(names, str) else (names or ()):
                shape[dim] //= axes[name]
        return math.prod(shape) * np.dtype(leaf.dtype).itemsize

    return int(sum(jax.tree.leaves(jax.tree.map(
        shard, models.abstract_params(cfg), specs,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))))


def decode_plan(cfg: ModelConfig, *, data: int = 1, model: int = 1, batch: int = 1,
                context: int = 4096, step_tokens: int = 1) -> dict:
    """Per-device memory of decoding `batch` rows of up to `context` tokens (prompt + output)
    with steps of `step_tokens` tokens (1: plain decoding; a BiTA tree's T) on a (data, model)
    mesh. Returns a JSON-ready dict; `fits` maps each of `DEVICE_GIB` to whether the total
    stays within the device's memory less `RESERVE`."""
    if min(data, model, batch, context, step_tokens) < 1:
        raise ValueError("data, model, batch, context and step tokens must all be >= 1")
    itemsize = np.dtype(cfg.jnp_compute_dtype).itemsize  # the cache and activations
    rows = -(-batch // data)  # the batch is padded to the data axis
    slots = engine.cache_slots(context + engine.HEADROOM)
    kv_heads, heads = _split(cfg.num_kv_heads, model), _split(cfg.num_heads, model)
    vocab, ffn = _split(cfg.vocab_size, model), _split(cfg.intermediate_size, model)
    base = base_shard_bytes(cfg, data, model)
    cache = 2 * cfg.num_layers * rows * kv_heads * slots * cfg.head_dim * itemsize

    def layer_peak(tokens: int, keys: int) -> int:  # fp32 scores + hidden rows of one layer
        return rows * tokens * (heads * keys * 4 + (4 * cfg.hidden_size + 3 * ffn) * itemsize)

    step = layer_peak(step_tokens, slots) + rows * step_tokens * vocab * 4
    chunk = min(engine.PREFILL_CHUNK, context)
    prefill = layer_peak(chunk, min(slots, layers.CACHE_BLOCK) + chunk) + rows * vocab * 4
    total = base + cache + max(step, prefill)
    return {
        "mesh": {"data": data, "model": model, "devices": data * model},
        "batch": batch, "rows_per_device": rows, "context": context, "cache_slots": slots,
        "step_tokens": step_tokens, "dtype": cfg.precision_name,
        "per_device_bytes": {"base_params": base, "kv_cache": cache, "decode_step_peak": step,
                             "prefill_chunk_peak": prefill, "total": total},
        "per_device_gib": {"base_params": round(base / GIB, 3), "kv_cache": round(cache / GIB, 3),
                           "activations": round(max(step, prefill) / GIB, 3),
                           "total": round(total / GIB, 3)},
        "fits": {str(gib): total <= (1 - RESERVE) * gib * GIB for gib in DEVICE_GIB},
    }


def default_mesh(devices: int, cfg: ModelConfig) -> tuple[int, int]:
    """(data, model) for decoding on `devices`: weights split over up to 8 devices (tensor
    parallel within a host; the largest divisor of `devices` that is at most 8 and divides the
    query heads), the rest data parallel."""
    model = max(m for m in range(1, min(devices, 8) + 1)
                if devices % m == 0 and cfg.num_heads % m == 0)
    return devices // model, model


def plan_table(cfg: ModelConfig, devices=(1, 8, 64), **kwargs) -> list[dict]:
    """`decode_plan` on each device count with its `default_mesh` (batch: one row per data
    shard unless `batch` is given)."""
    out = []
    for n in devices:
        data, model = default_mesh(n, cfg)
        out.append(decode_plan(cfg, data=data, model=model,
                               **{"batch": data, **kwargs}))
    return out


HEADER = ("| model | devices (data x model) | batch | context | base GiB | KV cache GiB | "
          "activations GiB | total GiB | fits (GiB: yes/no) |\n"
          "|---|---|---|---|---|---|---|---|---|")


def markdown(name: str, plans: list[dict]) -> str:
    """One table row per plan: mesh, per-device GiB (base, cache, activations, total), fits."""
    lines = []
    for p in plans:
        g, m = p["per_device_gib"], p["mesh"]
        fits = " ".join(f"{gib}:{'yes' if ok else 'no'}" for gib, ok in p["fits"].items())
        lines.append(f"| {name} | {m['devices']} ({m['data']}x{m['model']}) | {p['batch']} | "
                     f"{p['context']} | {g['base_params']:.2f} | {g['kv_cache']:.2f} | "
                     f"{g['activations']:.2f} | {g['total']:.2f} | {fits} |")
    return "\n".join(lines)
