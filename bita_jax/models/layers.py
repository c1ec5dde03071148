"""Building blocks shared by the LLaMA and Falcon blocks: norms, projections, RoPE, attention.

Shape letters: B batch, T new (query) tokens, S cache slots, P prefix tokens, N query heads,
K kv heads, G = N // K, D head dim, E model dim.

Attention here is "block attention": the T new tokens attend to (a) the committed cache slots
[0, cache_len) of their row, (b) the block of T new tokens itself under an arbitrary [T, T]
mask (causal, a token tree, mask groups), and (c) for mask-token rows only, the BiTA prefix.
Parts are combined with a shared softmax (log-sum-exp merge); rows that do not see the prefix
take the exact same arithmetic as a model without BiTA parameters, so real tokens stay
bit-identical to the base model.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bita_jax.models import lora as lora_lib
from bita_jax.models.config import ModelConfig

# A finite "minus infinity" for masked scores and logits: fully masked rows stay NaN-free.
MASKED = -1e30


def _param_init(names: tuple[str, ...], std: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _ones_init(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones, names)


def _zeros_init(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm in fp32, cast back, then times the weight (HF numerics)."""

    eps: float
    dtype: Any = jnp.float32  # of the output
    param_dtype: Any = None  # of the weight (None: dtype)

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _ones_init(("norm",)), (x.shape[-1],),
                           self.param_dtype or self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nn.Module):
    """Falcon LayerNorm (weight and bias), computed in fp32."""

    eps: float
    dtype: Any = jnp.float32  # of the output
    param_dtype: Any = None  # of the weights (None: dtype)

    @nn.compact
    def __call__(self, x):
        pdt = self.param_dtype or self.dtype
        scale = self.param("scale", _ones_init(("norm",)), (x.shape[-1],), pdt)
        bias = self.param("bias", _zeros_init(("norm",)), (x.shape[-1],), pdt)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def dense(features, kernel_axes, bias_axes, use_bias, dtype, name, axis=-1, transposed=False,
          param_dtype=None):
    """A projection over the trailing input dims `axis`: a `DenseGeneral` whose kernel [*in,
    *features] (and bias) declare logical sharding axes, or, with `transposed`, a `DenseT`.
    Weights are stored in `param_dtype` (None: `dtype`) and computed with in `dtype`."""
    param_dtype = param_dtype or dtype
    if transposed:
        return DenseT(features, axis, use_bias, dtype, param_dtype, name=name)
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=_param_init(kernel_axes), bias_init=_zeros_init(bias_axes), name=name)


# Row tile of XLA CPU's [F, R] product kernel: above one tile, a partial tile costs more than
# a full one (9 to 15 rows about 1.3x 16 rows), so rows are padded to a multiple of it.
ROW_TILE = 8


# From this many rows (prefill chunks) the plain product x2 @ kernel_t^T is the faster form on
# XLA CPU: SmolLM2's 30 layers of products take 289 against 301 ms for 256 rows, 549 against
# 677 for 512, 1,108 against 1,528 for 1,024; at 128 rows the transposed form still wins (153
# against 159 ms), at 16 by 1.45x (docs/benchmarks.md, "Long prompts, third pass").
PLAIN_PRODUCT_ROWS = 256


