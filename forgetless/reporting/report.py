"""``forgetless report RESULTS_DIR``: the paper's tables and figures, from an experiment's run records.

It reads the per-run JSON files that :func:`forgetless.experiment.run_experiment` writes (``RESULTS_DIR/runs/*.json``:
one per method x task x seed, with ``general_ppl``, ``tasks[task][acc|acc_norm]`` and per-stage ``seconds`` and
``extras``) and writes ``report.md`` with PNG figures beside it. Sections:

1. the Table 1 analogue: general perplexity (lower is better) and domain accuracy (higher is better) per method and
   task, mean ± std over seeds, best in bold and second underlined;
2. a t-test of every method against a reference method, per metric and task, paired by seed where both ran the
   same seeds (``scipy.stats.ttest_rel``), else Welch's (``ttest_ind(equal_var=False)``), with box plots of the seeds;
3. the cost table: wall time and storage of recording importance (HLoRA's path integral, EWC's Fisher) as the runs
   recorded them in ``extras["importance_cost"]``, and the training time of each method;
4. the sweep of the regularization weight (``phi`` for HLoRA, ``lambda`` for EWC: runs of one method differing only
   in that option) and a Pareto plot of domain accuracy against general perplexity over all methods;
5. the ablation table (``hlora``, ``hlora-no-layer``, ``lora-nu-mu``);
6. forgetting on the general suite (tuned minus ``base``, per suite task and averaged) with a plot of domain gain
   against general-suite drop, and the forgetting curves over training (``eval.every``) with the selected checkpoints
   (:mod:`forgetless.reporting.forgetting`).

A section whose data is absent is replaced by a one-line note. A run with a non-finite score (training diverged, in a
record of an older forgetless) is left out of every section, and named. Reporting reads results only; it never
trains.
"""

from __future__ import annotations

import math
import statistics
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetless.config import ConfigError
from forgetless.reporting.flatness import flatness_section
from forgetless.reporting.forgetting import forgetting_section
from forgetless.reporting.plots import label_points
from forgetless.reporting.tables import (finite_record, gathered_note, nonfinite_note, read_record, scoring_note,
                                        variant_records, variants_note)

CANONICAL_ORDER = ("base", "lora-mu", "lora-nu-mu", "rslora", "ewc", "hlora-no-layer", "hlora")
ABLATION = ("hlora", "hlora-no-layer", "lora-nu-mu")
PPL, ACC, SUITE = "general_ppl", "domain_acc", "suite_change"
METRIC_TITLES = {PPL: "general PPL ↓", ACC: "domain acc ↑", SUITE: "general-suite change ↑"}


