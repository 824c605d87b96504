"""Method state that fits (issue #12 item 8): EWC's anchor and HLoRA's dW_nu are kept as LoRA factors, not dense
updates (in memory and in HLoRA's saved file); EWC's Fisher can be held in bfloat16 and offloaded to CPU memory, with
the same penalty (exactly when offloaded)."""

from __future__ import annotations

import pytest
import torch

from forgetless.lora import lora_modules, update_shape
from forgetless.methods.ewc import EWC
from forgetless.methods.hlora import FILENAME, HLoRA, load_importance
from tests.unit.tiny_model import random_examples, randomize_lora_b

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    shapes = {n: (m.lora_A["default"].weight.shape, m.lora_B["default"].weight.shape) for n, m in lora_modules(model)}
    for term in plugin._terms:
        for i, name in enumerate(term.group.names):
            a, b = shapes[name]
            assert term.ref[0][i].shape == a and term.ref[1][i].shape == b  # r x in and out x r, never out x in


def test_offloaded_and_bf16_fisher_give_the_penalty(lora_model, make_ctx, device):
    torch.manual_seed(0)
    _, plain = _domain_ready(lora_model, make_ctx)
    torch.manual_seed(0)
    _, offloaded = _domain_ready(lora_model, make_ctx, offload="cpu")
    torch.manual_seed(0)
    _, half = _domain_ready(lora_model, make_ctx, storage_dtype="bfloat16")
    assert all(t.fisher.device.type == "cpu" for t in offloaded._terms)
    assert all(t.fisher.dtype == torch.bfloat16 for t in half._terms)
    reference = plain.penalty()
    assert reference > 0
    assert torch.equal(offloaded.penalty(), reference)
    assert float(half.penalty()) == pytest.approx(float(reference), rel=2 ** -7)
    offloaded.penalty().backward()  # differentiable through the offloaded Fisher


def _hlora_state_bytes(plugin: HLoRA) -> tuple[int, int]:
    """(bytes of the importance, bytes of dW_nu) that the plugin holds."""
    omega = sum(t.numel() * t.element_size() for t in plugin.importance.values())
    return omega, plugin.reference.nbytes()


def test_hlora_reference_is_held_and_saved_as_factors(tmp_path, lora_model, make_ctx, device):
    """dW_nu costs r (in + out) numbers per module, not out x in: in the plugin after the general stage, in the saved
    file, and in the domain stage's groups (where the regularizer multiplies it out)."""
    from tests.unit.test_hlora import batches, sgd_stage

    model = lora_model(targets=ALL_SEVEN)
    plugin = HLoRA()
    sgd_stage(make_ctx("general", model, lr=0.05), plugin, 2, batches(device=device))
    modules = dict(lora_modules(model))
    dense = {n: torch.Size(update_shape(m)) for n, m in modules.items()}
    factor_numbers = sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel()
                         for m in modules.values())
    omega_bytes, ref_bytes = _hlora_state_bytes(plugin)
    dense_bytes = sum(s.numel() for s in dense.values()) * 4  # what a dense float32 dW_nu would hold
    assert omega_bytes == dense_bytes  # float32 importance, one element per weight element
    assert ref_bytes == factor_numbers * 4  # float32 factors
    assert ref_bytes < 0.3 * dense_bytes  # r=4 on 32..64-wide projections: 4 (in + out) / (in * out) <= 1/4
    plugin.save_state(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / FILENAME), framework="pt") as fh:
        stored = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    assert not any(k.endswith(".dw_ref") for k in stored)
    for name, shape in dense.items():
        assert stored[f"{name}.omega"] == list(shape)
        assert stored[f"{name}.ref_A"] == list(modules[name].lora_A["default"].weight.shape)
        assert stored[f"{name}.ref_B"] == list(modules[name].lora_B["default"].weight.shape)
    size = (tmp_path / FILENAME).stat().st_size
    assert size < omega_bytes + ref_bytes + 64 * 1024  # the header (JSON metadata) is the rest
    assert size < omega_bytes + dense_bytes  # what the dense file held

    fresh = HLoRA()
    fresh.load_state(tmp_path)
    fresh.on_stage_start(make_ctx("domain", model))
    assert all(g.dw_ref is None and g.ref_b.shape[-1] == 4 for g in fresh.groups)  # no dense anchor on the device
    assert _hlora_state_bytes(fresh) == (omega_bytes, ref_bytes)
    assert fresh.regularizer().item() == 0.0
    loaded = load_importance(tmp_path)
    for name in dense:
        assert torch.equal(loaded["dw_ref"][name], plugin.reference[name].cpu())
