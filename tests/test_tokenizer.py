"""Tokenizer built offline from the SmolLM2 GGUF == HF's tokenizers, id for id.

References: transformers' GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) and,
for digits after a whitespace run, the same vocab with SmolLM2's own tokenizer.json pre-tokenizer
(Digits(individual) -> ByteLevel), which transformers' GGUF converter drops (bita_jax/tokenizer.py).
The tokenizer read back from the on-disk cache must equal the one built from the GGUF, id for id.
Every test runs with the cache in a temporary directory.
"""

import json
import random
import subprocess
import sys
import warnings

import pytest
import tokenizers
import transformers
from tokenizers import pre_tokenizers

from bita_jax.checkpoints import gguf_loader, model_cache
from bita_jax.checkpoints import tokenizer as tokenizer_mod
from bita_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've seen it, don't you think?",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n-1) + fib(n-2)  # slow\n\n\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }\t// loop",
    "  leading, trailing   and   multiple   spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    "Café naïve résumé façade Ångström",
    "你好，世界！日本語のテキスト 한국어 Россия مرحبا",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ zero\u200bwidth non\u00a0breaking",
    "pi is 3.14159, 1,000,000 items in 2024 (v1.2.3) x2 0x1F",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b <reponame>repo<file_sep>x <|im_end|>",
    "",
    " ",
    "\n",
]
# A run of 2+ whitespace characters right before a digit: the only place where transformers' GGUF
# tokenizer (plain ByteLevel) differs from SmolLM2's tokenizer.json and llama.cpp ("smollm").
DIGIT_AFTER_WHITESPACE = {
    "a  1": ["a", "ĠĠ", "1"],
    "Step\n\n1. go": ["Step", "ĊĊ", "1", ".", "Ġgo"],
}


@pytest.fixture(scope="module", autouse=True)
def cache_dir(fresh_gguf_cache):
    return fresh_gguf_cache


@pytest.fixture(scope="module")
def tok(gguf_path):
    """Built from the GGUF (cold cache): also writes the tokenizer cache."""
    return load_tokenizer(gguf_path)


def _no_gguf_parse(monkeypatch):
    def fail(path):
        raise AssertionError(f"GGUF parsed although cached: {path}")
    monkeypatch.setattr(gguf_loader, "open_gguf", fail)


@pytest.fixture(scope="module")
def tok_cached(tok, gguf_path):
    """Read back from the cache written by `tok`, without parsing the GGUF."""
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error")
        _no_gguf_parse(mp)
        return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)


@pytest.fixture(scope="module")
def model_pretok(hf_tok):
    """HF's GGUF vocab + merges with SmolLM2's original pre-tokenizer."""
    tk = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return tk


def _random_texts(n, digits):
    rng = random.Random(0)
    pool = list("abcXYZ éü中文😀 \t\n\r.,;:!?'\"()[]{}<>-_=+*/\\|#@$%&^~`") + [
        "the", " and", "'s", "'ll", "<|im_start|>", "<|im_end|>", "  ", "\n\n", "    "]
    if digits:
        pool += list("0123456789") + [" 42", "3.14"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_no_torch_at_runtime(gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))  # built, then read from the cache
    code = ("import sys; from bita_jax.checkpoints.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(gguf_path)!r}); t.chat_ids('hi'); "
            f"t = load_tokenizer({str(gguf_path)!r}); t.chat_ids('hi'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_hf_gguf(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_random_text_matches_hf(tok, hf_tok, model_pretok):
    for text in _random_texts(300, digits=False):
        assert tok.encode(text) == hf_tok.encode(text), repr(text)
    for text in _random_texts(300, digits=True):
        assert tok.encode(text) == model_pretok.encode(text).ids, repr(text)


@pytest.mark.parametrize("text", sorted(DIGIT_AFTER_WHITESPACE))
def test_digits_after_whitespace_follow_model_pretokenizer(tok, hf_tok, model_pretok, text):
    ids = tok.encode(text)
    assert hf_tok.convert_ids_to_tokens(ids) == DIGIT_AFTER_WHITESPACE[text]
    assert ids == model_pretok.encode(text).ids
    assert tok.decode(ids) == text


def test_special_ids(tok, hf_tok):
    assert tok.eos_token_ids == (2,) == (hf_tok.eos_token_id,)
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.pad_token_id == hf_tok.pad_token_id
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tok.encode("hello")[0] != tok.bos_token_id  # no BOS: add_bos_token is false


@pytest.mark.parametrize("system", [None, "You are terse.", ""])
def test_chat_template_matches_hf(tok, hf_tok, system):
    user = "What is 2 + 2?\nAnswer  briefly."
    messages = ([] if system is None else [{"role": "system", "content": system}])
    messages.append({"role": "user", "content": user})
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(user, system=system) == text
    assert tok.apply_chat_template(messages) == text
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                     return_dict=False)
    assert tok.chat_ids(user, system=system) == list(ids)
    assert text.endswith("<|im_start|>assistant\n")


