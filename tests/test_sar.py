"""Training samples: a small case checked by hand; two-pass loss == the paper's single sequence."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.data import dataset
from bita_jax.models.config import ModelConfig
from bita_jax.training import batches
from bita_jax.training import loss as loss_lib
from bita_jax.training import samples as sample_lib
from bita_jax.training import step as step_lib

V = 96


class _FixedStart:
    """An rng stand-in whose `integers` returns a chosen window start s."""

    def __init__(self, s):
        self.s = s

    def integers(self, low, high):
        assert low <= self.s < high, (low, self.s, high)
        return self.s


SRC = [10, 11, 12]
TGT = [20, 21, 22, 23, 24, 25, 26]  # 26 = EOS
SPEC = sample_lib.SampleSpec(num_masks=2, max_groups=3, cutoff=12, real_len=8)


def test_small_sample_by_hand():
    # A = 7 - 2 = 5 anchors possible, G = 3, s = 1 -> anchors p = 1, 2, 3.
    out = sample_lib.build_sample(SRC, TGT, SPEC, _FixedStart(1))
    # real tokens: src + tgt[:p_2] = src + tgt[:3], right-padded to Tr = 8
    np.testing.assert_array_equal(out["tokens"], [10, 11, 12, 20, 21, 22, 0, 0])
    # visible real tokens of group j: len(src) + p_j
    np.testing.assert_array_equal(out["anchors"], [4, 5, 6])
    # mask k of group j predicts tgt[p_j + 1 + k]
    np.testing.assert_array_equal(out["labels"], [22, 23, 23, 24, 24, 25])

    tokens, positions, mask, labels = sample_lib.full_layout(out, 6, SPEC, V)
    np.testing.assert_array_equal(tokens, [10, 11, 12, 20, 21, 22, V, V + 1, V, V + 1, V, V + 1])
    np.testing.assert_array_equal(positions, [0, 1, 2, 3, 4, 5, 4, 5, 5, 6, 6, 7])
    np.testing.assert_array_equal(labels, [-1] * 6 + [22, 23, 23, 24, 24, 25])
    want_mask_rows = np.array([
        # real 0..5         | g0 m0 m1 | g1 m0 m1 | g2 m0 m1
        [1, 1, 1, 1, 0, 0,    1, 0,      0, 0,      0, 0],  # g0 m0: sees src + tgt[0]
        [1, 1, 1, 1, 0, 0,    1, 1,      0, 0,      0, 0],  # g0 m1
        [1, 1, 1, 1, 1, 0,    0, 0,      1, 0,      0, 0],  # g1 m0: sees src + tgt[:2]
        [1, 1, 1, 1, 1, 0,    0, 0,      1, 1,      0, 0],  # g1 m1
        [1, 1, 1, 1, 1, 1,    0, 0,      0, 0,      1, 0],  # g2 m0: sees src + tgt[:3]
        [1, 1, 1, 1, 1, 1,    0, 0,      0, 0,      1, 1],  # g2 m1
    ], bool)
    np.testing.assert_array_equal(mask[6:], want_mask_rows)
    np.testing.assert_array_equal(mask[:6], np.hstack([np.tril(np.ones((6, 6), bool)),
                                                       np.zeros((6, 6), bool)]))
    # The two-pass view of the same thing: [G*M, G*M] group mask and [G*M, Tr] cache visibility.
    np.testing.assert_array_equal(sample_lib.group_mask(SPEC), want_mask_rows[:, 6:])
    np.testing.assert_array_equal(sample_lib.mask_ids(SPEC, V), [V, V + 1] * 3)
    np.testing.assert_array_equal(sample_lib.mask_offsets(SPEC), [0, 1] * 3)
    visible = np.arange(8)[None, :] < np.repeat(out["anchors"], 2)[:, None]
    np.testing.assert_array_equal(visible, np.hstack([want_mask_rows[:, :6],
                                                      np.zeros((6, 2), bool)]))


def test_window_edges_padding_groups_and_truncation():
    # s = A - G: the last anchor p = 4
    last = sample_lib.build_sample(SRC, TGT, SPEC, _FixedStart(2))
    np.testing.assert_array_equal(last["anchors"], [5, 6, 7])
    np.testing.assert_array_equal(last["labels"], [23, 24, 24, 25, 25, 26])  # reaches the EOS
    # Short response: A = 2 < max groups -> 2 groups, the third is padding (anchor 0, label -1).
    short = sample_lib.build_sample(SRC, [20, 21, 22, 23], SPEC, np.random.default_rng(0))
    np.testing.assert_array_equal(short["tokens"], [10, 11, 12, 20, 0, 0, 0, 0])
    np.testing.assert_array_equal(short["anchors"], [3, 4, 0])
    np.testing.assert_array_equal(short["labels"], [21, 22, 22, 23, -1, -1])
    # len(tgt) <= M: no mask group, no sample.
    assert sample_lib.build_sample(SRC, [20, 21], SPEC, np.random.default_rng(0)) is None
    assert not sample_lib.usable(3, 2, SPEC) and sample_lib.usable(3, 3, SPEC)
    # Truncation to the cutoff: len(src) + len(tgt) <= 12 -> tgt[:9], anchors p in 0..6.
    long_tgt = list(range(30, 50))
    spec = sample_lib.SampleSpec(num_masks=2, max_groups=64, cutoff=12)
    assert spec.tr == 9
    out = sample_lib.build_sample(SRC, long_tgt, spec, np.random.default_rng(0))
    np.testing.assert_array_equal(out["anchors"][:8], [3, 4, 5, 6, 7, 8, 9, 0])
    np.testing.assert_array_equal(out["labels"][12:16], [37, 38, -1, -1])
    np.testing.assert_array_equal(out["tokens"], SRC + list(range(30, 36)))


def test_spread_anchors_cover_every_response_position_equally():
    """anchors="spread": G distinct sorted anchors from all A, labels and real tokens follow them;
    each position is an anchor about G/A of the time, where the paper's window gives the first
    position only 1/(A-G+1) of the time."""
    tgt = list(range(100, 130))  # A = 30 - 2 = 28 anchors possible, G = 7
    window = sample_lib.SampleSpec(num_masks=2, max_groups=7, cutoff=64)
    spread = sample_lib.SampleSpec(num_masks=2, max_groups=7, cutoff=64, anchors="spread")
    counts = {"window": np.zeros(28), "spread": np.zeros(28)}
    for seed in range(2000):
        for spec in (window, spread):
            out = sample_lib.build_sample(SRC, tgt, spec, np.random.default_rng(seed))
            p = out["anchors"] - len(SRC)
            assert np.all(np.diff(p) > 0) and p[0] >= 0 and p[-1] < 28
            labels = out["labels"].reshape(7, 2)
            np.testing.assert_array_equal(labels, np.asarray(tgt)[p[:, None] + 1 + np.arange(2)])
            real = SRC + tgt[:p[-1]]
            np.testing.assert_array_equal(out["tokens"][:len(real)], real)
            assert not out["tokens"][len(real):].any()
            counts[spec.anchors][p] += 1
    freq = {k: v / 2000 for k, v in counts.items()}
    assert abs(freq["window"][0] - 1 / 22) < 0.015  # s = 0 only
    assert np.all(np.abs(freq["spread"] - 7 / 28) < 0.04), freq["spread"]
    # Responses with A <= G use every anchor in both modes: the same sample.
    short = [20, 21, 22, 23, 24]
    a, b = (sample_lib.build_sample(SRC, short, spec, np.random.default_rng(0))
            for spec in (window, spread))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="anchors"):
        sample_lib.SampleSpec(num_masks=2, anchors="random")


def test_batch_stream_is_deterministic_and_covers_each_epoch():
    rng = np.random.default_rng(0)
    # prompt = [record id]: a sample's first token tells which record it came from
    records = [{"prompt_ids": np.array([i]), "response_ids": np.arange(100, 100 + n)}
               for i, n in enumerate(rng.integers(1, 30, size=23))]
    spec = sample_lib.SampleSpec(num_masks=2, max_groups=4, cutoff=40)
    stream = batches.BatchStream(records, spec, batch_size=4, seed=7)
    again = batches.BatchStream(records, spec, batch_size=4, seed=7)
    usable = [i for i, r in enumerate(records) if len(r["response_ids"]) > 2]
    n = stream.num_usable
    assert n == len(usable) < len(records)
    for step in (0, 3, 11):
        a, b = stream.batch(step), again.batch(step)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert a["tokens"].shape == (4, spec.tr) and a["labels"].shape == (4, 8)
    # Rows of one process's slice equal the same rows of the global batch.
    np.testing.assert_array_equal(stream.batch(5, slice(2, 4))["labels"],
                                  stream.batch(5)["labels"][2:])
    # Each epoch visits every usable record once, in a fresh order, with fresh windows.
    epoch0 = [int(stream.sample(i)["tokens"][0]) for i in range(n)]
    epoch1 = [int(stream.sample(n + i)["tokens"][0]) for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == usable and epoch0 != epoch1
    anchors0 = {int(stream.sample(i)["tokens"][0]): stream.sample(i)["anchors"] for i in range(n)}
    anchors1 = {int(stream.sample(n + i)["tokens"][0]): stream.sample(n + i)["anchors"]
                for i in range(n)}
    assert any(not np.array_equal(anchors0[r], anchors1[r]) for r in usable)
    # Another seed: another order.
    other = batches.BatchStream(records, spec, batch_size=4, seed=8)
    assert not np.array_equal(other.batch(0)["labels"], stream.batch(0)["labels"])
    assert stream.position(10) == {"step": 10, "epoch": 40 // n, "index_in_epoch": 40 % n,
                                   "samples_seen": 40}


def test_load_records_jsonl_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [3, 4, 5]}) + "\n\n"
                    + json.dumps({"prompt_ids": [7], "response_ids": [8]}) + "\n")
    recs = dataset.load_records(path)
    assert len(recs) == 2 and recs[0]["response_ids"].dtype == np.int32
    np.testing.assert_array_equal(recs[1]["prompt_ids"], [7])
    with pytest.raises(dataset.DataError, match="not found"):
        dataset.load_records(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1]}\n')
    with pytest.raises(dataset.DataError, match=r"bad.jsonl:1: expected integer lists"):
        dataset.load_records(bad)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(dataset.DataError, match="unsupported data file"):
        dataset.load_records(tmp_path / "x.txt")


# ---------------------------------------------------------------------------------------------
# The efficient two-pass loss equals the loss of the paper's one concatenated sequence.

CFG = ModelConfig(arch="llama", vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True, norm_eps=1e-6)


def _random_params(cfg, seed=0):
    """O(1) activations, so that a wrong mask or position shows far beyond the tolerance."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        scale = {"scale": 0.1, "bias": 0.1, "embedding": 0.5}.get(name, 0.2)
        return jnp.asarray((1.0 if name == "scale" else 0.0) + scale * noise)

    return jax.tree_util.tree_map_with_path(draw, models.abstract_params(cfg))


