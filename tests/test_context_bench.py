"""The long-prompt benchmark end to end on the real SmolLM2: prompts of the asked length from
held-out texts, HF greedy, our greedy and BiTA on them (one prompt past the prefill chunk, so the
chunked prefill runs against HF), and the table."""

import pytest

import bita_jax
from bita_jax.data.prompts import load_prompts
from bita_jax.decoding import engine
from bita_jax.eval import context_bench


@pytest.fixture(scope="module")
def llm():
    return bita_jax.load("smollm2-135m")


def test_long_prompts_have_the_asked_length(llm):
    texts = load_prompts("sharegpt", split="test", limit=60)
    for n in (100, 700):
        ids = context_bench.long_prompt(llm.tokenizer, texts, n)
        assert n - 8 <= len(ids) <= n
        text = llm.tokenizer.decode(ids)
        assert "summarize what these people wanted to know" in text
    with pytest.raises(ValueError, match="fewer than"):
        context_bench.long_prompt(llm.tokenizer, texts[:1], 5000)


def test_bench_runs_every_engine_side_by_side(llm):
    texts = load_prompts("sharegpt", split="test", limit=60)
    long = engine.PREFILL_CHUNK + 44  # two chunks (one length: each compiles 4 programs)
    prompts = {long: context_bench.long_prompt(llm.tokenizer, texts, long)}
    rows, floors = context_bench.run_context_bench(llm, prompts, max_new_tokens=6, repeats=1,
                                                   log=lambda _: None)
    assert floors.flops_per_s > 1e9 and floors.bytes_per_s > 1e8
    assert [(r["length"], r["engine"]) for r in rows] == [
        (long, e) for e in (context_bench.HF, context_bench.OURS, context_bench.BITA)]
    for r in rows:
        assert r["identical_to_hf"] and r["identical_to_ours"], r  # fp32: HF's tokens exactly
        assert r["ttft_s"] > 0 and r["decode_ms_per_step"] > 0 and 1 <= r["new_tokens"] <= 6
        assert r["prefill_floor_s"] > 0 and r["step_floor_ms"] > 0
        assert r["decode_speed_vs_hf"] > 0
    assert rows[0]["tokens_per_step"] == 1.0  # HF: one forward per token after the prefill
    table = context_bench.markdown_table(rows)
    assert len(table.splitlines()) == 2 + len(rows)
