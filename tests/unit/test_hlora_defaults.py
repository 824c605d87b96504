"""HLoRA's importance under AdamW (issue 13): the adam estimator against closed forms, Omega >= 0 by construction
(each rule against its recursion), xi relative to the module's mean Delta^2, phi relative to mean(Omega), and the
exact estimator refused beside general-stage SAM."""

import pytest
import torch

import forgetless.methods.hlora as hlora
from forgetless.lora import lora_modules
from forgetless.methods import resolve
from forgetless.methods.hlora import HLoRA
from forgetless.training.hooks import Method
from forgetless.training.loss import causal_lm_loss
from tests.unit.test_hlora import _quadratic_lora, batches, lora_ab
from tests.unit.tiny_model import randomize_lora_b


def drive(ctx, plugins, steps, loss_fn, after=None):
    """The loop's hook order around ``ctx.optimizer`` for several plugins on one trajectory; ``after(t)`` runs
    after every step's ``after_optimizer_step``."""
    for p in plugins:
        p.on_stage_start(ctx)
    for t in range(steps):
        ctx.step = t
        loss_fn(t).backward()
        for p in plugins:
            p.before_optimizer_step(ctx)
        ctx.optimizer.step()
        for p in plugins:
            p.after_optimizer_step(ctx)
        if after is not None:
            after(t)
        ctx.optimizer.zero_grad(set_to_none=True)
    for p in plugins:
        p.on_stage_end(ctx)


def adamw(model, lr):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)


# ------------------------------------------------------------------------------------- the adam estimator
def test_adam_estimator_reproduces_the_adamw_step_where_eq_11_does_not(lora_model, make_ctx, device, monkeypatch):
    model = lora_model(dtype=torch.float64, b_std=0.05)
    lr, data = 1e-2, batches(3, device=device)
    plugin = HLoRA(estimator="adam")
    seen = []  # the adam estimator's g~ of every step, one tensor per group
    real = hlora._adam_gradient
    monkeypatch.setattr(hlora, "_adam_gradient", lambda g, d: seen.append(real(g, d).clone()) or seen[-1])
    before, ratios = {}, []

    def loss(t):  # the factors before the step
        before.update({n: tuple(x.detach().clone() for x in lora_ab(m)[:2]) for n, m in lora_modules(model)})
        return causal_lm_loss(model, data[t])

    def after(t):  # the step taken; the gradients are still there
        estimates = dict(zip([n for g in plugin.groups for n in g.names],
                             [e for group in seen[-len(plugin.groups):] for e in group]))
        for name, m in lora_modules(model):
            (a, b), (a1, b1, s) = before[name], lora_ab(m)
            ga, gb, a1, b1 = a1.grad, b1.grad, a1.detach(), b1.detach()
            step = s * (b1 @ a1 - b @ a)  # dW(t+1) - dW(t)
            decrease = -(ga * (a1 - a)).sum() - (gb * (b1 - b)).sum()  # first-order loss decrease of the step
            eta_eff = step.square().sum() / decrease  # the module docstring's closed form
            assert eta_eff > 0
            assert torch.allclose(step, -eta_eff * estimates[name], rtol=0, atol=1e-12 * float(step.abs().max()))
            paper = s * (gb @ a + b @ ga - lr * gb @ ga)  # eq 11: SGD's implied gradient
            ratios.append(float((step + lr * paper).norm() / step.norm()))

    drive(make_ctx("general", model, optimizer=adamw(model, lr)), [plugin], 3, loss, after)
    assert len(ratios) == 3 * 4 and min(ratios) > 0.5  # under AdamW eq 11 misses the step (the issue: 0.997)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_adam_estimator_total_is_the_loss_decrease_of_a_quadratic(make_ctx, optimizer):
    """L = 1/2 ||W - W*||^2 in the full weight: the path integral's total over the elements is L(start) - L(end)
    (to first order per step). The adam estimator keeps it under AdamW and SGD; eq 11 does not (its total is
    eta |g~|^2 per step, not the decrease)."""
    model, w_star = _quadratic_lora()
    (name, module), = lora_modules(model)
    randomize_lora_b(model, std=0.3)
    w0 = module.base_layer.weight.detach()
    a, b, s = lora_ab(module)
    eye = torch.eye(w0.shape[1], dtype=torch.float64)
    options = dict(xi=1.0, xi_mode="absolute", nonnegative="none")
    plugins = {e: HLoRA(estimator=e, **options) for e in ("adam", "paper", "exact")}

    def loss(t):
        return 0.5 * (model(eye) - w_star.T).square().sum()  # y = I W^T

    start = w0 + s * b.detach() @ a.detach()
    opt = adamw(model, 2e-3) if optimizer == "adamw" else torch.optim.SGD(module.parameters(), lr=2e-3)
    drive(make_ctx("general", model, optimizer=opt), list(plugins.values()), 400, loss)
    end = w0 + s * b.detach() @ a.detach()
    delta = end - start
    drop = float(0.5 * (start - w_star).square().sum() - 0.5 * (end - w_star).square().sum())
    totals = {e: float((p.importance[name] * (delta**2 + 1.0)).sum()) for e, p in plugins.items()}
    assert drop > 1.0  # the weights moved
    assert totals["exact"] == pytest.approx(drop, rel=5e-3)
    assert totals["adam"] == pytest.approx(drop, rel=5e-3)
    assert abs(totals["paper"] - drop) > 0.5 * drop
    # every step lowered the loss here, so the adam surrogate is >= 0 element by element; exact's is not
    assert (plugins["adam"].importance[name] >= 0).all() and (plugins["exact"].importance[name] < 0).any()


