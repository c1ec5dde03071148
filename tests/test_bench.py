"""Benchmark and tree selection on a tiny model: results.json, losslessness, the acceptance
formulas by hand, the replay predictor == real decoding, the choice by predicted tokens/s."""

import json
import math

import jax
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding import dynamic_tree
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree, TreeError
from bita_jax.eval import bench, tree_select
from bita_jax.models.config import ModelConfig

CFG = ModelConfig(arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                  eos_token_ids=(96,))
PROMPTS = [[5, 17, 33, 2, 80], [44], [9, 10, 11]]
# Trees so that selection has a choice, one with a retrieval branch (its replay looks drafts up
# in the text), one dynamic (its replay picks nodes from the masks' top log-probabilities); each
# BiTA engine costs a ~10 s compile.
TREES = ["upper-triangle:3-pruned", "chain@1", "chain@1+lookup:4", "dynamic:3:3@2"]
MAX_NEW = 40


@pytest.fixture(scope="module")
def setup():
    """A nearly-bigram model (residual branches scaled down, so greedy text falls into short
    cycles) and masks embedded as tokens of such a cycle: drafts are often right, so acceptance
    is far from 0 and the predictors are tested on something real. `random:` masks on top."""
    params = models.init_params(CFG, jax.random.key(3))
    layers = params["layers"]
    layers["attn"]["o_proj"]["kernel"] = 0.05 * layers["attn"]["o_proj"]["kernel"]
    layers["mlp"]["down_proj"]["kernel"] = 0.05 * layers["mlp"]["down_proj"]["kernel"]
    bp = models.init_bita_params(CFG, models.BitaConfig(num_masks=3), jax.random.key(0))
    emb = params["embed"]["embedding"]
    bp["mask_embed"] = emb[np.array([10, 83, 41])]  # mask k drafts what follows token c_k
    trees = [bench.make_tree(n, 3) for n in TREES]
    results = bench.run_bench(CFG, params, bp, trees, PROMPTS, MAX_NEW)
    return params, bp, trees, results


