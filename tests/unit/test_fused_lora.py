"""forgetless.fused_lora (``fused_lora: true``): the LoRA update added inside one addmm is PEFT's sum, to rounding, with
the same gradients; every call it does not apply to takes PEFT's own forward (bit for bit); hooks still fire; a
stage undoes it."""

from __future__ import annotations

import pytest
import torch

from forgetless.fused_lora import fuse_lora, unfuse_lora
from tests.unit.tiny_model import make_lora_model, random_examples, randomize_lora_b

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch(seed: int = 0) -> dict:
    ids = torch.tensor([e["input_ids"] for e in random_examples(3, 9, seed=seed)])
    return {"input_ids": ids, "labels": ids}


def _loss_and_grads(model, batch, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fused_sum_is_peft_s_sum_with_the_same_gradients(dtype):
    """All seven projections, a nonzero B: the loss and every factor's gradient equal PEFT's, to 1e-12 in float64
    (the same arithmetic) and to float32 rounding (rel 1e-5) in float32; and the fused path did run (its addmm)."""
    model = make_lora_model(0, targets=SEVEN, b_std=0.3, dtype=dtype)
    batch = _batch()
    want = _loss_and_grads(model, batch)
    fused = fuse_lora(model)
    assert len(fused) == 2 * len(SEVEN)  # two layers
    calls = []
    real = torch.addmm
    torch.addmm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = _loss_and_grads(model, batch)
    finally:
        torch.addmm = real
    assert len(calls) == len(fused)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    assert torch.allclose(got[0], want[0], **tol)
    assert got[1].keys() == want[1].keys() and all(g.abs().max() > 0 for g in want[1].values())
    for name, g in want[1].items():
        assert torch.allclose(got[1][name], g, **tol), name


def test_under_bf16_autocast_it_is_closer_to_float64_than_peft_s_rounding():
    """Under bf16 autocast, the fused sum rounds once where PEFT rounds three times: its layer outputs are at least
    as close to the float64 sum."""
    model = make_lora_model(0, targets=("q_proj",), b_std=0.5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    w, a, b = layer.base_layer.weight.double(), layer.lora_A["default"].weight.double(), \
        layer.lora_B["default"].weight.double()
    exact = x.double() @ w.T + (x.double() @ a.T @ b.T) * layer.scaling["default"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
        fuse_lora(layer)
        fused = layer(x)
    assert plain.dtype == fused.dtype == torch.bfloat16
    err_plain, err_fused = ((t.double() - exact).abs().mean() for t in (plain, fused))
    assert err_fused <= err_plain * 1.01, (err_fused, err_plain)
    assert (fused.double() - exact).abs().max() < 0.05 * exact.abs().max()


def test_calls_it_does_not_apply_to_take_peft_s_forward_bit_for_bit():
    """Merged, adapters disabled, two active adapters, DoRA, a mixed-adapter batch (adapter_names): PEFT's own
    forward runs, so the outputs are PEFT's exactly."""
    from peft import LoraConfig, get_peft_model

    from tests.unit.tiny_model import make_tiny_model

    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))

    def layer_of(model):
        return model.base_model.model.model.layers[0].self_attn.q_proj

    for case in ("merged", "disabled", "two_active", "dora", "adapter_names"):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0, use_dora=case == "dora")
        model = get_peft_model(make_tiny_model(0), cfg)
        if case == "two_active":
            model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
            model.base_model.set_adapter(["default", "other"])
        randomize_lora_b(model, std=0.3)
        layer = layer_of(model)
        kwargs = {"adapter_names": ["default", "__base__"]} if case == "adapter_names" else {}
        if case == "merged":
            layer.merge()
        context = model.disable_adapter() if case == "disabled" else torch.no_grad()
        with context, torch.no_grad():
            want = layer(x, **kwargs)
            fuse_lora(model)
            calls = []
            real = torch.addmm
            torch.addmm = lambda *a, **k: calls.append(1) or real(*a, **k)
            try:
                got = layer(x, **kwargs)
            finally:
                torch.addmm = real
        assert not calls and torch.equal(got, want), case


