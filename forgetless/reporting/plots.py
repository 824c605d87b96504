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


# Offsets (points) tried in turn for a point's label: beside it first, then further out (with a leader line).
_LABEL_OFFSETS = [(4, 3), (4, -10), (-4, 3), (-4, -10), (4, 12), (4, -19), (-4, 12), (-4, -19)] + [
    (sx * dx, sy * dy) for dx, dy in ((14, 24), (30, 10), (24, 36), (46, 20), (12, 46), (60, 34))
    for sx in (1, -1) for sy in (1, -1)]
_LEADER_BEYOND = 12  # points: a label further from its point than this gets a line to it


def label_points(ax: Any, points: dict[str, tuple[float, float]], fontsize: float = 7) -> list[Any]:
    """Write each label of ``points`` (label -> (x, y) in data coordinates) beside its point without covering
    another label or point where it can: labels of points at the same place are joined (``"a = b"``), and each
    label takes the first offset of :data:`_LABEL_OFFSETS` whose box stays inside the axes and clear of the labels
    placed so far and of every point, else the one that covers least; a label placed far from its point gets a thin
    line to it. Call it once the axes' limits are set. Returns the text objects."""
    import math

    groups: dict[tuple[float, float], list[str]] = {}
    for label, (x, y) in points.items():
        if math.isfinite(x) and math.isfinite(y):
            key = next((k for k in groups if math.isclose(k[0], x, rel_tol=1e-9, abs_tol=1e-12)
                        and math.isclose(k[1], y, rel_tol=1e-9, abs_tol=1e-12)), (x, y))
            groups.setdefault(key, []).append(label)
    ax.get_xlim(), ax.get_ylim()  # applies a pending autoscale: the data-to-pixel transform is then final
    fig = ax.figure
    fig.tight_layout()  # the axes' final place (saving lays out again; the labels are inside the axes)
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    radius = 3.0 * fig.dpi / 72  # a marker's half-width in pixels
    marks = [(mx - radius, my - radius, mx + radius, my + radius)
             for mx, my in (ax.transData.transform(xy) for xy in groups)]

    def overlap(box: Any, x0: float, y0: float, x1: float, y1: float) -> float:
        return max(0.0, min(box.x1, x1) - max(box.x0, x0)) * max(0.0, min(box.y1, y1) - max(box.y0, y0))

    placed: list[Any] = []
    texts = []
    for (x, y), labels in groups.items():
        best = None
        for dx, dy in _LABEL_OFFSETS:
            text = ax.annotate(" = ".join(labels), (x, y), fontsize=fontsize, xytext=(dx, dy),
                               textcoords="offset points", ha="left" if dx >= 0 else "right")
            box = text.get_window_extent(renderer)
            text.remove()
            cost = (sum(overlap(box, b.x0, b.y0, b.x1, b.y1) for b in placed) + sum(overlap(box, *m) for m in marks)
                    + box.width * box.height - overlap(box, frame.x0, frame.y0, frame.x1, frame.y1))
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        _, dx, dy, box = best
        leader = dict(arrowprops=dict(arrowstyle="-", lw=0.5, color="grey", shrinkA=0, shrinkB=2)) \
            if math.hypot(dx, dy) > _LEADER_BEYOND else {}
        texts.append(ax.annotate(" = ".join(labels), (x, y), fontsize=fontsize, xytext=(dx, dy),
                                 textcoords="offset points", ha="left" if dx >= 0 else "right", **leader))
        placed.append(box)
    return texts


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
            runs = [r for r in results if r["task"] == task and r["method"] == method
                    and r.get("general_ppl") is not None]  # without held-out text a run has no point here
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
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole: no tick at 1.5 on a short stage
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
