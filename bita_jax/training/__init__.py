"""The training layer: BiTA params trained with optax on a frozen, sharded base.

Modules: `samples` (the two-pass sample layout), `batches` (deterministic batch streams),
`loss` (two-pass mask logits and the loss), `step` (optimizer and jitted, sharded steps),
`run_config` (YAML run configs), `checkpointing` (orbax checkpoints and the resume rule),
`loop` (the resumable run) and `memory_plan` (--dry-run counts and memory).

    code = loop.train(run_config.load_config("configs/smollm2-135m.yaml"))
"""
