"""HLoRA's mathematics on tiny models (float64, on every device): path integral (eqs 8-13), regularizer
(eqs 14-16), persistence."""

import copy

import pytest
import torch

from forgetless.lora import delta_weight, lora_modules
from forgetless.methods import resolve
from forgetless.methods.hlora import FILENAME, HLoRA, layer_coefficients, load_importance
from forgetless.training.batches import collate
from forgetless.training.hooks import Method
from forgetless.training.loop import TrainConfig, train_stage
from forgetless.training.loss import causal_lm_loss
from tests.unit.gradcheck import central_differences
from tests.unit.tiny_model import fused_and_plain, random_examples, randomize_lora_b, to_device


def batches(n=3, seed=0, device="cpu"):
    return [to_device(collate(random_examples(2, 8, seed=seed + i), pad_token_id=0), device) for i in range(n)]


def lora_ab(module):
    return module.lora_A["default"].weight, module.lora_B["default"].weight, float(module.scaling["default"])


def sgd_stage(ctx, plugin, steps, data, record=None):
    """Drive the plugin's hooks around the plain SGD loop of ``ctx.optimizer``, as train_stage would."""
    model, opt = ctx.model, ctx.optimizer
    plugin.on_stage_start(ctx)
    history = []
    for t in range(steps):
        ctx.step, ctx.scalars = t, {}
        loss = causal_lm_loss(model, data[t % len(data)])
        extra = plugin.extra_loss(ctx, data[t % len(data)])
        (loss if extra is None else loss + extra).backward()
        plugin.before_optimizer_step(ctx)
        if record is not None:
            record.append({n: tuple(x.detach().clone() for x in (m.lora_A["default"].weight, m.lora_B["default"].weight,
                                                                m.lora_A["default"].weight.grad,
                                                                m.lora_B["default"].weight.grad))
                           for n, m in lora_modules(model)})
        opt.step()
        plugin.after_optimizer_step(ctx)
        opt.zero_grad(set_to_none=True)
        history.append(dict(ctx.scalars))
    plugin.on_stage_end(ctx)
    return ctx, history


@pytest.fixture
def general_then_domain(lora_model, make_ctx, device):
    """``general_then_domain(**options)``: a float64 model after 3 SGD steps of HLoRA's general stage, and the plugin."""

    def build(**options):
        model = lora_model(dtype=torch.float64)
        plugin = HLoRA(**options)
        sgd_stage(make_ctx("general", model, lr=0.05), plugin, 3, batches(device=device))
        return model, plugin

    return build


# --------------------------------------------------------------------------------------------- eqs 8-13
def test_paper_estimator_path_integral_matches_independent_computation(lora_model, make_ctx, device, tol):
    model, lr, xi = lora_model(dtype=torch.float64), 0.05, 1e-3
    plugin = HLoRA(xi=xi, xi_mode="absolute")  # eq 13 with the paper's constant xi
    record = []
    sgd_stage(make_ctx("general", model, lr=lr), plugin, 4, batches(device=device), record)
    final = {n: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(), float(m.scaling["default"]))
             for n, m in lora_modules(model)}
    for name, (a_end, b_end, s) in final.items():
        omega = torch.zeros_like(plugin.importance[name])
        for t, rec in enumerate(record):
            a, b, ga, gb = rec[name]
            a1, b1 = (record[t + 1][name][:2] if t + 1 < len(record) else (a_end, b_end))
            dw, dw1 = s * b @ a, s * b1 @ a1
            g_tilde = s * (gb @ a + b @ ga - lr * gb @ ga)  # eq 11
            assert torch.allclose(dw1 - dw, -lr * g_tilde, atol=tol(1e-12, torch.float64))  # eq 11 is SGD's implied full gradient
            omega -= g_tilde * (dw1 - dw)
        delta = s * b_end @ a_end  # B starts at zero
        expected = omega / (delta**2 + xi)  # eq 13
        assert torch.allclose(plugin.importance[name], expected, rtol=tol(1e-9, torch.float64), atol=1e-14), name
        assert torch.equal(plugin.reference[name], s * b_end @ a_end) or torch.allclose(plugin.reference[name], delta)
        assert (plugin.importance[name] >= 0).all()  # under SGD omega = lr * sum |g~|^2
        assert plugin.importance[name].abs().sum() > 0


def test_running_clamp_keeps_omega_nonnegative_under_adam(lora_model, accelerator, examples):
    model = lora_model()
    plugin = HLoRA(nonnegative="running")
    train_stage(model, examples, TrainConfig(max_steps=4, batch_size=4, grad_accum=2, lr=1e-2,
                                                           precision="fp32", progress=False),
                [plugin], stage="general", accelerator=accelerator)
    assert all((o >= 0).all() for o in plugin.importance.values())


def _quadratic_lora(seed=0, n_in=5, n_out=6):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("lin", torch.nn.Linear(n_in, n_out, bias=False))
    net = net.double()
    model = get_peft_model(net, LoraConfig(r=3, lora_alpha=3, target_modules=["lin"], lora_dropout=0.0)).double()
    target = torch.randn(n_out, n_in, dtype=torch.float64)
    return model, target


def test_exact_estimator_path_integral_of_quadratic_loss(make_ctx):
    model, w_star = _quadratic_lora()
    (name, module), = lora_modules(model)
    randomize_lora_b(model, std=0.3)
    w0 = module.base_layer.weight.detach()
    a, b, s = lora_ab(module)
    eye = torch.eye(w0.shape[1], dtype=torch.float64)

    def full():
        return w0 + s * b.detach() @ a.detach()

    start = full()
    plugin = HLoRA(estimator="exact", xi=1.0, xi_mode="absolute", nonnegative="none")  # omega as accumulated
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=2e-3)
    ctx = make_ctx("general", model, optimizer=opt)
    plugin.on_stage_start(ctx)
    for _ in range(1500):
        y = model(eye)  # y = I W^T, so L = 1/2 ||W - W*||^2 is quadratic in the full weight
        (0.5 * (y - w_star.T).square().sum()).backward()
        plugin.before_optimizer_step(ctx)
        opt.step()
        plugin.after_optimizer_step(ctx)
        opt.zero_grad(set_to_none=True)
    plugin.on_stage_end(ctx)
    end = full()
    delta = end - start
    omega = plugin.importance[name] * (delta**2 + 1.0)
    # -int (W - W*) dW, element by element = L_i(start) - L_i(end)
    analytic = 0.5 * (start - w_star) ** 2 - 0.5 * (end - w_star) ** 2
    assert analytic.abs().max() > 1e-2  # the weights did move
    assert torch.allclose(omega, analytic, atol=2e-3 * analytic.abs().max())
    assert torch.allclose(plugin.reference[name], s * b.detach() @ a.detach())


