"""The real default model end to end: our jitted greedy == HF transformers' greedy, token for token,
and the CLI's contract (JSON fields, one-line errors)."""

import json
import os
import subprocess
import sys

import pytest

from bita_jax.checkpoints.gguf_loader import find_smollm2_gguf
from bita_jax.checkpoints.loading import load_model
from bita_jax.decoding.ar import Generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Explain what a hash map is in two sentences.",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def hf_greedy(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = find_smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    hf.eval()
    outputs = []
    for chat in CHATS:
        ids = smollm2.tokenizer.chat_ids(chat)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                              eos_token_id=2, pad_token_id=2)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def test_batched_greedy_matches_hf_transformers(smollm2, hf_greedy):
    prompts = [smollm2.tokenizer.chat_ids(c) for c in CHATS]
    assert len({len(p) for p in prompts}) > 1  # rows of different lengths in one batch
    ours = Generator(smollm2.cfg, smollm2.params).generate(prompts, 64).tokens
    for chat, got, want in zip(CHATS, ours, hf_greedy):
        assert got == want, f"divergence on {chat!r}"
    # one row alone gives the same tokens as inside the batch
    alone = Generator(smollm2.cfg, smollm2.params).generate(prompts[1:2], 64).tokens[0]
    assert alone == hf_greedy[1]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer", "generate.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_cli_json_contract(smollm2, hf_greedy):
    run = _cli("--prompt", CHATS[0], "--max-new-tokens", "64", "--json", "--adapter", "none")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    for key in ("text", "token_ids", "new_tokens", "steps", "seconds", "tokens_per_second"):
        assert key in report
    assert report["token_ids"] == hf_greedy[0]
    assert report["new_tokens"] == len(hf_greedy[0])
    assert report["text"] == smollm2.tokenizer.decode(hf_greedy[0], skip_special_tokens=True)
    assert report["steps"] == report["new_tokens"] - 1


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--max-new-tokens", "9000"], "exceeds the cache size"),
    (["--max-cache", "64", "--max-new-tokens", "60"], "exceeds the cache size 64"),
    (["--compare", "--compare-runs", "0"], "--compare-runs must be at least 1, got 0"),
    (["--fallback", "--tree", "chain"], "--fallback needs --tree auto"),
])
def test_cli_errors_are_one_line(args, message):
    run = _cli("--prompt", "hello", *args)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()[-1]) < 300


def test_cli_bita_compare_is_lossless(smollm2, hf_greedy):
    """The shipped adapter (it ships in the repository: required, never replaced by a random
    one) decodes exactly HF's greedy ids, drafts for real, and the report's numbers add up."""
    from bita_jax.checkpoints.loading import shipped_adapter

    shipped = shipped_adapter(smollm2)
    assert shipped is not None and (shipped / "adapter.safetensors").is_file(), \
        "adapters/smollm2-135m must ship with the repository"
    run = _cli("--prompt", CHATS[3], "--max-new-tokens", "64", "--json", "--compare",
               "--tree", "chain")  # --adapter defaults to the shipped one
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["adapter"] == str(shipped) and report["tree"] == "chain"
    assert report["mode"] == "bita" and report["identical"] is True
    assert report["token_ids"] == hf_greedy[3]
    assert report["new_tokens"] == len(report["token_ids"])
    # tokens/step counts the model calls after the prefill (whose token is not a step's)
    assert report["tokens_per_step"] == round((report["new_tokens"] - 1) / report["steps"], 3)
    # speedup = greedy seconds / BiTA seconds; the three are rounded to 3-4 decimals (abs 1e-3)
    assert report["speedup"] == pytest.approx(report["greedy_seconds"] / report["seconds"],
                                              abs=1e-3)
    # The shipped adapter really drafts. Greedy ids, hence steps, are deterministic: this
    # answer (26 tokens, EOS included) measured 25 tokens in 18 steps = 1.39 tokens/step with
    # `chain` (about 1.6 over longer chat answers, docs/benchmarks.md); `random:0` took 25
    # steps = 1.00. 1.2 sits in the middle: a lost or unused adapter falls below it.
    assert report["tokens_per_step"] > 1.2, report


def test_shipped_space_adapter_decodes_its_fine_tuned_model():
    """adapters/smollm2-135m-space: the mode comes from the adapter, --compare runs the
    fine-tuned model's greedy, SPACE's chain equals it token for token, and the masks draft."""
    space = os.path.join(ROOT, "adapters", "smollm2-135m-space")
    assert os.path.isfile(os.path.join(space, "adapter.safetensors")), \
        "adapters/smollm2-135m-space must ship with the repository"
    run = _cli("--prompt", CHATS[3], "--max-new-tokens", "64", "--json", "--compare",
               "--tree", "chain", "--adapter", space, "--compare-runs", "1")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["mode"] == "space" and report["tree"] == "chain", report
    assert report["identical"] is True
    # Deterministic (greedy ids): measured 63 tokens in 44 steps = 1.43 tokens/step; a random
    # adapter (`random:0:5`) took 25 steps for 25 = 1.00. A lost or unused adapter falls below.
    assert report["tokens_per_step"] > 1.2, report

