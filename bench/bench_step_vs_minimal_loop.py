"""forgetless's training step against a minimal hand-written loop on the same SmolLM2 batches (``model(input_ids,
labels).loss``, backward, clipping at 1.0, AdamW; no Trainer, no forgetless), alternated F M / M F, best of each:
how much the loop itself adds to the model's compute (bench_train_step.py compares with Trainer + PEFT).

Usage: python bench/bench_step_vs_minimal_loop.py [--steps 4] [--warmup 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_train_step import BATCH, forgetless_step, make_examples

from forgetless.models import LoraSettings, attach_lora, load_model
from forgetless.precision import resolve_precision


def minimal_step(steps: int, warmup: int) -> float:
    """The median step time of the minimal loop (float32, as ``precision: auto`` is on a CPU without bf16)."""
    model, _ = load_model("smollm2-135m")
    model = attach_lora(model, LoraSettings(dropout=0.0))
    examples = make_examples(BATCH * (steps + warmup), model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    stamps = [time.perf_counter()]
    for s in range(steps + warmup):
        chunk = examples[s * BATCH:(s + 1) * BATCH]
        ids = torch.tensor([e["input_ids"] for e in chunk])
        labels = torch.tensor([e["labels"] for e in chunk])
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return statistics.median([b - a for a, b in zip(stamps, stamps[1:])][warmup:])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    precision = resolve_precision("auto", "cpu")
    if precision != "fp32":
        print(f"precision auto is {precision} here; the minimal loop runs in float32: no comparison")
        return 1
    ours, theirs = [], []
    for r in range(args.rounds):
        for side in ("fm" if r % 2 == 0 else "mf"):
            if side == "f":
                ours.append(forgetless_step(args.steps, args.warmup, precision))
            else:
                theirs.append(minimal_step(args.steps, args.warmup))
        print(f"  round {r}: forgetless step {ours[-1]:.3f} s   minimal loop step {theirs[-1]:.3f} s", flush=True)
    print(f"forgetless / minimal loop step time: {min(ours) / min(theirs):.3f} (best of each side)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
