"""Decoding on a mesh (issue 14): 8 simulated CPU devices give the token ids of one device.

`tests/mesh_decode.py` runs in its own process (XLA_FLAGS must be set before JAX starts): LLaMA
(MHA, GQA) and Falcon (7B-style MQA, new decoder architecture), each on the meshes (data 1,
model 8), (2, 4) and (8, 1), plain greedy and BiTA greedy (and, for GQA, both sampled and BiTA
with a `Fallback`) on a
ragged batch of 3 prompts that runs the chunked prefill and the block-wise cache reads. Here we
check its output: the same tokens as one device, and the cache and weights really split.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("llama_mha", "llama_gqa", "falcon_mqa", "falcon_new")
MESHES = ((1, 8), (2, 4), (8, 1))
ROWS, MAX_NEW = 3, 24


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "mesh_decode.py")],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("name", CONFIGS)
def test_mesh_gives_the_tokens_of_one_device(results, name, mesh):
    case = results[name]
    got = case[f"{mesh[0]}x{mesh[1]}"]["tokens"]
    kinds = {"greedy", "bita"} | ({"sampled", "bita_sampled", "bita_fallback"}
                                  if name == "llama_gqa" else set())
    assert set(got) == kinds
    for kind in sorted(kinds):
        want = case["one_device"][kind]
        assert len(want) == ROWS and all(len(t) == MAX_NEW for t in want)  # no EOS configured
        assert got[kind] == want, (kind, got[kind], want)


@pytest.mark.parametrize("name", CONFIGS)
def test_bita_is_lossless_and_accepts_drafts(results, name):
    one = results[name]["one_device"]
    assert one["bita"] == one["greedy"]
    if name == "llama_gqa":  # BiTA that switches to plain steps (`Fallback`)
        assert one["bita_fallback"] == one["greedy"]
        assert results[name]["plain_steps"]["bita_fallback"] > 0  # it did switch
    assert results[name]["tokens_per_step"] > 1.1  # the lookup branch's drafts were accepted


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("name", CONFIGS)
def test_cache_and_weights_are_split(results, name, mesh):
    data, model = mesh
    run = results[name][f"{data}x{model}"]
    layers, rows, kv_heads, slots, head_dim = run["cache_shape"]
    assert rows % data == 0 and ROWS <= rows < ROWS + data  # the batch padded to the data axis
    heads_shard = kv_heads // model if kv_heads % model == 0 else kv_heads
    assert run["cache_shard"] == [layers, rows // data, heads_shard, slots, head_dim]
    num_layers, embed, heads, _ = run["q_shape"]
    assert run["q_shard"] == [num_layers, embed, heads // model, head_dim]
    assert run["drafts_shard"] == [rows // data, run["drafts_shape"][1]]
    assert run["bita_params_replicated"]


def test_some_cache_is_split_over_both_axes(results):
    """Not every case replicates the kv heads: LLaMA-MHA's 8 heads split over model 4."""
    run = results["llama_mha"]["2x4"]
    assert run["cache_shard"][1:3] == [run["cache_shape"][1] // 2, 2]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("name", CONFIGS)
def test_memory_plan_matches_what_a_device_holds(results, name, mesh):
    """`--dry-run`'s base shard and KV cache bytes equal the bytes device 0 really holds."""
    run = results[name][f"{mesh[0]}x{mesh[1]}"]
    for part in ("base_params", "kv_cache"):
        assert run["planned_bytes"][part] == run["device0_bytes"][part], part