# ---------------------------------------------------------------------------------------- Omega >= 0
def test_nonnegative_rules_follow_their_recursions(lora_model, make_ctx, device):
    """On one AdamW trajectory (eq 11's omega has negative steps there): end = max(sum c, 0); step = sum max(c, 0);
    running r_t = max(r_{t-1} + c_t, 0); none = sum c (the paper)."""
    model = lora_model(dtype=torch.float64)  # B starts at zero: Delta = dW_nu
    data = batches(4, device=device)
    rules = ("none", "end", "step", "running")
    plugins = {r: HLoRA(nonnegative=r, xi=1.0, xi_mode="absolute") for r in rules}
    ctx = make_ctx("general", model, optimizer=adamw(model, 2e-2))
    recorded = plugins["none"]
    cumulative = []
    drive(ctx, list(plugins.values()), 4, lambda t: causal_lm_loss(model, data[t]),
          lambda t: cumulative.append(torch.cat([g.omega.flatten() for g in recorded.groups]).clone()))
    steps = torch.diff(torch.stack(cumulative), dim=0, prepend=torch.zeros_like(cumulative[0])[None])
    running = torch.zeros_like(steps[0])
    for c in steps:
        running = (running + c).clamp(min=0)
    expected = {"none": steps.sum(0), "end": steps.sum(0).clamp(min=0), "step": steps.clamp(min=0).sum(0),
                "running": running}
    assert (steps < 0).any() and (expected["none"] < 0).any()  # the case the rules are for
    names = [n for g in recorded.groups for n in g.names]
    delta_sq = torch.cat([(recorded.reference[n] ** 2).flatten() for n in names])
    for rule, plugin in plugins.items():
        omega = torch.cat([plugin.importance[n].flatten() for n in names]) * (delta_sq + 1.0)
        assert torch.allclose(omega, expected[rule], rtol=1e-9, atol=1e-15), rule
        if rule != "none":
            assert (plugin.importance[names[0]] >= 0).all()
    assert (expected["end"] <= expected["running"] + 1e-15).all() and (expected["running"] <= expected["step"] + 1e-15).all()


