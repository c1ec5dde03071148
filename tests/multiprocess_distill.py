"""Self-distillation as one process or as a job of several (tests/test_multiprocess.py).

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=I \\
        python tests/multiprocess_distill.py OUT SOURCES

A tiny model (6 query and 3 kv heads, split over a model axis across every device of the job)
answers the prompts of the JSONL file SOURCES greedily into the run directory OUT, as
`train/distill.py` does. Each process prints one JSON line: its place in the job, how many chunk
files it wrote, and the train and heldout records of the dataset it then reads back.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false"])

import jax  # noqa: E402

from bita_jax import distributed, models, sharding  # noqa: E402
from bita_jax.data import dataset, distill  # noqa: E402
from bita_jax.models.config import ModelConfig  # noqa: E402

CFG = ModelConfig(arch="llama", vocab_size=300, hidden_size=48, intermediate_size=96,
                  num_layers=2, num_heads=6, num_kv_heads=3, head_dim=8, eos_token_ids=(),
                  max_position_embeddings=512)


class ByteTokenizer:
    """ChatML-like rendering over bytes (the `distill.ChatTokenizer` protocol)."""

    def chat_ids(self, text, system=None):
        header = [1, 5, 6, 7] if system is None else [1, 5, 8]
        return header + [10 + b % 280 for b in text.encode("utf-8")] + [3, 4]


def main(out: str, sources: str) -> dict:
    distributed.initialize()
    mesh = sharding.make_mesh(1, jax.device_count())
    params = sharding.shard_params(models.init_params(CFG, jax.random.key(1)),
                                   sharding.param_shardings(CFG, mesh, sharding.DEFAULT_RULES))
    written = []
    distill.distill(out, distill.DistillConfig(sources=(sources,), max_new_tokens=10), CFG,
                    params, ByteTokenizer(), model_name="tiny", batch_size=2, progress=False,
                    on_chunk=written.append)

    def records(split):
        return sorted((int(r["index"]), r["response_ids"].tolist())
                      for r in dataset.load_split(out, split))

    return {"process": jax.process_index(), "processes": jax.process_count(),
            "chunks_written": len(written), "train": records("train"),
            "heldout": records("heldout")}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])), flush=True)
