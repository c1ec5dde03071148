"""SPACE (issue 15): SAR-SFT samples checked by hand, its loss and LoRA training end to end
(train, export, resume), and decoding with the chain that equals the fine-tuned model's own
greedy decoding token for token."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.tree import Tree
from bita_jax.models import bita_params as bita_lib
from bita_jax.models import lora as lora_lib
from bita_jax.models.config import ModelConfig
from bita_jax.training import batches, loop, run_config, sar_samples
from bita_jax.training import sar_loss as sar_loss_lib
from bita_jax.training import step as step_lib
from tests.test_train import _records

V = 50
SRC = [10, 11, 12]
TGT = [20, 21, 22, 23, 24, 25, 26]  # 26 = EOS
SPEC = sar_samples.SarSpec(num_masks=3, cutoff=14, mask_prob=0.5, vocab_size=V)


class _Draws:
    """An rng stand-in: `random` returns `u` (cut when u < mask_prob), `integers` the cut c."""

    def __init__(self, u, c=None):
        self.u, self.c = u, c

    def random(self):
        return self.u

    def integers(self, low, high):
        assert low <= self.c < high, (low, self.c, high)
        return self.c


def test_cut_sample_by_hand():
    s = sar_samples.build_sample(SRC, TGT, SPEC, _Draws(0.2, c=2))
    #          src          tgt[:2]   masks 0, 1, 2            padding
    assert s["tokens"].tolist() == [10, 11, 12, 20, 21, 50, 51, 52, 0, 0, 0, 0, 0, 0]
    # slot 2 (last prompt token) predicts tgt[0]; slots 3, 4 predict tgt[1], tgt[2] (= tgt[c]);
    # mask k (slots 5, 6, 7) predicts tgt[c + 1 + k] = 23, 24, 25
    assert s["labels"].tolist() == [-1, -1, 20, 21, 22, 23, 24, 25, -1, -1, -1, -1, -1, -1]


def test_cut_right_after_the_prompt_and_at_the_last_point():
    s = sar_samples.build_sample(SRC, TGT, SPEC, _Draws(0.0, c=0))
    assert s["tokens"][:6].tolist() == [10, 11, 12, 50, 51, 52]
    assert s["labels"][:6].tolist() == [-1, -1, 20, 21, 22, 23]
    last = len(TGT) - SPEC.num_masks - 1  # c = 3: the masks' targets end at the EOS
    s = sar_samples.build_sample(SRC, TGT, SPEC, _Draws(0.0, c=last))
    assert s["labels"][:9].tolist() == [-1, -1, 20, 21, 22, 23, 24, 25, 26]
    with pytest.raises(AssertionError):  # a cut past it would leave a mask without a target
        sar_samples.build_sample(SRC, TGT, SPEC, _Draws(0.0, c=last + 1))


def test_uncut_sample_is_plain_sft_and_the_cutoff_truncates():
    s = sar_samples.build_sample(SRC, TGT, SPEC, _Draws(0.7))
    assert s["tokens"].tolist() == SRC + TGT + [0] * 4
    assert s["labels"].tolist() == [-1, -1] + TGT + [-1] * 5
    short = sar_samples.SarSpec(num_masks=3, cutoff=7, mask_prob=1.0, vocab_size=V)
    s = sar_samples.build_sample(SRC, TGT, short, _Draws(0.0, c=0))  # tgt cut to 4 tokens
    assert s["tokens"].tolist() == [10, 11, 12, 50, 51, 52, 0]
    assert s["labels"].tolist() == [-1, -1, 20, 21, 22, 23, -1]
    # too short to cut (M + 1 response tokens needed): plain SFT whatever the draw
    s = sar_samples.build_sample(SRC, TGT[:3], SPEC, _Draws(0.0, c=0))
    assert s["tokens"][:6].tolist() == SRC + TGT[:3]


def test_mask_prob_is_the_share_of_cut_samples():
    rng = np.random.default_rng(0)
    cut = [int((sar_samples.build_sample(SRC, TGT, SPEC, rng)["tokens"] >= V).any())
           for _ in range(2000)]
    assert 0.46 < np.mean(cut) < 0.54
    with pytest.raises(ValueError, match="mask_prob"):
        sar_samples.SarSpec(num_masks=3, cutoff=14, mask_prob=1.5, vocab_size=V)


CFG = ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def _space_params(cfg, rank=4, seed=0):
    bcfg = models.BitaConfig(num_masks=3, lora_rank=rank, method="space")
    params = models.init_bita_params(cfg, bcfg, jax.random.key(seed))
    assert set(params) == {"mask_embed", "lora"}  # no prefix
    return bcfg, params


def test_sar_loss_metrics_and_gradients():
    base = models.init_params(CFG, jax.random.key(1))
    bcfg, params = _space_params(CFG)
    batch = {k: jnp.asarray(v) for k, v in batches.stack(
        [sar_samples.build_sample(SRC, TGT, SPEC, _Draws(u, c=2)) for u in (0.2, 0.9)]).items()}
    loss, metrics = sar_loss_lib.sar_loss_fn(params, base, batch, cfg=CFG, spec=SPEC)
    assert metrics["count"].tolist() == [1, 1, 1] and int(metrics["ar_count"]) == 3 + 7
    # the loss is the mean over the 13 targets of an explicit log-softmax
    logits = sar_loss_lib.sar_logits(CFG, params, base, batch)
    logp = jax.nn.log_softmax(logits)
    labels = np.asarray(batch["labels"])
    want = -np.mean([logp[b, t, labels[b, t]] for b, t in zip(*np.nonzero(labels >= 0))])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    grads = jax.grad(lambda p: sar_loss_lib.sar_loss_fn(p, base, batch, cfg=CFG, spec=SPEC)[0])(
        params)
    assert float(jnp.max(jnp.abs(grads["mask_embed"]))) > 0
    for target, ab in grads["lora"].items():  # b starts at 0: only b moves on the first step
        assert float(jnp.max(jnp.abs(ab["b"]))) > 0, target


@pytest.mark.parametrize("cfg", [
    CFG,
    ModelConfig(arch="falcon", vocab_size=V, hidden_size=32, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=1, head_dim=8, parallel_attn=True,
                tie_word_embeddings=True, max_position_embeddings=256),
], ids=["llama", "falcon-mqa"])
def test_space_decoding_equals_the_fine_tuned_models_greedy(cfg):
    """A random (non-zero) LoRA and mask embeddings: the chain decoding of the fine-tuned model
    gives its own greedy tokens, at batch 1 and 4, and differs from the base model's."""
    base = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(3)))
    bcfg, params = _space_params(cfg)
    keys = iter(jax.random.split(jax.random.key(9), 64))
    params["lora"] = jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape),
                                  params["lora"])
    tuned, drafts = bita_lib.decoding_params(base, params, bcfg)
    assert set(drafts) == {"mask_embed"}
    prompts = [[5, 17, 33, 2, 40], [44], list(range(1, 21)), [7] * 8 + [30, 31, 32]]
    tree = Tree.make("chain", 3)
    for batch, n in ((prompts, 31), (prompts[2:3], 17)):
        want = Generator(cfg, tuned).generate(batch, n).tokens
        got = BitaGenerator(cfg, tuned, drafts, tree).generate(batch, n).tokens
        assert got == want
    assert Generator(cfg, base).generate(prompts, 31).tokens != want


