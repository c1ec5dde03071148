"""ModelConfig.from_hf_config: Mistral's sliding window caps the context it runs exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding import GenerationError, Generator
from bita_jax.models.config import ConfigError, ModelConfig

# The shape fields of mistralai/Mistral-7B-v0.1's config.json; v0.2 and later set
# sliding_window to null.
MISTRAL = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def test_mistral_v01_sliding_window_caps_the_context():
    cfg = ModelConfig.from_hf_config({**MISTRAL, "sliding_window": 4096})
    assert cfg.arch == "llama" and cfg.max_position_embeddings == 4096
    # The cache bound refuses a request that would run past the window, naming the fix.
    gen = Generator(cfg, params=None)
    assert gen.shapes([4000], 96)[0] == 4096  # 4096 tokens in all: full attention is exact
    with pytest.raises(GenerationError, match=r"= 4097 exceeds the cache size 4096; shorten"):
        gen.shapes([4000], 97)


@pytest.mark.parametrize("window", [None, "absent"])
def test_mistral_without_window_keeps_its_context(window):
    hf = dict(MISTRAL) if window == "absent" else {**MISTRAL, "sliding_window": window}
    assert ModelConfig.from_hf_config(hf).max_position_embeddings == 32768


def test_window_longer_than_the_context_changes_nothing():
    hf = {**MISTRAL, "max_position_embeddings": 2048, "sliding_window": 4096}
    assert ModelConfig.from_hf_config(hf).max_position_embeddings == 2048


@pytest.mark.parametrize("window", [0, -1, "4096", 4096.5, True])
def test_bad_sliding_window_is_refused(window):
    with pytest.raises(ConfigError, match="sliding_window must be a positive integer or null"):
        ModelConfig.from_hf_config({**MISTRAL, "sliding_window": window})


def test_sliding_window_model_matches_hf_up_to_the_window(tmp_path):
    """A tiny HF Mistral with a window of 8: our logits equal HF's on 8 tokens (the capped
    context), and past it HF's differ from full attention, which is why the context is capped."""
    torch = pytest.importorskip("torch")
    from transformers import MistralConfig, MistralForCausalLM

    from bita_jax.checkpoints.hf import load_hf_checkpoint

    window, vocab = 8, 160
    torch.manual_seed(0)
    hf_model = MistralForCausalLM(MistralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=window, attn_implementation="eager")).eval()
    with torch.no_grad():  # weights large enough that attending to other tokens shows
        for name, p in hf_model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape) * (0.5 if "embed" in name else p.shape[1] ** -0.5))
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    cfg, params = load_hf_checkpoint(str(tmp_path))
    assert cfg.max_position_embeddings == window

    tokens = np.random.default_rng(0).integers(0, vocab, size=(2, 12)).astype(np.int32)
    with torch.no_grad():
        want = hf_model(torch.from_numpy(tokens).long()).logits.float().numpy()
    t = tokens.shape[1]
    with jax.default_matmul_precision("float32"):
        hidden, _ = models.forward(cfg, params, jnp.asarray(tokens),
                                   jnp.broadcast_to(jnp.arange(t), (2, t)),
                                   jnp.tril(jnp.ones((t, t), bool)))
        got = np.asarray(models.lm_logits(cfg, params, hidden))
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got[:, :window], want[:, :window], rtol=0, atol=1e-4)
    assert np.abs(got[:, window:] - want[:, window:]).max() > 1e-2  # the window bites past W
    with pytest.raises(GenerationError, match="exceeds the cache size 8"):
        Generator(cfg, params).shapes([6], 3)
