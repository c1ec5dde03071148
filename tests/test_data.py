"""Self-distillation data on a tiny random LLaMA: dataset build, splits, resume, greedy output."""

import fnmatch
import hashlib
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.checkpoints import gguf_loader
from bita_jax.data import dataset, distill, prompts, run_dir
from bita_jax.decoding.ar import Generator
from bita_jax.models.config import ModelConfig

CFG0 = ModelConfig(arch="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(2,),
                   max_position_embeddings=512)
MAX_NEW = 12
BATCH = 3
ROOT = pathlib.Path(__file__).resolve().parents[1]


class FakeTokenizer:
    """ChatML-like rendering over bytes: [BOS, system header (default or empty), text, footer]."""

    def chat_ids(self, text, system=None):
        header = [1, 5, 6, 7] if system is None else [1, 5, 8]
        return header + [10 + b % 280 for b in text.encode("utf-8")] + [3, 4]


def _texts(heldout: bool, n: int) -> list[str]:
    found = [t for t in (f"q{i}" for i in range(2000)) if prompts.is_heldout(t) == heldout]
    return found[:n]


TRAIN_TEXTS, HELDOUT_TEXTS = _texts(False, 4), _texts(True, 2)
# An alpaca record with an input: the prompt is instruction + newline + input.
WITH_INPUT = next(f"say{i}" for i in range(2000) if not prompts.is_heldout(f"say{i}\nin"))


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG0, jax.random.key(0))


@pytest.fixture(scope="module")
def cfg(params):
    """CFG0 with an EOS that greedy decoding really emits, so EOS handling is exercised.

    The token is found with an uncached full forward (cheaper to compile than a second
    Generator: the EOS ids are static, so each EOS set has its own decode executables)."""

    @jax.jit
    def next_token(params, seq, n):  # seq [1, 16] right-padded, n real tokens
        hidden, _ = models.forward(CFG0, params, seq, jnp.arange(16)[None],
                                  np.tril(np.ones((16, 16), bool)))
        return jnp.argmax(models.lm_logits(CFG0, params, hidden[0, n - 1]))

    seq = FakeTokenizer().chat_ids(TRAIN_TEXTS[0])
    for _ in range(3):
        padded = np.zeros((1, 16), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(next_token(params, padded, len(seq))))
    return CFG0.replace(eos_token_ids=(seq[-1],))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    a = d / "a.jsonl"  # plain JSONL with `prompt`
    a.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in
                         [TRAIN_TEXTS[0], HELDOUT_TEXTS[0], TRAIN_TEXTS[1], TRAIN_TEXTS[0]]))
    b = d / "b.json"  # alpaca: instruction + input; one duplicate of a.jsonl
    b.write_text(json.dumps([
        {"instruction": TRAIN_TEXTS[2], "input": "", "output": "x"},
        {"instruction": HELDOUT_TEXTS[1], "input": "", "output": "x"},
        {"instruction": TRAIN_TEXTS[1], "input": "", "output": "x"},
        {"instruction": TRAIN_TEXTS[3], "input": "", "output": "x"},
        {"instruction": WITH_INPUT, "input": "in", "output": "x"},
    ]))
    return (str(a), str(b))


def _config(sources, **kw):
    return distill.DistillConfig(sources=sources, max_new_tokens=MAX_NEW, **kw)


def _run(out, sources, cfg, params, on_chunk=None, extend=False, **kw):
    return distill.distill(out, _config(sources, **kw), cfg, params, FakeTokenizer(),
                        model_name="tiny", batch_size=BATCH, progress=False, on_chunk=on_chunk,
                        extend=extend)


def _raw_records(out) -> list[dict]:
    recs = [json.loads(line) for p in run_dir.chunk_files(pathlib.Path(out) / "raw")
            for line in p.read_text().splitlines()]
    return sorted(recs, key=lambda r: r["index"])


def _loaded(out) -> dict[str, list[dict]]:
    return {s: sorted(dataset.load_split(out, s), key=lambda r: r["index"]) for s in dataset.SPLITS}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, sources, cfg, params):
    out = tmp_path_factory.mktemp("full")
    _run(out, sources, cfg, params)
    return out