def _config(tmp_path, **run):
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in _records(vocab=V)))
    raw = {"model": {"random_init": True, "hf_config": {
               "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": V, "max_position_embeddings": 256}},
           "bita": {"num_masks": 3, "lora_rank": 4, "method": "space"},
           "run": {"learning_rate": 1e-2, "batch_size": 4, "steps": 8, "cutoff": 32,
                   "checkpoint_every": 4, "data": str(data), "eval_data": str(data),
                   "eval_batches": 2, "out_dir": str(tmp_path / "run"), "fast_compile": True,
                   **run}}
    return run_config.from_dict(raw)


def test_space_training_runs_resumes_exactly_and_exports(tmp_path):
    tc = _config(tmp_path)
    assert loop.train(tc, quiet=True, stop_at=4) == 0
    assert loop.train(tc, quiet=True, resume=True) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "grad_norm" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and len(evals[-1]["eval_acc"]) == 3 and 0 <= evals[-1]["eval_ar_acc"] <= 1

    (tmp_path / "one").mkdir()
    assert loop.train(_config(tmp_path / "one"), quiet=True) == 0
    a = models.load_adapter(tmp_path / "run" / "adapter", CFG)
    b = models.load_adapter(tmp_path / "one" / "run" / "adapter", CFG)
    assert a[1].method == "space" and set(a[0]) == {"mask_embed", "lora"}
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # resumed == uninterrupted


