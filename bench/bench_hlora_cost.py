"""Cost of HLoRA: a general-stage step with importance recording and a domain-stage step with the
regularizer, each against plain LoRA, side by side in one run.

Same model (SmolLM2-135M by default, a tiny random Llama with --tiny), same LoRA (r=8 on q_proj, v_proj,
no dropout), same batches, same precision. Each variant's step time is the median over the steps after
warm-up, taken at each optimizer step by a timing plugin; plain and HLoRA alternate (twice, the order
flipped the second time) and each keeps its best median. Targets: HLoRA / plain <= 1.10 on both stages.
Also prints the size of the saved importance file (float32 and bfloat16).

Usage: python bench/bench_hlora_cost.py [--steps 6] [--warmup 2] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from forgetless.methods.hlora import FILENAME, HLoRA
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
        self.stamps.append(time.perf_counter())


def per_step(stamps: list[float], warmup: int) -> float:
    return statistics.median([b - a for a, b in zip(stamps, stamps[1:])][warmup:])


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


def make_examples(n: int, vocab: int, seq: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def run(tiny: bool, steps: int, warmup: int, precision: str, batch: int, seq: int, hlora: bool,
        save_to: Path | None = None) -> tuple[float, float]:
    """(general step seconds, domain step seconds) for plain LoRA or LoRA + HLoRA."""
    model = make_model(tiny)
    vocab = model.config.vocab_size
    n = batch * (steps + warmup)
    cfg = TrainConfig(max_steps=steps + warmup, batch_size=batch, lr=1e-4, precision=precision, progress=False)
    plugin = HLoRA()
    times = []
    for stage, seed in (("general", 0), ("domain", 1)):
        timer = StepTimer()
        methods = [plugin, timer] if hlora else [timer]
        train_stage(model, make_examples(n, vocab, seq, seed), cfg, methods, stage=stage)
        times.append(per_step(timer.stamps, warmup))
        if hlora and stage == "general" and save_to is not None:
            for dtype in ("float32", "bfloat16"):
                plugin.storage_dtype = dtype
                plugin.save_state(save_to / dtype)
    return times[0], times[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    batch, seq = (4, 32) if args.tiny else (8, 128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision("auto", device)
    print(f"model: {'tiny Llama' if args.tiny else 'SmolLM2-135M'}; batch {batch} x {seq}; precision {precision}; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    plain: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(2):  # alternate, flipping the order, so that drift in machine load hits both sides
            order = (False, True) if round_ == 0 else (True, False)
            for with_hlora in order:
                save = Path(tmp) if with_hlora and round_ == 0 else None
                t = run(args.tiny, args.steps, args.warmup, precision, batch, seq, with_hlora, save)
                (ours if with_hlora else plain).append(t)
                print(f"  {'LoRA+HLoRA' if with_hlora else 'plain LoRA'}: general step {t[0]:.4f} s, "
                      f"domain step {t[1]:.4f} s")
        sizes = {d: (Path(tmp) / d / FILENAME).stat().st_size for d in ("float32", "bfloat16")}
    general = min(t[0] for t in ours) / min(t[0] for t in plain)
    domain = min(t[1] for t in ours) / min(t[1] for t in plain)
    print(f"general stage, HLoRA recording / plain: {general:.3f}  (target <= 1.10)")
    print(f"domain stage, HLoRA regularizer / plain: {domain:.3f}  (target <= 1.10)")
    print(f"importance storage: float32 {sizes['float32'] / 2**20:.2f} MiB, bfloat16 {sizes['bfloat16'] / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
