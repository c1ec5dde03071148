"""The adapter's n-gram table: built by hand, the device lookup against its host twin, the
switch from prompt lookup, lossless decoding with it, and the replay that `--tree auto` runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding import lookup, ngram
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.engine import TRACES
from bita_jax.decoding.tree import Tree
from bita_jax.eval import auto_tree, tree_select
from tests.test_decode import FALCON, LLAMA, PROMPTS
from tests.test_lookup import check_eos_inside_an_accepted_run

E = ngram.EMPTY


def _host(table, tokens, num):
    """The table's drafts for one row whose history is `tokens` (the newest last)."""
    h = np.asarray(tokens, np.int64)[None, :]
    out, found = ngram.table_drafts(table, h, np.asarray([len(tokens) - 1]), num, xp=np)
    return out[0].tolist(), bool(found[0])


def test_continuations_by_hand():
    # After (2,): (3, 1, 2, 4), (4,), (3,) -> first token 3 (2 votes against 1), then among the
    # continuations that start with 3 the next is 1, then 2, 4.
    table = ngram.build([[1, 2, 3, 1, 2, 4], [1, 2, 3]], max_order=2, num_tokens=4)
    assert _host(table, [9, 2], 4) == ([3, 1, 2, 4], True)
    # After (1, 2): (3, 1, 2, 4) and (4,), (3,): 3 wins (2 against 1) as above.
    assert _host(table, [1, 2], 4) == ([3, 1, 2, 4], True)
    # After (3, 1) (order 2, seen once) the longest context wins over (1,)'s.
    assert _host(table, [3, 1], 3) == ([2, 4, E], True)
    # After (4,): nothing ever followed it; after (7,): never seen.
    assert _host(table, [4], 2) == ([E, E], False)
    assert _host(table, [7], 2) == ([E, E], False)
    # A tie (after (5,): 6 and 7 once each) goes to the smaller token id.
    assert _host(ngram.build([[5, 7], [5, 6]], max_order=1), [5], 1) == ([6], True)
    # Fewer stored tokens than asked: the rest are EMPTY.
    assert _host(table, [9, 2], 6) == ([3, 1, 2, 4, E, E], True)


def test_full_tables_drop_contexts_but_stay_correct(monkeypatch):
    """With one probe per context, colliding contexts are dropped: never a wrong hit."""
    monkeypatch.setattr(ngram, "PROBES", 1)
    rng = np.random.default_rng(0)
    vocab = rng.choice(40_000, 300, replace=False)  # scattered ids: hashes that collide
    texts = [vocab[rng.integers(0, 300, 40)].tolist() for _ in range(30)]
    table = ngram.build(texts, max_order=1, num_tokens=1)
    follow = {}
    for t in texts:
        for i in range(len(t) - 1):
            follow.setdefault(t[i], []).append(t[i + 1])
    hits = 0
    for ctx, nxt in follow.items():
        got, found = ngram.table_drafts(table, np.asarray([[ctx]]), np.asarray([0]), 1, xp=np)
        if found[0]:
            counts = np.bincount(nxt)
            assert got[0, 0] == np.flatnonzero(counts == counts.max())[0], ctx
            hits += 1
    # ~300 contexts in 1,024 slots, one probe each: some collide and are dropped
    assert hits == table.num_entries() and 0 < len(follow) - hits < len(follow) // 2


def test_device_lookup_equals_the_host_twin():
    rng = np.random.default_rng(1)
    texts = [rng.integers(0, 12, 30).tolist() for _ in range(20)]
    table = ngram.build(texts)
    device = jax.tree.map(jnp.asarray, table)
    history = rng.integers(0, 14, (6, 24)).astype(np.int32)  # 12, 13: never in the table
    newest = np.asarray([0, 1, 2, 5, 17, 23])
    for num in (1, 3, 5):
        got, found = ngram.table_drafts(device, jnp.asarray(history), jnp.asarray(newest), num)
        for row in range(6):
            assert (np.asarray(got[row]).tolist(), bool(found[row])) == _host(
                table, history[row, : newest[row] + 1], num)
        for ngram_len in (1, 3):
            both = lookup.lookup_drafts(jnp.asarray(history), jnp.asarray(newest), num, ngram_len,
                                        device)
            for row in range(6):
                assert np.asarray(both[row]).tolist() == lookup.host_lookup_drafts(
                    history[row, : newest[row] + 1], num, ngram_len, table).tolist()


def test_prompt_lookup_keeps_its_2gram_matches():
    table = ngram.build([[1, 2, 3, 4, 5], [8, 9, 9, 9]], max_order=2)
    # (1, 2) occurred earlier in the history: prompt lookup's continuation (7), not the table's.
    assert lookup.host_lookup_drafts([1, 2, 7, 1, 2], 1, 3, table).tolist() == [7]
    # Only (2,) occurred earlier (a 1-gram match): the table's (1, 2) -> 3.
    assert lookup.host_lookup_drafts([2, 7, 1, 2], 1, 3, table).tolist() == [3]
    # No match at all: the table's.
    assert lookup.host_lookup_drafts([1, 2], 2, 3, table).tolist() == [3, 4]
    # A 1-gram match whose context the table lacks: prompt lookup's.
    assert lookup.host_lookup_drafts([6, 4, 6], 1, 3, table).tolist() == [4]
    assert lookup.host_lookup_drafts([6, 4, 6], 1, 3, None).tolist() == [4]