def _reference(cfg, spec, params, bita_params, samples):
    """Mean CE over mask tokens and the mask rows' logits [B, G*M, V], from ONE forward over the
    paper's concatenated layout of every sample (rows right-padded to a common length; a padding
    token sees only itself and nobody sees it)."""
    layouts = [sample_lib.full_layout(smp, int(smp["anchors"].max()), spec, cfg.vocab_size)
               for smp in samples]  # len(src) + p_{G-1} = the largest anchor
    t = max(len(x[0]) for x in layouts)
    b = len(samples)
    tokens, positions = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    mask, labels = np.tile(np.eye(t, dtype=bool), (b, 1, 1)), np.full((b, t), -1, np.int32)
    starts = []
    for i, (tok, pos, msk, lab) in enumerate(layouts):
        n = len(tok)
        tokens[i, :n], positions[i, :n], mask[i, :n, :n], labels[i, :n] = tok, pos, msk, lab
        starts.append(n - spec.num_mask_tokens)
    hidden, _ = models.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions),
                              jnp.asarray(mask), bita_params=bita_params)
    logits = models.lm_logits(cfg, params, hidden)  # [B, T, V]
    rows = jnp.stack([logits[i, s:s + spec.num_mask_tokens] for i, s in enumerate(starts)])
    lab = jnp.asarray(labels)
    valid = lab >= 0
    logz = jax.nn.logsumexp(logits, -1)
    gold = jnp.take_along_axis(logits, jnp.maximum(lab, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, logz - gold, 0.0)) / jnp.sum(valid), rows


