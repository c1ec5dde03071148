"""Decoding as one job of several processes on localhost (issue 14), as on a TPU pod slice.

Each process runs `tests/multiprocess_decode.py` with `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` set, the environment a launcher gives every host. The
mesh spans the processes' devices; every process must print the token ids that one device
gives, plain greedy and BiTA, and hold only its own shards of the KV cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "multiprocess_decode.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(processes: int, devices_per_process: int, data: int, model: int) -> list[dict]:
    """Starts the processes, waits for all of them and returns each one's JSON line."""
    port = _free_port()
    procs = []
    for i in range(processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), str(devices_per_process), str(data), str(model)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    return outs


@pytest.mark.parametrize("processes,devices,data,model", [(2, 2, 2, 2), (3, 1, 1, 3)],
                         ids=["2procs-x2-data2-model2", "3procs-x1-model3"])
def test_every_process_decodes_what_one_device_does(processes, devices, data, model):
    outs = run_job(processes, devices, data, model)
    assert sorted(o["process"] for o in outs) == list(range(processes))
    for o in outs:
        assert o["processes"] == processes and o["devices"] == processes * devices
        assert o["local_devices"] == devices
        assert o["one_device"]["bita"] == o["one_device"]["greedy"]  # lossless on one device
        assert o["mesh"] == o["one_device"], o["process"]
        assert o["mesh"] == outs[0]["mesh"]
        layers, rows, kv_heads, slots, head_dim = o["cache_shape"]
        assert rows % data == 0 and 3 <= rows < 3 + data
        heads = kv_heads // model if kv_heads % model == 0 else kv_heads
        assert o["cache_shard"] == [layers, rows // data, heads, slots, head_dim]
        assert o["cache_shards_here"] == devices  # each process holds its own devices' shards
