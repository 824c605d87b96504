"""The LoRA toolkit (forgetless.lora): dW = s B A with PEFT's semantics, fan_in_fan_out and named adapters included,
and the methods that consume it (HLoRA, EWC, WiSE-FT) on a GPT-2-style model whose weights are Conv1D [in, out]."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from forgetless.lora import delta_weight, lora_modules, update_shape
from forgetless.methods.ewc import fisher_diagonal
from forgetless.methods.hlora import HLoRA, _paper_gradient
from forgetless.methods.wise_ft import WiseFT
from forgetless.training.batches import collate
from forgetless.training.config import TrainConfig
from forgetless.training.loop import train_stage
from forgetless.training.loss import causal_lm_loss
from tests.unit.tiny_model import random_examples, randomize_lora_b


def tiny_gpt2(adapter: str = "default", seed: int = 0) -> torch.nn.Module:
    """A tiny GPT-2 (its attention/MLP weights are Conv1D, stored [in, out]) with LoRA on c_attn and c_fc."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = get_peft_model(GPT2LMHeadModel(config), lora, adapter_name=adapter).double()
    randomize_lora_b(model, seed=seed + 1, std=0.1)
    return model


def test_delta_weight_is_peft_get_delta_weight(lora_model):
    model = lora_model(b_std=0.1)
    modules = lora_modules(model)
    assert len(modules) == 4
    for _, module in modules:
        ours = delta_weight(module)
        assert torch.allclose(ours, module.get_delta_weight("default"), rtol=1e-6, atol=1e-7)
        assert ours.shape == module.get_base_layer().weight.shape == update_shape(module)
        ours.sum().backward()  # differentiable in A and B
        assert module.lora_A["default"].weight.grad is not None and module.lora_B["default"].weight.grad is not None


def test_fan_in_fan_out_and_a_named_adapter():
    model = tiny_gpt2(adapter="other")
    assert lora_modules(model) == []  # no adapter called "default"
    modules = lora_modules(model, "other")
    assert len(modules) == 4
    for _, module in modules:
        ours = delta_weight(module, "other")
        base = module.get_base_layer().weight
        assert module.fan_in_fan_out and ours.shape == base.shape == update_shape(module, "other")
        assert base.shape[0] != base.shape[1]  # [in, out] differs from [out, in]: the transpose is exercised
        assert torch.allclose(ours, module.get_delta_weight("other"), rtol=1e-12, atol=1e-14)


