"""The raw directory of a self-distillation run: settings, plan and chunk files, written safely.

    DIR/raw/settings.json         what the run is (model, sources, limits); a rerun must match it
    DIR/raw/plan.jsonl            every prompt to answer, one record each, with a stable `index`
    DIR/raw/chunk-000000.jsonl    generated records, one file per batch, written atomically
    DIR/raw/PARTIAL               present when the dataset was built from a stopped run

The chunk files are the done-index: a record's `index` is in exactly one chunk file, and a chunk
file exists only whole (written to `*.tmp`, then renamed). `open_run` starts a run or resumes
the one there; `bita_jax.data.distill` fills it and `bita_jax.data.dataset` builds the tfds
dataset from it.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator

RAW_DIR = "raw"
SETTINGS_FILE = "settings.json"
PLAN_FILE = "plan.jsonl"
CHUNK_GLOB = "chunk-*.jsonl"
PARTIAL_MARKER = "PARTIAL"
FORMAT = "bita_jax.distill/1"


class DistillError(ValueError):
    """A distillation run that cannot go on; the message says why and what to do."""


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes `path` whole or not at all: a kill leaves at most a stray `*.tmp` behind. The
    temporary name carries the process id: processes of one job that share a file system write
    the same file side by side, and each replace is whole."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: pathlib.Path) -> Iterator[dict]:
    """The records of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def jsonl(records: Iterable[dict]) -> str:
    """JSONL text of `records`, one per line."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def chunk_files(raw_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(pathlib.Path(raw_dir).glob(CHUNK_GLOB))


def done_indices(raw_dir: pathlib.Path) -> set[int]:
    """Plan indices already answered; raises DistillError if one was answered twice."""
    done: set[int] = set()
    for path in chunk_files(raw_dir):
        for record in read_jsonl(path):
            if record["index"] in done:
                raise DistillError(f"{path}: index {record['index']} is answered twice; the run "
                                   "directory is damaged, start over with a new --out")
            done.add(record["index"])
    return done


def _grows(stored_limit: int | None, limit: int | None) -> bool:
    return stored_limit is not None and (limit is None or limit > stored_limit)


def open_run(out_dir: str | os.PathLike, settings: dict,
             make_plan: Callable[[], list[dict]], extend: bool = False,
             write: bool = True) -> list[dict]:
    """Starts a run in `out_dir`, or resumes the one there if its settings are equal.

    With `write=False` (the other processes of a multi-process job; process 0 writes), the
    same plan is returned and nothing is written: a plan is a pure function of the settings
    and the sources, so it is the same whether read before or after process 0 stores it.

    With `extend`, a run whose settings differ only by a larger `limit` grows instead: the prompts
    the larger limit adds (by prompt text and system variant) are appended to the plan with new
    indices, so every record already answered keeps its index and is not redone.

    Returns the plan (stored on first start, so a rerun never depends on the sources again).
    Raises DistillError if `out_dir` holds a run with other settings.
    """
    raw = pathlib.Path(out_dir) / RAW_DIR
    settings = {"format": FORMAT, **settings}
    settings_path = raw / SETTINGS_FILE
    if settings_path.is_file():
        stored = json.loads(settings_path.read_text(encoding="utf-8"))
        diff = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        plan = list(read_jsonl(raw / PLAN_FILE))
        if extend and diff == ["limit"] and _grows(stored["limit"], settings["limit"]):
            have = {(r["prompt_text"], r["with_system"]) for r in plan}
            added = [r for r in make_plan() if (r["prompt_text"], r["with_system"]) not in have]
            plan += [{**r, "index": len(plan) + i} for i, r in enumerate(added)]
            if write:
                write_atomic(raw / PLAN_FILE, jsonl(plan))  # a kill here: --extend adds none
                write_atomic(settings_path, json.dumps(settings, indent=1) + "\n")
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
    plan = make_plan()
    if not plan:
        raise DistillError("no prompts to answer: the sources are empty or every prompt is "
                           "longer than --max-prompt-tokens")
    if write:
        raw.mkdir(parents=True, exist_ok=True)
        write_atomic(raw / PLAN_FILE, jsonl(plan))
        write_atomic(settings_path, json.dumps(settings, indent=1) + "\n")  # commits the plan
    return plan
