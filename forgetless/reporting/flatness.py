"""Flatness beside forgetting: a table per run, Spearman correlations and scatter plots across runs.

Reads run JSON (``record["landscape"]["metrics"]`` written by :func:`forgetless.landscape_runs.measure_runs`).
Forgetting is the increase in general perplexity, ``dPPL = PPL(run) - PPL(reference)``, the reference being the
``base`` run of the same task and seed (else any ``base`` run, else the run of the first method), and, where the
runs were scored on a general suite, the suite forgetting (mean over suite tasks of tuned - base accuracy, points;
negative is forgetting: :func:`forgetless.reporting.forgetting.forgetting_rows`). Runs measured with
``all_weights_seeds`` are also compared over the two kinds of directions (LoRA-only and all weights).
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


# how far to trust a metric, shown beside it in the per-run table: the trace's standard error over its probes, and
# the residual |H v - lambda v| / |lambda| of the top eigenpair (power iteration or Lanczos; small: an eigenpair; for
# the power iteration it does not prove it is the largest)
PRECISION_OF = {"hessian_trace_stderr": "hessian_trace", "hessian_top_residual": "hessian_top_eigenvalue"}


def reference_ppl(results: Sequence[dict[str, Any]], run: dict[str, Any],
                  methods: Sequence[str] | None = None) -> float:
    """General PPL of the run that ``run``'s forgetting is measured against (see the module doc); runs without a
    general PPL (scored without held-out text) are passed over."""
    scored = [r for r in results if r.get("general_ppl") is not None] or [run]
    same = [r for r in scored if r.get("task") == run.get("task") and r.get("seed") == run.get("seed")]
    for pool in (same, scored):
        base = [r for r in pool if r["method"] == "base"]
        if base:
            return float(base[0]["general_ppl"])
    first = methods[0] if methods else results[0]["method"]
    for pool in (same, scored):
        firsts = [r for r in pool if r["method"] == first]
        if firsts:
            return float(firsts[0]["general_ppl"])
    return float(scored[0]["general_ppl"])


TARGETS = {"ppl_increase": "increase in general perplexity", "suite_forgetting": "general-suite change (points)"}


def flatness_rows(results: Sequence[dict[str, Any]], methods: Sequence[str] | None = None,
                  metric: str = "acc") -> list[dict[str, Any]]:
    """One row per measured run: method, task, seed, general PPL, dPPL, the suite forgetting by ``metric`` (acc or
    acc_norm; when the runs have a suite and a base run) and the metrics it has."""
    from forgetless.reporting.forgetting import MEAN, forgetting_rows

    suite = {(row["method"], row["task"], row["seed"]): row["forgetting"][MEAN]
             for row in forgetting_rows(results, metric)}
    rows = []
    for r in results:
        metrics = (r.get("landscape") or {}).get("metrics")
        if not metrics or r.get("general_ppl") is None:  # no held-out text: no increase to relate flatness to
            continue
        row = {"method": r["method"], "task": r.get("task"), "seed": r.get("seed"),
               "digest": r["landscape"].get("digest"), "settings": r["landscape"].get("settings") or {},
               "general_ppl": float(r["general_ppl"]),
               "ppl_increase": float(r["general_ppl"]) - reference_ppl(results, r, methods),
               **{k: metrics[k] for k in METRICS if k in metrics},
               **{k: metrics[k] for k in PRECISION_OF if k in metrics}}
        key = (r["method"], r.get("task"), r.get("seed", 0))
        if key in suite:
            row["suite_forgetting"] = suite[key]
        rows.append(row)
    return rows


def same_settings(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the rows measured with the landscape settings most rows have, the others). Metrics of another grid, span,
    precision or data are on another scale: a run that could not be measured again after the settings changed keeps
    its old metrics in its record, and must not join the others' correlations. Ties go to the settings of the
    first row."""
    from collections import Counter

    if not rows:
        return [], []
    (kept, _), = Counter(row.get("digest") for row in rows).most_common(1)  # ties: the first met
    return [row for row in rows if row.get("digest") == kept], [row for row in rows if row.get("digest") != kept]


