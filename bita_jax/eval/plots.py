"""PNG plots of a speed report (`report.run_report`) and of training metrics.

    paths = plots.report_plots(report, out_dir)   # three PNGs, one panel per prompt set

matplotlib runs headless (Agg); every function returns the paths it wrote.
"""

from __future__ import annotations

import pathlib
import textwrap
from typing import Any

import numpy as np

from bita_jax.eval import report as report_lib


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


TITLE_CHARS_PER_INCH = 9  # suptitle characters per inch of figure width, before wrapping
MIN_WIDTH = 7.0  # inches: a one-panel figure still fits its title and legend


def _colors(report: dict) -> dict[str, Any]:
    """One color per engine, the same in every plot and panel (distinct up to 20 engines)."""
    import matplotlib

    names = list(report["engines"])
    pairs = matplotlib.colormaps["tab20"].colors  # dark, light, dark, light, ...
    cycle = pairs[0::2] + pairs[1::2]  # the ten dark ones (tab10) first
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def _panels(plt, n: int, legend_rows: int = 0, width: float = 5.5, height: float = 3.6):
    """A row of n panels, with room below for `legend_rows` lines of legend; constrained layout
    keeps titles, labels and legends inside the figure."""
    fig, axes = plt.subplots(1, n, figsize=(max(width * n, MIN_WIDTH),
                                            height + 0.2 * legend_rows), squeeze=False,
                             layout="constrained")
    return fig, axes[0]


def _legend_below(ax, ncol: int = 1):
    """The panel's legend under its x label, never over the data."""
    ax.legend(fontsize=7, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.17),
              frameon=False)


def _save(plt, fig, title: str, path: pathlib.Path, subtitle: str = "") -> pathlib.Path:
    """Writes the figure with its title wrapped to the figure's width."""
    chars = int(fig.get_figwidth() * TITLE_CHARS_PER_INCH)
    text = textwrap.fill(title, chars)
    if subtitle:
        text += "\n" + textwrap.fill(subtitle, int(chars * 1.2))
    fig.suptitle(text, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bita_names(report: dict) -> list[str]:
    return [n for n, e in report["engines"].items() if e["kind"] == "bita"]


def _label(report: dict, name: str) -> str:
    return name + (" (selected)" if report["engines"][name].get("selected") else "")


def _runs(report: dict) -> str:
    repeats = int(report.get("config", {}).get("repeats", 1) or 1)
    return "one run each" if repeats == 1 else f"fastest of {repeats} runs each"


def tokens_per_step_histogram(report: dict, path: pathlib.Path) -> pathlib.Path:
    """Share of decode steps that emitted k tokens, per BiTA tree (grouped bars), per set."""
    plt = _pyplot()
    sets = report["sets"]
    names = _bita_names(report)
    colors = _colors(report)
    fig, axes = _panels(plt, len(sets), legend_rows=len(names))
    for ax, (set_name, res) in zip(axes, sets.items()):
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            hist = np.asarray(res["summary"][name]["step_hist"], float)
            share = hist / max(hist.sum(), 1.0)
            k = np.arange(len(share))
            ax.bar(k[1:] + (i - (len(names) - 1) / 2) * width, share[1:], width,
                   color=colors[name], label=f"{_label(report, name)}: "
                   f"{res['summary'][name]['tokens_per_step']:.2f} tokens/step")
        ax.set_xticks(np.arange(1, max(len(res["summary"][n]["step_hist"]) for n in names)))
        ax.set_xlabel("tokens emitted in one step")
        ax.set_ylabel("share of steps")
        ax.set_title(set_name)
        _legend_below(ax)
    return _save(plt, fig, "BiTA: tokens emitted per decode step", path)


def speedup_per_prompt(report: dict, path: pathlib.Path) -> pathlib.Path:
    """Each engine's speedup over the baseline (HF greedy if measured, else our greedy), per
    prompt, per set."""
    plt = _pyplot()
    sets = report["sets"]
    colors = _colors(report)
    first = next(iter(sets.values()))["rows"][0]["engines"]
    base = report_lib.HF_GREEDY if report_lib.HF_GREEDY in first else report_lib.OURS
    shown = [n for n in first if n != base]
    fig, axes = _panels(plt, len(sets), legend_rows=-(-len(shown) // 2))
    for ax, (set_name, res) in zip(axes, sets.items()):
        rows = res["rows"]
        x = np.arange(1, len(rows) + 1)
        for name in shown:
            y = [r["engines"][base]["seconds"] / r["engines"][name]["seconds"] for r in rows]
            ax.plot(x, y, marker="o", color=colors[name],
                    lw=2.5 if report["engines"][name].get("selected") else 1,
                    label=_label(report, name))
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(x)
        ax.set_xlabel("prompt")
        ax.set_ylabel(f"speedup over {base}")
        ax.set_title(set_name)
        _legend_below(ax, ncol=2)
    return _save(plt, fig, f"Speedup over {base}, per prompt", path,
                 subtitle=f"same prompts and lengths; {_runs(report)}")


def step_time_vs_tokens_per_step(report: dict, path: pathlib.Path) -> pathlib.Path:
    """ms per step against tokens per step for our engines, the selected tree marked; the
    dashed line is where an engine would tie with our plain greedy (speedup 1). The engines are
    told apart by color and marker in a legend below each panel (with their numbers), not by
    labels next to the points, which collide when two trees perform alike."""
    plt = _pyplot()
    sets = report["sets"]
    colors = _colors(report)
    names = [report_lib.OURS] + _bita_names(report)
    markers = "osD^vP<>Xph"
    fig, axes = _panels(plt, len(sets), legend_rows=len(names) + 1)
    for ax, (set_name, res) in zip(axes, sets.items()):
        summary = res["summary"]
        ours = summary[report_lib.OURS]
        xs = [summary[n]["tokens_per_step"] for n in names]
        top = max(xs) * 1.15
        ax.plot([1.0, top], [ours["ms_per_step"], ours["ms_per_step"] * top], color="gray",
                ls="--", lw=0.8, label="speedup 1 over plain greedy (below: faster)")
        for i, n in enumerate(names):
            s = summary[n]
            selected = report["engines"][n].get("selected")
            ax.scatter([s["tokens_per_step"]], [s["ms_per_step"]], color=colors[n], zorder=3,
                       s=160 if selected else 45, marker="*" if selected else markers[i % 11],
                       label=f"{_label(report, n).removeprefix('BiTA ')}: "
                             f"{s['tokens_per_step']:.2f} tokens/step, "
                             f"{s['ms_per_step']:.1f} ms, {s['speedup_vs_ours']:.2f}x")
        ax.margins(0.08)
        ax.set_xlabel("tokens per step")
        ax.set_ylabel("ms per step")
        ax.set_title(set_name)
        _legend_below(ax)
    return _save(plt, fig, "Step time against tokens per step", path,
                 subtitle="below the dashed line: faster than our plain greedy")


def report_plots(report: dict, out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """The three report plots in `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [tokens_per_step_histogram(report, out_dir / "tokens_per_step_hist.png"),
            speedup_per_prompt(report, out_dir / "speedup_per_prompt.png"),
            step_time_vs_tokens_per_step(report, out_dir / "step_time_vs_tokens_per_step.png")]