def _base_weight_gradients(model: torch.nn.Module, batch: dict, adapter: str = "default") -> dict[str, torch.Tensor]:
    """dL/dW of every LoRA module's frozen base weight, by autograd (the ground truth for hooks)."""
    modules = lora_modules(model, adapter)
    weights = [m.get_base_layer().weight for _, m in modules]
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = torch.autograd.grad(causal_lm_loss(model, batch), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    return {name: g for (name, _), g in zip(modules, grads)}


def test_hlora_exact_estimator_on_conv1d_is_the_base_weight_gradient(make_ctx):
    model = tiny_gpt2()
    batch = collate(random_examples(4, 8, seed=3), pad_token_id=0)
    truth = _base_weight_gradients(model, batch)
    plugin = HLoRA(estimator="exact")
    ctx = make_ctx("general", model=model, lr=0.1)
    plugin.on_stage_start(ctx)
    causal_lm_loss(model, batch).backward()
    plugin.before_optimizer_step(ctx)
    for g in plugin.groups:
        for i, name in enumerate(g.names):
            assert g.grad_full[i].shape == truth[name].shape  # the exact estimator's g~
            assert torch.allclose(g.grad_full[i], truth[name], rtol=1e-9, atol=1e-12)


def test_hlora_paper_estimator_on_conv1d_reproduces_the_sgd_step(make_ctx):
    """Under plain SGD, eq 11's g~ gives dW(t+1) - dW(t) = -eta g~ exactly, in the base weight's layout."""
    model = tiny_gpt2()
    batch = collate(random_examples(4, 8, seed=4), pad_token_id=0)
    plugin = HLoRA(estimator="paper")
    ctx = make_ctx("general", model=model, lr=0.05)
    plugin.on_stage_start(ctx)
    causal_lm_loss(model, batch).backward()
    before = {n: delta_weight(m).detach() for n, m in lora_modules(model)}
    plugin.before_optimizer_step(ctx)
    estimates = {n: _paper_gradient(g)[i].clone() for g in plugin.groups for i, n in enumerate(g.names)}
    ctx.optimizer.step()
    for name, module in lora_modules(model):
        step = delta_weight(module).detach() - before[name]
        assert torch.allclose(step, -0.05 * estimates[name], rtol=1e-9, atol=1e-13)


def test_ewc_fisher_on_conv1d_is_per_example_squared_gradient():
    model = tiny_gpt2()
    examples = random_examples(3, 6, seed=5)
    fisher, tokens = fisher_diagonal(model, examples, estimator="empirical", batch_size=2)
    expected: dict[str, torch.Tensor] = {}
    for example in examples:  # G_n of each example's summed NLL: the mean loss times its token count
        batch = collate([example], pad_token_id=0)
        count = int((batch["labels"][:, 1:] != -100).sum())
        for name, g in _base_weight_gradients(model, batch).items():
            expected[name] = expected.get(name, 0) + (g * count).square()
    assert tokens == sum(len(e["input_ids"]) - 1 for e in examples)
    for name, value in expected.items():
        got = fisher[f"{name}.base_layer.weight"]
        assert got.shape == value.shape
        assert torch.allclose(got, value / tokens, rtol=1e-9, atol=1e-14)


def test_wise_ft_on_conv1d_and_a_named_adapter_interpolates_the_weights():
    model = tiny_gpt2(adapter="other")
    plugin = WiseFT(alphas=[0.5], adapter="other")
    theta_nu = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    plugin.theta_nu = theta_nu
    dw_nu = {n: delta_weight(m, "other").detach() for n, m in lora_modules(model, "other")}
    randomize_lora_b(model, seed=9, std=0.1)  # the domain stage moved the adapter
    dw_mu = {n: delta_weight(m, "other").detach() for n, m in lora_modules(model, "other")}
    bases = {n: m.get_base_layer().weight.detach().clone() for n, m in lora_modules(model, "other")}
    with plugin.interpolated(model, 0.5):
        for name, module in lora_modules(model, "other"):
            effective = module.get_base_layer().weight + delta_weight(module, "other")
            assert torch.allclose(effective, bases[name] + 0.5 * dw_nu[name] + 0.5 * dw_mu[name], rtol=1e-12,
                                  atol=1e-14)
    for name, module in lora_modules(model, "other"):
        assert torch.equal(module.get_base_layer().weight, bases[name])


@pytest.mark.parametrize("method", ["hlora", "ewc"])
def test_regularized_domain_stage_runs_on_conv1d(method, accelerator):
    from forgetless.methods import resolve

    model = tiny_gpt2().float()
    plugins = resolve([method, "sam"]).plugins
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, precision="fp32", progress=False)
    train_stage(model, random_examples(8, 8), cfg, plugins, stage="general", accelerator=accelerator)
    result = train_stage(model, random_examples(8, 8, seed=2), cfg, plugins, stage="domain", accelerator=accelerator,
                         general_examples=random_examples(8, 8))
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)


