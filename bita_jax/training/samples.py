"""BiTA training samples in the "efficient" two-pass layout (DESIGN.md section 3), host-built.

One record is a prompt `src` and the base model's own response `tgt` (response ids + EOS). The paper
feeds one sequence `src + tgt[:p_{G-1}] + G groups of M masks`; mask group j stands right after
`src + tgt[:p_j]`. The paper's anchors are a contiguous window p_j = s + j of G <= max_groups
anchors at a random start s (`anchors="window"`); `anchors="spread"` draws the G anchors uniformly
without replacement from the whole response instead, so every response position is trained
equally often (a window rarely covers the first tokens of a response longer than G).

Real tokens never depend on the BiTA parameters, so the step splits that sequence in two passes:

    pass 1 (no gradient): real tokens [B, Tr], causal  -> their keys/values [L, B, Tr, K, D]
    pass 2 (grad wrt BiTA): G*M mask tokens [B, G*M] that see
        - the pass-1 cache slots [0, anchor_j)   (`cache_visible`, anchor_j = len(src) + p_j)
        - their own group causally               (a block-diagonal causal [G*M, G*M] mask)
        - the BiTA prefix                        (mask rows only, by the model)
      at positions anchor_j + k, with labels tgt[p_j + 1 + k].

Every array here has a static shape: Tr real slots (right-padded with token 0) and max_groups * M
mask slots (unused groups get anchor 0 and label -1, so they see nothing real and add no loss).

A batch is a dict of int32 numpy arrays, every one with the batch dim first:

    tokens  [B, Tr]      real tokens, right-padded
    anchors [B, G]       visible real tokens of each mask group (0 for padding groups)
    labels  [B, G * M]   target of each mask token, -1 = ignored

Batches of these samples are `batches.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

IGNORE = -1
ANCHOR_MODES = ("window", "spread")

@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Static shapes of one sample.

    Attributes:
      num_masks: M mask tokens per group.
      max_groups: G mask groups per sample (official: 64).
      cutoff: len(src) + len(tgt) is truncated to at most this (official: 2048).
      real_len: Tr real-token slots; defaults to `cutoff - num_masks - 1`, the longest possible
        `src + tgt[:p_{G-1}]`.
      anchors: "window" (the paper: G consecutive anchors from a random start) or "spread" (G
        anchors drawn without replacement from all of them, sorted).
    """

    num_masks: int
    max_groups: int = 64
    cutoff: int = 2048
    real_len: int | None = None
    anchors: str = "window"

    def __post_init__(self):
        if self.num_masks < 1 or self.max_groups < 1:
            raise ValueError(f"num_masks and max_groups must be >= 1: {self}")
        if self.cutoff < self.num_masks + 2:
            raise ValueError(f"cutoff={self.cutoff} leaves no room for {self.num_masks} masks")
        if self.real_len is not None and self.real_len < 1:
            raise ValueError(f"real_len must be >= 1, got {self.real_len}")
        if self.anchors not in ANCHOR_MODES:
            raise ValueError(f"anchors must be one of {ANCHOR_MODES}, got {self.anchors!r}")

    @property
    def tr(self) -> int:
        """Tr, the real-token slots of a sample."""
        return self.real_len if self.real_len is not None else self.cutoff - self.num_masks - 1

    @property
    def num_mask_tokens(self) -> int:
        """G * M mask slots of a sample."""
        return self.max_groups * self.num_masks

    # The interface `batches.BatchStream` draws samples through (`sar_samples.SarSpec` too).
    def usable(self, prompt_len: int, response_len: int) -> bool:
        return usable(prompt_len, response_len, self)

    def build(self, src: Sequence[int], tgt: Sequence[int], rng: np.random.Generator):
        return build_sample(src, tgt, self, rng)

    def empty(self) -> dict[str, np.ndarray]:
        return empty_sample(self)


def usable(prompt_len: int, response_len: int, spec: SampleSpec) -> bool:
    """True when the record yields at least one mask group (after truncation to the cutoff)."""
    tgt_len = min(response_len, spec.cutoff - prompt_len)
    return tgt_len > spec.num_masks and prompt_len + tgt_len - spec.num_masks - 1 <= spec.tr


