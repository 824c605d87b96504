"""The Hessian's extreme eigenvalues by Lanczos (20 steps) for every distinct tuned model of this experiment, and their
Spearman correlation with the PPL increase, beside the first measurement's power-iteration top eigenvalue
(``landscape-power.jsonl``) and the 10-step Lanczos one the records hold since session 29.

The first measurement's top eigenvalue (shifted power iteration, 10 products, 20 when the dominant eigenvalue is
negative) did not converge in 8 of the 27 models (relative residual >= 0.5). This measures the same objective (the
experiment's landscape settings: 4 held-out blocks, fp32, the LoRA parameters, seed 0) with ``hessian_lanczos``.
Resumable: one JSON line per run in ``lanczos.jsonl``, runs already there are skipped. Needs the runs' adapters (the
machine that ran the experiment). From the repository's root, two shards at once, then the table:

    OMP_NUM_THREADS=1 python docs/results/forgetting-rerun/scripts/lanczos_all.py --shard 0/2 &
    OMP_NUM_THREADS=1 python docs/results/forgetting-rerun/scripts/lanczos_all.py --shard 1/2
    python docs/results/forgetting-rerun/scripts/lanczos_all.py --table
"""
import argparse
import json
import time
from pathlib import Path

ROOT = Path("docs/results/forgetting-rerun")
OUT = ROOT / "lanczos.jsonl"


def records() -> dict[str, dict]:
    """Run id -> record, for the distinct tuned models (wise-ft's are lora-nu-mu's; base has no adapter)."""
    out = {}
    for path in sorted((ROOT / "runs/runs").glob("*.json")):
        rec = json.loads(path.read_text())
        if rec["method"] not in ("base", "wise-ft"):
            out[path.stem] = rec
    return out


def done() -> dict[str, dict]:
    if not OUT.exists():
        return {}
    return {row["run"]: row for row in map(json.loads, OUT.read_text().splitlines()) if row}


def measure(shard: int, shards: int, steps: int) -> None:
    from forgetless.config import load_experiment
    from forgetless.data import lm_examples, pack_blocks
    from forgetless.experiment import _texts
    from forgetless.landscape.metrics import hessian_lanczos
    from forgetless.landscape.objective import model_objective
    from forgetless.models import load_adapter, load_model

    exp = load_experiment(str(ROOT / "experiment.yaml"))
    s = exp.landscape
    todo = [rid for i, rid in enumerate(records()) if i % shards == shard and rid not in done()]
    examples = None
    for rid in todo:
        model, tok = load_model(exp.model, precision=s.precision)
        if examples is None:
            texts = _texts(exp, exp.general.heldout)
            examples = lm_examples(pack_blocks(texts, tok, exp.general.block_size, max_blocks=s.blocks))
        model = load_adapter(model, ROOT / "runs/adapters" / rid, trainable=True)
        start = time.time()
        with model_objective(model, examples, s.params, s.batch_size, s.precision) as obj:
            got = hessian_lanczos(obj, steps=steps, seed=s.seed)
        row = {"run": rid, "steps": steps, "seconds": round(time.time() - start, 1), **got}
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{rid}: top {got['top']:.4g} ({got['top_residual']:.2g}), bottom {got['bottom']:.4g} "
              f"({got['bottom_residual']:.2g}), {row['seconds']:.0f} s", flush=True)


def table() -> None:
    """Per model: the first measurement's power-iteration top eigenvalue (``landscape-power.jsonl``), the 20-step
    Lanczos one of this script (``lanczos.jsonl``), and the 10-step Lanczos one the records hold since session 29
    (``experiment.yaml``'s landscape as sized); each one's Spearman rho with the PPL increase."""
    from scipy.stats import spearmanr

    recs, rows = records(), done()
    power = {row["run"]: row["landscape"]["metrics"]
             for row in map(json.loads, (ROOT / "landscape-power.jsonl").read_text().splitlines())
             if "metrics" in (row.get("landscape") or {})}
    base = {json.loads(p.read_text())["seed"]: json.loads(p.read_text())["general_ppl"]
            for p in (ROOT / "runs/runs").glob("base__*.json")}
    print("| run | PPL increase | power top (residual) | Lanczos 20 top (residual) | Lanczos 20 bottom (residual) "
          "| Lanczos 10 top (residual), recorded |")
    print("|---|---|---|---|---|---|")
    inc, old, new, sized = [], [], [], []
    for rid, rec in recs.items():
        if rid not in rows:
            continue
        m, row, now = power[rid], rows[rid], rec["landscape"]["metrics"]
        inc.append(rec["general_ppl"] - base[rec["seed"]])
        old.append(m["hessian_top_eigenvalue"])
        new.append(row["top"])
        sized.append(now["hessian_top_eigenvalue"])
        print(f"| {rid} | {inc[-1]:+.2f} | {old[-1]:.4g} ({m['hessian_top_residual']:.2g}) | {row['top']:.4g} "
              f"({row['top_residual']:.2g}) | {row['bottom']:.4g} ({row['bottom_residual']:.2g}) "
              f"| {sized[-1]:.4g} ({now['hessian_top_residual']:.2g}) |")
    for name, values in (("power iteration (first measurement)", old), ("Lanczos, 20 steps", new),
                         ("Lanczos, 10 steps (recorded)", sized)):
        rho, p = spearmanr(values, inc)
        print(f"Spearman rho of the top eigenvalue, {name}, with the PPL increase: {rho:.3f} (p = {p:.3g}), "
              f"{len(values)} models")
    gap = max(abs(a - b) / abs(b) for a, b in zip(sized, new))
    print(f"largest relative difference, Lanczos 10 against 20 steps: {gap:.2g}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        table()
    else:
        i, n = map(int, args.shard.split("/"))
        measure(i, n, args.steps)
