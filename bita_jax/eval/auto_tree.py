"""`--tree auto`: the draft tree with the most expected tokens per second on this machine.

    stats = load_acceptance(adapter_dir)                   # None: the adapter has no profile
    curve = CostCurve(cfg, params, fingerprint)            # measured on demand, cached on disk
    choice = choose(candidates_for("bita", num_masks), stats, curve.at(context_bucket(n)))
    choice.tree, choice.predictions, choice.beats_greedy   # the tree for prompts of ~n tokens

Two measurements meet here, Sequoia style:

  acceptance  the adapter's held-out rank statistics (`tree_select.RankStats`: the rank of the
              true token under each mask at each anchor of held-out greedy text), saved beside
              the adapter as `acceptance.npz` (`save_acceptance`; `infer/bench.py --select
              --save-acceptance` writes it). Replaying them gives any tree's tokens per step
              without decoding (`tree_select.replay`).
  step cost   this machine's curve of a cached forward of T new tokens against T
              (`step_cost.forward_fn`: LM head on every row, cache commit), measured at T = 1 and
              at each candidate's step tokens (not interpolated: XLA CPU's products work in
              tiles of 8 rows, so 9 tokens cost about what 16 do), after a cached context of
              the prompt's length bucket (`CONTEXTS`: 300 tokens for a chat prompt, up to 8,192):
              with long prompts a step's extra query rows read the whole cache too, and on the
              2-core CPU an 8-token step at 4,096 cached tokens costs 1.94x a 1-token step, where
              at 300 it costs 1.57x. On a small CPU it climbs with
              T; on an accelerator it is nearly flat up to the tree sizes here. It is measured
              once per (machine, model, dtype, jax version, context bucket) and kept in
              `{cache root}/step_cost/` (a JSON file, sizes added as new ones are needed), so
              later loads only read it. Sizes that cannot win are not measured at all: the
              candidates are visited from the smallest step up, and one is skipped when its
              predicted tokens per step over the largest cost measured so far (a lower bound on
              its own cost, the curve being non-decreasing) does not beat the best so far. On
              the 2-core CPU that measures 4 of the 8 sizes.

The choice maximises predicted tokens per step / cost(T) over `candidate_trees` (a bigger step
must beat the best smaller one by `BIGGER_STEP_MARGIN`), and plain
greedy's cost is cost(1), so the predicted speedup is tokens_per_step * cost(1) / cost(T). The
forward omits the BiTA step's own work (tree attention mask, drafting, acceptance), which on the
2-core CPU adds about 10 % to a small tree's step (docs/benchmarks.md), so predictions lean a
little towards larger trees. For prompts longer than a chat's, a tree is used only when it
predicts at least `MIN_SPEEDUP` (`Choice.beats_greedy`); otherwise plain greedy decodes them
(the api's `LLM.tree_for`). The report (`infer/report.py`) measures the real thing. Retrieval
branches (`+lookup`): their acceptance depends on the text, which the rank
statistics alone do not hold, so they are candidates only when `acceptance.npz` also holds the
texts (each held-out prompt and its greedy answer); the replay then looks the drafts up in the
text as decoding does. Dynamic trees (`dynamic:N@D`, EAGLE-2 style: each step's N nodes are
the most probable paths under the drafting group's own probabilities) are candidates when the
statistics also hold each anchor's top log-probabilities per mask (`top_logp`): the replay then
picks each step's nodes from them as decoding does (`tree_select.dynamic_nodes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np

from bita_jax.checkpoints import model_cache
from bita_jax.decoding import ngram
from bita_jax.decoding.tree import Tree, TreeError
from bita_jax.eval import step_cost, tree_select
from bita_jax.models.config import ModelConfig

ACCEPTANCE_FILE = "acceptance.npz"
CONTEXT = 300  # cached tokens behind the timed forwards of a chat prompt (and some answer)
CONTEXTS = (CONTEXT, 1024, 2048, 4096, 8192)  # the context buckets of the curve
CURVE_FORMAT = 3  # bump when the measurement changes: cached curves then stop matching
# A tree must predict this speedup over plain greedy to be used: the forward's cost leaves out
# the BiTA step's own work, about 10 % of a small tree's step on the 2-core CPU.
MIN_SPEEDUP = 1.1
# A bigger step must predict this much more than the best smaller one to be chosen: the curve's
# ratios move by 10 % or more between two fresh measurements on the 2-core CPU (a 12-token
# forward at 1.85x and 2.11x a 1-token one on 2026-12-02), and a near-tie then flips to the
# bigger tree, which measured slower (`chain@1+lookup:4` predicted 1.31x against 1.28x, then
# ran the README's command at x1.00; on held-out chat it was 7 % slower than `chain@1+lookup:2`).
BIGGER_STEP_MARGIN = 0.10
# Candidates from a one-mask chain to the paper's tree; those deeper than the adapter's masks
# are skipped.
CANDIDATES = ("chain@1", "chain@2", "chain", "upper-triangle:3@1", "upper-triangle:3@2",
              "upper-triangle-pruned", "upper-triangle")
# With a retrieval branch, when the statistics hold their texts (its drafts come from them).
LOOKUP_CANDIDATES = ("chain@1+lookup:2", "chain@1+lookup:4", "chain@1+lookup:8",
                     "chain@2+lookup:4", "upper-triangle:3@1+lookup:4", "upper-triangle+lookup:8")
# Dynamic trees, when the statistics hold the masks' top log-probabilities (step tokens 12, 15,
# 21, 28 and 44 with 3 masks: 1 + N + (N + 1) x D). None of depth 1: there the N most probable
# nodes are always the top N ranks, a static tree.
DYNAMIC_CANDIDATES = ("dynamic:3@2", "dynamic:4@2", "dynamic:6@2", "dynamic:6", "dynamic:10")


# ---------------------------------------------------------------------------------------------
# Acceptance statistics beside an adapter.


def save_acceptance(adapter_dir: str | os.PathLike, stats: tree_select.RankStats) -> pathlib.Path:
    """Writes the adapter's rank statistics to `adapter_dir/acceptance.npz`: one int8 array of
    ranks [A, M] per held-out text, the rank cap, and (when the stats hold them) each text's
    prompt and greedy ids and its masks' top log-probabilities [A, M, K] (float16)."""
    path = pathlib.Path(adapter_dir) / ACCEPTANCE_FILE
    arrays = {f"text_{i:04d}": r.astype(np.int8) for i, r in enumerate(stats.ranks)}
    for i, (src, tgt) in enumerate(stats.texts or ()):  # what replays a retrieval branch
        arrays[f"prompt_{i:04d}"] = np.asarray(src, np.int32)
        arrays[f"greedy_{i:04d}"] = np.asarray(tgt, np.int32)
    for i, lp in enumerate(stats.top_logp or ()):  # what replays a dynamic tree
        arrays[f"logp_{i:04d}"] = np.maximum(lp, np.finfo(np.float16).min).astype(np.float16)
    np.savez_compressed(path, max_rank=np.int32(stats.max_rank), **arrays)
    return path


