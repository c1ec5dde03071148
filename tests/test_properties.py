"""Property tests: BiTA greedy decoding equals plain greedy decoding token for token, over random
draft trees (with and without a prompt-lookup branch), batch sizes, prompt lengths and contents,
EOS placements, max-new-token limits, adapters and draft quality.

A compile costs seconds on this CPU and a decode of a tiny model milliseconds, so everything a
compile depends on is drawn from small fixed pools: the (model, tree, batch size, EOS ids)
`CONFIGS` below, one prompt bucket (1 to 16 tokens) and one output bucket (64 slots). What varies
freely is traced: prompt contents and lengths, max-new-tokens (per row), the adapter's values,
and the drafts. Each hypothesis example decodes one batch whose rows are independent cases.

Drafts come from the oracle of tests/test_decode.py: before each step, a row's drafts are
replaced by the true greedy continuation with a drawn fraction of nodes corrupted, so that deep
acceptance, partial paths, and EOS or max-new-tokens cutting an accepted run really happen;
other rows keep the drafts their (random) adapter's masks made. The reference is plain greedy
decoding without EOS, cut by the documented rule: up to and including the first EOS, at most
max-new-tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bita_jax import models
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import bita_prefill, bita_step
from bita_jax.decoding.engine import HEADROOM
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree, chain, full, upper_triangle
from bita_jax.models.config import ModelConfig

LLAMA = ModelConfig(arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
FALCON = ModelConfig(arch="falcon", vocab_size=89, hidden_size=32, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     new_decoder_architecture=True, tie_word_embeddings=True,
                     max_position_embeddings=512)
MODELS = {"llama": LLAMA, "falcon": FALCON}
MASKS = 3  # the adapters' masks; trees use 2 or 3 of them (a mask sees only earlier masks)
MAX_PROMPT = 16  # one prompt bucket
OUT = 64  # one output bucket: max-new-tokens 1..64
REF_BATCH = 32  # the reference decodes every batch padded to this many rows: one compile
EXAMPLES = 9  # batches per config (one hypothesis run per config)


def _random_tree(rng: np.random.Generator, masks: int, index: int) -> Tree:
    """A valid tree of depth <= masks: 0 to 3 children per node at distinct ranks < 5 (the root
    at least one), at most 14 nodes, pruned or not."""
    paths, frontier = [], [()]
    for _ in range(masks):
        level = []
        for parent in frontier:
            k = int(rng.integers(1 if parent == () else 0, 4))
            level += [parent + (int(r),) for r in sorted(rng.choice(5, size=k, replace=False))]
        level = level[: 14 - len(paths)]
        paths += level
        frontier = level
    return Tree(tuple(paths), masks, pruned=bool(rng.integers(2)), name=f"random-{index}")


_RNG = np.random.default_rng(20240611)
TREES = [
    Tree(chain(3), 3, name="chain"),
    Tree(upper_triangle(3, 3), 3, pruned=True, name="upper-triangle:3-pruned"),
    Tree(full(2, 2), 2, name="full:2@2"),
    *[_random_tree(_RNG, 2 + i % 2, i) for i in range(6)],
    # with a retrieval branch (prompt lookup) as deep as the masks, or deeper
    *[dataclasses.replace(_random_tree(_RNG, 2 + i % 2, i), lookup=n, lookup_ngram=g,
                          name=f"random-{i}+lookup:{n}:{g}") for i, n, g in ((6, 3, 2), (7, 6, 3))],
]


@dataclasses.dataclass(frozen=True)
class Config:
    """What one compile is for: model, tree (index into TREES), batch size, EOS ids (how many
    of the model's `eos_pool`)."""

    model: str
    tree: int
    batch: int
    num_eos: int


CONFIGS = [
    Config("llama", 0, 32, 1), Config("llama", 1, 32, 2), Config("llama", 2, 8, 0),
    Config("llama", 3, 32, 1), Config("llama", 4, 32, 2), Config("llama", 5, 1, 1),
    Config("llama", 6, 32, 0), Config("llama", 7, 8, 1), Config("falcon", 8, 32, 2),
    Config("llama", 9, 32, 1), Config("falcon", 10, 4, 2),
]


@functools.partial(jax.jit, static_argnames=("cfg", "tree", "eos_ids"))
def _oracle_generate(params, prompt, lens, max_new, truth, corrupt, oracle, key, sp, *, cfg, tree,
                     eos_ids):
    """BiTA greedy decoding of prompts [B, Tp] with oracle drafts for rows where `oracle` [B]:
    the true tokens `truth` [B, W] at the positions the nodes guess, each node wrong with
    probability `corrupt` [B]. max_new: [B].

    Returns (out [B, OUT], num_new [B], row_steps [B], step_hist [B, D + 2], record [B, OUT, 2]):
    record holds per step (drafts accepted, tokens emitted) while the row was live (the accepted
    count from the committed cache length), (-1, 0) after.
    """
    b, tp = prompt.shape
    lay = tree.layout
    state = bita_prefill(cfg, params, prompt, lens, max_new, sp, key, capacity=tp + OUT + HEADROOM,
                         out_slots=OUT, eos_ids=eos_ids, tree=tree)

    def step(carry):
        s, record = carry
        pos = s.cache.length[:, None] + lay.node_depth[None, :]  # the position each node guesses
        right = jnp.take_along_axis(truth, pos, axis=1)
        k1, k2 = jax.random.split(jax.random.fold_in(key, s.steps))
        wrong = jax.random.uniform(k1, right.shape) < corrupt[:, None]
        other = (right + jax.random.randint(k2, right.shape, 1, cfg.vocab_size)) % cfg.vocab_size
        drafts = jnp.where(oracle[:, None], jnp.where(wrong, other, right), s.drafts)
        new = bita_step(cfg, tree, params, s.replace(drafts=drafts), max_new, eos_ids)
        accepted = jnp.where(s.done, -1, new.cache.length - s.cache.length - 1)
        return new, record.at[:, s.steps].set(
            jnp.stack([accepted, new.num_new - s.num_new], axis=-1))

    record = jnp.tile(jnp.array([-1, 0], jnp.int32), (b, OUT, 1))
    state, record = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done) & (c[0].steps < OUT), step,
                                       (state, record))
    return state.out, state.num_new, state.row_steps, state.step_hist, record


