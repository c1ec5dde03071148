"""The self-distilled dataset: an array_record tfds dataset built from a run's raw chunk files,
read back with random access and no TensorFlow; and `load_records`, what training reads.

    build_dataset(DIR)                       # DIR/bita_distill/1.0.0/..., once the run is done
    records = load_split(DIR, "train")       # random access, len()
    records = load_records("d.jsonl")        # or a JSONL file of prompt_ids / response_ids
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bita_jax.data.run_dir import (
    PARTIAL_MARKER,
    PLAN_FILE,
    RAW_DIR,
    DistillError,
    chunk_files,
    done_indices,
    read_jsonl,
)

SPLITS = ("train", "heldout")
Record = Mapping[str, np.ndarray]  # {"prompt_ids": [S] int32, "response_ids": [R] int32}


class DataError(ValueError):
    """Missing or malformed training data; the message names the file and the problem."""


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
        plan = {r["index"]: r["split"] for r in read_jsonl(raw / PLAN_FILE)}
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
            for r in read_jsonl(path):
                if r["split"] == split:
                    yield r["index"], {
                        "index": r["index"],
                        "prompt_ids": np.asarray(r["prompt_ids"], np.int32),
                        "response_ids": np.asarray(r["response_ids"], np.int32),
                        "prompt_text": r["prompt_text"], "source": r["source"],
                        "with_system": r["with_system"]}


DATASET_NAME = BitaDistill.name  # "bita_distill"


def _builder(data_dir: str | os.PathLike) -> BitaDistill:
    return BitaDistill(data_dir=str(data_dir), file_format="array_record")


def dataset_dir(data_dir: str | os.PathLike) -> pathlib.Path:
    """Where `build_dataset` puts the dataset of run directory `data_dir` (nothing is built)."""
    return pathlib.Path(_builder(data_dir).data_dir)


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
    return Records(tfds.data_source(DATASET_NAME, split=split, data_dir=str(data_dir),
                                    download=False))


# -- training records ---------------------------------------------------------------------------

def _as_record(obj: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    try:
        prompt = np.asarray(obj["prompt_ids"], np.int32).reshape(-1)
        response = np.asarray(obj["response_ids"], np.int32).reshape(-1)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: expected integer lists 'prompt_ids' and 'response_ids' ({e})"
                        ) from None
    return {"prompt_ids": prompt, "response_ids": response}


def load_records(path: str | pathlib.Path, split: str = "train") -> Sequence[Record]:
    """Training records from a tfds data directory or a JSONL file.

    Args:
      path: a directory (the distilled tfds dataset, read by `load_split`) or a
        `.jsonl` file of {"prompt_ids": [...], "response_ids": [...]} lines.
      split: the tfds split (directories only).

    Returns:
      A sequence of {"prompt_ids", "response_ids"} int32 arrays.

    Raises:
      DataError: a missing path, an unknown format, or malformed records.
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise DataError(f"training data not found: {path} (expected a tfds data directory or a "
                        ".jsonl file of prompt_ids/response_ids)")
    if path.is_dir():
        try:
            return load_split(str(path), split)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  (tfds raises many types for a bad directory)
            raise DataError(f"cannot read split {split!r} of dataset {path}: {e}") from None
    if path.suffix != ".jsonl":
        raise DataError(f"unsupported data file {path}: expected a directory or a .jsonl file")
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            records.append(_as_record(obj, f"{path}:{i}"))
    if not records:
        raise DataError(f"{path} holds no records")
    return records
