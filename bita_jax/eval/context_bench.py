"""Speed against prompt length: time to first token and decoding, beside HF and the floors.

    rows, floors = run_context_bench(llm, lengths=(250, 1000, 2000, 4000), max_new_tokens=128)
    print(markdown_table(rows, floors))

For each length, one long prompt is built from held-out chat prompts (`long_prompt`: questions
people asked, then a request to summarize them, in the chat template). Engines take turns per
repeat (the fastest run kept): HF transformers greedy, our plain greedy, BiTA with the LLM's
tree. Each reports the time to first token (prefill and first token), the decode time per step
after it, tokens per step and end-to-end tokens per second. The floors are measured in the same
run: a prefill's FLOPs at the rate of jitted 256-row products over every weight matrix, and a
decode step's bytes (weights plus the keys and values it attends to) at the bandwidth of 1-row
products over every weight matrix.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from bita_jax.decoding.sampling import SamplingParams
from bita_jax.eval import step_cost

LENGTHS = (250, 1000, 2000, 4000)
HF, OURS, BITA = "HF greedy", "our greedy", "BiTA"
INSTRUCTION = ("Below are questions that people asked an assistant, one per paragraph.\n\n{}\n\n"
               "In a few sentences, summarize what these people wanted to know.")
Log = Callable[[str], None]


def long_prompt(tokenizer, texts: Sequence[str], tokens: int) -> list[int]:
    """A chat prompt of at most `tokens` ids (the most of them that fit, up to one paragraph
    fewer): as many of `texts` as fit, one paragraph each, in `INSTRUCTION`, the last cut to
    fill the length."""
    paragraphs = [" ".join(t.split()) for t in texts if t.strip()]
    body_ids = tokenizer.encode("\n\n".join(paragraphs))

    def prompt(n_body: int) -> list[int]:
        return tokenizer.chat_ids(INSTRUCTION.format(tokenizer.decode(body_ids[:n_body])))

    if len(prompt(len(body_ids))) < tokens:
        raise ValueError(f"the prompts hold fewer than {tokens} tokens: pass more of them")
    lo, hi = 0, len(body_ids)  # the longest body whose prompt fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(prompt(mid)) <= tokens else (lo, mid - 1)
    return prompt(lo)


@dataclasses.dataclass
class Run:
    """One engine on one prompt: seconds to the first token, seconds of decoding after it,
    decode steps (model calls after the prefill), the new token ids."""

    ttft: float
    decode_seconds: float
    steps: int
    tokens: list[int]

    @property
    def seconds(self) -> float:
        return self.ttft + self.decode_seconds


def ours_run(gen) -> Callable[[Sequence[int], int], Run]:
    """Times an engine's prefill and its decode loop separately (compiled on the first call)."""
    greedy = SamplingParams.greedy()

    def run(ids, max_new_tokens):
        start, decode = gen.prepare([list(ids)], max_new_tokens, greedy)
        t0 = time.perf_counter()
        state = jax.block_until_ready(start())
        t1 = time.perf_counter()
        state = jax.block_until_ready(decode(state, max_new_tokens))
        t2 = time.perf_counter()
        out, num = jax.device_get((state.out, state.num_new))
        return Run(t1 - t0, t2 - t1, int(state.steps), out[0, : int(num[0])].tolist())

    return run


def hf_run(hf_model, eos_id: int) -> Callable[[Sequence[int], int], Run]:
    """transformers greedy `generate`, timed within one call: the first token comes when the
    model's first forward (the prefill) returns, seen by a forward hook; decoding is the rest.

    (Timing a separate 1-token `generate` for the first token, as before, let noise make it
    longer than the whole call, and the decode time 0.)"""
    import torch

    ends: list[float] = []  # perf_counter at the end of each forward of the current call
    hf_model.register_forward_hook(lambda *_: ends.append(time.perf_counter()))

    def run(ids, max_new_tokens):
        ends.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([list(ids)]), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        seconds = time.perf_counter() - t0
        ttft = ends[0] - t0
        return Run(ttft, seconds - ttft, len(ends) - 1, out[0, len(ids):].tolist())

    return run


