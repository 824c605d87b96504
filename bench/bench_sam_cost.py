"""Cost of SAM: a plain LoRA step, a SAM step and the cheaper SAM every k steps, side by side in one run.

Same model (SmolLM2-135M by default, a tiny random Llama with --tiny), same LoRA (r=8 on q_proj, v_proj, no
dropout), same kind of batches (language modelling on random tokens), same precision (bf16 autocast on CUDA
and on CPUs with native bf16, float32 otherwise), domain stage (where SAM acts by default).

This machine is shared and its speed drifts by up to 20% over minutes, so the variants are not timed as
separate trainings: one training stage runs `sam` with `every_k=K`, which makes every K-th optimizer step a
SAM step (two forward/backward passes) and the others plain LoRA steps, on the same model, interleaved.

* SAM / plain = median(SAM step times) / median(plain step times);
* SAM every K / plain = median over windows of K consecutive steps (one SAM step, K-1 plain) of the window's
  mean step time, divided by the median plain step time.

Targets: SAM / plain <= 2.05; SAM every K / plain <= 1.35 (K = 4: the ideal is (2 + 3) / 4 = 1.25).

Usage: python bench/bench_sam_cost.py [--windows 4] [--every-k 4] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from _common import StepTimer, make_examples, make_model

from forgetless.methods.sam import SAM
from forgetless.precision import resolve_precision
from forgetless.training.loop import TrainConfig, train_stage


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=4, help="timed windows of K steps (after one warm-up window)")
    parser.add_argument("--every-k", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    args = parser.parse_args()
    k = args.every_k
    if k < 2:
        parser.error("--every-k must be at least 2 (plain steps are needed to compare with)")
    print("command: python " + " ".join(sys.argv))
    batch, seq = (4, 32) if args.tiny else (8, 128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision("auto", device)
    print(f"model: {'tiny Llama' if args.tiny else 'SmolLM2-135M'}; LoRA r=8 q_proj,v_proj; batch {batch} x {seq}; "
          f"device {device}; precision {precision}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    model = make_model(args.tiny)
    total = k * (args.windows + 1)  # the first window is warm-up
    cfg = TrainConfig(max_steps=total, batch_size=batch, lr=1e-4, precision=precision, progress=False)
    timer = StepTimer()
    train_stage(model, make_examples(batch * total, model.config.vocab_size, seq), cfg,
                [SAM(rho=0.05, every_k=k), timer], stage="domain")
    times = timer.step_times()[k:]  # step i is a SAM step when i % k == 0
    sam_steps = times[0::k]
    plain_steps = [t for i, t in enumerate(times) if i % k]
    windows = [sum(times[i:i + k]) / k for i in range(0, len(times), k)]
    plain = statistics.median(plain_steps)
    sam = statistics.median(sam_steps) / plain
    cheap = statistics.median(windows) / plain
    print(f"plain LoRA step: {plain:.4f} s (median of {len(plain_steps)}); SAM step: "
          f"{statistics.median(sam_steps):.4f} s (median of {len(sam_steps)})")
    print(f"SAM / plain: {sam:.3f}  (target <= 2.05)")
    print(f"SAM every {k} / plain: {cheap:.3f}  (target <= 1.35; ideal {(k + 1) / k:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