def test_wise_ft_is_exact_on_a_bf16_base_and_leaves_it_untouched():
    """The interpolation is a rank-2r LoRA update in float32: nothing is rounded into a bf16 (or quantized) base."""
    from forgetless.models import LoraSettings, attach_lora
    from tests.unit.tiny_model import make_tiny_model

    model = attach_lora(make_tiny_model(0).to(torch.bfloat16), LoraSettings(r=4, alpha=8, dropout=0.0))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA stays fp32
    randomize_lora_b(model, seed=1, std=0.1)
    plugin = WiseFT(alphas=[0.25])
    plugin.theta_nu = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dw_nu = {n: delta_weight(m).detach() for n, m in lora_modules(model)}
    randomize_lora_b(model, seed=2, std=0.1)
    dw_mu = {n: delta_weight(m).detach() for n, m in lora_modules(model)}
    bases = {n: m.get_base_layer().weight.detach().clone() for n, m in lora_modules(model)}
    with plugin.interpolated(model, 0.25):
        for name, module in lora_modules(model):
            assert torch.allclose(delta_weight(module), 0.75 * dw_nu[name] + 0.25 * dw_mu[name], rtol=1e-6, atol=1e-8)
            assert torch.equal(module.get_base_layer().weight, bases[name])
    for name, module in lora_modules(model):
        assert torch.equal(delta_weight(module), dw_mu[name])


