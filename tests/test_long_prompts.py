"""Long prompts: the chunked prefill and the block-by-block read of the cache equal the one-piece
forward (fp32 logits at 1e-4), decoding after them is token-identical, and the prefill compiles
once for every prompt length of a bucket.

Small chunk and block sizes (8 prompt tokens, 16 cache slots) make tiny prompts cross many
boundaries; the production sizes only change how many."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding import engine, prefill
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.tree import Tree
from bita_jax.models import causal_lm, kv_cache, layers
from bita_jax.models.config import ModelConfig

TOL = 1e-4  # fp32 logits
CONFIGS = {
    "llama_gqa": ModelConfig(
        arch="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True,
        max_position_embeddings=512),
    "falcon_new_arch": ModelConfig(
        arch="falcon", vocab_size=89, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, new_decoder_architecture=True,
        parallel_attn=True, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        max_position_embeddings=512),
}
PROMPT_LENS = (29, 13, 8, 1)  # 4 chunks, 2, exactly 1, part of 1


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def _sizes(monkeypatch, chunk: int, block: int):
    monkeypatch.setattr(engine, "PREFILL_CHUNK", chunk)
    monkeypatch.setattr(layers, "CACHE_BLOCK", block)


def _setup(name: str, seed: int = 0):
    """Params with O(1) activations (x3 the init), so that a wrong mask shows far beyond TOL."""
    cfg = CONFIGS[name]
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(seed)))
    bita = jax.tree.map(lambda x: 3 * x, models.init_bita_params(
        cfg, models.BitaConfig(num_masks=3), jax.random.key(seed + 1)))
    return cfg, params, bita


def _prompts(cfg: ModelConfig, lens, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, cfg.vocab_size, n).tolist() for n in lens]


def _prefill_and_next_logits(cfg, params, bita, prompts, capacity=96):
    """prefill.prefill of the prompts, then one more token per row through the cache (followed
    by 3 mask tokens under the BiTA params when `bita`, as a first BiTA step drafts): (cache,
    next-token logits [B, V], mask logits [B, 3, V] or None)."""
    b = len(prompts)
    tp = engine.prompt_bucket(max(len(p) for p in prompts))
    prompt = np.zeros((b, tp), np.int32)
    for i, p in enumerate(prompts):
        prompt[i, :len(p)] = p
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    cache, _, _ = prefill.prefill(cfg, params, jnp.asarray(prompt), lens, None,
                                  jax.random.key(0), capacity=capacity)
    nxt = jnp.full((b, 1), 7, jnp.int32)
    if bita is not None:
        masks = jnp.broadcast_to(cfg.vocab_size + jnp.arange(3, dtype=jnp.int32), (b, 3))
        nxt = jnp.concatenate([nxt, masks], axis=1)
    t = nxt.shape[1]
    hidden, _ = models.forward(cfg, params, nxt, lens[:, None] + jnp.arange(t)[None],
                               engine.causal_mask(t), cache, bita)
    logits = models.lm_logits(cfg, params, hidden)
    return cache, logits[:, 0], (None if bita is None else logits[:, 1:])


@pytest.mark.parametrize("with_bita", [False, True], ids=["base", "bita"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_prefill_equals_one_shot(name, with_bita, monkeypatch):
    cfg, params, bita = _setup(name)
    bita = bita if with_bita else None
    prompts = _prompts(cfg, PROMPT_LENS)
    want_cache, want, want_masks = _prefill_and_next_logits(cfg, params, bita, prompts)
    _sizes(monkeypatch, chunk=8, block=16)
    assert engine.prompt_bucket(29) == 32  # 4 chunks of 8
    cache, got, got_masks = _prefill_and_next_logits(cfg, params, bita, prompts)

    np.testing.assert_array_equal(np.asarray(cache.length), PROMPT_LENS)
    assert np.abs(np.asarray(want)).max() > 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=TOL)
    for row, n in enumerate(PROMPT_LENS):  # every committed key and value
        for got_kv, want_kv in ((cache.k, want_cache.k), (cache.v, want_cache.v)):
            np.testing.assert_allclose(np.asarray(got_kv)[:, row, :, :n],
                                       np.asarray(want_kv)[:, row, :, :n], rtol=0, atol=TOL)
    if with_bita:
        np.testing.assert_allclose(np.asarray(got_masks), np.asarray(want_masks), rtol=0, atol=TOL)


@pytest.mark.parametrize("whole_from", [2.0, 0.0], ids=["blocks", "whole"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cache_read_by_blocks_equals_one_piece(name, whole_from, monkeypatch):
    """A forward of a 3-token tree block over a 64-slot cache: read in blocks of 16 up to the
    longest row (ragged rows: 0, 5, 16 and 37 filled slots), or, by the other branch of the
    cond that chooses by fill (`WHOLE_READ_FILL`, forced here), in one piece, equals the read
    of a cache within one block."""
    cfg, params, _ = _setup(name, seed=4)
    rng = np.random.default_rng(5)
    lens = jnp.asarray([37, 5, 16, 0], jnp.int32)
    shape = (cfg.num_layers, 4, cfg.num_kv_heads, 64, cfg.head_dim)
    cache = kv_cache.KVCache(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                             jnp.asarray(rng.standard_normal(shape), jnp.float32), lens)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 3)), jnp.int32)
    mask = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)  # a root and two children
    positions = lens[:, None] + jnp.asarray([0, 1, 1])[None]

    def logits():
        hidden, _ = models.forward(cfg, params, tokens, positions, mask, cache)
        return np.asarray(models.lm_logits(cfg, params, hidden))

    want = logits()  # 64 slots <= the default block: one piece
    _sizes(monkeypatch, chunk=engine.PREFILL_CHUNK, block=16)
    monkeypatch.setattr(layers, "WHOLE_READ_FILL", whole_from)
    got = logits()
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("per_head_rows", [layers.PER_HEAD_MIN_ROWS, 1],
                         ids=["default", "per-head"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoding_after_chunked_prefill_is_unchanged(name, per_head_rows, monkeypatch,
                                                     request):
    """Greedy and BiTA (three trees) after a chunked prefill, over a cache read in blocks, give
    the token ids of today's one-piece path, alone and as one ragged batch; with `per-head`,
    every forward of the decoding layout takes the per-head attention (`_part_per_head`)."""
    cfg, params, bita = _setup(name, seed=2)
    prompts = _prompts(cfg, (7, 8, 9, 17, 40), seed=3)
    want = Generator(cfg, params).generate(prompts, 40).tokens
    _sizes(monkeypatch, chunk=8, block=16)
    if per_head_rows != layers.PER_HEAD_MIN_ROWS:  # traced anew, and not left to later tests
        monkeypatch.setattr(layers, "PER_HEAD_MIN_ROWS", per_head_rows)
        monkeypatch.setattr(engine, "EXECUTABLES", {})
        causal_lm.clear_block_traces()
        request.addfinalizer(causal_lm.clear_block_traces)
    greedy = Generator(cfg, params)
    assert [greedy.generate([p], 40).tokens[0] for p in prompts] == want
    assert greedy.generate(prompts, 40).tokens == want
    for tree in ("chain", "upper-triangle:3", "upper-triangle:2+lookup:3"):
        got = BitaGenerator(cfg, params, bita, Tree.make(tree, 3)).generate(prompts, 40)
        assert got.tokens == want, tree
        accepted = sum(n for hist in got.step_hist for n in hist[2:])
        assert accepted > 0, tree  # steps that emitted 2 or more tokens: drafts were used


@pytest.mark.parametrize("heads_major", [True, False], ids=["cache", "block"])
def test_per_head_attention_equals_batched(heads_major):
    """`softmax_part` with `per_head` (one [S, T*G] product per row and kv head, as a prefill chunk
    runs on CPU) equals the batched einsum at fp32 rounding, ragged visibility and an all-hidden
    row included; below `PER_HEAD_MIN_ROWS` query rows it is the batched form itself."""
    rng = np.random.default_rng(11)
    b, t, kv, g, d, s = 2, 40, 2, 2, 16, 48  # 80 query rows per kv head
    assert t * g >= layers.PER_HEAD_MIN_ROWS
    q = jnp.asarray(rng.standard_normal((b, t, kv, g, d)), jnp.float32)
    kv_shape = (b, kv, s, d) if heads_major else (b, s, kv, d)
    k, v = (jnp.asarray(3 * rng.standard_normal(kv_shape), jnp.float32) for _ in range(2))
    visible = rng.random((b, 1, 1, t, s)) < 0.6
    visible[1, 0, 0, 5] = False  # a query row that sees nothing
    want = layers.softmax_part(q, k, v, visible, heads_major)
    got = layers.softmax_part(q, k, v, visible, heads_major, per_head=True)
    # the exact statistics in float64: both fp32 forms must be within fp32 rounding of them
    # (sums of 48 terms of up to ~50: 1e-6 of the largest value)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    kv_spec = "bksd" if heads_major else "bskd"
    scores = np.where(visible, np.einsum(f"btkgd,{kv_spec}->bkgts", q64, k64), layers.MASKED)
    m = scores.max(-1)
    p = np.exp(scores - m[..., None])
    exact = (m, p.sum(-1), np.einsum(f"bkgts,{kv_spec}->bkgtd", p, v64))
    for name, w, x, e in zip(want._fields, want, got, exact):
        assert x.shape == w.shape == e.shape, name
        for form, y in (("batched", w), ("per head", x)):
            np.testing.assert_allclose(np.asarray(y, np.float64), e, rtol=1e-6,
                                       atol=1e-6 * np.abs(e[e > layers.MASKED]).max(),
                                       err_msg=f"{name}, {form}")
    out = np.asarray(got.o / got.denom[..., None])
    assert np.abs(out).max() > 1.0
    few = q[:, : layers.PER_HEAD_MIN_ROWS // g - 1]  # too few rows: the batched form, bit for bit
    for w, x in zip(layers.softmax_part(few, k, v, visible[:, :, :, : few.shape[1]], heads_major),
                    layers.softmax_part(few, k, v, visible[:, :, :, : few.shape[1]], heads_major,
                                        per_head=True)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(w))
    many = jnp.tile(q, (layers.PER_HEAD_MAX_PRODUCTS // kv, 1, 1, 1, 1))  # 64 products: batched
    assert not layers.takes_per_head(many) and layers.takes_per_head(q)


def test_prefill_compiles_once_for_many_lengths(monkeypatch):
    cfg, params, bita = _setup("llama_gqa", seed=6)
    _sizes(monkeypatch, chunk=8, block=16)
    monkeypatch.setattr(engine, "EXECUTABLES", {})  # nothing compiled by earlier tests
    lens = range(33, 49)  # one prompt bucket: 48 tokens, 6 chunks
    assert {engine.prompt_bucket(n) for n in lens} == {48}
    prompts = _prompts(cfg, lens, seed=7)
    for gen, kind in ((Generator(cfg, params), "plain"),
                      (BitaGenerator(cfg, params, bita, Tree.make("chain", 3)), "bita")):
        before = engine.TRACES[("prefill", cfg)]
        for p in prompts:
            gen.generate([p], 5)
        assert engine.TRACES[("prefill", cfg)] - before == 1, kind


def test_chunked_prefill_pads_a_prompt_width_off_the_chunk(monkeypatch):
    """Callers other than the engine may pass any width: 29 slots run as 4 chunks of 8."""
    cfg, params, _ = _setup("llama_gqa", seed=8)
    prompts = _prompts(cfg, PROMPT_LENS, seed=9)
    b, tp = len(prompts), max(PROMPT_LENS)
    prompt = np.zeros((b, tp), np.int32)
    for i, p in enumerate(prompts):
        prompt[i, :len(p)] = p
    lens = jnp.asarray(PROMPT_LENS, jnp.int32)

    def first_tokens(capacity):
        return np.asarray(prefill.prefill(cfg, params, jnp.asarray(prompt), lens, None,
                                         jax.random.key(0), capacity=capacity)[1])

    want = first_tokens(64)
    _sizes(monkeypatch, chunk=8, block=16)
    np.testing.assert_array_equal(first_tokens(64), want)
    with pytest.raises(ValueError, match="needs a cache of whole 8-slot chunks, got 30"):
        first_tokens(30)


def test_a_cache_that_holds_only_the_filled_chunks(monkeypatch):
    """A cache of the longest prompt rounded up to the chunk (264 slots, less than the 384-slot
    prompt bucket) holds every committed key and value of a ragged batch, as a roomy one does:
    rows that ended early keep writing at their length, inside the cache."""
    cfg, params, _ = _setup("llama_gqa", seed=10)
    _sizes(monkeypatch, chunk=8, block=16)
    lens = (262, 259, 250, 5)
    prompts = _prompts(cfg, lens, seed=11)
    tp = engine.prompt_bucket(max(lens))
    assert tp == 384
    prompt = np.zeros((len(lens), tp), np.int32)
    for i, p in enumerate(prompts):
        prompt[i, :len(p)] = p

    def run(capacity):
        cache, first, _ = prefill.prefill(cfg, params, jnp.asarray(prompt),
                                          jnp.asarray(lens, jnp.int32), None,
                                          jax.random.key(0), capacity=capacity)
        return cache, np.asarray(first)

    want_cache, want_first = run(tp + 128)
    cache, first = run(264)
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_array_equal(np.asarray(cache.length), lens)
    for row, n in enumerate(lens):  # the caches are read whole and in blocks: fp32 rounding
        for got_kv, want_kv in ((cache.k, want_cache.k), (cache.v, want_cache.v)):
            assert np.abs(np.asarray(want_kv)[:, row, :, :n]).max() > 1.0
            np.testing.assert_allclose(np.asarray(got_kv)[:, row, :, :n],
                                       np.asarray(want_kv)[:, row, :, :n], rtol=0, atol=TOL)


def test_decoding_in_a_cache_smaller_than_the_prompt_bucket(monkeypatch):
    """The engine sizes a long prompt's cache by what the request needs (`request_slots`), below
    its bucket: greedy and BiTA decoding in it give the token ids of a roomy cache."""
    cfg, params, bita = _setup("llama_gqa", seed=12)
    prompts = _prompts(cfg, (260, 251, 3), seed=13)
    want = Generator(cfg, params).generate(prompts, 20).tokens  # production sizes: 512 slots
    _sizes(monkeypatch, chunk=8, block=16)
    tp, capacity, _ = Generator(cfg, params).shapes([260], 20)
    assert (tp, capacity) == (384, 352)  # 260 + 64 output slots + 16 headroom, in blocks of 16
    greedy = Generator(cfg, params)
    assert greedy.generate(prompts, 20).tokens == want
    assert [greedy.generate([p], 20).tokens[0] for p in prompts] == want
    got = BitaGenerator(cfg, params, bita, Tree.make("upper-triangle:2+lookup:3", 3))
    assert got.generate(prompts, 20).tokens == want


def test_prompt_buckets_and_cache_slots():
    chunk, block = engine.PREFILL_CHUNK, layers.CACHE_BLOCK
    assert [engine.prompt_bucket(n) for n in (1, 17, chunk)] == [16, 32, chunk]
    assert engine.prompt_bucket(chunk + 1) == 2 * chunk
    assert engine.prompt_bucket(2 * chunk + 1) == 3 * chunk  # 1.5 x a power of two
    assert engine.prompt_bucket(3 * chunk + 1) == 4 * chunk
    assert engine.prompt_bucket(6 * chunk + 1) == 8 * chunk
    for n in range(chunk + 1, 20 * chunk, 97):  # a multiple of the chunk, padding < 1/3 (+1)
        size = engine.prompt_bucket(n)
        assert size % chunk == 0 and n <= size < 1.5 * n + chunk
    assert engine.cache_slots(block) == block and engine.cache_slots(block - 5) == block - 5
    assert engine.cache_slots(block + 1) == 2 * block
    # a chunked prompt's cache: what the request needs, in whole blocks (not its bucket + out)
    out, room = 64, engine.HEADROOM
    assert engine.request_slots(4000, out) == 4096 == engine.prompt_bucket(4000)
    assert engine.request_slots(3100, out) == 3584 < engine.prompt_bucket(3100)
    assert engine.request_slots(4096 - out - room + 1, out) == 4608
    assert engine.request_slots(chunk, out) == engine.cache_slots(chunk + out + room)
    assert engine.request_slots(100, out) == engine.cache_slots(128 + out + room)
    for n in range(chunk + 1, 20 * chunk, 97):
        size = engine.request_slots(n, out)
        assert size % block == 0 and n + out + room <= size < n + out + room + block
