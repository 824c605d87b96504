"""The result tables of an experiment: ``results.md`` and ``results.csv`` (mean ± std over seeds per method and task).

They read the run records (``OUTPUT/runs/*.json``) that :func:`forgetless.experiment.run_experiment` writes and
never touch models or training; ``forgetless report`` (:mod:`forgetless.reporting.report`) builds the fuller report.
A record with a non-finite number (a run that diverged, recorded by an older forgetless) is never shown as a result:
it is left out of the tables, with a note naming it (:func:`finite_record`).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from forgetless.config import ConfigError


# The fields every run record has, and their types (general_ppl is None for a run without held-out text).
RECORD_FIELDS: dict[str, tuple[type, ...]] = {"method": (str,), "task": (str,), "seed": (int,),
                                              "general_ppl": (int, float, type(None)), "tasks": (dict,)}


def record_problem(record: Any) -> str | None:
    """What makes ``record`` not a run record (None: it is one)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name, kinds in RECORD_FIELDS.items():
        if name not in record:
            return f"lacks the field {name!r}"
        if not isinstance(record[name], kinds) or isinstance(record[name], bool):
            return f"its field {name!r} is {type(record[name]).__name__}, not {' or '.join(k.__name__ for k in kinds)}"
    return None


def read_record(path: Path) -> dict[str, Any]:
    """One run record; a corrupt one (an interrupted write, a bad edit, a field missing) is a ConfigError naming it."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: corrupt run record ({err}); delete it to rerun that run") from None
    problem = record_problem(record)
    if problem is not None:
        raise ConfigError(f"{path}: not a run record ({problem}); delete it to rerun that run")
    return record


def load_results(folder: Path) -> list[dict[str, Any]]:
    """Every run record of an experiment folder; a corrupt one is an error naming it. A record without its
    ``run_id`` (an old one) gets its file's name."""
    records = []
    for path in sorted((Path(folder) / "runs").glob("*.json")):
        record = read_record(path)
        record.setdefault("run_id", path.stem)
        records.append(record)
    return records


def finite_record(record: dict[str, Any]) -> bool:
    """True when every score of a run record (general PPL, domain and suite accuracies, those of its variants) is
    finite or absent."""
    values = []
    for scores in [record, *(record.get("variants") or {}).values()]:
        values.append(scores.get("general_ppl"))
        for task in [*(scores.get("tasks") or {}).values(), *(scores.get("suite") or {}).values()]:
            values += [task.get("acc"), task.get("acc_norm")]
    return all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in values)


def nonfinite_note(records: list[dict[str, Any]]) -> str:
    """A line naming the runs left out for a non-finite number ("" when none is)."""
    left = [str(r.get("run_id", r.get("method", "?"))) for r in records if not finite_record(r)]
    if not left:
        return ""
    return (f"\nLeft out: {len(left)} run(s) with a non-finite score (training diverged), never ranked: "
            f"{', '.join(left)}.\n")


def variants_note(records: list[dict[str, Any]]) -> str:
    """A line saying what the row of a method with evaluation variants is ("" when no record has variants): the
    run's own model, alpha = 1 of WiSE-FT, beside the rows of its interpolations."""
    methods = list(dict.fromkeys(r["method"] for r in records if r.get("variants") and "variant_of" not in r))
    if not methods:
        return ""
    return (f"\n{', '.join(f'`{m}`' for m in methods)}: the row of the method itself is its run's domain-tuned model "
            "(alpha = 1, no interpolation; the same model as `lora-nu-mu`'s where the two share their stages); its "
            "interpolations are the rows named after their alpha.\n")