def test_exact_full_weight_gradient_equals_autograd_of_merged_linear(lora_model, make_ctx, device, tol):
    model = lora_model(dtype=torch.float64, b_std=0.05)
    plugin = HLoRA(estimator="exact")
    ctx = make_ctx("general", model)
    plugin.on_stage_start(ctx)
    data = batches(2, device=device)
    for batch in data:  # two micro-batches, loss / accum as the loop does
        (causal_lm_loss(model, batch) / 2).backward()
    got = {n: g.grad_full[i].clone() for g in plugin.groups for i, n in enumerate(g.names)}

    merged = copy.deepcopy(model).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    weights = {}
    for name in got:
        short = name.removeprefix("base_model.model.")
        lin = merged.get_submodule(short)
        lin.weight.requires_grad_(True)
        weights[name] = lin.weight
    for batch in data:
        (causal_lm_loss(merged, batch) / 2).backward()
    for name, w in weights.items():
        assert torch.allclose(got[name], w.grad, rtol=tol(1e-8, torch.float64), atol=1e-12), name
    plugin.on_stage_end(ctx)


# -------------------------------------------------------------------------------------------- eqs 14-16
def test_regularizer_gradient_matches_central_differences(general_then_domain, make_ctx, tol):
    model, plugin = general_then_domain(xi=1e-2)
    plugin.on_stage_start(make_ctx("domain", model))
    randomize_lora_b(model, seed=3, std=0.05)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A["default"].weight.add_(0.05 * torch.randn_like(m.lora_A["default"].weight))
    reg = plugin.regularizer()
    assert reg > 0
    params = [p for _, m in lora_modules(model) for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    grads = torch.autograd.grad(reg, params)
    grad_of = dict(zip(map(id, params), grads))
    for p, idx, fd in central_differences(plugin.regularizer, params, h=1e-6):
        grad = grad_of[id(p)][idx].item()
        assert abs(fd - grad) <= tol(1e-6, torch.float64) * max(1.0, abs(fd)), (idx, fd, grad)


def test_layer_coefficients_sum_to_one_and_flatten_with_temperature():
    norms = torch.tensor([1.0, 5.0, 20.0, 0.1], dtype=torch.float64)
    for scale in ("max", "mean", "none"):
        for t in (0.1, 1.0, 10.0):
            assert torch.isclose(layer_coefficients(norms, t, scale).sum(), torch.tensor(1.0, dtype=torch.float64))
    uniform = torch.full_like(norms, 0.25)
    spreads = [float((layer_coefficients(norms, t) - uniform).abs().max()) for t in (0.5, 1, 10, 100, 1e6)]
    assert spreads == sorted(spreads, reverse=True) and spreads[-1] < 1e-6
    assert layer_coefficients(norms, 1.0, "none").max() > 0.99  # eq 15 as printed saturates
    c = layer_coefficients(norms, 1.0)  # norms / max norm, T = 1: ratios bounded by e
    assert c.max() / c.min() <= torch.e + 1e-9 and c.argmax() == 2
    c = layer_coefficients(norms)  # default T = 0.25: ratios bounded by e**4, closed form
    expected = torch.softmax(norms / 20.0 / 0.25, dim=0)
    assert torch.allclose(c, expected) and c.max() / c.min() <= torch.e ** 4 + 1e-9
    assert torch.equal(layer_coefficients(norms, layer_wise=False), uniform)
    # each scale's closed form (a sum to one holds for any softmax: it told the scales apart from nothing)
    for scale, by in (("mean", norms.mean()), ("max", norms.max()), ("none", 1.0)):
        assert torch.allclose(layer_coefficients(norms, 0.5, scale), torch.softmax(norms / by / 0.5, dim=0)), scale


def test_no_layer_variant_uses_uniform_coefficients(lora_model, make_ctx, device):
    plugin, = resolve("hlora-no-layer").plugins
    assert isinstance(plugin, HLoRA) and not plugin.layer_wise
    model = lora_model(dtype=torch.float64)
    sgd_stage(make_ctx("general", model, lr=0.05), plugin, 2, batches(device=device))
    ctx = make_ctx("domain", model)
    plugin.on_stage_start(ctx)
    c = ctx.extras["hlora_layer_coefficients"]
    assert len(c) == 4 and all(abs(v - 0.25) < 1e-12 for v in c.values())
    full, = resolve({"name": "hlora", "temperature": 2.0}).plugins
    assert full.layer_wise and full.temperature == 2.0


def test_no_layer_variant_shares_the_general_stage_of_hlora(tmp_path, lora_model, make_ctx, device):
    from forgetless.methods import general_stage_entries

    # same general-stage signature (the experiment's cache key), whatever the domain-only options
    key = general_stage_entries(resolve({"name": "hlora", "phi": 0.1}).entries)
    assert general_stage_entries(resolve("hlora-no-layer").entries) == key == [{"name": "hlora"}]
    assert general_stage_entries(resolve({"name": "hlora", "estimator": "exact"}).entries) != key
    # ... and the state one records is the state the other would have recorded
    recorded = {}
    for name in ("hlora", "hlora-no-layer"):
        model = lora_model(dtype=torch.float64, b_std=0.05)
        plugin, = resolve(name).plugins
        sgd_stage(make_ctx("general", model, lr=0.05), plugin, 2, batches(device=device))
        plugin.save_state(tmp_path / name)
        recorded[name] = load_importance(tmp_path / name / FILENAME)
    for n, omega in recorded["hlora"]["omega"].items():
        assert torch.equal(omega, recorded["hlora-no-layer"]["omega"][n])
        assert torch.equal(recorded["hlora"]["dw_ref"][n], recorded["hlora-no-layer"]["dw_ref"][n])
    uniform, = resolve("hlora-no-layer").plugins
    uniform.load_state(tmp_path / "hlora")
    model = lora_model(dtype=torch.float64, b_std=0.05)
    sgd_stage(make_ctx("general", model, lr=0.05), HLoRA(), 2, batches(device=device))
    ctx = make_ctx("domain", model)
    uniform.on_stage_start(ctx)
    assert all(abs(v - 0.25) < 1e-12 for v in ctx.extras["hlora_layer_coefficients"].values())


def test_regularizer_zero_at_first_domain_step_and_reference_fixed(lora_model, accelerator, examples):
    model = lora_model()
    plugin = HLoRA(phi=1.0, phi_scale="absolute")  # eq 16 as printed: the scaled term is the regularizer itself

    class Other(Method):  # composes with another plugin in the same list
        def __init__(self):
            self.steps = 0

        def after_optimizer_step(self, ctx):
            self.steps += 1

    other = Other()
    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, precision="fp32", progress=False)
    train_stage(model, examples, cfg, [plugin, other], stage="general", accelerator=accelerator)
    ref = {n: t.clone() for n, t in plugin.reference.items()}
    res = train_stage(model, random_examples(8, 8, seed=5), TrainConfig(max_steps=4, batch_size=4, lr=1e-2,
                                                                         precision="fp32", progress=False),
                      [other, plugin], stage="domain", accelerator=accelerator)
    assert other.steps == 7
    assert res.history[0]["reg_loss"] == 0.0 and res.history[0]["reg_loss_scaled"] == 0.0
    assert res.history[-1]["reg_loss"] > 0
    assert abs(res.history[-1]["reg_loss_scaled"] - res.history[-1]["reg_loss"]) < 1e-6 * res.history[-1]["reg_loss"] + 1e-12
    for n, t in plugin.reference.items():
        assert torch.equal(t, ref[n]) and not t.requires_grad
    assert not any(t is p for t in plugin.reference.values() for p in model.parameters())
    coeffs = res.extras["hlora_layer_coefficients"]
    assert abs(sum(coeffs.values()) - 1.0) < 1e-6


