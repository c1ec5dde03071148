"""Jitted AR generation on a tiny LLaMA: exact greedy, batching, EOS / max-new, compile once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.engine import EXECUTABLES, TRACES, GenerationError, bucket
from bita_jax.decoding.sampling import SamplingParams, filtered_logits
from bita_jax.models.config import ModelConfig

CFG = ModelConfig(arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(3))


@jax.jit
def _full_forward_logits(params, seq):
    """A full causal forward over a padded [1, 64] sequence (no cache): logits [64, V]."""
    n = seq.shape[1]
    hidden, _ = models.forward(CFG, params, seq, jnp.arange(n)[None],
                               np.tril(np.ones((n, n), bool)))
    return models.lm_logits(CFG, params, hidden[0])


def reference_greedy(params, prompt, max_new, eos=()):
    """Uncached greedy decoding: a full causal forward over the whole sequence per token."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        padded = np.zeros((1, 64), np.int32)
        padded[0, : len(seq)] = seq
        tok = int(jnp.argmax(_full_forward_logits(params, padded)[len(seq) - 1]))
        out.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    return out


PROMPTS = [[5, 17, 33, 2, 90], [44], list(range(1, 21)), [7, 7, 7, 7, 7, 7, 7, 7, 60, 61, 62]]


def test_batched_greedy_equals_uncached_reference(params):
    gen = Generator(CFG, params)
    result = gen.generate(PROMPTS, 24)
    for prompt, got in zip(PROMPTS, result.tokens):
        assert got == reference_greedy(params, prompt, 24)
    assert result.steps == 23  # first token comes from the prefill


def test_eos_and_max_new_tokens_are_exact(params):
    free = Generator(CFG, params).generate(PROMPTS, 30).tokens
    # Pick, per prompt, a token that greedy decoding emits midway and make it the EOS.
    eos = (free[0][9],)
    gen = Generator(CFG.replace(eos_token_ids=eos), params)
    got = gen.generate(PROMPTS, 30).tokens
    for prompt, row in zip(PROMPTS, got):
        want = reference_greedy(params, prompt, 30, eos)
        assert row == want
        assert len(row) <= 30
    assert got[0][-1] == eos[0] and len(got[0]) <= 10
    for n in (1, 2, 5, 13):
        rows = Generator(CFG, params).generate(PROMPTS, n).tokens
        assert [len(r) for r in rows] == [n] * len(PROMPTS)
        assert rows == [f[:n] for f in free]


def test_decode_loop_compiles_once_per_bucket(params):
    cfg = CFG.replace(rope_theta=12345.0)  # a config no other test compiled for
    gen = Generator(cfg, params)
    gen.generate([[1, 2, 3]], 10)
    gen.generate([[4, 5, 6, 7, 8, 9]], 20)  # same prompt bucket (16), same output bucket (64)
    assert TRACES[("ar", cfg)] == 1
    assert sum(k[0] == cfg for k in EXECUTABLES) == 2  # one prefill, one decode loop
    # Sampling compiles its own pair once (greedy executables hold no sampling code); its knobs
    # are traced: other temperatures, top-k, top-p and seeds reuse it.
    gen.generate([[9] * 11], 33, SamplingParams.make(0.7, 5, 0.9), seed=4)
    gen.generate([[9] * 3], 12, SamplingParams.make(1.3, 0, 0.5), seed=5)
    assert TRACES[("ar", cfg)] == 2
    assert sum(k[0] == cfg for k in EXECUTABLES) == 4
    gen.generate([[1] * 17], 10)  # next prompt bucket (32): a new compile
    assert TRACES[("ar", cfg)] == 3


def test_compiled_executables_are_bounded_least_recently_used_first(params, monkeypatch):
    """A process that decodes shape after shape keeps at most MAX_EXECUTABLES (their machine
    code would otherwise fill the kernel's memory-map limit and abort a later compile)."""
    from bita_jax.decoding import engine

    monkeypatch.setattr(engine, "EXECUTABLES", {})
    monkeypatch.setattr(engine, "MAX_EXECUTABLES", 3)
    cfg = CFG.replace(rope_theta=54321.0)  # a config no other test compiled for
    gen = Generator(cfg, params)
    want = gen.generate([[1, 2, 3]], 5).tokens  # prompt bucket 16: prefill + decode
    assert len(engine.EXECUTABLES) == 2
    gen.generate([[1] * 20], 5)  # bucket 32: prefill and decode evict bucket 16's prefill
    assert len(engine.EXECUTABLES) == 3
    kinds = [k[2] for k in engine.EXECUTABLES]
    # a prefill's only 2-D int32 argument is the padded prompt [B, Tp]
    widths = [[shape[1] for shape, dtype in k[-1] if dtype == "int32" and len(shape) == 2]
              for k in engine.EXECUTABLES if k[2] == "prefill"]
    assert kinds == ["decode", "prefill", "decode"] and widths == [[32]], (kinds, widths)
    again = gen.generate([[1, 2, 3]], 5)  # recompiled, and still the same tokens
    assert again.compile_seconds > 0 and again.tokens == want
    assert len(engine.EXECUTABLES) == 3


def test_streaming_matches_one_shot(params):
    chunks = []
    gen = Generator(CFG, params)
    streamed = gen.generate([PROMPTS[0]], 12, on_tokens=lambda t: chunks.append(t[0]))
    assert streamed.tokens == gen.generate([PROMPTS[0]], 12).tokens
    assert [len(c) for c in chunks] == list(range(1, 13))


def test_sampling_is_seeded_and_top_k_1_is_greedy(params):
    gen = Generator(CFG, params)
    sp = SamplingParams.make(1.0, 0, 1.0)
    a = gen.generate(PROMPTS, 16, sp, seed=1).tokens
    assert a == gen.generate(PROMPTS, 16, sp, seed=1).tokens
    assert a != gen.generate(PROMPTS, 16, sp, seed=2).tokens
    greedy = gen.generate(PROMPTS, 16).tokens
    assert gen.generate(PROMPTS, 16, SamplingParams.make(1.3, 1, 1.0), seed=5).tokens == greedy
    assert gen.generate(PROMPTS, 16, SamplingParams.make(0.9, 0, 1e-6), seed=5).tokens == greedy


def test_filtered_logits_top_k_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda sp: np.asarray(filtered_logits(logits, sp)[0] > -1e29)  # noqa: E731
    assert keep(SamplingParams.make(1.0, 2, 1.0)).tolist() == [True, True, False, False, False]
    assert keep(SamplingParams.make(1.0, 0, 0.6)).tolist() == [True, True, False, False, False]
    assert keep(SamplingParams.make(1.0, 0, 0.86)).tolist() == [True, True, True, True, False]
    assert keep(SamplingParams.make(1.0, 3, 0.99)).tolist() == [True, True, True, False, False]


def test_prompt_longer_than_cache_is_a_clear_error(params):
    gen = Generator(CFG, params, max_cache=64)
    with pytest.raises(GenerationError, match="exceeds the cache size 64"):
        gen.generate([[1] * 50], 20)
    with pytest.raises(GenerationError, match="empty prompt"):
        gen.generate([[]], 5)
    with pytest.raises(GenerationError, match="max-cache 300 must be between 1 and the model's "
                       "context length 256"):
        Generator(CFG, params, max_cache=300)  # past the context (a Mistral window) is not exact
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.make(1.0, 0, 0.0)


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