def gathered_note(records: list[dict[str, Any]]) -> str:
    """Lines naming what records gathered from several folders can mix ("" when nothing is): two records of one
    method, task and seed (each would count as a seed of its own), and one method on one task run with other
    settings than the seed (another learning rate, steps or data: its mean would mix them)."""
    import json
    from collections import Counter, defaultdict

    own = [r for r in records if "variant_of" not in r]
    twice = Counter((r.get("method"), r.get("task"), r.get("seed")) for r in own)
    dup = [f"`{m}` on {t}, seed {s} ({n} records)" for (m, t, s), n in twice.items() if n > 1]
    kinds: dict[tuple, set[str]] = defaultdict(set)
    for r in own:
        if isinstance(r.get("settings"), dict):
            # "suite": a record written before session 33 does not say it (and is taken by the experiment): not
            # compared here, where the scoring note compares it among the records that give it
            rest = {k: v for k, v in r["settings"].items() if k not in ("seed", "suite")}
            kinds[(r.get("method"), r.get("task"))].add(json.dumps(rest, sort_keys=True, default=str))
    mixed = [f"`{m}` on {t} ({len(v)} settings)" for (m, t), v in kinds.items() if len(v) > 1]
    note = ""
    if dup:
        more = " ..." if len(dup) > 8 else ""
        note += (f"\n**Duplicate runs:** {len(dup)} method, task and seed have more than one record (gathered from "
                 f"several folders?), and each counts as a seed: {', '.join(dup[:8])}{more}.\n")
    if mixed:
        note += (f"\n**Mixed settings:** records of one method on one task differ in more than their seed (another "
                 f"learning rate, steps, data...), and their means mix them: {', '.join(mixed[:8])}"
                 f"{' ...' if len(mixed) > 8 else ''}. Report each folder on its own, or drop the odd records.\n")
    return note


_UNKNOWN = object()  # a value an older record does not give: matches any (scoring_note leaves it out)


def _scored_on(record: dict[str, Any]) -> dict[str, Any] | None:
    """The settings of a run record that decide what its scores are measured on and how: the model and precision
    (as the run resolved them, when its record says: ``auto`` is bf16 on one machine and fp32 on another),
    the held-out text and block size, the test set, the general suite and the scoring's own options. None for a
    record without settings (an older forgetless)."""
    settings = record.get("settings")
    if not isinstance(settings, dict):
        return None
    general, task, ev = (settings.get(k) if isinstance(settings.get(k), dict) else {} for k in ("general", "task", "eval"))
    computed = record.get("computed") if isinstance(record.get("computed"), dict) else {}
    # an older record (no `computed`) says only what was asked: a pinned precision, or "auto", which is unknown here
    asked = settings.get("precision")
    return {"model": settings.get("model"),
            "precision": computed.get("precision", asked if asked not in (None, "auto") else _UNKNOWN),
            "base dtype": computed.get("base_dtype", _UNKNOWN),
            "chat_template": settings.get("chat_template"), "general.heldout": general.get("heldout"),
            "general.block_size": general.get("block_size"),
            **{f"task.{k}": task.get(k) for k in ("test", "test_split", "test_limit", "schema", "max_length")},
            **{f"eval.{k}": ev.get(k) for k in ("suite", "suite_limit", "share_prefix")},
            # the other tasks' test sets of an auto suite (a record written before session 33 does not say)
            "suite items": settings.get("suite", _UNKNOWN),
            "lm_eval": settings.get("lm_eval")}  # the harness's version defines its suite tasks


def scoring_note(records: list[dict[str, Any]]) -> str:
    """A paragraph naming what differs, task by task, in how the runs were scored ("" when they were scored alike):
    a report that sets side by side runs scored on other items (a `base` run on fewer held-out blocks, say) shows
    differences that training did not make."""
    by_task: dict[str, dict[str, dict[str, list[str]]]] = {}
    for record in records:
        scored = None if "variant_of" in record else _scored_on(record)
        if scored is None:
            continue
        rid = str(record.get("run_id", record.get("method", "?")))
        for key, value in scored.items():
            if value is _UNKNOWN:
                continue
            shown = json.dumps(value, sort_keys=True) if value is not None else "default"
            by_task.setdefault(str(record.get("task")), {}).setdefault(key, {}).setdefault(shown, []).append(rid)
    lines = []
    for task, keys in by_task.items():
        for key, values in keys.items():
            if len(values) > 1:
                parts = [f"{value} ({rids[0]}{f' and {len(rids) - 1} more' if len(rids) > 1 else ''})"
                         for value, rids in sorted(values.items(), key=lambda kv: len(kv[1]))]
                lines.append(f"- task {task}, {key}: {'; '.join(parts)}")
    if not lines:
        return ""
    return ("\n**Not scored alike.** These runs were evaluated with different settings, so part of the differences "
            "below comes from what was scored, not from training:\n" + "\n".join(lines) + "\n")