def test_dataset_builds_and_load_split_returns_the_records(full_run, sources, cfg, params):
    splits = _loaded(full_run)
    tok = FakeTokenizer()
    texts = [TRAIN_TEXTS[0], HELDOUT_TEXTS[0], TRAIN_TEXTS[1], TRAIN_TEXTS[2], HELDOUT_TEXTS[1],
             TRAIN_TEXTS[3], WITH_INPUT + "\nin"]
    got = {(r["prompt_text"], r["with_system"]) for s in dataset.SPLITS for r in splits[s]}
    assert got == {(t, w) for t in texts for w in (True, False)}  # deduplicated, both variants
    assert sum(len(v) for v in splits.values()) == 2 * len(texts)
    assert (full_run / "bita_distill" / "1.0.0").is_dir()
    assert list((full_run / "bita_distill" / "1.0.0").glob("*.array_record-*"))
    for r in splits["train"] + splits["heldout"]:
        assert r["prompt_ids"].dtype == np.int32 and r["response_ids"].dtype == np.int32
        assert r["prompt_ids"].tolist() == tok.chat_ids(
            r["prompt_text"], system=None if r["with_system"] else "")

    # The responses are the model's own greedy continuations, EOS included when hit. The
    # reference batches the records in index order (the pipeline batches by prompt length) at the
    # pipeline's batch size, so no new executable is compiled.
    records = sorted((r for v in splits.values() for r in v), key=lambda r: r["index"])
    gen = Generator(cfg, params)
    for start in range(0, len(records), BATCH):
        group = records[start:start + BATCH]
        ids = [r["prompt_ids"].tolist() for r in group]
        want = gen.generate(ids + [ids[0]] * (BATCH - len(ids)), MAX_NEW).tokens
        for r, w in zip(group, want):
            assert r["response_ids"].tolist() == w
    ends = [r["response_ids"][-1] in cfg.eos_token_ids for r in records]
    assert any(ends) and not all(ends)
    assert all(len(r["response_ids"]) == MAX_NEW for r, e in zip(records, ends) if not e)


def test_splits_are_disjoint_and_follow_is_heldout(full_run):
    splits = _loaded(full_run)
    train = {r["prompt_text"] for r in splits["train"]}
    heldout = {r["prompt_text"] for r in splits["heldout"]}
    assert heldout and train and not train & heldout
    assert all(prompts.is_heldout(t) for t in heldout)
    assert not any(prompts.is_heldout(t) for t in train)
    assert heldout == set(HELDOUT_TEXTS)


def test_killed_run_resumes_without_duplicates(tmp_path, full_run, sources, cfg, params):
    class Killed(Exception):
        pass

    def kill(path):
        raise Killed(path)

    with pytest.raises(Killed):
        _run(tmp_path, sources, cfg, params, on_chunk=kill)
    raw = tmp_path / "raw"
    assert len(run_dir.chunk_files(raw)) == 1 and not (tmp_path / "bita_distill").exists()
    (raw / "chunk-000001.jsonl.tmp").write_text('{"index": 0, "trunc')  # a write cut short

    written = []
    _run(tmp_path, sources, cfg, params, on_chunk=written.append)
    plan_size = 2 * 7
    assert len(written) == -(-(plan_size - BATCH) // BATCH)  # only the remaining batches
    assert not list(raw.glob("*.tmp"))
    resumed = _raw_records(tmp_path)
    assert [r["index"] for r in resumed] == list(range(plan_size))  # each exactly once
    assert resumed == _raw_records(full_run)
    got, want = _loaded(tmp_path), _loaded(full_run)
    for s in dataset.SPLITS:
        assert len(got[s]) == len(want[s])
        for a, b in zip(got[s], want[s]):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])

    # A finished run rerun does nothing but reuse the dataset.
    _run(tmp_path, sources, cfg, params, on_chunk=written.append)
    assert len(written) == -(-(plan_size - BATCH) // BATCH)


def test_rerun_with_other_settings_is_refused(full_run, sources, cfg, params):
    with pytest.raises(run_dir.DistillError, match="limit: None there, 1 now"):
        _run(full_run, sources, cfg, params, limit=1)


def test_limit_system_mode_and_empty_heldout(tmp_path, sources, cfg, params):
    _run(tmp_path, sources, cfg, params, limit=1, system="without")
    splits = _loaded(tmp_path)
    assert len(dataset.load_split(tmp_path, "heldout")) == 0
    # limit=1 per source: the first prompt of a.jsonl and of b.json, without a system prompt.
    assert [(r["prompt_text"], r["with_system"]) for r in splits["train"]] == [
        (TRAIN_TEXTS[0], False), (TRAIN_TEXTS[2], False)]


def test_extend_grows_a_partial_run_and_rebuilds_its_dataset(tmp_path, full_run, sources, cfg,
                                                              params):
    class Killed(Exception):
        pass

    def kill(path):
        raise Killed(path)

    with pytest.raises(Killed):  # limit 2, stopped after one batch, then built as a subset
        _run(tmp_path, sources, cfg, params, limit=2, on_chunk=kill)
    dataset.build_dataset(tmp_path, partial=True)
    assert sum(len(v) for v in _loaded(tmp_path).values()) == BATCH
    first = _raw_records(tmp_path)

    with pytest.raises(run_dir.DistillError, match="--extend grows a run"):
        _run(tmp_path, sources, cfg, params)  # a larger limit without --extend
    with pytest.raises(run_dir.DistillError, match="other settings"):
        _run(tmp_path, sources, cfg, params, extend=True, limit=1)  # extending cannot shrink
    _run(tmp_path, sources, cfg, params, extend=True)  # grows to no limit, finishes, rebuilds
    grown = _raw_records(tmp_path)
    by_index = {r["index"]: r for r in grown}
    assert all(by_index[r["index"]] == r for r in first)  # answered ones kept, not redone
    assert [r["index"] for r in grown] == list(range(2 * 7))
    assert not (tmp_path / "raw" / run_dir.PARTIAL_MARKER).exists()

    def key(r):
        return (r["prompt_text"], r["with_system"], r["response_ids"].tolist())

    got, want = _loaded(tmp_path), _loaded(full_run)
    for s in dataset.SPLITS:  # the same records as a run planned with no limit from the start
        assert sorted(map(key, got[s])) == sorted(map(key, want[s]))


def test_max_prompt_tokens_skips_long_prompts(sources):
    plan = distill.plan_prompts(FakeTokenizer(), _config(sources, max_prompt_tokens=9))
    assert plan and all(len(r["prompt_ids"]) <= 9 for r in plan)
    assert {r["prompt_text"] for r in plan} < {r["prompt_text"] for r in distill.plan_prompts(
        FakeTokenizer(), _config(sources))}


def test_load_split_without_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="no bita_distill dataset"):
        dataset.load_split(tmp_path, "train")