def load_acceptance(adapter_dir: str | os.PathLike | None) -> tree_select.RankStats | None:
    """The rank statistics saved beside an adapter, or None (no directory, no file, or a file
    that cannot be read: `--tree auto` then falls back to the backend's default tree)."""
    if adapter_dir is None:
        return None
    path = pathlib.Path(adapter_dir) / ACCEPTANCE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            names = sorted(k for k in f.files if k.startswith("text_"))
            ranks = [f[k].astype(np.int32) for k in names]
            max_rank = int(f["max_rank"])
            keys = [(k.replace("text_", "prompt_"), k.replace("text_", "greedy_")) for k in names]
            texts = ([(f[a].astype(np.int32), f[b].astype(np.int32)) for a, b in keys]
                     if all(a in f.files and b in f.files for a, b in keys) else None)
            logp_keys = [k.replace("text_", "logp_") for k in names]
            top_logp = ([f[k].astype(np.float32) for k in logp_keys]
                        if all(k in f.files for k in logp_keys) else None)
    except (OSError, ValueError, KeyError) as e:
        print(f"warning: {path} is unreadable ({e}); --tree auto uses the default tree",
              file=sys.stderr)
        return None
    if not ranks or any(r.ndim != 2 for r in ranks):
        return None
    if texts is not None and any(len(g) != len(r) + 1 for (_, g), r in zip(texts, ranks)):
        texts = None  # not the texts of these ranks: no retrieval candidates
    if top_logp is not None and any(lp.ndim != 3 or lp.shape[:2] != r.shape
                                    for lp, r in zip(top_logp, ranks)):
        top_logp = None  # not the log-probabilities of these ranks: no dynamic candidates
    return tree_select.RankStats(ranks, max_rank, texts, top_logp, ngram.load(adapter_dir))


# ---------------------------------------------------------------------------------------------
# The step-cost curve of this machine.