def product_t(kernel_t, x2):
    """x2 [R, K] times kernel_t [F, K] (a kernel stored transposed) -> [R, F], computed as
    kernel_t @ x2^T. The optimization barrier keeps XLA from rewriting the transposed product
    back into x2 @ kernel_t^T: on XLA CPU the [F, R] form costs about 1.5x one row for R = 2 to
    8 rows and 1.8x for 16 (the weight streams through once), where the [R, F] form costs 1.9
    to 4.7x (docs/benchmarks.md, "Transposed kernels"). More than `ROW_TILE` rows are padded to a
    multiple of it; each output row depends on its own input row only. From
    `PLAIN_PRODUCT_ROWS` rows on, the plain x2 @ kernel_t^T."""
    rows = x2.shape[0]
    if rows >= PLAIN_PRODUCT_ROWS:
        return jnp.dot(x2, kernel_t.T)
    padded = rows if rows <= ROW_TILE else -(-rows // ROW_TILE) * ROW_TILE
    if padded != rows:
        x2 = jnp.pad(x2, ((0, padded - rows), (0, 0)))
    return jax.lax.optimization_barrier(jnp.dot(kernel_t, x2.T)).T[:rows]


class DenseT(nn.Module):
    """`DenseGeneral` with its kernel stored transposed, as one [F, K] matrix (F = prod of
    `features`, K = prod of the input dims `axis`, which are trailing): what decoding runs on
    CPU (`causal_lm.to_unrolled`). Same products, one matrix per projection."""

    features: int | tuple[int, ...]
    axis: int | tuple[int, ...]
    use_bias: bool
    dtype: Any  # of the computation
    param_dtype: Any = None  # of the weights (None: dtype)

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        n_in = 1 if isinstance(self.axis, int) else len(self.axis)
        lead, inner = x.shape[:-n_in], x.shape[-n_in:]
        pdt = self.param_dtype or self.dtype
        kernel = self.param("kernel", nn.initializers.normal(0.02),
                            (math.prod(features), math.prod(inner)), pdt)
        y = product_t(kernel.astype(self.dtype),
                      x.reshape(-1, math.prod(inner)).astype(self.dtype))
        y = y.reshape(*lead, *features)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, features, pdt).astype(self.dtype)
        return y


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (rotate-half layout, as HF LLaMA / Falcon).


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies [D/2], with HF's `linear` and `llama3` scaling rules."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_scaling is None:
        return inv_freq
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin tables [B, T, D] (fp32) for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, T, H, D] by cos/sin [B, T, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Block attention.


class AttnContext(NamedTuple):
    """Per-forward values broadcast to every layer.

    cos, sin: [B, T, D] rotary tables of the new tokens.
    cache_len: [B] int32 committed slots per row (None without a cache).
    block_mask: [B, T, T] bool, query t may see new token u.
    mask_rows: [B, T] bool, the mask-token rows: the only rows that see the BiTA prefix and
      take the mask-only LoRA (None without BiTA params).
    cache_visible: [B, T, S] bool, an explicit per-query view of the cache that replaces
      `slot < cache_len` (training: each mask group sees only the real tokens before its anchor).
    """

    cos: jnp.ndarray
    sin: jnp.ndarray
    cache_len: jnp.ndarray | None
    block_mask: jnp.ndarray
    mask_rows: jnp.ndarray | None
    cache_visible: jnp.ndarray | None = None


class _Part(NamedTuple):
    m: jnp.ndarray  # [B, K, G, T] running max of scores
    denom: jnp.ndarray  # [B, K, G, T] sum of exp(score - m)
    o: jnp.ndarray  # [B, K, G, T, D] sum of exp(score - m) * v


def softmax_part(q, k, v, visible, heads_major: bool = False, per_head: bool = False) -> _Part:
    """Unnormalised softmax statistics of q [B,T,K,G,D] against k, v [B,S,K,D] (or, with
    `heads_major`, the cache's [B,K,S,D]) where `visible` (broadcastable to [B,K,G,T,S]).

    With `per_head`, at least `PER_HEAD_MIN_ROWS` query rows per kv head and at most
    `PER_HEAD_MAX_PRODUCTS` (batch rows x kv heads), as `_part_per_head`: what the CPU decoding
    layout runs for prefill chunks and large trees."""
    if per_head and takes_per_head(q):
        return _part_per_head(q, k, v, visible, heads_major)
    kv = "bksd" if heads_major else "bskd"
    s = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(visible, s, MASKED)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    denom = jnp.sum(p, axis=-1)
    o = jnp.einsum(f"bkgts,{kv}->bkgtd", p, v.astype(jnp.float32))
    return _Part(m, denom, o)


# Query rows per kv head (T x G) from which `softmax_part(per_head=True)` takes the per-head
# form, and the most 2-D products (B x K) it unrolls: a batch of thousands of rows stays batched.
PER_HEAD_MIN_ROWS = 64
PER_HEAD_MAX_PRODUCTS = 32


def takes_per_head(q) -> bool:
    """Whether q [B, T, K, G, D] is large enough per kv head, and its batch small enough, for
    `_part_per_head`."""
    b, t, kv, g, _ = q.shape
    return t * g >= PER_HEAD_MIN_ROWS and b * kv <= PER_HEAD_MAX_PRODUCTS


def _part_per_head(q, k, v, visible, heads_major: bool) -> _Part:
    """`softmax_part` as one 2-D product per batch row and kv head, queries major: scores
    [T*G, S] = q [T*G, D] @ k^T (row t * G + g), the softmax along each row's slots, then
    p @ v. On XLA CPU, with 64 or more query rows per head (a 256-token prefill chunk has 768),
    this runs near the rate of the model's weight products, where the batched einsum runs a
    chunk's scores at a fifth of it; below that the batched form wins (docs/benchmarks.md,
    "Long prompts, third pass")."""
    b, t, kv, g, d = q.shape
    if not heads_major:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    slots, rows = k.shape[2], t * g
    visible = jnp.broadcast_to(visible, (b, kv, g, t, slots))
    parts = []
    for row in range(b):
        for head in range(kv):
            seen = jnp.swapaxes(visible[row, head], 0, 1).reshape(rows, slots)
            parts.append(_rows_part(q[row, :, head].reshape(rows, d), k[row, head],
                                    v[row, head], seen))
    return _heads_first(parts, b, kv, t, g)


def _rows_part(q2, k, v, seen, carry=None):
    """Softmax statistics of the query rows q2 [R, D] over k, v [S, D] where seen [R, S] (or
    broadcastable), merged into `carry` (m [R], denom [R], o [R, D]) if given: the online
    softmax step of `_part_per_head` and `_cache_part_per_head`."""
    s = jnp.dot(q2, k.T, preferred_element_type=jnp.float32)  # [R, S]
    s = jnp.where(seen, s, MASKED)
    m = jnp.max(s, axis=1)
    if carry is not None:
        m = jnp.maximum(carry[0], m)
    p = jnp.exp(s - m[:, None])
    denom, o = jnp.sum(p, axis=1), jnp.dot(p, v.astype(jnp.float32))
    if carry is None:
        return m, denom, o
    scale = jnp.exp(carry[0] - m)
    return m, carry[1] * scale + denom, carry[2] * scale[:, None] + o


def _heads_first(parts, b: int, kv: int, t: int, g: int) -> _Part:
    """B*K per-head (m [T*G], denom [T*G], o [T*G, D]), row t * G + g -> a `_Part` [B, K, G,
    T, ...]."""
    def stack(xs, *tail):
        return jnp.swapaxes(jnp.stack(xs).reshape(b, kv, t, g, *tail), 2, 3)

    m, denom, o = zip(*parts)
    return _Part(stack(m), stack(denom), stack(o, o[0].shape[-1]))


def _merge(a: _Part, b: _Part) -> _Part:
    m = jnp.maximum(a.m, b.m)
    sa, sb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return _Part(m, a.denom * sa + b.denom * sb, a.o * sa[..., None] + b.o * sb[..., None])


# Slots per block of the cache that attention reads in turn (`_filled_cache_part`).
CACHE_BLOCK = 512
# The share of a cache's slots from which a forward of few query rows reads it in one piece.
WHOLE_READ_FILL = 0.5


def _filled_cache_part(qg, k_cache, v_cache, cache_len, per_head: bool = False) -> _Part:
    """Softmax statistics of q [B, T, K, G, D] over the filled slots of a heads-major cache
    [B, K, S, D] (slot < cache_len [B]); `per_head` as in `softmax_part`.

    A cache of more than `CACHE_BLOCK` slots (a multiple of it, as the decode engine sizes it)
    is read block by block up to the longest row's length, merged with an online softmax, so a
    step costs what the cache holds, not its capacity. Once the longest row fills
    `WHOLE_READ_FILL` of the slots, a forward of few query rows (a decode step; not a prefill
    chunk, which reads its blocks in `_cache_part_per_head`) reads the whole cache in one piece
    instead: on XLA CPU the block loop's slices and small ops cost about 1.7x a one-piece read
    per slot, so at 4,000 of 4,608 slots a greedy step takes 38 instead of 45 ms. Other caches
    are read in one piece."""
    s_slots = k_cache.shape[2]
    b, t, kv, g, _ = qg.shape

    def whole():
        visible = (jnp.arange(s_slots)[None, :] < cache_len[:, None])[:, None, None, None]
        return softmax_part(qg, k_cache, v_cache, visible, heads_major=True, per_head=per_head)

    if s_slots <= CACHE_BLOCK or s_slots % CACHE_BLOCK:
        return whole()

    def read_block(i, part):
        start = i * CACHE_BLOCK
        k = jax.lax.dynamic_slice_in_dim(k_cache, start, CACHE_BLOCK, axis=2)
        v = jax.lax.dynamic_slice_in_dim(v_cache, start, CACHE_BLOCK, axis=2)
        slots = start + jnp.arange(CACHE_BLOCK)
        visible = (slots[None, :] < cache_len[:, None])[:, None, None, None]
        return _merge(part, softmax_part(qg, k, v, visible, heads_major=True))

    def by_blocks():
        empty = _Part(jnp.full((b, kv, g, t), MASKED, jnp.float32),
                      jnp.zeros((b, kv, g, t), jnp.float32),
                      jnp.zeros((b, kv, g, t, qg.shape[-1]), jnp.float32))
        blocks = (jnp.max(cache_len) + CACHE_BLOCK - 1) // CACHE_BLOCK
        return jax.lax.fori_loop(0, blocks, read_block, empty)

    if per_head and takes_per_head(qg):
        return _cache_part_per_head(qg, k_cache, v_cache, cache_len)
    return jax.lax.cond(jnp.max(cache_len) >= WHOLE_READ_FILL * s_slots, whole, by_blocks)


def _cache_part_per_head(qg, k_cache, v_cache, cache_len) -> _Part:
    """`_filled_cache_part` for many query rows (`takes_per_head`): the filled blocks of the
    cache [B, K, S, D] (S a multiple of `CACHE_BLOCK`) in one loop, each row and kv head an
    online softmax of queries-major products (`_rows_part`) that stays in that layout until
    the end. A 256-token prefill chunk's attention over 3,840 cached tokens takes about 0.53
    instead of 0.81 s for SmolLM2's 30 layers on this CPU (docs/benchmarks.md, "Long prompts,
    third pass")."""
    b, t, kv, g, d = qg.shape
    rows = t * g
    queries = [[qg[r, :, h].reshape(rows, d) for h in range(kv)] for r in range(b)]

    def read_block(i, carry):
        start = i * CACHE_BLOCK
        k = jax.lax.dynamic_slice_in_dim(k_cache, start, CACHE_BLOCK, axis=2)
        v = jax.lax.dynamic_slice_in_dim(v_cache, start, CACHE_BLOCK, axis=2)
        seen = (start + jnp.arange(CACHE_BLOCK))[None, :] < cache_len[:, None]  # [B, block]
        return [_rows_part(queries[r][h], k[r, h], v[r, h], seen[r][None, :], carry[r * kv + h])
                for r in range(b) for h in range(kv)]

    empty = (jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, d), jnp.float32))
    blocks = (jnp.max(cache_len) + CACHE_BLOCK - 1) // CACHE_BLOCK
    parts = jax.lax.fori_loop(0, blocks, read_block, [empty] * (b * kv))
    return _heads_first(parts, b, kv, t, g)