# ------------------------------------------------------------------------------------------------ reading
def load_runs(folder: str | Path) -> list[dict[str, Any]]:
    """The run records of an experiment folder (``runs/*.json``: each must be one, else a ConfigError names it), or of
    a folder of such files (other JSON files there are skipped, and a line says which)."""
    import json

    from forgetless.reporting.tables import record_problem

    folder = Path(folder)
    experiment = (folder / "runs").is_dir()
    runs_dir = folder / "runs" if experiment else folder
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{folder}: no such results folder" + (" (this is a file: give the experiment's "
                                                                      "output folder)" if folder.is_file() else ""))
    runs, skipped = [], []
    for path in sorted(runs_dir.glob("*.json")):
        if experiment:
            runs.append(read_record(path))
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            record = None
        problem = record_problem(record)
        if problem is None:
            runs.append(record)
        else:
            skipped.append(f"{path.name} ({problem})")
    if skipped and runs:
        print(f"report: skipped {len(skipped)} JSON file(s) of {runs_dir} that are not run records: "
              f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
    if not runs:
        raise FileNotFoundError(f"no run records (JSON with method, task, general_ppl, tasks) under {runs_dir}")
    return runs


def with_variants(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` and a record of its own for every evaluation variant of a run (WiSE-FT's interpolations), as method
    ``wise-ft(alpha=0.5)`` (:func:`forgetless.reporting.tables.variant_records`)."""
    return list(runs) + variant_records(runs, own_labels=True)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _value(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text


def parse_label(label: str) -> list[tuple[str, dict[str, Any]]]:
    """``"hlora(phi=0.01)+sam"`` -> ``[("hlora", {"phi": 0.01}), ("sam", {})]`` (inverse of ``method_label``)."""
    out = []
    for part in _split_top(label, "+"):
        name, _, rest = part.partition("(")
        options = {}
        if rest.endswith(")") and rest[:-1]:
            for item in _split_top(rest[:-1], ","):
                key, _, value = item.partition("=")
                options[key.strip()] = _value(value.strip())
        out.append((name.strip(), options))
    return out


@dataclass
class Cell:
    """The values of one metric over seeds for one (method, task)."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def text(self, digits: int) -> str:
        if not self.values:
            return "-"
        if len(self.values) == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


class Results:
    """Run records indexed by (method, task, metric); metrics are general PPL and domain accuracy in %."""

    def __init__(self, runs: Sequence[dict[str, Any]], metric: str = "acc") -> None:
        self.runs = list(runs)
        self.metric = metric
        self.tasks = list(dict.fromkeys(r["task"] for r in self.runs))
        self.methods = order_methods(dict.fromkeys(r["method"] for r in self.runs))
        self.seeds = sorted({r.get("seed", 0) for r in self.runs})
        from forgetless.reporting.forgetting import MEAN, forgetting_rows

        # (method, task, seed) -> mean suite change vs base, points (runs with a suite and a base run only)
        self.suite = {(row["method"], row["task"], row["seed"]): row["forgetting"][MEAN]
                      for row in forgetting_rows(self.runs, metric)}

    def runs_of(self, method: str, task: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["method"] == method and (task is None or r["task"] == task)]

    def values(self, method: str, task: str, metric: str) -> list[float]:
        return [value for _, value in self.seeded(method, task, metric)]

    def seeded(self, method: str, task: str, metric: str) -> list[tuple[int, float]]:
        """``(seed, value)`` of each run of ``method`` on ``task`` that has ``metric``, by seed."""
        out = []
        for r in sorted(self.runs_of(method, task), key=lambda r: r.get("seed", 0)):
            seed = r.get("seed", 0)
            if metric == PPL:
                if r.get("general_ppl") is not None:  # a run without held-out text (forgetless train) has none
                    out.append((seed, float(r["general_ppl"])))
            elif metric == SUITE:
                key = (r["method"], r["task"], seed)
                if key in self.suite:
                    out.append((seed, self.suite[key]))
            else:
                scores = r["tasks"].get(task, {})
                if self.metric in scores:
                    out.append((seed, 100.0 * float(scores[self.metric])))
        return out

    def cell(self, method: str, task: str, metric: str) -> Cell:
        return Cell(self.values(method, task, metric))


def order_methods(methods: Sequence[str]) -> list[str]:
    """The paper's order (base, lora-mu, lora-nu-mu, rslora, ewc, hlora-no-layer, hlora), variants after their
    method, anything else last."""
    def key(label: str) -> tuple[int, int, str]:
        first = parse_label(label.partition(" @ ")[0])[0][0]
        rank = CANONICAL_ORDER.index(first) if first in CANONICAL_ORDER else len(CANONICAL_ORDER)
        return rank, 0 if label == first else 1, label

    return sorted(methods, key=key)


# ------------------------------------------------------------------------------------------------- tables
def rank_marks(means: dict[str, float], lower_is_better: bool) -> dict[str, str]:
    """``"best"`` / ``"second"`` per method by mean, in competition ranking (1 + the methods strictly better: ties
    share a rank, and two tied for best leave no second); NaN means are not ranked."""
    finite = [m for m in means.values() if not math.isnan(m)]
    marks = {}
    for method, mean in means.items():
        if math.isnan(mean):
            continue
        better = sum(other < mean if lower_is_better else other > mean for other in finite)
        if better < 2:
            marks[method] = ("best", "second")[better]
    return marks


def _decorate(text: str, mark: str | None) -> str:
    if mark == "best":
        return f"**{text}**"
    if mark == "second":
        return f"<u>{text}</u>"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_table(res: Results, methods: Sequence[str], rank_base: bool = False) -> str:
    """Per method and task: general PPL and domain accuracy, mean ± std; best bold, second underlined (per column,
    over the methods shown; ``base`` is shown but not ranked unless ``rank_base``)."""
    header = ["method"] + [f"{task} {METRIC_TITLES[m]}" for task in res.tasks for m in (PPL, ACC)] + ["seeds"]
    full = len(res.seeds)  # a cell over fewer seeds says so and is not ranked: its mean is not the others' kind
    marks: dict[tuple[str, str], dict[str, str]] = {}
    for task in res.tasks:
        for metric in (PPL, ACC):
            digits = 2 if metric == PPL else 1  # ranked as shown: cells that print alike share a mark
            ranked = {m: float(f"{res.cell(m, task, metric).mean:.{digits}f}") for m in methods
                      if (rank_base or m != "base") and len(res.cell(m, task, metric).values) == full}
            marks[(task, metric)] = rank_marks(ranked, lower_is_better=metric == PPL)
    rows = []
    for method in methods:
        row = [method]
        for task in res.tasks:
            for metric in (PPL, ACC):
                cell = res.cell(method, task, metric)
                text = cell.text(2 if metric == PPL else 1)
                if 0 < len(cell.values) < full:
                    text += f" (n={len(cell.values)})"
                row.append(_decorate(text, marks[(task, metric)].get(method)))
        row.append(str(len({r.get("seed", 0) for r in res.runs_of(method)})))
        rows.append(row)
    return markdown_table(header, rows)


def tested_metrics(res: Results) -> tuple[str, ...]:
    """General PPL and domain accuracy, and the general-suite change when the runs were scored on a suite."""
    return (PPL, ACC, SUITE) if res.suite else (PPL, ACC)


TESTS = ("paired", "welch")  # build_report's ``test``: paired by seed where it can be, or Welch's throughout


def significance_tests(res: Results, reference: str, test: str = "paired") -> list[dict[str, Any]]:
    """A two-sided t-test of every method against ``reference``, per task and metric (:func:`tested_metrics`).

    Paired by seed (``scipy.stats.ttest_rel``) where both sides ran the same seeds, two or more, each once: runs of
    one seed share the data order, the LoRA initialization and the cached general stage, so the seed-to-seed spread
    they share is not evidence against a difference (Welch's test counted it, and a gain of one point on every one
    of five seeds got p = 0.85). Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) otherwise, and
    throughout with ``test="welch"`` (the reports of docs/results were written so). With three seeds the paired test
    has 2 degrees of freedom against Welch's about 4: where the seeds share little, it gives the larger p.

    Rows: ``{method, task, metric, diff, t, p, n, n_ref, test}`` with ``diff = mean(method) - mean(reference)`` and
    ``test`` "paired" or "welch"; ``t`` and ``p`` are NaN when either side has fewer than two seeds, or when nothing
    varies (paired: the differences are equal on every seed; Welch: both sides are constant).
    """
    from scipy.stats import ttest_ind, ttest_rel

    rows = []
    for method in res.methods:
        if method == reference:
            continue
        for task in res.tasks:
            for metric in tested_metrics(res):
                ours, theirs = res.seeded(method, task, metric), res.seeded(reference, task, metric)
                if not ours or not theirs:
                    continue
                a, b = [v for _, v in ours], [v for _, v in theirs]
                seeds = [s for s, _ in ours]
                paired = test == "paired" and seeds == [s for s, _ in theirs] and len(set(seeds)) == len(seeds)
                diffs = [x - y for x, y in zip(a, b)]
                t = p = math.nan
                # without variance (seeds that tie on a small test set): scipy says t = +-inf, p = 0, which no test
                # of such samples supports; NaN as documented
                if len(a) >= 2 and len(b) >= 2:
                    varies = (statistics.variance(diffs) > 0 if paired
                              else statistics.variance(a) > 0 or statistics.variance(b) > 0)
                    if varies:
                        with warnings.catch_warnings():  # equal samples (WiSE-FT's alpha 1 is lora-nu-mu): t 0,
                            warnings.simplefilter("ignore", RuntimeWarning)  # p 1, with scipy's "precision loss"
                            found = ttest_rel(a, b) if paired else ttest_ind(a, b, equal_var=False)
                        t, p = float(found.statistic), float(found.pvalue)
                rows.append({"method": method, "task": task, "metric": metric,
                             "diff": statistics.fmean(a) - statistics.fmean(b), "t": t, "p": p,
                             "n": len(a), "n_ref": len(b), "test": "paired" if paired else "welch"})
    return rows


def _p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3g}"


# --------------------------------------------------------------------------------------------- sections
def section_main_table(res: Results, rank_base: bool) -> str:
    note = ("" if rank_base else " `base` (no tuning) is shown for reference and not ranked.")
    return ("## Main results (Table 1 analogue)\n\n"
            f"General PPL: perplexity of the held-out general text after tuning (lower is better). Domain acc: "
            f"multiple-choice `{res.metric}` on the task's test set, in % (higher is better). Mean ± std over seeds "
            f"({', '.join(map(str, res.seeds))}); **best** in bold, <u>second</u> underlined per column; a cell over "
            f"fewer seeds says n= and is not ranked.{note}\n\n"
            + results_table(res, res.methods, rank_base))


def section_significance(res: Results, reference: str | Sequence[str] | None, folder: Path,
                         test: str = "paired") -> str:
    references = [reference] if isinstance(reference, str) else list(reference or [])
    title = f"## Significance: t-tests against {'a reference' if len(references) < 2 else 'references'}\n\n"
    if not references:
        return title + "Skipped: no reference method (give `--reference`; the defaults are absent).\n"
    parts = [_significance_table(res, ref, test) for ref in references]
    if not any(table for table, _ in parts):
        return title + "".join(note for _, note in parts)
    figures = []
    for metric in tested_metrics(res):
        name = f"box_{metric}.png"
        plot_boxes(res, metric, folder / name)
        figures.append(f"![{METRIC_TITLES[metric]} per method]({name})")
    suite = (" General-suite change: the mean over the suite tasks of the run's score minus `base`'s (same items), "
             "in points; negative is forgetting." if SUITE in tested_metrics(res) else "")
    return (title + "Δ: mean of the method minus mean of the reference (PPL in perplexity points, accuracy in "
            "percentage points); p: two-sided "
            + ("t-test over seeds, paired by seed where both sides ran the same seeds (`scipy.stats.ttest_rel`: runs "
               "of one seed share data order, LoRA initialization and general stage), else Welch's "
               "(`scipy.stats.ttest_ind(equal_var=False)`, the cell says Welch); " if test == "paired" else
               "Welch's t-test over seeds (`scipy.stats.ttest_ind(equal_var=False)`; `--test paired` pairs runs by "
               "seed); ") +
            f"n/a with fewer than two seeds on a side (a table where no method can be tested gives the differences "
            f"alone), or when nothing varies over the seeds (paired: the difference is the same on every seed); a "
            f"cell over other seed counts than the rest says them (n = method/reference).{suite}\n\n"
            + "".join(table or note for table, note in parts)
            + "\n".join(figures) + "\n")


def _significance_table(res: Results, reference: str, test: str = "paired") -> tuple[str, str]:
    """(Markdown table of the tests against ``reference``, or "" and a one-line note saying why there is none)."""
    if reference not in res.methods:
        return "", f"Skipped: the reference method `{reference}` has no runs here.\n\n"
    rows = significance_tests(res, reference, test)
    if not rows:
        return "", f"Skipped: no method shares a task with `{reference}`.\n\n"
    metrics = tested_metrics(res)
    full = len(res.seeds)
    # one seed on every side: no test can run, so the table holds the differences alone (not a column of "n/a")
    untestable = all(r["n"] < 2 or r["n_ref"] < 2 for r in rows)
    header = ["method"] + [f"{task} {METRIC_TITLES[m]}: Δ{'' if untestable else ' (p)'}"
                           for task in res.tasks for m in metrics]
    table = []
    for method in res.methods:
        if method == reference:
            continue
        row, found = [method], False
        for task in res.tasks:
            for metric in metrics:
                hit = [r for r in rows if r["method"] == method and r["task"] == task and r["metric"] == metric]
                if hit:
                    found = True
                    digits = 2 if metric == PPL else 1
                    counts = "" if (hit[0]["n"], hit[0]["n_ref"]) == (full, full) else \
                        f", n={hit[0]['n']}/{hit[0]['n_ref']}"
                    diff = f"{hit[0]['diff']:+.{digits}f}"
                    if untestable:
                        row.append(f"{diff} ({counts[2:]})" if counts else diff)
                    else:
                        welch = ", Welch" if (test == "paired" and hit[0]["test"] == "welch"
                                              and not math.isnan(hit[0]["p"])) else ""  # among paired cells
                        row.append(f"{diff} (p={_p_text(hit[0]['p'])}{counts}{welch})")
                else:
                    row.append("-")
        if found:
            table.append(row)
    note = ("No p-values: every method or the reference has fewer than two seeds here (run more seeds for a test); "
            "the table gives the differences alone.\n\n" if untestable else "")
    return f"### Against `{reference}`\n\n" + note + markdown_table(header, table) + "\n", ""


def _importance_costs(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    costs: dict[str, dict[str, Any]] = {}
    for stage in run.get("stages", []):
        for name, cost in ((stage.get("extras") or {}).get("importance_cost") or {}).items():
            costs[name] = cost
    return costs


def _stage_seconds(run: dict[str, Any], stage: str) -> float | None:
    found = [float(s["seconds"]) for s in run.get("stages", []) if s.get("stage") == stage and "seconds" in s]
    return sum(found) if found else None


def _mean_text(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    return Cell(values).text(digits)


def section_cost(res: Results) -> str:
    title = "## Cost: importance and training time\n\n"
    trained = [m for m in res.methods if any(r.get("stages") for r in res.runs_of(m))]
    if not trained:
        return title + "Skipped: no run recorded training stages.\n"
    header = ["method", "importance", "importance time (s)", "importance storage (MiB)", "general stage (s)",
              "domain stage (s)", "training total (s)", "runs"]
    rows = []
    totals: dict[str, dict[str, list[float]]] = {}
    for method in trained:
        runs = res.runs_of(method)
        kinds = list(dict.fromkeys(k for r in runs for k in _importance_costs(r)))
        what, secs, size = [], [], []
        for kind in kinds:
            costs = [_importance_costs(r)[kind] for r in runs if kind in _importance_costs(r)]
            s = [float(c["seconds"]) for c in costs if "seconds" in c]
            b = [float(c["bytes"]) / 2**20 for c in costs if "bytes" in c]
            totals.setdefault(kind, {"seconds": [], "mib": []})
            totals[kind]["seconds"] += s
            totals[kind]["mib"] += b
            what.append(f"{kind}: {costs[0].get('what', '')}".rstrip(": "))
            secs.append(_mean_text(s, 2))
            size.append(_mean_text(b, 2))
        general = [v for v in (_stage_seconds(r, "general") for r in runs) if v is not None]
        domain = [v for v in (_stage_seconds(r, "domain") for r in runs) if v is not None]
        total = [sum(float(s.get("seconds", 0.0)) for s in r.get("stages", [])) for r in runs if r.get("stages")]
        rows.append([method, "<br>".join(what) or "-", "<br>".join(secs) or "-", "<br>".join(size) or "-",
                     _mean_text(general), _mean_text(domain), _mean_text(total), str(len(runs))])
    text = (title + "Mean ± std over runs. Importance: what the method computes on the general stage to regularize "
            "the domain stage, its wall time and the size of what it keeps (tensor payload in the storage dtype; the "
            "file on disk adds a small header). Stage times include that computation. A general or domain stage "
            "reused from the cache (wise-ft's domain stage is lora-nu-mu's), and an EWC Fisher kept beside it by an "
            "earlier run, report the time they took when they were "
            "computed (the stage time of a run that read a kept Fisher does not include it).\n\n" + markdown_table(header, rows))
    resumed = {str(r.get("run_id", r["method"])): (s.get("extras") or {}).get("seconds_before_resume")
               for method in trained for r in res.runs_of(method) for s in r.get("stages", [])
               if "resumed_from_step" in (s.get("extras") or {}) and not s.get("cached")}
    if resumed:
        unknown = sorted(rid for rid, seconds in resumed.items() if seconds is None)
        text += (f"\nResumed from a checkpoint: {', '.join(f'`{rid}`' for rid in sorted(resumed))}; their stage times "
                 "include the sessions before the resume"
                 + (f", except for {', '.join(f'`{rid}`' for rid in unknown)}, whose checkpoint (an older version's) did "
                    "not keep its time: theirs are lower bounds" if unknown else "") + ".\n")
    if "hlora" in totals and "ewc" in totals and totals["hlora"]["seconds"] and totals["ewc"]["seconds"]:
        h_s, e_s = statistics.fmean(totals["hlora"]["seconds"]), statistics.fmean(totals["ewc"]["seconds"])
        h_b, e_b = statistics.fmean(totals["hlora"]["mib"]), statistics.fmean(totals["ewc"]["mib"])
        text += (f"\nHLoRA's importance took {h_s:.3g} s against {e_s:.3g} s for EWC's Fisher "
                 f"({e_s / h_s:.3g}× as long for EWC) and keeps {h_b:.3g} MiB against {e_b:.3g} MiB "
                 f"(HLoRA's is {100 * h_b / e_b:.0f}% of EWC's).\n")
    return text


def _weight_options() -> dict[str, tuple[str, float]]:
    """method -> (weight option, the weight of a run that did not write it). A record's identity lists the options
    written and those whose default changed since identities were fixed (``option(..., was=...)``), so a run whose
    record lacks the weight was made at the default of that time (:meth:`Options.identity_default`)."""
    from forgetless.methods import REGISTRY

    out = {}
    for name, spec in REGISTRY.items():
        if spec.weight_option is not None:
            option = spec.weight_option[0]
            out[name] = (option, spec.options.identity_default(option))
    return out


def _recorded_options(res: Results, label: str, parsed: dict[str, Any]) -> dict[str, Any]:
    """The options of a one-method run as its record's identity has them (the label's plus any default that had
    changed when it ran); the label's alone for records without settings (an older forgetless)."""
    for run in res.runs_of(label):
        entries = (run.get("settings") or {}).get("method")
        if isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], dict):
            return {k: v for k, v in entries[0].items() if k != "name"}
    return parsed


def sweep_families(res: Results) -> dict[tuple[str, tuple], list[tuple[float, str]]]:
    """Runs of one method differing only in its regularization weight: ``{(name, other options): [(weight, label)]}``,
    only families with at least two distinct weights. Options are read from the runs' records where they have them
    (:func:`_recorded_options`); a run without the weight counts at the default it ran under."""
    weights = _weight_options()
    aliases = {"lam": "lambda"}
    families: dict[tuple[str, tuple], list[tuple[float, str]]] = {}
    for label in res.methods:
        parts = parse_label(label)
        if len(parts) != 1 or parts[0][0] not in weights:
            continue
        name, options = parts[0]
        option, default = weights[name]
        options = {aliases.get(k, k): v for k, v in _recorded_options(res, label, options).items()}
        try:
            weight = float(options.pop(option, default))
        except (TypeError, ValueError):
            continue
        key = (name, tuple(sorted((k, str(v)) for k, v in options.items())))
        families.setdefault(key, []).append((weight, label))
    return {k: sorted(v) for k, v in families.items() if len({w for w, _ in v}) >= 2}


def sweep_tasks(res: Results, families: dict[tuple[str, tuple], list[tuple[float, str]]]) -> list[str]:
    """The tasks on which some family has runs at two or more weights (a sweep may be run on one task only)."""
    return [task for task in res.tasks
            if any(len({w for w, label in members if res.values(label, task, ACC)}) >= 2 for members in families.values())]


def section_sweep(res: Results, folder: Path) -> str:
    title = "## Sweep of the regularization weight\n\n"
    families = sweep_families(res)
    if not families:
        return title + ("Skipped: no method was run at two or more values of its regularization weight "
                        "(`phi` for hlora / hlora-no-layer, `lambda` for ewc, `rho` for sam).\n")
    weights = _weight_options()
    tasks = sweep_tasks(res, families)
    header = ["method", "weight"] + [f"{task} {METRIC_TITLES[m]}" for task in tasks for m in (ACC, PPL)]
    rows = []
    for (name, _), members in families.items():
        for weight, label in members:
            row = [label, f"{weights[name][0]}={weight:g}"]
            for task in tasks:
                row += [res.cell(label, task, ACC).text(1), res.cell(label, task, PPL).text(2)]
            rows.append(row)
    plot_sweep(res, families, folder / "sweep.png", tasks)
    return (title + "Runs of one method that differ only in its regularization weight (a run without the option "
            "counts at the default it ran under). Mean ± std over seeds.\n\n" + markdown_table(header, rows)
            + "\n![domain accuracy and general PPL against the regularization weight](sweep.png)\n")


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Methods not dominated in (general PPL lower, domain accuracy higher), ordered by PPL."""
    front = []
    for m, (ppl, acc) in points.items():
        dominated = any(p2 <= ppl and a2 >= acc and (p2 < ppl or a2 > acc) for m2, (p2, a2) in points.items() if m2 != m)
        if not dominated:
            front.append(m)
    return sorted(front, key=lambda m: (points[m][0], -points[m][1]))


def _task_points(res: Results, task: str) -> dict[str, tuple[float, float]]:
    points = {}
    for m in res.methods:
        ppl, acc = res.cell(m, task, PPL).mean, res.cell(m, task, ACC).mean
        if not (math.isnan(ppl) or math.isnan(acc)):
            points[m] = (ppl, acc)
    return points


def section_pareto(res: Results, folder: Path) -> str:
    title = "## Pareto front: domain accuracy against general perplexity\n\n"
    fronts = {task: pareto_front(_task_points(res, task)) for task in res.tasks}
    if not any(fronts.values()):
        return title + "Skipped: no run has both a general PPL and a domain accuracy.\n"
    plot_pareto(res, folder / "pareto.png")
    lines = [f"- **{task}**: " + ", ".join(f"`{m}`" for m in front) for task, front in fronts.items() if front]
    return (title + "Mean over seeds per method; a method is on the front when no other method has both a lower "
            "or equal general PPL and a higher or equal domain accuracy (one of them strictly).\n\n"
            + "\n".join(lines) + "\n\n![Pareto plot](pareto.png)\n")


def section_ablation(res: Results) -> str:
    title = "## Ablation: layer-wise and element-wise regularization\n\n"
    present = [m for m in ABLATION if m in res.methods]
    if len(present) < 2 or "hlora" not in present:
        return title + ("Skipped: needs `hlora` and at least one of `hlora-no-layer`, `lora-nu-mu` "
                        f"(found: {', '.join(present) or 'none'}).\n")
    return (title + "`hlora`: element-wise importance and layer coefficients; `hlora-no-layer`: element-wise only "
            "(uniform layer coefficients); `lora-nu-mu`: no regularization (the same general-then-domain stages). "
            "Best in bold, second underlined among these.\n\n" + results_table(res, present, rank_base=True))


# ------------------------------------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_boxes(res: Results, metric: str, path: Path) -> Path:
    """One panel per task: a box per method over seeds, with the seeds as points."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(res.tasks), figsize=(max(4.5, 0.9 * len(res.methods) + 1.5) * len(res.tasks), 4),
                             squeeze=False)
    for ax, task in zip(axes[0], res.tasks):
        data = [res.values(m, task, metric) for m in res.methods]
        keep = [(m, d) for m, d in zip(res.methods, data) if d]
        if keep:
            ax.boxplot([d for _, d in keep], widths=0.5)
            for i, (_, d) in enumerate(keep, 1):
                ax.scatter([i] * len(d), d, s=14, color="black", zorder=3)
            ax.set_xticks(range(1, len(keep) + 1), [m for m, _ in keep], rotation=30, ha="right", fontsize=8)
        ax.set_title(task)
        ax.set_ylabel({PPL: "general perplexity (lower is better)",
                       SUITE: "general-suite change vs base, points (higher is better)"}.get(
                           metric, f"domain {res.metric}, % (higher is better)"))
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_sweep(res: Results, families: dict[tuple[str, tuple], list[tuple[float, str]]], path: Path,
               tasks: Sequence[str] | None = None) -> Path:
    """Rows: domain accuracy and general PPL; columns: tasks; one line per family against its weight (log x), and
    grey lines at ``base``, ``lora-nu-mu`` and ``lora-mu`` where they were run."""
    plt = _pyplot()
    tasks = list(tasks or res.tasks)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.8 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        for row, metric in enumerate((ACC, PPL)):
            ax = axes[row][col]
            for (name, others), members in families.items():
                xs = [w for w, _ in members]
                cells = [res.cell(label, task, metric) for _, label in members]
                label = name + (" (" + ", ".join(f"{k}={v}" for k, v in others) + ")" if others else "")
                ax.errorbar(xs, [c.mean for c in cells], yerr=[0 if math.isnan(c.std) else c.std for c in cells],
                            marker="o", capsize=3, label=label)
            for reference, style in (("base", ":"), ("lora-nu-mu", "--"), ("lora-mu", "-.")):
                cell = res.cell(reference, task, metric)
                if reference in res.methods and not math.isnan(cell.mean):
                    ax.axhline(cell.mean, color="grey", ls=style, lw=1, label=reference)
            if all(w > 0 for members in families.values() for w, _ in members):
                ax.set_xscale("log")
            ax.set_xlabel("regularization weight (phi / lambda / rho)")
            ax.set_ylabel(f"domain {res.metric}, %" if metric == ACC else "general PPL")
            ax.set_title(task)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


def plot_pareto(res: Results, path: Path) -> Path:
    """Per task: every method's mean (general PPL, domain accuracy); the Pareto front is ringed and joined."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(res.tasks), figsize=(5.5 * len(res.tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], res.tasks):
        points = _task_points(res, task)
        front = pareto_front(points)
        for m, (ppl, acc) in points.items():
            ax.scatter([ppl], [acc], s=30, color="tab:red" if m in front else "tab:blue", zorder=3)
        ax.margins(0.12)
        label_points(ax, points)
        if front:  # ringed (a one-method front has no line for the legend to show)
            xs, ys = [points[m][0] for m in front], [points[m][1] for m in front]
            ax.scatter(xs, ys, s=120, facecolors="none", edgecolors="tab:red", zorder=3, label="Pareto front")
            if len(front) > 1:
                ax.step(xs, ys, where="post", color="tab:red", lw=1)
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(task)
        ax.set_xlabel("general perplexity (lower is better)")
        ax.set_ylabel(f"domain {res.metric}, % (higher is better)")
        ax.grid(alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------- report
def _experiment_folder(results_dir: str | Path) -> Path:
    """The folder that a run record's relative paths (``landscape/...``) start from."""
    folder = Path(results_dir)
    return folder if (folder / "runs").is_dir() else folder.parent


def build_report(results_dir: str | Path, output: str | Path | None = None,
                 reference: str | Sequence[str] | None = ("lora-mu", "lora-nu-mu"),
                 metric: str = "acc", rank_base: bool = False, test: str = "paired") -> Path:
    """Write ``report.md`` and its figures to ``output`` (default ``RESULTS_DIR/report``); return its path. ``test``:
    the significance test (:func:`significance_tests`), "paired" (by seed, where both sides ran the same seeds) or
    "welch"."""
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be 'acc' or 'acc_norm', got {metric!r}")
    if test not in TESTS:
        raise ValueError(f"test must be one of {list(TESTS)}, got {test!r}")
    runs = with_variants(load_runs(results_dir))
    finite = [r for r in runs if finite_record(r)]
    if not finite:
        raise ConfigError(f"{results_dir}: every run record has a non-finite score; nothing to report")
    res = Results(finite, metric=metric)
    folder = Path(output) if output is not None else Path(results_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    models = sorted({str(r.get("model", "?")) for r in res.runs})
    scoring = scoring_note(runs)
    gathered = gathered_note(runs)
    head = (f"# Report: {Path(results_dir).resolve().name}\n\n"
            f"{sum('variant_of' not in r for r in res.runs)} runs"
            + (f" (and {sum('variant_of' in r for r in res.runs)} evaluation variants of them, e.g. WiSE-FT's "
               f"interpolations, as methods of their own)" if any('variant_of' in r for r in res.runs) else "")
            + f"; model {', '.join(models)}; tasks {', '.join(res.tasks)}; "
            f"seeds {', '.join(map(str, res.seeds))}; methods {', '.join(f'`{m}`' for m in res.methods)}.\n"
            + nonfinite_note(runs) + scoring + gathered + variants_note(runs))
    if gathered:
        print("report: some records repeat a method, task and seed, or one method's records differ in more than "
              "their seed; report.md names them", file=sys.stderr)
    if scoring:
        print("report: the runs were not scored alike (held-out text, test items, suite, model or precision differ); "
              "report.md says how", file=sys.stderr)
    sections = [section_main_table(res, rank_base), section_significance(res, reference, folder, test),
                section_cost(res), section_sweep(res, folder), section_pareto(res, folder), section_ablation(res),
                forgetting_section(res.runs, folder, res.methods, metric),
                flatness_section(res.runs, folder, res.methods, root=_experiment_folder(results_dir), metric=metric)]
    path = folder / "report.md"
    path.write_text(head + "\n" + "\n".join(sections))
    return path


__all__ = ["build_report", "load_runs", "with_variants", "parse_label", "significance_tests", "rank_marks",
           "pareto_front", "sweep_families", "results_table", "Results"]
