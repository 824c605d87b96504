"""Replay (rehearsal mixing) and WiSE-FT (weight interpolation): exact counts, determinism, interpolation math;
the model-level tests on every device."""

import pytest
import torch

from forgetless.lora import lora_modules
from forgetless.methods import resolve
from forgetless.methods.replay import Replay, replay_count, sample_indices
from forgetless.methods.wise_ft import FILENAME, WiseFT
from forgetless.training.loop import TrainConfig, train_stage
from tests.unit.tiny_model import random_examples


def tagged(prefix, n):
    return [{"input_ids": [3, 4], "labels": [3, 4], "tag": f"{prefix}{i}"} for i in range(n)]


# --------------------------------------------------------------------------------------------------- replay
def test_replay_fraction_of_mixed_set(make_ctx):
    domain, general = tagged("d", 30), tagged("g", 100)
    mixed = Replay(fraction=0.25).prepare_examples(make_ctx("domain", general_examples=general), domain)
    assert len(mixed) == 40 and mixed[:30] == domain
    replayed = [e["tag"] for e in mixed[30:]]
    assert all(t.startswith("g") for t in replayed) and len(set(replayed)) == 10  # without replacement
    assert replay_count(30, 0.25) == 10 and replay_count(10, 0.5) == 10 and replay_count(7, 0.0) == 0


def test_replay_is_deterministic_in_the_stage_seed(make_ctx):
    domain, general = tagged("d", 30), tagged("g", 100)

    def tags(seed):
        ctx = make_ctx("domain", general_examples=general, seed=seed)
        return [e["tag"] for e in Replay(fraction=0.25).prepare_examples(ctx, domain)[30:]]

    assert tags(0) == tags(0)
    assert tags(0) != tags(1)


def test_replay_repeats_a_small_pool_evenly():
    idx = sample_indices(3, 7, seed=0)
    assert len(idx) == 7 and sorted(idx[:3]) == [0, 1, 2] and sorted(idx[3:6]) == [0, 1, 2]


def test_replay_only_in_domain_stage_and_clear_error(make_ctx):
    domain = tagged("d", 8)
    assert Replay().prepare_examples(make_ctx("general", general_examples=tagged("g", 5)), domain) is domain
    with pytest.raises(ValueError, match="general-text examples"):
        Replay().prepare_examples(make_ctx("domain"), domain)
    with pytest.raises(ValueError):
        Replay(fraction=1.0)


def test_replay_through_train_stage_and_registry(lora_model, accelerator):
    recipe = resolve(["lora-mu", {"name": "replay", "fraction": 0.5}])
    assert recipe.stages == ("domain",) and isinstance(recipe.plugins[0], Replay)
    assert resolve(["hlora", "replay"]).stages == ("general", "domain")
    model = lora_model(r=2, alpha=4)
    result = train_stage(model, random_examples(4, 8), TrainConfig(max_steps=1, batch_size=4, progress=False,
                                                                    precision="fp32"),
                         recipe.plugins, stage="domain", general_examples=random_examples(6, 8, seed=3),
                         accelerator=accelerator)
    assert result.extras["replay_examples"] == 4


# -------------------------------------------------------------------------------------------------- wise-ft
@pytest.fixture
def trained_pair(lora_model, make_ctx):
    """``trained_pair(plugin)``: a model whose trainable weights are theta_nu at the general stage's end, then moved
    to theta_mu (the plugin's hooks driven by hand); returns the model, theta_nu and theta_mu."""

    def build(plugin):
        model = lora_model(r=2, alpha=4)
        ctx = make_ctx("general", model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in ctx.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.1)
        plugin.on_stage_end(ctx)
        nu = {n: p.detach().clone() for n, p in ctx.trainable_parameters()}
        dctx = make_ctx("domain", model)
        plugin.on_stage_start(dctx)
        with torch.no_grad():
            for _, p in dctx.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.1)
        plugin.on_stage_end(dctx)
        mu = {n: p.detach().clone() for n, p in dctx.trainable_parameters()}
        return model, nu, mu

    return build


def current(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def effective_weights(model):
    """W + s B A of every LoRA module (float64)."""
    out = {}
    for name, m in lora_modules(model):
        a, b = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        out[name] = m.get_base_layer().weight.double() + float(m.scaling["default"]) * b @ a
    return out


def test_wise_ft_interpolates_the_full_weights_of_lora(trained_pair, device, tol):
    plugin = WiseFT(alphas=[0.0, 0.3, 1.0])
    model, nu, mu = trained_pair(plugin)
    base_before = {n: m.get_base_layer().weight.detach().clone() for n, m in lora_modules(model)}
    at_mu = effective_weights(model)
    with torch.no_grad():  # the model at theta_nu, by setting its factors
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(nu[n])
    at_nu = effective_weights(model)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(4)).to(device)
    logits_nu = model(input_ids=tokens).logits
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(mu[n])
    assert any(not torch.allclose(at_nu[n], at_mu[n]) for n in at_mu)
    for label, setup in plugin.evaluation_variants(model):
        alpha = float(label.split("=")[1].rstrip(")"))
        with setup:
            w = effective_weights(model)
            for n in w:  # W_alpha = W + (1 - alpha) dW_nu + alpha dW_mu
                assert torch.allclose(w[n], (1 - alpha) * at_nu[n] + alpha * at_mu[n], atol=tol(1e-6)), (label, n)
            if alpha == 0.0:
                assert torch.allclose(model(input_ids=tokens).logits, logits_nu, atol=tol(1e-5))
        assert all(torch.equal(current(model)[n], mu[n]) for n in mu)  # the factors are back at theta_mu
        for n, m in lora_modules(model):
            assert torch.equal(m.get_base_layer().weight, base_before[n])  # restored bit-exactly