def block_attention(q, k_blk, v_blk, ctx: AttnContext, k_cache=None, v_cache=None, prefix=None,
                    per_head: bool = False):
    """Attention of T new tokens over cache, block and (mask rows only) the BiTA prefix.

    Args:
      q: [B, T, N, D] rotated queries.
      k_blk, v_blk: [B, T, K, D] keys (rotated) and values of the new tokens.
      ctx: the `AttnContext`.
      k_cache, v_cache: [B, K, S, D] (the cache is heads-major) or None.
      prefix: [P, 2, N, D] post-RoPE prefix keys/values of this layer (or per sample,
        [B, P, 2, N, D]), or None.

    Returns:
      [B, T, N, D] attention output in q's dtype.
    """
    b, t, n, d = q.shape
    kv = k_blk.shape[2]
    g = n // kv
    qg = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).reshape(b, t, kv, g, d)
    part = softmax_part(qg, k_blk, v_blk, ctx.block_mask[:, None, None, :, :], per_head=per_head)
    if k_cache is not None:
        if ctx.cache_visible is not None:
            visible = ctx.cache_visible[:, None, None, :, :]  # [B, 1, 1, T, S]
            cache_part = softmax_part(qg, k_cache, v_cache, visible, heads_major=True,
                                      per_head=per_head)
        else:
            cache_part = _filled_cache_part(qg, k_cache, v_cache, ctx.cache_len, per_head)
        part = _merge(cache_part, part)
    out = part.o / part.denom[..., None]
    if prefix is not None:
        if prefix.ndim == 4:
            prefix = prefix[None]
        pb, p = prefix.shape[:2]
        pk = jnp.broadcast_to(prefix[:, :, 0].reshape(pb, p, kv, g, d), (b, p, kv, g, d))
        pv = jnp.broadcast_to(prefix[:, :, 1].reshape(pb, p, kv, g, d), (b, p, kv, g, d))
        s = jnp.einsum("btkgd,bpkgd->bkgtp", qg, pk.astype(jnp.float32))
        rows = ctx.mask_rows[:, None, None, :, None]
        s = jnp.where(rows, s, MASKED)
        m = jnp.max(s, axis=-1)
        e = jnp.exp(s - m[..., None])
        pre = _Part(m, jnp.sum(e, axis=-1),
                    jnp.einsum("bkgtp,bpkgd->bkgtd", e, pv.astype(jnp.float32)))
        merged = _merge(part, pre)
        out = jnp.where(ctx.mask_rows[:, None, None, :, None],
                        merged.o / merged.denom[..., None], out)
    # [B, K, G, T, D] -> [B, T, N, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d).astype(q.dtype)


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention with RoPE (LLaMA and Falcon)."""

    cfg: ModelConfig
    transposed: bool = False  # kernels stored [F, K] (`DenseT`)

    @nn.compact
    def __call__(self, x, ctx: AttnContext, cache_kv=None, prefix=None, lora=None,
                 mask_lora=None):
        """x [B, T, E] -> (out [B, T, E], (k [B, T, K, D], v [B, T, K, D])).

        `lora` (every row) and `mask_lora` (mask rows only) are this layer's LoRA pytrees."""
        cfg = self.cfg
        dt, pdt = cfg.jnp_compute_dtype, cfg.jnp_dtype
        n, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias, tr = cfg.attention_bias, self.transposed
        adapt = functools.partial(adapted, ctx=ctx, lora=lora, mask_lora=mask_lora)
        q = adapt(dense((n, d), ("embed", "heads", "head_dim"), ("heads", "head_dim"), bias, dt,
                        "q_proj", transposed=tr, param_dtype=pdt), x)
        k = adapt(dense((kv, d), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"),
                        bias, dt, "k_proj", transposed=tr, param_dtype=pdt), x)
        v = adapt(dense((kv, d), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"),
                        bias, dt, "v_proj", transposed=tr, param_dtype=pdt), x)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        k_cache, v_cache = cache_kv if cache_kv is not None else (None, None)
        out = block_attention(q, k, v, ctx, k_cache, v_cache, prefix, per_head=tr)
        out = adapt(dense(cfg.hidden_size, ("heads", "head_dim", "embed"), ("embed",), bias, dt,
                          "o_proj", axis=(-2, -1), transposed=tr, param_dtype=pdt), out, n_in=2)
        return out, (k, v)


def adapted(projection: nn.Module, x, ctx: AttnContext, lora=None, mask_lora=None, n_in=1):
    """projection(x) plus this layer's LoRA updates of it (`lora_lib.apply`): `lora` on every
    row, `mask_lora` on the mask rows (`ctx.mask_rows`) only."""
    y = projection(x)
    y = lora_lib.apply(y, x, projection.name, lora, None, n_in)
    if mask_lora is not None:
        y = lora_lib.apply(y, x, projection.name, mask_lora, ctx.mask_rows, n_in)
    return y
