"""Cost of HLoRA: a general-stage step with importance recording and a domain-stage step with the
regularizer, each against plain LoRA, side by side in one run.

Same model (SmolLM2-135M by default, a tiny random Llama with --tiny), same LoRA (r=8 on q_proj, v_proj,
no dropout), same kind of batches, same precision. This machine is shared and its speed drifts by 20% over
minutes, so plain and HLoRA steps are interleaved *within one training stage on one model*: HLoRA's hooks
act on every other optimizer step (odd steps), and the even steps are plain LoRA steps. The ratio is
median(odd step times) / median(even step times) after warm-up, per stage. (Skipping HLoRA on even steps
makes the recorded omega wrong, not its cost: every HLoRA step does exactly the work it always does.)
Targets: HLoRA / plain <= 1.10 on both stages. Also prints the size of the saved importance file (float32
and bfloat16) and, as a cross-check, the time spent inside HLoRA's hooks per step.

Usage: python bench/bench_hlora_cost.py [--steps 12] [--warmup 2] [--tiny] [--all-linear]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import StepTimer, make_examples, make_model

from forgetless.methods.hlora import FILENAME, HLoRA
from forgetless.precision import resolve_precision
from forgetless.training.hooks import Method
from forgetless.training.loop import TrainConfig, train_stage


class EveryOtherStep(Method):
    """Runs a method's per-step hooks on odd optimizer steps only (stage start/end always), timing them."""

    def __init__(self, inner: Method) -> None:
        self.inner = inner
        self.hook_seconds = 0.0

    def _on(self, ctx) -> bool:
        return ctx.step % 2 == 1

    def _timed(self, name: str, ctx, *args):
        t0 = time.perf_counter()
        out = getattr(self.inner, name)(ctx, *args)
        self.hook_seconds += time.perf_counter() - t0
        return out

    def on_stage_start(self, ctx) -> None:
        self.inner.on_stage_start(ctx)

    def on_stage_end(self, ctx) -> None:
        self.inner.on_stage_end(ctx)

    def extra_loss(self, ctx, batch):
        return self._timed("extra_loss", ctx, batch) if self._on(ctx) else None

    def before_optimizer_step(self, ctx) -> None:
        if self._on(ctx):
            self._timed("before_optimizer_step", ctx)

    def after_optimizer_step(self, ctx) -> None:
        if self._on(ctx):
            self._timed("after_optimizer_step", ctx)


def split_medians(stamps: list[float], warmup: int) -> tuple[float, float]:
    """(median of plain = even steps, median of HLoRA = odd steps), both after warm-up."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    even = [t for i, t in enumerate(steps) if i >= warmup and i % 2 == 0]
    odd = [t for i, t in enumerate(steps) if i >= warmup and i % 2 == 1]
    return statistics.median(even), statistics.median(odd)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="timed steps per stage (half plain, half HLoRA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--all-linear", action="store_true", help="LoRA r=16 on all seven projections")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    batch, seq = (4, 32) if args.tiny else (8, 128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision("auto", device)
    print(f"model: {'tiny Llama' if args.tiny else 'SmolLM2-135M'}; batch {batch} x {seq}; precision {precision}; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; LoRA "
          f"{'r=16 on all seven projections' if args.all_linear else 'r=8 on q_proj, v_proj'}")
    model = make_model(args.tiny, args.all_linear)
    vocab = model.config.vocab_size
    total = args.steps + args.warmup
    cfg = TrainConfig(max_steps=total, batch_size=batch, lr=1e-4, precision=precision, progress=False)
    hlora = HLoRA()
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage, seed in (("general", 0), ("domain", 1)):
            timer, wrapped = StepTimer(), EveryOtherStep(hlora)
            train_stage(model, make_examples(batch * total, vocab, seq, seed), cfg, [wrapped, timer], stage=stage)
            plain, ours = split_medians(timer.stamps, args.warmup)
            ratios[stage] = ours / plain
            print(f"  {stage} stage: plain step {plain:.4f} s, HLoRA step {ours:.4f} s "
                  f"(inside HLoRA's hooks: {wrapped.hook_seconds / (total // 2):.4f} s per HLoRA step)")
            if stage == "general":
                for dtype in ("float32", "bfloat16"):
                    hlora.storage_dtype = dtype
                    hlora.save_state(Path(tmp) / dtype)
        sizes = {d: (Path(tmp) / d / FILENAME).stat().st_size for d in ("float32", "bfloat16")}
    print(f"general stage, HLoRA recording / plain: {ratios['general']:.3f}  (target <= 1.10)")
    print(f"domain stage, HLoRA regularizer / plain: {ratios['domain']:.3f}  (target <= 1.10)")
    print(f"importance storage: float32 {sizes['float32'] / 2**20:.2f} MiB, bfloat16 {sizes['bfloat16'] / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