@pytest.fixture(scope="module")
def setup():
    """Base params, a reference generator and an EOS pool per model. The EOS pool: tokens that
    greedy continuations of random prompts emit often (but not always), so that EOS lands at
    every position, inside accepted runs too."""
    out = {}
    rng = np.random.default_rng(0)
    for name, cfg in MODELS.items():
        # x3: at the 0.02 init the tied-embedding Falcon's greedy text mostly repeats the last
        # prompt token; x3 gives varied texts for both models.
        params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(3)))
        ref = Generator(cfg, params, eos_ids=())
        prompts = [rng.integers(0, cfg.vocab_size, rng.integers(1, MAX_PROMPT + 1)).tolist()
                   for _ in range(4 * REF_BATCH)]
        texts = []
        for i in range(0, len(prompts), REF_BATCH):
            texts += ref.generate(prompts[i: i + REF_BATCH], OUT).tokens
        share = collections.Counter(t for text in texts for t in set(text))
        # the most frequent tokens among those in at most half of the texts: EOS ends many
        # rows, early and late, and leaves others to run to max-new-tokens
        pool = [t for t, c in share.most_common() if c <= len(texts) // 2]
        assert len(pool) >= 2, share
        out[name] = (cfg, params, ref, tuple(pool[:2]))
    return out


def _expected(text: list[int], eos: tuple[int, ...], max_new: int) -> list[int]:
    """Plain greedy output with EOS ids `eos` and `max_new`, from the greedy text without EOS."""
    for i, t in enumerate(text[:max_new]):
        if t in eos:
            return text[: i + 1]
    return text[:max_new]


@st.composite
def _batches(draw, config: Config):
    vocab = MODELS[config.model].vocab_size
    rows = []
    for _ in range(config.batch):
        prompt = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=MAX_PROMPT))
        max_new = draw(st.integers(1, OUT))
        oracle = draw(st.sampled_from([True, True, True, False]))  # False: the masks' drafts
        corrupt = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.6, 1.0]))
        rows.append((prompt, max_new, oracle, corrupt))
    adapter = (draw(st.integers(0, 2**16)), draw(st.sampled_from([0.02, 1.0])))
    return config, rows, adapter, draw(st.integers(0, 2**16))


