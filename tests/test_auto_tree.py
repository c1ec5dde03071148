"""`--tree auto` (issue 13): acceptance statistics saved beside an adapter, this machine's
step-cost curve measured once and cached, and the tree of most predicted tokens per second."""

import json

import jax
import numpy as np
import pytest

from bita_jax import models
from bita_jax.checkpoints import model_cache
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.tree import Tree
from bita_jax.eval import auto_tree, tree_select
from bita_jax.models.config import ModelConfig

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=1024)


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
    assert back.texts is None  # ranks alone: no retrieval candidates
    names = [t.name for t in auto_tree.candidates_for("bita", 3, lookup=True)]
    assert "chain@1+lookup:4" in names and "chain@1" in names
    assert not any("+lookup" in t.name for t in auto_tree.candidates_for("bita", 3))
    assert not any(t.dynamic for t in auto_tree.candidates_for("bita", 3, lookup=True))
    dynamic = [t for t in auto_tree.candidates_for("bita", 3, dynamic=True) if t.dynamic]
    assert len(dynamic) == len(auto_tree.DYNAMIC_CANDIDATES)
    # with the texts (prompt, greedy answer: one token more than the anchors) they round-trip
    rng = np.random.default_rng(1)
    texts = [(rng.integers(0, 50, 5), rng.integers(0, 50, len(r) + 1)) for r in stats.ranks]
    auto_tree.save_acceptance(tmp_path, tree_select.RankStats(stats.ranks, stats.max_rank, texts))
    back = auto_tree.load_acceptance(tmp_path)
    assert len(back.texts) == len(texts)
    for (a, b), (c, d) in zip(back.texts, texts):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert back.top_logp is None  # no log-probabilities: no dynamic candidates
    # with the masks' top log-probabilities too (kept as float16)
    logp = [np.sort(np.log(rng.dirichlet(np.ones(9), r.shape)), axis=-1)[..., ::-1]
            for r in stats.ranks]
    auto_tree.save_acceptance(tmp_path, tree_select.RankStats(stats.ranks, stats.max_rank, texts,
                                                              logp))
    back = auto_tree.load_acceptance(tmp_path)
    for a, b in zip(back.top_logp, logp):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    assert auto_tree.load_acceptance(tmp_path / "none") is None
    assert auto_tree.load_acceptance(None) is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "acceptance.npz").write_bytes(b"not a zip")
    assert auto_tree.load_acceptance(tmp_path / "bad") is None  # a warning, the default tree


class _Curve:
    """A cost curve by formula that records which sizes were asked for."""

    def __init__(self, cost):
        self.cost, self.asked = cost, []

    def __call__(self, tokens):
        self.asked.append(tokens)
        return self.cost(tokens)