def _cell(values: list[float], digits: int, full: int = 0) -> str:
    """mean ± std (the value alone for one), with ``(n=K)`` when there are fewer values than ``full`` seeds."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    text = f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return text + (f" (n={len(values)})" if len(values) < full else "")


def summary_table(results: list[dict[str, Any]], methods: list[str] | None = None,
                  tasks: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows: methods; per task: general PPL after tuning on it, acc and acc_norm (mean ± std over seeds).

    A run's evaluation variants (e.g. WiSE-FT's interpolations) get rows of their own, ``method @ variant``,
    right after their method's row.
    """
    methods = methods or list(dict.fromkeys(r["method"] for r in results))
    results, methods = with_variant_records(results, methods)
    tasks = tasks or list(dict.fromkeys(r["task"] for r in results))
    header = ["method"]
    for task in tasks:
        header += [f"{task} general PPL ↓", f"{task} acc ↑", f"{task} acc_norm ↑"]
    header.append("seeds")
    full = len({r["seed"] for r in results})  # a cell over fewer seeds than the experiment's says how many
    rows = []
    for method in methods:
        row = [method]
        seeds = set()
        for task in tasks:
            runs = [r for r in results if r["method"] == method and r["task"] == task]
            seeds |= {r["seed"] for r in runs}
            row += [_cell([r["general_ppl"] for r in runs if r.get("general_ppl") is not None], 3, full),
                    _cell([100 * r["tasks"][task]["acc"] for r in runs], 1, full),
                    _cell([100 * r["tasks"][task]["acc_norm"] for r in runs], 1, full)]
        row.append(str(len(seeds)))
        rows.append(row)
    return header, rows


def variant_records(runs: list[dict[str, Any]], own_labels: bool = False) -> list[dict[str, Any]]:
    """For every evaluation variant of a run (WiSE-FT's interpolations), a record of its own: the run's task, seed,
    model and run id (``RUN_ID@VARIANT``), the variant's scores, ``variant_of`` the run's method, and as method
    ``METHOD @ VARIANT``, or with ``own_labels`` the variant's label where it names the run's method
    (``wise-ft(alpha=0.5)``). It has no stages: the training it comes from is its run's, counted once."""
    from forgetless.reporting.report import parse_label

    out = []
    for run in runs:
        for label, scores in (run.get("variants") or {}).items():
            named = own_labels and parse_label(label)[0][0] == run["method"]
            out.append({k: run[k] for k in ("task", "seed", "model") if k in run}
                       | {k: scores[k] for k in ("general_ppl", "general_ppl_base2", "tasks", "suite") if k in scores}
                       | {"method": label if named else f"{run['method']} @ {label}", "variant_of": run["method"],
                          "run_id": f"{run.get('run_id', run['method'])}@{label}"})
    return out


def with_variant_records(results: list[dict[str, Any]],
                         methods: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """``results`` with their variants' records (:func:`variant_records`), and ``methods`` with each method's
    variants right after it."""
    extra = variant_records([r for r in results if r["method"] in methods])
    order = []
    for method in methods:
        order.append(method)
        order += dict.fromkeys(r["method"] for r in extra if r["variant_of"] == method)
    return results + extra, order


def write_tables(results: list[dict[str, Any]], folder: Path, methods: list[str] | None = None,
                 tasks: list[str] | None = None, note: str = "") -> str:
    """Write ``results.md`` and ``results.csv``; return the Markdown table. Runs with a non-finite score are left
    out, and named in a note; runs scored differently (:func:`scoring_note`) are named in another; ``note``: the
    caller's own (records it left out)."""
    left_out = nonfinite_note(results) + scoring_note(results) + variants_note(results) + note
    header, rows = summary_table([r for r in results if finite_record(r)], methods, tasks)
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    note = ("\nGeneral PPL: e-based token perplexity on the held-out general text (lower is better). "
            "acc / acc_norm: multiple-choice accuracy in %, computed as lm-evaluation-harness does.\n" + left_out)
    (folder / "results.md").write_text(md + note)
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([h.replace(" ↓", "").replace(" ↑", "") for h in header])
        writer.writerows(rows)
    return md