# ----------------------------------------------------------------------------------------------- xi and phi
def test_relative_xi_is_a_fraction_of_each_modules_mean_delta_squared(lora_model, make_ctx, device):
    model = lora_model(dtype=torch.float64)
    data = batches(3, device=device)
    paper = HLoRA(xi=0.0, xi_mode="absolute", nonnegative="none")  # Omega = omega / Delta^2: omega recoverable
    default = HLoRA()
    ctx = make_ctx("general", model, optimizer=adamw(model, 1e-2))
    drive(ctx, [paper, default], 3, lambda t: causal_lm_loss(model, data[t]))
    assert default.xi_mode == "relative" and default.xi == hlora.DEFAULT_XI and default.nonnegative == "end"
    above = total = 0
    for name, omega_over_d2 in paper.importance.items():
        delta_sq = default.reference[name] ** 2  # B starts at zero: Delta = dW_nu
        omega = omega_over_d2 * delta_sq
        xi = hlora.DEFAULT_XI * delta_sq.mean()
        expected = omega.clamp(min=0) / (delta_sq + xi)  # eq 13 with xi_l = xi * mean(Delta_l^2), omega >= 0
        assert torch.allclose(default.importance[name], expected, rtol=1e-9, atol=0), name
        above, total = above + int((delta_sq > xi).sum()), total + delta_sq.numel()
    assert ctx.extras["hlora_importance_stats"]["delta_sq_above_xi"] == pytest.approx(above / total)
    assert 0 < ctx.extras["hlora_importance_stats"]["negative_omega"] < 1


def test_phi_relative_to_the_mean_importance(lora_model, make_ctx, device):
    model = lora_model(dtype=torch.float64)
    data = batches(2, device=device)
    plugins = {scale: HLoRA(phi=0.5, phi_scale=scale) for scale in ("absolute", "mean")}
    drive(make_ctx("general", model, lr=0.05), list(plugins.values()), 2, lambda t: causal_lm_loss(model, data[t]))
    for plugin in plugins.values():
        plugin.on_stage_start(make_ctx("domain", model))
    randomize_lora_b(model, seed=3, std=0.05)  # away from dW_nu: the regularizer is > 0
    mean = torch.cat([o.flatten() for o in plugins["mean"].importance.values()]).mean()
    ctx = make_ctx("domain", model)
    reg = plugins["absolute"].regularizer()
    assert reg > 0
    assert float(plugins["absolute"].extra_loss(ctx, data[0])) == pytest.approx(0.5 * float(reg), rel=1e-12)
    assert float(plugins["mean"].extra_loss(ctx, data[0])) == pytest.approx(0.5 * float(reg) / float(mean), rel=1e-9)
    assert ctx.scalars["reg_loss"] == pytest.approx(float(reg), rel=1e-12)  # logged before weighting


# ------------------------------------------------------------------------------------------- composition
def test_exact_estimator_with_general_stage_sam_is_refused():
    with pytest.raises(ValueError, match=r"estimator: exact cannot run with sam on the general stage"):
        resolve([{"name": "hlora", "estimator": "exact"}, {"name": "sam", "stages": ["general", "domain"]}])
    with pytest.raises(ValueError, match=r"exact"):
        resolve([{"name": "sam", "stages": "general"}, {"name": "hlora", "estimator": "exact"}])
    for fine in ([{"name": "hlora", "estimator": "exact"}, "sam"],  # SAM on the domain stage only
                 [{"name": "hlora", "estimator": "adam"}, {"name": "sam", "stages": ["general"]}],
                 [{"name": "hlora", "estimator": "exact"}, "replay"]):
        resolve(fine)

    class Wrapper(Method):  # any method that replaces the forward/backward, with no stages option: both stages
        name = "wrapper"

        def wrap_forward_backward(self, ctx, fb):
            return fb

    with pytest.raises(ValueError, match="wrapper"):
        HLoRA(estimator="exact").check_composition([Wrapper()])
    HLoRA(estimator="paper").check_composition([Wrapper()])