def test_the_choice_follows_the_cost_curve():
    """Good drafts: on a flat curve (an accelerator) a tree within the bigger-step margin of the
    most tokens per step wins; on a curve that climbs with the step tokens (a small CPU) a small
    one does, and the sizes that could not win are never measured; with drafts that never hit,
    the smallest step."""
    trees = auto_tree.candidate_trees(3)
    names = [t.name for t in trees]
    assert names[0] == "chain@1" and "upper-triangle" in names and len(set(names)) == len(names)
    good = _stats(0.8)
    flat = _Curve(lambda t: 0.010)
    choice = auto_tree.choose(trees, good, flat)
    best_tps = max(p.tokens_per_step for p in choice.predictions)
    chosen_tps = next(p.tokens_per_step for p in choice.predictions if p.tree == choice.tree.name)
    assert best_tps <= chosen_tps * (1 + auto_tree.BIGGER_STEP_MARGIN)
    assert choice.tree.layout.num_tokens >= 16
    steep = _Curve(lambda t: 0.010 * t)  # cost grows as fast as the tokens
    small = auto_tree.choose(trees, good, steep)
    assert small.tree.name == "chain@1"
    # the big trees' tokens/step over the cost of a smaller size already lose: never measured
    asked = set(steep.asked)
    assert {1, 4} <= asked and 52 not in asked and 22 not in asked
    chosen = next(p for p in small.predictions if p.tree == "chain@1")
    best_rate = chosen.tokens_per_step / chosen.step_ms
    skipped = [p for p in small.predictions if p.step_tokens not in asked]
    for p in skipped:  # each loses even at the largest cost measured below its own size
        floor_ms = 1e3 * max(steep.cost(t) for t in asked if t <= p.step_tokens)
        assert p.tokens_per_step / floor_ms <= best_rate * (1 + auto_tree.BIGGER_STEP_MARGIN)
    assert skipped
    assert "not measured" in small.table() and "| **chain@1** |" in small.table()
    useless = auto_tree.choose(trees, _stats(0.0, miss_low=8), _Curve(lambda t: 0.010 + 1e-4 * t))
    assert useless.tree.name == "chain@1"
    # a curve with a knee: flat to 8 tokens, then steep (8-row tiles on a CPU)
    knee = _Curve(lambda t: 0.010 if t <= 8 else 0.010 * t)
    picked = auto_tree.choose(trees, good, knee)
    fits = [p for p in picked.predictions if p.step_tokens <= 8]
    assert picked.tree.name in {p.tree for p in fits}  # the best that fits, up to the margin
    chosen_tps = next(p.tokens_per_step for p in fits if p.tree == picked.tree.name)
    assert max(p.tokens_per_step for p in fits) <= chosen_tps * (1 + auto_tree.BIGGER_STEP_MARGIN)
    assert auto_tree.candidate_trees(1)[0].name == "chain@1"
    assert all(t.num_masks <= 1 for t in auto_tree.candidate_trees(1))
    assert [t.name for t in auto_tree.candidates_for("space", 3)] == ["chain@1", "chain@2",
                                                                      "chain@3"]


def test_a_bigger_step_must_win_by_the_margin():
    """Near-ties keep the smaller step: `chain` (16 tokens) predicted 5 % more tokens per
    second than `chain@1` (4 tokens) is not chosen; 20 % more is (a rising curve both times)."""
    trees = [Tree.make("chain@1", 3), Tree.make("chain", 3)]
    stats = _stats(0.8)
    tps = {t.name: tree_select.predicted_tokens_per_step(t, stats) for t in trees}
    small, big = (t.name for t in trees)

    def curve(gain):  # the big step's cost set so that it predicts `gain` more tokens/s
        cost4 = 0.015
        cost16 = cost4 * tps[big] / tps[small] / (1 + gain)
        assert cost16 > cost4
        return _Curve(lambda t: {1: 0.010, 4: cost4, 16: cost16}[t])

    assert auto_tree.choose(trees, stats, curve(0.05)).tree.name == small
    assert auto_tree.choose(trees, stats, curve(0.20)).tree.name == big


