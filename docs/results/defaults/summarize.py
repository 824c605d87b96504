"""Markdown table of a weight sweep: per run, domain gain, suite and PPL change against base, and the method's penalty
as a share of the task loss over the last 10 domain steps.  python docs/results/defaults/summarize.py RUNS_FOLDER"""
import glob
import json
import statistics as st
import sys
rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/runs/*.json")):
    d = json.load(open(f)); rows[d["method"] if isinstance(d["method"], str) else json.dumps(d["method"])] = d
base = next(d for d in rows.values() if d["run_id"].startswith("base__"))
def suite_mean(d): return 100 * st.mean(v["acc"] for v in d["suite"].values())
print("| run | domain acc (gain) | suite mean (change) | wikitext PPL (change) | penalty / task loss, last 10 steps |")
print("|---|---|---|---|---|")
for d in rows.values():
    acc = 100 * d["tasks"]["arc_easy"]["acc"]; b = 100 * base["tasks"]["arc_easy"]["acc"]
    sm, sb = suite_mean(d), suite_mean(base)
    ppl, pb = d["general_ppl"], base["general_ppl"]
    ratio = ""
    for s in d.get("stages") or []:
        if s.get("stage") != "domain": continue
        h = s["history"][-10:]
        for key in ("ewc_penalty_scaled", "reg_loss_scaled"):
            if key in h[-1]:
                ratio = f"{st.mean(r[key] / r['task_loss'] for r in h):.3g} ({key})"
    print(f"| {d['run_id']} | {acc:.1f} ({acc-b:+.1f}) | {sm:.1f} ({sm-sb:+.1f}) | {ppl:.1f} ({100*(ppl/pb-1):+.1f} %) | {ratio} |")