@pytest.mark.parametrize("anchors", ["window", "spread"])
def test_two_pass_loss_equals_single_sequence(anchors):
    """loss_fn (real tokens without gradient, then mask groups over their KV) == one forward over
    `src + tgt[:p_last] + groups` with the paper's [T, T] mask: loss, per-mask hits, gradients.
    "spread" puts the groups at non-consecutive anchors."""
    cfg = CFG
    bcfg = models.BitaConfig(num_prefix=4, num_masks=3, prefix_dropout=0.0, init_std=0.5)
    spec = sample_lib.SampleSpec(num_masks=3, max_groups=5, cutoff=24, anchors=anchors)
    params = _random_params(cfg)
    bita_params = models.init_bita_params(cfg, bcfg, jax.random.key(3))
    rng = np.random.default_rng(1)
    cases = [(rng.integers(0, V, 4), rng.integers(0, V, 15)),  # 5 groups out of A = 12
             (rng.integers(0, V, 6), rng.integers(0, V, 6))]   # A = 3: 2 padding groups
    samples = [sample_lib.build_sample(s, t, spec, np.random.default_rng(i)) for i, (s, t) in
               enumerate(cases)]
    batch = {k: jnp.asarray(v) for k, v in sample_lib.stack(samples).items()}
    valid = np.asarray(batch["labels"]) >= 0
    assert valid.sum() == 5 * 3 + 3 * 3
    assert (np.diff(samples[0]["anchors"]) > 1).any() == (anchors == "spread")

    def two_pass(bp, base, batch):
        return loss_lib.loss_fn(bp, base, batch, None, cfg=cfg, bcfg=bcfg, spec=spec,
                                  train=False)

    def single(bp, base):  # the layout is built on the host from the (numpy) samples
        return _reference(cfg, spec, base, bp, samples)

    jit = functools.partial(jax.jit, compiler_options=step_lib.FAST_CPU_COMPILE)
    (loss, metrics), g_two = jit(jax.value_and_grad(two_pass, has_aux=True))(
        bita_params, params, batch)
    (want, want_rows), g_one = jit(jax.value_and_grad(single, has_aux=True))(bita_params, params)
    assert abs(float(loss) - float(want)) <= 1e-5, (float(loss), float(want))
    assert float(loss) > 1.0  # random model: far from a trivial zero
    hits = (np.argmax(np.asarray(want_rows), -1) == np.asarray(batch["labels"])) & valid
    np.testing.assert_array_equal(metrics["correct"], hits.reshape(2, -1, 3).sum((0, 1)))
    np.testing.assert_array_equal(metrics["count"], valid.reshape(2, -1, 3).sum((0, 1)))
    # Gradients w.r.t. the BiTA params agree as well (real tokens carry no gradient either way).
    for k in g_two:
        np.testing.assert_allclose(g_two[k], g_one[k], atol=1e-5, rtol=1e-4)
        assert float(jnp.abs(g_two[k]).max()) > 0.0


