"""Plot a training run's metrics.jsonl: loss and per-mask top-1 accuracy against steps (PNG).

    python train/plot_metrics.py runs/bita-smollm2/metrics.jsonl --out docs/img/smollm2_loss.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("metrics", help="metrics.jsonl written by train/train.py")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window (steps)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [json.loads(line) for line in pathlib.Path(args.metrics).read_text().splitlines()
            if line.strip()]
    train = [r for r in rows if "loss" in r and "acc" in r and not r.get("eval")]
    evals = [r for r in rows if r.get("eval") or "eval_loss" in r]
    if not train:
        print(f"error: no training rows in {args.metrics}", file=sys.stderr)
        return 2
    steps = np.array([r["step"] for r in train])
    window = max(1, min(args.smooth, len(train)))
    kernel = np.ones(window) / window

    def smooth(values):
        values = np.asarray(values, float)
        return np.convolve(values, kernel, mode="valid"), steps[window - 1:]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    y, x = smooth([r["loss"] for r in train])
    ax_loss.plot(steps, [r["loss"] for r in train], alpha=0.25, color="C0")
    ax_loss.plot(x, y, color="C0", label=f"train (moving average {window})")
    if evals:
        ax_loss.plot([r["step"] for r in evals],
                     [r.get("eval_loss", r.get("loss")) for r in evals], "o-", color="C3",
                     label="held-out")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy on mask tokens")
    ax_loss.legend()
    num_masks = len(train[0]["acc"])
    for k in range(num_masks):
        y, x = smooth([r["acc"][k] for r in train])
        ax_acc.plot(x, y, color=f"C{k}", label=f"mask {k} (train)")
    for k in range(num_masks):
        if evals:
            accs = [r.get("eval_acc", r.get("acc"))[k] for r in evals]
            ax_acc.plot([r["step"] for r in evals], accs, "o--", color=f"C{k}",
                        label=f"mask {k} (held-out)")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
