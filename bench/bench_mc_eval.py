"""Benchmark: batched ``evaluate_mc`` vs the one-forward-per-choice ``evaluate_mc_reference``.

Runs both on SmolLM2-135M over the first N items of ../shared/data/piqa/test.jsonl (a small built-in
list if that file is absent), alternating which goes first, and keeps the best of R repeats. Checks
that acc and acc_norm are identical and prints the speedup and the largest loglikelihood difference.

    python bench/bench_mc_eval.py [--n 100] [--batch-size 16] [--repeats 2] [--precision auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PIQA_TEST = ROOT.parent / "shared" / "data" / "piqa" / "test.jsonl"

# Fallback when ../shared/data is absent: PIQA-style items (written for this benchmark).
BUILTIN = [
    ("How do I keep bread fresh for longer?", ("Store it in a sealed bag in a cool place.", "Leave it in the sun on the windowsill."), 0),
    ("To cool down hot soup quickly,", ("put it in the oven.", "stir it in a wide bowl."), 1),
    ("How can I clean a greasy pan?", ("Use hot water and dish soap.", "Rub it with dry sand and butter."), 0),
    ("To dry wet shoes,", ("stuff them with newspaper.", "put them in the freezer."), 0),
    ("How do you make ice cubes?", ("Fill a tray with water and freeze it.", "Boil water in a tray."), 0),
    ("To see better in a dark room,", ("close the curtains.", "turn on a lamp."), 1),
    ("How do I stop a door from squeaking?", ("Oil the hinges.", "Paint the handle."), 0),
    ("To keep a plant alive,", ("water it regularly.", "keep it in a closed drawer."), 0),
]


def load_items(n: int):
    from forgetless.data import MCItem, load_mc_task

    if PIQA_TEST.is_file():
        return load_mc_task(str(PIQA_TEST), schema="piqa", limit=n), f"{PIQA_TEST} (first {n})"
    items = [MCItem(f"Question: {g}\nAnswer:", c, a) for g, c, a in BUILTIN][:n]
    return items, f"built-in list ({len(items)} items; {PIQA_TEST} absent)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="number of items")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    from forgetless.evaluation import evaluate_mc, evaluate_mc_reference
    from forgetless.precision import resolve_precision

    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, precision {resolve_precision(args.precision, 'cpu')}, "
          f"load average {load_avg:.2f}")
    from forgetless.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    items, source = load_items(args.n)
    print(f"# items: {source}; requests: {sum(len(i.choices) for i in items)}; batch size {args.batch_size}")

    def run_reference():
        return evaluate_mc_reference(model, tokenizer, items, precision=args.precision)

    def run_batched():
        return evaluate_mc(model, tokenizer, items, batch_size=args.batch_size, precision=args.precision,
                           progress=False)

    runners = {"reference": run_reference, "batched": run_batched}
    best = {name: float("inf") for name in runners}
    results = {}
    for rep in range(args.repeats):
        order = ["reference", "batched"] if rep % 2 == 0 else ["batched", "reference"]
        for name in order:
            start = time.perf_counter()
            results[name] = runners[name]()
            elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed)
            print(f"repeat {rep + 1} {name:>9}: {elapsed:7.2f} s")

    ref, fast = results["reference"], results["batched"]
    assert fast.acc == ref.acc and fast.acc_norm == ref.acc_norm, (fast, ref)
    max_diff = max(abs(a - b) for la, lb in zip(fast.loglikelihoods, ref.loglikelihoods, strict=True)
                   for a, b in zip(la, lb, strict=True))
    print(f"reference (best of {args.repeats}): {best['reference']:.2f} s")
    print(f"batched   (best of {args.repeats}): {best['batched']:.2f} s")
    print(f"speedup: {best['reference'] / best['batched']:.2f}x (target >= 1.5x)")
    print(f"acc {fast.acc:.4f} == {ref.acc:.4f}, acc_norm {fast.acc_norm:.4f} == {ref.acc_norm:.4f} (n={fast.n})")
    print(f"max |loglikelihood difference|: {max_diff:.2e}")


if __name__ == "__main__":
    main()
