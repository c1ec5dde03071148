"""Training checkpoints: orbax for the BiTA params and optimizer state, JSON for the rest, and the
rule that decides whether a checkpoint may be resumed.

    ckpt = Checkpoints(out / "checkpoints", keep=3)
    check_resume(where, step, ckpt.read_meta(step)["run"], run_meta)   # before loading the base
    params, opt_state, meta = ckpt.restore(step, params, opt_state)

A checkpoint holds {"params", "opt_state"} (the BiTA pytree and its optimizer state only; the
base model is never saved) and a JSON "meta": step, data position, the run settings
(`run_meta`) that decide the batches and the optimizer, the whole config and the base identity.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class ResumeError(ValueError):
    """Checkpoints that do not fit this run (or a fresh run over existing checkpoints)."""


class Checkpoints:
    """orbax CheckpointManager of {"params", "opt_state"} + a JSON "meta" (step, data position)."""

    def __init__(self, directory: pathlib.Path, keep: int):
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict):
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, params, opt_state):
        """(params, opt_state, meta) of checkpoint `step`, laid out like the given templates."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"params": params, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"]["params"], out["state"]["opt_state"], dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of a checkpoint alone (no arrays restored)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self):
        self.manager.close()


# Settings added after checkpoints were first written: an older checkpoint ran with these values.
_ADDED_SETTINGS = {"sample": {"anchors": "window"}, "optimizer": {"lora_learning_rate": None}}
# Settings that older checkpoints did not record at all: they cannot be checked against them.
_UNRECORDED_BEFORE = ("optimizer",)


def check_resume(where: pathlib.Path, step: int, saved: dict, now: dict):
    """Refuses to resume when anything that decides the batches or the optimizer changed.

    Raises:
      ResumeError: naming the first setting that differs, its old and its new value.
    """
    for key, value in now.items():
        if key not in saved and key in _UNRECORDED_BEFORE:
            continue
        before = saved.get(key)
        if isinstance(before, dict) and isinstance(value, dict) and key in _ADDED_SETTINGS:
            added = {k: v for k, v in _ADDED_SETTINGS[key].items() if k in value}
            before = {**added, **before}
        if before == value:
            continue
        name = key
        if isinstance(before, dict) and isinstance(value, dict):  # name the field that changed
            sub = next(k for k in sorted(set(before) | set(value)) if before.get(k) != value.get(k))
            name, before, value = f"{key}.{sub}", before.get(sub), value.get(sub)
        raise ResumeError(f"cannot resume from {where} step {step}: {name} was {before!r}, now "
                          f"{value!r} (keep the run's settings, or start a new run with another "
                          "--out)")
