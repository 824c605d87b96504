"""Time and scores of the rerun's records, beside the lr 3e-3 experiment's (same YAML but for what experiment.yaml
lists). From the repository's root, at any point of the run (it reads what is recorded):

    python docs/results/forgetting-rerun/scripts/summary.py

Time: worker-seconds summed from the records (a run's own `seconds`: its training, a general stage when this run
trained it, its evaluations; its landscape's `seconds`, LoRA directions and all weights), and that sum over two
workers, which is the wall time when the two stay busy. Model loading between measurements is not in the records.
Scores: mean over the seeds recorded, per method (WiSE-FT's interpolations are the records' `variants`).
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path("docs/results")
NEW, OLD = ROOT / "forgetting-rerun/runs/runs", ROOT / "forgetting-lr3e-3/runs/runs"


def records(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def suite_mean(scores: dict, metric: str) -> float | None:
    values = [v[metric] for v in (scores.get("suite") or {}).values()]
    return 100 * statistics.fmean(values) if values else None


def rows(recs: dict[str, dict]) -> dict[str, dict[str, list[float]]]:
    """method label -> measure -> values over seeds (WiSE-FT's variants as methods of their own)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in recs.values():
        entries = [(rec["method"], rec)] + [(label, v) for label, v in (rec.get("variants") or {}).items()]
        for label, scores in entries:
            task = (scores.get("tasks") or {}).get("arc_easy", {})
            for name, value in (("PPL", scores.get("general_ppl")), ("acc", task.get("acc")),
                                ("acc_norm", task.get("acc_norm"))):
                if value is not None:
                    out[label][name].append(value if name == "PPL" else 100 * value)
            for metric in ("acc", "acc_norm"):
                if (mean := suite_mean(scores, metric)) is not None:
                    out[label][f"suite {metric}"].append(mean)
    return out


def timing(recs: dict[str, dict]) -> None:
    """A general stage is counted once, from whichever record holds it (a run that resumed after the stage was
    cached shows it as cached); a run's own seconds are the rest of its record's, earlier sessions included."""
    parts = defaultdict(float)
    stages = {}
    for rid, rec in recs.items():
        own = rec["seconds"]
        for stage in rec["stages"]:
            if stage["stage"] == "general":
                stages[rec.get("general_stage", rid)] = stage["seconds"]
                own -= 0.0 if stage.get("cached") else stage["seconds"]
            if stage["stage"] == "domain" and not stage.get("cached"):  # a cached one is another run's time
                parts["  of which domain stages"] += stage["seconds"]
        parts["runs: domain stages and evaluations"] += own
        land = rec.get("landscape") or {}
        parts["landscape, LoRA directions"] += land.get("seconds", 0.0)
        parts["landscape, all weights"] += (land.get("all_weights") or {}).get("seconds", 0.0)
    parts["general stages"] = sum(stages.values())
    total = sum(v for k, v in parts.items() if not k.startswith("  "))
    print(f"{len(recs)} records; {len(stages)} general stages in them")
    for name, seconds in parts.items():
        print(f"  {name:38s} {seconds / 3600:6.2f} worker-h")
    print(f"  {'total':38s} {total / 3600:6.2f} worker-h = {total / 7200:.2f} h on two workers")


def quiet_estimate(recs: dict[str, dict]) -> None:
    """The experiment as ``experiment.yaml`` now sets it, on a quiet machine: for each method, its fastest seed
    (the least contended) times its number of seeds, for the runs (training and evaluations), the general stages
    (per kind) and the two landscape measurements. WiSE-FT's domain stage is left out of its runs' time: since
    session 29 it takes lora-nu-mu's from the cache (it trained its own when these records were made); so is the
    measurement of a model already measured (``same_model_as``)."""
    own, general, lora, every, wise_domain = (defaultdict(list) for _ in range(5))
    for rec in recs.values():
        method, seconds = rec["method"], rec["seconds"]
        for stage in rec["stages"]:
            if stage["stage"] == "general" and not stage.get("cached"):
                seconds -= stage["seconds"]
                general[rec.get("general_stage", "?")].append(stage["seconds"])  # one per kind and seed
            if method == "wise-ft" and stage["stage"] == "domain" and not stage.get("cached"):
                seconds -= stage["seconds"]
                wise_domain[method].append(stage["seconds"])
        own[method].append(seconds)
        land = rec.get("landscape") or {}
        if "metrics" in land and "same_model_as" not in land:
            lora[method].append(land["seconds"])
        if "metrics" in (land.get("all_weights") or {}) and "same_model_as" not in land["all_weights"]:
            every[method].append(land["all_weights"]["seconds"])
    parts = {
        "runs (fastest seed x seeds)": sum(min(v) * len(v) for v in own.values()),
        "general stages (each as recorded)": sum(v[0] for v in general.values()),
        "landscape, LoRA directions": sum(min(v) * len(v) for v in lora.values()),
        "landscape, all weights": sum(min(v) * len(v) for v in every.values()),
    }
    total = sum(parts.values())
    print("\nquiet estimate of experiment.yaml as it stands (fastest seed per method):")
    for name, seconds in parts.items():
        print(f"  {name:38s} {seconds / 3600:6.2f} worker-h")
    print(f"  {'total':38s} {total / 3600:6.2f} worker-h = {total / 7200:.2f} h on two workers "
          f"(WiSE-FT's {len(wise_domain['wise-ft'])} domain stages, {sum(wise_domain['wise-ft']) / 3600:.2f} "
          f"worker-h as recorded, left out: cached since session 29)")
    print("  per method, fastest seed (s): "
          + ", ".join(f"{m} {min(v):.0f}" for m, v in own.items())
          + "; LoRA landscape " + ", ".join(f"{m} {min(v):.0f}" for m, v in lora.items()))


def main() -> None:
    new, old = records(NEW), records(OLD)
    if not new:
        sys.exit(f"no records in {NEW}")
    timing(new)
    quiet_estimate(new)
    a, b = rows(new), rows(old)
    base_new = a.get("base")
    print("\nmethod: rerun mean (seeds) | lr 3e-3 mean, per measure; suite in points")
    for label in a:
        cells = []
        for name in ("PPL", "acc", "acc_norm", "suite acc", "suite acc_norm"):
            x, y = a[label].get(name, []), b.get(label, {}).get(name, [])
            if x:
                cells.append(f"{name} {statistics.fmean(x):.2f} ({len(x)}) | {statistics.fmean(y):.2f}" if y else
                             f"{name} {statistics.fmean(x):.2f} ({len(x)})")
        print(f"  {label:22s} " + "; ".join(cells))
    if base_new and "lora-mu" in a:
        mu = a["lora-mu"]
        print("\nlora-mu against base (item 3): "
              f"PPL {100 * (statistics.fmean(mu['PPL']) / base_new['PPL'][0] - 1):+.1f} %, "
              f"ARC acc {statistics.fmean(mu['acc']) - base_new['acc'][0]:+.1f}, "
              f"acc_norm {statistics.fmean(mu['acc_norm']) - base_new['acc_norm'][0]:+.1f} points "
              f"({len(mu['PPL'])} seeds)")


if __name__ == "__main__":
    main()
