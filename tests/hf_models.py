"""Tiny random HF transformers models for tests: LLaMA and Falcon with weights large enough that a
layout bug shows, saved as safetensors so they load through the real converter.

    path = save(make_hf("llama", {"num_key_value_heads": 2}, seed=4), tmp_path)
    cfg, params = bita_jax.checkpoints.hf.load_hf_checkpoint(path)
"""

from __future__ import annotations

import math

import torch
from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM

V = 160  # vocabulary of every tiny model here

LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)
FALCON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, alibi=False)


def randomize(hf_model, seed):
    """Weights large enough that a layout bug moves the logits far beyond 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed" in name or "word_embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return hf_model


def make_hf(arch, overrides, seed=0):
    """A random `LlamaForCausalLM` ("llama") or `FalconForCausalLM` (else), fp32, eval mode;
    `overrides` are config fields on top of `LLAMA` / `FALCON`."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(**{**LLAMA, **overrides}, attn_implementation="eager")
        return randomize(LlamaForCausalLM(config), seed).eval()
    config = FalconConfig(**{**FALCON, **overrides}, attn_implementation="eager")
    return randomize(FalconForCausalLM(config), seed).eval()


def save(hf_model, path, **kwargs):
    """`save_pretrained` as safetensors (kwargs e.g. max_shard_size); returns the path as str."""
    hf_model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return str(path)