def test_the_curve_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(model_cache.NO_CACHE_ENV, raising=False)
    params = models.init_params(CFG, jax.random.key(0))
    calls = []
    real = auto_tree.measure_curve

    def counting(cfg, params, sizes, context=auto_tree.CONTEXT, **kw):
        calls.append((context, list(sizes)))
        return real(cfg, params, sizes, context, repeats=1, loops=1, built=kw.get("built"))

    monkeypatch.setattr(auto_tree, "measure_curve", counting)
    curve = auto_tree.CostCurve(CFG, params, "fp", quiet=True)
    first = {t: curve.seconds(t) for t in (1, 4)}
    # each new size is timed beside a 1-token forward and kept relative to it
    assert calls == [(300, [1]), (300, [1, 4])] and all(s > 0 for s in first.values())
    assert curve.seconds(4) == first[4] and len(calls) == 2  # kept, not measured again
    assert curve.ratio[300][1] == 1.0 and curve.seconds(4) == curve.ratio[300][4] * curve.base[300]
    # costs compare as the ratios measured beside a 1-token forward, whenever they were timed
    assert first[1] == curve.seconds(1)
    assert curve.seconds(4) / curve.seconds(1) == pytest.approx(curve.ratio[300][4], rel=1e-12)
    assert curve.at(1024)(4) > 0 and calls[-1] == (1024, [1, 4])  # another context bucket
    again = auto_tree.CostCurve(CFG, params, "fp", quiet=True)  # a later load: read back
    assert {t: again.seconds(t) for t in (1, 4)} == {t: curve.seconds(t) for t in (1, 4)}
    assert again.measured == [] and again.seconds(4, 1024) == curve.seconds(4, 1024)
    assert len(calls) == 3
    assert again.seconds(8) > 0 and calls[-1] == (300, [1, 8])  # only the new size is measured
    files = list((tmp_path / "step_cost").glob("*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())["contexts"]
    assert set(saved) == {"300", "1024"} and set(saved["300"]["ratio"]) == {"1", "4", "8"}
    auto_tree.CostCurve(CFG, params, "other weights", quiet=True).seconds(1)
    assert calls[-1] == (300, [1])  # another model: another curve


def test_context_buckets_and_the_greedy_fallback():
    """Prompt lengths map to the nearest context bucket on a log scale; a choice that predicts
    less than MIN_SPEEDUP over plain greedy does not beat it."""
    assert [auto_tree.context_bucket(n) for n in (1, 250, 540, 600, 1000, 2000, 4000, 10**6)] \
        == [300, 300, 300, 1024, 1024, 2048, 4096, 8192]
    trees = auto_tree.candidate_trees(3)
    good = _stats(0.8)
    cheap = auto_tree.choose(trees, good, _Curve(lambda t: 0.010 + 1e-4 * t))
    assert cheap.beats_greedy and cheap.speedup > auto_tree.MIN_SPEEDUP
    # a step of 4 tokens costs 1.6x a 1-token step (a long context on a small CPU)
    dear = auto_tree.choose(trees, good, _Curve(lambda t: 0.010 * (1 + 0.2 * (t - 1))))
    assert dear.tree.name == "chain@1" and not dear.beats_greedy, dear.speedup


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
    # fallback=True: the auto tree's engine switches to plain steps below the chosen tree's
    # measured break-even (its step cost over a plain step's), still lossless. By default
    # (None) only past chat length; False: never.
    assert llm.fallback is None and llm.engine(True, prompt_tokens=4).fallback is None
    assert llm.fallback_for(4) is None and llm.fallback_for() is None
    assert llm.fallback_for(2000).break_even == round(llm.auto_choice(2000).break_even, 3) > 0
    never = bita_jax.load("tiny", adapter=str(adapter), fallback=False)
    assert never.fallback_for(4) is None and never.fallback_for(2000) is None
    switching = bita_jax.load("tiny", adapter=str(adapter), fallback=True)
    gen = switching.engine(True, prompt_tokens=4)
    assert gen.fallback.break_even == round(switching.tree_choice.break_even, 3) > 0
    assert gen.generate(prompts, 24).tokens == want

    # Per prompt length, on a machine where every bigger step is dear: long prompts decode
    # with plain greedy, chat-length ones keep the tree chosen at load (a curve measured once
    # on a busy machine must not switch drafting off for good), and both equal plain greedy.
    class Curve:
        def at(self, context):
            return lambda t: 0.010 * (1 + 0.3 * (t - 1))

    stats, trees, _ = llm.auto
    llm.auto, llm.tree_choice = (stats, trees, Curve()), None
    llm._choices.clear()
    assert not llm.auto_choice(8).beats_greedy
    assert llm.tree_for(8).name == llm.auto_choice(8).tree.name
    assert llm.tree_for(700) is None and not llm.auto_choice(700).beats_greedy
    short, long_ = llm.engine(True, prompt_tokens=8), llm.engine(True, prompt_tokens=700)
    assert isinstance(short, BitaGenerator) and type(long_) is Generator
    assert long_ is llm.engine(False)  # the one plain engine, compiled once
    rng = np.random.default_rng(0)
    long_prompt = rng.integers(0, CFG.vocab_size, 700).tolist()
    for prompt in ([3, 5, 7, 9], long_prompt):
        gen = llm.engine(True, prompt_tokens=len(prompt))
        assert gen.generate([prompt], 16).tokens == llm.engine(False).generate([prompt], 16).tokens