def test_results_json_and_lossless(setup, tmp_path):
    *_, results = setup
    path = bench.write_results(tmp_path / "run", results)
    data = json.loads(path.read_text())
    assert set(data["trees"]) == set(TREES)
    for name, t in data["trees"].items():
        s = t["summary"]
        for key in ("tokens_per_step", "speedup", "identical", "prompts", "tokens_per_second",
                    "greedy_tokens_per_second", "seconds", "steps", "new_tokens"):
            assert key in s, (name, key)
        assert s["identical"] == s["prompts"] == len(PROMPTS)  # lossless
        rows = [r["trees"][name] for r in data["rows"]]
        greedy_rows = [r["greedy"] for r in data["rows"]]
        assert s["steps"] == sum(r["steps"] for r in rows)
        assert s["new_tokens"] == sum(r["new_tokens"] for r in rows)
        assert s["seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
        assert s["greedy_seconds"] == pytest.approx(sum(r["seconds"] for r in greedy_rows))
        # the prefill's token is no step's: tokens/step = (new tokens - prompts) / steps
        assert s["tokens_per_step"] == pytest.approx((s["new_tokens"] - len(PROMPTS)) / s["steps"])
        assert s["speedup"] == pytest.approx(s["greedy_seconds"] / s["seconds"])
        assert s["tokens_per_second"] == pytest.approx(s["new_tokens"] / s["seconds"])
        for r in rows:
            assert r["tokens_per_step"] == pytest.approx((r["new_tokens"] - 1) / r["steps"])
    assert data["greedy"]["summary"]["tokens_per_step"] == 1.0
    assert len(data["rows"]) == len(PROMPTS)
    row = data["rows"][0]
    assert row["greedy"]["tokens"] and "tokens" not in row["trees"][TREES[0]]
    assert all(r["trees"][n]["identical"] for r in data["rows"] for n in TREES)
    assert data["trees"]["upper-triangle:3-pruned"]["step_tokens"] == 1 + 6 + 3 * 3
    assert data["trees"]["chain@1"]["step_tokens"] == 1 + 1 + 2 * 1
    table = bench.markdown_table(results)
    assert table.count("\n") == 2 + len(TREES) and "| plain greedy |" in table
    # The construction makes drafting work: the check below is not about 1 token per step.
    assert results["trees"]["upper-triangle:3-pruned"]["summary"]["tokens_per_step"] > 1.2


def test_replay_predicts_real_decoding(setup):
    params, bp, trees, results = setup
    greedy = [r["greedy"]["tokens"] for r in results["rows"]]
    stats = tree_select.rank_stats(CFG, params, bp, list(zip(PROMPTS, greedy)))
    assert stats.num_masks == 3 and sum(len(r) for r in stats.ranks) == sum(
        len(g) - 1 for g in greedy)
    assert [len(g) for _, g in stats.texts] == [len(g) for g in greedy]  # kept for lookup
    assert [lp.shape for lp in stats.top_logp] == [r.shape + (tree_select.TOP_LOGP,)
                                                   for r in stats.ranks]
    replayed = {}
    for t in trees:
        tokens, steps = tree_select.replay(t, stats)
        rows = [r["trees"][t.name] for r in results["rows"]]
        assert steps == sum(r["steps"] for r in rows), t.name
        assert tokens == sum(r["new_tokens"] - 1 for r in rows), t.name
        replayed[t.name] = steps
    # the cyclic text makes the lookup branch win often: fewer steps than its tree alone
    assert replayed["chain@1+lookup:4"] < replayed["chain@1"]
    with pytest.raises(TreeError, match="retrieval branch"):  # ranks without their texts
        tree_select.replay(trees[2], tree_select.RankStats(stats.ranks, stats.max_rank))
    with pytest.raises(TreeError, match="is dynamic"):  # ranks without the log-probabilities
        tree_select.replay(trees[3], tree_select.RankStats(stats.ranks, stats.max_rank))



def test_dynamic_replay_predicts_real_decoding():
    """A dynamic tree whose nodes change from step to step (sharper logits than the module's
    model: every weight x6, then nearly bigram): the replay picks each step's nodes from the
    top log-probabilities as decoding does, so it counts the same steps and tokens."""
    params = jax.tree.map(lambda x: 6 * x, models.init_params(CFG, jax.random.key(3)))
    layers = params["layers"]
    layers["attn"]["o_proj"]["kernel"] = 0.05 * layers["attn"]["o_proj"]["kernel"]
    layers["mlp"]["down_proj"]["kernel"] = 0.05 * layers["mlp"]["down_proj"]["kernel"]
    bp = models.init_bita_params(CFG, models.BitaConfig(num_masks=3), jax.random.key(0))
    bp["mask_embed"] = params["embed"]["embedding"][np.array([10, 83, 41])]
    tree = Tree.make("dynamic:5", 3)
    greedy = Generator(CFG, params).generate(PROMPTS, MAX_NEW, SamplingParams.greedy()).tokens
    got = BitaGenerator(CFG, params, bp, tree).generate(PROMPTS, MAX_NEW, SamplingParams.greedy())
    assert got.tokens == greedy  # lossless
    stats = tree_select.rank_stats(CFG, params, bp, list(zip(PROMPTS, greedy)))
    tokens, steps = tree_select.replay(tree, stats)
    assert (tokens, steps) == (sum(len(t) - 1 for t in got.tokens), sum(got.row_steps))
    assert steps < tokens  # drafts were accepted (measured: 91 tokens in 77 steps)
    picks = {tuple(sorted(n)) for lp in stats.top_logp for n in tree_select.dynamic_nodes(tree, lp)}
    assert len(picks) > 1  # the nodes really vary (measured: 13 different sets)


def test_expected_accepted_by_hand():
    probs = np.array([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]])
    chain = Tree.make("chain", 2)
    assert tree_select.expected_accepted(chain.paths, probs) == pytest.approx(0.5 + 0.5 * 0.4)
    # upper-triangle:2 for M = 2: nodes (0,), (1,), (0, 0).
    ut = Tree.make("upper-triangle:2", 2)
    assert tree_select.expected_accepted(ut.paths, probs) == pytest.approx(0.5 + 0.3 + 0.5 * 0.4)
    # Levels or ranks beyond the table are never accepted.
    assert tree_select.expected_accepted(((0,), (0, 0), (0, 0, 0)), probs) == pytest.approx(0.7)
    assert tree_select.expected_accepted(((5,),), probs) == 0.0
    stats = tree_select.RankStats([np.array([[0, 0], [0, 2], [1, 0], [2, 1]], np.int32)], 2)
    np.testing.assert_allclose(stats.probs(), [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    assert tree_select.predicted_tokens_per_step(chain, stats, "independent") == pytest.approx(
        1 + 0.5 + 0.25)


def test_replay_by_hand():
    # tgt has 7 tokens -> anchors 0..5; rows: ranks of tgt[a+1], tgt[a+2] under masks 0, 1.
    ranks = np.array([[0, 0], [0, 0], [5, 5], [5, 5], [0, 1], [0, -1]], np.int32)
    stats = tree_select.RankStats([ranks], 8)
    chain = Tree.make("chain", 2)
    # The first step holds no mask drafts (anchor 0's hits are unused): the bonus alone ->
    # anchor 1: accept 2 + bonus -> anchor 4: accept 1 + bonus -> emitted 7: done.
    assert tree_select.replay(chain, stats) == (6, 3)
    # A pruned chain: the childless node (0, 0) takes its parent's group shifted by one mask:
    # after anchor 1 the drafts come from anchor 3 with mask 1 only (rank 5): a miss; then
    # anchor 5 accepts 1, of which only the last token of the text is emitted.
    pruned = Tree.make("chain-pruned", 2)
    assert tree_select.replay(pruned, stats) == (6, 4)


def test_dynamic_replay_by_hand():
    # dynamic:2:2@2 (2 nodes among the paths of depth <= 2 and ranks < 2): candidates (0,),
    # (1,), (0, 0), (0, 1), (1, 0), (1, 1). At each anchor the 2 most probable paths.
    tree = Tree.make("dynamic:2:2@2", 2)
    sure = np.log([[0.9, 0.1], [0.9, 0.1]])  # (0,) 0.9, (0, 0) 0.81: the top-1 chain
    split = np.log([[0.5, 0.5], [0.9, 0.1]])  # (0,) and (1,) 0.5 each, (0, 0) 0.45
    top_logp = np.stack([sure, sure, split, sure, sure, sure]).astype(np.float32)
    cand = [dynamic_tree.candidates(2, 2).paths[j] for j in
            tree_select.dynamic_nodes(tree, top_logp[2:3])[0]]
    assert cand == [(0,), (1,)]
    ranks = np.array([[0, 0], [0, 0], [1, 0], [5, 5], [0, 0], [0, 0]], np.int32)
    stats = tree_select.RankStats([ranks], 8, None, [top_logp])
    # first step: the bonus alone -> anchor 1 (chain): accept 2 + bonus -> anchor 4 (chain):
    # accept 2, of which 2 tokens are left -> done.
    assert tree_select.replay(tree, stats) == (6, 3)
    # anchor 1 split instead: (1,) matches rank 1 (the chain would not), its child is not in
    # the tree: accept 1 + bonus -> anchor 3: a miss -> anchor 4: accept 2, 2 tokens left.
    ranks[1] = [1, 0]
    stats.top_logp[0][1] = split
    assert tree_select.replay(tree, stats) == (6, 4)


def test_rank_stats_by_position_by_hand():
    # Two texts: anchors 0..4 and 0..1; buckets of 2 positions: [0, 2), [2, 4), [4, 6).
    stats = tree_select.RankStats([np.array([[0, 3], [7, 0], [0, 0], [1, 8], [0, -1]], np.int32),
                                   np.array([[0, 0], [2, -1]], np.int32)], 8)
    rows = stats.by_position(width=2)
    assert [r["positions"] for r in rows] == [[0, 2], [2, 4], [4, 6]]
    assert [r["anchors"] for r in rows] == [4, 2, 1]
    assert rows[0]["top1"] == [0.5, 0.6667] and rows[0]["top5"] == [0.75, 1.0]
    assert rows[1]["top1"] == [0.5, 0.5] and rows[1]["top5"] == [1.0, 0.5]
    assert rows[2]["top1"] == [1.0, None]  # no label for mask 1 at the text's end
    assert stats.to_dict()["by_position"] == stats.by_position()
    assert "| 4-5 | 1 | 1.000 / 1.000 | - |" in tree_select.position_table(stats, width=2)


def test_selection_picks_best_tokens_per_second():
    stats = tree_select.RankStats([np.array([[0, 0, 1]] * 6 + [[1, 0, 0]] * 4, np.int32)], 8)
    trees = [bench.make_tree(n, 3) for n in ("chain", "chain@1", "upper-triangle:2@2")]
    # Independent probs: p0 = (.6, .4), p1 = (1.0), p2 = (.4, .6).
    times = {"chain": 0.030, "chain@1": 0.011, "upper-triangle:2@2": 0.020}
    preds = tree_select.predict(trees, stats, times, 0.010, method="independent")
    by = {p.tree: p for p in preds}
    assert by["chain"].tokens_per_step == pytest.approx(1 + 0.6 + 0.6 + 0.24)
    assert by["chain@1"].tokens_per_step == pytest.approx(1.6)
    assert by["upper-triangle:2@2"].tokens_per_step == pytest.approx(1 + 0.6 + 0.4 + 0.6)
    # tokens/s: chain 2.44/30ms = 81, chain@1 1.6/11ms = 145, ut 2.6/20ms = 130.
    assert tree_select.select(preds).tree == "chain@1"
    assert by["chain@1"].speedup == pytest.approx(1.6 * 10 / 11)
    times["chain@1"] = 0.013  # 123 tok/s: now the small tree wins
    preds = tree_select.predict(trees, stats, times, 0.010, method="independent")
    assert tree_select.select(preds).tree == "upper-triangle:2@2"
    assert "**upper-triangle:2@2**" in tree_select.table(preds, chosen="upper-triangle:2@2")


def test_tree_names():
    assert bench.make_tree("chain@2", 3).num_masks == 2
    assert bench.make_tree("chain@2", 3).paths == ((0,), (0, 0))
    assert bench.make_tree("upper-triangle:3-pruned", 3).pruned
    with pytest.raises(TreeError):
        bench.make_tree("chain@4", 3)
    names = bench.default_candidates(3)
    assert names[:3] == ["chain@1", "chain@2", "chain"] and "upper-triangle" in names
    assert len(set(names)) == len(names) == 10
    assert bench.default_candidates(1)[0] == "chain"  # no chain@D below one mask
    assert bench.make_tree("chain", 3).layout.num_tokens == 1 + 3 + 4 * 3
    assert bench.make_tree("chain@2", 3).layout.num_tokens == 1 + 2 + 3 * 2
    # trained-on sources: the held-out half for the role; others were never trained on: all
    assert bench.default_split("sharegpt") == "selection"
    assert bench.default_split("code-alpaca", "test") == "test"
    assert bench.default_split("humaneval", "test") == bench.default_split("x.jsonl") == "all"
    with pytest.raises(ValueError, match="role must be one of selection, test"):
        bench.default_split("sharegpt", "heldout")


def test_step_seconds_and_select_tree(setup):
    """The chosen tree is the candidate with the highest predicted tokens/s, and each prediction
    is what its parts say: replay of the measured statistics (== the bench's real decoding),
    the independent estimate, and the measured step times."""
    params, bp, trees, results = setup
    greedy = [r["greedy"]["tokens"] for r in results["rows"]]
    sel = bench.select_tree(CFG, params, bp, trees, PROMPTS, MAX_NEW, greedy_tokens=greedy,
                            timing_steps=4, repeats=1)
    assert [p.tree for p in sel.predictions] == TREES
    best = max(sel.predictions, key=lambda p: p.tokens_per_second)
    assert sel.chosen is best
    assert len({p.tokens_per_second for p in sel.predictions}) == len(TREES)  # a real choice
    for t, p in zip(trees, sel.predictions):
        assert p.step_tokens == t.layout.num_tokens
        tokens, steps = tree_select.replay(t, sel.stats)
        assert p.tokens_per_step == p.tokens_per_step_replay == tokens / steps
        measured = results["trees"][t.name]["summary"]["tokens_per_step"]
        assert p.tokens_per_step == pytest.approx(measured), t.name
        if t.dynamic:  # no independent estimate: its nodes follow the drafts' probabilities
            assert math.isnan(p.tokens_per_step_independent)
        else:
            assert p.tokens_per_step_independent == pytest.approx(
                tree_select.predicted_tokens_per_step(t, sel.stats, "independent"))
        assert 0 < p.step_ms < 1e4 and 0 < p.ar_step_ms < 1e4
        assert p.tokens_per_second == pytest.approx(1e3 * p.tokens_per_step / p.step_ms)
        assert p.speedup == pytest.approx(p.tokens_per_step * p.ar_step_ms / p.step_ms)
    assert len({p.ar_step_ms for p in sel.predictions}) == 1  # one greedy timing for all
    d = sel.to_dict()
    assert d["chosen"] == best.tree and len(d["stats"]["top1"]) == 3
    assert [q["tree"] for q in d["predictions"]] == TREES
    json.dumps(d)
