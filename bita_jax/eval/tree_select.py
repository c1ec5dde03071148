"""Choose the draft tree for this hardware: held-out acceptance statistics x measured step times.

    stats = rank_stats(cfg, base_params, bita_params, [(prompt_ids, greedy_ids), ...])
    seconds = step_seconds({"plain": Generator(...), "chain": BitaGenerator(...), ...}, ids, 128)
    t_ar = seconds.pop("plain")
    preds = predict(trees, stats, seconds, t_ar)
    best = select(preds)

**Acceptance statistics.** Teacher forcing on held-out text (a prompt plus the base model's own
greedy continuation `tgt`), in the two-pass training layout (`training.loss.mask_logits`): the group
at anchor a sees the prompt and tgt[:a], and its mask k should predict tgt[a + 1 + k] (tgt[a] is
the base model's own token, the step's bonus). `RankStats.ranks[i, k]` is the rank of that true
token among mask k's logits (0 = argmax), clipped to R (= "R or worse"), -1 past the text's end.
That is exactly what decoding sees: the group drafting a step hangs off the last accepted token,
and verification accepts the level-l node of rank r iff the true token has rank r under mask l.

**Tokens per step**, two estimates:
  independent  E = sum over nodes (r_0..r_{d-1}) of prod_l p_l(r_l), with p_l the marginal rank
               distribution of mask l; tokens/step = E + 1 (the bonus). Ignores correlation
               between levels and the shifted drafts of pruned trees.
  replay       walk each text step by step as greedy BiTA decoding would (the first step holds no
               mask drafts; then accept the deepest node whose path equals the true ranks, emit it
               plus the bonus, jump to the anchor after the bonus, take the next drafts from that
               anchor's group, or for a childless node of a pruned tree from its parent's group
               shifted by one mask); tokens/step = emitted / steps. Same result as decoding the
               same texts, up to float near-ties in the ranks. A dynamic tree (`dynamic:N:K@D`)
               replays from the top log-probabilities kept beside the ranks (`top_logp`): at each
               anchor its N nodes are the N most probable candidate paths, as
               `decoding.dynamic_tree.select` picks them on device.

**Speed.** tokens/s of a tree ~ tokens_per_step / t_step(tree); predicted speedup over plain
greedy = tokens_per_step * t_ar / t_step. Step times come from `step_seconds` on the current
hardware: on an accelerator extra step tokens are nearly free, on a small CPU they are not, so the
best tree differs per machine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.decoding import dynamic_tree, lookup
from bita_jax.decoding import ngram as ngram_table
from bita_jax.decoding.engine import Engine, bucket
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Path, Tree, TreeError
from bita_jax.models.config import ModelConfig
from bita_jax.training import loss, samples

MAX_RANK = 8  # ranks >= MAX_RANK are pooled (no template drafts deeper than top-5)
TOP_LOGP = MAX_RANK  # log-probabilities kept per mask and anchor: a dynamic tree's K up to this
GROUPS_PER_CALL = 128  # mask groups per teacher-forced pass (longer texts take several passes)
METHODS = ("replay", "independent")


# ---------------------------------------------------------------------------------------------
# Acceptance statistics.


@dataclasses.dataclass
class RankStats:
    """Teacher-forced ranks of the true tokens under every mask of every anchor.

    ranks: list (one per text) of [A, M] int32 arrays: rank of tgt[a + 1 + k] under mask k of the
      group at anchor a (0 = top-1), clipped to `max_rank`; -1 where the text has ended.
    max_rank: R; rank R means "R or worse".
    texts: list (one per ranks entry) of (prompt ids, greedy continuation ids), the text the
      ranks were measured on, or None: what replays a retrieval branch (`+lookup`), whose drafts
      come from the text itself.
    top_logp: list (one per ranks entry) of [A, M, K] float32, the K highest log-probabilities
      under mask k of the group at anchor a, best first (K = `TOP_LOGP`), or None: what
      replays a dynamic tree, whose nodes follow them.
    ngram: the adapter's n-gram table (`ngram.NgramTable`, host arrays) or None: what a
      retrieval branch's drafts come from where prompt lookup finds no 2-gram, as in decoding.
    """

    ranks: list[np.ndarray]
    max_rank: int = MAX_RANK
    texts: list[tuple[np.ndarray, np.ndarray]] | None = None
    top_logp: list[np.ndarray] | None = None
    ngram: ngram_table.NgramTable | None = None

    @property
    def num_masks(self) -> int:
        return self.ranks[0].shape[1]

    def probs(self) -> np.ndarray:
        """[M, R + 1] marginal p_m(r) over all anchors that have a label for mask m."""
        r = np.concatenate(self.ranks)
        out = np.zeros((self.num_masks, self.max_rank + 1))
        for m in range(self.num_masks):
            valid = r[:, m][r[:, m] >= 0]
            out[m] = np.bincount(valid, minlength=self.max_rank + 1) / max(len(valid), 1)
        return out

    def by_position(self, width: int = 64) -> list[dict]:
        """Top-1 / top-5 per mask for anchors in response positions [lo, lo + width), in order.

        Says where in an answer the masks are weak (its start, or past the training length)."""
        r = np.concatenate(self.ranks)
        pos = np.concatenate([np.arange(len(x)) for x in self.ranks])
        out = []
        for lo in range(0, int(pos.max(initial=-1)) + 1, width):
            rows = r[(pos >= lo) & (pos < lo + width)]
            hit1, hit5 = [], []
            for m in range(self.num_masks):
                valid = rows[:, m][rows[:, m] >= 0]
                hit1.append(round(float(np.mean(valid == 0)), 4) if len(valid) else None)
                hit5.append(round(float(np.mean(valid < 5)), 4) if len(valid) else None)
            out.append({"positions": [lo, lo + width], "anchors": len(rows), "top1": hit1,
                        "top5": hit5})
        return out

    def to_dict(self) -> dict:
        p = self.probs()
        return {"anchors": int(sum(len(r) for r in self.ranks)), "texts": len(self.ranks),
                "max_rank": self.max_rank, "p_rank": np.round(p, 5).tolist(),
                "top1": np.round(p[:, 0], 4).tolist(),
                "top5": np.round(p[:, :5].sum(axis=1), 4).tolist(),
                "by_position": self.by_position()}


@functools.partial(jax.jit, static_argnames=("cfg", "num_masks", "max_rank"))
def _group_ranks(bita_params, base_params, tokens, anchors, labels, *, cfg: ModelConfig,
                 num_masks: int, max_rank: int):
    """Ranks [B, G*M] of `labels` under the mask logits of the two-pass layout (-1 = no label),
    and the `TOP_LOGP` highest log-probabilities of each mask [B, G*M, K]."""
    tr = tokens.shape[1]
    spec = samples.SampleSpec(num_masks=num_masks, max_groups=anchors.shape[1],
                          cutoff=tr + num_masks + 1, real_len=tr)
    logits = loss.mask_logits(cfg, spec, bita_params, base_params,
                                    {"tokens": tokens, "anchors": anchors})  # [B, G*M, V]
    safe = jnp.maximum(labels, 0)
    gold = jnp.take_along_axis(logits, safe[..., None], axis=-1)
    rank = jnp.minimum(jnp.sum(logits > gold, axis=-1), max_rank).astype(jnp.int32)
    top_logp = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), TOP_LOGP)[0]
    return jnp.where(labels >= 0, rank, -1), top_logp


def text_ranks(cfg: ModelConfig, base_params, bita_params, src: Sequence[int], tgt: Sequence[int],
               num_masks: int, max_rank: int = MAX_RANK,
               groups_per_call: int = GROUPS_PER_CALL) -> tuple[np.ndarray, np.ndarray]:
    """[A, M] ranks and [A, M, K] top log-probabilities for one text (A = len(tgt) - 1
    anchors; see `RankStats`)."""
    src, tgt = np.asarray(src, np.int32), np.asarray(tgt, np.int32)
    m = num_masks
    num_anchors = len(tgt) - 1
    if num_anchors < 1:
        return np.zeros((0, m), np.int32), np.zeros((0, m, TOP_LOGP), np.float32)
    real = np.concatenate([src, tgt[:-1]])  # the last token is never visible to a labelled group
    tokens = np.zeros((1, bucket(len(real))), np.int32)
    tokens[0, : len(real)] = real
    out, logps = [], []
    for start in range(0, num_anchors, groups_per_call):
        a = np.arange(start, start + groups_per_call)
        live = a < num_anchors
        anchors = np.where(live, len(src) + a, 0).astype(np.int32)
        target = a[:, None] + 1 + np.arange(m)[None, :]  # index into tgt, [G, M]
        labels = np.where(live[:, None] & (target < len(tgt)),
                          tgt[np.minimum(target, len(tgt) - 1)], -1).astype(np.int32)
        ranks, top_logp = _group_ranks(bita_params, base_params, tokens, anchors[None],
                                       labels.reshape(1, -1), cfg=cfg, num_masks=m,
                                       max_rank=max_rank)
        out.append(np.asarray(ranks).reshape(groups_per_call, m)[live])
        logps.append(np.asarray(top_logp).reshape(groups_per_call, m, TOP_LOGP)[live])
    return np.concatenate(out), np.concatenate(logps)


def rank_stats(cfg: ModelConfig, base_params, bita_params,
               texts: Sequence[tuple[Sequence[int], Sequence[int]]],
               max_rank: int = MAX_RANK) -> RankStats:
    """Acceptance statistics of an adapter on (prompt ids, greedy continuation ids) pairs."""
    m = bita_params["mask_embed"].shape[0]
    measured = [text_ranks(cfg, base_params, bita_params, src, tgt, m, max_rank)
                for src, tgt in texts]
    kept = [(r, lp, (np.asarray(src, np.int32), np.asarray(tgt, np.int32)))
            for (r, lp), (src, tgt) in zip(measured, texts) if len(r)]
    if not kept:
        return RankStats([np.zeros((0, m), np.int32)], max_rank)
    return RankStats([r for r, _, _ in kept], max_rank, [t for _, _, t in kept],
                     [lp for _, lp, _ in kept])


# ---------------------------------------------------------------------------------------------
# Tokens per step.


def expected_accepted(paths: Sequence[Path], probs: np.ndarray) -> float:
    """Expected accepted nodes per step under independent levels: sum_nodes prod_l p_l(r_l).

    Args:
      paths: the tree's node paths (rank per level).
      probs: [M', R'] p_l(r), rank distribution of the true token under mask l; ranks or levels
        outside the table have probability 0.
    """
    total = 0.0
    for p in paths:
        prob = 1.0
        for level, rank in enumerate(p):
            inside = level < probs.shape[0] and rank < probs.shape[1]
            prob *= float(probs[level, rank]) if inside else 0.0
        total += prob
    return total


def _accepted_depth(paths: set, ranks: Sequence[int]) -> int:
    """Depth of the deepest node whose path equals the leading true ranks."""
    d = 0
    while d < len(ranks) and tuple(ranks[: d + 1]) in paths:
        d += 1
    return d


def dynamic_nodes(tree: Tree, top_logp: np.ndarray) -> np.ndarray:
    """The nodes a dynamic tree picks at each anchor, [A, N] indices into
    `dynamic_tree.candidates(D, K)`, from the groups' top log-probabilities [A, M, K'] (best
    first): the N best candidates by the sum of their levels' log-probabilities, ties to the
    shallower, as `dynamic_tree.select` scores them on device."""
    d, k = tree.num_masks, tree.dynamic_top_k
    cand = dynamic_tree.candidates(d, k)
    lp = np.maximum(top_logp[:, :d, :k].astype(np.float64), dynamic_tree.LOG_FLOOR)
    inside = np.arange(d)[None, :] < cand.depth[:, None]  # [C, D]
    per_level = lp[:, np.arange(d)[None, :], cand.ranks]  # [A, C, D]
    score = (np.where(inside[None], per_level, 0.0).sum(axis=2)
             - dynamic_tree.DEPTH_PENALTY * cand.depth[None])
    return np.argsort(-score, axis=1, kind="stable")[:, : tree.dynamic]


def replay(tree: Tree, stats: RankStats) -> tuple[int, int]:
    """Replays greedy BiTA decoding of the stats' texts with `tree`; returns (tokens, steps).

    Counts as `GenerationResult.tokens_per_step` does: the prefill's first token is excluded,
    and the first step holds no mask drafts (`bita_step.bita_prefill`). A retrieval branch
    (`+lookup:L[:N]`) is replayed exactly from the texts (`stats.texts`): at each step its L
    drafts are the lookup of the prompt and the tokens so far (`lookup.host_lookup_drafts`, the
    device lookup's twin, with `stats.ngram` when the adapter has a table), and the step
    accepts the deeper of the mask path and the leading lookup drafts that equal the greedy
    text. A dynamic tree takes its nodes at each anchor from
    `stats.top_logp` (`dynamic_nodes`).
    """
    if tree.lookup and (stats.texts is None or tree.pruned):
        raise TreeError(f"tree {tree.name!r} has a retrieval branch: replaying it needs the "
                        "texts beside the ranks (save the statistics again) and groups on "
                        "every node (no -pruned)")
    if tree.dynamic and (stats.top_logp is None
                         or tree.dynamic_top_k > stats.top_logp[0].shape[-1]):
        raise TreeError(f"tree {tree.name!r} is dynamic: replaying it needs the masks' top "
                        f"{tree.dynamic_top_k} log-probabilities beside the ranks (save the "
                        "statistics again)")
    paths = set(tree.paths)
    has_children = {p[:-1] for p in tree.paths}
    m = tree.num_masks  # masks per group of this tree (may be fewer than the adapter's)
    tokens = steps = 0
    for i, ranks in enumerate(stats.ranks):
        length = len(ranks) + 1  # len(tgt)
        if tree.lookup:
            src, tgt = stats.texts[i]
            text = np.concatenate([src, tgt])
        if tree.dynamic:
            nodes = dynamic_nodes(tree, stats.top_logp[i])
            cand_paths = dynamic_tree.candidates(m, tree.dynamic_top_k).paths
        emitted, anchor, shift = 1, 0, 0  # the prefill emitted tgt[0]
        drafted = False  # the first step holds no mask drafts
        while emitted < length:
            levels = [int(ranks[anchor, lv + shift]) if lv + shift < m else -1 for lv in range(m)]
            levels = [r if r < stats.max_rank and drafted else -1 for r in levels]  # R: "or worse"
            drafted = True
            if tree.dynamic:
                paths = {cand_paths[j] for j in nodes[anchor]}
            d = _accepted_depth(paths, levels)
            end = tuple(levels[:d])
            if tree.lookup:
                drafts = lookup.host_lookup_drafts(text[: len(src) + emitted], tree.lookup,
                                                   tree.lookup_ngram, stats.ngram)
                truth = tgt[emitted: emitted + tree.lookup]
                same = drafts[: len(truth)] == truth
                d_lookup = int(np.argmin(same)) if not same.all() else len(truth)
                if d_lookup > d:  # the lookup endpoint has its own group: no walk up
                    d, end = d_lookup, ()
            steps += 1
            tokens += min(d + 1, length - emitted)
            emitted += d + 1
            anchor, shift = emitted - 1, 0
            if tree.pruned:
                while end and end not in has_children:  # walk up to the nearest group
                    end, shift = end[:-1], shift + 1
                anchor -= shift
            anchor = min(anchor, len(ranks) - 1)
    return tokens, steps


def predicted_tokens_per_step(tree: Tree, stats: RankStats, method: str = "replay") -> float:
    if method == "independent":
        if tree.dynamic:
            raise TreeError(f"tree {tree.name!r} is dynamic: its nodes follow the drafts' "
                            "probabilities, which the independent estimate does not hold; "
                            "use the replay")
        return expected_accepted(tree.paths, stats.probs()[:, : stats.max_rank]) + 1.0
    if method == "replay":
        tokens, steps = replay(tree, stats)
        return tokens / steps if steps else 1.0
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------
# Step times on this machine.


def step_seconds(gens: Mapping[str, Engine], prompt_ids: Sequence[int], max_new_tokens: int,
                 steps: int = 32, repeats: int = 3) -> dict[str, float]:
    """Seconds per decode step of each generator (prefill excluded), best of `repeats`.

    Runs the very executables `gen.generate([prompt_ids], max_new_tokens)` runs (same shape
    bucket, nothing new to compile) for up to `steps` steps and divides by the steps that ran
    (fewer when the text ends first: time on a prompt with a long continuation). The generators
    take turns within each repeat, so a change of machine load hits all of them alike.
    """
    runs = {name: g.prepare([list(prompt_ids)], max_new_tokens, SamplingParams.greedy())
            for name, g in gens.items()}
    best = {name: math.inf for name in gens}
    for _ in range(repeats):
        for name, (start, decode) in runs.items():
            state = jax.block_until_ready(start())
            before = int(state.steps)  # `decode` consumes the state
            t0 = time.perf_counter()
            end = jax.block_until_ready(decode(state, steps))
            ran = int(end.steps) - before
            if ran:
                best[name] = min(best[name], (time.perf_counter() - t0) / ran)
    return best


# ---------------------------------------------------------------------------------------------
# Prediction and choice.


@dataclasses.dataclass
class Prediction:
    """One candidate: its step size, predicted tokens/step (both estimates) and speed."""

    tree: str
    step_tokens: int
    tokens_per_step: float  # by `method`
    tokens_per_step_independent: float
    tokens_per_step_replay: float
    step_ms: float
    ar_step_ms: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / (self.step_ms / 1e3)

    @property
    def speedup(self) -> float:
        return self.tokens_per_step * self.ar_step_ms / self.step_ms

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(tokens_per_second=self.tokens_per_second, speedup=self.speedup)
        return {k: (None if math.isnan(v) else round(v, 4)) if isinstance(v, float) else v
                for k, v in d.items()}


def predict(trees: Sequence[Tree], stats: RankStats, step_seconds_by_tree: Mapping[str, float],
            ar_step_seconds: float, method: str = "replay") -> list[Prediction]:
    """Predictions for each tree (keyed by `tree.name` in `step_seconds_by_tree`). A dynamic
    tree has no independent estimate (NaN): its prediction is the replay's by either method."""
    out = []
    for tree in trees:
        indep = (math.nan if tree.dynamic
                 else predicted_tokens_per_step(tree, stats, "independent"))
        rep = predicted_tokens_per_step(tree, stats, "replay")
        out.append(Prediction(
            tree.name, tree.layout.num_tokens,
            rep if method == "replay" or tree.dynamic else indep, indep, rep,
            1e3 * step_seconds_by_tree[tree.name], 1e3 * ar_step_seconds))
    return out


def select(predictions: Sequence[Prediction]) -> Prediction:
    """The candidate with the highest predicted tokens per second."""
    return max(predictions, key=lambda p: p.tokens_per_second)


def table(predictions: Sequence[Prediction], measured: Mapping[str, Mapping] | None = None,
          chosen: str | None = None) -> str:
    """Markdown: predicted (and, when given, measured bench summaries keyed by tree name)."""
    measured = measured or {}
    lines = [("| tree | step tokens | pred tok/step (indep) | pred tok/step (replay) | step ms "
              "| pred speedup | meas tok/step | meas speedup |"),
             "|---|---|---|---|---|---|---|---|"]
    ar_ms = predictions[0].ar_step_ms if predictions else float("nan")
    lines.append(f"| plain greedy | 1 | 1.00 | 1.00 | {ar_ms:.1f} | 1.00 | 1.00 | 1.00 |")
    for p in predictions:
        m = measured.get(p.tree, {})
        meas_tps = f"{m['tokens_per_step']:.2f}" if "tokens_per_step" in m else "-"
        meas_sp = f"{m['speedup']:.2f}" if "speedup" in m else "-"
        name = f"**{p.tree}**" if p.tree == chosen else p.tree
        indep = p.tokens_per_step_independent
        indep = "-" if math.isnan(indep) else f"{indep:.2f}"  # a dynamic tree: replay only
        lines.append(f"| {name} | {p.step_tokens} | {indep} | "
                     f"{p.tokens_per_step_replay:.2f} | {p.step_ms:.1f} | {p.speedup:.2f} | "
                     f"{meas_tps} | {meas_sp} |")
    return "\n".join(lines)


def position_table(stats: RankStats, width: int = 64) -> str:
    """Markdown: per-mask top-1 / top-5 by response position (see `RankStats.by_position`)."""
    m = stats.num_masks
    lines = ["| positions | anchors | " + " | ".join(f"mask {k} top-1 / top-5" for k in range(m))
             + " |", "|---|---|" + "---|" * m]

    def cell(a, b):
        return "-" if a is None else f"{a:.3f} / {b:.3f}"

    for row in stats.by_position(width):
        lo, hi = row["positions"]
        cells = " | ".join(cell(a, b) for a, b in zip(row["top1"], row["top5"]))
        lines.append(f"| {lo}-{hi - 1} | {row['anchors']} | {cells} |")
    return "\n".join(lines)