def distinct_models(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """``rows`` with each model counted once, and the (dropped, kept) method pairs. Two runs of one task and seed whose
    general PPL and every flatness metric are equal are one model (WiSE-FT's alpha-1 run is ``lora-nu-mu``'s when
    they share the general stage): counting it twice would weigh it double in a correlation. The first row is kept."""
    kept: dict[tuple, dict[str, Any]] = {}
    dropped = []
    for row in rows:
        key = (row.get("task"), row.get("seed"), row["general_ppl"],
               tuple((k, row[k]) for k in METRICS if k in row))
        if key in kept:
            dropped.append((row["method"], kept[key]["method"]))
        else:
            kept[key] = row
    return list(kept.values()), dropped


def spearman(rows: Sequence[dict[str, Any]], metric: str, target: str = "ppl_increase") -> tuple[float, float, int]:
    """(rho, p, n) of ``metric`` against ``target`` (a key of :data:`TARGETS`) over the rows that have both; NaN
    when undefined. The two-sided p is exact (every pairing of the values, :data:`EXACT_UP_TO` rows at most: scipy's
    t approximation said p = 0 for rho = 1 at n = 3, where the exact p is 1/3), else scipy's approximation."""
    from scipy.stats import spearmanr

    pairs = [(row[metric], row[target]) for row in rows
             if metric in row and target in row and math.isfinite(row[metric]) and math.isfinite(row[target])]
    n = len(pairs)
    if n < 3:
        return math.nan, math.nan, n
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
        result = spearmanr(xs, ys)
        rho, p = float(result.statistic), float(result.pvalue)
        if n <= EXACT_UP_TO and math.isfinite(rho):
            p = _exact_spearman_p(xs, ys, rho)
    return rho, p, n


def _exact_spearman_p(xs: Sequence[float], ys: Sequence[float], rho: float) -> float:
    """Two-sided permutation p of Spearman's rho: the share of the n! pairings of ``ys``'s ranks with ``xs``'s whose
    |rho| reaches the observed one (average ranks for ties, as spearmanr)."""
    import itertools

    import numpy as np
    from scipy.stats import rankdata

    rx, ry = rankdata(xs), rankdata(ys)
    rx, ry = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean()), ry - ry.mean()
    ry = ry / np.linalg.norm(ry)
    rhos = np.array(list(itertools.permutations(ry))) @ rx  # every pairing's rho: n! x n, 40320 x 8 at most
    return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


#: Rows up to which :func:`spearman`'s p is exact (n! pairings: 40320 at 8)
EXACT_UP_TO = 8