def test_per_sample_prefix_dropout():
    """Each sample draws its own prefix mask (as the official code), from its own key only, and
    the two-pass loss under it == the single-sequence loss of each sample with its own prefix."""
    cfg = CFG
    rate = 0.5
    bcfg = models.BitaConfig(num_prefix=4, num_masks=3, prefix_dropout=rate, init_std=0.5)
    spec = sample_lib.SampleSpec(num_masks=3, max_groups=5, cutoff=24)
    params = _random_params(cfg)
    bita_params = models.init_bita_params(cfg, bcfg, jax.random.key(3))
    keys = jax.random.split(jax.random.key(7), 2)

    dropped = models.prefix_dropout(bita_params, keys, rate)["prefix"]
    prefix = np.asarray(bita_params["prefix"])
    assert dropped.shape == (2, *prefix.shape)
    for b in range(2):
        row = np.asarray(dropped[b])
        kept = row != 0.0
        np.testing.assert_allclose(row[kept], prefix[kept] / (1.0 - rate), rtol=1e-6)
        assert 0.4 < kept.mean() < 0.6, kept.mean()
        # a sample's mask depends on its key alone (micro-batching and sharding keep it)
        alone = models.prefix_dropout(bita_params, keys[b:b + 1], rate)["prefix"][0]
        np.testing.assert_array_equal(np.asarray(alone), row)
    assert not np.array_equal(np.asarray(dropped[0]) != 0, np.asarray(dropped[1]) != 0)
    assert models.prefix_dropout(bita_params, keys, 0.0) is bita_params

    rng = np.random.default_rng(1)
    samples = [sample_lib.build_sample(rng.integers(0, V, 4), rng.integers(0, V, 15), spec,
                                np.random.default_rng(i)) for i in range(2)]
    batch = {k: jnp.asarray(v) for k, v in sample_lib.stack(samples).items()}
    jit = functools.partial(jax.jit, compiler_options=step_lib.FAST_CPU_COMPILE)
    loss, _ = jit(functools.partial(loss_lib.loss_fn, cfg=cfg, bcfg=bcfg, spec=spec,
                                    train=True))(bita_params, params, batch, keys)
    nll, count = 0.0, 0
    for b, sample in enumerate(samples):
        own = {**bita_params, "prefix": dropped[b]}
        mean_b, _ = jit(lambda bp, base, s=sample: _reference(cfg, spec, base, bp, [s]))(
            own, params)
        n_b = int((sample["labels"] >= 0).sum())
        nll, count = nll + float(mean_b) * n_b, count + n_b
    assert abs(float(loss) - nll / count) <= 1e-5, (float(loss), nll / count)
    shared, _ = jit(functools.partial(loss_lib.loss_fn, cfg=cfg, bcfg=bcfg, spec=spec,
                                      train=False))(bita_params, params, batch, None)
    assert abs(float(loss) - float(shared)) > 1e-3  # the dropout did change the loss
