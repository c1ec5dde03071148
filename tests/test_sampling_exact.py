"""Exact speculative sampling: BiTA's tree rejection sampling draws from the base model's own
sampling distribution, the filtered one under top-k / top-p. 4000 independent rows of one prompt
are decoded in one batch; the law of each pair of neighbouring tokens among the first five is
compared with the exact autoregressive probabilities by a chi-square test, with a control showing
the test rejects a wrong law. The first step holds no mask drafts (`bita_prefill`), so the drafts
tested are those of the later steps. Two setups:

  wide    temperature 1, no filter, a random adapter: drafts are accepted now and then.
  bigram  temperature 0.7, top-k 5, top-p 0.9, on a nearly-bigram model whose masks are embedded
          as tokens of the greedy text: drafts are often right, so many rows accept two or more
          drafts in one step, and the law of accepted tokens is tested, not only that of bonus
          tokens.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator, bonus_key, node_key
from bita_jax.decoding.fallback import Fallback
from bita_jax.decoding.sampling import SamplingParams, filtered_logits
from bita_jax.decoding.tree import Tree
from bita_jax.models.config import ModelConfig

V = 12
CFG = ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
PROMPT = [3, 5, 7]
ROWS = 4000
NEW = 5  # tokens per row: the prefill's, the first step's (no drafts), then 3 more
SETTINGS = {  # name: (model, tree, sampling knobs, a wrong law the test must reject)
    "wide": ("wide", "chain", (1.0, 0, 1.0), (0.7, 0, 1.0)),
    "bigram": ("bigram", "upper-triangle", (0.7, 5, 0.9), (0.7, 5, 1.0)),  # wrong: no top-p
}


@pytest.fixture(scope="module")
def setups():
    params = jax.tree.map(lambda x: 3 * x, models.init_params(CFG, jax.random.key(3)))
    # wide init: the random masks' top-k often holds the sampled token, so acceptance happens
    wide = models.init_bita_params(CFG, models.BitaConfig(num_masks=3, init_std=1.0),
                                   jax.random.key(1))
    # Nearly bigram: residual branches scaled down, so a position's logits mostly follow its own
    # token. The first step feeds t1 and emits t2; its mask k then sits at the position of
    # t_{k+2} and drafts t_{k+3}; embedded as the greedy t_{k+2}, it drafts (about) its
    # successor, which is what sampling at T = 0.7 often picks.
    bigram = jax.tree.map(lambda x: x, params)  # new dicts, the same arrays
    layers = bigram["layers"]
    layers["attn"]["o_proj"]["kernel"] = 0.05 * layers["attn"]["o_proj"]["kernel"]
    layers["mlp"]["down_proj"]["kernel"] = 0.05 * layers["mlp"]["down_proj"]["kernel"]
    greedy = []
    for _ in range(4):
        greedy.append(int(np.argmax(_next_probs(bigram, [PROMPT + greedy], (1.0, 0, 1.0))[0])))
    masks = models.init_bita_params(CFG, models.BitaConfig(num_masks=3), jax.random.key(1))
    masks["mask_embed"] = bigram["embed"]["embedding"][np.array(greedy[1:])]
    return {"wide": (params, wide), "bigram": (bigram, masks)}


@jax.jit
def _probs(params, seqs, lengths, sp):
    """Next-token sampling probabilities (filtered as `sp` says) after seqs[i, :lengths[i]]."""
    b, n = seqs.shape
    hidden, _ = models.forward(CFG, params, seqs, jnp.broadcast_to(jnp.arange(n), (b, n)),
                               np.tril(np.ones((n, n), bool)))
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jax.nn.softmax(filtered_logits(models.lm_logits(CFG, params, last), sp), axis=-1)


def _next_probs(params, prefixes, knobs):
    """[len(prefixes), V] float64; the batch is padded to one shape (one compile)."""
    seqs = np.zeros((sum(V**n for n in range(NEW)), len(PROMPT) + NEW), np.int32)
    lengths = np.ones((len(seqs),), np.int32)
    for i, p in enumerate(prefixes):
        seqs[i, : len(p)] = p
        lengths[i] = len(p)
    probs = _probs(params, seqs, lengths, SamplingParams.make(*knobs))
    return np.asarray(probs, np.float64)[: len(prefixes)]


def _exact_pairs(params, knobs):
    """P(t1, t2), P(t2, t3), ..., P(t4, t5) (the other tokens summed out) under plain
    autoregressive sampling: [V, V] each."""
    prefixes = [PROMPT + [int(x) for x in np.unravel_index(i, (V,) * n)] for n in range(NEW)
                for i in range(V**n)]
    probs = _next_probs(params, prefixes, knobs)
    joint, start = np.ones(()), 0
    for n in range(NEW):  # joint [V] * (n + 1) of t1..t_{n+1}
        joint = joint[..., None] * probs[start: start + V**n].reshape((V,) * n + (V,))
        start += V**n
    return [joint.sum(axis=tuple(a for a in range(NEW) if a not in (i, i + 1)))
            for i in range(NEW - 1)]


def _chi2(samples, expected_probs):
    counts = collections.Counter(samples)
    obs = np.array([[counts[(i, j)] for j in range(V)] for i in range(V)], float)
    exp = expected_probs * len(samples)
    keep = exp >= 5
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = 3.719  # one-sided p = 1e-4 (Wilson-Hilferty)
    critical = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    return stat, critical


def _pairs(tokens):
    """The samples of (t1, t2), (t2, t3), ...: one list per pair of neighbours."""
    return [[(t[i], t[i + 1]) for t in tokens] for i in range(len(tokens[0]) - 1)]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_bita_sampling_matches_autoregressive_law(setups, name):
    model, tree_name, knobs, wrong_knobs = SETTINGS[name]
    params, bp = setups[model]
    result = BitaGenerator(CFG, params, bp, Tree.make(tree_name, 3)).generate(
        [PROMPT] * ROWS, NEW, SamplingParams.make(*knobs), seed=11)
    tokens = result.tokens
    assert all(len(t) == NEW for t in tokens)
    hist = np.array(result.step_hist)  # [rows, 5]: steps that emitted 0..4 tokens
    assert (hist.sum(axis=1) == result.row_steps).all()
    assert ((hist * np.arange(5)).sum(axis=1) == NEW - 1).all()  # after the prefill's token
    # Steps that emitted 3 tokens accepted 2 drafts or more (3, cut by max-new-tokens).
    deep = float(np.mean(hist[:, 3] > 0))
    if name == "wide":
        assert result.tokens_per_step > 1.02  # drafts really were accepted (measured 1.04)
    else:  # measured: 1.33 tokens/step, 15% of rows; a random adapter accepts almost nothing
        assert result.tokens_per_step > 1.2 and deep > 0.08, (result.tokens_per_step, deep)
    for samples, law in zip(_pairs(tokens), _exact_pairs(params, knobs)):
        stat, critical = _chi2(samples, law)
        assert stat < critical, (stat, critical)
    # The same test rejects a wrong law (another temperature; the law without top-p): it has
    # the power to fail.
    for samples, law in zip(_pairs(tokens), _exact_pairs(params, wrong_knobs)):
        stat, critical = _chi2(samples, law)
        assert stat > critical, (stat, critical)


def test_sampling_with_plain_steps_between_matches_too(setups):
    """`Fallback` mixing the two kinds of step: tree step 1 loses its window (break-even 3),
    step 2 is plain, step 3 a tree step again (uncounted). Each kind draws from the model's
    own law, so the joint law of the tokens is still the autoregressive one."""
    model, tree_name, knobs, _ = SETTINGS["bigram"]
    params, bp = setups[model]
    gen = BitaGenerator(CFG, params, bp, Tree.make(tree_name, 3),
                        fallback=Fallback(3.0, window=1, pause=1, max_pause=1))
    result = gen.generate([PROMPT] * ROWS, 4, SamplingParams.make(*knobs), seed=12)
    assert all(len(t) == 4 for t in result.tokens)
    assert result.plain_steps == 1
    for samples, law in zip(_pairs(result.tokens), _exact_pairs(params, knobs)):
        stat, critical = _chi2(samples, law)
        assert stat < critical, (stat, critical)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_plain_sampling_matches_too(setups, name):
    model, _, knobs, _ = SETTINGS[name]
    params, _ = setups[model]
    tokens = Generator(CFG, params).generate([PROMPT] * ROWS, NEW, SamplingParams.make(*knobs),
                                             seed=5).tokens
    for samples, law in zip(_pairs(tokens), _exact_pairs(params, knobs)):
        stat, critical = _chi2(samples, law)
        assert stat < critical, (stat, critical)


def test_sampling_keys_are_distinct():
    """Every acceptance draw of a step (level, child) and the bonus draw use their own key, for
    any number of children (custom JSON trees can have hundreds)."""
    rng = jax.random.key(0)
    keys = [node_key(rng, level, j) for level in range(4) for j in range(200)] + [bonus_key(rng)]
    assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}) == len(keys)