# ------------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip_float32_and_bfloat16(tmp_path, general_then_domain, make_ctx):
    model, plugin = general_then_domain()
    plugin.save_state(tmp_path / "f32")
    loaded = load_importance(tmp_path / "f32" / FILENAME)
    assert loaded["metadata"]["modules"] == list(plugin.importance) and loaded["metadata"]["steps"] == 3
    assert loaded["metadata"]["estimator"] == "paper" and loaded["metadata"]["dtype"] == "float32"
    for n in plugin.importance:
        assert torch.equal(loaded["omega"][n], plugin.importance[n].float().cpu())
        # dW_nu as its factors, at the factors' own precision (float64 here: exact), with their scaling and layout
        (a, b, s, fan), (la, lb, ls, lfan) = plugin.reference.factors[n], loaded["dw_ref"].factors[n]
        assert torch.equal(la, a.cpu()) and torch.equal(lb, b.cpu()) and (ls, lfan) == (s, fan)
        assert la.dtype == torch.float64
        assert torch.equal(loaded["dw_ref"][n], plugin.reference[n].cpu())
        assert loaded["metadata"]["shapes"][n] == list(plugin.importance[n].shape)

    plugin.storage_dtype = "bfloat16"
    plugin.save_state(tmp_path / "bf16")
    omega_bytes = sum(t.numel() * 4 for t in plugin.importance.values())  # float32 in the first file
    sizes = {folder: (tmp_path / folder / FILENAME).stat().st_size for folder in ("f32", "bf16")}
    assert sizes["bf16"] < sizes["f32"] - 0.4 * omega_bytes  # omega halves; the factors stay
    low = load_importance(tmp_path / "bf16")
    for n in plugin.importance:
        assert low["omega"][n].dtype == torch.bfloat16
        assert torch.allclose(low["omega"][n].double(), plugin.importance[n].cpu(), rtol=2**-7, atol=0)
        assert torch.equal(low["dw_ref"].factors[n][0], plugin.reference.factors[n][0].cpu())  # factors stay exact

    # A fresh plugin reads the file lazily and regularizes exactly like the one that recorded it: the stored factors
    # are the adapter's own, so dW_nu is exact without snapping.
    for folder in ("f32", "bf16"):
        fresh = HLoRA()
        fresh.load_state(tmp_path / folder)
        ctx = make_ctx("domain", model)
        fresh.on_stage_start(ctx)
        assert fresh.regularizer().item() == 0.0
        assert not ctx.extras["hlora_reference_snapped"]


def _write_dense_file(plugin, model, folder, dtype):
    """The file HLoRA wrote before dW_nu was kept as factors: dense ``{module}.dw_ref`` (the group's batched product,
    as it was computed), no reference metadata."""
    from forgetless.lora import group_modules
    from forgetless.methods.hlora import STATE

    tensors = {}
    for g in group_modules(lora_modules(model)):
        dense = g.delta_weight()
        for i, n in enumerate(g.names):
            tensors[f"{n}.omega"], tensors[f"{n}.dw_ref"] = plugin.importance[n], dense[i]
    meta = {k: v for k, v in plugin.metadata.items() if k != "reference"}
    STATE.save(folder, tensors, meta, dtype)


