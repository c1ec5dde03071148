"""The speed report on a tiny random LLaMA: HF greedy and prompt lookup (transformers), our
greedy and BiTA trees side by side; identical outputs, step histograms, tables, JSON and plots."""

import itertools
import json
import pathlib

import jax
import pytest

from bita_jax import models
from bita_jax.checkpoints.hf import load_hf_checkpoint
from bita_jax.checkpoints.loading import LoadedModel
from bita_jax.eval import bench, plots, report
from tests.hf_models import make_hf, save

PROMPTS = {"chat": [[5, 17, 33, 2, 80, 5, 17], [44, 3]], "code": [[9, 10, 11, 9, 10]]}
MAX_NEW = 12
TREES = ["chain@1", "chain"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = save(make_hf("llama", {"num_key_value_heads": 2}, seed=4),
                tmp_path_factory.mktemp("hf"))
    cfg, params = load_hf_checkpoint(path)
    loaded = LoadedModel("tiny", cfg, params, None, pathlib.Path(path))
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=3), jax.random.key(1))
    trees = [bench.make_tree(n, 3) for n in TREES]
    selection = bench.select_tree(cfg, params, bp, trees, [[7, 8, 9]], MAX_NEW, timing_steps=4,
                                  repeats=1)
    hf = report.hf_engines(path, eos_id=cfg.vocab_size - 1, prompt_lookup=3)
    sets = {k: ([f"{k} {i}" for i in range(len(v))], v) for k, v in PROMPTS.items()}
    return report.run_report(loaded, bp, trees, sets, MAX_NEW, selection=selection, hf=hf), \
        selection


def test_every_engine_is_measured_and_identical(run):
    rep, selection = run
    names = [report.HF_GREEDY, report.HF_LOOKUP, report.OURS] + [f"BiTA {t}" for t in TREES]
    assert list(rep["engines"]) == names
    assert rep["selected"] == f"BiTA {selection.chosen.tree}"
    assert [n for n, e in rep["engines"].items() if e.get("selected")] == [rep["selected"]]
    assert report.lossless_failures(rep) == []
    for set_name, res in rep["sets"].items():
        n = len(PROMPTS[set_name])
        assert len(res["rows"]) == n
        seconds = {name: sum(r["engines"][name]["seconds"] for r in res["rows"])
                   for name in res["summary"]}
        for name, s in res["summary"].items():
            # our greedy equals HF greedy on these weights, and every engine equals both
            assert s["identical_ours"] == s["identical_hf"] == n, (set_name, name)
            assert s["new_tokens"] == n * MAX_NEW and s["seconds"] > 0
            # the summary is its rows' totals; the prefill's token is no step's
            assert s["seconds"] == pytest.approx(seconds[name])
            assert s["steps"] == sum(r["engines"][name]["steps"] for r in res["rows"])
            assert s["tokens_per_step"] == pytest.approx((s["new_tokens"] - n) / s["steps"])
            assert s["speedup_vs_hf"] == pytest.approx(seconds[report.HF_GREEDY] / s["seconds"])
            assert s["speedup_vs_ours"] == pytest.approx(seconds[report.OURS] / s["seconds"])
        assert res["summary"][report.HF_GREEDY]["tokens_per_step"] == 1.0
        assert res["summary"][report.HF_GREEDY]["steps"] == n * (MAX_NEW - 1)  # hook-counted
        assert res["summary"][report.OURS]["speedup_vs_ours"] == 1.0
        for t in TREES:
            s = res["summary"][f"BiTA {t}"]
            hist = s["step_hist"]
            assert sum(hist) == s["steps"]
            assert sum(k * c for k, c in enumerate(hist)) == s["new_tokens"] - n
            assert len(hist) == bench.make_tree(t, 3).num_masks + 2  # 0 .. M + 1 tokens


