"""HF parity: tiny random HF models saved as safetensors, imported by `checkpoint`: same logits."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import FalconConfig

from bita_jax import models
from bita_jax.checkpoints import hf as hf_checkpoint
from bita_jax.checkpoints.hf import CheckpointError, load_hf_checkpoint
from bita_jax.models.config import ConfigError
from tests.hf_models import FALCON, V, make_hf, save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # fp32 logits; never relax: a failure is a bug

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}
LLAMA_CASES = {
    "kv1_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "kv2_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "kv4_bias": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "kv2_theta": dict(num_key_value_heads=2, rope_theta=500000.0),
    "kv2_llama3": dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE),
}

FALCON_CASES = {
    "7b_mqa_parallel": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                            bias=False),
    "new_arch_kv2": dict(new_decoder_architecture=True, num_kv_heads=2, bias=False),
    "new_arch_kv2_bias": dict(new_decoder_architecture=True, num_kv_heads=2, bias=True),
    "new_arch_one_ln": dict(new_decoder_architecture=True, num_kv_heads=2,
                            num_ln_in_parallel_attn=1),
    "sequential_mha": dict(parallel_attn=False, multi_query=False, new_decoder_architecture=False,
                           bias=True, tie_word_embeddings=False),
}


def _tokens(seed=0, b=2, t=12):
    return np.random.default_rng(seed).integers(0, V, size=(b, t)).astype(np.int32)


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _our_logits(cfg, params, tokens):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.tril(jnp.ones((t, t), bool))
    with jax.default_matmul_precision("float32"):
        hidden, _ = models.forward(cfg, params, jnp.asarray(tokens), positions, mask)
        return np.asarray(models.lm_logits(cfg, params, hidden))


def _assert_parity(hf_model, cfg, params, seed=0):
    tokens = _tokens(seed)
    want, got = _hf_logits(hf_model, tokens), _our_logits(cfg, params, tokens)
    assert got.shape == want.shape == (2, 12, V)
    assert np.abs(want).max() > 1.0  # the weights are not trivially small
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_parity(case, tmp_path):
    hf_model = make_hf("llama", LLAMA_CASES[case])
    cfg, params = load_hf_checkpoint(save(hf_model, tmp_path))
    assert cfg.arch == "llama" and cfg.num_kv_heads == hf_model.config.num_key_value_heads
    assert cfg.tie_word_embeddings == ("lm_head" not in params)
    assert cfg.rope_theta == LLAMA_CASES[case].get("rope_theta", 10000.0)
    assert (cfg.rope_scaling is not None) == ("rope_scaling" in LLAMA_CASES[case])
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), models.abstract_params(cfg))
    _assert_parity(hf_model, cfg, params)


@pytest.mark.parametrize("case", sorted(FALCON_CASES))
def test_falcon_parity(case, tmp_path):
    hf_model = make_hf("falcon", FALCON_CASES[case])
    cfg, params = load_hf_checkpoint(save(hf_model, tmp_path))
    assert cfg.arch == "falcon"
    _assert_parity(hf_model, cfg, params)


def test_falcon_qkv_layouts_split_per_head(tmp_path):
    """Each head's q/k/v rows land in the right (head, D) slot, for the three fused layouts."""
    for case, (n_q, n_kv) in {"7b_mqa_parallel": (4, 1), "new_arch_kv2": (4, 2),
                              "sequential_mha": (4, 4)}.items():
        hf_model = make_hf("falcon", FALCON_CASES[case])
        cfg, params = load_hf_checkpoint(save(hf_model, tmp_path / case))
        d, g = cfg.head_dim, n_q // n_kv
        w = hf_model.transformer.h[1].self_attention.query_key_value.weight.detach().numpy()
        if case == "sequential_mha":  # [N, 3, D]
            rows = w.reshape(n_q, 3, d, -1)
            q, k, v = rows[:, 0], rows[:, 1], rows[:, 2]
        elif case == "7b_mqa_parallel":  # [N + 2, D]
            rows = w.reshape(n_q + 2, d, -1)
            q, k, v = rows[:n_q], rows[n_q:n_q + 1], rows[n_q + 1:]
        else:  # [K, G + 2, D]
            rows = w.reshape(n_kv, g + 2, d, -1)
            q, k, v = rows[:, :g].reshape(n_q, d, -1), rows[:, g], rows[:, g + 1]
        attn = params["layers"]["attn"]
        for name, ref in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            got = np.asarray(attn[name]["kernel"][1])  # [E, heads, D]
            np.testing.assert_array_equal(got, ref.transpose(2, 0, 1))