def test_a_file_with_a_dense_reference_still_loads(tmp_path, general_then_domain, lora_model, make_ctx, device, tol):
    """Old cached general stages stay usable. Continuing the adapter that gave the dense dW_nu, its factors replace it
    (the same numbers, without the memory); another adapter keeps the dense tensor and is regularized towards it."""
    model, plugin = general_then_domain(xi=1e-2)
    _write_dense_file(plugin, model, tmp_path / "f64", torch.float64)  # this float64 model's precision
    _write_dense_file(plugin, model, tmp_path / "bf16", torch.bfloat16)
    old = load_importance(tmp_path / "f64")["dw_ref"]
    assert set(old.dense) == set(plugin.importance) and not old.factors
    plugin.on_stage_start(make_ctx("domain", model))
    fresh = {}
    for folder in ("f64", "bf16"):
        fresh[folder] = HLoRA(xi=1e-2)
        fresh[folder].load_state(tmp_path / folder)
        ctx = make_ctx("domain", model)
        fresh[folder].on_stage_start(ctx)
        assert not fresh[folder].reference.dense and all(g.dw_ref is None for g in fresh[folder].groups)
        assert ctx.extras["hlora_reference_snapped"] == (folder == "bf16")  # bf16 matched within its precision
        assert fresh[folder].regularizer().item() == 0.0
    randomize_lora_b(model, seed=3, std=0.05)  # the domain stage moves the adapter
    assert plugin.regularizer() > 0
    assert torch.equal(fresh["f64"].regularizer(), plugin.regularizer())

    other = lora_model(dtype=torch.float64, b_std=0.05, b_seed=11)  # an adapter that is not dW_nu
    kept = HLoRA(xi=1e-2)
    kept.load_state(tmp_path / "f64")
    ctx = make_ctx("domain", other)
    kept.on_stage_start(ctx)
    assert kept.reference.dense and all(g.dw_ref is not None for g in kept.groups)
    c = ctx.extras["hlora_layer_coefficients"]
    dense = load_importance(tmp_path / "f64")["dw_ref"]
    expected = sum(c[n] * (kept.importance[n] * (delta_weight(m) - dense[n].to(device)).square()).sum()
                   for n, m in lora_modules(other))
    got = kept.regularizer()
    assert got > 0 and torch.allclose(got, expected, rtol=tol(1e-12, torch.float64))
    kept.save_state(tmp_path / "again")  # a dense reference that was not matched is saved dense, as it was read
    assert load_importance(tmp_path / "again")["dw_ref"].dense


def test_load_into_mismatched_model_names_the_module(tmp_path, general_then_domain, lora_model, make_ctx):
    _, plugin = general_then_domain()
    plugin.save_state(tmp_path)
    other = lora_model(dtype=torch.float64, targets=("q_proj", "k_proj"))
    fresh = HLoRA()
    fresh.load_state(tmp_path)  # lazy: nothing checked yet
    with pytest.raises(ValueError, match=r"k_proj"):
        fresh.on_stage_start(make_ctx("domain", other))

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / FILENAME), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(tmp_path / FILENAME))
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.v_proj.omega"))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / FILENAME), metadata=metadata)
    model = lora_model(dtype=torch.float64)
    fresh = HLoRA()
    fresh.load_state(tmp_path)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj"):
        fresh.on_stage_start(make_ctx("domain", model))
    with pytest.raises(FileNotFoundError):
        HLoRA().load_state(tmp_path / "nowhere")
    save_file(tensors, str(tmp_path / FILENAME))  # the factors without their scalings: the error names the file
    fresh = HLoRA()
    fresh.load_state(tmp_path)
    with pytest.raises(ValueError, match=r"hlora_importance\.safetensors lacks the scaling of module"):
        fresh.on_stage_start(make_ctx("domain", model))


def test_domain_without_importance_is_a_clear_error(lora_model, make_ctx):
    with pytest.raises(ValueError, match="general stage"):
        HLoRA().on_stage_start(make_ctx("domain", lora_model()))


# ------------------------------------------------------------------------------------------------ plots
def test_plots_write_png_files(tmp_path, lora_model, accelerator, examples):
    from forgetless.reporting.hlora_plots import plot_domain_losses, plot_importance_heatmap

    model = lora_model()
    plugin = HLoRA()
    cfg = TrainConfig(max_steps=2, batch_size=4, precision="fp32", progress=False)
    train_stage(model, examples, cfg, [plugin], stage="general", accelerator=accelerator)
    res = train_stage(model, examples, TrainConfig(max_steps=3, batch_size=4, precision="fp32", progress=False),
                      [plugin], stage="domain", accelerator=accelerator)
    heat, losses = tmp_path / "heat.png", tmp_path / "losses.png"
    plot_importance_heatmap(plugin.importance, heat)
    plot_domain_losses(res.history, losses)
    for p in (heat, losses):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_heatmap_cells_are_the_modules_of_each_numbered_block():
    """Cells were keyed by (last name part, position in the dict when no ``layers.N``): GPT-2's ``h.N`` modules got
    layers 2 and 3 that do not exist, and two experts of one layer overwrote each other."""
    from forgetless.reporting.hlora_plots import OUTSIDE, importance_norms

    def omega(norm):
        return torch.tensor([norm, 0.0])

    gpt2 = {"transformer.h.0.attn.c_attn": omega(1.0), "transformer.h.1.attn.c_attn": omega(2.0),
            "transformer.h.0.mlp.c_proj": omega(3.0), "transformer.h.1.mlp.c_proj": omega(4.0)}
    assert importance_norms(gpt2) == {("attn.c_attn", 0): 1.0, ("attn.c_attn", 1): 2.0, ("mlp.c_proj", 0): 3.0,
                                      ("mlp.c_proj", 1): 4.0}
    moe = {"model.layers.0.mlp.experts.0.down_proj": omega(3.0), "model.layers.0.mlp.experts.1.down_proj": omega(4.0),
           "model.layers.0.mlp.shared_expert.down_proj": omega(5.0), "lm_head": omega(6.0),
           "vision.layers.0.mlp.shared_expert.down_proj": omega(12.0)}  # meets the language model's layer 0
    assert importance_norms(moe) == {("mlp.experts.0.down_proj", 0): 3.0, ("mlp.experts.1.down_proj", 0): 4.0,
                                     ("mlp.shared_expert.down_proj", 0): pytest.approx(13.0), ("lm_head", OUTSIDE): 6.0}


