"""Dynamic trees (issue 13, EAGLE-2 style): the choice of nodes by hand, the per-row layout equal
to a static tree's, and decoding lossless against plain greedy (random adapters, LLaMA and
Falcon, batch 1 and 4, an EOS inside an accepted run), compiled once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding import dynamic_tree
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.engine import TRACES, GenerationError
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree, TreeError
from tests.test_decode import FALCON, LLAMA, PROMPTS
from tests.test_lookup import check_eos_inside_an_accepted_run


def _group_logits(probs_by_level, vocab=10):
    """Logits [1, D, V] whose softmax puts the given probabilities on tokens 0, 1, ... of each
    level (the rest spread evenly)."""
    out = np.zeros((1, len(probs_by_level), vocab), np.float32)
    for lv, probs in enumerate(probs_by_level):
        rest = (1.0 - sum(probs)) / (vocab - len(probs))
        p = np.full(vocab, rest)
        p[: len(probs)] = probs
        out[0, lv] = np.log(p)
    return jnp.asarray(out)


def test_the_most_probable_paths_by_hand():
    # level 0: token 0 at 0.5, token 1 at 0.4; level 1: 0.9, 0.05; level 2: 0.3, 0.3
    logits = _group_logits([[0.5, 0.4], [0.9, 0.05], [0.3, 0.3]])
    paths, tokens = dynamic_tree.select(logits, 5, 2)
    cand = dynamic_tree.candidates(3, 2)
    got = [cand.paths[i] for i in np.asarray(paths)[0]]
    # scores: (0) .5, (1) .4, (0,0) .45, (1,0) .36, (0,0,0)=(0,0,1) .135, (0,1) .025
    assert got == [(0,), (0, 0), (1,), (1, 0), (0, 0, 0)]
    assert np.asarray(tokens)[0].tolist() == [0, 0, 1, 0, 0]  # each node's token at its level


def test_the_choice_is_always_a_tree_parents_first():
    rng = np.random.default_rng(0)
    for n, k, d in ((4, 4, 3), (12, 3, 3), (6, 2, 2), (20, 4, 3)):
        cand = dynamic_tree.candidates(d, k)
        logits = jnp.asarray(rng.normal(0, 3, (16, d, 50)).astype(np.float32))
        logits = logits.at[0].set(0.0)  # a row of exact ties everywhere
        paths, _ = dynamic_tree.select(logits, n, k)
        for row in np.asarray(paths):
            chosen = [cand.paths[i] for i in row]
            assert len(set(chosen)) == n
            for i, p in enumerate(chosen):
                assert len(p) == 1 or p[:-1] in chosen[:i], (chosen, p)


def test_the_row_layout_equals_a_static_trees():
    """Nodes chosen in a static tree's order give that tree's visibility, positions, parents
    and paths (a static tree with a group on every node)."""
    tree = Tree.make("upper-triangle:3", 3)
    static = tree.layout
    cand = dynamic_tree.candidates(3, 3)
    index = {p: i for i, p in enumerate(cand.paths)}
    nodes = sorted(tree.paths, key=lambda p: (len(p), p))
    sel = jnp.asarray([[index[p] for p in nodes]] * 2, jnp.int32)
    rows = dynamic_tree.row_layout(sel, 3, 3)
    np.testing.assert_array_equal(np.asarray(rows.mask[1]), static.mask)
    np.testing.assert_array_equal(np.asarray(rows.offsets[1]), static.offsets)
    np.testing.assert_array_equal(np.asarray(rows.parent_row[0]), static.node_parent_row)
    for endpoint in range(1 + len(nodes)):
        path = dynamic_tree.path_rows(rows, jnp.full((2,), endpoint, jnp.int32), 3)
        depth = int(static.offsets[endpoint])
        assert np.asarray(path)[0, : depth + 1].tolist() == static.path_rows[endpoint][
            : depth + 1].tolist()


def test_tree_names_and_bad_specs():
    t = Tree.make("dynamic:6@2", 3)
    assert (t.dynamic, t.dynamic_top_k, t.num_masks, t.name) == (6, 4, 2, "dynamic:6@2")
    assert t.layout.num_tokens == 1 + 6 + 7 * 2 and t.layout.max_depth == 2
    assert Tree.make("dynamic:2:5", 3).layout.max_depth == 2
    for bad, match in (("dynamic:0", "dynamic:N"), ("dynamic:x", "dynamic:N"),
                       ("dynamic:50:2", "candidate paths"), ("dynamic:4+lookup:3", "lookup"),
                       ("dynamic:4:20", "at most")):
        with pytest.raises(TreeError, match=match):
            Tree.make(bad, 3)


@pytest.fixture(scope="module", params=[LLAMA, FALCON], ids=["llama", "falcon"])
def setup(request):
    cfg = request.param
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(3)))
    bp = models.init_bita_params(cfg, models.BitaConfig(num_prefix=2, num_masks=3),
                                 jax.random.key(5))
    return cfg, params, bp


@pytest.mark.parametrize("tree_name", ["dynamic:4", "dynamic:10:3", "dynamic:1"])
def test_dynamic_trees_are_lossless_and_accept(setup, tree_name):
    cfg, params, bp = setup
    tree = Tree.make(tree_name, 3)
    deep = 0
    cases = [(PROMPTS, 50)] + [(PROMPTS[2:3], 23)] * (tree_name == "dynamic:4")
    for prompts, n in cases:  # batch 4 (mixed lengths), and batch 1 for the first tree
        want = Generator(cfg, params).generate(prompts, n).tokens
        got = BitaGenerator(cfg, params, bp, tree).generate(prompts, n)
        assert got.tokens == want, (tree_name, n)
        for hist, steps, toks in zip(got.step_hist, got.row_steps, got.tokens):
            assert len(hist) == tree.layout.max_depth + 2 and sum(hist) == steps
            assert sum(k * c for k, c in enumerate(hist)) == len(toks) - 1
            deep += sum(hist[2:])  # steps that accepted at least one draft
    assert deep > 0  # the drafts were accepted, not only the bonus tokens


def test_eos_inside_an_accepted_run_stops_exactly(setup):
    """An EOS that a dynamic tree's step emits before its last token: the row stops right at it,
    equal to plain greedy with that EOS."""
    cfg, params, bp = setup
    check_eos_inside_an_accepted_run(cfg, params, bp, Tree.make("dynamic:6", 3), PROMPTS, 40)


def test_dynamic_step_compiles_once_and_refuses_sampling(setup):
    cfg, params, bp = setup
    cfg = cfg.replace(rope_theta=6543.0)
    tree = Tree.make("dynamic:5@2", 3)  # groups of 2 of the adapter's 3 masks
    gen = BitaGenerator(cfg, params, bp, tree)
    for prompts, n in (([[1, 2, 3], [4, 5]], 10), ([[9, 8, 7, 6, 5, 4], [1]], 40),
                       ([[3] * 12, [2] * 5], 17)):
        assert gen.generate(prompts, n).tokens == Generator(cfg, params).generate(prompts,
                                                                                  n).tokens
    assert TRACES[("bita", cfg, tree)] == 1
    with pytest.raises(GenerationError, match="greedily"):
        gen.generate([[1, 2]], 4, SamplingParams.make(temperature=0.7))
