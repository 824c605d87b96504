"""Flatness beside forgetting: a table per run, Spearman correlations and scatter plots across runs.

Reads run JSON (``record["landscape"]["metrics"]`` written by :func:`forgetless.landscape_runs.measure_runs`).
Forgetting is the increase in general perplexity, ``dPPL = PPL(run) - PPL(reference)``, the reference being the
``base`` run of the same task and seed (else any ``base`` run, else the run of the first method).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = {  # key in the run record -> label
    "surface_curvature": "Surface Curvature",
    "average_gradient": "Average Gradient",
    "mean_absolute_gradient": "Mean Absolute Gradient",
    "hessian_top_eigenvalue": "Hessian top eigenvalue",
    "hessian_trace": "Hessian trace",
    "eps_sharpness": "eps-sharpness",
}


def reference_ppl(results: Sequence[dict[str, Any]], run: dict[str, Any],
                  methods: Sequence[str] | None = None) -> float:
    """General PPL of the run that ``run``'s forgetting is measured against (see the module doc)."""
    same = [r for r in results if r.get("task") == run.get("task") and r.get("seed") == run.get("seed")]
    for pool in (same, results):
        base = [r for r in pool if r["method"] == "base"]
        if base:
            return float(base[0]["general_ppl"])
    first = methods[0] if methods else results[0]["method"]
    for pool in (same, results):
        firsts = [r for r in pool if r["method"] == first]
        if firsts:
            return float(firsts[0]["general_ppl"])
    return float(results[0]["general_ppl"])


def flatness_rows(results: Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per measured run: method, task, seed, general PPL, dPPL and the metrics it has."""
    rows = []
    for r in results:
        metrics = (r.get("landscape") or {}).get("metrics")
        if not metrics:
            continue
        rows.append({"method": r["method"], "task": r.get("task"), "seed": r.get("seed"),
                     "general_ppl": float(r["general_ppl"]),
                     "ppl_increase": float(r["general_ppl"]) - reference_ppl(results, r, methods),
                     **{k: metrics[k] for k in METRICS if k in metrics}})
    return rows


def spearman(rows: Sequence[dict[str, Any]], metric: str) -> tuple[float, float, int]:
    """(rho, p, n) of ``metric`` against ``ppl_increase`` over the rows that have it; NaN when undefined."""
    from scipy.stats import spearmanr

    pairs = [(row[metric], row["ppl_increase"]) for row in rows
             if metric in row and math.isfinite(row[metric]) and math.isfinite(row["ppl_increase"])]
    n = len(pairs)
    if n < 3:
        return math.nan, math.nan, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
        result = spearmanr([x for x, _ in pairs], [y for _, y in pairs])
    return float(result.statistic), float(result.pvalue), n


def plot_flatness_scatter(rows: Sequence[dict[str, Any]], metric: str, path: str | Path) -> Path:
    """``metric`` (x) against the increase in general PPL (y), one colour per method, rho and p in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for i, method in enumerate(methods):
        points = [row for row in rows if row["method"] == method and metric in row]
        ax.scatter([p[metric] for p in points], [p["ppl_increase"] for p in points], label=method,
                   color=colours[i % len(colours)], s=40)
    rho, p, n = spearman(rows, metric)
    ax.set_title(f"{METRICS[metric]}: Spearman rho {_num(rho, 2)}, p {_num(p, 3)} (n={n})", fontsize=9)
    ax.set_xlabel(METRICS[metric])
    ax.set_ylabel("increase in general perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _num(value: float, digits: int) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def flatness_section(results: Sequence[dict[str, Any]], folder: Path, methods: Sequence[str] | None = None) -> str:
    """Markdown for ``results.md`` (table, correlations) and one scatter plot per metric; "" if nothing was measured."""
    rows = flatness_rows(results, methods)
    if not rows:
        return ""
    metrics = [m for m in METRICS if any(m in row for row in rows)]
    header = ["method", "task", "seed", "general PPL", "PPL increase"] + [METRICS[m] for m in metrics]
    md = "\n## Flatness and forgetting\n\n"
    md += "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    for row in rows:
        cells = [row["method"], row["task"], row["seed"], f"{row['general_ppl']:.3f}", f"{row['ppl_increase']:+.4g}"]
        cells += [row.get(m, math.nan) for m in metrics]
        md += "| " + " | ".join(_fmt(c) for c in cells) + " |\n"
    md += "\nSpearman correlation of each metric with the increase in general perplexity, across runs:\n\n"
    md += "| metric | Spearman rho | p | runs | figure |\n|---|---|---|---|---|\n"
    for metric in metrics:
        rho, p, n = spearman(rows, metric)
        figure = plot_flatness_scatter(rows, metric, Path(folder) / f"flatness_{metric}.png")
        md += f"| {METRICS[metric]} | {_num(rho, 3)} | {_num(p, 3)} | {n} | {figure.name} |\n"
    settings = next((r["landscape"].get("settings") for r in results if (r.get("landscape") or {}).get("metrics")), {})
    md += (f"\nMeasured on the domain-stage weights ({settings.get('params', '?')} parameters), on "
           f"{settings.get('blocks', '?')} held-out general-text blocks of {settings.get('block_size', '?')} tokens; "
           "the three surface metrics on a "
           f"{settings.get('grid', '?')}x{settings.get('grid', '?')} grid over [-{settings.get('span', '?')}, "
           f"{settings.get('span', '?')}]^2 (formulas: forgetless/landscape/metrics.py). PPL increase: general PPL "
           "minus that of base (same task and seed), or of the first method if there is no base. With few runs the "
           "p-values mean little.\n")
    return md
