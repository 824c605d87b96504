"""Cost of SAM: a plain LoRA step, a SAM step and the cheaper SAM every k steps, side by side in one run.

Same model (SmolLM2-135M by default, a tiny random Llama with --tiny), same LoRA (r=8 on q_proj, v_proj, no
dropout), same batches (language modelling on fixed random tokens), same precision (bf16 autocast on CUDA and
on CPUs with native bf16, float32 otherwise), domain stage (where SAM acts by default). Step times are taken at
each optimizer step by a timing plugin, after warm-up:

* plain LoRA and SAM (rho 0.05, two forward/backward passes per step): the median step;
* SAM with every_k=K (SAM on one step in K, a plain step otherwise): the mean over a window of K consecutive
  steps (one SAM step and K-1 plain ones), the median over the windows.

The three alternate (twice, the order flipped the second time) and each keeps its best. Targets: SAM / plain
<= 2.05; SAM every K / plain <= 1.35 (K = 4: the ideal is (2 + 3) / 4 = 1.25).

Usage: python bench/bench_sam_cost.py [--steps 8] [--warmup 2] [--every-k 4] [--tiny]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from forgetless.methods.sam import SAM
from forgetless.models import LoraSettings, attach_lora
from forgetless.precision import resolve_precision
from forgetless.training.hooks import Method
from forgetless.training.loop import TrainConfig, train_stage


class StepTimer(Method):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_stage_start(self, ctx) -> None:
        self.stamps.append(time.perf_counter())

    def after_optimizer_step(self, ctx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def step_times(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def make_model(tiny: bool) -> torch.nn.Module:
    if tiny:
        model = tiny_model()
    else:
        from forgetless.models import load_model

        model, _ = load_model("smollm2-135m")
    return attach_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))


def make_examples(n: int, vocab: int, seq: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def run(variant: str, tiny: bool, steps: int, warmup: int, every_k: int, precision: str, batch: int,
        seq: int) -> float:
    """Seconds per optimizer step of one variant: "plain", "sam" or "sam-every-k"."""
    model = make_model(tiny)
    timer = StepTimer()
    plugins: list[Method] = {"plain": [], "sam": [SAM(rho=0.05)],
                             "sam-every-k": [SAM(rho=0.05, every_k=every_k)]}[variant]
    if variant == "sam-every-k":
        steps = every_k * max(2, math.ceil(steps / every_k))  # whole windows of k steps
        warmup = every_k * math.ceil(warmup / every_k)  # windows start on a SAM step (step % k == 0)
    total = steps + warmup
    cfg = TrainConfig(max_steps=total, batch_size=batch, lr=1e-4, precision=precision, progress=False)
    train_stage(model, make_examples(batch * total, model.config.vocab_size, seq), cfg, plugins + [timer],
                stage="domain")
    times = step_times(timer.stamps, warmup)
    if variant != "sam-every-k":
        return statistics.median(times)
    windows = [sum(times[i:i + every_k]) / every_k for i in range(0, len(times), every_k)]
    return statistics.median(windows)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--every-k", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    batch, seq = (4, 32) if args.tiny else (8, 128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision("auto", device)
    print(f"model: {'tiny Llama' if args.tiny else 'SmolLM2-135M'}; LoRA r=8 q_proj,v_proj; batch {batch} x {seq}; "
          f"device {device}; precision {precision}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    variants = ["plain", "sam", "sam-every-k"]
    best: dict[str, float] = {}
    for round_ in range(2):  # alternate, flipping the order, so that drift in machine load hits all sides
        for variant in variants if round_ == 0 else variants[::-1]:
            t = run(variant, args.tiny, args.steps, args.warmup, args.every_k, precision, batch, seq)
            best[variant] = min(best.get(variant, math.inf), t)
            print(f"  {variant:>11}: {t:.4f} s per step")
    sam = best["sam"] / best["plain"]
    cheap = best["sam-every-k"] / best["plain"]
    print(f"plain LoRA step: {best['plain']:.4f} s")
    print(f"SAM / plain: {sam:.3f}  (target <= 2.05)")
    ideal = (args.every_k + 1) / args.every_k
    print(f"SAM every {args.every_k} / plain: {cheap:.3f}  (target <= 1.35; ideal {ideal:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
