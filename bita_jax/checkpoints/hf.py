"""Import HF checkpoints (LLaMA family, Falcon) into the bita_jax base-param pytree.

    cfg, params = load_hf_checkpoint("/path/to/hf_dir", dtype="bfloat16", shardings=shardings)
    params = params_from_hf_tensors(cfg, named_tensors)  # {HF name: [out, in] array}

A per-architecture name map sends every HF tensor to one leaf of `models.abstract_params(cfg)`
(layered tensors to one row of an [L, ...] leaf). Every source key must be consumed and every
target leaf filled with exactly its shape, else `CheckpointError` names the key or leaf. Layout
differences are fixed here, never in the model: HF `Linear` weights are [out, in] and become
`DenseGeneral` kernels [in..., out...]; Falcon's fused query_key_value is split into q/k/v.

Loading streams: safetensors files are memory-mapped, every name and shape is checked before any
data is read, and each leaf is then built on its own. Given per-leaf shardings, each device's
shard is read straight from the mapped files (`jax.make_array_from_callback`, this host's
devices only), so a 70B checkpoint never sits whole in one host's memory.

Falcon fused QKV, rows of the [(N + 2K) * D, E] weight (and of the bias), as in transformers'
`FalconAttention._split_heads`:
  * new_decoder_architecture (40B/180B): grouped per kv head, [K, G + 2, D]: the G queries of kv
    head k, then its key, then its value.
  * multi_query (7B, K = 1): [N + 2, D]: all N queries, then the one key, then the one value.
  * old multi-head (multi_query false, K = N): per head [N, 3, D]: query, key, value.
All three are the grouped layout [K, G + 2, D] (MQA: K = 1, G = N; MHA: K = N, G = 1), so one
split serves them; query head n = k * G + g, which is the order `block_attention` assumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax import models
from bita_jax.models.config import ModelConfig

Leaf = tuple[str, ...]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model config, or missing files; the message says which."""


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where one HF tensor goes.

    kind: "linear": an HF [out, in] weight; the first `n_in` dims of the leaf are the input.
          "vector": a 1-D HF tensor (bias, norm weight) reshaped to the leaf.
          "same": the HF tensor has the leaf's shape (embedding table).
          "qkv": Falcon's fused query_key_value weight (n_in=1) or bias (n_in=0).
    """

    leaf: Leaf
    kind: str
    n_in: int = 1


def _lin(*leaf: str, n_in: int = 1) -> _Target:
    return _Target(leaf, "linear", n_in)


def _vec(*leaf: str) -> _Target:
    return _Target(leaf, "vector")


_QKV_LEAVES = tuple(("layers", "attn", f"{p}_proj") for p in "qkv")

_LLAMA_GLOBAL = {
    "model.embed_tokens.weight": _Target(("embed", "embedding"), "same"),
    "model.norm.weight": _vec("final_norm", "scale"),
    "lm_head.weight": _lin("lm_head", "kernel"),
}
_LLAMA_LAYER = {
    **{f"self_attn.{p}_proj.weight": _lin("layers", "attn", f"{p}_proj", "kernel") for p in "qkv"},
    **{f"self_attn.{p}_proj.bias": _vec("layers", "attn", f"{p}_proj", "bias") for p in "qkvo"},
    "self_attn.o_proj.weight": _lin("layers", "attn", "o_proj", "kernel", n_in=2),
    **{f"mlp.{p}.weight": _lin("layers", "mlp", p, "kernel") for p in ("gate_proj", "up_proj",
                                                                        "down_proj")},
    **{f"mlp.{p}.bias": _vec("layers", "mlp", p, "bias") for p in ("gate_proj", "up_proj",
                                                                    "down_proj")},
    "input_layernorm.weight": _vec("layers", "attn_norm", "scale"),
    "post_attention_layernorm.weight": _vec("layers", "mlp_norm", "scale"),
}

_FALCON_GLOBAL = {
    "transformer.word_embeddings.weight": _Target(("embed", "embedding"), "same"),
    "transformer.ln_f.weight": _vec("final_norm", "scale"),
    "transformer.ln_f.bias": _vec("final_norm", "bias"),
    "lm_head.weight": _lin("lm_head", "kernel"),
}
_FALCON_LAYER = {
    "self_attention.query_key_value.weight": _Target(("layers", "attn", "qkv"), "qkv", 1),
    "self_attention.query_key_value.bias": _Target(("layers", "attn", "qkv"), "qkv", 0),
    "self_attention.dense.weight": _lin("layers", "attn", "o_proj", "kernel", n_in=2),
    "self_attention.dense.bias": _vec("layers", "attn", "o_proj", "bias"),
    "mlp.dense_h_to_4h.weight": _lin("layers", "mlp", "up_proj", "kernel"),
    "mlp.dense_h_to_4h.bias": _vec("layers", "mlp", "up_proj", "bias"),
    "mlp.dense_4h_to_h.weight": _lin("layers", "mlp", "down_proj", "kernel"),
    "mlp.dense_4h_to_h.bias": _vec("layers", "mlp", "down_proj", "bias"),
    **{f"{ln}.{w}": _vec("layers", ln, s)
       for ln in ("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp")
       for w, s in (("weight", "scale"), ("bias", "bias"))},
}

# arch -> (layer-key regex with groups (index, suffix), global map, per-layer map, layer prefix)
_NAME_MAPS = {
    "llama": (re.compile(r"model\.layers\.(\d+)\.(.+)"), _LLAMA_GLOBAL, _LLAMA_LAYER,
              "model.layers.{i}."),
    "falcon": (re.compile(r"transformer\.h\.(\d+)\.(.+)"), _FALCON_GLOBAL, _FALCON_LAYER,
               "transformer.h.{i}."),
}
# Non-parameter buffers that older exports wrote into checkpoints.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_TIED_HEAD = "lm_head.weight"


def _fmt(leaf: Leaf) -> str:
    return "/".join(leaf)


def _qkv_part(cfg: ModelConfig, x: np.ndarray, part: int, index: tuple) -> np.ndarray:
    """Part `index` of one layer's q (part 0), k (1) or v (2) leaf, from Falcon's fused QKV.

    `x` is the fused [(N + 2K) * D, E] weight or [(N + 2K) * D] bias (see module doc); the leaf is
    [E, N, D] / [E, K, D] (weight) or [N, D] / [K, D] (bias). Only the rows the part needs are
    read: the grouped layout is a view, and query head n is (kv head n // G, slot n % G).
    """
    n, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = n // kv
    grouped = x.reshape(kv, g + 2, d, *x.shape[1:])  # [K, G + 2, D(, E)], a view
    lead = np.moveaxis(grouped, -1, 0) if x.ndim == 2 else grouped  # [(E,) K, G + 2, D]
    outer, heads, inner = index[:x.ndim - 1], index[x.ndim - 1], index[x.ndim]
    if part == 0:
        h = np.arange(n)[heads]
        return lead[(*outer, h // g, h % g)][..., inner]
    return lead[(*outer, heads, g + part - 1, inner)]


def _hf_shape(t: _Target, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that fills a leaf of per-layer `shape` through target `t`."""
    if t.kind == "linear":
        return (math.prod(shape[t.n_in:]), math.prod(shape[:t.n_in]))
    if t.kind == "vector":
        return (math.prod(shape),)
    return shape


def _as_leaf(t: _Target, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An HF tensor (of `_hf_shape(t, shape)`) in the leaf's per-layer layout; a view when it
    can be, so that indexing it afterwards reads only the part it needs."""
    return x.T.reshape(shape) if t.kind == "linear" else x.reshape(shape)


def _route(cfg: ModelConfig, name: str) -> tuple[_Target, int | None]:
    """HF name -> (target, layer index or None)."""
    layer_re, global_map, layer_map, _ = _NAME_MAPS[cfg.arch]
    if name in global_map:
        return global_map[name], None
    m = layer_re.fullmatch(name)
    if m and m.group(2) in layer_map:
        i = int(m.group(1))
        if i >= cfg.num_layers:
            raise CheckpointError(f"{name}: layer {i} out of range for num_layers={cfg.num_layers}")
        return layer_map[m.group(2)], i
    raise CheckpointError(f"unknown checkpoint key {name!r} for a {cfg.arch} model: no rule in the "
                          f"name map consumes it")


def _hf_name(cfg: ModelConfig, leaf: Leaf) -> str:
    """The HF name pattern that feeds `leaf` (for error messages)."""
    _, global_map, layer_map, prefix = _NAME_MAPS[cfg.arch]
    for name, t in global_map.items():
        if t.leaf == leaf:
            return name
    for suffix, t in layer_map.items():
        if t.leaf == leaf or (t.kind == "qkv" and leaf[:-1] in _QKV_LEAVES
                              and suffix.endswith(".weight") == (leaf[-1] == "kernel")):
            return prefix + suffix
    return "?"


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one leaf (or one layer of it) comes from: an HF tensor, or a third of a fused QKV."""

    name: str
    target: _Target
    array: Any  # np.ndarray, possibly a lazy memory-mapped view
    qkv_part: int | None = None


def _plan(cfg: ModelConfig, tensors: Mapping[str, Any], leaves: Mapping[Leaf, Any]
          ) -> tuple[dict[Leaf, dict[int, _Source]], Any]:
    """Routes every HF tensor to its leaf (and layer) and checks every shape, reading no data.

    Returns ({leaf: {layer (0 for global leaves): source}}, the tied head tensor or None).
    """
    plan: dict[Leaf, dict[int, _Source]] = {leaf: {} for leaf in leaves}
    tied_head = None

    def add(name: str, leaf: Leaf, layer: int | None, src: _Source, hf_shape: tuple[int, ...]):
        if leaf not in leaves:
            raise CheckpointError(
                f"{name} maps to leaf {_fmt(leaf)}, which this {cfg.arch} config does not have "
                f"(check bias / attention_bias / mlp_bias / parallel_attn / "
                f"new_decoder_architecture / tie_word_embeddings in config.json)")
        shape = leaves[leaf].shape[1:] if layer is not None else leaves[leaf].shape
        want = _hf_shape(src.target, shape)
        if tuple(hf_shape) != want:
            raise CheckpointError(
                f"{name}: HF tensor of shape {tuple(hf_shape)} does not fit leaf {_fmt(leaf)} of "
                f"per-layer shape {shape} (expected an HF tensor of shape {want})")
        slot = 0 if layer is None else layer
        if slot in plan[leaf]:
            raise CheckpointError(f"{name}: leaf {_fmt(leaf)} (layer {layer}) written twice")
        plan[leaf][slot] = src

    e, n, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for name, x in tensors.items():
        if _IGNORED.search(name):
            continue
        if name == _TIED_HEAD and cfg.tie_word_embeddings:
            tied_head = x  # checked against the embedding by the caller
            continue
        t, layer = _route(cfg, name)
        if t.kind != "qkv":
            add(name, t.leaf, layer, _Source(name, t, x), x.shape)
            continue
        want = ((n + 2 * kv) * d, e) if t.n_in else ((n + 2 * kv) * d,)
        if tuple(x.shape) != want:
            raise CheckpointError(
                f"{name}: fused QKV of shape {tuple(x.shape)}, expected {want} for N={n}, K={kv}, "
                f"D={d}, E={e} (leaves layers/attn/{{q,k,v}}_proj)")
        part = "kernel" if t.n_in else "bias"
        sub = _Target((), "linear" if t.n_in else "vector")
        for i, leaf in enumerate(_QKV_LEAVES):
            rows = (n if i == 0 else kv) * d
            add(name, leaf + (part,), layer, _Source(name, sub, x, i), (rows, *x.shape[1:]))

    missing = []
    for leaf, s in leaves.items():
        want = set(range(cfg.num_layers)) if leaf[0] == "layers" else {0}
        if set(plan[leaf]) != want:
            gaps = sorted(want - set(plan[leaf]))
            where = f" layers {gaps}" if leaf[0] == "layers" else ""
            missing.append(f"{_fmt(leaf)} {s.shape}{where} (from {_hf_name(cfg, leaf)})")
    if missing:
        raise CheckpointError("checkpoint is missing tensors for: " + "; ".join(missing))
    return plan, tied_head


def params_from_hf_tensors(cfg: ModelConfig,
                           named_tensors: Mapping[str, Any] | Iterable[tuple[str, np.ndarray]],
                           shardings: Any = None) -> dict:
    """Builds the base params from HF-named tensors in HF orientation.

    Every name, shape and leaf is checked before any data is read. Then each leaf is built on
    its own and placed: with `shardings`, every device's shard is read straight from the
    sources (`jax.make_array_from_callback`, only this host's devices), so a memory-mapped
    checkpoint (`safetensors_tensors`) never exists whole in host memory; without, one leaf at
    a time is assembled on the host.

    Args:
      cfg: the model config (decides every target shape and the dtype).
      named_tensors: {HF name: array} (arrays may be lazy memory-mapped views) or (name, array)
        pairs; Linear weights as [out, in].
      shardings: optional pytree like the params with a `jax.sharding.Sharding` per leaf.

    Returns:
      The params pytree (structure of `models.abstract_params(cfg)`) as jax arrays of cfg.dtype.

    Raises:
      CheckpointError: an unknown or duplicate key, a wrong shape, a missing tensor, or a tied
        `lm_head.weight` that differs from the embedding.
    """
    abstract = models.abstract_params(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves: dict[Leaf, jax.ShapeDtypeStruct] = {tuple(k.key for k in path): s for path, s in flat}
    dtype = np.dtype(cfg.jnp_dtype)
    tensors = dict(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    plan, tied_head = _plan(cfg, tensors, leaves)

    def layer_part(leaf: Leaf, slot: int, index: tuple) -> np.ndarray:
        """Part `index` of one layer (or of a global leaf), read from its source."""
        src = plan[leaf][slot]
        if src.qkv_part is not None:
            return _qkv_part(cfg, src.array, src.qkv_part, index)
        shape = leaves[leaf].shape[1:] if leaf[0] == "layers" else leaves[leaf].shape
        return _as_leaf(src.target, src.array, shape)[index]

    def build(leaf: Leaf, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The leaf, or its part `index` (a tuple of slices), as a host array of cfg.dtype."""
        full = leaves[leaf].shape
        index = tuple(index) if index is not None else (slice(None),) * len(full)
        if leaf[0] != "layers":
            return np.asarray(layer_part(leaf, 0, index), dtype)
        layers = range(full[0])[index[0]]
        out = None
        for row, layer in enumerate(layers):
            part = layer_part(leaf, layer, index[1:])
            if out is None:
                out = np.empty((len(layers), *part.shape), dtype)
            out[row] = part
        return out

    if tied_head is not None:
        embed = build(("embed", "embedding"))
        if tied_head.shape != embed.shape or not np.array_equal(
                np.asarray(tied_head).astype(dtype), embed):
            raise CheckpointError(
                f"{_TIED_HEAD} differs from the embedding but tie_word_embeddings is true; set "
                f"tie_word_embeddings=false in config.json to load an untied head")

    shard_of = {}
    if shardings is not None:
        sflat = jax.tree_util.tree_flatten_with_path(shardings)[0]
        shard_of = {tuple(k.key for k in path): s for path, s in sflat}
        if set(shard_of) != set(leaves):
            raise CheckpointError(f"shardings tree does not match the params: "
                                  f"{sorted(map(_fmt, set(shard_of) ^ set(leaves)))}")

    out = []
    for path, s in flat:
        leaf = tuple(k.key for k in path)
        if leaf not in shard_of:
            out.append(jax.device_put(build(leaf)))
            continue
        built: dict[tuple, np.ndarray] = {}  # devices holding the same part share one read

        def shard(index, leaf=leaf, built=built, shape=s.shape):
            key = tuple(i.indices(n) for i, n in zip(index, shape))
            if key not in built:
                built[key] = build(leaf, index)
            return built[key]

        out.append(jax.make_array_from_callback(s.shape, shard_of[leaf], shard))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Files.

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64,
           "BF16": np.dtype(jnp.bfloat16)}


def _file_tensors(file: str) -> dict[str, np.ndarray]:
    """{name: read-only view} of one safetensors file, memory-mapped: no data is read until a
    view (or part of one) is used. Layout: 8-byte header size, JSON header, data."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > os.path.getsize(file) - 8:
                raise ValueError(f"header of {size} bytes is longer than the file")
            header = json.loads(f.read(size))
        data = np.memmap(file, np.uint8, mode="r", offset=8 + size)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: not a safetensors file or truncated ({e})") \
            from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {file}: its safetensors header is not a JSON object")
    views = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (start, end), shape = entry["dtype"], entry["data_offsets"], entry["shape"]
            shape = tuple(int(n) for n in shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: malformed header entry for tensor {name}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        dt = np.dtype(_DTYPES[dtype])
        if not 0 <= start <= end <= data.size or end - start != math.prod(shape) * dt.itemsize:
            raise CheckpointError(f"{file}: tensor {name} lies outside the file (truncated?)")
        views[name] = data[start:end].view(dt).reshape(shape)
    return views


def _safetensors_files(path: str) -> list[tuple[str, set | None]]:
    """[(file, keys the index assigns to it or None)] of a HF directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        by_file: dict[str, set] = {}
        for key, shard in weight_map.items():
            by_file.setdefault(shard, set()).add(key)
        files = []
        for shard in sorted(by_file):
            file = os.path.join(path, shard)
            if not os.path.exists(file):
                raise CheckpointError(
                    f"{index} points to shard {shard}, which is missing from {path}")
            files.append((file, by_file[shard]))
        return files
    if os.path.exists(single):
        return [(single, None)]
    other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
    hint = f" (found {sorted(other)}: convert them to safetensors)" if other else ""
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")


def safetensors_tensors(path: str) -> dict[str, np.ndarray]:
    """{HF name: memory-mapped read-only view} of a HF directory's safetensors (sharded or not).

    Only headers are read here; `params_from_hf_tensors` then reads each device's part.
    """
    tensors: dict[str, np.ndarray] = {}
    for file, expected in _safetensors_files(path):
        views = _file_tensors(file)
        if expected is not None and not expected <= set(views):
            raise CheckpointError(f"{file} lacks keys its index assigns to it: "
                                  f"{sorted(expected - set(views))[:8]}")
        twice = set(views) & set(tensors)
        if twice:
            raise CheckpointError(f"{file} repeats tensors of another shard: {sorted(twice)[:8]}")
        tensors.update(views)
    return tensors


def read_hf_config(path: str) -> dict:
    """The `config.json` dict of a HF directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(f"no config.json in {path}")
    with open(file) as f:
        return json.load(f)


def load_hf_checkpoint(path: str, dtype: str = "float32",
                       shardings: Any = None) -> tuple[ModelConfig, dict]:
    """Loads a HF LLaMA-family or Falcon directory (config.json + safetensors, sharded or not).

    Args:
      path: the HF model directory.
      dtype: storage/compute dtype of the loaded base ("float32", "bfloat16", "float16").
      shardings: optional per-leaf shardings (see `params_from_hf_tensors`).

    Returns:
      (ModelConfig, params) with params shaped as `models.abstract_params(cfg)`.

    Raises:
      CheckpointError: missing files, unknown keys, missing tensors or wrong shapes.
      ConfigError: an architecture bita_jax does not run (e.g. ALiBi Falcon).
    """
    cfg = ModelConfig.from_hf_config(read_hf_config(path), dtype=dtype)
    return cfg, params_from_hf_tensors(cfg, safetensors_tensors(path), shardings)
