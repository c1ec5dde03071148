"""The decoding layer: plain and BiTA generation over the `models` layer, jitted once per shape.

    Generator(cfg, base_params).generate(prompt_ids, max_new_tokens)                  # plain
    BitaGenerator(cfg, base_params, bita_params, Tree.make("chain", 3)).generate(...)  # BiTA

Modules: `sampling` (greedy / top-k / top-p), `tree` (draft-tree templates and their static
buffers), `engine` (the shared state, emission rule, while-loop and executables), `prefill`
(prompts into the cache, one-shot or chunked), `ar` (plain decoding), `bita_step` (BiTA's
verify-and-draft step), `lookup` (retrieval drafts), `ngram` (the adapter's n-gram table of the
model's own answers), `fallback` (plain steps where the drafts do not pay), `placement`
(shardings of params, cache and state on a mesh; global inputs and outputs across processes)
and `memory_plan` (per-device memory of decoding, from shapes).

On a mesh: `Generator(cfg, sharded_params)` or `Generator(cfg, params, mesh=mesh)` decode with
explicit shardings; the tokens equal one device's.
"""

from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.engine import Engine, GenerationError, GenerationResult
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree, TreeError, auto_tree_name

__all__ = ["BitaGenerator", "Engine", "GenerationError", "GenerationResult", "Generator",
           "SamplingParams", "Tree", "TreeError", "auto_tree_name"]