# -- the entry point --------------------------------------------------------------------------

def _cli():
    spec = importlib.util.spec_from_file_location("distill_cli", ROOT / "train" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_default_sources_ship_with_the_package():
    """The recipe's default sources are named sources that resolve inside the package."""
    sources = _cli().DEFAULT_SOURCES.split(",")
    assert sources == ["sharegpt", "code-alpaca", "alpaca-seeds"]
    distill.check_sources(sources)  # raises on a source that cannot be read
    with pytest.raises(FileNotFoundError, match="prompt source not found: no-such-source"):
        distill.check_sources(["sharegpt", "no-such-source"])


def test_cli_missing_source_is_one_line(tmp_path, capsys):
    code = _cli().main(["--sources", "sharegpt_not_here.jsonl", "--out", str(tmp_path)])
    assert code == 2
    assert "prompt source not found: sharegpt_not_here.jsonl" in _one_line_error(capsys)


def test_cli_unknown_model_is_one_line(tmp_path, sources, capsys):
    code = _cli().main(["--model", "no-such-model", "--sources", sources[0], "--out",
                        str(tmp_path), "--quiet"])
    assert code == 2
    assert "unknown model 'no-such-model'" in _one_line_error(capsys)


def test_smollm2_system_variants():
    """SmolLM2's template inserts its default system turn unless the chat starts with a system
    message: "with" is that default, "without" an empty system turn."""
    from bita_jax.checkpoints.tokenizer import load_tokenizer
    from bita_jax.data import distill

    try:
        tok = load_tokenizer(gguf_loader.find_smollm2_gguf())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with_system = tok.decode(distill.render(tok, "Hi", True))
    without = tok.decode(distill.render(tok, "Hi", False))
    assert "You are a helpful AI assistant named SmolLM" in with_system
    assert without == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                       "<|im_start|>assistant\n")


# -- prompt sources shipped with the package, and the selection / test split -------------------

# sha256 of the NUL-joined prompt texts: the prompts the shipped adapter was distilled from.
SHIPPED_PROMPTS = {
    "code-alpaca": (2017, "b41ae8ce7b590721f0d6630ecf1f7ba867422e16dde8b571ea85aeff2b1459a9"),
    "alpaca-seeds": (175, "aab489041717056dd11afce7cf084b82246b9020fc4cfe4a83049e7a0530270c"),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_PROMPTS))
def test_named_prompt_files_ship_inside_the_package(name):
    path = prompts.source_path(name)
    assert path.is_file() and path.parent == ROOT / "bita_jax" / "data" / "prompt_files"
    texts = prompts.load_prompts(name)
    count, digest = SHIPPED_PROMPTS[name]
    assert len(texts) == count
    assert hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest() == digest
    assert list(prompts.iter_source(name)) == texts  # no duplicates in either file


