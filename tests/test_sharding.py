"""Sharding rules: coverage, loud failures, and sharded == unsharded on 8 simulated CPU devices.

XLA_FLAGS must be set before jax initialises its backends, and other test files import jax first
in the same pytest process, so the multi-device check runs in a fresh `python -c` subprocess.
"""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from bita_jax import models, sharding
from bita_jax.models.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
MESH_8 = {"data": 2, "model": 4}

LLAMA = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
FALCON_NEW = ModelConfig(arch="falcon", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8,
                         new_decoder_architecture=True, tie_word_embeddings=True,
                         attention_bias=True, mlp_bias=True)
CONFIGS = {
    "llama": LLAMA,
    "llama_bias_untied": LLAMA.replace(attention_bias=True, mlp_bias=True),
    "falcon_7b_style": FALCON_NEW.replace(new_decoder_architecture=False, num_kv_heads=1),
    "falcon_sequential": FALCON_NEW.replace(new_decoder_architecture=False, parallel_attn=False,
                                            num_kv_heads=8),
    "falcon_new": FALCON_NEW,
    "falcon_new_one_ln": FALCON_NEW.replace(num_ln_in_parallel_attn=1),
}


def _names(tree) -> set[str]:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple))
    return {name for names in leaves for name in names}


@pytest.mark.parametrize("rules", [sharding.DEFAULT_RULES, sharding.FSDP_RULES],
                         ids=["default", "fsdp"])
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_rules_cover_every_logical_name(key, rules):
    cfg = CONFIGS[key]
    table = dict(rules)
    names = _names(models.logical_axes(cfg))
    assert names <= set(table), names - set(table)
    assert names >= {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "norm", "mlp"}
    specs = sharding.param_specs(cfg, MESH_8, rules)
    assert jax.tree.structure(specs) == jax.tree.structure(models.abstract_params(cfg))


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_fsdp_differs_from_default_exactly_in_embed_dims(key):
    """Per parameter and dimension: FSDP shards the dims named 'embed' over 'data', where the
    default rules replicate them, and agrees with the default everywhere else."""
    cfg = CONFIGS[key]
    names = jax.tree.leaves(models.logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    default, fsdp = (jax.tree.leaves(sharding.param_specs(cfg, MESH_8, rules),
                                     is_leaf=lambda x: isinstance(x, P))
                     for rules in (sharding.DEFAULT_RULES, sharding.FSDP_RULES))
    assert len(names) == len(default) == len(fsdp)
    embed_dims = 0
    for leaf_names, d, f in zip(names, default, fsdp):
        assert len(d) == len(f) == len(leaf_names)
        for name, d_axis, f_axis in zip(leaf_names, d, f):
            if name == "embed":
                embed_dims += 1
                assert (d_axis, f_axis) == (None, "data"), (leaf_names, d, f)
            else:
                assert d_axis == f_axis, (leaf_names, d, f)
    assert embed_dims >= 6  # embedding, attention, MLP (and head) kernels all have one
    # Activations: the batch dim over 'data' under both tables, nothing else sharded.
    for rules in (sharding.DEFAULT_RULES, sharding.FSDP_RULES):
        assert sharding.logical_to_spec(("batch", "length", None), None, MESH_8, rules) == P(
            "data", None, None)


def test_large_params_get_model_axis_specs():
    specs = sharding.param_specs(LLAMA, MESH_8)
    attn = specs["layers"]["attn"]
    assert attn["q_proj"]["kernel"] == P(None, None, "model", None)
    assert attn["k_proj"]["kernel"] == P(None, None, "model", None)
    assert attn["o_proj"]["kernel"] == P(None, "model", None, None)
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "model", None)
    assert specs["embed"]["embedding"] == P("model", None)
    assert specs["lm_head"]["kernel"] == P(None, "model")
    fsdp = sharding.param_specs(LLAMA, MESH_8, sharding.FSDP_RULES)
    assert fsdp["layers"]["attn"]["q_proj"]["kernel"] == P(None, "data", "model", None)
    assert fsdp["embed"]["embedding"] == P("model", "data")


def test_unmatched_name_raises_with_path_and_name():
    rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "mlp")
    with pytest.raises(ValueError, match=r"layers/mlp/\w+_proj/kernel: logical axis 'mlp'"):
        sharding.param_specs(LLAMA, MESH_8, rules)
    with pytest.raises(ValueError, match=r"w: logical axis 'experts'"):
        sharding.logical_to_spec(("experts", "embed"), (4, 64), MESH_8, what="w")


def test_bad_rules_raise():
    with pytest.raises(ValueError, match="two rules"):
        sharding.logical_to_spec(("embed",), (64,), MESH_8,
                                 sharding.DEFAULT_RULES + (("embed", "data"),))
    with pytest.raises(ValueError, match="mesh axis 'tensor'"):
        sharding.logical_to_spec(("mlp",), (128,), MESH_8, (("mlp", "tensor"),))
    with pytest.raises(ValueError, match="would shard two dimensions"):
        sharding.logical_to_spec(("heads", "head_dim"), (8, 8), MESH_8,
                                 (("heads", "model"), ("head_dim", "model")))
    with pytest.raises(ValueError, match="logical axes"):
        sharding.logical_to_spec(("embed",), (4, 64), MESH_8)


