"""Figures of an experiment's results: the forgetting trade-off and the training curves.

They read result JSON (as written by :mod:`forgetless.experiment`) and never touch models or training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per task: domain accuracy (y, higher is better) against general perplexity (x, lower is better),
    one marker per run, one colour per method. Up and to the left is gaining without forgetting."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        for i, method in enumerate(methods):
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            if runs:
                ax.scatter([r["general_ppl"] for r in runs], [100 * r["tasks"][task]["acc"] for r in runs],
                           label=method, color=colours[i % len(colours)], s=40)
        ax.set_title(task)
        ax.set_xlabel("general perplexity (lower is better)")
        ax.set_ylabel("domain accuracy, % (higher is better)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training loss per optimizer step, one panel per stage, one line per run."""
    plt = _pyplot()
    stages = ["general", "domain"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, stage in zip(axes, stages):
        for r in results:
            for s in r.get("stages", []):
                if s["stage"] == stage and s.get("history"):
                    ax.plot([h["step"] for h in s["history"]], [h["loss"] for h in s["history"]],
                            label=f"{r['method']} / {r['task']} / seed {r['seed']}", lw=1)
        ax.set_title(f"{stage} stage")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        axes[1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
