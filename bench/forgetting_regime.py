"""Find a regime where plain LoRA forgets (issue #13 item 3): `lora-mu` on one domain task, scored every K steps on
the domain test set, on a general suite (the shared multiple-choice tasks that are not the domain) and on wikitext-2
perplexity. One run per (domain, lr); each run's curve is a JSON file in OUT (finished runs are skipped: resumable).

    python bench/forgetting_regime.py --out docs/results/regime/runs [--domains medmcqa arc_easy piqa corvath]
    python bench/forgetting_regime.py --out docs/results/regime/runs --plot docs/results/regime

A regime qualifies when, at some step, the domain gained >= 10 points over the base model while the general suite
lost >= 3 points on average or the general perplexity rose >= 15 %.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo (--shared)
SUITE = {"piqa": "piqa", "arc_easy": "arc", "openbookqa": "openbookqa", "medmcqa": "medmcqa"}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _task_items(name: str, split: str, limit: int):
    from forgetless.data import load_mc_task
    from forgetless.data.demo import demo_task

    if name == "corvath":
        return demo_task(split)[:limit]
    return load_mc_task(str(SHARED / name / f"{split}.jsonl"), schema=SUITE[name], limit=limit)


def evaluator(tokenizer, domain: str, suite: list[str], n_suite: int, n_domain: int, ppl_blocks: int, precision: str):
    from forgetless.data import load_texts, pack_blocks
    from forgetless.evaluation import evaluate_mc, perplexity

    sets = {f"general/{t}": _task_items(t, "test", n_suite) for t in suite}
    sets[f"domain/{domain}"] = _task_items(domain, "test", n_domain)
    blocks = pack_blocks(load_texts(str(SHARED / "wikitext2" / "test.jsonl")), tokenizer, 128, max_blocks=ppl_blocks)

    def evaluate(model) -> dict[str, float]:
        scores = {"general_ppl": perplexity(model, blocks, batch_size=16, precision=precision, progress=False).ppl}
        for name, items in sets.items():
            scores[name] = 100 * evaluate_mc(model, tokenizer, items, batch_size=32, precision=precision,
                                             progress=False).acc
        suite_scores = [scores[f"general/{t}"] for t in suite]
        scores["general_suite"] = sum(suite_scores) / len(suite_scores)
        return scores

    return evaluate


def run(domain: str, lr: float, steps: int, every: int, args) -> dict:
    from forgetless.data import mc_train_examples
    from forgetless.models import LoraSettings, attach_lora, load_model
    from forgetless.training.config import TrainConfig
    from forgetless.training.loop import train_stage
    from forgetless.training.tracking import EvalEvery

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, precision=args.precision)
    suite = [t for t in SUITE if t != domain]
    evaluate = evaluator(tokenizer, domain, suite, args.suite_items, args.domain_items, args.ppl_blocks,
                         args.precision)
    model = attach_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=ALL_LINEAR))
    train = mc_train_examples(_task_items(domain, "train", args.train_items), tokenizer, max_length=256)
    partial = args.out / f"{domain}__lr{lr:g}.partial.json"
    partial.unlink(missing_ok=True)  # a run starts over (the finished JSON is what makes it skipped)

    def evaluate_and_keep(m) -> dict[str, float]:  # a run cut short keeps the points it has measured
        scores = evaluate(m)
        done = json.loads(partial.read_text()) if partial.is_file() else []
        partial.write_text(json.dumps(done + [scores], indent=1))
        return scores

    tracker = EvalEvery(every, evaluate_and_keep)
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=lr, warmup_ratio=0.05, precision=args.precision,
                      progress=not args.quiet, seed=0)
    started = time.perf_counter()
    train_stage(model, train, cfg, [tracker], stage="domain")
    return {"domain": domain, "lr": lr, "steps": steps, "train_examples": len(train), "suite": suite,
            "model": args.model, "precision": args.precision, "seconds": time.perf_counter() - started,
            "curve": tracker.history}


def qualifies(curve: list[dict], domain: str) -> list[int]:
    base = curve[0]
    good = []
    for row in curve[1:]:
        gain = row[f"domain/{domain}"] - base[f"domain/{domain}"]
        drop = base["general_suite"] - row["general_suite"]
        ppl_rise = row["general_ppl"] / base["general_ppl"] - 1
        if gain >= 10 and (drop >= 3 or ppl_rise >= 0.15):
            good.append(int(row["step"]))
    return good


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in runs:
        c = r["curve"]
        steps = [row["step"] for row in c]
        label = f"{r['domain']} lr={r['lr']:g}"
        base = c[0]
        axes[0].plot(steps, [row[f"domain/{r['domain']}"] - base[f"domain/{r['domain']}"] for row in c], "o-", label=label)
        axes[1].plot(steps, [row["general_suite"] - base["general_suite"] for row in c], "o-", label=label)
        axes[2].plot(steps, [100 * (row["general_ppl"] / base["general_ppl"] - 1) for row in c], "o-", label=label)
    for ax, title in zip(axes, ["domain accuracy gain (points)", "general-suite change (points)",
                                "general PPL change (%)"]):
        ax.set_title(title)
        ax.set_xlabel("domain steps (lora-mu)")
        ax.axhline(0, color="gray", lw=0.5)
    axes[0].axhline(10, color="green", ls="--", lw=0.8)
    axes[1].axhline(-3, color="red", ls="--", lw=0.8)
    axes[2].axhline(15, color="red", ls="--", lw=0.8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "forgetting_vs_steps.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--domains", nargs="+", default=["medmcqa", "arc_easy", "piqa", "corvath"])
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 1e-3])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--train-items", type=int, default=4000)
    p.add_argument("--suite-items", type=int, default=200)
    p.add_argument("--domain-items", type=int, default=300)
    p.add_argument("--ppl-blocks", type=int, default=32)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--precision", default="auto")
    p.add_argument("--plot", type=Path, help="only draw the figure of the runs in --out into this folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--shared", type=Path, help="the shared data folder (default ../shared/data)")
    args = p.parse_args()
    global SHARED
    SHARED = args.shared or SHARED
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot is None:
        for domain in args.domains:
            for lr in args.lrs:
                path = args.out / f"{domain}__lr{lr:g}.json"
                if path.is_file():
                    continue
                print(f"== {domain} lr={lr:g}", flush=True)
                record = run(domain, lr, args.steps, args.every, args)
                record["qualifying_steps"] = qualifies(record["curve"], domain)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record, indent=1))
                tmp.replace(path)
                print(json.dumps({k: v for k, v in record.items() if k != "curve"}), flush=True)
    runs = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json")) if not p.name.endswith(".partial.json")]
    plot(runs, args.plot or args.out)


if __name__ == "__main__":
    main()
