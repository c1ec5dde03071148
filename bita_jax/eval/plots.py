"""PNG plots of a speed report (`report.run_report`) and of training metrics.

    paths = plots.report_plots(report, out_dir)   # three PNGs, one panel per prompt set

matplotlib runs headless (Agg); every function returns the paths it wrote.
"""

from __future__ import annotations

import pathlib

import numpy as np

from bita_jax.eval import report as report_lib


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, n: int, width: float = 5.5, height: float = 4.0):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def _save(plt, fig, title: str, path: pathlib.Path) -> pathlib.Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bita_names(report: dict) -> list[str]:
    return [n for n, e in report["engines"].items() if e["kind"] == "bita"]


def _label(report: dict, name: str) -> str:
    return name + (" (selected)" if report["engines"][name].get("selected") else "")


def tokens_per_step_histogram(report: dict, path: pathlib.Path) -> pathlib.Path:
    """Share of decode steps that emitted k tokens, per BiTA tree (grouped bars), per set."""
    plt = _pyplot()
    sets = report["sets"]
    names = _bita_names(report)
    fig, axes = _panels(plt, len(sets))
    for ax, (set_name, res) in zip(axes, sets.items()):
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            hist = np.asarray(res["summary"][name]["step_hist"], float)
            share = hist / max(hist.sum(), 1.0)
            k = np.arange(len(share))
            ax.bar(k[1:] + (i - (len(names) - 1) / 2) * width, share[1:], width,
                   label=f"{_label(report, name)}: "
                         f"{res['summary'][name]['tokens_per_step']:.2f}/step")
        ax.set_xticks(np.arange(1, max(len(res["summary"][n]["step_hist"]) for n in names)))
        ax.set_xlabel("tokens emitted in one step")
        ax.set_ylabel("share of steps")
        ax.set_title(set_name)
        ax.legend(fontsize=7)
    return _save(plt, fig, "BiTA: tokens per decode step", path)


def speedup_per_prompt(report: dict, path: pathlib.Path) -> pathlib.Path:
    """Each engine's speedup over the baseline (HF greedy if measured, else our greedy), per
    prompt, per set."""
    plt = _pyplot()
    sets = report["sets"]
    fig, axes = _panels(plt, len(sets))
    for ax, (set_name, res) in zip(axes, sets.items()):
        rows = res["rows"]
        base = report_lib.HF_GREEDY if report_lib.HF_GREEDY in rows[0]["engines"] else \
            report_lib.OURS
        x = np.arange(1, len(rows) + 1)
        for name in rows[0]["engines"]:
            if name == base:
                continue
            y = [r["engines"][base]["seconds"] / r["engines"][name]["seconds"] for r in rows]
            ax.plot(x, y, marker="o", lw=2.5 if report["engines"][name].get("selected") else 1,
                    label=_label(report, name))
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(x)
        ax.set_xlabel("prompt")
        ax.set_ylabel(f"speedup over {base}")
        ax.set_title(set_name)
        ax.legend(fontsize=7)
    return _save(plt, fig, "Speedup per prompt (same prompt, same length, one run)", path)


def step_time_vs_tokens_per_step(report: dict, path: pathlib.Path) -> pathlib.Path:
    """ms per step against tokens per step for our engines, the selected tree marked; the
    dashed line is where an engine would tie with our plain greedy (speedup 1)."""
    plt = _pyplot()
    sets = report["sets"]
    fig, axes = _panels(plt, len(sets))
    for ax, (set_name, res) in zip(axes, sets.items()):
        summary = res["summary"]
        ours = summary[report_lib.OURS]
        names = [report_lib.OURS] + _bita_names(report)
        xs = [summary[n]["tokens_per_step"] for n in names]
        ys = [summary[n]["ms_per_step"] for n in names]
        top = max(xs) * 1.15
        ax.plot([1.0, top], [ours["ms_per_step"], ours["ms_per_step"] * top], color="gray",
                ls="--", lw=0.8, label="speedup 1 over plain greedy")
        for n, x, y in zip(names, xs, ys):
            selected = report["engines"][n].get("selected")
            ax.scatter([x], [y], s=140 if selected else 40, marker="*" if selected else "o",
                       zorder=3)
            ax.annotate(f"{n.removeprefix('BiTA ')} ({summary[n]['speedup_vs_ours']:.2f}x)"
                        + (" selected" if selected else ""), (x, y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("tokens per step")
        ax.set_ylabel("ms per step")
        ax.set_title(set_name)
        ax.legend(fontsize=7, loc="upper left")
    return _save(plt, fig, "Step time against tokens per step (below the line: faster than "
                 "plain greedy)", path)


def report_plots(report: dict, out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """The three report plots in `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [tokens_per_step_histogram(report, out_dir / "tokens_per_step_hist.png"),
            speedup_per_prompt(report, out_dir / "speedup_per_prompt.png"),
            step_time_vs_tokens_per_step(report, out_dir / "step_time_vs_tokens_per_step.png")]