def test_space_without_a_lora_trains_the_whole_model():
    full = models.BitaConfig(method="space")
    assert full.trains_base and not models.BitaConfig(method="space", lora_rank=2).trains_base
    shapes = models.param_shapes(CFG, full)
    assert models.count_trainable(CFG, full) == models.count_params(
        models.abstract_params(CFG)) + 3 * 32
    assert "base.layers.attn.q_proj.kernel" in shapes and "prefix" not in shapes
    with pytest.raises(ValueError, match="pass base_params"):
        models.init_bita_params(CFG, full, jax.random.key(0))
    assert lora_lib.count_lora(CFG, models.BitaConfig(method="space", lora_rank=2).lora) > 0


def test_space_dry_run_counts_the_lora_and_masks():
    from bita_jax.training import memory_plan

    tc = run_config.load_config(pathlib.Path(__file__).parents[1] / "configs" /
                                "smollm2-135m-space.yaml")
    est = memory_plan.estimate(tc, devices=1)
    # per layer r * (I + O) over q, k, v, o, gate, up, down of SmolLM2 (E 576, kv 192, F 1536)
    per_layer = 16 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 3 * (576 + 1536))
    assert est["trainable_params"] == 30 * per_layer + 5 * 576 == 4_887_360
    assert "prefix" not in est["param_shapes"]
    assert est["sample"] == {"tokens": 384, "mask_tokens": 32 * 5}  # 32 groups of 5 masks
    breakdown = est["memory_per_device_bytes"]["activations_breakdown"]
    assert breakdown["logits"] == 3 * 8 * (384 + 160) * 49152 * 4  # batch 8 x slots x V, fp32


def test_full_fine_tuning_trains_every_weight_and_decodes_losslessly(tmp_path):
    """bita.lora_rank 0: SPACE fine-tunes the whole base; the adapter holds the tuned model,
    and SPACE's chain decoding equals that model's greedy."""
    tc = _config(tmp_path, steps=4)
    tc = run_config.from_dict({**tc.to_dict(), "bita": {"num_masks": 3, "lora_rank": 0,
                                                         "method": "space"}})
    assert loop.train(tc, quiet=True) == 0
    params, bcfg, _ = models.load_adapter(tmp_path / "run" / "adapter", CFG)
    assert bcfg.trains_base and set(params) == {"mask_embed", "base"}
    base = models.init_params(CFG, jax.random.key(0))  # model.random_init seed 0
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(params["base"]), jax.tree.leaves(base))]
    assert 0 < min(moved) and max(moved) < 0.05  # every weight trained, 4 Adam steps of 1e-2
    tuned, drafts = bita_lib.decoding_params(base, params, bcfg)
    prompts = [[5, 17, 33, 2, 40], list(range(1, 21))]
    want = Generator(CFG, tuned).generate(prompts, 20).tokens
    assert BitaGenerator(CFG, tuned, drafts, Tree.make("chain", 3)).generate(prompts, 20).tokens \
        == want