def test_default_system_prompt(tok):
    text = tok.apply_chat_template("hi")
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.chat_ids("hi")[:3] == [1, 9690, 198]  # <|im_start|> system \n


def test_multi_turn_without_generation_prompt(tok, hf_tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "bye"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    with pytest.raises(ValueError, match="system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], system="y")


def test_hf_directory(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    from_dir = load_tokenizer(tmp_path)
    assert isinstance(from_dir, Tokenizer)
    assert from_dir.eos_token_ids == (2, 0)
    for text in TEXTS:
        assert from_dir.encode(text) == hf_tok.encode(text)
    assert from_dir.chat_ids("hi") == tok.chat_ids("hi")


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_missing_and_corrupt_gguf(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        load_tokenizer(bad)


# --- on-disk cache ------------------------------------------------------------------------------


def _assert_same_tokenizer(a, b, n_random=200):
    assert a.hf.backend_tokenizer.to_str() == b.hf.backend_tokenizer.to_str()
    assert (a.vocab_size, a.bos_token_id, a.pad_token_id, a.eos_token_ids) == (
        b.vocab_size, b.bos_token_id, b.pad_token_id, b.eos_token_ids)
    assert a.hf.chat_template == b.hf.chat_template
    assert a.hf.all_special_tokens == b.hf.all_special_tokens
    texts = (TEXTS + sorted(DIGIT_AFTER_WHITESPACE) + _random_texts(n_random, digits=False)
             + _random_texts(n_random, digits=True))
    for text in texts:
        ids = a.encode(text)
        assert b.encode(text) == ids, repr(text)
        assert b.decode(ids) == a.decode(ids), repr(text)
        assert b.decode(ids, skip_special_tokens=True) == a.decode(ids, skip_special_tokens=True)
    for system in (None, "You are terse."):
        assert b.apply_chat_template("Hi  2", system=system) == a.apply_chat_template(
            "Hi  2", system=system)
        assert b.chat_ids("Hi  2", system=system) == a.chat_ids("Hi  2", system=system)


def test_cached_tokenizer_is_identical(tok, tok_cached, gguf_path):
    entry = model_cache.cache_entry(gguf_path)
    assert (entry / tokenizer_mod.TOKENIZER_CACHE_FILE).is_file()
    assert (entry / tokenizer_mod.TOKENIZER_META_CACHE_FILE).is_file()
    _assert_same_tokenizer(tok, tok_cached)


@pytest.mark.parametrize("name,damage", [(tokenizer_mod.TOKENIZER_CACHE_FILE, "truncate"),
                                         (tokenizer_mod.TOKENIZER_META_CACHE_FILE, "garbage")])
def test_corrupt_tokenizer_cache_is_rebuilt(tok, tok_cached, gguf_path, tmp_path, monkeypatch,
                                            name, damage):
    # Copy the module's (good) cache entry into a private cache, then damage one file.
    source = model_cache.cache_entry(gguf_path)
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))
    entry = model_cache.cache_entry(gguf_path)
    entry.mkdir(parents=True)
    for f in (tokenizer_mod.TOKENIZER_CACHE_FILE, tokenizer_mod.TOKENIZER_META_CACHE_FILE):
        (entry / f).write_bytes((source / f).read_bytes())
    good = (entry / name).read_bytes()
    (entry / name).write_bytes(b"\x00garbage{" * 10 if damage == "garbage"
                               else good[:len(good) // 2])
    with pytest.warns(model_cache.CacheWarning, match="unreadable cache file"):
        rebuilt = tokenizer_from_gguf(gguf_path)
    assert (entry / name).read_bytes() == good
    _assert_same_tokenizer(tok, rebuilt, n_random=0)
    with monkeypatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error")
        _no_gguf_parse(mp)
        tokenizer_from_gguf(gguf_path)  # a clean hit again


def test_tokenizer_cache_disabled(tok, gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(model_cache.NO_CACHE_ENV, "1")
    reader = gguf_loader.lazy_reader(gguf_path)  # one parse for both builds
    built = tokenizer_from_gguf(gguf_path, reader)
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv(model_cache.NO_CACHE_ENV)
    tokenizer_from_gguf(gguf_path, reader, use_cache=False)
    assert not (tmp_path / "cache").exists()
    _assert_same_tokenizer(tok, built, n_random=0)
