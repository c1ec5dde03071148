"""`--tree auto` (issue 13): acceptance statistics saved beside an adapter, this machine's
step-cost curve measured once and cached, and the tree of most predicted tokens per second."""

import json

import jax
import numpy as np

from bita_jax import models
from bita_jax.checkpoints import model_cache
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.eval import auto_tree, tree_select
from bita_jax.models.config import ModelConfig

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=512)


def _stats(top1: float, seed: int = 0, texts: int = 6, length: int = 60,
           miss_low: int = 1) -> tree_select.RankStats:
    """Ranks where each mask's true token is the top-1 with probability `top1`, else a rank in
    [miss_low, 8] (8: "8 or worse", in no tree)."""
    rng = np.random.default_rng(seed)
    ranks = []
    for _ in range(texts):
        r = np.where(rng.random((length, 3)) < top1, 0, rng.integers(miss_low, 9, (length, 3)))
        ranks.append(r.astype(np.int32))
    return tree_select.RankStats(ranks)


def test_acceptance_round_trips_beside_the_adapter(tmp_path):
    stats = _stats(0.5)
    path = auto_tree.save_acceptance(tmp_path, stats)
    assert path.name == "acceptance.npz"
    back = auto_tree.load_acceptance(tmp_path)
    assert back.max_rank == stats.max_rank and len(back.ranks) == len(stats.ranks)
    for a, b in zip(back.ranks, stats.ranks):
        np.testing.assert_array_equal(a, b)
    assert auto_tree.load_acceptance(tmp_path / "none") is None
    assert auto_tree.load_acceptance(None) is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "acceptance.npz").write_bytes(b"not a zip")
    assert auto_tree.load_acceptance(tmp_path / "bad") is None  # a warning, the default tree


def test_the_choice_follows_the_cost_curve():
    """Good drafts: on a flat curve (an accelerator) the largest tree wins; on a curve that
    climbs with the step tokens (a small CPU) a small one does; with drafts that never hit,
    the smallest step."""
    trees = auto_tree.candidate_trees(3)
    names = [t.name for t in trees]
    assert names[0] == "chain@1" and "upper-triangle" in names and len(set(names)) == len(names)
    sizes = auto_tree.step_sizes(trees)
    assert sizes[0] == 1 and 52 in sizes
    good = _stats(0.8)
    flat = {t: 0.010 for t in sizes}
    choice = auto_tree.choose(trees, good, flat)
    best_tps = max(p.tokens_per_step for p in choice.predictions)
    assert choice.tree.name in {p.tree for p in choice.predictions
                                if p.tokens_per_step == best_tps}
    assert choice.tree.layout.num_tokens >= 16
    steep = {t: 0.010 * t for t in sizes}  # cost grows as fast as the tokens
    small = auto_tree.choose(trees, good, steep)
    assert small.tree.name == "chain@1"
    useless = auto_tree.choose(trees, _stats(0.0, miss_low=8), {t: 0.010 + 1e-4 * t for t in sizes})
    assert useless.tree.name == "chain@1"
    assert "| **chain@1** |" in useless.table()
    assert auto_tree.candidate_trees(1)[0].name == "chain@1"
    assert [t.name for t in auto_tree.candidates_for("space", 3)] == ["chain@1", "chain@2",
                                                                      "chain@3"]
    assert all(t.num_masks <= 1 for t in auto_tree.candidate_trees(1))


def test_the_curve_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(model_cache.NO_CACHE_ENV, raising=False)
    params = models.init_params(CFG, jax.random.key(0))
    calls = []
    real = auto_tree.measure_curve

    def counting(cfg, params, sizes, **kw):
        calls.append(list(sizes))
        return real(cfg, params, sizes, repeats=1, loops=1)

    monkeypatch.setattr(auto_tree, "measure_curve", counting)
    first = auto_tree.step_cost_curve(CFG, params, "fp", [1, 4], quiet=True)
    assert calls == [[1, 4]] and set(first) == {1, 4} and all(s > 0 for s in first.values())
    again = auto_tree.step_cost_curve(CFG, params, "fp", [1, 4], quiet=True)
    assert calls == [[1, 4]] and again == first  # read back, not measured
    more = auto_tree.step_cost_curve(CFG, params, "fp", [1, 4, 8], quiet=True)
    assert calls == [[1, 4], [8]] and more[1] == first[1]  # only the new size is measured
    files = list((tmp_path / "step_cost").glob("*.json"))
    assert len(files) == 1 and set(json.loads(files[0].read_text())["seconds"]) == {"1", "4", "8"}
    auto_tree.step_cost_curve(CFG, params, "other weights", [1], quiet=True)
    assert calls[-1] == [1]  # another model: another curve


def test_auto_tree_decodes_losslessly(tmp_path, monkeypatch):
    """The api's `tree="auto"` path on a tiny model with an adapter that ships acceptance
    statistics: the chosen tree is a candidate and decoding still equals plain greedy."""
    import pathlib

    import bita_jax
    from bita_jax.checkpoints import loading

    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "cache"))
    loaded = loading.LoadedModel("tiny", CFG, models.init_params(CFG, jax.random.key(2)), None,
                                 pathlib.Path("-"))
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loaded)
    bcfg = models.BitaConfig(num_prefix=2, num_masks=3)
    params = models.init_bita_params(CFG, bcfg, jax.random.key(4))
    adapter = tmp_path / "adapter"
    models.save_adapter(adapter, params, bcfg, loaded.identity())
    assert bita_jax.load("tiny", adapter=str(adapter)).tree_choice is None  # no statistics
    auto_tree.save_acceptance(adapter, _stats(0.7))
    llm = bita_jax.load("tiny", adapter=str(adapter))
    assert llm.tree_choice is not None and llm.tree.name == llm.tree_choice.tree.name
    assert llm.tree.name in {t.name for t in auto_tree.candidate_trees(3)}
    prompts = [[3, 5, 7, 9], [11, 2]]
    want = Generator(llm.cfg, llm.params).generate(prompts, 24).tokens
    got = BitaGenerator(llm.cfg, llm.params, llm.bita_params, llm.tree).generate(prompts, 24)
    assert got.tokens == want
