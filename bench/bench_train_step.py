"""A forgetless LoRA training step vs a plain transformers Trainer + PEFT step, side by side in one run.

Same model (SmolLM2-135M), same LoRA (r=8 on q_proj, v_proj), same batch (8 x 128 tokens of general text),
same precision (bf16 autocast where the CPU has native bf16, else float32), same optimizer (AdamW),
gradient clipping on in both. Each side's step time is the median over timed steps after warm-up, taken
from hooks/callbacks at each optimizer step; ``--rounds`` rounds (2 by default), F T then T F alternately, and each
side keeps its best median (each round's ratio and their median are printed too).

Also prints the step's model FLOP rate as a fraction of a dense matmul's rate measured in this run:
model FLOPs = those counted by torch's FlopCounterMode for one forward+backward of the PEFT model (its matmuls: the
tied head and the LoRA factors included, attention's scores not; not issue #15's analytic count, which
bench/bench_gpu.py uses: at SmolLM2's shape this count is about 1.2x that one).

With ``--levers`` it also times forgetless alone with each speed lever that runs on the CPU (docs/speed.md), each
against the same steps without it, alternated twice, best of each: ``attn_implementation: eager`` vs sdpa on the
batch above; on examples of random lengths (16 to 160 tokens, like multiple-choice items and short instructions)
``padding_free`` and ``group_by_length`` vs padded shuffled batches, timing one epoch of 64 examples (each variant
sees every example once); ``compile`` (its compilation in the warm-up steps); and ``fused_lora`` on the q/v model
and on a second one with LoRA r=16 on all seven projections. ``--only fused_lora`` picks levers by name.

Usage: python bench/bench_train_step.py [--steps 6] [--warmup 2] [--rounds 2]
                                        [--levers | --levers-only [--only NAME,NAME]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import _common
from _common import StepTimer

from forgetless.models import LoraSettings, attach_lora, load_model
from forgetless.precision import autocast, resolve_precision
from forgetless.training.loop import TrainConfig, train_stage

BATCH, SEQ = 8, 128


def make_examples(n: int, vocab: int) -> list[dict]:
    return _common.make_examples(n, vocab, SEQ, low=100)


def per_step(stamps: list[float], warmup: int, mean: bool = False) -> float:
    """The median step time after ``warmup`` steps; ``mean``: the mean (steps of unequal sizes: an epoch's time)."""
    diffs = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return statistics.fmean(diffs) if mean else statistics.median(diffs)


def forgetless_step(steps: int, warmup: int, precision: str, examples: list[dict] | None = None, model=None,
                    ragged: bool = False, **levers) -> float:
    if model is None:
        model, _ = load_model("smollm2-135m")
        model = attach_lora(model, LoraSettings(dropout=0.0))
    timer = StepTimer()
    config = TrainConfig(max_steps=steps + warmup, batch_size=BATCH, lr=1e-4, precision=precision, progress=False,
                         **levers)
    examples = examples or make_examples(BATCH * (steps + warmup), model.config.vocab_size)
    train_stage(model, examples, config, [timer], stage="general")
    return per_step(timer.stamps, warmup, mean=ragged)


def ragged_examples(n: int, vocab: int, low: int = 16, high: int = 160) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [{"input_ids": ids, "labels": ids} for ids in (torch.randint(100, vocab, (k,), generator=g).tolist()
                                                          for k in lengths)]


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def levers(steps: int, warmup: int, precision: str, only: list[str] | None = None) -> None:
    """Each CPU lever against the same forgetless steps without it (see the module docstring)."""
    model, _ = load_model("smollm2-135m")
    model = attach_lora(model, LoraSettings(dropout=0.0))
    plain = {"attn_implementation": "sdpa"}
    # 64 examples: transformers' mega-batches are min(n // (4 * batch), 50) batches, so fewer would leave nothing to
    # group; one epoch timed whole (the model is warm from the runs before), every example once on both sides
    ragged = ragged_examples(BATCH * 8, model.config.vocab_size)
    epoch = len(ragged) // BATCH
    rows = [("attn_implementation: eager", {"attn_implementation": "eager"}, None, steps, warmup),
            ("padding_free (ragged 16-160)", {"padding_free": True}, ragged, epoch, 0),
            ("group_by_length (ragged 16-160)", {"group_by_length": True}, ragged, epoch, 0),
            ("compile", {"compile": True}, None, steps, warmup + 1),
            ("fused_lora (q/v, r=8)", {"fused_lora": True}, None, steps, warmup)]
    rows = [row + (model,) for row in rows]
    if only:
        rows = [row for row in rows if any(part in row[0] for part in only)]
    every_name = "fused_lora (all-linear, r=16)"
    if not only or any(part in every_name for part in only):
        every, _ = load_model("smollm2-135m")
        every = attach_lora(every, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=ALL_LINEAR))
        rows.append((every_name, {"fused_lora": True}, None, steps, warmup, every))
    for name, lever, examples, n, w, row_model in rows:
        ours, theirs = [], []
        for r in range(2):
            for side in (("plain", "lever") if r == 0 else ("lever", "plain")):
                t = forgetless_step(n, w, precision, examples, row_model, ragged=examples is not None,
                                    **(plain | lever if side == "lever" else plain))
                (ours if side == "lever" else theirs).append(t)
        print(f"  lever {name}: {min(ours):.3f} s vs {min(theirs):.3f} s per step -> {min(ours) / min(theirs):.3f}  "
              f"(rounds {['%.3f' % t for t in ours]} vs {['%.3f' % t for t in theirs]})", flush=True)


