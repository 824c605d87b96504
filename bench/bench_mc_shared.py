"""Benchmark: multiple-choice scoring with each item's shared prefix computed once (``share_prefix=True``, one packed
sequence per item with a 4D attention mask) against one padded row per (item, choice) request (``False``).

SmolLM2-135M on the first N test items of ARC-Easy, PIQA, OpenBookQA and MedMCQA from ../shared/data (the forgetting
experiment's domain task and general suite). The two paths alternate (which goes first switches each repeat) and
each keeps its best time of R repeats; printed per task: the ratio shared / padded (< 1: faster), the tokens each
path runs, whether acc and acc_norm are equal, and the largest loglikelihood difference.

    python bench/bench_mc_shared.py [--n 100] [--batch-size 32] [--repeats 2] [--precision auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TASKS = {"arc_easy": ("arc_easy/test.jsonl", "arc"), "piqa": ("piqa/test.jsonl", "piqa"),
         "openbookqa": ("openbookqa/test.jsonl", "openbookqa"), "medmcqa": ("medmcqa/test.jsonl", "medmcqa")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="items per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    from forgetless.data import load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.evaluation.multiple_choice import _build_requests, _pack
    from forgetless.models import load_model
    from forgetless.precision import resolve_precision

    if not DATA.is_dir():
        print(f"{DATA} is absent: nothing to measure")
        return 1
    model, tokenizer = load_model("smollm2-135m", precision=args.precision)
    model.eval()
    print(f"SmolLM2-135M; precision {resolve_precision(args.precision, 'cpu')}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); batch size {args.batch_size}; best of {args.repeats}, alternated")
    totals = {True: 0.0, False: 0.0}
    for task, (path, schema) in TASKS.items():
        items = load_mc_task(str(DATA / path), schema=schema, limit=args.n)
        requests = _build_requests(model, tokenizer, items)
        padded_tokens = sum(len(r.inp) for r in requests)
        by_item: dict[int, list] = {}
        for r in requests:
            by_item.setdefault(r.item, []).append(r)
        packed_tokens = sum(len(_pack(reqs).ids) for reqs in by_item.values())
        best, results = {True: float("inf"), False: float("inf")}, {}
        for rep in range(args.repeats):
            for share in ((True, False) if rep % 2 == 0 else (False, True)):
                started = time.perf_counter()
                results[share] = evaluate_mc(model, tokenizer, items, batch_size=args.batch_size,
                                             precision=args.precision, progress=False, share_prefix=share)
                best[share] = min(best[share], time.perf_counter() - started)
        totals[True] += best[True]
        totals[False] += best[False]
        diff = max(abs(a - b) for la, lb in zip(results[True].loglikelihoods, results[False].loglikelihoods)
                   for a, b in zip(la, lb))
        same = results[True].acc == results[False].acc and results[True].acc_norm == results[False].acc_norm
        print(f"  {task:11s} {len(items)} items: shared / padded time {best[True] / best[False]:.3f} "
              f"({best[True]:.1f} s / {best[False]:.1f} s); tokens {packed_tokens} / {padded_tokens} "
              f"(x{padded_tokens / packed_tokens:.2f} fewer); acc {results[True].acc:.3f} vs {results[False].acc:.3f}, "
              f"acc_norm {results[True].acc_norm:.3f} vs {results[False].acc_norm:.3f} ({'equal' if same else 'DIFFER'}); "
              f"max |loglikelihood difference| {diff:.2e}")
    print(f"all four tasks: shared / padded time {totals[True] / totals[False]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
