"""One job of several processes on localhost (issue 14), as on a TPU pod slice.

Every process gets `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, the
environment a launcher gives each host, and the mesh spans every process's devices.
- Decoding (`tests/multiprocess_decode.py`): each process must print the token ids that one
  device gives, plain greedy and BiTA, and hold only its own shards of the KV cache.
- Training (`train/train.py`, tiny-test): stopped at step 4 and resumed, as 2 processes of 2
  devices and as 3 of 1, it must give the losses and adapter of one uninterrupted
  single-device run.
- Self-distillation (`tests/multiprocess_distill.py`) as 3 processes into one shared run
  directory: process 0 alone writes it, and the dataset equals one process's.
- A process killed mid-job stops the other at once: a killed worker with one line of ours; a
  killed process 0 (which hosts the coordination service) with ours or JAX's abort.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "multiprocess_decode.py"
DISTILL_SCRIPT = REPO / "tests" / "multiprocess_distill.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_job(processes: int, argv: list[str], devices: int | None = None, **env_vars):
    """Starts `argv` as every process of one job (stdout and stderr piped)."""
    port = _free_port()
    procs = []
    for i in range(processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_PLATFORMS="cpu",
                   JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i), **env_vars)
        if devices is not None:  # fast compiles; the one-process reference uses the same flags
            env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                                "--xla_cpu_use_fusion_emitters=false "
                                "--xla_backend_optimization_level=1")
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def run_job(processes: int, argv: list[str]) -> list[dict]:
    """Runs a script of ours (`argv`) as one job; returns each process's last JSON line."""
    return [json.loads(out.strip().splitlines()[-1])
            for out in _wait(start_job(processes, argv), timeout=900)]


@pytest.mark.parametrize("processes,devices,data,model", [(2, 2, 2, 2), (3, 1, 1, 3)],
                         ids=["2procs-x2-data2-model2", "3procs-x1-model3"])
def test_every_process_decodes_what_one_device_does(processes, devices, data, model):
    outs = run_job(processes, [str(SCRIPT), str(devices), str(data), str(model)])
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


TINY = ["train/train.py", "--config", "configs/tiny-test.yaml", "--quiet"]


def _records(path: pathlib.Path, n: int = 24, vocab: int = 128) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n):
            start = int(rng.integers(0, vocab))
            f.write(json.dumps({
                "prompt_ids": rng.integers(0, vocab, int(rng.integers(2, 9))).tolist(),
                "response_ids": [(start + 3 * k) % vocab
                                 for k in range(int(rng.integers(2, 30)))]}) + "\n")


GLOO_MESSAGE = ("[Gloo] Rank 0 is connected to 1 peer ranks. "
                "Expected number of connected peer ranks is : 1")
GLOO = re.compile(
    r"\[Gloo\] Rank \d+"
    r"| ?is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+"
)


def _printed(stdout: str) -> list[str]:
    """The lines our code printed.

    Gloo, the CPU collectives, announces its peers on stdout from its own threads, so two of its
    messages can interleave at any character: remove its whole messages, then every line made only
    of pieces of one ("[Gloo] Rank ", "0", " is connected to 1 peer ranks...").
    """
    message = re.sub(r"\d", "0", GLOO_MESSAGE)

    def debris(line: str) -> bool:
        return all(piece in message for piece in re.sub(r"\d", "0", line).split())

    return [x for x in GLOO.sub("", stdout).splitlines() if x.strip() and not debris(x)]


def _wait(procs, timeout=600) -> list[str]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    return outs


@pytest.mark.parametrize("processes,devices,mesh,batch", [(2, 2, "[2,2]", 4), (3, 1, "[3,1]", 6)],
                         ids=["2procs-x2-data2-model2", "3procs-x1-data3"])
