"""The step-cost benchmark's pieces on tiny models: which matrices the floor multiplies, and that
`measure` times every kind of row."""

import jax
import numpy as np

from bita_jax import models
from bita_jax.decoding.tree import Tree
from bita_jax.eval import step_cost
from tests.test_decode import FALCON, LLAMA


def _kernel_bytes(params):
    return sum(x.size * x.dtype.itemsize for path, x in jax.tree_util.tree_leaves_with_path(params)
               if getattr(path[-1], "key", None) == "kernel")


def test_the_floor_reads_every_matrix_a_step_multiplies_by():
    for cfg in (LLAMA, FALCON):
        params = models.init_params(cfg, jax.random.key(0))
        embed = params["embed"]["embedding"]
        kernels = _kernel_bytes(params)  # untied: lm_head's kernel among them
        expected = kernels + (embed.size * embed.dtype.itemsize if cfg.tie_word_embeddings else 0)
        assert step_cost.weight_bytes(params) == expected
        assert step_cost.weight_bytes(models.to_unrolled(params)) == expected
        mats = step_cost.weight_matrices(params)
        assert all(m.ndim == 2 for m in mats)
        # q, k, v, o and the MLP's 2 or 3 matrices per layer, plus the LM head
        per_layer = 4 + (3 if cfg.arch == "llama" else 2)
        assert len(mats) == cfg.num_layers * per_layer + 1


def test_measure_times_floor_forward_and_decode_rows():
    params = models.init_params(LLAMA, jax.random.key(0))
    bp = models.init_bita_params(LLAMA, models.BitaConfig(num_masks=2), jax.random.key(1))
    rows = step_cost.measure(LLAMA, models.to_unrolled(params), bp,
                             [Tree.make("chain@1+lookup:2", 2)], tokens=(1, 3), context=8,
                             loops=2, steps=2, repeats=1, log=lambda _: None)
    kinds = [(r.kind, r.tokens) for r in rows]
    assert kinds == [("floor", 1), ("floor", 3), ("forward", 1), ("forward", 3),
                     ("decode", 1), ("decode", Tree.make("chain@1+lookup:2", 2).layout.num_tokens)]
    assert all(np.isfinite(r.ms) and r.ms > 0 for r in rows)
    table = step_cost.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1
