"""SPACE's semi-autoregressive SFT (SAR-SFT) samples, host-built (arXiv 2402.11809).

One record is a prompt `src` and a response `tgt` (response ids + EOS). With probability
`mask_prob` (official 0.5) the response is cut at a random point c, and M mask tokens follow:

    tokens  = src + tgt[:c] + [mask_0, ..., mask_{M-1}]        (mask k is id V + k)
    targets : the last real token predicts tgt[c] (the model's own next token, plain AR);
              mask k, at position len(src) + c + k, predicts tgt[c + 1 + k]

so mask k stands for the token k + 2 after the last real one, as BiTA's masks do. Every real
response token before the cut keeps its plain next-token target too. The other samples are plain
SFT (`src + tgt`, every response token a target). Every row attends causally: SPACE's masks are
ordinary input tokens of the fine-tuned model, and nothing follows them.

The official release appends mask_num + 1 masks whose last one has no target after its shift;
it is invisible to every other row, so M = mask_num here (official 5) is the same training.

A sample holds one static shape (`SarSpec.cutoff` slots, right-padded), with the batch dim first
in a batch:

    tokens [B, T]   input ids (mask k = V + k), padding 0
    labels [B, T]   the target of the prediction made at each slot, -1 = none

`SarGroupSpec` is the many-cuts layout (`run.sar_layout: groups`, ours, not the official
release's): every sample carries the whole response as real tokens, each with its next-token
target, and up to G mask groups after them in BiTA's two-pass layout (`samples`): group j stands
for a cut at response position p_j, sees the real tokens before it and its own masks causally, and
mask k of it predicts tgt[p_j + 1 + k], as above. The real rows never see a mask, so this is the
same training as G cut samples of the official layout plus one plain SFT sample, in one pass:
a sample teaches the masks G * M targets where a cut sample teaches M. In a batch:

    tokens     [B, Tr]     real tokens (src + tgt), right-padded with 0
    ar_labels  [B, Tr]     each real slot's next-token target, -1 = none
    anchors    [B, G]      visible real tokens of each mask group (0: a padding group)
    labels     [B, G * M]  target of each mask token, -1 = none
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bita_jax.training import samples

IGNORE = -1
SAR_LAYOUTS = ("cut", "groups")


@dataclasses.dataclass(frozen=True)
class SarSpec:
    """Static shapes and the recipe of SAR samples.

    Attributes:
      num_masks: M masks after a cut (official mask_num 5).
      cutoff: T, the slots of a sample; len(src) + len(tgt) is truncated to it (official 2048).
      mask_prob: the share of samples that are cut (official 0.5).
      vocab_size: V (mask k is id V + k).
    """

    num_masks: int
    cutoff: int
    mask_prob: float
    vocab_size: int

    def __post_init__(self):
        if self.num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {self.num_masks}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.cutoff < self.num_masks + 2:
            raise ValueError(f"cutoff={self.cutoff} leaves no room for {self.num_masks} masks")

    # The interface `batches.BatchStream` draws samples through.
    def usable(self, prompt_len: int, response_len: int) -> bool:
        """True when the record has a response token to learn inside the cutoff."""
        return 1 <= prompt_len < self.cutoff and response_len >= 1

    def build(self, src: Sequence[int], tgt: Sequence[int], rng: np.random.Generator):
        return build_sample(src, tgt, self, rng)

    def empty(self) -> dict[str, np.ndarray]:
        return {"tokens": np.zeros(self.cutoff, np.int32),
                "labels": np.full(self.cutoff, IGNORE, np.int32)}


def build_sample(src: Sequence[int], tgt: Sequence[int], spec: SarSpec,
                 rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """One sample: {"tokens": [T], "labels": [T]} int32, or None when nothing is learnable.

    The cut is drawn first (`rng.random() < mask_prob`, for a response of at least M + 1 tokens
    after truncation), then its point c uniformly in [0, len(tgt) - M - 1].
    """
    src = np.asarray(src, np.int32).reshape(-1)
    tgt = np.asarray(tgt, np.int32).reshape(-1)[:max(spec.cutoff - len(src), 0)]
    m = spec.num_masks
    if len(src) < 1 or len(tgt) < 1:
        return None
    cut = rng.random() < spec.mask_prob and len(tgt) >= m + 1
    tokens = np.zeros(spec.cutoff, np.int32)
    labels = np.full(spec.cutoff, IGNORE, np.int32)
    n = len(src)
    if cut:
        c = int(rng.integers(0, len(tgt) - m))
        seq = np.concatenate([src, tgt[:c], spec.vocab_size + np.arange(m, dtype=np.int32)])
        tokens[:len(seq)] = seq
        labels[n - 1:n + c] = tgt[:c + 1]  # real rows: the next token, up to tgt[c]
        labels[n + c:n + c + m] = tgt[c + 1:c + 1 + m]  # mask k: tgt[c + 1 + k]
    else:
        tokens[:n + len(tgt)] = np.concatenate([src, tgt])
        labels[n - 1:n + len(tgt) - 1] = tgt
    return {"tokens": tokens, "labels": labels}


@dataclasses.dataclass(frozen=True)
class SarGroupSpec(samples.SampleSpec):
    """The many-cuts SAR layout (module doc): BiTA's `SampleSpec` shapes, with the real rows'
    next-token targets. `real_len` defaults to the cutoff (the whole response is real)."""

    @property
    def tr(self) -> int:
        return self.real_len if self.real_len is not None else self.cutoff

    def usable(self, prompt_len: int, response_len: int) -> bool:
        """True when the record has a response token to learn inside the real slots."""
        return 1 <= prompt_len < min(self.cutoff, self.tr) and response_len >= 1

    def build(self, src: Sequence[int], tgt: Sequence[int], rng: np.random.Generator):
        return build_group_sample(src, tgt, self, rng)

    def empty(self) -> dict[str, np.ndarray]:
        return {**samples.empty_sample(self), "ar_labels": np.full(self.tr, IGNORE, np.int32)}


def build_group_sample(src: Sequence[int], tgt: Sequence[int], spec: SarGroupSpec,
                       rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """One sample: {"tokens": [Tr], "ar_labels": [Tr], "anchors": [G], "labels": [G * M]} int32,
    or None when nothing is learnable.

    The response is truncated to the cutoff and to the real slots. Its anchors are drawn as
    BiTA's (`spec.anchors`: a window of G consecutive cuts at a random start, or G cuts spread
    over the response); a response of M tokens or fewer gets no mask group, only its
    next-token targets.
    """
    src = np.asarray(src, np.int32).reshape(-1)
    n = len(src)
    tgt = np.asarray(tgt, np.int32).reshape(-1)[:max(min(spec.cutoff, spec.tr) - n, 0)]
    if n < 1 or len(tgt) < 1:
        return None
    out = spec.empty()
    out["tokens"][:n + len(tgt)] = np.concatenate([src, tgt])
    out["ar_labels"][n - 1:n + len(tgt) - 1] = tgt
    if len(tgt) > spec.num_masks:
        groups = samples.build_sample(src, tgt, spec, rng)
        out["anchors"], out["labels"] = groups["anchors"], groups["labels"]
    return out