@dataclasses.dataclass(frozen=True)
class Floors:
    """Rates measured in this run: `flops_per_s` of 256-row products over every weight matrix,
    `bytes_per_s` of 1-row products (what a decode step's reads can reach)."""

    flops_per_s: float
    bytes_per_s: float


def measure_floors(params, repeats: int = 3) -> Floors:
    mats = step_cost.weight_matrices(params)
    flops = 2 * 256 * sum(m.shape[0] * m.shape[1] for m in mats)
    big, small = step_cost.floor_fn(params, 256, 1), step_cost.floor_fn(params, 1, 8)
    jax.block_until_ready((big(), small()))
    t_big = min(step_cost.time_call(big) for _ in range(repeats))
    t_small = min(step_cost.time_call(small) for _ in range(repeats)) / 8
    return Floors(flops / t_big, step_cost.weight_bytes(params) / t_small)


def prefill_flops(cfg, params, n: int) -> float:
    """FLOPs of an n-token prefill: every weight matrix on n rows (the LM head on one), and
    causal attention (scores and values, n (n + 1) / 2 query-key pairs per head and layer)."""
    mats = step_cost.weight_matrices(params)
    head = [m for m in mats if m.shape[0] == cfg.vocab_size]
    body = sum(m.shape[0] * m.shape[1] for m in mats) - sum(m.size for m in head[:1])
    pairs = n * (n + 1) / 2
    attention = 4 * pairs * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return 2 * n * body + 2 * cfg.vocab_size * cfg.hidden_size + attention


def step_bytes(cfg, params, n: int) -> float:
    """Bytes a 1-token decode step at n cached tokens reads: weights, keys and values."""
    itemsize = np.dtype(cfg.jnp_dtype).itemsize
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * n * itemsize
    return step_cost.weight_bytes(params) + kv


def run_context_bench(llm, prompts: dict[int, list[int]], max_new_tokens: int = 128,
                      repeats: int = 2, hf: bool = True,
                      log: Log = print) -> tuple[list[dict], Floors]:
    """One row per (length, engine); engines take turns per repeat, the fastest run kept.

    Args:
      llm: a `bita_jax.LLM` (with an adapter for the BiTA engine).
      prompts: {target length: token ids} (`long_prompt`).
    """
    engines: dict[str, Callable[[Sequence[int], int], Run]] = {}
    if hf:
        from bita_jax.eval.report import load_hf_model

        engines[HF] = hf_run(load_hf_model(llm.loaded.source), llm.cfg.eos_token_ids[0])
    engines[OURS] = ours_run(llm.engine(use_bita=False))
    if llm.has_bita:  # the tree (or plain decoding) that `tree="auto"` takes for each length
        by_engine: dict[int, Callable[[Sequence[int], int], Run]] = {}

        def bita_run(ids, max_new_tokens):
            gen = llm.engine(use_bita=True, prompt_tokens=len(ids))
            if id(gen) not in by_engine:
                by_engine[id(gen)] = ours_run(gen)
            return by_engine[id(gen)](ids, max_new_tokens)

        engines[BITA] = bita_run
    log("measuring the floors ...")
    floors = measure_floors(llm.params)
    rows = []
    for n, ids in prompts.items():
        for run in engines.values():  # warm-up: compiles every shape
            run(ids, 2)
        best: dict[str, Run] = {}
        for r in range(repeats):
            for name, run in engines.items():
                got = run(ids, max_new_tokens)
                if name not in best or got.seconds < best[name].seconds:
                    best[name] = got
                log(f"{len(ids)} tokens, round {r + 1}: {name} first token {got.ttft:.2f} s, "
                    f"{1e3 * got.decode_seconds / max(got.steps, 1):.1f} ms/step")
        for name, got in best.items():
            rows.append(_row(llm, n, ids, name, got, best, floors))
    return rows, floors