def machine_key(cfg: ModelConfig, fingerprint: str | None) -> str:
    """What the curve depends on: the device kind and count, the host's cores, jax's version,
    the model (its config and weights fingerprint) and dtype."""
    dev = jax.devices()[0]
    parts = [CURVE_FORMAT, dev.platform, dev.device_kind, jax.device_count(), os.cpu_count(),
             jax.__version__, cfg.arch, cfg.hidden_size, cfg.num_layers, cfg.vocab_size,
             cfg.dtype, fingerprint]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def context_bucket(prompt_tokens: int) -> int:
    """The `CONTEXTS` bucket nearest to a prompt's length (on a log scale): the context whose
    step costs stand for that prompt's."""
    n = max(int(prompt_tokens), 1)
    return min(CONTEXTS, key=lambda c: abs(math.log(c / n)))


def measure_curve(cfg: ModelConfig, params, sizes: Sequence[int], context: int = CONTEXT,
                  repeats: int = 3, loops: int = 4,
                  built: dict | None = None) -> dict[int, float]:
    """Seconds of one cached forward of T tokens after `context` cached ones, for T in
    `sizes`: the fastest of `repeats` rounds, the sizes taking turns within a round (so a change
    of load hits them alike). `built` keeps the compiled forwards by (context, T) for reuse."""
    built = {} if built is None else built
    for t in sizes:
        if (context, t) not in built:
            built[context, t] = step_cost.forward_fn(cfg, params, t, context, loops)
            step_cost.time_call(built[context, t])  # compile
    best = {t: float("inf") for t in sizes}
    for _ in range(repeats):
        for t in sizes:
            best[t] = min(best[t], step_cost.time_call(built[context, t]) / loops)
    return best


class CostCurve:
    """This machine's cost of a forward of T tokens after a context of each `CONTEXTS` bucket,
    read from the cache file or measured on demand and added to it (`BITA_JAX_NO_CACHE=1`:
    measured every time). Each new size is timed in the same rounds as a 1-token forward, the
    two taking turns, and kept as its cost relative to that one: sizes timed at different times
    (one on a busy machine, another on a quiet one) still compare, where absolute times would
    not. `seconds(T)` is that ratio times the first 1-token time kept for the context, so any
    two costs compare as their ratios, whenever they were timed. `measured` lists the
    (context, T) pairs this object measured (not read)."""

    def __init__(self, cfg: ModelConfig, params, fingerprint: str | None, quiet: bool = False):
        self.cfg, self.params, self.quiet = cfg, params, quiet
        root = model_cache.cache_root()
        self.path = (None if root is None
                     else root / "step_cost" / f"{machine_key(cfg, fingerprint)}.json")
        self.ratio: dict[int, dict[int, float]] = {}  # context -> {T: cost(T) / cost(1)}
        self.base: dict[int, float] = {}  # context -> seconds of its first 1-token forward
        self.measured: list[tuple[int, int]] = []
        self._built: dict = {}  # compiled forwards, reused within this object
        if self.path is not None and self.path.is_file():
            try:
                record = json.loads(self.path.read_text())["contexts"]
                for c, entry in record.items():
                    self.base[int(c)] = float(entry["seconds_1"])
                    self.ratio[int(c)] = {int(t): float(r) for t, r in entry["ratio"].items()}
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
                model_cache.warn_unreadable(self.path, e)
                self.ratio, self.base = {}, {}

    def seconds(self, tokens: int, context: int = CONTEXT) -> float:
        """Seconds of a forward of `tokens` tokens after `context` cached ones (a bucket)."""
        ratios = self.ratio.setdefault(context, {})
        if tokens not in ratios or context not in self.base:
            if not self.quiet and not self.measured:
                print(f"--tree auto: measuring this machine's step cost at {context} cached "
                      "tokens (once; cached)", file=sys.stderr, flush=True)
            got = measure_curve(self.cfg, self.params, sorted({1, tokens}), context,
                                built=self._built)
            self.base.setdefault(context, got[1])  # fixed: seconds(T) / seconds(1) = ratio(T)
            ratios[1] = 1.0
            ratios[tokens] = got[tokens] / got[1]
            self.measured.append((context, tokens))
            self._save()
        return ratios[tokens] * self.base[context]

    def at(self, context: int) -> Callable[[int], float]:
        """`seconds` at one context bucket, as `choose` takes it."""
        return lambda tokens: self.seconds(tokens, context)

    def _save(self):
        if self.path is None:
            return
        contexts = {str(c): {"seconds_1": self.base[c],
                             "ratio": {str(t): r for t, r in sorted(self.ratio[c].items())}}
                    for c in sorted(self.base)}
        record = {"contexts": contexts, "device": jax.devices()[0].device_kind,
                  "jax": jax.__version__}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        model_cache.write_cache_file(self.path, json.dumps(record, indent=1).encode())


