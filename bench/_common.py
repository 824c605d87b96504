"""Pieces the benchmark scripts share: a step timer, the models they time, random-token batches."""

from __future__ import annotations

import time

import torch

from forgetless.models import LoraSettings, attach_lora
from forgetless.training.hooks import Method


class StepTimer(Method):
    """Stamps the start of the stage and the end of every optimizer step; put it last in the method list."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_stage_start(self, ctx) -> None:
        self.stamps.append(time.perf_counter())

    def after_optimizer_step(self, ctx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(tiny: bool, all_linear: bool = False) -> torch.nn.Module:
    """SmolLM2-135M (or a tiny random Llama) with LoRA r=8 on q_proj, v_proj (``all_linear``: r=16 on all seven
    projections, the forgetting experiment's setting), no dropout."""
    if tiny:
        model = tiny_model()
    else:
        from forgetless.models import load_model

        model, _ = load_model("smollm2-135m")
    if all_linear:
        return attach_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=ALL_SEVEN))
    return attach_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))


def make_examples(n: int, vocab: int, seq: int, seed: int = 0, low: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (n, seq), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