def test_importance_cost_is_recorded(lora_model, accelerator, examples):
    model = lora_model()
    for estimator in ("paper", "exact"):
        plugin = HLoRA(estimator=estimator, storage_dtype="bfloat16")
        res = train_stage(model, examples, TrainConfig(max_steps=2, batch_size=4, precision="fp32",
                                                                     progress=False),
                          [plugin], stage="general", accelerator=accelerator)
        cost = res.extras["importance_cost"]["hlora"]
        assert cost["seconds"] > 0 and cost["steps"] == 2 and cost["tensors"] == 12  # omega, A_nu, B_nu per module
        factors = sum(a.numel() + b.numel() for a, b, _, _ in plugin.reference.factors.values())
        # omega in bf16 + dW_nu as float32 factors
        assert cost["bytes"] == 2 * sum(t.numel() for t in plugin.importance.values()) + 4 * factors


# ------------------------------------------------------------------------- fused per-step work (issue #15)
ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _perturb(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def _lora_params(model):
    return [p for _, m in lora_modules(model) for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]


def _close(a, b, rel):
    return bool(((a - b).abs() <= rel * b.abs().max().clamp(min=torch.finfo(b.dtype).tiny)).all())


@pytest.mark.parametrize("estimator,nonnegative", [("paper", "end"), ("adam", "step"), ("exact", "running")])
def test_fused_path_integral_equals_the_plain_one(lora_model, make_ctx, device, tol, estimator, nonnegative):
    """The importance after 3 steps (fp32, all seven projections: several groups) with each group in one chunk is the
    one computed one module at a time (the plain path)."""
    recorded = {}
    for fused in (True, False):
        model = lora_model(targets=ALL_SEVEN, b_std=0.05)
        plugin = HLoRA(estimator=estimator, nonnegative=nonnegative)
        plugin.fused = fused
        sgd_stage(make_ctx("general", model, lr=0.05), plugin, 3, batches(device=device))
        recorded[fused] = plugin
    assert len(recorded[True].groups) >= 3
    for name, omega in recorded[False].importance.items():
        assert omega.dtype == torch.float32 and omega.abs().sum() > 0
        assert _close(recorded[True].importance[name], omega, tol(1e-6)), name


def test_fused_regularizer_and_gradient_equal_the_plain_loop(lora_model, make_ctx, device, tol):
    model = lora_model(targets=ALL_SEVEN)
    plugin = HLoRA(xi=1e-2)
    sgd_stage(make_ctx("general", model, lr=0.05), plugin, 3, batches(device=device))
    plugin.on_stage_start(make_ctx("domain", model))
    _perturb(model)
    params = _lora_params(model)
    (fused_reg, fused_grads), (plain_reg, plain_grads) = fused_and_plain(plugin, plugin.regularizer, params)
    assert plain_reg.dtype == torch.float32 and plain_reg > 0
    assert _close(fused_reg, plain_reg, tol(1e-6))
    for a, b in zip(fused_grads, plain_grads):
        assert _close(a, b, tol(1e-6))


def test_regularizer_from_factors_is_the_dense_anchors(lora_model, make_ctx, device, tol):
    """dW - dW_nu formed from the factors (one rank-2r matmul) gives what a dense anchor (held since the general
    stage's end, as files written before factors hold it) gives, up to rounding (fp32), and both are the formula;
    at the anchor both are exactly 0."""
    model = lora_model(targets=ALL_SEVEN)
    plugin = HLoRA(xi=1e-2)
    sgd_stage(make_ctx("general", model, lr=0.05), plugin, 3, batches(device=device))
    plugin.on_stage_start(make_ctx("domain", model))
    dense = [g.delta_weight() for g in plugin.groups]  # what the dense version held: dW at the general stage's end
    assert plugin.regularizer().item() == 0.0  # at the anchor
    _perturb(model)
    params = _lora_params(model)
    new = plugin.regularizer()
    new_grads = torch.autograd.grad(new, params)
    factors = [(g.ref_a, g.ref_b, g.ref_scaling) for g in plugin.groups]
    for g, ref in zip(plugin.groups, dense):
        g.ref_a = g.ref_b = g.ref_scaling = None
        g.dw_ref = ref
    held = plugin.regularizer()
    assert new > 0 and _close(new, held, tol(1e-6))
    for a, b in zip(new_grads, torch.autograd.grad(held, params)):
        assert _close(a, b, tol(1e-6))
    formula = None
    for g, ref in zip(plugin.groups, dense):  # eqs 14-15 with autograd
        term = (g.coeff * (g.importance * (g.delta_weight(detach=False) - ref).square()).sum(dim=(1, 2))).sum()
        formula = term if formula is None else formula + term
    assert _close(new, formula, tol(1e-6))
    for a, b in zip(new_grads, torch.autograd.grad(formula, params)):
        assert _close(a, b, tol(1e-6))
    for g, (ref_a, ref_b, ref_scaling) in zip(plugin.groups, factors):
        g.ref_a, g.ref_b, g.ref_scaling, g.dw_ref = ref_a, ref_b, ref_scaling, None
    with torch.no_grad():  # back at the anchor: exactly 0 with the dense anchor too
        for g, (ref_a, ref_b, _) in zip(plugin.groups, factors):
            for i, (pa, pb) in enumerate(zip(g.a_params, g.b_params)):
                pa.copy_(ref_a[i]), pb.copy_(ref_b[i])
    assert plugin.regularizer().item() == 0.0
    for g, ref in zip(plugin.groups, dense):
        g.ref_a = g.ref_b = g.ref_scaling = None
        g.dw_ref = ref
    assert plugin.regularizer().item() == 0.0


class no_host_reads:
    """Inside: reading a tensor's value on the host (``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``)
    raises. Python-level reads only (a C++ read such as ``torch.equal`` is not caught)."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("a per-step path read a tensor's value on the host")

        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("estimator", ["paper", "adam", "exact"])
def test_per_step_paths_read_nothing_from_the_device(lora_model, make_ctx, device, estimator):
    model = lora_model(targets=ALL_SEVEN)
    plugin = HLoRA(estimator=estimator, phi=1.0)
    data = batches(device=device)
    for stage in ("general", "domain"):
        ctx = make_ctx(stage, model, lr=0.05)
        plugin.on_stage_start(ctx)
        for t in range(2):
            ctx.step, ctx.scalars = t, {}
            loss = causal_lm_loss(model, data[t])
            with no_host_reads():
                extra = plugin.extra_loss(ctx, data[t])
            (loss if extra is None else loss + extra).backward()
            with no_host_reads():
                plugin.before_optimizer_step(ctx)
            ctx.optimizer.step()
            with no_host_reads():
                plugin.after_optimizer_step(ctx)
            ctx.optimizer.zero_grad(set_to_none=True)
        plugin.on_stage_end(ctx)
    # the regularizer is left to the loop as a tensor, read at its logging interval
    assert isinstance(ctx.scalars["reg_loss"], torch.Tensor) and not ctx.scalars["reg_loss"].requires_grad


def test_a_checkpoint_with_a_dense_start_resumes_to_the_same_importance(lora_model, make_ctx, device, tol):
    """A general-stage checkpoint written before dW(start) was kept as factors holds it dense (``{i}.dw_start``).
    Resumed from one, the stage ends with the importance of the uninterrupted stage (eq 13's Delta = dW(end) -
    dW(start), B non-zero at the start so that dW(start) matters). In float64: the dense start's Delta is the
    difference of two rounded products, which in float32 differs from the rank-2r one by ~1e-3 of the importance
    here."""
    import copy

    from forgetless.lora import scaled_update

    model = lora_model(dtype=torch.float64, targets=ALL_SEVEN)  # float64: the two Deltas agree but for rounding
    randomize_lora_b(model)
    twin = copy.deepcopy(model)
    data = batches(device=device)
    whole = HLoRA(xi=1e-2)
    sgd_stage(make_ctx("general", model, lr=0.05), whole, 3, data)

    def step(ctx, plugin, t):
        ctx.step, ctx.scalars = t, {}
        causal_lm_loss(twin, data[t]).backward()
        plugin.before_optimizer_step(ctx)
        ctx.optimizer.step()
        plugin.after_optimizer_step(ctx)
        ctx.optimizer.zero_grad(set_to_none=True)

    ctx = make_ctx("general", twin, lr=0.05)
    first = HLoRA(xi=1e-2)
    first.on_stage_start(ctx)
    step(ctx, first, 0)
    state = dict(first.stage_state(ctx))
    for i, g in enumerate(first.groups):  # as an old checkpoint held it
        a, b = state.pop(f"{i}.start_A"), state.pop(f"{i}.start_B")
        state[f"{i}.dw_start"] = scaled_update(a, b, g.scaling, g.fan_in_fan_out)
    resumed = HLoRA(xi=1e-2)
    resumed.on_stage_start(ctx)
    resumed.load_stage_state(ctx, state)
    assert all(isinstance(g.start, torch.Tensor) for g in resumed.groups)
    for t in (1, 2):
        step(ctx, resumed, t)
    resumed.on_stage_end(ctx)
    for name, want in whole.importance.items():
        assert _close(resumed.importance[name], want, tol(1e-9, torch.float64)), name


class _FakeEvent:
    """A CUDA event stand-in: ``elapsed_time`` 2 ms; ``done`` says whether the device has reached it."""

    waits = 0

    def __init__(self, enable_timing=False):
        self.done = False

    def record(self):
        pass

    def query(self):
        return self.done

    def synchronize(self):
        type(self).waits += 1
        self.done = True

    def elapsed_time(self, end):
        return 2.0


def test_timed_sections_on_cuda_never_wait_for_the_device(lora_model, make_ctx, monkeypatch):
    """HLoRA times its recording in every optimizer step. On CUDA the timer records events instead of synchronizing:
    no per-step section waits (torch.cuda.synchronize raises here), and the seconds are the events' device time,
    read once at the end (finished events are folded in as they come)."""
    from forgetless.methods import common

    def refuse(*args, **kwargs):
        raise AssertionError("a timed section synchronized the device")

    made = []

    def event(*args, **kwargs):
        made.append(_FakeEvent())
        return made[-1]

    monkeypatch.setattr(common, "_cuda_event", event)
    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    _FakeEvent.waits = 0
    timer = common.Timer(torch.device("cuda"))
    for i in range(70):
        with timer:
            pass
        if i == 9:
            for e in made:
                e.done = True  # the device reached the first ten sections: folded at the 64th
    assert _FakeEvent.waits == 0 and len(timer._pending) == 60  # the 64th section folded the ten finished ones
    assert timer.seconds == pytest.approx(70 * 0.002) and _FakeEvent.waits == 60 and not timer._pending
    # HLoRA's per-step recording with a CUDA timer (the model stays on the CPU): events only, no wait
    model = lora_model(targets=ALL_SEVEN)
    plugin = HLoRA()
    ctx = make_ctx("general", model, lr=0.05)
    plugin.on_stage_start(ctx)
    plugin._timer, _FakeEvent.waits = common.Timer(torch.device("cuda")), 0
    for t, batch in enumerate(batches(device=next(model.parameters()).device)):
        causal_lm_loss(model, batch).backward()
        plugin.before_optimizer_step(ctx)
        ctx.optimizer.step()
        plugin.after_optimizer_step(ctx)
        ctx.optimizer.zero_grad(set_to_none=True)
    assert _FakeEvent.waits == 0 and len(plugin._timer._pending) == 6
    assert plugin._timer.seconds == pytest.approx(6 * 0.002)


class largest_outputs:
    """Inside: records the number of elements of every new tensor an aten op returns (a TorchDispatchMode; an output
    that shares storage with an input, as an in-place op's or a view's does, allocates nothing and is left out), so a
    test can see the largest tensor a piece of code allocated."""

    def __enter__(self):
        from torch.utils._pytree import tree_leaves
        from torch.utils._python_dispatch import TorchDispatchMode

        sizes = self.sizes = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                        sizes.append(t.numel())
                return out

        self.mode = Record()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("estimator", ["paper", "adam", "exact"])
def test_per_step_work_writes_one_module_at_a_time_with_a_chunk_of_one_module(lora_model, make_ctx, device, estimator,
                                                                             monkeypatch):
    """With chunks of one module, no op of the path integral's step or of the regularizer's forward and backward
    returns a tensor larger than one module's dW: nothing of a whole group's size is written (the group stacks
    several modules), so the transient memory is bounded by the chunk, not by the model."""
    from forgetless import lora

    monkeypatch.setattr(lora, "CHUNK_ELEMENTS", {"cpu": 1, "other": 1})
    model = lora_model(targets=ALL_SEVEN)
    plugin = HLoRA(estimator=estimator)
    ctx = make_ctx("general", model, lr=0.05)
    plugin.on_stage_start(ctx)
    data = batches(device=device)
    causal_lm_loss(model, data[0]).backward()
    plugin.before_optimizer_step(ctx)
    ctx.optimizer.step()
    module = max(g.omega[0].numel() for g in plugin.groups)
    assert any(len(g.names) > 1 for g in plugin.groups)  # groups are larger than a module
    with largest_outputs() as general_step:
        plugin.after_optimizer_step(ctx)
    plugin.on_stage_end(ctx)
    domain = make_ctx("domain", model)
    plugin.on_stage_start(domain)
    _perturb(model)
    with largest_outputs() as regularizer:
        reg = plugin.regularizer()
        reg.backward()
    assert reg > 0 and all(p.grad is not None for p in _lora_params(model))
    assert 0 < max(general_step.sizes) <= module and max(regularizer.sizes) <= module
    monkeypatch.undo()
    monkeypatch.setenv("FORGETLESS_TRITON", "0")  # the torch formula (the fused kernels form no dense tile at all)
    with largest_outputs() as whole:  # the default chunk holds a whole group of this tiny model
        plugin.regularizer().backward()
    assert max(whole.sizes) > module


def test_offload_to_cpu_gives_the_same_importance_and_regularizer(lora_model, make_ctx, device):
    """``offload: cpu`` keeps omega and Omega in CPU memory (pinned on CUDA) and copies chunks to the device: the
    same importance, bit for bit, as keeping them on the device, and the same regularizer (bit for bit on the CPU)
    (fp32, all seven projections, chunks of one module)."""
    from forgetless import lora

    results = {}
    for offload in ("none", "cpu"):
        model = lora_model(targets=ALL_SEVEN, b_std=0.05)
        plugin = HLoRA(offload=offload, estimator="adam")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lora, "CHUNK_ELEMENTS", {"cpu": 1, "other": 1})
            sgd_stage(make_ctx("general", model, lr=0.05), plugin, 3, batches(device=device))
            plugin.on_stage_start(make_ctx("domain", model))
            _perturb(model)
            reg = plugin.regularizer()
            grads = torch.autograd.grad(reg, _lora_params(model))
        held = {g.importance.device.type for g in plugin.groups}
        assert held == ({"cpu"} if offload == "cpu" else {torch.device(device).type})
        results[offload] = ({n: t.cpu() for n, t in plugin.importance.items()}, reg.detach().cpu(), grads)
    (imp_a, reg_a, grads_a), (imp_b, reg_b, grads_b) = results["none"], results["cpu"]
    assert all(torch.equal(imp_a[n], imp_b[n]) for n in imp_a)  # computed on the device either way
    # eq 15's layer norms (and phi's mean) are reduced where Omega is held: on a GPU that is the CPU for one and the
    # GPU for the other, the same sums in another order (measured on an H200: 36.0454 both, not bit for bit)
    rtol = 0.0 if torch.device(device).type == "cpu" else 1e-5
    assert reg_a > 0 and torch.allclose(reg_a, reg_b, rtol=rtol, atol=0.0)
    assert all(torch.allclose(a, b, rtol=rtol, atol=rtol * float(a.abs().max())) for a, b in zip(grads_a, grads_b))


def test_a_reduced_storage_dtype_is_held_as_saved_so_a_cached_stage_gives_the_same_regularizer(tmp_path, lora_model,
                                                                                           make_ctx, device):
    """``storage_dtype: bfloat16``: the domain stage holds Omega in bfloat16 whether it continues from the general stage
    it just recorded or loads the saved file (a cached stage), so both give the same regularizer, bit for bit."""
    model = lora_model(targets=ALL_SEVEN)
    plugin = HLoRA(storage_dtype="bfloat16")
    sgd_stage(make_ctx("general", model, lr=0.05), plugin, 3, batches(device=device))
    plugin.save_state(tmp_path)
    plugin.on_stage_start(make_ctx("domain", model))
    assert {g.importance.dtype for g in plugin.groups} == {torch.bfloat16}
    cached = HLoRA(storage_dtype="bfloat16")
    cached.load_state(tmp_path)
    cached.on_stage_start(make_ctx("domain", model))
    _perturb(model)
    params = _lora_params(model)
    mine, theirs = plugin.regularizer(), cached.regularizer()
    assert mine > 0 and torch.equal(mine, theirs)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(mine, params), torch.autograd.grad(theirs, params)))


def test_importance_recorded_on_an_older_converted_copy_of_the_same_gguf_is_the_same_model():
    """The converted GGUF's cache key changed (path and mtime, then content): a cached general stage's importance names
    the older copy's folder, which is the same model, so no 'recorded on another model' warning."""
    from forgetless.methods.hlora import _model_id

    old, new = ("/root/.cache/forgetless/models/SmolLM2-135M-Instruct.Q4_1-1502ae3c691d",
                "/home/u/.cache/forgetless/models/SmolLM2-135M-Instruct.Q4_1-0a1b2c3d4e5f")
    assert _model_id(old) == _model_id(new) == "SmolLM2-135M-Instruct.Q4_1"
    assert _model_id("/data/models/my-model") == "/data/models/my-model" != _model_id("/data/models/other")
    assert _model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_the_adam_estimators_gradient_spends_each_modules_decrease_uphill_too():
    """g~ = descent x dL / ||descent||^2 per module, so its path-integral term g~ . descent is the module's first-order
    decrease dL itself: negative for a step that raised the loss (Adam's momentum overshooting), which the
    non-negativity rule then treats; a module that did not move gets nothing. (No trained case went uphill, so
    |dL| in place of dL passed every other test.)"""
    from forgetless.methods.hlora import _adam_gradient

    descent = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    descent[2] = 0.0
    decrease = torch.tensor([2.0, -1.5, 0.7], dtype=torch.float64)
    g = _adam_gradient(descent, decrease)
    for i in range(2):
        torch.testing.assert_close(g[i], descent[i] * decrease[i] / descent[i].square().sum())
    torch.testing.assert_close((g * descent).sum(dim=(1, 2)), torch.tensor([2.0, -1.5, 0.0], dtype=torch.float64))


def test_the_adam_estimators_omega_is_each_modules_first_order_decrease_on_an_uphill_step(lora_model, make_ctx,
                                                                                           device):
    """One step that climbs the loss (a gradient ascent standing in for Adam's momentum overshooting): with the adam
    estimator and no non-negativity rule, each module's omega sums to its first-order decrease
    -<g_A, A' - A> - <g_B, B' - B>, computed here from the factors and gradients: negative (the sign matters; |dL|
    passed every other test)."""
    from forgetless.training.loss import causal_lm_loss

    model = lora_model(dtype=torch.float64, b_std=0.05)
    plugin = HLoRA(estimator="adam", nonnegative="none")
    ascent = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, maximize=True)
    ctx = make_ctx("general", model, optimizer=ascent)
    plugin.on_stage_start(ctx)
    ctx.step, ctx.scalars = 0, {}
    causal_lm_loss(model, batches(device=device)[0]).backward()
    plugin.before_optimizer_step(ctx)
    before = {n: [t.detach().clone() for t in (m.lora_A["default"].weight, m.lora_B["default"].weight,
                                                m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad)]
              for n, m in lora_modules(model)}
    ctx.optimizer.step()
    plugin.after_optimizer_step(ctx)
    omega = {name: g.omega[i] for g in plugin.groups for i, name in enumerate(g.names)}
    for name, (a0, b0, ga, gb) in before.items():
        m = model.get_submodule(name)
        want = -(ga * (m.lora_A["default"].weight - a0)).sum() - (gb * (m.lora_B["default"].weight - b0)).sum()
        assert want < 0
        torch.testing.assert_close(omega[name].sum(), want.detach(), rtol=1e-9, atol=1e-15)