def test_save_load_round_trip(tmp_path):
    table = ngram.build([[1, 2, 3, 1, 2, 4]])
    ngram.save(tmp_path, table)
    back = ngram.load(tmp_path)
    for a, b in zip(table.contexts + table.drafts, back.contexts + back.drafts):
        np.testing.assert_array_equal(a, b)
    assert ngram.load(tmp_path / "missing") is None and ngram.load(None) is None
    np.savez(tmp_path / ngram.FILE, contexts_2=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="not an n-gram table"):
        ngram.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# Decoding with the table.


@pytest.fixture(scope="module", params=[LLAMA, FALCON], ids=["llama", "falcon"])
def setup(request):
    cfg = request.param
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(3)))
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=2), jax.random.key(5))
    # The table of the model's greedy answers to these prompts (longer than the tests decode):
    # contexts it will meet again, so its drafts must be accepted. (A random model's answers to
    # other prompts predict little: that is the trained adapter's data, not this mechanism.)
    table = ngram.build(Generator(cfg, params).generate(PROMPTS, 60).tokens)
    return cfg, params, bp, table


@pytest.mark.parametrize("tree_name", ["chain@1+lookup:3", "upper-triangle:2+lookup:4:2"])
def test_table_drafts_are_lossless_and_accepted(setup, tree_name):
    cfg, params, bp, table = setup
    tree = Tree.make(tree_name, 2)
    for prompts, n in ((PROMPTS, 48), (PROMPTS[2:3], 29)):  # batch 4 (mixed lengths), batch 1
        want = Generator(cfg, params).generate(prompts, n).tokens
        plain = BitaGenerator(cfg, params, bp, tree).generate(prompts, n)
        with_table = BitaGenerator(cfg, params, bp, tree, ngram_table=table).generate(prompts, n)
        assert plain.tokens == want and with_table.tokens == want
        # the table drafted what prompt lookup could not: fewer steps for the same tokens
        assert sum(with_table.row_steps) < sum(plain.row_steps), (tree_name, n)


def test_eos_inside_a_run_accepted_from_the_table(setup):
    """An EOS inside a step that accepted table drafts past the mask chain (prompt lookup
    limited to 1-grams, so the table drafts wherever it knows the context): the row stops
    right at it, as plain greedy does."""
    cfg, params, bp, _ = setup
    eos_free = Generator(cfg, params, eos_ids=()).generate(PROMPTS, 40).tokens
    table = ngram.build(eos_free)  # the answers themselves: long accepted table runs
    tree = Tree.make("chain@1+lookup:5:1", 2)
    check_eos_inside_an_accepted_run(cfg, params, bp, tree, PROMPTS, 40, min_emitted=3,
                                     ngram_table=table)


def test_table_step_compiles_once(setup):
    cfg, params, bp, table = setup
    cfg = cfg.replace(rope_theta=4321.0)
    tree = Tree.make("chain@1+lookup:3", 2)
    gen = BitaGenerator(cfg, params, bp, tree, ngram_table=table)
    for prompts, n in (([[1, 2, 3], [4, 5]], 10), ([[9, 8, 7, 6, 5, 4], [1]], 40)):
        assert gen.generate(prompts, n).tokens == Generator(cfg, params).generate(prompts,
                                                                                  n).tokens
    assert TRACES[("bita", cfg, tree)] == 1


def test_replay_with_the_table_predicts_real_decoding(setup, tmp_path):
    """`--tree auto`'s replay with the adapter's table counts the steps decoding takes, and
    `auto_tree.load_acceptance` attaches the table saved beside the statistics."""
    cfg, params, bp, table = setup
    tree = Tree.make("chain@1+lookup:3", 2)
    got = BitaGenerator(cfg, params, bp, tree, ngram_table=table).generate(PROMPTS, 48)
    stats = tree_select.rank_stats(cfg, params, bp, list(zip(PROMPTS, got.tokens)))
    auto_tree.save_acceptance(tmp_path, stats)
    ngram.save(tmp_path, table)
    loaded = auto_tree.load_acceptance(tmp_path)
    assert loaded.ngram is not None
    tokens, steps = tree_select.replay(tree, loaded)
    assert (tokens, steps) == (sum(len(t) - 1 for t in got.tokens), sum(got.row_steps))
    without = tree_select.replay(tree, tree_select.RankStats(stats.ranks, stats.max_rank,
                                                             stats.texts))
    assert without[1] > steps  # and the replay without it counts more steps