def test_sharded_checkpoint_loads_identically(tmp_path):
    hf_model = make_hf("llama", LLAMA_CASES["kv2_untied"], seed=3)
    single = save(hf_model, tmp_path / "single")
    sharded = save(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    cfg_a, params_a = load_hf_checkpoint(single)
    cfg_b, params_b = load_hf_checkpoint(sharded)
    assert cfg_a == cfg_b
    _assert_tree_equal(params_a, params_b)
    _assert_parity(hf_model, cfg_b, params_b, seed=1)


def test_bf16_checkpoint(tmp_path):
    hf_model = make_hf("falcon", FALCON_CASES["new_arch_kv2_bias"], seed=4)
    with torch.no_grad():  # bf16-representable weights; the fp32 model stays the reference
        for p in hf_model.parameters():
            p.copy_(p.bfloat16().float())
    # A bf16 copy for saving: `.to(bfloat16)` also rounds the rotary inv_freq buffer.
    path = save(copy.deepcopy(hf_model).to(torch.bfloat16), tmp_path)
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="numpy") as f:
        key = "transformer.h.0.self_attention.query_key_value.weight"
        assert f.get_slice(key).get_dtype() == "BF16"
        mapped = hf_checkpoint.safetensors_tensors(path)[key]  # our memory-mapped view agrees
        assert mapped.dtype == jnp.bfloat16
        np.testing.assert_array_equal(mapped.astype(np.float32),
                                      f.get_tensor(key).astype(np.float32))
    cfg32, p32 = load_hf_checkpoint(path, dtype="float32")
    cfg16, p16 = load_hf_checkpoint(path, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    # bf16 -> fp32 is exact, so both loads hold the same numbers.
    _assert_tree_equal(p32, jax.tree.map(lambda x: x.astype(jnp.float32), p16))
    _assert_parity(hf_model, cfg32, p32)


_SHARDED_LOAD = textwrap.dedent("""
    import sys, jax, numpy as np
    from bita_jax import models
    from bita_jax import sharding
    from bita_jax.checkpoints import hf as hf_checkpoint

    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh(2, 4)
    for path in sys.argv[1:]:
        cfg, ref = hf_checkpoint.load_hf_checkpoint(path)  # assembled on the host, one device
        for rules in (sharding.DEFAULT_RULES, sharding.FSDP_RULES):
            shardings = sharding.param_shardings(cfg, mesh, rules)
            _, params = hf_checkpoint.load_hf_checkpoint(path, shardings=shardings)
            assert jax.tree.structure(params) == jax.tree.structure(ref)
            assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(ref))
            split = 0
            for (kp, r), x, want in zip(jax.tree_util.tree_leaves_with_path(ref),
                                        jax.tree.leaves(params), jax.tree.leaves(shardings)):
                r = np.asarray(r)
                assert x.dtype == r.dtype and x.shape == r.shape, kp
                assert x.sharding.is_equivalent_to(want, x.ndim), (kp, x.sharding, want)
                for shard in x.addressable_shards:  # each device holds exactly its part
                    np.testing.assert_array_equal(np.asarray(shard.data), r[shard.index],
                                                  err_msg=str(kp))
                split += x.sharding.shard_shape(x.shape) != x.shape
            assert split >= 6, (path, split)  # the big leaves really are split
        print("OK", path, split)
""")


def test_sharded_load_on_8_devices(tmp_path):
    """Each device's shard, read straight from the memory-mapped safetensors, equals that part
    of the host-assembled load: LLaMA and Falcon (fused QKV), one file and several."""
    llama = save(make_hf("llama", LLAMA_CASES["kv4_bias"], seed=8), tmp_path / "llama",
                  max_shard_size="20KB")
    falcon = save(make_hf("falcon", FALCON_CASES["new_arch_kv2_bias"], seed=9),
                   tmp_path / "falcon")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, llama, falcon], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("OK") == 2, proc.stdout


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save(make_hf("llama", LLAMA_CASES["kv2_untied"], seed=7),
                 tmp_path_factory.mktemp("llama"))