def test_cli_rejects_an_adapter_of_another_model_and_a_too_deep_tree(tmp_path):
    import jax

    from bita_jax import models
    from bita_jax.models.config import ModelConfig

    tiny = ModelConfig(arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       max_position_embeddings=256)
    models.save_adapter(tmp_path,
                        models.init_bita_params(tiny, models.BitaConfig(), jax.random.key(0)),
                        models.BitaConfig(), {"name": "tiny-llama", "arch": "llama",
                                              "hidden_size": 32, "num_layers": 2})
    for args, message in [
            (["--adapter", str(tmp_path)], "trained for base model 'tiny-llama'"),
            (["--adapter", "random:0:2", "--tree", "chain@3"],
             "tree 'chain@3' needs 3 masks but the adapter has 2: use @1 to @2")]:
        run = _cli("--prompt", "hi", *args)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 2


@pytest.mark.parametrize("wait_for", ["loading", "compiling"])
def test_cli_ctrl_c_exits_cleanly(wait_for):
    """Ctrl-C while loading or compiling/generating: exit 130, one line, no traceback."""
    import signal

    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "infer", "generate.py"),
                             "--prompt", "Write a long story.", "--max-new-tokens", "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen = ""
    while wait_for not in seen:
        line = proc.stderr.readline()
        assert line, f"exited before {wait_for!r}: {seen}"
        seen += line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err


def test_cli_rejects_a_corrupt_adapter(tmp_path):
    (tmp_path / "adapter.json").write_text("{not json")
    (tmp_path / "adapter.safetensors").write_bytes(b"garbage")
    run = _cli("--prompt", "hi", "--adapter", str(tmp_path))
    assert run.returncode == 2 and "corrupt adapter" in run.stderr
    assert "Traceback" not in run.stderr


def _script(name, *args, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer", name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_bench_cli_selects_measures_and_stays_lossless(tmp_path):
    """`infer/bench.py --select` on held-out HumanEval: predictions, the position table, a
    results.json whose BiTA rows equal plain greedy."""
    run = _script("bench.py", "--prompts", "humaneval", "--limit", "2", "--max-new-tokens", "24",
                  "--tree", "chain@1,upper-triangle-pruned", "--select", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "## Predicted vs measured (chosen: " in run.stdout
    assert "| positions | anchors | mask 0 top-1 / top-5 |" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["trees"]) == {"chain@1", "upper-triangle-pruned"}
    predicted = {p["tree"]: p for p in results["selection"]["predictions"]}
    assert set(predicted) == set(results["trees"])
    for name, tree in results["trees"].items():
        s = tree["summary"]
        assert s["identical"] == s["prompts"] == 2
        rows = [r["trees"][name] for r in results["rows"]]
        assert s["steps"] == sum(r["steps"] for r in rows)
        assert s["new_tokens"] == sum(r["new_tokens"] for r in rows)
        assert s["tokens_per_step"] == pytest.approx((s["new_tokens"] - 2) / s["steps"])
        assert s["speedup"] == pytest.approx(s["greedy_seconds"] / s["seconds"])
        # The replay of the teacher-forced statistics predicts these very decodings (same
        # prompts, same greedy continuations) step for step; predictions are rounded to 4 places.
        assert predicted[name]["tokens_per_step_replay"] == pytest.approx(
            s["tokens_per_step"], abs=1e-4), name
    chosen = max(results["selection"]["predictions"], key=lambda p: p["tokens_per_second"])
    assert results["selection"]["chosen"] == chosen["tree"]
    # The shipped adapter drafts on code. Deterministic (greedy ids): measured 46 tokens in 33
    # steps = 1.39 with chain@1 and 1.84 with upper-triangle-pruned; a random adapter ~1.0.
    assert results["trees"]["chain@1"]["summary"]["tokens_per_step"] > 1.2
    assert results["trees"]["upper-triangle-pruned"]["summary"]["tokens_per_step"] > 1.5
    assert results["selection"]["stats"]["by_position"][0]["positions"] == [0, 64]


def test_report_cli_writes_table_json_and_plots(tmp_path):
    """`infer/report.py` end to end on one prompt per set: every engine identical, HF included."""
    pytest.importorskip("torch")
    # Short prompts: the timed ShareGPT prompt (43 tokens) shares the calibration prompt's
    # 64-token bucket, so the tree selection's programs serve the timed runs (HumanEval: 128).
    run = _script("report.py", "--limit", "1", "--max-new-tokens", "24", "--calibration", "1",
                  "--max-prompt-chars", "600", "--trees", "chain@1,chain", "--prompt-lookup",
                  "3", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["sets"]) == {"sharegpt", "humaneval"}
    # timed on the test half of the held-out prompts, the tree chosen on the selection half
    assert results["config"]["splits"] == {"sharegpt": "test", "humaneval": "all"}
    assert results["config"]["calibration_split"] == "selection"
    assert results["selected"] in ("BiTA chain@1", "BiTA chain")
    for name, s in results["sets"].items():
        engines = s["summary"]
        assert set(engines) == {"HF greedy", "HF prompt lookup", "plain greedy", "BiTA chain@1",
                                "BiTA chain"}, name
        for engine, summary in engines.items():  # HF greedy == our greedy == every BiTA tree
            if engine != "HF prompt lookup":  # its agreement with greedy is HF's property
                assert summary["identical_hf"] == 1 and summary["identical_ours"] == 1, engine
    assert "| engine | step tokens | tokens/step |" in (tmp_path / "report.md").read_text()
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "tokens_per_step_hist.png", "speedup_per_prompt.png", "step_time_vs_tokens_per_step.png"}