def _row(llm, n, ids, name, got: Run, best: dict[str, Run], floors: Floors) -> dict:
    new = len(got.tokens)
    step_ms = 1e3 * got.decode_seconds / max(got.steps, 1)
    row = {"length": n, "prompt_tokens": len(ids), "engine": name, "ttft_s": got.ttft,
           "decode_ms_per_step": step_ms, "tokens_per_step": (new - 1) / max(got.steps, 1),
           "decode_tokens_per_s": (new - 1) / got.decode_seconds if got.decode_seconds else 0.0,
           "tokens_per_s": new / got.seconds, "new_tokens": new,
           "prefill_floor_s": prefill_flops(llm.cfg, llm.params, len(ids)) / floors.flops_per_s,
           "step_floor_ms": 1e3 * step_bytes(llm.cfg, llm.params, len(ids) + new // 2)
           / floors.bytes_per_s}
    if name == BITA:
        tree = llm.tree_for(len(ids))
        row["tree"] = tree.name if tree is not None else "plain greedy"
    if OURS in best:
        row["identical_to_ours"] = got.tokens == best[OURS].tokens
    if HF in best:
        hf_best = best[HF]
        row["ttft_vs_hf"] = got.ttft / hf_best.ttft
        hf_decode = ((len(hf_best.tokens) - 1) / hf_best.decode_seconds
                     if hf_best.decode_seconds else 0.0)
        row["decode_speed_vs_hf"] = row["decode_tokens_per_s"] / hf_decode if hf_decode else None
        row["identical_to_hf"] = got.tokens == hf_best.tokens
    return row


def markdown_table(rows: Sequence[dict]) -> str:
    head = ("| prompt tokens | engine | first token, s | x prefill floor | decode ms/step "
            "| x step floor | tokens/step | decode tok/s | x HF decode | end-to-end tok/s "
            "| identical to ours |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['prompt_tokens']} | {r['engine']}{_tree(r)} | {r['ttft_s']:.2f} | "
            f"{r['ttft_s'] / r['prefill_floor_s']:.2f} | {r['decode_ms_per_step']:.1f} | "
            f"{r['decode_ms_per_step'] / r['step_floor_ms']:.2f} | {r['tokens_per_step']:.2f} | "
            f"{r['decode_tokens_per_s']:.1f} | {_fmt(r.get('decode_speed_vs_hf'))} | "
            f"{r['tokens_per_s']:.1f} | {_yes(r.get('identical_to_ours'))} |")
    return "\n".join(lines)


def _tree(row: dict) -> str:
    return f" ({row['tree']})" if row.get("tree") else ""


def _fmt(x) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def _yes(x) -> str:
    return "" if x is None else ("yes" if x else "no")


def plot(rows: Sequence[dict], path) -> None:
    """Time to first token and decode ms/step against prompt length, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    for name in engines:
        mine = [r for r in rows if r["engine"] == name]
        x = [r["prompt_tokens"] for r in mine]
        axes[0].plot(x, [r["ttft_s"] for r in mine], "o-", label=name)
        axes[1].plot(x, [r["decode_ms_per_step"] for r in mine], "o-", label=name)
    floor_rows = [r for r in rows if r["engine"] == engines[0]]
    x = [r["prompt_tokens"] for r in floor_rows]
    axes[0].plot(x, [r["prefill_floor_s"] for r in floor_rows], "k--", label="FLOP floor")
    axes[1].plot(x, [r["step_floor_ms"] for r in floor_rows], "k--", label="byte floor")
    axes[0].set(xlabel="prompt tokens", ylabel="time to first token, s")
    axes[1].set(xlabel="prompt tokens", ylabel="decode ms per model call")
    for ax in axes:  # legends under the panels, never over the lines
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.savefig(path, dpi=110)
    plt.close(fig)
