"""Logical-axis sharding: one rules table maps the model's logical axis names to mesh axes.

Every base parameter declares a logical name per dimension (`models.logical_axes`, e.g.
('layers', 'embed', 'heads', 'head_dim')). `DEFAULT_RULES` maps each name to a mesh axis
('data' or 'model') or to None (replicated); `FSDP_RULES` additionally shards 'embed' over 'data'.

    mesh = make_mesh(data=2, model=4)
    shardings = param_shardings(cfg, mesh)
    params = shard_params(params, shardings)
    step = jax.jit(fn, in_shardings=(shardings, batch_sharding(mesh, 2)),
                   out_shardings=batch_sharding(mesh, 3))

No silent fallbacks: a logical name without a rule raises `ValueError` (there is no catch-all
"replicate" rule). A dimension that the mesh axis does not divide (SmolLM2's 3 kv heads on a
model axis of 4, Falcon-7B's single kv head) is replicated instead of sharded unevenly, and a
`logging.warning` names the parameter, the dimension and both sizes.
BiTA params are tiny and stay `replicated(mesh)`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bita_jax import models
from bita_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES = ("data", "model")

# The one rules table (maxtext's logical_axis_rules): logical name -> mesh axis (or None).
DEFAULT_RULES: Rules = (
    # parameters
    ("layers", None),  # the nn.scan axis: every device runs every layer
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("norm", None),
    # activations and KV cache: [B, T, ...], cache [L, B, K, S, D]
    ("batch", "data"),
    ("length", None),  # T query tokens / S cache slots
)

# FSDP: parameters are also split over 'data' along the model dim and gathered per use.
FSDP_RULES: Rules = tuple((name, "data" if name == "embed" else axes)
                          for name, axes in DEFAULT_RULES)


def _rules_dict(rules: Rules) -> dict[str, MeshAxes]:
    table: dict[str, MeshAxes] = {}
    for name, axes in rules:
        if name in table:
            raise ValueError(f"logical axis {name!r} has two rules: {table[name]!r} and {axes!r}")
        table[name] = axes
    return table


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None,
                    axis_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES,
                    what: str = "array") -> PartitionSpec:
    """Maps one array's logical axis names to a `PartitionSpec`.

    Args:
      names: one logical name per dimension (None: replicated on purpose, e.g. an unnamed dim).
      shape: the array's shape, to check divisibility; None skips the check (activations whose
        size is only known at trace time).
      axis_sizes: mesh axis name -> size (`mesh.shape`).
      rules: the rules table.
      what: the parameter path, for messages.

    Raises:
      ValueError: a name without a rule, a rule naming an unknown mesh axis, one mesh axis used
        by two dimensions, or a rank mismatch.
    """
    table = _rules_dict(rules)
    if shape is not None and len(shape) != len(names):
        raise ValueError(
            f"{what}: {len(names)} logical axes {tuple(names)} for shape {tuple(shape)}")
    spec: list[MeshAxes] = []
    used: set[str] = set()
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"{what}: logical axis {name!r} (dim {dim}) matches no sharding rule; "
                             f"add it to the rules table (known: {sorted(table)})")
        axes = table[name]
        axes_tuple = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in axes_tuple:
            if axis not in axis_sizes:
                raise ValueError(f"{what}: rule {name!r} -> {axes!r} names mesh axis {axis!r}, "
                                 f"not in the mesh {dict(axis_sizes)}")
            if axis in used:
                raise ValueError(f"{what}: mesh axis {axis!r} would shard two dimensions "
                                 f"(second: {name!r}, dim {dim})")
        size = math.prod(axis_sizes[a] for a in axes_tuple)
        if shape is not None and size > 1 and shape[dim] % size:
            # Uneven shards would pad and skew memory and compute; replicate visibly instead.
            log.warning("%s: dim %d (%r) of size %d is not divisible by mesh axes %r of size %d; "
                        "replicating this dimension", what, dim, name, shape[dim], axes, size)
            spec.append(None)
            continue
        used.update(axes_tuple)
        spec.append(axes)
    return PartitionSpec(*spec)


def param_specs(cfg: ModelConfig, axis_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES):
    """Pytree (same structure as the base params) of `PartitionSpec`, from the logical axes."""
    def spec(path, names, shaped):
        return logical_to_spec(names, shaped.shape, axis_sizes, rules,
                               jax.tree_util.keystr(path, simple=True, separator="/"))

    return jax.tree.map_with_path(spec, models.logical_axes(cfg),
                                  models.abstract_params(cfg),
                                  is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Pytree of `NamedSharding` for the base params of `cfg` on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh.shape, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params: Any, shardings: Any):
    """Places (or reshards) the params onto their shardings; same tree structure required."""
    if jax.tree.structure(params) != jax.tree.structure(shardings):
        raise ValueError("params and shardings have different tree structures: "
                         f"{jax.tree.structure(params)} vs {jax.tree.structure(shardings)}")
    return jax.device_put(params, shardings)


def make_mesh(data: int, model: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over exactly data * model devices.

    Axis types are `Auto` on purpose: shardings are given at the jit boundary
    (`in_shardings`/`out_shardings`) and XLA's propagation places the intermediates, the classic
    GSPMD behaviour. Recent JAX defaults to `Explicit`, where sharding becomes part of every
    array's type and ops such as the embedding gather or reshapes with sharded dims must be
    annotated by hand; the model code does not do that.

    Raises:
      ValueError: data * model differs from the number of devices (`jax.make_mesh` would
        silently drop the extra devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1 or data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} = {data * model} devices, but "
                         f"{len(devices)} are available; choose sizes whose product is "
                         f"{len(devices)}")
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def mesh_sizes(text: str, num_devices: int) -> tuple[int, int]:
    """(data, model) from the command-line form `data=D,model=N` for `num_devices` devices
    (either may be left out: the other takes every remaining device; `""` or `auto`: data
    over every device).

    Raises:
      ValueError: a malformed text, or sizes that do not divide the devices.
    """
    sizes: dict[str, int] = {}
    if text.strip() not in ("", "auto"):
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in MESH_AXES or name in sizes or not value.strip().isdigit():
                raise ValueError(f"bad mesh {text!r}: expected data=D,model=N (positive sizes, "
                                 "each axis once), e.g. --mesh data=2,model=4")
            sizes[name] = int(value)
    n = num_devices
    for name, other in (("data", "model"), ("model", "data")):
        if name not in sizes:
            given = sizes.get(other, 1)
            if given < 1 or n % given:
                raise ValueError(f"mesh {text!r}: {other}={given} does not divide the {n} "
                                 f"devices; give both sizes, their product {n}")
            sizes[name] = n // given
    return sizes["data"], sizes["model"]


def parse_mesh(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of `mesh_sizes(text)` over `devices` (default: every device of the job).

    Raises:
      ValueError: a malformed text, or sizes whose product is not the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    return make_mesh(*mesh_sizes(text, len(devices)), devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (BiTA params, scalars, tree buffers)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading batch dim by the 'batch' rule (over 'data'), the other ndim - 1 dims replicated."""
    if ndim < 1:
        raise ValueError(f"batch_sharding needs ndim >= 1, got {ndim}")
    names = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(names, None, mesh.shape, rules, "batch"))
