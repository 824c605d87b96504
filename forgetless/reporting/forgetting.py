"""Forgetting on the general suite, and over training: tables and figures from run records.

Reads ``record["suite"][task][acc|acc_norm]`` (every run is scored on the general suite, :mod:`forgetless.pipeline`)
and ``stages[i]["extras"]["eval_history"]`` (the rows that ``eval.every`` recorded during the domain stage).
Forgetting on a suite task is ``score(run) - score(base)``, the ``base`` run of the same domain task and seed (same
items, same scorer): negative is forgetting. Domain gain is ``domain score(run) - domain score(base)`` likewise.
Scores are in accuracy points (%). Records without a suite (older forgetless) or without a ``base`` run to compare
with are left out of these sections, which then say so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgetless.reporting.plots import label_points

MEAN = "mean"  # the column of the per-run average over suite tasks


def exact(points: float) -> float:
    """A score difference in points rounded to 1e-9: accuracies are item counts over a few hundred items, so equal
    differences computed in another order (summation noise of ~1e-15) compare equal. Ties stay ties: in a Pareto
    front (one method dominating another at an equal drop) and in Spearman's ranks."""
    return round(points, 9)


def _base_of(runs: Sequence[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in runs if r["method"] == "base" and r["task"] == run["task"]
                 and r.get("seed", 0) == run.get("seed", 0)), None)


def forgetting_rows(runs: Sequence[dict[str, Any]], metric: str = "acc") -> list[dict[str, Any]]:
    """Per tuned run with a suite and a matching ``base`` run: ``{method, task, seed, gain, forgetting: {suite task:
    tuned - base, ..., "mean": average over the suite tasks}}`` in points (%); ``gain`` is None without a domain
    score on both sides."""
    rows = []
    for run in runs:
        base = _base_of(runs, run)
        if run["method"] == "base" or base is None or not run.get("suite") or not base.get("suite"):
            continue
        # a harness task whose main metric is lower-is-better (wikitext's perplexity) is no accuracy: its difference
        # would read as a gain in points where the model got worse, so it stays out of these rows
        common = [t for t in run["suite"] if t in base["suite"]
                  and run["suite"][t].get("higher_is_better", True) and base["suite"][t].get("higher_is_better", True)]
        if not common:
            continue
        deltas = {t: exact(100.0 * (run["suite"][t][metric] - base["suite"][t][metric])) for t in common}
        deltas[MEAN] = exact(statistics.fmean(deltas.values()))
        ours, theirs = run["tasks"].get(run["task"], {}), base["tasks"].get(run["task"], {})
        gain = exact(100.0 * (ours[metric] - theirs[metric])) if metric in ours and metric in theirs else None
        rows.append({"method": run["method"], "task": run["task"], "seed": run.get("seed", 0), "gain": gain,
                     "forgetting": deltas})
    return rows


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.1f}"
    return f"{statistics.fmean(values):+.1f} ± {statistics.stdev(values):.1f}"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def forgetting_table(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    """Markdown: a row per (method, domain task), and per method over all domain tasks (``all``) when there are
    several; a column per suite task and their mean; mean ± std over the runs (seeds, and tasks for ``all``)."""
    suite = list(dict.fromkeys(t for r in rows for t in r["forgetting"] if t != MEAN))
    header = ["method", "domain task", *suite, "suite mean", "domain gain", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for method in methods:
        for task in tasks + (["all"] if len(tasks) > 1 else []):
            mine = [r for r in rows if r["method"] == method and task in (r["task"], "all")]
            if not mine:
                continue
            cells = [_cell([r["forgetting"][t] for r in mine if t in r["forgetting"]]) for t in [*suite, MEAN]]
            cells.append(_cell([r["gain"] for r in mine if r["gain"] is not None]))
            lines.append("| " + " | ".join([method, task, *cells, str(len(mine))]) + " |")
    return "\n".join(lines) + "\n"


def histories(runs: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, float]]]]:
    """(run, its domain stage's ``eval_history``) for the runs that recorded one."""
    out = []
    for run in runs:
        for stage in run.get("stages") or []:
            rows = (stage.get("extras") or {}).get("eval_history")
            if stage.get("stage") == "domain" and rows:
                out.append((run, rows))
    return out


