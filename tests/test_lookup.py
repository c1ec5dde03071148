"""Retrieval drafts: the on-device n-gram lookup by hand, and BiTA with a lookup branch lossless
against plain greedy (random adapters, LLaMA and Falcon, batch 1 and 4, an EOS inside an accepted
lookup run), with the branch really accepting tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.engine import TRACES, GenerationError
from bita_jax.decoding.lookup import (
    NO_DRAFT,
    append,
    host_lookup_drafts,
    init_history,
    lookup_drafts,
)
from bita_jax.decoding.tree import LOOKUP, Tree, TreeError
from tests.test_decode import FALCON, LLAMA, PROMPTS


def _lookup(tokens, num, ngram=3, capacity=24):
    """lookup_drafts for one row whose history is `tokens` (the newest last)."""
    history = np.zeros((1, capacity), np.int32)
    history[0, : len(tokens)] = tokens
    got = lookup_drafts(jnp.asarray(history), jnp.asarray([len(tokens) - 1]), num, ngram)
    return np.asarray(got)[0].tolist()


# ---------------------------------------------------------------------------------------------
# The lookup by hand.


def test_longest_ngram_wins_over_a_later_shorter_match():
    # last 3 tokens (4, 5, 6) occurred at 0..2 (followed by 7, 8); "6" alone occurs later (-> 9)
    assert _lookup([4, 5, 6, 7, 8, 1, 6, 9, 2, 4, 5, 6], 2) == [7, 8]
    # with n-grams of at most 1 token the latest "6" wins
    assert _lookup([4, 5, 6, 7, 8, 1, 6, 9, 2, 4, 5, 6], 2, ngram=1) == [9, 2]


def test_latest_occurrence_wins_and_shorter_ngrams_are_the_fallback():
    # (1, 2) occurs twice: the later one (followed by 30) wins
    assert _lookup([1, 2, 10, 1, 2, 30, 5, 1, 2], 1) == [30]
    # no 3-gram or 2-gram (8, 2) before: the latest "2" is used
    assert _lookup([1, 2, 10, 1, 2, 30, 5, 8, 2], 3) == [30, 5, 8]


def test_no_match_drafts_nothing():
    assert _lookup([1, 2, 3, 4], 3) == [NO_DRAFT] * 3
    assert _lookup([7], 2) == [NO_DRAFT] * 2  # a one-token history has nothing before it


def test_match_at_the_end_of_the_buffer_continues_its_period():
    # the latest earlier "5" is the token just before: a run of 5s drafts more 5s
    assert _lookup([1, 5, 5], 4) == [5, 5, 5, 5]
    # (7, 8, 7) ends two tokens before the newest: period 2
    assert _lookup([3, 7, 8, 7, 8, 7], 5) == [8, 7, 8, 7, 8]
    # the whole continuation known: no wrap-around
    assert _lookup([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    # a history filling the whole buffer
    assert _lookup([4, 6] * 4, 3, capacity=8) == [4, 6, 4]


def test_rows_are_independent_and_newest_bounds_the_search():
    history = jnp.asarray([[1, 2, 3, 1, 2, 9, 9, 9], [5, 6, 5, 6, 7, 0, 0, 0]])
    got = lookup_drafts(history, jnp.asarray([4, 3]), 2, 2)
    # row 0 sees only 1, 2, 3, 1, 2 (the 9s are past its newest token); row 1 sees 5, 6, 5, 6
    assert np.asarray(got).tolist() == [[3, 1], [5, 6]]


def test_host_lookup_equals_the_device_lookup():
    """The numpy twin that `--tree auto` replays with drafts what the device drafts, on the
    cases above and on random histories over a few tokens (many repeats, runs, no match)."""
    cases = [[4, 5, 6, 7, 8, 1, 6, 9, 2, 4, 5, 6], [1, 2, 10, 1, 2, 30, 5, 8, 2], [1, 2, 3, 4],
             [7], [1, 5, 5], [3, 7, 8, 7, 8, 7], [1, 2, 3, 9, 1, 2]]
    rng = np.random.default_rng(0)
    cases += [rng.integers(0, vocab, int(rng.integers(1, 24))).tolist()
              for vocab in (2, 3, 5, 40) for _ in range(25)]
    for tokens in cases:
        for num, ngram in ((1, 1), (3, 2), (4, 3), (8, 3)):
            want = _lookup(tokens, num, ngram)
            assert host_lookup_drafts(tokens, num, ngram).tolist() == want, (tokens, num, ngram)


def test_history_is_prompt_first_token_then_appended_tokens():
    prompt = jnp.asarray([[1, 2, 3], [4, 0, 0]])
    history = init_history(prompt, jnp.asarray([3, 1]), jnp.asarray([7, 8]), 8)
    assert np.asarray(history).tolist() == [[1, 2, 3, 7, 0, 0, 0, 0], [4, 8, 0, 0, 0, 0, 0, 0]]
    history = append(history, jnp.asarray([3, 1]), jnp.asarray([[5, 6, 9], [2, 2, 2]]),
                     jnp.asarray([2, 3]))
    assert np.asarray(history).tolist() == [[1, 2, 3, 7, 5, 6, 0, 0], [4, 8, 2, 2, 2, 0, 0, 0]]


def test_tree_names_and_layout():
    tree = Tree.make("chain@1+lookup:4", 3)
    assert (tree.name, tree.lookup, tree.lookup_ngram, tree.num_masks) == (
        "chain@1+lookup:4", 4, 3, 1)
    lay = tree.layout
    # rows: 0 root, 1 mask node (0,), 2-5 lookup chain, then a 1-mask group under each of the 6
    assert lay.num_tokens == 1 + 5 + 6 and lay.max_depth == 4 and lay.lookup_nodes == 4
    np.testing.assert_array_equal(lay.node_rank, [0] + [LOOKUP] * 4)
    np.testing.assert_array_equal(lay.node_parent_row, [0, 0, 2, 3, 4])
    np.testing.assert_array_equal(lay.path_rows[5], [0, 2, 3, 4, 5])
    np.testing.assert_array_equal(lay.endpoint_group, [0, 1, 2, 3, 4, 5])
    assert lay.mask[5].tolist() == [True, False, True, True, True, True] + [False] * 6
    assert lay.mask[11].tolist() == [True, False, True, True, True, True] + [False] * 5 + [True]
    assert Tree.make("upper-triangle:3+lookup:5:2", 3).lookup_ngram == 2
    for bad in ("chain+lookup", "chain+lookup:0", "chain+lookup:x", "chain+retrieve:4"):
        with pytest.raises(TreeError, match="lookup:L"):
            Tree.make(bad, 3)
    # a 16-deep lookup chain would write past the cache's headroom
    cfg = LLAMA
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=1), jax.random.key(0))
    with pytest.raises(GenerationError, match="16 nodes deep"):
        BitaGenerator(cfg, models.init_params(cfg, jax.random.key(0)), bp,
                      Tree.make("chain+lookup:16", 1))


# ---------------------------------------------------------------------------------------------
# Lossless decoding with a lookup branch.


@pytest.fixture(scope="module", params=[LLAMA, FALCON], ids=["llama", "falcon"])
def setup(request):
    cfg = request.param
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(3)))
    return cfg, params


LOOKUP_TREES = ["chain@1+lookup:4", "upper-triangle:3+lookup:6:2", "chain-pruned@2+lookup:3:1"]


@pytest.mark.parametrize("tree_name", LOOKUP_TREES)
def test_lookup_branch_is_lossless_and_accepts(setup, tree_name):
    cfg, params = setup
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=3), jax.random.key(5))
    tree = Tree.make(tree_name, 3)
    mask_depth = tree.num_masks
    deeper_than_masks = 0
    cases = [(PROMPTS, 50)] + [(PROMPTS[3:4], 23)] * (tree_name == LOOKUP_TREES[0])
    for prompts, n in cases:  # batch 4 (mixed lengths), and 1 for the first tree
        want = Generator(cfg, params).generate(prompts, n).tokens
        got = BitaGenerator(cfg, params, bp, tree).generate(prompts, n)
        assert got.tokens == want, (tree_name, n)
        for hist, steps, toks in zip(got.step_hist, got.row_steps, got.tokens):
            assert len(hist) == tree.layout.max_depth + 2 and sum(hist) == steps
            assert sum(k * c for k, c in enumerate(hist)) == len(toks) - 1
            deeper_than_masks += sum(hist[mask_depth + 2:])
    # Steps that emitted more tokens than the mask nodes can give (every tree here has a lookup
    # branch deeper than its masks): the lookup branch accepted.
    assert deeper_than_masks > 0


def _steps(gen, prompts, max_new):
    """Per row, the number of tokens each step emitted (from the streaming callback)."""
    seen, counts = None, [[] for _ in prompts]

    def on_tokens(tokens):
        nonlocal seen
        if seen is not None:
            for row, (old, new) in enumerate(zip(seen, tokens)):
                if len(new) > len(old):
                    counts[row].append(len(new) - len(old))
        seen = [list(t) for t in tokens]

    return gen.generate(prompts, max_new, on_tokens=on_tokens).tokens, counts


def test_eos_inside_an_accepted_lookup_run_stops_exactly(setup):
    """An EOS emitted inside a step that accepted lookup drafts beyond the mask chain, and not as
    its last token: the row stops right at it, equal to plain greedy with that EOS."""
    cfg, params = setup
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=1), jax.random.key(5))
    tree = Tree.make("chain+lookup:6", 1)
    # Prompts that end inside their own greedy text: where that text repeats itself, the lookup
    # drafts tokens that appeared in the prompt but not yet in the output.
    greedy = Generator(cfg, params, eos_ids=()).generate(PROMPTS, 40).tokens
    prompts = [p + g[:j] for p, g in zip(PROMPTS, greedy) for j in range(4, 40, 3)]  # batch 48
    # 3+ tokens: past the 1-mask chain, so a lookup node was accepted
    check_eos_inside_an_accepted_run(cfg, params, bp, tree, prompts, 40, min_emitted=3)


def check_eos_inside_an_accepted_run(cfg, params, bp, tree, prompts, max_new, min_emitted=2,
                                     **engine_kwargs):
    """Finds a token that a BiTA step emitted before its last (bonus) token, in a step that
    emitted at least `min_emitted`, and the token's first occurrence in its row; makes it the
    EOS: the row must stop right at it, equal to plain greedy with that EOS. `engine_kwargs` go
    to both BiTA engines (e.g. an n-gram table)."""
    free, counts = _steps(BitaGenerator(cfg, params, bp, tree, eos_ids=(), **engine_kwargs),
                          prompts, max_new)
    found = None
    for row, (toks, row_counts) in enumerate(zip(free, counts)):
        index = 1  # the prefill emitted token 0
        for c in row_counts:
            for i in range(index, index + c - 1):  # not the step's last (bonus) token
                if c >= min_emitted and toks[i] not in toks[:i]:
                    found = found or (row, i)
            index += c
    assert found is not None, (free, counts)
    row, index = found
    eos = free[row][index]
    want = Generator(cfg, params, eos_ids=(eos,)).generate(prompts, max_new).tokens
    assert want[row] == free[row][: index + 1]
    got, got_counts = _steps(BitaGenerator(cfg, params, bp, tree, eos_ids=(eos,),
                                           **engine_kwargs), prompts, max_new)
    assert got == want
    assert sum(got_counts[row]) == index  # it stopped in the step that emitted the EOS


def test_lookup_step_compiles_once(setup):
    cfg, params = setup
    cfg = cfg.replace(rope_theta=5432.0)
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=2), jax.random.key(1))
    tree = Tree.make("chain+lookup:5", 2)
    gen = BitaGenerator(cfg, params, bp, tree)
    for prompts, n in (([[1, 2, 3], [4, 5]], 10), ([[9, 8, 7, 6, 5, 4], [1]], 40),
                       ([[3] * 12, [2] * 5], 17)):
        assert gen.generate(prompts, n).tokens == Generator(cfg, params).generate(prompts,
                                                                                  n).tokens
    assert TRACES[("bita", cfg, tree)] == 1