def test_wise_ft_factor_space_interpolation_exact_and_restored(trained_pair, tol):
    plugin = WiseFT(alphas=[0.0, 0.5, 1.0], space="factors")
    model, nu, mu = trained_pair(plugin)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    seen = []
    for label, setup in plugin.evaluation_variants(model):
        with setup:
            w = current(model)
            seen.append(label)
            if label == "wise-ft(alpha=0.0)":
                assert all(torch.equal(w[n], nu[n]) for n in nu)
            elif label == "wise-ft(alpha=1.0)":
                assert all(torch.equal(w[n], mu[n]) for n in mu)
            else:
                assert all(torch.allclose(w[n], (nu[n] + mu[n]) / 2, atol=tol(1e-7)) for n in nu)
        assert all(torch.equal(current(model)[n], mu[n]) for n in mu)  # theta_mu restored exactly
    assert seen == ["wise-ft(alpha=0.0)", "wise-ft(alpha=0.5)", "wise-ft(alpha=1.0)"]
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_wise_ft_of_an_adapter_the_model_lacks_is_an_error_not_factor_interpolation(trained_pair):
    """``adapter`` naming no adapter of the model left weight space with no LoRA pair, so every LoRA factor was
    interpolated directly (factor space, other numbers) without a word."""
    plugin = WiseFT(alphas=[0.3], adapter="defualt")
    model, _, mu = trained_pair(plugin)
    (_, setup), = plugin.evaluation_variants(model)
    with pytest.raises(ValueError, match="no LoRA adapter 'defualt' to interpolate in weight space"):
        with setup:
            pass
    assert all(torch.equal(current(model)[n], mu[n]) for n in mu)


def test_wise_ft_restores_on_error(trained_pair):
    plugin = WiseFT(alphas=[0.3])
    model, _, mu = trained_pair(plugin)
    (_, setup), = plugin.evaluation_variants(model)
    with pytest.raises(RuntimeError):
        with setup:
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(current(model)[n], mu[n]) for n in mu)


def test_wise_ft_state_roundtrip(tmp_path, trained_pair, make_ctx, tol):
    plugin = WiseFT(alphas=[0.25], space="factors")
    model, nu, mu = trained_pair(plugin)
    plugin.save_state(tmp_path)
    assert (tmp_path / FILENAME).is_file()
    fresh = WiseFT(alphas=[0.25], space="factors")
    fresh.load_state(tmp_path)
    fresh.on_stage_start(make_ctx("domain", model))  # must not overwrite the loaded theta_nu
    (label, setup), = fresh.evaluation_variants(model)
    with setup:
        w = current(model)
    assert label == "wise-ft(alpha=0.25)"
    assert all(torch.allclose(w[n], 0.75 * nu[n] + 0.25 * mu[n], atol=tol(1e-7)) for n in nu)
    # a cached general stage trained without wise-ft has no file: theta_nu is then the adapter the domain stage
    # starts from (here the model as it is, at mu)
    shared = WiseFT(alphas=[0.25], space="factors")
    shared.load_state(tmp_path / "nowhere")
    shared.on_stage_start(make_ctx("domain", model))
    assert shared.theta_nu.keys() == mu.keys() and all(torch.equal(shared.theta_nu[n], mu[n]) for n in mu)


def test_wise_ft_without_general_stage_uses_domain_start(lora_model, accelerator, tol):
    recipe = resolve(["lora-mu", {"name": "wise-ft", "alphas": [0.0]}])
    assert recipe.stages == ("domain",)
    plugin = recipe.plugins[0]
    model = lora_model(r=2, alpha=4)
    start, start_w = current(model), effective_weights(model)
    train_stage(model, random_examples(4, 8), TrainConfig(max_steps=2, batch_size=4, lr=1e-2, progress=False,
                                                           precision="fp32"), [plugin], stage="domain",
                accelerator=accelerator)
    after, after_w = current(model), effective_weights(model)
    assert any(not torch.equal(after[n], start[n]) for n in start)
    assert any(not torch.allclose(after_w[n], start_w[n]) for n in start_w)
    (_, setup), = plugin.evaluation_variants(model)
    with setup:  # alpha 0: the untouched base model, W + dW at the domain stage's start
        w = effective_weights(model)
        assert all(torch.allclose(w[n], start_w[n], atol=tol(1e-6)) for n in start_w)
    assert all(torch.equal(current(model)[n], after[n]) for n in after)
    assert all(torch.equal(effective_weights(model)[n], after_w[n]) for n in after_w)