def test_training_across_processes_resumes_and_equals_one_device(tmp_path, processes, devices,
                                                                 mesh, batch):
    """The data axis spans the processes, so each builds only its own rows of every batch."""
    from safetensors.numpy import load_file

    data = tmp_path / "data.jsonl"
    _records(data)
    args = [*TINY, "--data", str(data), f"run.batch_size={batch}"]
    job = tmp_path / "job"
    outs = _wait(start_job(processes, [*args, f"run.mesh={mesh}", "--out", str(job),
                                       "--stop-at", "4"], devices=devices))
    assert all(_printed(out) == [] for out in outs[1:])  # only process 0 prints
    assert sorted(os.listdir(job / "checkpoints")) == ["2", "4"]
    outs = _wait(start_job(processes, [*args, f"run.mesh={mesh}", "--out", str(job), "--resume"],
                           devices=devices))
    assert json.loads(_printed(outs[0])[-1])["steps"] == 6
    assert all(_printed(out) == [] for out in outs[1:])

    one = tmp_path / "one"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_cpu_use_fusion_emitters=false "
               "--xla_backend_optimization_level=1")
    proc = subprocess.run([sys.executable, *args, "--out", str(one)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    got, want = losses(job), losses(one)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
    a = load_file(str(job / "adapter" / "adapter.safetensors"))
    b = load_file(str(one / "adapter" / "adapter.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:  # several devices against 1: only the reductions' order differs
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)


def test_distillation_across_processes_writes_once_and_equals_one_process(tmp_path):
    sources = tmp_path / "prompts.jsonl"
    sources.write_text("".join(json.dumps({"prompt": f"question {i}: why?"}) + "\n"
                               for i in range(7)))

    def run(processes, out):
        if processes == 1:
            env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
            done = subprocess.run([sys.executable, str(DISTILL_SCRIPT), str(out), str(sources)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            return [json.loads(done.stdout.strip().splitlines()[-1])]
        return run_job(processes, [str(DISTILL_SCRIPT), str(out), str(sources)])

    (one,) = run(1, tmp_path / "one")
    job = run(3, tmp_path / "job")
    assert one["processes"] == 1 and one["chunks_written"] == 7  # 14 renderings, batches of 2
    assert [o["process"] for o in job] == [0, 1, 2] and {o["processes"] for o in job} == {3}
    assert [o["chunks_written"] for o in job] == [7, 0, 0]  # only process 0 writes
    assert len(list((tmp_path / "job" / "raw").glob("chunk-*.jsonl"))) == 7
    for o in job:  # every process reads back the dataset one process builds
        assert o["train"] == one["train"] and o["heldout"] == one["heldout"]
    assert len(one["train"]) + len(one["heldout"]) == 14


@pytest.mark.parametrize("killed", [1, 0], ids=["worker-killed", "coordinator-killed"])
def test_a_killed_process_stops_the_others_with_one_line(tmp_path, killed):
    data = tmp_path / "data.jsonl"
    _records(data)
    # Long enough that a heartbeat missed on a loaded box (the suite's other workers share the
    # two cores) does not abort the survivor before Gloo reports the lost peer: with 10 s the
    # coordination service once won that race (a worker starved of its heartbeats).
    heartbeat = 30
    procs = start_job(2, [*TINY, "--data", str(data), "--out", str(tmp_path / "run"),
                          "run.mesh=[2,2]", "run.steps=100000", "run.checkpoint_every=100000"],
                      devices=2, BITA_JAX_HEARTBEAT_SECONDS=str(heartbeat))
    metrics = tmp_path / "run" / "metrics.jsonl"
    survivor = procs[1 - killed]
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert time.monotonic() < deadline and procs[0].poll() is None, "never trained"
            time.sleep(1)
        procs[killed].send_signal(signal.SIGKILL)  # a host lost mid-job
        t_kill = time.monotonic()
        _, err = survivor.communicate(timeout=heartbeat + 120)
        waited = time.monotonic() - t_kill
    finally:
        for p in procs:
            p.kill()
    # CPU collectives (Gloo) fail at once when a peer is gone: the survivor says so in one line
    # and exits, without waiting for the heartbeat timeout and JAX's fatal abort.
    ours = (f"error: process {1 - killed} of 2 stopped: a step shared with the other processes "
            "failed")
    assert waited < heartbeat, waited
    if killed == 1:
        assert survivor.returncode == 1, err[-2000:]
        assert ours in err, err[-2000:]
        assert "Traceback" not in err and "Terminating process" not in err, err[-2000:]
    else:
        # Process 0 hosted the coordination service: the survivor's agent loses it as the
        # collective fails, and JAX's own abort for that races our exit (either may win).
        assert survivor.returncode != 0
        assert ours in err or "another task died" in err, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