# ------------------------------------------------------------------- weighted_distance (HLoRA's and EWC's term)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_update_difference_is_the_two_products_exactly_zero_and_accurate_when_close(fan_in_fan_out):
    """update_difference (one rank-2r matmul) is s B A - s' B' A' (fp64, closed form by two products, with scalings
    that differ), exactly 0 when the factors are equal, and in fp32 keeps the accuracy of a small difference that two
    rounded products lose to cancellation (both against the fp64 truth of the fp32 inputs)."""
    from forgetless.lora import scaled_update, update_difference

    g = torch.Generator().manual_seed(1)
    n, r, out, inp = 3, 4, 24, 16
    a, a2 = torch.randn(2, n, r, inp, generator=g, dtype=torch.float64)
    b, b2 = torch.randn(2, n, out, r, generator=g, dtype=torch.float64)
    s, s2 = (torch.tensor(v, dtype=torch.float64).view(-1, 1, 1) for v in ([0.5, 2.0, 1.5], [1.0, 2.0, 0.25]))
    two = scaled_update(a, b, s, fan_in_fan_out) - scaled_update(a2, b2, s2, fan_in_fan_out)
    assert torch.allclose(update_difference(a, b, s, a2, b2, s2, fan_in_fan_out), two, rtol=1e-12, atol=1e-13)
    one_scale = scaled_update(a, b, s, fan_in_fan_out) - scaled_update(a2, b2, s, fan_in_fan_out)
    assert torch.allclose(update_difference(a, b, s, a2, b2, None, fan_in_fan_out), one_scale, rtol=1e-12, atol=1e-13)
    for other_scale in (None, s.clone()):  # exactly 0 at equal factors
        assert not update_difference(a, b, s, a.clone(), b.clone(), other_scale, fan_in_fan_out).any()
    wider = update_difference(a, b, s, torch.cat([a2, a2[:, :1]], 1), torch.cat([b2, 0 * b2[..., :1]], 2), s2,
                              fan_in_fan_out)  # ranks that differ: the two products
    assert torch.allclose(wider, two, rtol=1e-12, atol=1e-13)
    # a step of relative size 1e-4 (one optimizer step): the fp32 difference against the fp64 one
    a_step, b_step = a + 1e-4 * torch.randn_like(a), b + 1e-4 * torch.randn_like(b)
    f32 = [t.float() for t in (a, b, s, a_step, b_step)]
    a, b, s, a_step, b_step = (t.double() for t in f32)  # the truth of the fp32 inputs
    truth = scaled_update(a, b, s, fan_in_fan_out) - scaled_update(a_step, b_step, s, fan_in_fan_out)
    mine = update_difference(f32[0], f32[1], f32[2], f32[3], f32[4], None, fan_in_fan_out).double()  # one scaling
    products = (scaled_update(f32[0], f32[1], f32[2], fan_in_fan_out)
                - scaled_update(f32[3], f32[4], f32[2], fan_in_fan_out)).double()
    error = ((mine - truth).norm() / truth.norm()).item()
    assert error < 1e-5 and error < 0.05 * ((products - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("chunk", [None, 1, 40])  # default (one chunk here), one module per chunk, two modules
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("anchor", ["none", "dense", "factors", "factors-same-rank"])
def test_weighted_distance_is_the_formula_with_its_gradient(fan_in_fan_out, anchor, chunk):
    from forgetless.lora import delta_from_factors, weighted_distance

    g = torch.Generator().manual_seed(0)
    n, r, out, inp = 3, 2, 5, 4
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_() for shape in ((n, r, inp),
                                                                                                  (n, out, r)))
    scale = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64).view(-1, 1, 1)
    shape = (n, inp, out) if fan_in_fan_out else (n, out, inp)
    weight, coeff = torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    ref_rank = r if anchor == "factors-same-rank" else 3  # the same rank: one rank-2r matmul; else two products
    ref_a, ref_b = (torch.randn(ref_rank, inp, generator=g, dtype=torch.float64).expand(n, -1, -1).clone(),
                    torch.randn(n, out, ref_rank, generator=g, dtype=torch.float64))
    ref_scale = torch.tensor([1.0, 0.25, 1.5], dtype=torch.float64).view(-1, 1, 1)  # not the current scalings
    ref = delta_from_factors(ref_a, ref_b, ref_scale, fan_in_fan_out)
    kwargs = {"none": {}, "dense": {"ref": ref}, "factors": {"ref_factors": (ref_a, ref_b, ref_scale)},
              "factors-same-rank": {"ref_factors": (ref_a, ref_b, ref_scale)}}[anchor]
    kwargs["chunk_elements"] = chunk

    def fn(a, b):
        return weighted_distance(a, b, scale, weight, coeff, fan_in_fan_out, **kwargs)

    anchor_value = 0 if anchor == "none" else ref
    formula = (coeff * (weight * (delta_from_factors(a, b, scale, fan_in_fan_out) - anchor_value).square())
               .sum(dim=(1, 2))).sum()
    value = fn(a, b)
    assert value.item() == pytest.approx(formula.item(), rel=1e-13) and value.item() > 0
    for mine, theirs in zip(torch.autograd.grad(value, (a, b)), torch.autograd.grad(formula, (a, b))):
        assert torch.allclose(mine, theirs, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(fn, (a, b))  # finite differences
    if anchor.startswith("factors"):  # at the anchor exactly 0 (a rank-2 update stacked as rank 3 with a zero row: ~0)
        at_a = torch.cat([a.detach(), torch.zeros(n, 1, inp, dtype=torch.float64)], dim=1)
        at_b = torch.cat([b.detach(), torch.zeros(n, out, 1, dtype=torch.float64)], dim=2)
        exact = weighted_distance(a.detach().clone().requires_grad_(), b.detach(), scale, weight, coeff,
                                  fan_in_fan_out, ref_factors=(a.detach(), b.detach(), scale))
        assert exact.item() == 0.0
        assert weighted_distance(a, b, scale, weight, coeff, fan_in_fan_out,
                                 ref_factors=(at_a, at_b, scale)).item() == pytest.approx(0.0, abs=1e-12)


def test_weighted_distance_keeps_no_dense_tensor_for_the_backward():
    """What autograd keeps between forward and backward: no [n, out, in] tensor, only the factors' gradients (the
    formula through plain autograd keeps several dense tensors)."""
    from forgetless.lora import delta_from_factors, weighted_distance

    n, r, out, inp = 2, 2, 64, 48
    a, b = torch.randn(n, r, inp, requires_grad=True), torch.randn(n, out, r, requires_grad=True)
    scale, weight, ref = torch.ones(n, 1, 1), torch.rand(n, out, inp), torch.randn(n, out, inp)
    dense = out * inp  # one module's dW

    def kept(fn) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        return len({(t.data_ptr(), t.numel()) for t in saved if t.numel() >= dense})

    assert kept(lambda: weighted_distance(a, b, scale, weight, ref=ref)) == 0
    assert kept(lambda: (weight * (delta_from_factors(a, b, scale) - ref).square()).sum()) >= 2
    with torch.no_grad():  # no gradient wanted: the value alone, the same number
        value = weighted_distance(a, b, scale, weight, ref=ref)
    assert torch.equal(value, weighted_distance(a, b, scale, weight, ref=ref).detach())