def test_markdown_json_and_plots(run, tmp_path):
    rep, _ = run
    table = report.markdown(rep)
    for name in rep["engines"]:
        assert f"| {name}" in table
    assert "(selected)" in table and table.count("**chat**") == 1
    data = report.slim(rep)
    json.dumps(data)  # JSON-ready
    row = data["sets"]["chat"]["rows"][0]["engines"]
    assert "tokens" in row[report.OURS] and "tokens" not in row["BiTA chain"]
    paths = plots.report_plots(rep, tmp_path)
    assert [p.name for p in paths] == ["tokens_per_step_hist.png", "speedup_per_prompt.png",
                                       "step_time_vs_tokens_per_step.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plot_texts_fit_and_do_not_overlap(run, tmp_path, monkeypatch):
    """Every title, axis label, annotation and legend entry of the report plots lies inside its
    figure, and no two overlap (one prompt set: the narrowest figure)."""
    import matplotlib.pyplot as plt

    rep, _ = run
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures report_plots closes
    plots.report_plots(dict(rep, sets=dict(list(rep["sets"].items())[:1])), tmp_path)
    assert len(figures) == 3
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        texts = list(fig.texts)  # the suptitle
        for ax in fig.axes:
            legend = ax.get_legend()
            texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts,
                      *(legend.get_texts() if legend else [])]
        boxes = [t.get_window_extent(renderer) for t in texts if t.get_text().strip()]
        frame = fig.bbox
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0
                   and b.y1 <= frame.y1 for b in boxes)
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_space_engines_are_lossless_against_their_own_greedy_and_drift_from_the_base(tmp_path):
    """A SPACE adapter (random, non-zero LoRA) adds SPACE greedy (the fine-tuned model) and
    SPACE chain: the chain equals the fine-tuned greedy on every prompt; both drift from the
    base model's greedy, which the report measures as identical counts and common prefixes."""
    path = save(make_hf("llama", {"num_key_value_heads": 2}, seed=4), tmp_path)
    cfg, params = load_hf_checkpoint(path)
    loaded = LoadedModel("tiny", cfg, params, None, pathlib.Path(path))
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=3), jax.random.key(1))
    bcfg = models.BitaConfig(num_masks=3, lora_rank=2, method="space")
    sp = models.init_bita_params(cfg, bcfg, jax.random.key(2))
    keys = iter(jax.random.split(jax.random.key(3), 32))
    sp["lora"] = jax.tree.map(lambda a: 0.5 * jax.random.normal(next(keys), a.shape), sp["lora"])
    sets = {"chat": (["a", "b"], PROMPTS["chat"])}
    rep = report.run_report(loaded, bp, [bench.make_tree("chain@1", 3)], sets, MAX_NEW,
                            space=(sp, bcfg, [bench.make_tree(t, 3) for t in ("chain", "chain@2")]))
    assert list(rep["engines"]) == [report.OURS, "BiTA chain@1", report.SPACE_GREEDY,
                                    "SPACE chain", "SPACE chain@2"]
    assert report.lossless_failures(rep) == []
    summary = rep["sets"]["chat"]["summary"]
    greedy, chain = summary[report.SPACE_GREEDY], summary["SPACE chain"]
    assert greedy["identical_own"] == chain["identical_own"] == 2
    assert summary["SPACE chain@2"]["identical_own"] == 2
    assert greedy["speedup_vs_own"] == 1.0
    assert greedy["identical_ours"] < 2 and greedy["common_prefix_ours"] < MAX_NEW
    rows = rep["sets"]["chat"]["rows"]
    assert greedy["common_prefix_ours"] == pytest.approx(sum(
        report.common_prefix(r["engines"][report.SPACE_GREEDY]["tokens"],
                             r["engines"][report.OURS]["tokens"]) for r in rows) / 2)
    assert "| SPACE chain | " in report.markdown(rep)
    summary["SPACE chain"]["identical_own"] = 1  # a chain that parted from its greedy
    assert report.lossless_failures(rep) == ["chat: SPACE chain"]


def test_fallback_engine_is_reported_beside_its_tree(tmp_path):
    """`fallbacks` adds "BiTA {tree} +fallback": lossless like every BiTA engine, its plain
    steps counted in the summary and named in the table (a break-even no window reaches)."""
    from bita_jax.decoding.fallback import Fallback

    path = save(make_hf("llama", {"num_key_value_heads": 2}, seed=4), tmp_path)
    cfg, params = load_hf_checkpoint(path)
    loaded = LoadedModel("tiny", cfg, params, None, pathlib.Path(path))
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=3), jax.random.key(1))
    sets = {"chat": (["a", "b"], PROMPTS["chat"])}
    rep = report.run_report(loaded, bp, [bench.make_tree("chain@1", 3)], sets, MAX_NEW,
                            fallbacks={"chain@1": Fallback(50.0, window=2, pause=2)})
    name = "BiTA chain@1 +fallback"
    assert list(rep["engines"]) == [report.OURS, "BiTA chain@1", name]
    assert rep["engines"][name]["break_even"] == 50.0 and not rep["engines"][name]["selected"]
    assert report.lossless_failures(rep) == []
    s = rep["sets"]["chat"]["summary"][name]
    assert s["identical_ours"] == 2 and 0 < s["plain_steps"] < s["steps"]
    assert rep["sets"]["chat"]["summary"]["BiTA chain@1"]["plain_steps"] == 0
    assert f"| {name} (break-even 50.00; {s['plain_steps']} of {s['steps']} steps plain) |" in \
        report.markdown(rep)
