"""A static-capacity KV cache of committed real tokens, passed in and returned (no hidden state).

Layout: k, v [L, B, K, S, D], heads-major (or, for unrolled params, tuples of L arrays
[B, K, S, D]: each layer's cache its own buffer, updated in place); length [B] int32 committed
slots per row. Heads-major keeps each kv head's slots contiguous, so attention over the cache is
one [rows, D] x [D, S] product per head with no transpose of the cache (on CPU that halves its
cost against [B, S, K, D]). A forward returns the block's keys/values [L, B, T, K, D]; `commit`
gathers the accepted block rows (a fixed number A of them, per row) and writes them at each
row's length, then advances the length by the number really accepted. Slots at or beyond
`length` are never visible, so the garbage that a fixed-size write leaves past the accepted rows
is harmless and is overwritten later.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from bita_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """k, v: [L, B, K, S, D] or L-tuples of [B, K, S, D]; length: [B] int32."""

    k: jnp.ndarray | tuple[jnp.ndarray, ...]
    v: jnp.ndarray | tuple[jnp.ndarray, ...]
    length: jnp.ndarray

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if isinstance(self.k, tuple) else self.k.shape[3]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None,
               per_layer: bool = False) -> KVCache:
    """An empty cache of `capacity` slots per row (one buffer per layer with `per_layer`)."""
    shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    dtype = dtype or cfg.jnp_compute_dtype
    length = jnp.zeros((batch,), jnp.int32)
    if per_layer:
        return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                       tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)), length)
    shape = (cfg.num_layers, *shape)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), length)


def commit(cache: KVCache, block_kv, src: jnp.ndarray, num: jnp.ndarray,
           after=None) -> KVCache:
    """Appends accepted block rows to each cache row.

    Args:
      cache: the cache; every row needs `length + A <= S` (checked on the host by callers).
      block_kv: (k, v), each [L, B, T, K, D], from the forward that produced the block.
      src: [B, A] int32 block indices to keep, in order (A static; padding entries arbitrary).
      num: [B] int32 how many of the A rows are real (0..A).
      after: the forward's output (e.g. its hidden states), which the writes wait for, so the
        attention reads each layer's cache before it is written. Without it XLA CPU copied two
        layers' caches twice in each greedy step at 4,096 slots, with it one layer's (4 copies
        of 3 MB instead of 8; 0.3 to 0.7 ms a step; docs/benchmarks.md).

    Returns:
      The cache with rows written at [length, length + A) and length advanced by `num`.
    """
    if after is not None:
        block_kv, _ = jax.lax.optimization_barrier((block_kv, after))
    k_blk, v_blk = block_kv

    def take(x):  # [L, B, T, K, D] -> [L, B, K, A, D]
        return jnp.swapaxes(jnp.take_along_axis(x, src[None, :, :, None, None], axis=2), 2, 3)

    def write(dst, rows, start):  # [L, K, S, D], [L, K, A, D], scalar
        return jax.lax.dynamic_update_slice(dst, rows.astype(dst.dtype), (0, 0, start, 0))

    write_rows = jax.vmap(write, in_axes=(1, 1, 0), out_axes=1)
    length = cache.length + num.astype(jnp.int32)
    if isinstance(cache.k, tuple):  # per-layer buffers [B, K, S, D]
        def write_layers(dst, rows):
            return tuple(write_rows(d[None], r[None], cache.length)[0]
                         for d, r in zip(dst, rows))

        return KVCache(write_layers(cache.k, take(k_blk)), write_layers(cache.v, take(v_blk)),
                       length)
    return KVCache(
        k=write_rows(cache.k, take(k_blk), cache.length),
        v=write_rows(cache.v, take(v_blk), cache.length),
        length=length,
    )