def test_package_data_covers_every_prompt_file():
    """pyproject's package-data ships the prompt files (a wheel without them would fail)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["bita_jax.data"]
    files = sorted(p for p in (ROOT / "bita_jax/data/prompt_files").iterdir() if p.is_file())
    assert {p.name for p in files} >= {"code_alpaca_2k.json", "alpaca_seed_tasks.jsonl",
                                       "README.md"}
    for p in files:
        assert any(fnmatch.fnmatch(f"prompt_files/{p.name}", pat) for pat in patterns), p.name


def test_missing_prompt_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^prompt source not found: .*nope\.jsonl "
                       r"\(expected sharegpt, humaneval, code-alpaca, alpaca-seeds, or a JSON"):
        prompts.load_prompts(str(tmp_path / "nope.jsonl"))


SYNTHETIC = [f"q{i}" for i in range(20000)]


def test_heldout_split_is_pinned():
    """The split is a pure function of the text, and never changes (the shipped adapter was
    trained on the `train` part): these counts and parts were computed once and are pinned."""
    counts = {s: sum(prompts.split_of(t) == s for t in SYNTHETIC)
              for s in ("train", "selection", "test")}
    assert counts == {"train": 19014, "selection": 443, "test": 543}
    first = [(t, prompts.heldout_part(t)) for t in SYNTHETIC if prompts.is_heldout(t)][:6]
    assert first == [("q12", "test"), ("q20", "test"), ("q62", "selection"), ("q69", "test"),
                     ("q86", "test"), ("q108", "test")]
    assert prompts.heldout_part("q0") is None and not prompts.is_heldout("q0")
    assert prompts.split_of("  q62\n") == "selection"  # surrounding whitespace is ignored


def test_selection_and_test_partition_heldout(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in SYNTHETIC))
    got = {s: prompts.load_prompts(str(path), s) for s in prompts.SPLITS}
    selection, test, heldout = set(got["selection"]), set(got["test"]), set(got["heldout"])
    assert selection and test and not selection & test
    assert selection | test == heldout == {t for t in SYNTHETIC if prompts.is_heldout(t)}
    assert not heldout & set(got["train"]) and heldout | set(got["train"]) == set(SYNTHETIC)
    assert got["all"] == SYNTHETIC
    for s in ("train", "heldout", "selection", "test"):  # file order is kept
        assert got[s] == [t for t in SYNTHETIC if t in set(got[s])]
    # The second hash is independent of the first: neither part is a sliver of the held-out set.
    assert 0.4 < len(selection) / len(heldout) < 0.6
    assert prompts.load_prompts(str(path), "test", limit=3) == got["test"][:3]
    with pytest.raises(ValueError, match="split must be one of train, heldout, selection, test, "
                                         "all, got 'dev'"):
        prompts.load_prompts(str(path), "dev")


def test_sharegpt_selection_and_test_sizes():
    """The real ShareGPT held-out prompts: 496 of 10,318, split 248 / 248; the first 30 under
    2,000 characters (the 30-prompt tables of docs/benchmarks.md) are 15 / 15."""
    try:
        prompts.sharegpt_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    texts = prompts.load_prompts("sharegpt")
    parts = {s: sum(prompts.split_of(t) == s for t in texts)
             for s in ("train", "selection", "test")}
    assert len(texts) == 10318 and parts == {"train": 9822, "selection": 248, "test": 248}
    first30 = prompts.load_prompts("sharegpt", "heldout", limit=30, max_chars=2000)
    assert sum(prompts.heldout_part(t) == "selection" for t in first30) == 15


def test_ngram_table_cli_reads_the_train_split_only(full_run, tmp_path, capsys):
    """train/ngram_table.py: the table of the train answers (a held-out answer's contexts are
    not in it unless a train answer has them too); bad input is a one-line error."""
    from bita_jax.decoding import ngram

    spec = importlib.util.spec_from_file_location("ngram_cli", ROOT / "train" / "ngram_table.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--data", str(full_run), "--out", str(tmp_path)]) == 0
    table = ngram.load(tmp_path)
    splits = _loaded(full_run)
    want = ngram.build([r["response_ids"] for r in splits["train"]])
    with_heldout = ngram.build([r["response_ids"] for s in dataset.SPLITS for r in splits[s]])
    assert 0 < table.num_entries() < with_heldout.num_entries()
    for a, b in zip(table.contexts + table.drafts, want.contexts + want.drafts):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    assert cli.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no bita_distill dataset" in _one_line_error(capsys)
    assert cli.main(["--data", str(full_run), "--out", str(tmp_path / "missing")]) == 2
    assert "not a directory" in _one_line_error(capsys)
