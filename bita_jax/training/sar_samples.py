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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

IGNORE = -1


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