def test_indivisible_dim_is_replicated_with_warning(caplog):
    # SmolLM2-like: 3 kv heads on a model axis of 4 (query heads 12 still divide).
    cfg = LLAMA.replace(num_heads=12, num_kv_heads=3)
    with caplog.at_level(logging.WARNING, logger="bita_jax.sharding"):
        specs = sharding.param_specs(cfg, MESH_8)
    attn = specs["layers"]["attn"]
    assert attn["k_proj"]["kernel"] == P(None, None, None, None)
    assert attn["v_proj"]["kernel"] == P(None, None, None, None)
    assert attn["q_proj"]["kernel"] == P(None, None, "model", None)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert any("layers/attn/k_proj/kernel" in m and "'kv_heads'" in m and "size 3" in m
               and "size 4" in m for m in messages), messages


def test_make_mesh_rejects_wrong_device_count():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"{n} are available"):
        sharding.make_mesh(n + 1, 2)
    mesh = sharding.make_mesh(1, n)
    assert mesh.axis_names == ("data", "model")
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
    assert sharding.batch_sharding(mesh, 3).spec == P("data", None, None)
    assert sharding.replicated(mesh).spec == P()


_MULTI_DEVICE = textwrap.dedent("""
    import logging
    import jax, jax.numpy as jnp, numpy as np
    from bita_jax import models
    from bita_jax import sharding
    from bita_jax.models.config import ModelConfig

    logging.basicConfig(level=logging.WARNING)
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh(data=2, model=4)
    llama = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
    # Falcon-40B-style; 2 kv heads on a model axis of 4 are replicated (with a warning).
    falcon = ModelConfig(arch="falcon", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8,
                         new_decoder_architecture=True, tie_word_embeddings=True,
                         attention_bias=True, mlp_bias=True)
    B, T = 4, 8

    def logits_fn(cfg):
        def fn(params, tokens, positions):
            mask = jnp.tril(jnp.ones((T, T), bool))
            hidden, _ = models.forward(cfg, params, tokens, positions, mask)
            return models.lm_logits(cfg, params, hidden)
        return fn

    for name, cfg in [("llama", llama), ("falcon", falcon)]:
        params = models.init_params(cfg, jax.random.key(1))
        tokens = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        fn = logits_fn(cfg)
        one = jax.device_put((params, tokens, positions), jax.devices()[0])
        want = np.asarray(jax.jit(fn)(*one))
        for rules_name, rules in [("default", sharding.DEFAULT_RULES),
                                  ("fsdp", sharding.FSDP_RULES)]:
            shardings = sharding.param_shardings(cfg, mesh, rules)
            sharded = sharding.shard_params(params, shardings)
            tok_s = sharding.batch_sharding(mesh, 2)
            out_s = sharding.batch_sharding(mesh, 3, rules)
            step = jax.jit(fn, in_shardings=(shardings, tok_s, tok_s), out_shardings=out_s)
            got = step(sharded, jax.device_put(tokens, tok_s), jax.device_put(positions, tok_s))
            assert got.sharding.is_equivalent_to(out_s, 3), got.sharding
            assert got.sharding.shard_shape(got.shape) == (B // 2, T, cfg.vocab_size)
            diff = float(np.max(np.abs(np.asarray(got) - want)))
            assert diff <= 1e-5, (name, rules_name, diff)

            q = sharded["layers"]["attn"]["q_proj"]["kernel"]  # [L, E, N, D]
            assert q.sharding.shard_shape(q.shape)[2] == cfg.num_heads // 4, q.sharding
            emb = sharded["embed"]["embedding"]  # [V, E]
            assert emb.sharding.shard_shape(emb.shape)[0] == cfg.vocab_size // 4, emb.sharding
            up = sharded["layers"]["mlp"]["up_proj"]["kernel"]  # [L, E, F]
            assert up.sharding.shard_shape(up.shape)[2] == cfg.intermediate_size // 4
            k = sharded["layers"]["attn"]["k_proj"]["kernel"]  # [L, E, K, D]
            kv_shard = cfg.num_kv_heads // 4 if cfg.num_kv_heads % 4 == 0 else cfg.num_kv_heads
            assert k.sharding.shard_shape(k.shape)[2] == kv_shard, k.sharding
            embed_shard = 64 // 2 if rules_name == "fsdp" else 64
            assert q.sharding.shard_shape(q.shape)[1] == embed_shard, q.sharding
            assert len(q.addressable_shards) == 8
            if "lm_head" in sharded:
                head = sharded["lm_head"]["kernel"]  # [E, V]
                assert head.sharding.shard_shape(head.shape)[1] == cfg.vocab_size // 4
            print(f"OK {name} {rules_name} max_abs_diff={diff:.2e}")

    bad = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "heads")
    try:
        sharding.param_shardings(llama, mesh, bad)
    except ValueError as e:
        assert "layers/attn/" in str(e) and "logical axis 'heads'" in str(e), e
        print("OK unknown name raises:", e)
    else:
        raise AssertionError("a logical name without a rule did not raise")
""")


def test_sharded_forward_matches_single_device_on_8_cpus():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, report
    for line in ("OK llama default", "OK llama fsdp", "OK falcon default", "OK falcon fsdp",
                 "OK unknown name raises"):
        assert line in proc.stdout, report
    # Falcon's 2 kv heads on the model axis of 4: replicated, visibly.
    assert "layers/attn/k_proj/kernel" in proc.stderr and "replicating" in proc.stderr, report