def trainer_step(steps: int, warmup: int, precision: str) -> float:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    model, _ = load_model("smollm2-135m")
    model = attach_lora(model, LoraSettings(dropout=0.0))
    rows = make_examples(BATCH * (steps + warmup), model.config.vocab_size)
    data = Dataset.from_list([r | {"attention_mask": [1] * SEQ} for r in rows])
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir="/tmp/forgetless-bench-trainer", per_device_train_batch_size=BATCH,
                             max_steps=steps + warmup, learning_rate=1e-4, lr_scheduler_type="linear",
                             bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(), report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, max_grad_norm=1.0,
                             dataloader_num_workers=0, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
            callbacks=[Stamp()]).train()
    return per_step(stamps, warmup)


def matmul_rate(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def model_flops(precision: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = load_model("smollm2-135m")
    model = attach_lora(model, LoraSettings(dropout=0.0))
    x = torch.randint(100, model.config.vocab_size, (BATCH, SEQ))
    counter = FlopCounterMode(display=False)
    with counter, autocast(precision, "cpu"):
        model(input_ids=x, labels=x).loss.backward()
    return float(counter.get_total_flops())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both sides, alternating F T / T F")
    parser.add_argument("--levers", action="store_true", help="also time the speed levers that run on the CPU")
    parser.add_argument("--levers-only", action="store_true", help="only the levers (no Trainer comparison)")
    parser.add_argument("--only", default="", help="comma-separated parts of lever names: only those levers "
                                                   "(e.g. fused_lora)")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    precision = resolve_precision("auto", "cpu")
    print(f"precision: {precision} (auto); torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.levers or args.levers_only:
        levers(args.steps, args.warmup, precision, [p.strip() for p in args.only.split(",") if p.strip()])
        if args.levers_only:
            return 0
    ours, theirs = [], []
    for r in range(args.rounds):  # F T, then T F, ...: drift in machine load and the first side's warm caches hit both
        for side in (("f", "t") if r % 2 == 0 else ("t", "f")):
            if side == "f":
                ours.append(forgetless_step(args.steps, args.warmup, precision))
            else:
                theirs.append(trainer_step(args.steps, args.warmup, precision))
        print(f"  round {r} ({'F T' if r % 2 == 0 else 'T F'}): forgetless step {ours[-1]:.3f} s   "
              f"Trainer+PEFT step {theirs[-1]:.3f} s")
    ratio = min(ours) / min(theirs)
    rounds = [a / b for a, b in zip(ours, theirs)]
    print(f"forgetless / Trainer+PEFT step time: {ratio:.3f}  (target <= 1.0, issue #15 item 4; best of each side; "
          f"per round {' '.join(f'{x:.3f}' for x in rounds)}, median {statistics.median(rounds):.3f})")
    flops = model_flops(precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_rate(dtype)
    rate = flops / min(ours)
    print(f"model FLOPs per step: {flops / 1e9:.1f} GFLOP; forgetless rate {rate / 1e9:.1f} GFLOP/s")
    print(f"matmul rate in the step's precision ({precision}): {peak / 1e9:.1f} GFLOP/s -> fraction {rate / peak:.3f}")
    if dtype == torch.bfloat16:  # a CPU without native bf16 emulates it (~1 GFLOP/s): no fraction to speak of
        print(f"bf16 matmul rate: {peak / 1e9:.1f} GFLOP/s -> fraction {rate / peak:.3f} (target >= 0.45)")
    else:
        print("bf16 matmul: not native on this CPU (precision auto is fp32 here); no bf16 fraction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
