"""The decoding memory plan (`infer/generate.py --dry-run`): sizes from shapes alone.

The plan's base shard and KV cache bytes are also checked against what a device really holds
on 8 simulated devices (tests/test_mesh_decoding.py)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from bita_jax import models
from bita_jax.decoding import engine, memory_plan
from bita_jax.models.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8)


def test_one_device_holds_every_param_and_the_whole_cache():
    plan = memory_plan.decode_plan(CFG, batch=3, context=1000, step_tokens=4)
    got = plan["per_device_bytes"]
    assert got["base_params"] == models.count_params(models.abstract_params(CFG)) * 4
    slots = engine.cache_slots(1000 + engine.HEADROOM)
    assert plan["cache_slots"] == slots == 1024
    assert got["kv_cache"] == 2 * 2 * 3 * 2 * slots * 8 * 4  # k and v, L, B, K, S, D, fp32
    assert got["total"] == (got["base_params"] + got["kv_cache"]
                            + max(got["decode_step_peak"], got["prefill_chunk_peak"]))
    assert plan["fits"] == {"16": True, "80": True, "141": True}


def test_mesh_splits_weights_rows_and_kv_heads():
    one = memory_plan.decode_plan(CFG, batch=8, context=500)["per_device_bytes"]
    split = memory_plan.decode_plan(CFG, data=2, model=2, batch=8, context=500)
    got = split["per_device_bytes"]
    assert split["rows_per_device"] == 4
    assert got["kv_cache"] * 4 == one["kv_cache"]  # rows over data 2, kv heads over model 2
    # every large weight is split over model 2; norms (and nothing else) stay whole
    assert one["base_params"] / 2 <= got["base_params"] < one["base_params"] / 2 + 2048
    assert memory_plan.decode_plan(CFG, data=3, batch=8)["rows_per_device"] == 3  # padded
    with pytest.raises(ValueError, match=">= 1"):
        memory_plan.decode_plan(CFG, batch=0)


def test_default_mesh_splits_weights_over_up_to_8_devices():
    assert memory_plan.default_mesh(1, CFG) == (1, 1)
    assert memory_plan.default_mesh(8, CFG) == (1, 8)
    assert memory_plan.default_mesh(64, CFG) == (8, 8)
    assert memory_plan.default_mesh(6, CFG.replace(num_heads=9, num_kv_heads=3)) == (2, 3)


def test_dry_run_plans_llama2_70b_without_weights():
    out = subprocess.run(
        [sys.executable, "infer/generate.py", "--dry-run", "--model", "configs/llama2-70b.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["dtype"] == "bfloat16" and report["tree"] == "upper-triangle"
    plans = {p["mesh"]["devices"]: p for p in report["plans"]}
    assert sorted(plans) == [1, 8, 64]
    assert plans[64]["mesh"] == {"data": 8, "model": 8, "devices": 64}
    assert plans[1]["step_tokens"] == 52
    # 68,976,648,192 bf16 params (LLaMA-2-70B) on one device; an eighth of most on eight
    assert plans[1]["per_device_bytes"]["base_params"] == 68_976_648_192 * 2
    assert plans[1]["fits"] == {"16": False, "80": False, "141": False}
    assert plans[8]["fits"] == {"16": False, "80": True, "141": True}
    assert "| configs/llama2-70b.yaml | 8 (1x8) |" in out.stderr  # the Markdown table