def build_sample(src: Sequence[int], tgt: Sequence[int], spec: SampleSpec,
                 rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """One sample (no batch dim) of the efficient layout, or None when it has no mask group.

    Args:
      src: prompt ids (already templated).
      tgt: response ids including the final EOS; truncated so len(src) + len(tgt) <= cutoff.
      spec: static shapes.
      rng: draws the window start s (or, with `spec.anchors == "spread"`, the anchors).

    Returns:
      {"tokens": [Tr], "anchors": [G], "labels": [G * M]} int32, or None if len(tgt) <= M.
    """
    src = np.asarray(src, np.int32).reshape(-1)
    tgt = np.asarray(tgt, np.int32).reshape(-1)[:max(spec.cutoff - len(src), 0)]
    m, g_max = spec.num_masks, spec.max_groups
    if len(tgt) <= m:
        return None
    a = len(tgt) - m  # anchors p = 0 .. A-1 all have M labels inside tgt
    g = min(a, g_max)
    if spec.anchors == "spread" and g < a:
        p = np.sort(rng.choice(a, size=g, replace=False))  # anchors p_j
    else:
        p = int(rng.integers(0, a - g + 1)) + np.arange(g)
    real = np.concatenate([src, tgt[:p[-1]]])
    if len(real) > spec.tr:
        raise ValueError(f"sample needs {len(real)} real slots but real_len={spec.tr}")
    tokens = np.zeros(spec.tr, np.int32)
    tokens[:len(real)] = real
    anchors = np.zeros(g_max, np.int32)
    anchors[:g] = len(src) + p
    labels = np.full((g_max, m), IGNORE, np.int32)
    labels[:g] = tgt[p[:, None] + 1 + np.arange(m)[None, :]]
    return {"tokens": tokens, "anchors": anchors, "labels": labels.reshape(-1)}


def empty_sample(spec: SampleSpec) -> dict[str, np.ndarray]:
    """An all-padding sample (no loss): fills the last eval batch."""
    return {"tokens": np.zeros(spec.tr, np.int32), "anchors": np.zeros(spec.max_groups, np.int32),
            "labels": np.full(spec.num_mask_tokens, IGNORE, np.int32)}


def stack(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A list of samples -> a batch dict with a leading [B] dim."""
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


# ---------------------------------------------------------------------------------------------
# Index helpers shared by the train step and the tests (numpy, static per spec).


def mask_ids(spec: SampleSpec, vocab_size: int) -> np.ndarray:
    """[G * M] token ids of the mask slots: V + k for mask k of every group."""
    return (vocab_size + np.tile(np.arange(spec.num_masks), spec.max_groups)).astype(np.int32)


def mask_offsets(spec: SampleSpec) -> np.ndarray:
    """[G * M] mask index k of each mask slot (position offset from its group's anchor)."""
    return np.tile(np.arange(spec.num_masks), spec.max_groups).astype(np.int32)


def group_mask(spec: SampleSpec) -> np.ndarray:
    """[G * M, G * M] bool: mask k of a group sees masks 0..k of the same group, nothing else."""
    m = spec.num_masks
    group = np.arange(spec.num_mask_tokens) // m
    k = np.arange(spec.num_mask_tokens) % m
    return (group[:, None] == group[None, :]) & (k[None, :] <= k[:, None])


def full_layout(sample: Mapping[str, np.ndarray], real_count: int, spec: SampleSpec,
                vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The paper's single-sequence layout of one sample (the reference for the two-pass step).

    Args:
      sample: a `build_sample` output.
      real_count: len(src) + p_{G-1}, the real tokens actually used.
      spec: static shapes.
      vocab_size: V (mask k is id V + k).

    Returns:
      tokens [T], positions [T], mask [T, T] bool, labels [T] (-1 on real rows), with
      T = real_count + G * M.
    """
    m, gm = spec.num_masks, spec.num_mask_tokens
    t = real_count + gm
    tokens = np.concatenate([sample["tokens"][:real_count], mask_ids(spec, vocab_size)])
    anchors = np.repeat(sample["anchors"], m)  # [G*M]
    positions = np.concatenate([np.arange(real_count), anchors + mask_offsets(spec)])
    mask = np.zeros((t, t), bool)
    mask[:real_count, :real_count] = np.tril(np.ones((real_count, real_count), bool))
    mask[real_count:, :real_count] = np.arange(real_count)[None, :] < anchors[:, None]
    mask[real_count:, real_count:] = group_mask(spec)
    labels = np.concatenate([np.full(real_count, IGNORE), sample["labels"]])
    return tokens.astype(np.int32), positions.astype(np.int32), mask, labels.astype(np.int32)
