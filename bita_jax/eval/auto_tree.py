"""`--tree auto`: the draft tree with the most expected tokens per second on this machine.

    stats = load_acceptance(adapter_dir)                   # None: the adapter has no profile
    curve = step_cost_curve(cfg, params, identity)         # measured once per machine, cached
    choice = choose(candidate_trees(num_masks), stats, curve)
    choice.tree, choice.predictions

Two measurements meet here, Sequoia style:

  acceptance  the adapter's held-out rank statistics (`tree_select.RankStats`: the rank of the
              true token under each mask at each anchor of held-out greedy text), saved beside
              the adapter as `acceptance.npz` (`save_acceptance`; `infer/bench.py --select
              --save-acceptance` writes it). Replaying them gives any tree's tokens per step
              without decoding (`tree_select.replay`).
  step cost   this machine's curve of a cached forward of T new tokens against T
              (`step_cost.forward_fn`: LM head on every row, cache commit), measured at T = 1 and
              at each candidate's step tokens (not interpolated: XLA CPU's products work in
              tiles of 8 rows, so 9 tokens cost about what 16 do). On a small CPU it climbs with
              T; on an accelerator it is nearly flat up to the tree sizes here. It is measured
              once per (machine, model, dtype, jax version) and kept in
              `{cache root}/step_cost/` (a JSON file, sizes added as new ones are needed), so
              later loads only read it.

The choice maximises predicted tokens per step / cost(T) over `candidate_trees`, and plain
greedy's cost is cost(1), so the predicted speedup is tokens_per_step * cost(1) / cost(T). The
forward omits the BiTA step's own work (tree attention mask, drafting, acceptance), which on the
2-core CPU adds about 15 % to a small tree's step (docs/benchmarks.md), so predictions lean a
little towards larger trees; the report (`infer/report.py`) measures the real thing. Retrieval
branches (`+lookup`) are not candidates: their acceptance depends on the text, which the rank
statistics do not hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from bita_jax.checkpoints import model_cache
from bita_jax.decoding.tree import Tree, TreeError
from bita_jax.eval import step_cost, tree_select
from bita_jax.models.config import ModelConfig

ACCEPTANCE_FILE = "acceptance.npz"
CONTEXT = 300  # cached tokens behind the timed forwards (a chat prompt and some answer)
CURVE_FORMAT = 1  # bump when the measurement changes: cached curves then stop matching
# Candidates from a one-mask chain to the paper's tree; those deeper than the adapter's masks
# are skipped.
CANDIDATES = ("chain@1", "chain@2", "chain", "upper-triangle:3@1", "upper-triangle:3@2",
              "upper-triangle-pruned", "upper-triangle")


# ---------------------------------------------------------------------------------------------
# Acceptance statistics beside an adapter.


def save_acceptance(adapter_dir: str | os.PathLike, stats: tree_select.RankStats) -> pathlib.Path:
    """Writes the adapter's rank statistics to `adapter_dir/acceptance.npz`: one int8 array of
    ranks [A, M] per held-out text, and the rank cap."""
    path = pathlib.Path(adapter_dir) / ACCEPTANCE_FILE
    arrays = {f"text_{i:04d}": r.astype(np.int8) for i, r in enumerate(stats.ranks)}
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
    except (OSError, ValueError, KeyError) as e:
        print(f"warning: {path} is unreadable ({e}); --tree auto uses the default tree",
              file=sys.stderr)
        return None
    if not ranks or any(r.ndim != 2 for r in ranks):
        return None
    return tree_select.RankStats(ranks, max_rank)


# ---------------------------------------------------------------------------------------------
# The step-cost curve of this machine.


def machine_key(cfg: ModelConfig, fingerprint: str | None) -> str:
    """What the curve depends on: the device kind and count, the host's cores, jax's version,
    the model (its config and weights fingerprint) and dtype."""
    dev = jax.devices()[0]
    parts = [CURVE_FORMAT, dev.platform, dev.device_kind, jax.device_count(), os.cpu_count(),
             jax.__version__, cfg.arch, cfg.hidden_size, cfg.num_layers, cfg.vocab_size,
             cfg.dtype, fingerprint, CONTEXT]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def measure_curve(cfg: ModelConfig, params, sizes: Sequence[int], repeats: int = 3,
                  loops: int = 4) -> dict[int, float]:
    """Seconds of one cached forward of T tokens, for T in `sizes`: the fastest of `repeats`
    rounds, the sizes taking turns within a round (so a change of load hits them alike)."""
    fns = {t: step_cost.forward_fn(cfg, params, t, CONTEXT, loops) for t in sizes}
    for fn in fns.values():
        step_cost.time_call(fn)  # compile
    best = {t: float("inf") for t in sizes}
    for _ in range(repeats):
        for t, fn in fns.items():
            best[t] = min(best[t], step_cost.time_call(fn) / loops)
    return best


def step_cost_curve(cfg: ModelConfig, params, fingerprint: str | None, sizes: Sequence[int],
                    quiet: bool = False) -> dict[int, float]:
    """This machine's seconds per forward of T tokens for T in `sizes`: read from the cache,
    the missing sizes measured now and added to it (`BITA_JAX_NO_CACHE=1`: all measured)."""
    root = model_cache.cache_root()
    path = None if root is None else root / "step_cost" / f"{machine_key(cfg, fingerprint)}.json"
    curve: dict[int, float] = {}
    if path is not None and path.is_file():
        try:
            curve = {int(t): float(s)
                     for t, s in json.loads(path.read_text())["seconds"].items()}
        except (OSError, ValueError, KeyError, AttributeError) as e:
            model_cache.warn_unreadable(path, e)
    missing = sorted(set(sizes) - set(curve))
    if missing:
        if not quiet:
            print(f"--tree auto: measuring this machine's step cost at {len(missing)} step "
                  "sizes (once; cached)", file=sys.stderr, flush=True)
        curve.update(measure_curve(cfg, params, missing))
        if path is not None:
            record = {"seconds": {str(t): s for t, s in sorted(curve.items())},
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}
            path.parent.mkdir(parents=True, exist_ok=True)
            model_cache.write_cache_file(path, json.dumps(record, indent=1).encode())
    return {t: curve[t] for t in sizes}


# ---------------------------------------------------------------------------------------------
# The choice.


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen tree and every candidate's prediction (`tree_select.Prediction`)."""

    tree: Tree
    predictions: tuple[tree_select.Prediction, ...]

    def table(self) -> str:
        return tree_select.table(self.predictions, chosen=self.tree.name)


