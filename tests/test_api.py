"""The Python API on the real default model: the README's five lines, batches, streaming,
sampling knobs, and one-line errors for bad input."""

import pytest

import bita_jax
from bita_jax.checkpoints import ModelLoadError
from bita_jax.decoding import GenerationError, TreeError
from bita_jax.models import AdapterError

PROMPT = "Explain what a hash map is."


@pytest.fixture(scope="module")
def llm():
    return bita_jax.load("smollm2-135m")


def test_the_readme_example(llm):
    """The README's example, line for line (the shipped adapter must be there: no fallback)."""
    assert llm.has_bita and llm.adapter.endswith("adapters/smollm2-135m")
    out = llm.generate("Explain what a hash map is.", max_new_tokens=64)
    print(out.text, out.tokens_per_step)
    ref = llm.generate("Explain what a hash map is.", max_new_tokens=64, use_bita=False)
    assert ref.token_ids == out.token_ids
    assert out.mode == "bita" and ref.mode == "plain"
    # tree="auto": chosen from the adapter's acceptance statistics and this machine's step costs
    assert llm.tree_choice is not None and out.tree == llm.tree_choice.tree.name
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.new_tokens == len(out.token_ids) == 64 and out.finish_reason == "length"
    assert ref.steps == 63 and ref.tokens_per_step == 1.0  # plain: one token per model call
    # the shipped adapter drafts: fewer model calls than tokens (measured 1.4 to 1.6 per step)
    assert out.steps < 55 and out.tokens_per_step == pytest.approx(63 / out.steps)
    assert out.seconds > 0 and out.prompt_tokens == len(llm.encode(PROMPT))


def test_a_list_is_one_batch_with_one_result_each(llm):
    prompts = [PROMPT, "What is the capital of France?", "Write a haiku about JAX."]
    batch = llm.generate(prompts, max_new_tokens=24)
    assert isinstance(batch, list) and len(batch) == 3
    for text, got in zip(prompts, batch):  # each row equals that prompt decoded alone, plainly
        alone = llm.generate(text, max_new_tokens=24, use_bita=False)
        assert got.token_ids == alone.token_ids
        assert got.prompt_tokens == alone.prompt_tokens


def test_on_text_streams_the_whole_text(llm):
    pieces = []
    out = llm.generate(PROMPT, max_new_tokens=32, on_text=pieces.append)
    assert len(pieces) > 3 and "".join(pieces) == out.text
    rows = {}
    outs = llm.generate([PROMPT, "Hi!"], max_new_tokens=16,
                        on_text=lambda piece, i: rows.setdefault(i, []).append(piece))
    assert ["".join(rows[i]) for i in (0, 1)] == [o.text for o in outs]


def test_sampling_is_seeded_and_raw_text_skips_the_template(llm):
    a = llm.generate(PROMPT, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    b = llm.generate(PROMPT, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids and a.mode == "bita-sampled"
    raw = llm.generate("def fibonacci(n):", max_new_tokens=8, chat=False, use_bita=False)
    assert raw.prompt_tokens == len(llm.tokenizer.encode("def fibonacci(n):"))
    assert llm.encode(PROMPT, system="Be brief.") != llm.encode(PROMPT)


def test_plain_model_and_bad_input(llm):
    plain = bita_jax.load("smollm2-135m", adapter=None)
    assert not plain.has_bita and plain.tree is None
    assert plain.generate(PROMPT, 8).mode == "plain"
    with pytest.raises(GenerationError, match="exceeds the cache size"):
        llm.generate(PROMPT, max_new_tokens=10_000)
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(PROMPT, 8, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="no prompt given"):
        llm.generate([], 8)
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'"):
        bita_jax.load("no-such-model")
    with pytest.raises(AdapterError, match="adapter directory not found"):
        bita_jax.load("smollm2-135m", adapter="/no/such/adapter")
    with pytest.raises(TreeError, match="unknown tree"):
        bita_jax.load("smollm2-135m", tree="bushy")


def test_a_space_adapter_decodes_its_fine_tuned_model(llm, tmp_path):
    """A SPACE adapter (random, non-zero LoRA, stored in fp16 as the shipped one is) loads by
    directory: the method comes from the adapter, the tree defaults to SPACE's chain, plain
    decoding is the fine-tuned model's greedy (not the base model's), and SPACE's decoding
    equals it token for token."""
    import jax
    import numpy as np
    from safetensors.numpy import load_file

    from bita_jax import models

    bcfg = models.BitaConfig(num_masks=3, lora_rank=2, method="space")
    params = models.init_bita_params(llm.cfg, bcfg, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 32))
    params["lora"] = jax.tree.map(lambda a: 0.05 * jax.random.normal(next(keys), a.shape),
                                  params["lora"])
    models.save_adapter(tmp_path, params, bcfg, llm.loaded.identity(), dtype="float16")
    stored = load_file(str(tmp_path / "adapter.safetensors"))
    assert {a.dtype for a in stored.values()} == {np.dtype(np.float16)}
    loaded, _, _ = models.load_adapter(tmp_path, llm.cfg, llm.loaded.identity())
    for target, ab in params["lora"].items():  # the fp16-rounded values, as fp32
        want = np.asarray(ab["a"], np.float16).astype(np.float32)
        assert np.array_equal(np.asarray(loaded["lora"][target]["a"]), want), target
    space = bita_jax.load("smollm2-135m", adapter=tmp_path)
    assert space.method == "space" and space.tree.name == "chain"
    out = space.generate(PROMPT, max_new_tokens=24)
    ref = space.generate(PROMPT, max_new_tokens=24, use_bita=False)
    assert out.mode == "space" and ref.mode == "plain"
    assert out.token_ids == ref.token_ids
    assert ref.token_ids != llm.generate(PROMPT, max_new_tokens=24, use_bita=False).token_ids


def test_the_shipped_table_drafts_and_a_corrupt_one_is_a_one_line_error(llm, tmp_path):
    """The shipped adapter's n-gram table is loaded and used by the retrieval branch (Code
    Alpaca-style answers, where prompt lookup finds few 2-grams); the output stays greedy's. A
    corrupt ngram.npz in an adapter directory is an AdapterError naming the file."""
    import shutil

    from bita_jax.decoding import ngram

    assert llm.ngram_table is not None and llm.ngram_table.num_entries() > 50_000
    prompt = "Write a Java program that prints the numbers from 1 to 10."
    with_table = bita_jax.load("smollm2-135m", tree="chain@1+lookup:2")
    without = bita_jax.load("smollm2-135m", tree="chain@1+lookup:2")
    without.ngram_table = None  # before any engine is built
    ref = with_table.generate(prompt, max_new_tokens=96, use_bita=False)
    a = with_table.generate(prompt, max_new_tokens=96)
    b = without.generate(prompt, max_new_tokens=96)
    assert a.token_ids == ref.token_ids == b.token_ids
    assert a.steps < b.steps  # the table's drafts were accepted where prompt lookup had none
    shutil.copytree(llm.adapter, tmp_path / "adapter")
    (tmp_path / "adapter" / ngram.FILE).write_bytes(b"not a zip")
    with pytest.raises(AdapterError, match="ngram.npz"):
        bita_jax.load("smollm2-135m", adapter=tmp_path / "adapter")
