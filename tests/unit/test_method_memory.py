"""Method state that fits (issue #12 item 8): EWC's anchor is kept as LoRA factors, not a dense update; its Fisher
can be held in bfloat16 and offloaded to CPU memory, with the same penalty (exactly when offloaded)."""

from __future__ import annotations

import pytest
import torch

from forgetless.lora import lora_modules
from forgetless.methods.ewc import EWC
from tests.unit.tiny_model import random_examples, randomize_lora_b


def _domain_ready(lora_model, make_ctx, **options):
    model = lora_model(b_std=0.05)
    plugin = EWC(samples=4, **options)
    general = make_ctx("general", model=model)
    plugin.prepare_examples(general, random_examples(4, 8))
    plugin.on_stage_end(general)
    plugin.on_stage_start(make_ctx("domain", model=model))
    randomize_lora_b(model, seed=7, std=0.05)  # the domain stage moved the adapter away from the anchor
    return model, plugin


def test_anchor_is_factors_not_a_dense_update(lora_model, make_ctx):
    model, plugin = _domain_ready(lora_model, make_ctx)
    for (_, module, _, ref), (_, m) in zip(plugin._terms, lora_modules(model)):
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        assert ref[0].shape == a.shape and ref[1].shape == b.shape  # r x in and out x r, never out x in


def test_offloaded_and_bf16_fisher_give_the_penalty(lora_model, make_ctx, device):
    torch.manual_seed(0)
    _, plain = _domain_ready(lora_model, make_ctx)
    torch.manual_seed(0)
    _, offloaded = _domain_ready(lora_model, make_ctx, offload="cpu")
    torch.manual_seed(0)
    _, half = _domain_ready(lora_model, make_ctx, storage_dtype="bfloat16")
    assert all(f.device.type == "cpu" for _, _, f, _ in offloaded._terms)
    assert all(f.dtype == torch.bfloat16 for _, _, f, _ in half._terms)
    reference = plain.penalty()
    assert reference > 0
    assert torch.equal(offloaded.penalty(), reference)
    assert float(half.penalty()) == pytest.approx(float(reference), rel=2 ** -7)
    offloaded.penalty().backward()  # differentiable through the offloaded Fisher
