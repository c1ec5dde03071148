"""Multi-host start-up: `jax.distributed.initialize()` only where a multi-process job is detected.

    distributed.initialize()          # first thing in an entry point, before any other jax call
    if distributed.is_main_process(): write logs / metrics / the exported adapter

One host (the default): nothing to do, `initialize()` returns False. A job is multi-process when
the environment says so: `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES` and
`JAX_PROCESS_ID`), a SLURM step or Open MPI job with more than one task, or a multi-host Cloud
TPU slice. `BITA_JAX_DISTRIBUTED=1` forces the call (JAX then auto-detects the cluster),
`BITA_JAX_DISTRIBUTED=0` disables it.

When a process of the job dies, the others stop too; the job is then started again, and
training resumes from its last checkpoint.
- Where a collective with the dead process fails (CPU's Gloo collectives do at once: "Connection
  closed by peer"), the exception reaches `initialize`'s `sys.excepthook`, which prints one line
  naming the process and the cause and exits at once (`_exit_on_error`). Python's own exit would
  wait at JAX's shutdown barrier for the dead process, then abort.
- Where a collective waits instead, JAX's coordination service ends the process ("Terminating
  process because the JAX distributed service detected fatal errors ... another task died") once
  the dead one's heartbeats have been missing for `BITA_JAX_HEARTBEAT_SECONDS` (default
  `HEARTBEAT_SECONDS`), rather than let it wait forever.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

import jax

_initialized = False
HEARTBEAT_SECONDS = 100  # JAX's own default


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def multi_process_env() -> bool:
    """True when the environment describes a job of more than one process."""
    env = os.environ
    forced = env.get("BITA_JAX_DISTRIBUTED")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in env and (_int_env("SLURM_NTASKS") or 1) > 1:
        return True
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    return (len([h for h in hosts.split(",") if h]) > 1
            or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS")))


def initialize() -> bool:
    """Calls `jax.distributed.initialize()` once in a multi-process job; a no-op otherwise.

    Returns:
      True when the distributed runtime is (now) initialized.
    """
    global _initialized
    if _initialized:
        return True
    if not multi_process_env():
        return False
    heartbeat = _int_env("BITA_JAX_HEARTBEAT_SECONDS") or HEARTBEAT_SECONDS
    jax.distributed.initialize(num_processes=_int_env("JAX_NUM_PROCESSES"),
                               process_id=_int_env("JAX_PROCESS_ID"),
                               heartbeat_timeout_seconds=heartbeat)
    sys.excepthook = _exit_on_error
    _initialized = True
    return True


# What a failed collective or coordination call says when another process of the job is gone.
_PEER_LOST = re.compile(r"gloo|connection (closed|reset|refused)|unavailable|heartbeat|"
                        r"another task|deadline_exceeded|socket closed", re.IGNORECASE)


def _exit_on_error(kind, error, tb) -> None:
    """`sys.excepthook` of a process of a multi-process job: reports the error and exits now.

    A failed collective (another process died) gets one line; any other error its traceback.
    Then `os._exit(1)`: a normal exit would first wait at JAX's shutdown barrier for the other
    processes, which never comes when one of them is dead, and end in JAX's fatal abort."""
    text = str(error).strip()
    try:
        who = f"process {jax.process_index()} of {jax.process_count()}"
    except Exception:  # noqa: BLE001 - the runtime itself may be what failed
        who = "this process"
    if _PEER_LOST.search(text):
        first = text.splitlines()[0] if text else kind.__name__
        sys.stderr.write(f"error: {who} stopped: a step shared with the other processes failed "
                         f"({first}); another process of the job has probably died. Rerun the "
                         "whole job (training resumes from its last checkpoint)\n")
    else:
        sys.stderr.write(f"error in {who}:\n")
        traceback.print_exception(kind, error, tb)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(1)


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and exported files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process of the job has reached `barrier(name)`; a no-op on one."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
