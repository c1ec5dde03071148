"""The chunked LM-head loss (`training.token_stats`, issue 15): chunks of positions give the
one-piece loss, metrics and gradients for BiTA and both SPACE layouts, full fine-tuning
included, and the compiled step really holds less than the whole batch's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models, sharding
from bita_jax.models.config import ModelConfig
from bita_jax.training import batches, run_config, samples, sar_samples
from bita_jax.training import step as step_lib
from bita_jax.training.token_stats import logit_stats, token_stats

V = 96
CFG = ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def _base(cfg=CFG, seed=1):
    # weights 10x the init's std: O(1) logits, so top-1 and top-5 hits are neither all nor none
    base = models.init_params(cfg, jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if path[-1].key == "scale" else 10.0 * x, base)


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_ids": rng.integers(0, V, int(rng.integers(3, 7))),
             "response_ids": rng.integers(0, V, int(rng.integers(9, 20)))} for _ in range(n)]


def _close(a, b, what):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b) > 0, what
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7,
                                   err_msg=what)


@pytest.mark.parametrize("chunk", [1, 5, 7, 16])
def test_chunks_equal_one_piece(chunk):
    """nll, hits and top-k hits per position, with unlabelled positions and a length that the
    chunk does not divide (T = 11)."""
    base = _base()
    hidden = jax.random.normal(jax.random.key(2), (3, 11, CFG.hidden_size))
    labels = jax.random.randint(jax.random.key(3), (3, 11), -1, V)
    labels = labels.at[1].set(-1)  # a row without targets
    want = logit_stats(models.lm_logits(CFG, base, hidden), labels, topk=5)
    got = token_stats(CFG, base, hidden, labels, chunk=chunk, topk=5)
    np.testing.assert_allclose(got.nll, want.nll, rtol=1e-6, atol=1e-6)
    assert np.array_equal(got.hit, want.hit) and np.array_equal(got.in_top, want.in_top)
    valid = np.asarray(labels >= 0)
    assert np.all(np.asarray(got.nll)[~valid] == 0) and np.all(np.asarray(got.nll)[valid] > 0)
    assert 0 < int(got.hit.sum()) < int(got.in_top.sum()) < valid.sum()


def _bita_batch():
    spec = samples.SampleSpec(num_masks=2, max_groups=4, cutoff=24)
    batch = batches.BatchStream(_records(4), spec, batch_size=4, seed=0).batch(0)
    return spec, {k: jnp.asarray(v) for k, v in batch.items()}


def _group_batch():
    spec = sar_samples.SarGroupSpec(num_masks=3, max_groups=4, cutoff=24)
    batch = batches.stack([sar_samples.build_group_sample(r["prompt_ids"], r["response_ids"],
                                                          spec, np.random.default_rng(i))
                           for i, r in enumerate(_records(3))])
    return spec, {k: jnp.asarray(v) for k, v in batch.items()}


def _cut_batch():
    spec = sar_samples.SarSpec(num_masks=3, cutoff=24, mask_prob=0.5, vocab_size=V)
    rng = np.random.default_rng(0)
    batch = batches.stack([sar_samples.build_sample(r["prompt_ids"], r["response_ids"], spec, rng)
                           for r in _records(4)])
    assert (batch["tokens"] >= V).any(), "no sample was cut"
    return spec, {k: jnp.asarray(v) for k, v in batch.items()}


def _perturbed(params, seed=5):
    keys = iter(jax.random.split(jax.random.key(seed), 256))
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params)


@pytest.mark.parametrize("method", ["bita", "space-groups", "space-cut", "space-full"])
def test_loss_metrics_and_gradients_equal_one_piece(method):
    base = _base()
    if method == "bita":
        bcfg = models.BitaConfig(num_prefix=4, num_masks=2, lora_rank=4)
        spec, batch = _bita_batch()
    else:
        bcfg = models.BitaConfig(num_masks=3, lora_rank=0 if method == "space-full" else 4,
                                 method="space")
        spec, batch = _cut_batch() if method == "space-cut" else _group_batch()
    params = _perturbed(models.init_bita_params(CFG, bcfg, jax.random.key(0), base))
    frozen = {} if bcfg.trains_base else base
    results = {}
    for chunk in (0, 5):
        loss = step_lib.method_loss(CFG, bcfg, spec, train=False, loss_chunk=chunk)
        (value, metrics), grads = jax.value_and_grad(
            lambda p, loss=loss: loss(p, frozen, batch, jax.random.split(jax.random.key(0), 4)),
            has_aux=True)(params)
        evals = step_lib.eval_step(params, frozen, batch, cfg=CFG, spec=spec, bcfg=bcfg,
                                   loss_chunk=chunk, topk=V // 2)
        results[chunk] = value, metrics, grads, evals
    (v0, m0, g0, e0), (v5, m5, g5, e5) = results[0], results[5]
    np.testing.assert_allclose(float(v5), float(v0), rtol=1e-6)
    for m, e in ((m5, m0), (e5, e0)):
        assert set(m) == set(e)
        for k in m:
            if k == "nll":
                np.testing.assert_allclose(float(m[k]), float(e[k]), rtol=1e-6)
            else:
                assert np.array_equal(m[k], e[k]), k
    # the top-k path really ran: half the vocabulary holds about half the random targets
    assert int(e0[f"correct{V // 2}"].sum()) > int(e0["correct"].sum())
    _close(g5, g0, method)
    moved = [float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0)]
    assert min(moved) > 0, moved  # every trainable leaf gets a gradient (the tied head too)
    if method == "space-full":
        assert float(jnp.max(jnp.abs(g0["base"]["embed"]["embedding"]))) > 0


def test_chunked_step_holds_less_than_the_logits():
    """The compiled gradient of the chunked SPACE loss needs less scratch memory than the
    batch's [B, T, V] fp32 logits alone, where the one-piece loss needs more."""
    cfg = ModelConfig(arch="llama", vocab_size=16384, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
    spec = sar_samples.SarGroupSpec(num_masks=3, max_groups=2, cutoff=128)
    b, t = 8, 128
    batch = {"tokens": jnp.zeros((b, t), jnp.int32), "ar_labels": jnp.zeros((b, t), jnp.int32),
             "anchors": jnp.ones((b, 2), jnp.int32), "labels": jnp.zeros((b, 6), jnp.int32)}
    bcfg = models.BitaConfig(num_masks=3, lora_rank=2, method="space")
    params = models.init_bita_params(cfg, bcfg, jax.random.key(0))
    base = models.init_params(cfg, jax.random.key(1))
    logits_bytes = b * t * cfg.vocab_size * 4  # 64 MiB

    def scratch(chunk):
        loss = step_lib.method_loss(cfg, bcfg, spec, loss_chunk=chunk)
        grad = jax.jit(jax.grad(lambda p: loss(p, base, batch, None)[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    # measured: 139 MiB in one piece, 16 MiB in chunks of 8 positions
    one_piece, chunked = scratch(0), scratch(8)
    assert one_piece > 2 * logits_bytes > 6 * chunked, (one_piece, chunked)


def test_train_step_with_chunks_equals_one_piece():
    """The jitted, sharded train step of `run.loss_chunk` moves the params as the one-piece
    step does."""
    base = _base()
    bcfg = models.BitaConfig(num_masks=3, lora_rank=4, method="space")
    spec, batch = _group_batch()
    tx = step_lib.make_optimizer(1e-2, total_steps=10, lora_learning_rate=1e-3)
    mesh = sharding.make_mesh(1, 1)
    out = []
    for chunk in (0, 7):
        params, opt_state = step_lib.init_state(CFG, bcfg, tx, jax.random.key(0), mesh)
        step = step_lib.make_train_step(CFG, bcfg, spec, tx, mesh, loss_chunk=chunk)
        out.append(jax.device_get(step(params, opt_state, base, batch, jax.random.key(1))))
    (p0, _, m0), (p7, _, m7) = out
    _close(p7, p0, "params after one step")
    np.testing.assert_allclose(float(m7["loss"]), float(m0["loss"]), rtol=1e-6)
    with pytest.raises(run_config.ConfigFileError, match="loss_chunk must be >= 0"):
        run_config.RunConfig(loss_chunk=-1)