def plot_flatness_scatter(rows: Sequence[dict[str, Any]], metric: str, path: str | Path,
                          target: str = "ppl_increase") -> Path:
    """``metric`` (x) against ``target`` (y; the increase in general PPL by default), one colour per method, rho
    and p in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for i, method in enumerate(methods):
        points = [row for row in rows if row["method"] == method and metric in row and target in row]
        ax.scatter([p[metric] for p in points], [p[target] for p in points], label=method,
                   color=colours[i % len(colours)], s=40)
    rho, p, n = spearman(rows, metric, target)
    ax.set_title(f"{METRICS[metric]}: Spearman rho {_num(rho, 2)}, p {_num(p, 3)} (n={n})", fontsize=9)
    ax.set_xlabel(METRICS[metric])
    ax.set_ylabel(TARGETS[target])
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


def _mean_std(values: list[float]) -> str:
    from forgetless.reporting.forgetting import mean_std

    if not values:
        return "-"
    mean, std = mean_std(values)
    return _num(mean, 4) if len(values) == 1 else f"{_num(mean, 4)} ± {_num(std, 2)}"


def method_means(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """Markdown: per method (in the rows' order), the mean ± std over its runs of forgetting and of each metric."""
    from forgetless.reporting.report import markdown_table

    targets = [t for t in TARGETS if any(t in row for row in rows)]
    header = ["method", "runs"] + [TARGETS[t] for t in targets] + [METRICS[m] for m in metrics]
    table = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        table.append([method, str(len(mine))] + [_mean_std([row[k] for row in mine if k in row and
                                                            math.isfinite(row[k])]) for k in [*targets, *metrics]])
    return markdown_table(header, table)


def flatness_section(results: Sequence[dict[str, Any]], folder: Path, methods: Sequence[str] | None = None,
                     root: Path | None = None, metric: str = "acc") -> str:
    """Markdown (per-method means, a table per run, correlations) and one scatter plot per metric into ``folder``;
    "" if nothing was measured. ``root``: the results folder the surfaces' paths are relative to (default
    ``folder``). ``metric``: the accuracy the general-suite change is counted in (the report's own)."""
    rows, other = same_settings(flatness_rows(results, methods, metric))
    if not rows:
        return ""
    if methods:
        order = {m: i for i, m in enumerate(methods)}
        rows.sort(key=lambda row: (order.get(row["method"], len(order)), str(row["task"]), row["seed"] or 0))
    metrics = [m for m in METRICS if any(m in row for row in rows)]
    shown = {PRECISION_OF[k]: k for k in PRECISION_OF if any(k in row for row in rows)}  # metric -> its precision
    labels = {"hessian_trace": "Hessian trace (± s.e.)", "hessian_top_eigenvalue": "Hessian top eigenvalue (residual)"}
    header = ["method", "task", "seed", "general PPL", "PPL increase"] + [
        labels[m] if m in shown else METRICS[m] for m in metrics]
    md = "\n## Flatness and forgetting\n\n"
    if other:
        names = ", ".join(f"`{row['method']}` ({row['task']}, seed {row['seed']})" for row in other)
        md += (f"Left out: {len(other)} run(s) measured with other landscape settings than the rest ({names}): "
               "their metrics are on another scale. Measure them again with these settings (`forgetless run` does "
               "when it can) to include them.\n\n")
    if any("suite_forgetting" in row for row in rows):
        md += f"The general-suite change is counted in `{metric}`.\n\n"
    md += "Per method, mean ± std over its runs:\n\n" + method_means(rows, metrics) + "\nPer run:\n\n"
    md += "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    for row in rows:
        cells = [row["method"], row["task"], row["seed"], f"{row['general_ppl']:.3f}", f"{row['ppl_increase']:+.4g}"]
        cells = [_fmt(c) for c in cells]
        for m in metrics:
            cell = _fmt(row.get(m, math.nan))
            if m in shown and shown[m] in row:
                cell += (f" ± {row[shown[m]]:.2g}" if m == "hessian_trace" else f" ({row[shown[m]]:.2g})")
            cells.append(cell)
        md += "| " + " | ".join(cells) + " |\n"
    targets = [t for t in TARGETS if any(t in row for row in rows)]
    distinct, dropped = distinct_models(rows)
    md += ("\nSpearman correlation of each metric with forgetting, across runs (general-suite change: negative is "
           "forgetting, so a metric that predicts forgetting correlates *positively* with the PPL increase and "
           "*negatively* with the suite change)")
    if dropped:
        pairs = sorted({f"`{a}` (the model of `{b}`)" for a, b in dropped})
        md += (f"; each model counted once: {len(dropped)} run(s) of {', '.join(pairs)} have the same measurements as "
               "another run and are left out of the correlations and plots")
    md += ":\n\n"
    rows = distinct
    md += "| metric | " + " | ".join(f"rho, p vs {TARGETS[t]}" for t in targets) + " | runs | figures |\n"
    md += "|---|" + "---|" * len(targets) + "---|---|\n"
    for metric in metrics:
        cells, names, n = [], [], 0
        for target in targets:
            rho, p, n_t = spearman(rows, metric, target)
            n = max(n, n_t)
            cells.append(f"{_num(rho, 3)}, {_num(p, 3)}")
            suffix = "" if target == "ppl_increase" else f"_{target}"
            names.append(plot_flatness_scatter(rows, metric, Path(folder) / f"flatness_{metric}{suffix}.png",
                                               target).name)
        md += f"| {METRICS[metric]} | " + " | ".join(cells) + f" | {n} | {', '.join(names)} |\n"
    settings = rows[0]["settings"]
    md += (f"\nMeasured on the domain-stage weights ({settings.get('params', '?')} parameters), on "
           f"{settings.get('blocks', '?')} held-out general-text blocks of {settings.get('block_size', '?')} tokens; "
           "the three surface metrics on a "
           f"{settings.get('grid', '?')}x{settings.get('grid', '?')} grid over [-{settings.get('span', '?')}, "
           f"{settings.get('span', '?')}]^2 (formulas: forgetless/landscape/metrics.py); the Hessian's top "
           f"eigenvalue (the largest algebraic one) by {_eigen_method(settings)}, its trace from "
           f"{settings.get('trace_samples', '?')} Hutchinson probes; in {settings.get('precision', '?')}. PPL increase: "
           "general PPL "
           "minus that of base (same task and seed, else another base run), or of the first method if there is no "
           "base. With few runs the p-values mean little.\n")
    variants = sorted({r["method"] for r in results if r.get("variant_of")}
                      | {label for r in results for label in (r.get("variants") or {})})
    if variants:
        md += (f"\nNot measured: {', '.join(f'`{v}`' for v in variants)}. An interpolation's model is a rank-2r "
               "adapter (the general and domain factors stacked), so its LoRA directions span other parameters than "
               "a run's rank-r ones and its metrics would not compare; the run itself (alpha 1) is measured.\n")
    return md + all_weights_section(results, folder, root)


SURFACE_METRICS = ("surface_curvature", "average_gradient", "mean_absolute_gradient")


def _eigen_method(settings: dict) -> str:
    """How the recorded top eigenvalue was found (a landscape ``settings`` entry; before ``hessian_method``: power)."""
    iters = settings.get("hessian_iters", "?")
    if settings.get("hessian_method", "power") == "lanczos":
        return f"{iters} Lanczos steps (full reorthogonalisation)"
    return f"power iteration of up to {iters} products (twice that when the dominant eigenvalue is negative)"


def all_weights_section(results: Sequence[dict[str, Any]], folder: Path, root: Path | None = None) -> str:
    """The runs measured over both kinds of directions (``all_weights_seeds``): a table of the three surface metrics
    and the loss range on the grid for each, and one figure with the two contour plots per run; "" if none."""
    pairs = [(r, r["landscape"]["all_weights"]) for r in results
             if "metrics" in ((r.get("landscape") or {}).get("all_weights") or {})]
    # a run whose model another run had (WiSE-FT's alpha-1 copy) got that run's measurement copied: one row pair and
    # one panel per model, the copies named below the table
    copies = [(r["method"], r.get("seed"), every["same_model_as"]) for r, every in pairs if "same_model_as" in every]
    pairs = [(r, every) for r, every in pairs if "same_model_as" not in every]
    if not pairs:
        return ""
    root = Path(root) if root is not None else Path(folder)
    header = ["method", "seed", "directions", "weights moved", "loss at 0"] + [METRICS[m] for m in SURFACE_METRICS]
    header.append("loss range on the grid")
    md = ("\n## Loss surface over the LoRA directions and over all weights\n\n"
          "The same runs, the same held-out blocks, grid and span: directions drawn (filter-normalised) over the "
          "trainable LoRA matrices only, or over every weight of the tuned model.\n\n")
    from forgetless.reporting.report import markdown_table

    table = []
    for r, every in pairs:
        for name, entry in (("LoRA", r["landscape"]), ("all weights", every)):
            metrics = entry.get("metrics") or {}
            if not metrics:
                continue
            cells = [r["method"], r.get("seed"), name, f"{metrics.get('n_params', 0):,}", metrics.get("loss", math.nan)]
            cells += [metrics.get(m, math.nan) for m in SURFACE_METRICS]
            cells.append(_loss_range(root, entry))
            table.append([_fmt(c) for c in cells])
    md += markdown_table(header, table)
    if copies:
        md += "\nNot repeated, the same model as the run named: " + "; ".join(
            f"{method} (seed {seed}) = `{source}`" for method, seed, source in copies) + ".\n"
    figure = plot_surface_pairs(pairs, root, Path(folder) / "surfaces_lora_vs_all.png")
    if figure is not None:
        md += f"\n![LoRA directions (top) and all weights (bottom)]({figure.name})\n"
    return md


def _surface(folder: Path, entry: dict[str, Any]) -> Any:
    from forgetless.landscape import load_surface

    path = Path(folder) / entry["surface"] if entry.get("surface") else None
    return load_surface(path) if path is not None and path.is_file() else None


def _loss_range(folder: Path, entry: dict[str, Any]) -> Any:
    surface = _surface(folder, entry)
    if surface is None:
        return "n/a"
    return float(surface.losses.max() - surface.losses.min())


def plot_surface_pairs(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]], folder: Path, path: Path,
                       most: int = 12, per_row: int = 4) -> Path | None:
    """Contours of up to ``most`` runs, ``per_row`` runs a band: LoRA directions above, all weights below. Each panel
    has its own colour scale (the two differ by orders of magnitude: on one scale the LoRA surface is one colour), and
    its title gives the loss range on the grid; None when no surface file is there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from forgetless.reporting.landscape_plots import mark_origin

    columns = [(r, _surface(folder, r["landscape"]), _surface(folder, every)) for r, every in pairs]
    columns = [c for c in columns if c[1] is not None and c[2] is not None and c[1].dims == c[2].dims == 2][:most]
    if not columns:
        return None
    width = min(per_row, len(columns))
    bands = math.ceil(len(columns) / width)
    fig, axes = plt.subplots(2 * bands, width, figsize=(3.4 * width, 5.6 * bands), squeeze=False,
                             layout="constrained")
    for k, (r, lora, every) in enumerate(columns):
        band, j = divmod(k, width)
        for i, (surface, name) in enumerate(((lora, "LoRA directions"), (every, "all weights"))):
            ax = axes[2 * band + i][j]
            a, b = np.meshgrid(surface.coords[0], surface.coords[1], indexing="ij")
            filled = ax.contourf(a, b, surface.losses, levels=20, cmap="viridis")
            mark_origin(ax, surface, ms=8)
            spread = float(surface.losses.max() - surface.losses.min())
            ax.set_title(f"{r['method']} s{r.get('seed')}: {name}\nloss range {spread:.3g}", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(filled, ax=ax, shrink=0.85).ax.tick_params(labelsize=6)
    for k in range(len(columns), bands * width):  # empty places of the last band
        band, j = divmod(k, width)
        axes[2 * band][j].set_axis_off()
        axes[2 * band + 1][j].set_axis_off()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