def test_fan_in_fan_out_layers_are_left_alone():
    """GPT-2's Conv1D layout: its LoRA layer keeps PEFT's forward (fuse_lora's calls check the layout)."""
    from tests.unit.test_lora_toolkit import tiny_gpt2

    model = tiny_gpt2().float()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        fuse_lora(model)
        assert torch.equal(model(input_ids=ids).logits, want)


def test_hooks_on_the_lora_layer_fire_and_unfuse_restores_peft_s_forward():
    """A forward hook on the LoRA layer (HLoRA's exact estimator, EWC's Fisher hook there) sees the fused output;
    unfuse_lora leaves no instance forward behind, and the outputs are PEFT's bit for bit again."""
    model = make_lora_model(0, b_std=0.3)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = layer(x)
    seen = []
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out.clone()))
    fused = fuse_lora(model)
    assert fuse_lora(model) == []  # twice: nothing more to change
    with torch.no_grad():
        got = layer(x)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], got) and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    import copy

    twin = copy.deepcopy(model)  # a copy made while fused is fused too, and independent of the original
    twin_layer = twin.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert torch.equal(twin_layer(x), got)
        twin_layer.lora_B["default"].weight.zero_()
        assert torch.equal(layer(x), got) and torch.allclose(twin_layer(x), layer.base_layer(x))
    unfuse_lora(fused)
    assert "forward" not in layer.__dict__
    with torch.no_grad():
        assert torch.equal(layer(x), want)


def test_a_stage_with_fused_lora_trains_as_without_and_undoes_it():
    """train_stage(fused_lora=True): the adapter after 3 steps equals the unfused stage's to float32 rounding, HLoRA's
    exact estimator (a hook on the LoRA layers) records the same importance, and the layers are PEFT's again after."""
    from forgetless.fused_lora import _MARK
    from forgetless.methods.hlora import HLoRA
    from forgetless.training.config import TrainConfig
    from forgetless.training.hooks import Method
    from forgetless.training.loop import train_stage

    class Watch(Method):  # were the layers fused while the stage stepped? (equal numbers alone cannot tell)
        def before_optimizer_step(self, ctx):
            seen.append(sum(bool(getattr(m, _MARK, False)) for m in ctx.model.modules()))

    results = []
    for fused in (False, True):
        model = make_lora_model(0, targets=SEVEN, b_std=0.1)
        plugin = HLoRA(estimator="exact")
        config = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, precision="fp32", progress=False, fused_lora=fused)
        seen: list[int] = []
        train_stage(model, random_examples(12, 8), config, [plugin, Watch()], stage="general")
        lora_layers = sum(hasattr(m, "lora_A") for m in model.modules())
        assert seen == [lora_layers if fused else 0] * 3 and lora_layers, (fused, seen)
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((adapter, {k: v.clone() for k, v in plugin.importance.items()}))
        assert not any("forward" in m.__dict__ or getattr(m, _MARK, False) for m in model.modules())
    (plain, plain_imp), (fused, fused_imp) = results
    for name, want in plain.items():
        assert torch.allclose(fused[name], want, rtol=1e-4, atol=1e-6), name
    assert plain_imp.keys() == fused_imp.keys() and plain_imp
    for name, want in plain_imp.items():
        assert torch.allclose(fused_imp[name], want, rtol=1e-3, atol=1e-6 * float(want.abs().max())), name


def test_the_setting_is_a_training_option_and_a_cli_flag():
    """fused_lora: true in an experiment's train section (a bool, checked) and --fused-lora on forgetless train."""
    from forgetless.cli import build_parser
    from forgetless.training.config import TrainConfig

    assert TrainConfig(fused_lora="true").fused_lora is True
    with pytest.raises(ValueError, match="fused_lora"):
        TrainConfig(fused_lora="maybe")
    args = build_parser().parse_args(["train", "--fused-lora", "--domain", "x.jsonl", "--output", "out"])
    assert args.fused_lora is True
