"""Where decoding's arrays live on a device mesh: params, inputs, the decode state, the results.

    mesh = placement.params_mesh(params)          # the mesh sharded params are on, or None
    params = placement.place_params(cfg, params, mesh)
    sh = placement.StateShardings(cfg, mesh)
    state_sharding = sh.state(BitaState)          # a DecodeState of NamedSharding leaves
    prompt = placement.global_array(prompt_np, sh.batch)

On a mesh, the base params follow the logical-axis rules (`sharding.param_shardings`, or
whatever sharding the caller already gave them), BiTA params are replicated, and the decode
state is sharded by batch rows over 'data' and, in the KV cache [L, B, K, S, D], by kv heads over
'model' where that axis divides them (otherwise the heads are replicated). Scalars, the PRNG key
and sampling knobs are replicated. The engine pads the batch to a multiple of the 'data' axis.

Inputs are built with `jax.make_array_from_callback` from the host array that every process
holds, and results are read back with `fetch`, so the same code runs as one process or as many
processes of one job (each feeding and reading only its own devices' shards).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bita_jax import models, sharding
from bita_jax.models import kv_cache
from bita_jax.models.config import ModelConfig


def params_mesh(params) -> Mesh | None:
    """The mesh of more than one device that `params` are sharded on, or None."""
    for leaf in jax.tree.leaves(params):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(mesh, Mesh) and mesh.size > 1:
            return mesh
    return None


def place_params(cfg: ModelConfig, params, mesh: Mesh, rules=sharding.DEFAULT_RULES):
    """The base params on `mesh`: kept as they are when every leaf is already a `NamedSharding`
    on it (the caller's layout, FSDP included), else placed by the logical-axis `rules`.

    Raises:
      ValueError: the params are in the unrolled layout (`models.to_unrolled`), which has no
        logical axes; a mesh decodes the checkpoint's scanned layout.
    """
    if models.is_unrolled(params):
        raise ValueError("params in the unrolled layout cannot be sharded: pass the scanned "
                         "params (as loaded) to decode on a mesh")
    leaves = jax.tree.leaves(params)
    if all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
           for x in leaves):
        return params
    return put(params, sharding.param_shardings(cfg, mesh, rules))


def replicate(tree, mesh: Mesh):
    """Every leaf of `tree` whole on every device of `mesh` (BiTA params)."""
    return put(tree, jax.tree.map(lambda _: sharding.replicated(mesh), tree))


def put(tree, shardings):
    """`tree` (host values every process holds alike) placed on `shardings` (same structure).
    One process: `jax.device_put`; several: each process fills its own devices' shards."""
    if jax.process_count() == 1:
        return sharding.shard_params(tree, shardings)
    return jax.tree.map(lambda x, s: global_array(jax.device_get(x), s), tree, shardings)


def shardings_of(tree):
    """The pytree of each leaf's sharding."""
    return jax.tree.map(lambda x: x.sharding, tree)


class StateShardings:
    """The shardings of decoding's arrays on one mesh (`batch`, `replicated`, `state(...)`)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, rules=sharding.DEFAULT_RULES):
        self.mesh, self.cfg = mesh, cfg
        self.replicated = sharding.replicated(mesh)
        self.batch = sharding.batch_sharding(mesh, 1, rules)  # [B, ...]: rows over 'data'
        # The cache [L, B, K, S, D]: the batch size is padded to the data axis, S never split.
        data = mesh.shape["data"]
        shape = (cfg.num_layers, data, cfg.num_kv_heads, 1, cfg.head_dim)
        spec = sharding.logical_to_spec(("layers", "batch", "kv_heads", "length", "head_dim"),
                                        shape, mesh.shape, rules, "kv cache")
        self.cache = NamedSharding(mesh, spec)
        self.cache_per_layer = NamedSharding(mesh, PartitionSpec(*spec[1:]))

    @property
    def data_size(self) -> int:
        """Rows of a batch are padded to a multiple of this (the 'data' axis)."""
        return int(self.mesh.shape["data"])

    def state(self, state_type: type, per_layer: bool = False):
        """A `state_type` (a `DecodeState` dataclass) whose leaves are the fields' shardings:
        the cache by batch and kv heads, the batch's scalars (`state_type.replicated`: steps,
        rng, ...) replicated, every other field a per-row array sharded by batch."""
        layers = self.cfg.num_layers
        if per_layer:
            kv = tuple(self.cache_per_layer for _ in range(layers))
        else:
            kv = self.cache
        fields = {}
        for field in dataclasses.fields(state_type):
            if field.name == "cache":
                fields["cache"] = kv_cache.KVCache(kv, kv, self.batch)
            elif field.name in state_type.replicated:
                fields[field.name] = self.replicated
            else:
                fields[field.name] = self.batch
        return state_type(**fields)


def global_array(host: np.ndarray, sharding_: NamedSharding) -> jax.Array:
    """A global array of `sharding_` from a host array that every process holds whole."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding_, lambda index: host[index])


def fetch(tree):
    """The whole value of every leaf on the host, also for arrays that span processes."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