def candidate_trees(num_masks: int, names: Sequence[str] = CANDIDATES) -> list[Tree]:
    """The candidates that fit an adapter of `num_masks` masks, each layout once."""
    out, seen = [], set()
    for name in names:
        try:
            tree = Tree.make(name, num_masks)
        except TreeError:  # deeper than the adapter
            continue
        key = (tree.paths, tree.num_masks, tree.pruned)
        if key not in seen:
            seen.add(key)
            out.append(tree)
    return out


def candidates_for(method: str, num_masks: int) -> list[Tree]:
    """`--tree auto`'s candidates for an adapter: BiTA's `CANDIDATES`, or for SPACE (whose
    decoding is a chain) the chains of 1 to M masks."""
    if method == "space":
        return candidate_trees(num_masks, [f"chain@{d}" for d in range(1, num_masks + 1)])
    return candidate_trees(num_masks)


def step_sizes(trees: Sequence[Tree]) -> list[int]:
    """The step tokens the curve needs for `trees`: 1 (plain greedy) and each tree's."""
    return sorted({1} | {t.layout.num_tokens for t in trees})


def choose(trees: Sequence[Tree], stats: tree_select.RankStats,
           curve: Mapping[int, float]) -> Choice:
    """The tree of highest predicted tokens per step / cost(step tokens); ties go to the
    smaller step. `curve` holds every size of `step_sizes(trees)`."""
    costs = {t.name: curve[t.layout.num_tokens] for t in trees}
    preds = tree_select.predict(trees, stats, costs, curve[1])
    best = max(preds, key=lambda p: (round(p.tokens_per_second, 6), -p.step_tokens))
    return Choice(next(t for t in trees if t.name == best.tree), tuple(preds))