def test_the_exact_estimator_gathers_nothing_from_an_evaluation_pass_with_gradients(lora_model, accelerator,
                                                                                    monkeypatch):
    """``[ewc, {hlora, estimator: exact}]``: EWC's Fisher runs its forward and backward passes (in eval mode) at the
    general stage's end, before HLoRA's on_stage_end takes its hooks off, and each pass summed a full-weight gradient
    into HLoRA's slot, which was thrown away but counted in HLoRA's importance cost. The hooks now act in training
    passes only: one per module and training step."""
    import forgetless.methods.hlora as hlora_module
    from forgetless.methods.ewc import EWC

    gathered = []
    original = hlora_module._ExactGradHook.__call__

    def counting(self, module, args, output):
        before = len(output._backward_hooks or {})
        original(self, module, args, output)
        gathered.append(len(output._backward_hooks or {}) > before)

    monkeypatch.setattr(hlora_module._ExactGradHook, "__call__", counting)
    model = lora_model()
    hlora = HLoRA(estimator="exact")
    train_stage(model, random_examples(8, 12), TrainConfig(max_steps=2, batch_size=4, lr=1e-3, precision="fp32",
                                                           progress=False),
                [EWC(samples=8, batch_size=2), hlora], stage="general", accelerator=accelerator)
    modules = len(lora_modules(model))
    assert sum(gathered) == 2 * modules and len(gathered) > 2 * modules  # EWC's passes met the hooks, which passed
    assert hlora.steps == 2


