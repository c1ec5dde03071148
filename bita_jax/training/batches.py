"""Deterministic batch streams of training samples, for exact resume.

    stream = BatchStream(records, spec, batch_size=8, seed=0)
    batch = stream.batch(step)            # {"tokens", "anchors", "labels"}: [B, ...] int32

The spec says what a sample is: `samples.SampleSpec` (BiTA) or `sar_samples.SarSpec` (SPACE).

Batch `step` is a pure function of (records, spec, seed, batch size, step), so a resumed run sees
exactly the batches an uninterrupted one would. `eval_batches` gives fixed evaluation batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from bita_jax.data.dataset import DataError, Record
from bita_jax.training.samples import SampleSpec, stack
from bita_jax.training.sar_samples import SarSpec


def usable_indices(records: Sequence[Record], spec: SampleSpec | SarSpec) -> np.ndarray:
    """Indices of the records that give at least one mask group."""
    keep = [i for i, r in enumerate(records)
            if spec.usable(len(r["prompt_ids"]), len(r["response_ids"]))]
    return np.asarray(keep, np.int64)


class BatchStream:
    """Batch `step` of an endless stream of epochs, each a fresh permutation with fresh windows.

    Global sample i belongs to epoch e = i // n (n usable records) and is record
    perm_e[i % n]; its window comes from `np.random.default_rng((seed, e, record))`. So batch
    `step` depends on (records, spec, seed, batch size, step) only: a resumed run sees exactly the
    batches an uninterrupted one would.
    """

    def __init__(self, records: Sequence[Record], spec: SampleSpec | SarSpec, batch_size: int,
                 seed: int):
        self.records, self.spec, self.batch_size, self.seed = records, spec, batch_size, seed
        self.index = usable_indices(records, spec)
        if len(self.index) == 0:
            raise DataError(f"no usable record: no response leaves a token to learn (BiTA: more "
                            f"than M={spec.num_masks}) after truncation to cutoff={spec.cutoff}")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_usable(self) -> int:
        return len(self.index)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.default_rng((self.seed, epoch, 0x5A4))
            self._perms[epoch] = self.index[rng.permutation(len(self.index))]
        return self._perms[epoch]

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Global sample i (0-based)."""
        n = len(self.index)
        epoch, j = divmod(i, n)
        rec = int(self._perm(epoch)[j])
        r = self.records[rec]
        out = self.spec.build(r["prompt_ids"], r["response_ids"],
                              np.random.default_rng((self.seed, epoch, rec)))
        assert out is not None  # filtered by usable_indices
        return out

    def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """Batch `step` ([B, ...] arrays); `rows` selects this process's part on multi-host."""
        first = step * self.batch_size
        ids = range(first, first + self.batch_size)[rows or slice(None)]
        return stack([self.sample(i) for i in ids])

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / len(self.index)

    def position(self, step: int) -> dict[str, int]:
        """Where batch `step` starts: recorded in checkpoints."""
        epoch, j = divmod(step * self.batch_size, len(self.index))
        return {"step": step, "epoch": epoch, "index_in_epoch": j,
                "samples_seen": step * self.batch_size}


def eval_batches(records: Sequence[Record], spec: SampleSpec | SarSpec, batch_size: int, seed: int,
                 max_batches: int | None = None) -> Iterable[dict[str, np.ndarray]]:
    """Fixed eval batches (same windows every time); the last one is padded with empty rows."""
    index = usable_indices(records, spec)
    if max_batches is not None:
        index = index[:max_batches * batch_size]
    for start in range(0, len(index), batch_size):
        samples = []
        for rec in index[start:start + batch_size]:
            r = records[int(rec)]
            samples.append(spec.build(r["prompt_ids"], r["response_ids"],
                                      np.random.default_rng((seed, int(rec)))))
        samples += [spec.empty()] * (batch_size - len(samples))
        yield stack(samples)