def forgetting_section(runs: Sequence[dict[str, Any]], folder: Path, methods: Sequence[str],
                       metric: str = "acc") -> str:
    """Markdown: the forgetting table, the gain-against-drop figure, the curves over training and the selected
    checkpoints; a one-line note for what the records lack."""
    folder = Path(folder)
    md = "## Forgetting on the general suite\n\n"
    rows = forgetting_rows(runs, metric)
    if not rows:
        md += ("Skipped: no tuned run has general-suite scores and a `base` run of the same task and seed "
               "(`eval.suite`, and `base` among the methods).\n")
    else:
        md += (f"Suite `{metric}` of each run minus that of `base` on the same domain task and seed (same items), in "
               "points: negative is forgetting. *suite mean*: the average over the suite tasks; *domain gain*: the "
               "domain score minus base's. Mean ± std over seeds (*all*: over every domain task's runs).\n\n"
               + forgetting_table(rows, methods))
        if any(r["gain"] is not None for r in rows):
            plot_gain_vs_drop(rows, methods, folder / "gain_vs_drop.png")
            fronts = {task: front for task in dict.fromkeys(r["task"] for r in rows)
                      if (front := gain_drop_front(rows, task))}
            md += ("\nPareto front of domain gain against general-suite drop (means over seeds; on the front when no "
                   "other method has both a smaller or equal drop and a larger or equal gain, one strictly; ringed "
                   "in the figure):\n\n"
                   + "\n".join(f"- **{task}**: " + ", ".join(f"`{m}`" for m in front) for task, front in fronts.items())
                   + "\n\n![domain gain against general-suite drop](gain_vs_drop.png)\n")
    md += "\n## Forgetting over training\n\n"
    curves = histories(runs)
    if not curves:
        return md + "Skipped: no run recorded scores during training (`eval.every`).\n"
    plot_curves(curves, methods, folder / "forgetting_curves.png")
    md += ("Scored every `eval.every` steps of the domain stage on fixed subsets (domain accuracy; `general_acc`: "
           "the mean accuracy over the suite subsets), mean over seeds per method.\n\n"
           "![forgetting over training](forgetting_curves.png)\n")
    chosen = [run for run, _ in curves if run.get("selected")]
    if chosen:
        md += "\n| run | selected step | domain acc | general acc | adapter |\n|---|---|---|---|---|\n"
        for run in chosen:
            sel = run["selected"]
            scores = sel.get("scores", {})
            md += (f"| {run.get('run_id', run['method'])} | {sel['step']} | {scores.get('domain_acc', math.nan):.3f} "
                   f"| {scores.get('general_acc', math.nan):.3f} | {sel.get('adapter', '-')} |\n")
    return md


# ------------------------------------------------------------------------------------------------ figures
def _figures():
    """``(pyplot, save)`` of the report's figures (imported here: :mod:`~forgetless.reporting.report` imports us)."""
    from forgetless.reporting.report import _pyplot, _save

    return _pyplot(), _save


def _gain_drop_points(rows: Sequence[dict[str, Any]], task: str) -> dict[str, tuple[float, float]]:
    """method -> (mean general-suite drop, mean domain gain) over its seeds on ``task``."""
    points = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["task"] == task and r["gain"] is not None]
        if mine:
            points[method] = (exact(statistics.fmean(-r["forgetting"][MEAN] for r in mine)),
                              exact(statistics.fmean(r["gain"] for r in mine)))
    return points


def gain_drop_front(rows: Sequence[dict[str, Any]], task: str) -> list[str]:
    """The methods on the Pareto front of (general-suite drop lower, domain gain higher) on ``task``, by drop."""
    from forgetless.reporting.report import pareto_front

    return pareto_front(_gain_drop_points(rows, task))


def plot_gain_vs_drop(rows: Sequence[dict[str, Any]], methods: Sequence[str], path: Path) -> Path:
    """Per domain task: one point per method at (general-suite drop, domain gain), mean over seeds, error bars the
    std over seeds."""
    plt, save = _figures()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        placed: dict[str, tuple[float, float]] = {}
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["task"] == task and r["gain"] is not None]
            if not mine:
                continue
            (x, xerr), (y, yerr) = mean_std([-r["forgetting"][MEAN] for r in mine]), mean_std([r["gain"]
                                                                                             for r in mine])
            ax.errorbar([x], [y], xerr=[xerr], yerr=[yerr], marker="o", capsize=3, label=method)
            placed[method] = (x, y)
        ax.margins(0.12)
        label_points(ax, placed)
        points, front = _gain_drop_points(rows, task), gain_drop_front(rows, task)
        if front:
            ax.plot([points[m][0] for m in front], [points[m][1] for m in front], color="black", lw=0.8, ls="--",
                    zorder=1)
            ax.scatter([points[m][0] for m in front], [points[m][1] for m in front], s=180, facecolors="none",
                       edgecolors="black", zorder=3, label="Pareto front")
        ax.axvline(0, color="grey", lw=0.8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(task)
        ax.set_xlabel("general-suite drop vs base, points (lower is better)")
        ax.set_ylabel("domain gain vs base, points (higher is better)")
        ax.grid(alpha=0.3)
    return save(fig, path)


def plot_curves(curves: Sequence[tuple[dict[str, Any], list[dict[str, float]]]], methods: Sequence[str],
                path: Path) -> Path:
    """Rows: domain accuracy and general score (suite accuracy, else held-out PPL) against the domain step; columns:
    domain tasks; one line per method (mean over seeds at each step)."""
    plt, save = _figures()
    tasks = list(dict.fromkeys(run["task"] for run, _ in curves))
    general = "general_acc" if any("general_acc" in r for _, rows in curves for r in rows) else "general_ppl"
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        for row_i, key in enumerate(("domain_acc", general)):
            ax = axes[row_i][col]
            for method in [*methods, *{run["method"] for run, _ in curves} - set(methods)]:
                by_step: dict[int, list[float]] = {}
                for run, rows in curves:
                    if run["method"] == method and run["task"] == task:
                        for r in rows:
                            if key in r:
                                by_step.setdefault(int(r["step"]), []).append(float(r[key]))
                if by_step:
                    steps = sorted(by_step)
                    ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker=".", label=method)
            ax.set_title(task)
            ax.set_xlabel("domain step")
            ax.set_ylabel({"domain_acc": "domain acc (subset)", "general_acc": "general-suite acc (subset)",
                           "general_ppl": "general PPL (subset)"}[key])
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return save(fig, path)
