"""LoRA (issue 15): on every row it is a fine-tuned model (equal to the merged kernels); on mask
rows only (`bita_params["lora"]`) real rows keep the frozen base arithmetic bit for bit, so BiTA
decoding stays equal to the base model's greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.tree import Tree
from bita_jax.models import lora as lora_lib
from tests.test_decode import FALCON, LLAMA, PROMPTS


@pytest.fixture(scope="module", params=[LLAMA, FALCON], ids=["llama", "falcon"])
def setup(request):
    cfg = request.param
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(3)))
    return cfg, params


def random_lora(cfg, rank=4, seed=0, scale=0.3):
    """A LoRA whose update is far from zero (a fresh one has b = 0)."""
    fresh = lora_lib.init_lora(cfg, lora_lib.LoraConfig(rank=rank), jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 2 * len(fresh)))
    return {t: {"a": scale * jax.random.normal(next(keys), ab["a"].shape),
                "b": scale * jax.random.normal(next(keys), ab["b"].shape)}
            for t, ab in fresh.items()}


def _causal_forward(cfg, params, tokens, **kw):
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, kv = models.forward(cfg, params, tokens, positions, jnp.tril(jnp.ones((t, t), bool)),
                                **kw)
    return models.lm_logits(cfg, params, hidden), kv


def test_shapes_counts_and_targets():
    shapes = lora_lib.lora_shapes(LLAMA, lora_lib.LoraConfig(rank=4))
    assert list(shapes) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]
    assert shapes["k_proj"] == {"a": (2, 32, 4), "b": (2, 4, 16)}
    assert shapes["down_proj"] == {"a": (2, 64, 4), "b": (2, 4, 32)}
    # per layer: r * (I + O) summed over the seven projections
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert lora_lib.count_lora(LLAMA, lora_lib.LoraConfig(rank=4)) == 2 * per_layer
    assert "gate_proj" not in lora_lib.lora_shapes(FALCON, lora_lib.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="do not exist in a falcon block"):
        lora_lib.lora_shapes(FALCON, lora_lib.LoraConfig(rank=2, targets=("gate_proj",)))
    with pytest.raises(ValueError, match="choose from"):
        lora_lib.LoraConfig(targets=("qkv",))


def test_a_fresh_lora_is_the_base_model_exactly(setup):
    cfg, params = setup
    fresh = lora_lib.init_lora(cfg, lora_lib.LoraConfig(rank=4), jax.random.key(1))
    want, _ = _causal_forward(cfg, params, [PROMPTS[2]])
    got, _ = _causal_forward(cfg, params, [PROMPTS[2]], lora=fresh)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_every_row_lora_equals_merged_kernels_in_both_layouts(setup):
    cfg, params = setup
    lora = random_lora(cfg)
    merged = lora_lib.merge(params, lora)
    base, _ = _causal_forward(cfg, params, [PROMPTS[2]])
    on_the_fly, _ = _causal_forward(cfg, params, [PROMPTS[2]], lora=lora)
    folded, _ = _causal_forward(cfg, merged, [PROMPTS[2]])
    unrolled, _ = _causal_forward(cfg, models.to_unrolled(params), [PROMPTS[2]], lora=lora)
    assert float(jnp.max(jnp.abs(on_the_fly - base))) > 1e-2  # the update is real
    np.testing.assert_allclose(np.asarray(on_the_fly), np.asarray(folded), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(folded), atol=1e-4, rtol=1e-4)
    # merging the unrolled layout (kernels stored transposed) gives the same kernels
    for a, b in zip(jax.tree.leaves(lora_lib.merge(models.to_unrolled(params), lora)),
                    jax.tree.leaves(models.to_unrolled(merged))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_only_the_adapted_projection_changes():
    cfg = LLAMA
    params = models.init_params(cfg, jax.random.key(0))
    lora = {"v_proj": random_lora(cfg)["v_proj"]}
    merged = lora_lib.merge(params, lora)
    changed = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (jax.tree_util.keystr(path), bool(jnp.any(a != b))), params, merged)
    assert [p for p, c in jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple)) if c] \
        == ["['layers']['attn']['v_proj']['kernel']"]


def _bita_with_mask_lora(cfg, masks=3, seed=5):
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=masks), jax.random.key(seed))
    return {**bp, "lora": random_lora(cfg, seed=seed)}


def test_mask_only_lora_leaves_real_rows_bit_identical(setup):
    """Real rows and masks in one block (real rows causal, masks after them): with a mask-only
    LoRA present, the real rows' logits and keys/values are bit for bit those of the same forward
    without it (and the base model's), while the mask rows change."""
    cfg, params = setup
    bp = _bita_with_mask_lora(cfg)
    real = PROMPTS[2]
    r, m = len(real), 3
    tokens = jnp.asarray([real + [cfg.vocab_size + k for k in range(m)]], jnp.int32)
    positions = jnp.asarray([list(range(r)) + [r + k for k in range(m)]], jnp.int32)
    mask = np.tril(np.ones((r + m, r + m), bool))
    mask[:r, r:] = False
    plain_tokens = jnp.where(tokens >= cfg.vocab_size, 0, tokens)  # the base model, same shape
    for layout in (params, models.to_unrolled(params)):
        out = {}
        for name, toks, bita in (("base", plain_tokens, None),
                                 ("prefix and masks", tokens, {k: v for k, v in bp.items()
                                                              if k != "lora"}),
                                 ("mask-only lora", tokens, bp)):
            hidden, (k, v) = models.forward(cfg, layout, toks, positions, jnp.asarray(mask),
                                            bita_params=bita)
            out[name] = (np.asarray(models.lm_logits(cfg, layout, hidden)), np.asarray(k),
                         np.asarray(v))
        for i, rows in ((0, np.s_[:, :r]), (1, np.s_[:, :, :r]), (2, np.s_[:, :, :r])):
            # bit for bit what the same BiTA forward gives without the LoRA
            np.testing.assert_array_equal(out["mask-only lora"][i][rows],
                                          out["prefix and masks"][i][rows])
            # the base model's numbers (another XLA program: its fusions may round differently)
            np.testing.assert_allclose(out["mask-only lora"][i][rows], out["base"][i][rows],
                                       rtol=1e-5, atol=1e-5)
        lora_effect = out["mask-only lora"][0][:, r:] - out["prefix and masks"][0][:, r:]
        assert np.max(np.abs(lora_effect)) > 1e-2


def test_mask_only_lora_gets_gradients_from_the_mask_loss():
    from bita_jax.training import loss as loss_lib
    from bita_jax.training import samples as sample_lib

    cfg = LLAMA
    params = models.init_params(cfg, jax.random.key(0))
    bp = _bita_with_mask_lora(cfg, masks=2)
    spec = sample_lib.SampleSpec(num_masks=2, max_groups=3, cutoff=16, real_len=12)
    rng = np.random.default_rng(0)
    batch = sample_lib.stack([sample_lib.build_sample([3, 4, 5], list(range(10, 22)), spec, rng)
                              for _ in range(2)])
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss(bita, base):
        return loss_lib.loss_fn(bita, base, batch, None, cfg=cfg, bcfg=models.BitaConfig(
            num_masks=2), spec=spec, train=False)[0]

    grads = jax.grad(loss)(bp, params)
    for target, ab in grads["lora"].items():
        assert float(jnp.max(jnp.abs(ab["a"]))) > 0 and float(jnp.max(jnp.abs(ab["b"]))) > 0, target
    assert float(jnp.max(jnp.abs(grads["mask_embed"]))) > 0
    assert float(jnp.max(jnp.abs(grads["prefix"]))) > 0


def test_decoding_with_mask_only_lora_equals_base_greedy(setup):
    cfg, params = setup
    bp = _bita_with_mask_lora(cfg)
    tree_name = "upper-triangle" if cfg.arch == "llama" else "chain"
    tree = Tree.make(tree_name, 3)
    for prompts, n in ((PROMPTS, 29), (PROMPTS[1:2], 9)):
        want = Generator(cfg, params).generate(prompts, n).tokens
        got = BitaGenerator(cfg, params, bp, tree).generate(prompts, n).tokens
        assert got == want, (tree_name, n)
