"""Exact speculative sampling: BiTA's tree rejection sampling draws from the base model's own
sampling distribution. 4000 independent rows of one prompt are decoded in one batch; the joint
law of the first generated tokens is compared with the exact autoregressive probabilities by a
chi-square test, with a control showing the test rejects a wrong distribution."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree
from bita_jax.models.config import ModelConfig

V = 12
CFG = ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
PROMPT = [3, 5, 7]
ROWS = 4000


@pytest.fixture(scope="module")
def setup():
    params = jax.tree.map(lambda x: 3 * x, models.init_params(CFG, jax.random.key(3)))
    # wide init: the random masks' top-k often holds the sampled token, so acceptance happens
    bp = models.init_bita_params(CFG, models.BitaConfig(num_masks=3, init_std=1.0),
                                 jax.random.key(1))
    return params, bp


@jax.jit
def _padded_probs(params, seq, length, temperature):
    """Next-token probabilities after seq[:length] (seq padded to a fixed [1, 8]): one compile."""
    n = seq.shape[1]
    hidden, _ = models.forward(CFG, params, seq, jnp.arange(n)[None],
                               np.tril(np.ones((n, n), bool)))
    logits = models.lm_logits(CFG, params, hidden[0, length - 1])
    return jax.nn.softmax(logits / temperature)


def _next_probs(params, seq, temperature):
    padded = np.zeros((1, 8), np.int32)
    padded[0, : len(seq)] = seq
    return np.asarray(_padded_probs(params, padded, len(seq), temperature), np.float64)


def _exact_pairs(params, temperature):
    """P(t1, t2) and P(t2, t3) (t1 summed out) under plain autoregressive sampling."""
    p1 = _next_probs(params, PROMPT, temperature)
    first = np.zeros((V, V))
    second = np.zeros((V, V))
    for a in range(V):
        p2 = _next_probs(params, PROMPT + [a], temperature)
        first[a] = p1[a] * p2
        for b in range(V):
            second[b] += p1[a] * p2[b] * _next_probs(params, PROMPT + [a, b], temperature)
    return first, second


def _chi2(samples, expected_probs):
    counts = collections.Counter(samples)
    obs = np.array([[counts[(i, j)] for j in range(V)] for i in range(V)], float)
    exp = expected_probs * len(samples)
    keep = exp >= 5
    stat = float(((obs - exp) ** 2 / exp)[keep].sum())
    df = int(keep.sum()) - 1
    z = 3.719  # one-sided p = 1e-4 (Wilson-Hilferty)
    critical = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    return stat, critical


@pytest.mark.parametrize("tree_name", ["upper-triangle", "chain"])
def test_bita_sampling_matches_autoregressive_law(setup, tree_name):
    params, bp = setup
    sp = SamplingParams.make(1.0, 0, 1.0)
    result = BitaGenerator(CFG, params, bp, Tree.make(tree_name, 3)).generate(
        [PROMPT] * ROWS, 4, sp, seed=11)
    tokens = result.tokens
    assert all(len(t) == 4 for t in tokens)
    assert result.tokens_per_step > 1.02  # drafts really were accepted (measured 1.05 to 1.2)
    first, second = _exact_pairs(params, 1.0)
    for samples, law in (([(t[0], t[1]) for t in tokens], first),
                         ([(t[1], t[2]) for t in tokens], second)):
        stat, critical = _chi2(samples, law)
        assert stat < critical, (stat, critical)
    # The same test rejects a wrong law (temperature 0.7): it has the power to fail.
    wrong_first, _ = _exact_pairs(params, 0.7)
    stat, critical = _chi2([(t[0], t[1]) for t in tokens], wrong_first)
    assert stat > critical


def test_plain_sampling_matches_too(setup):
    params, _ = setup
    tokens = Generator(CFG, params).generate([PROMPT] * ROWS, 2, SamplingParams.make(1.0, 0, 1.0),
                                             seed=5).tokens
    first, _ = _exact_pairs(params, 1.0)
    stat, critical = _chi2([(t[0], t[1]) for t in tokens], first)
    assert stat < critical