_FULL_FT_ON_A_MESH = r"""
import json, pathlib, sys
import jax
from bita_jax.training import loop, run_config
raw = json.loads(sys.argv[1])
assert jax.device_count() == int(sys.argv[2])
trainer = loop.Trainer(run_config.from_dict(raw), quiet=True)
kernel = trainer.params["base"]["layers"]["mlp"]["up_proj"]["kernel"]  # [L, E, F]
mu = [x for x in jax.tree.leaves(trainer.opt_state) if x.shape == kernel.shape]
shards = {tuple(kernel.sharding.shard_shape(kernel.shape))} | {
    tuple(m.sharding.shard_shape(m.shape)) for m in mu}
print("SHARDS", json.dumps(sorted(shards), separators=(",", ":")), len(mu))
assert trainer.base_params == {}
assert trainer.run() == 0
"""


def test_full_fine_tuning_on_8_devices_equals_one(tmp_path):
    """FSDP on a (data 2, model 4) mesh of 8 simulated devices: the losses and the tuned
    weights of one device."""
    import subprocess
    import sys

    from tests.test_train import REPO, _env

    outs = {}
    for name, devices, mesh, fsdp in (("one", 1, [1, 1], False), ("eight", 8, [2, 4], True)):
        (tmp_path / name).mkdir()
        raw = _config(tmp_path / name, steps=3, mesh=mesh, fsdp=fsdp, eval_data=None,
                      batch_size=4).to_dict()
        raw["bita"] = {"num_masks": 3, "lora_rank": 0, "method": "space"}
        proc = subprocess.run([sys.executable, "-c", _FULL_FT_ON_A_MESH, json.dumps(raw),
                               str(devices)], cwd=REPO, env=_env(devices=devices, fast=True),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        shards = [x for x in proc.stdout.splitlines() if x.startswith("SHARDS")][0].split()
        # the up projection [L=2, E=32, F=64] and the Adam moments of that shape (gate's
        # too): E split over data (FSDP), F over model
        want = [[2, 32, 64]] if devices == 1 else [[2, 16, 16]]
        assert json.loads(shards[1]) == want and int(shards[2]) == 4, proc.stdout
        rows = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        outs[name] = ([json.loads(r)["loss"] for r in rows if "grad_norm" in r],
                      models.load_adapter(tmp_path / name / "run" / "adapter", CFG)[0])
    np.testing.assert_allclose(outs["eight"][0], outs["one"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(outs["eight"][1]), jax.tree.leaves(outs["one"][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_a_lora_step_moves_only_the_trainable_pytree():
    """One jitted SPACE step: the LoRA and masks move, the frozen base comes back untouched
    (bit for bit), and Adam's moments mirror the trainable pytree alone."""
    import optax

    from bita_jax import sharding

    base = models.init_params(CFG, jax.random.key(1))
    bcfg = models.BitaConfig(num_masks=3, lora_rank=4, method="space")
    tx = step_lib.make_optimizer(1e-2, total_steps=4)
    mesh = sharding.make_mesh(1, 1)
    params, opt_state = step_lib.init_state(CFG, bcfg, tx, jax.random.key(0), mesh)
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    assert jax.tree.structure(adam[0].mu) == jax.tree.structure(params)
    before = jax.tree.map(np.asarray, (params, base))
    batch = {k: jnp.asarray(v) for k, v in batches.stack(
        [sar_samples.build_sample(SRC, TGT, SPEC, _Draws(0.2, c=2))] * 2).items()}
    step = step_lib.make_train_step(CFG, bcfg, SPEC, tx, mesh)
    params, opt_state, _ = step(params, opt_state, base, batch, jax.random.key(1))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before[1])):
        np.testing.assert_array_equal(np.asarray(a), b)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), params, before[0])
    assert moved["mask_embed"] and all(ab["b"] for ab in moved["lora"].values())


# --- the many-cuts layout (run.sar_layout: groups) ---------------------------------------------

GSPEC = sar_samples.SarGroupSpec(num_masks=3, max_groups=2, cutoff=14)


class _Window:
    """An rng stand-in for BiTA's window draw: `integers` returns the window start s."""

    def __init__(self, s):
        self.s = s

    def integers(self, low, high):
        assert low <= self.s < high, (low, self.s, high)
        return self.s


def test_group_sample_by_hand():
    s = sar_samples.build_group_sample(SRC, TGT, GSPEC, _Window(1))
    # every real token of src + tgt, each slot's next token from the last prompt token on
    assert s["tokens"].tolist() == SRC + TGT + [0] * 4
    assert s["ar_labels"].tolist() == [-1, -1] + TGT + [-1] * 5
    # window start 1: cuts after tgt[:1] and tgt[:2], i.e. 4 and 5 visible real tokens; mask k of
    # the cut at p predicts tgt[p + 1 + k]
    assert s["anchors"].tolist() == [4, 5]
    assert s["labels"].tolist() == [22, 23, 24, 23, 24, 25]
    # a response of M tokens or fewer: next-token targets only, no group
    s = sar_samples.build_group_sample(SRC, TGT[:3], GSPEC, _Window(0))
    assert s["ar_labels"][:5].tolist() == [-1, -1] + TGT[:3]
    assert s["anchors"].tolist() == [0, 0] and (s["labels"] == -1).all()
    # the cutoff truncates the response; the last cut still has M targets inside it
    short = sar_samples.SarGroupSpec(num_masks=3, max_groups=8, cutoff=8)
    s = sar_samples.build_group_sample(SRC, TGT, short, _Window(0))
    assert s["tokens"].tolist() == SRC + TGT[:5]
    assert s["anchors"].tolist() == [3, 4] + [0] * 6
    assert s["labels"][:6].tolist() == [21, 22, 23, 22, 23, 24]
    assert not short.usable(8, 3) and short.usable(7, 1)


def test_group_layout_is_the_cut_layout_in_one_pass():
    """Each mask group's logits equal those of an official cut sample at its point, and the real
    rows' logits those of the plain SFT sample: the many-cuts loss is their sum, in one pass. The
    gradients reach the LoRA through the real keys/values too."""
    base = models.init_params(CFG, jax.random.key(1))
    _, params = _space_params(CFG)
    keys = iter(jax.random.split(jax.random.key(5), 64))
    params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(next(keys), a.shape), params)
    spec = sar_samples.SarGroupSpec(num_masks=3, max_groups=3, cutoff=14)
    sample = sar_samples.build_group_sample(SRC, TGT, spec, _Window(1))  # cuts at p = 1, 2, 3
    batch = {k: jnp.asarray(v)[None] for k, v in sample.items()}
    real_logits, mask_logits = sar_loss_lib.sar_group_logits(CFG, spec, params, base, batch)
    sft = sar_samples.build_sample(SRC, TGT, SPEC, _Draws(0.9))
    want = sar_loss_lib.sar_logits(CFG, params, base, {"tokens": jnp.asarray(sft["tokens"])[None]})
    np.testing.assert_allclose(real_logits[0, :10], want[0, :10], atol=2e-5)
    for j, p in enumerate((1, 2, 3)):
        cut = sar_samples.build_sample(SRC, TGT, SPEC, _Draws(0.0, c=p))
        logits = sar_loss_lib.sar_logits(CFG, params, base,
                                         {"tokens": jnp.asarray(cut["tokens"])[None]})
        at = len(SRC) + p  # the cut sample's mask slots
        np.testing.assert_allclose(mask_logits[0, 3 * j:3 * j + 3], logits[0, at:at + 3],
                                   atol=2e-5)
        assert batch["labels"][0, 3 * j:3 * j + 3].tolist() == cut["labels"][at:at + 3].tolist()
    loss, metrics = sar_loss_lib.sar_loss_fn(params, base, batch, cfg=CFG, spec=spec)
    assert metrics["count"].tolist() == [3, 3, 3] and int(metrics["ar_count"]) == 7
    logp_real, logp_mask = jax.nn.log_softmax(real_logits), jax.nn.log_softmax(mask_logits)
    ar, lab = np.asarray(batch["ar_labels"][0]), np.asarray(batch["labels"][0])
    nll = ([-logp_real[0, t, ar[t]] for t in np.nonzero(ar >= 0)[0]]
           + [-logp_mask[0, t, lab[t]] for t in np.nonzero(lab >= 0)[0]])
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)

    # the masks' loss alone still reaches the LoRA of every layer through the real rows' keys
    def mask_loss(lora):
        return jnp.sum(sar_loss_lib.sar_group_logits(
            CFG, spec, {**params, "lora": lora}, base, batch)[1][..., 0])
    grads = jax.grad(mask_loss)(params["lora"])
    k_grad = [ab for name, ab in grads.items() if "k_proj" in name]
    assert k_grad and all(float(jnp.max(jnp.abs(ab["b"]))) > 0 for ab in k_grad)