# ---------------------------------------------------------------------------------------------
# The choice.


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen tree and every candidate's prediction (`tree_select.Prediction`; step_ms is
    NaN for a candidate skipped because it could not win)."""

    tree: Tree
    predictions: tuple[tree_select.Prediction, ...]

    @property
    def speedup(self) -> float:
        """The chosen tree's predicted speedup over plain greedy."""
        return next(p.speedup for p in self.predictions if p.tree == self.tree.name)

    @property
    def break_even(self) -> float:
        """The chosen tree's measured step cost over a plain step's: the tokens per step below
        which plain decoding is faster (`decoding.fallback.Fallback`)."""
        p = next(p for p in self.predictions if p.tree == self.tree.name)
        return p.step_ms / p.ar_step_ms

    @property
    def beats_greedy(self) -> bool:
        """Whether the chosen tree predicts at least `MIN_SPEEDUP` (else plain greedy is used)."""
        return self.speedup >= MIN_SPEEDUP

    def table(self) -> str:
        lines = ["| tree | step tokens | predicted tokens/step | step ms | predicted speedup |",
                 "|---|---|---|---|---|"]
        ar = self.predictions[0].ar_step_ms
        lines.append(f"| plain greedy | 1 | 1.00 | {ar:.1f} | 1.00 |")
        for p in self.predictions:
            name = f"**{p.tree}**" if p.tree == self.tree.name else p.tree
            ms, speed = (("not measured", "cannot win") if math.isnan(p.step_ms)
                         else (f"{p.step_ms:.1f}", f"{p.speedup:.2f}"))
            lines.append(f"| {name} | {p.step_tokens} | {p.tokens_per_step:.2f} | {ms} | "
                         f"{speed} |")
        return "\n".join(lines)


def candidate_trees(num_masks: int, names: Sequence[str] = CANDIDATES) -> list[Tree]:
    """The candidates that fit an adapter of `num_masks` masks, each layout once."""
    out, seen = [], set()
    for name in names:
        try:
            tree = Tree.make(name, num_masks)
        except TreeError:  # deeper than the adapter
            continue
        key = (tree.paths, tree.num_masks, tree.pruned, tree.lookup, tree.lookup_ngram,
               tree.dynamic, tree.dynamic_top_k)
        if key not in seen:
            seen.add(key)
            out.append(tree)
    return out


def candidates_for(method: str, num_masks: int, lookup: bool = False,
                   dynamic: bool = False) -> list[Tree]:
    """`--tree auto`'s candidates for an adapter: BiTA's `CANDIDATES`, or for SPACE (whose
    decoding is a chain) the chains of 1 to M masks; with `lookup` (statistics that hold their
    texts), also those with a retrieval branch (`LOOKUP_CANDIDATES`; SPACE: its chains + 4);
    with `dynamic` (statistics that hold the masks' top log-probabilities), BiTA's dynamic trees
    (`DYNAMIC_CANDIDATES`)."""
    if method == "space":
        chains = [f"chain@{d}" for d in range(1, num_masks + 1)]
        return candidate_trees(num_masks, chains + ([c + "+lookup:4" for c in chains]
                                                    if lookup else []))
    return candidate_trees(num_masks, CANDIDATES + (LOOKUP_CANDIDATES if lookup else ())
                           + (DYNAMIC_CANDIDATES if dynamic else ()))


def choose(trees: Sequence[Tree], stats: tree_select.RankStats,
           seconds: Callable[[int], float]) -> Choice:
    """The tree of highest predicted tokens per step / cost(step tokens), measuring
    `seconds(T)` only for trees that could still win (module doc). Trees are visited from the
    smallest step up, and a bigger step replaces the best so far only when it predicts more
    than `BIGGER_STEP_MARGIN` above it (so ties and near-ties keep the smaller step)."""
    tps = {t.name: tree_select.predicted_tokens_per_step(t, stats) for t in trees}
    ar = seconds(1)
    floor, best, best_rate, bar = ar, None, -1.0, -1.0
    costs = {}
    for tree in sorted(trees, key=lambda t: t.layout.num_tokens):
        # what it must beat: the best so far, by the margin when its step is bigger
        to_beat = (-1.0 if best is None else bar if tree.layout.num_tokens >
                   best.layout.num_tokens else best_rate)
        if tps[tree.name] / floor <= to_beat:
            continue  # even at the cheapest cost it could have, it loses
        cost = seconds(tree.layout.num_tokens)
        costs[tree.name] = cost
        floor = max(floor, cost)
        rate = tps[tree.name] / cost
        if rate > to_beat:
            best, best_rate = tree, rate
            bar = rate * (1 + BIGGER_STEP_MARGIN)
    preds = tuple(
        tree_select.Prediction(t.name, t.layout.num_tokens, tps[t.name], math.nan, tps[t.name],
                               1e3 * costs.get(t.name, math.nan), 1e3 * ar) for t in trees)
    return Choice(best, preds)
