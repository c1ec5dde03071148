"""Typed, frozen model configuration shared by the LLaMA and Falcon families.

A `ModelConfig` is static (hashable): it goes into `jax.jit` as a static argument and decides
every shape. Build one with `ModelConfig.from_hf_config` from a HF `config.json` dict (or a
`transformers.PretrainedConfig`), never by hand-parsing in callers.

Sliding-window attention (Mistral v0.1: `sliding_window` 4096, `max_position_embeddings` 32768) is
not implemented as a window: a token attends to at most W tokens (itself included), which for a
sequence of at most W tokens is every token before it, so full attention is exact there. The
config therefore caps `max_position_embeddings` at the window, and the cache bound (prompt +
max-new-tokens <= the context length) refuses longer requests with a one-line error. Configs with
`sliding_window: null` (Mistral v0.2 and later) keep their full context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp


class ConfigError(ValueError):
    """A model configuration that bita_jax cannot run, with the reason in the message."""


_LLAMA_TYPES = ("llama", "mistral", "smollm", "smollm2")
_FALCON_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a user's `--dtype` means: (the weights' storage dtype, the activations' compute dtype;
# None: the same). `bfloat16`, the accelerator mode, keeps bf16 weights (half the memory and
# weight traffic) but computes in fp32, so a tree step and a one-token step round alike and
# BiTA stays equal to plain greedy decoding; `bfloat16-pure` computes in bf16 too.
PRECISIONS = {"float32": ("float32", None), "bfloat16": ("bfloat16", "float32"),
              "bfloat16-pure": ("bfloat16", None), "float16": ("float16", None)}


def precision(name: str) -> tuple[str, str | None]:
    """(storage dtype, compute dtype or None) of a `--dtype` name (`PRECISIONS`).

    Raises:
      ConfigError: an unknown name.
    """
    if name not in PRECISIONS:
        raise ConfigError(f"dtype {name!r} not in {sorted(PRECISIONS)}")
    return PRECISIONS[name]
# The shape fields that identify a base model: an adapter records them (with a weights
# fingerprint) and refuses a model that differs in any.
IDENTITY_FIELDS = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                   "num_heads", "num_kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only base model.

    Attributes:
      arch: "llama" or "falcon".
      vocab_size: V.
      hidden_size: E.
      intermediate_size: F (MLP width).
      num_layers: L.
      num_heads: N query heads.
      num_kv_heads: K key/value heads (N for MHA, 1 for MQA, divides N).
      head_dim: D.
      rope_theta: RoPE base.
      rope_scaling: None, or a tuple of (key, value) pairs (hashable form of HF's dict).
      norm_eps: RMSNorm / LayerNorm epsilon.
      tie_word_embeddings: LM head shares the input embedding table.
      attention_bias: q/k/v/o projections carry biases (LLaMA variants; Falcon's `bias`).
      mlp_bias: MLP projections carry biases.
      parallel_attn: Falcon: attention and MLP read the same normed input and are summed.
      new_decoder_architecture: Falcon-40B/180B: grouped KV with ln_attn / ln_mlp.
      num_ln_in_parallel_attn: Falcon new arch: 2 norms (ln_attn, ln_mlp) or 1 (input_layernorm).
      max_position_embeddings: the longest sequence this config runs exactly: the model's
        trained context length, capped at its sliding window when it has one.
      bos_token_id: BOS id or None.
      eos_token_ids: ids that end generation.
      dtype: storage dtype of the frozen base ("float32", "bfloat16", "float16").
      compute_dtype: dtype of its activations, when it differs from `dtype` (bf16 weights
        computed in fp32); None: `dtype`.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    parallel_attn: bool = False
    new_decoder_architecture: bool = False
    num_ln_in_parallel_attn: int = 2
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    compute_dtype: str | None = None

    def __post_init__(self):
        if self.arch not in ("llama", "falcon"):
            raise ConfigError(f"unknown architecture {self.arch!r}: expected 'llama' or 'falcon'")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} not in {sorted(_DTYPES)}")
        if self.compute_dtype not in (None, *_DTYPES):
            raise ConfigError(f"compute_dtype {self.compute_dtype!r} not in {sorted(_DTYPES)}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type"))
            if kind not in ("linear", "llama3", "default"):
                raise ConfigError(
                    f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")

    @property
    def jnp_dtype(self):
        """The weights' (storage) dtype."""
        return _DTYPES[self.dtype]

    @property
    def jnp_compute_dtype(self):
        """The activations' dtype (the KV cache's too)."""
        return _DTYPES[self.compute_dtype or self.dtype]

    @property
    def precision_name(self) -> str:
        """The `PRECISIONS` name of this config's dtypes."""
        compute = None if self.compute_dtype in (None, self.dtype) else self.compute_dtype
        return next((name for name, dts in PRECISIONS.items() if dts == (self.dtype, compute)),
                    f"{self.dtype}-weights-{compute}-compute")

    @property
    def group_size(self) -> int:
        """G = N // K query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict[str, Any]:
        """The `IDENTITY_FIELDS` of this config."""
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | Any, dtype: str = "float32") -> ModelConfig:
        """Builds a config from a HF config dict or `PretrainedConfig`; `dtype` is a
        `PRECISIONS` name.

        Raises:
          ConfigError: unknown `model_type` or dtype, ALiBi Falcon, or inconsistent shapes.
        """
        if not isinstance(hf, Mapping):
            hf = hf.to_dict()
        storage, compute = precision(dtype)
        return cls._from_hf(hf, storage).replace(compute_dtype=compute)

    @classmethod
    def _from_hf(cls, hf: Mapping[str, Any], dtype: str) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type in _LLAMA_TYPES:
            return _llama_from_hf(hf, dtype)
        if model_type in _FALCON_TYPES:
            return _falcon_from_hf(hf, dtype)
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r}: bita_jax runs LLaMA-family "
            f"({', '.join(_LLAMA_TYPES)}) and Falcon models")


def _eos_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_theta(hf: Mapping[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(hf: Mapping[str, Any]):
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))


def _context_length(hf: Mapping[str, Any]) -> int:
    """`max_position_embeddings`, capped at `sliding_window` when the config sets one.

    Within W tokens a sliding window of W sees every earlier token, so full attention is exact up
    to W tokens and only there (see the module docstring).
    """
    context = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window is None:
        return context
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"sliding_window must be a positive integer or null, got {window!r}")
    return min(context, window)


def _llama_from_hf(hf: Mapping[str, Any], dtype: str) -> ModelConfig:
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        arch="llama",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        max_position_embeddings=_context_length(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
        dtype=dtype,
    )


def _falcon_from_hf(hf: Mapping[str, Any], dtype: str) -> ModelConfig:
    if hf.get("alibi", False):
        raise ConfigError("Falcon with ALiBi positions is not supported: bita_jax runs rotary "
                          "Falcon models (Falcon-7B/40B/180B); this config sets alibi=true")
    if not hf.get("rotary", True) and "rotary" in hf:
        raise ConfigError("Falcon without rotary embeddings is not supported")
    hidden = int(hf.get("hidden_size") or hf.get("n_embed"))
    heads = int(hf.get("num_attention_heads") or hf.get("n_head"))
    new_arch = bool(hf.get("new_decoder_architecture", False))
    if new_arch:
        kv_heads = int(hf.get("num_kv_heads") or hf.get("n_head_kv") or heads)
    elif hf.get("multi_query", True):
        kv_heads = 1
    else:
        kv_heads = heads
    ffn = hf.get("ffn_hidden_size") or 4 * hidden
    num_ln = hf.get("num_ln_in_parallel_attn")
    return ModelConfig(
        arch="falcon",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(ffn),
        num_layers=int(hf.get("num_hidden_layers") or hf.get("n_layer")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=bool(hf.get("bias", False)),
        mlp_bias=bool(hf.get("bias", False)),
        parallel_attn=bool(hf.get("parallel_attn", True)),
        new_decoder_architecture=new_arch,
        num_ln_in_parallel_attn=int(num_ln) if num_ln is not None else 2,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
        dtype=dtype,
    )