def test_lora_learning_rate_sets_the_weights_rate_alone():
    """One Adam step moves every weight by about its own peak rate (Adam's first step is
    lr * sign(grad)): the LoRA by lora_learning_rate, the masks by learning_rate."""
    from bita_jax import sharding

    base = models.init_params(CFG, jax.random.key(1))
    bcfg = models.BitaConfig(num_masks=3, lora_rank=4, method="space")
    tx = step_lib.make_optimizer(1e-2, total_steps=100, lora_learning_rate=1e-4, clip_norm=0)
    mesh = sharding.make_mesh(1, 1)
    params, opt_state = step_lib.init_state(CFG, bcfg, tx, jax.random.key(0), mesh)
    before = jax.tree.map(np.asarray, params)
    batch = {k: jnp.asarray(v) for k, v in batches.stack(
        [sar_samples.build_group_sample(SRC, TGT, GSPEC, _Window(0))] * 2).items()}
    step = step_lib.make_train_step(CFG, bcfg, GSPEC, tx, mesh)
    params, _, metrics = step(params, opt_state, base, batch, jax.random.key(1))
    delta = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), params, before)
    assert 0.5e-2 < delta["mask_embed"] <= 1.01e-2
    for ab in delta["lora"].values():
        assert 0.5e-4 < ab["b"] <= 1.01e-4
    assert int(metrics["ar_count"]) == 2 * 7 and metrics["count"].tolist() == [4, 4, 4]
    # full fine-tuning: the whole base takes the weights' rate, its state sharded like it
    full = models.BitaConfig(num_masks=3, method="space")
    base_before = jax.tree.map(np.asarray, base)  # the step donates the trainable base
    params, opt_state = step_lib.init_state(CFG, full, tx, jax.random.key(0), mesh,
                                            base_params=base, rules=sharding.FSDP_RULES)
    params, _, _ = step_lib.make_train_step(CFG, full, GSPEC, tx, mesh, sharding.FSDP_RULES)(
        params, opt_state, {}, batch, jax.random.key(1))
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                         params["base"], base_before)
    assert 0.5e-4 < max(jax.tree.leaves(moved)) <= 1.01e-4


def test_space_group_training_resumes_exactly(tmp_path):
    kw = {"sar_layout": "groups", "max_groups": 4, "lora_learning_rate": 1e-3}
    tc = _config(tmp_path, **kw)
    assert loop.train(tc, quiet=True, stop_at=4) == 0
    assert loop.train(tc, quiet=True, resume=True) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "grad_norm" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and len(evals[-1]["eval_acc"]) == 3 and 0 <= evals[-1]["eval_ar_acc"] <= 1
    (tmp_path / "one").mkdir()
    assert loop.train(_config(tmp_path / "one", **kw), quiet=True) == 0
    a = models.load_adapter(tmp_path / "run" / "adapter", CFG)[0]
    b = models.load_adapter(tmp_path / "one" / "run" / "adapter", CFG)[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(run_config.ConfigFileError, match="sar_layout"):
        _config(tmp_path, sar_layout="many")