def _edited_copy(src, dst, edit):
    """Copies a HF dir with its safetensors dict passed through `edit`."""
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        config = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(config)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file(edit(dict(tensors)), os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_alibi_falcon_is_rejected(tmp_path):
    FalconConfig(**{**FALCON, "alibi": True}).save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="ALiBi"):
        load_hf_checkpoint(str(tmp_path))


def test_unknown_key_is_named(llama_dir, tmp_path):
    key = "model.layers.0.self_attn.extra_proj.weight"
    path = _edited_copy(llama_dir, tmp_path / "x",
                        lambda t: {**t, key: np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_hf_checkpoint(path)


def test_inv_freq_buffer_is_ignored(llama_dir, tmp_path):
    key = "model.layers.0.self_attn.rotary_emb.inv_freq"
    path = _edited_copy(llama_dir, tmp_path / "x",
                        lambda t: {**t, key: np.zeros((8,), np.float32)})
    _assert_tree_equal(load_hf_checkpoint(path)[1], load_hf_checkpoint(llama_dir)[1])


def test_missing_tensor_is_named(llama_dir, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    path = _edited_copy(llama_dir, tmp_path / "x",
                        lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=r"layers/mlp/up_proj/kernel .*layers \[1\]"):
        load_hf_checkpoint(path)


def test_wrong_shape_names_leaf_and_shapes(llama_dir, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight"
    path = _edited_copy(llama_dir, tmp_path / "x",
                        lambda t: {**t, key: np.zeros((48, 64), np.float32)})
    pattern = r"\(48, 64\).*layers/attn/k_proj/kernel.*\(64, 2, 16\)"
    with pytest.raises(CheckpointError, match=pattern):
        load_hf_checkpoint(path)


def test_bias_the_config_lacks_is_rejected(llama_dir, tmp_path):
    key = "model.layers.0.self_attn.q_proj.bias"
    path = _edited_copy(llama_dir, tmp_path / "x", lambda t: {**t, key: np.zeros(64, np.float32)})
    with pytest.raises(CheckpointError, match="layers/attn/q_proj/bias"):
        load_hf_checkpoint(path)


def test_tied_head_must_equal_embedding(llama_dir, tmp_path):
    def tie(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0
        return t

    path = _edited_copy(llama_dir, tmp_path / "x", tie)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = True
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_hf_checkpoint(path)


def test_missing_files(llama_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "cfg_only").mkdir()
    with open(os.path.join(llama_dir, "config.json")) as f:
        (tmp_path / "cfg_only" / "config.json").write_text(f.read())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_checkpoint(str(tmp_path / "cfg_only"))
    shard = "model-00001-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": {"model.norm.weight": shard}}
    (tmp_path / "cfg_only" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*missing"):
        load_hf_checkpoint(str(tmp_path / "cfg_only"))


def test_corrupt_safetensors_is_named(llama_dir, tmp_path):
    """A truncated or garbage weights file gets a CheckpointError naming it, not a numpy error."""
    data = open(os.path.join(llama_dir, "model.safetensors"), "rb").read()
    for case, content, pattern in [("truncated", data[: len(data) // 2], "truncated"),
                                   ("garbage", b"not a safetensors file at all", "cannot read"),
                                   ("empty", b"", "cannot read")]:
        path = tmp_path / case
        path.mkdir()
        (path / "config.json").write_text(open(os.path.join(llama_dir, "config.json")).read())
        (path / "model.safetensors").write_bytes(content)
        with pytest.raises(CheckpointError, match=pattern):
            load_hf_checkpoint(str(path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        load_hf_checkpoint(str(tmp_path))