def test_bita_equals_greedy_on_random_cases(setup):
    """Every row of every drawn batch: BiTA's ids == plain greedy's (EOS and max-new-tokens
    applied), and the per-step record agrees with `step_hist` and `row_steps`. Counts the kinds
    of cases that came up and requires each of them many times."""
    stats = collections.Counter()
    t0 = time.perf_counter()

    def case(batch):
        config, rows, (adapter_seed, adapter_std), seed = batch
        cfg, params, ref, eos_pool = setup[config.model]
        eos = eos_pool[: config.num_eos]
        tree = TREES[config.tree]
        prompts = [r[0] for r in rows]
        padded = prompts + [[0]] * (REF_BATCH - len(prompts))
        texts = ref.generate(padded, OUT).tokens[: len(rows)]  # greedy, no EOS: [B] x OUT
        b = len(rows)
        prompt = np.zeros((b, MAX_PROMPT), np.int32)
        truth = np.zeros((b, MAX_PROMPT + OUT + 2 * HEADROOM), np.int32)
        for i, (p, text) in enumerate(zip(prompts, texts)):
            prompt[i, : len(p)] = p
            truth[i, : len(p) + len(text)] = p + text
        bcfg = models.BitaConfig(num_masks=MASKS, init_std=adapter_std)
        bp = models.init_bita_params(cfg, bcfg, jax.random.key(adapter_seed))
        out, num, row_steps, hist, record = jax.device_get(_oracle_generate(
            (params, bp, None), prompt, np.array([len(p) for p in prompts], np.int32),
            np.array([r[1] for r in rows], np.int32), truth,
            np.array([r[3] for r in rows], np.float32), np.array([r[2] for r in rows]),
            jax.random.key(seed), SamplingParams.greedy(), cfg=cfg, tree=tree, eos_ids=eos))
        for i, (_, max_new, oracle, _) in enumerate(rows):
            got = out[i, : num[i]].tolist()
            want = _expected(texts[i], eos, max_new)
            assert got == want, (got, want, config, tree, eos, rows[i])
            live = record[i][record[i][:, 0] >= 0]
            assert len(live) == row_steps[i] and sum(live[:, 1]) == len(got) - 1
            assert np.bincount(live[:, 1],
                               minlength=tree.layout.max_depth + 2).tolist() == list(hist[i])
            stats["cases"] += 1
            stats["oracle" if oracle else "mask drafts"] += 1
            stats["deep acceptance (>= 2 drafts in a step)"] += bool((live[:, 0] >= 2).any())
            if len(live) and live[-1, 1] <= live[-1, 0]:  # the last step emitted no bonus
                stats["EOS inside an accepted run" if got[-1] in eos
                      else "max-new cut an accepted run"] += 1
            stats["ended by EOS"] += got[-1] in eos
        stats["batches"] += 1
        stats[config] += 1

    for config in CONFIGS:  # every config gets its examples
        settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)(
            given(_batches(config))(case))()
    seconds = time.perf_counter() - t0
    kinds = {k: v for k, v in stats.items() if isinstance(k, str)}
    print(f"\n{stats['cases']} cases in {stats['batches']} batches, {seconds:.0f} s: {kinds}")
    # The pools do their job: every config (tree) ran, every kind of case came up, many times.
    assert stats["batches"] == EXAMPLES * len(CONFIGS) and all(stats[c] for c in CONFIGS), stats
    for kind in ("mask drafts", "deep acceptance (>= 2 drafts in a step)",
                 "EOS inside an accepted run", "max-new cut an accepted run", "ended by EOS"):
        assert stats[kind] >= 20, (kind, dict(stats))
