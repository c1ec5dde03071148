"""Trainable counts of the official settings (from the shipped configs, via --dry-run), and the
lossless property: real-token logits are bit-identical with and without BiTA parameters."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.models.config import ModelConfig
from bita_jax.training import samples

REPO = pathlib.Path(__file__).resolve().parents[1]

# config -> (trainable, base params of the real model, P, M)
OFFICIAL = {
    "llama2-7b": (4_206_592, 6_738_415_616, 16, 3),
    "llama2-70b": (21_004_288, 68_976_648_192, 16, 4),
    "falcon-40b": (15_761_408, 41_303_293_952, 16, 4),
}


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_dry_run_reproduces_official_counts():
    procs = {name: subprocess.Popen(
        [sys.executable, "train/train.py", "--config", f"configs/{name}.yaml", "--dry-run"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in OFFICIAL}  # concurrently: each is mostly interpreter start-up
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        report = json.loads(stdout)  # exactly one JSON object on stdout
        trainable, base, p, m = OFFICIAL[name]
        assert report["trainable_params"] == trainable, (name, report["trainable_params"])
        assert report["base_params"] == base, (name, report["base_params"])
        assert report["bita"]["num_prefix"] == p and report["bita"]["num_masks"] == m
        assert report["trainable_percent"] == pytest.approx(100 * trainable / base, abs=1e-4)
        mem = report["memory_per_device_bytes"]
        assert mem["bita_params_grads_adam"] == 16 * trainable
        assert mem["total_estimate"] == (mem["base_params"] + mem["bita_params_grads_adam"]
                                         + mem["activations_estimate"])
        assert 0 < mem["base_params"] <= 2 * base  # bf16, split over the model axis
        if name == "llama2-7b":  # what the report prints rounds to the paper's 0.062%
            assert round(report["trainable_percent"], 3) == 0.062, report["trainable_percent"]


def test_count_formula():
    # P*L*2*H + M*H, also on GQA models (the prefix keeps every query head).
    cfg = ModelConfig(arch="llama", vocab_size=100, hidden_size=64, intermediate_size=96,
                      num_layers=3, num_heads=8, num_kv_heads=2, head_dim=8)
    bcfg = models.BitaConfig(num_prefix=5, num_masks=4)
    assert models.count_trainable(cfg, bcfg) == 5 * 3 * 2 * 64 + 4 * 64
    shapes = jax.eval_shape(lambda: models.init_bita_params(cfg, bcfg, jax.random.key(0)))
    assert models.count_params(shapes) == models.count_trainable(cfg, bcfg)
    assert shapes["prefix"].shape == (5, 3, 2, 8, 8) and shapes["mask_embed"].shape == (4, 64)


def test_real_token_logits_bit_identical_with_bita():
    """Real rows with BiTA params == without, bit for bit (np.array_equal).

    Within one compiled program the real rows are bit-identical for any BiTA values. Across the
    two programs (with / without BiTA) the arithmetic is the same, but XLA CPU's new fusion
    emitters (its default) may fuse the attention output with o_proj differently in each and
    round 1 ulp apart (1.2e-7 measured); with them off (and full backend optimisation, pinned
    here whatever the suite's XLA_FLAGS say) the two programs agree bit for bit.
    """
    cfg = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    params = models.init_params(cfg, jax.random.key(0))
    bcfg = models.BitaConfig(num_prefix=4, num_masks=3, init_std=1.0)
    spec = samples.SampleSpec(num_masks=3, max_groups=4, cutoff=32)
    rng = np.random.default_rng(0)
    sample = samples.build_sample(rng.integers(0, 96, 5), rng.integers(0, 96, 12), spec,
                              np.random.default_rng(0))
    real = int(sample["anchors"].max())  # src + tgt[:p_last], then 4 groups of 3 masks
    tokens, positions, mask, _ = samples.full_layout(sample, real, spec, cfg.vocab_size)
    # The mask built for training: real rows see only earlier real tokens, never a mask token.
    assert not mask[:real, real:].any() and mask[real:, real:].any()
    args = (jnp.asarray(tokens)[None], jnp.asarray(positions)[None], jnp.asarray(mask))

    @functools.partial(jax.jit, compiler_options={"xla_cpu_use_fusion_emitters": False,
                                                  "xla_backend_optimization_level": 3})
    def logits(params, bita_params):
        hidden, _ = models.forward(cfg, params, *args, bita_params=bita_params)
        return models.lm_logits(cfg, params, hidden)[0]

    draws = [models.init_bita_params(cfg, bcfg, jax.random.key(i)) for i in (1, 2)]
    draws.append(jax.tree.map(lambda x: 100.0 * x, draws[0]))
    with_bita = [np.asarray(logits(params, b)) for b in draws]
    without = np.asarray(logits(params, None))  # mask ids embed as token 0, unseen by real rows
    for w in with_bita:
        assert np.array_equal(w[:real], with_bita[0][:real])  # BiTA values never reach real rows
        assert not np.allclose(w[real:], without[real:], atol=1e-3)  # ... but mask rows use them
    assert np.array_equal(with_bita[0][:real], without[:real])