def test_a_resumed_general_stage_counts_the_recording_time_of_every_session(tmp_path, monkeypatch):
    """importance_cost.seconds of a resumed stage counted only the last session (the checkpoint kept no time), so the
    report's cost table understated HLoRA against EWC. With a timer that counts one second per timed section, the
    resumed stage reports what the uninterrupted one does."""
    import forgetless.methods.hlora as hlora_module
    from forgetless.methods.common import Timer

    class Counting(Timer):
        def __exit__(self, *exc):
            self._seconds += 1.0

        def __enter__(self):
            return self

        @property
        def seconds(self) -> float:
            return self._seconds

    class StopAt(Method):  # in every run (a checkpoint must be resumed with the same methods); stops one of them
        def __init__(self, step=None):
            self.step = step

        def before_optimizer_step(self, ctx):
            if ctx.step == self.step:
                raise KeyboardInterrupt

    from tests.unit.tiny_model import make_lora_model

    monkeypatch.setattr(hlora_module, "Timer", Counting)
    cfg = TrainConfig(max_steps=10, batch_size=2, lr=1e-2, precision="fp32", progress=False, save_every=3)
    examples = random_examples(20, 8)

    def stage(stop, folder):
        result = train_stage(make_lora_model(0), examples, cfg, [HLoRA(), StopAt(stop)], stage="general",
                             checkpoint_dir=folder)
        return result.extras["importance_cost"]["hlora"]["seconds"], result.extras.get("resumed_from_step")

    whole = stage(None, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        stage(7, tmp_path / "parts")
    assert stage(None, tmp_path / "parts") == (whole[0], 6) and whole[0] >= 10
