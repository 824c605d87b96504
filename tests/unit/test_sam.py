"""SAM / ASAM against closed forms on quadratics, plus integration with the training loop (on every device)."""


import pytest
import torch

from forgetless.methods import resolve
from forgetless.methods.hlora import HLoRA
from forgetless.methods.sam import SAM, sam_perturbation
from forgetless.training.hooks import Method
from forgetless.training.loop import TrainConfig, train_stage
from tests.unit.tiny_model import launch_two_processes, random_examples, to_device


class Quadratic(torch.nn.Module):
    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(x0.clone())


def spd(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


@pytest.fixture
def quadratic(make_ctx):
    """``quadratic(n=4, grad_accum=1, stage="domain", seed=0)``: f(x) = 1/2 x^T H x as a model, an SGD (lr 0.1), the
    stage context, a forward/backward over ``{"H": matrix}`` batches, and the points it was called at."""

    def build(n=4, grad_accum=1, stage="domain", seed=0):
        g = torch.Generator().manual_seed(seed + 100)
        model = Quadratic(torch.randn(n, generator=g, dtype=torch.float64))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx = make_ctx(stage, model, optimizer=opt, grad_accum=grad_accum)
        calls = []

        def fb(batch):
            calls.append(model.x.detach().clone())
            loss = 0.5 * model.x @ batch["H"] @ model.x
            (loss / ctx.grad_accum).backward()
            return loss.detach()

        return model, opt, ctx, fb, calls

    return build


def sam_grad(h, x, rho):
    g = h @ x
    return h @ (x + rho * g / g.norm())


def test_sam_gradient_on_quadratic_is_closed_form(quadratic):
    model, _, ctx, fb, calls = quadratic()
    h, rho = spd(), 0.3
    x0 = model.x.detach().clone()
    wrapped = SAM(rho=rho).wrap_forward_backward(ctx, fb)
    loss = wrapped({"H": h})
    assert len(calls) == 2
    assert torch.allclose(model.x.grad, sam_grad(h, x0, rho), atol=1e-12)
    assert torch.equal(model.x.detach(), x0)  # restored exactly
    assert torch.allclose(loss, 0.5 * x0 @ h @ x0)  # the loss at w is returned
    assert ctx.scalars["sam_rho"] == rho
    assert ctx.scalars["sam_grad_norm"] == pytest.approx(float((h @ x0).norm()))
    eps = rho * h @ x0 / (h @ x0).norm()
    assert ctx.scalars["sam_perturbed_loss"] == pytest.approx(float(0.5 * (x0 + eps) @ h @ (x0 + eps)))


def test_sgd_step_with_sam(quadratic):
    model, opt, ctx, fb, _ = quadratic()
    h, rho, lr = spd(seed=1), 0.05, 0.1
    x0 = model.x.detach().clone()
    wrapped = SAM(rho=rho).wrap_forward_backward(ctx, fb)
    wrapped({"H": h})
    opt.step()
    assert torch.allclose(model.x.detach(), x0 - lr * sam_grad(h, x0, rho), atol=1e-12)


def test_asam_formula(quadratic):
    model, _, ctx, fb, _ = quadratic(seed=2)
    h, rho = spd(seed=2), 0.2
    x0 = model.x.detach().clone()
    SAM(rho=rho, adaptive=True).wrap_forward_backward(ctx, fb)({"H": h})
    g, t = h @ x0, x0.abs()
    eps = rho * t**2 * g / (t * g).norm()
    assert torch.allclose(model.x.grad, h @ (x0 + eps), atol=1e-12)
    # and the helper directly
    e, norm = sam_perturbation([x0], [g], rho, adaptive=True)
    assert torch.allclose(e[0].double(), eps, atol=1e-6) and float(norm) == pytest.approx(float((t * g).norm()), rel=1e-6)


def test_norm_is_over_all_parameters_together():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    eps, norm = sam_perturbation([a, b], [a, b], rho=1.0)
    assert float(norm) == pytest.approx(5.0)
    assert torch.allclose(eps[0], torch.tensor([0.6, 0.0])) and torch.allclose(eps[1], torch.tensor([0.8]))


def test_perturb_step_under_accumulation_is_the_sam_gradient_of_the_whole_step(quadratic):
    """The default: pass 1 of both micro-batches at w, eps from the step's gradient, both replayed at w + eps: the
    closed-form SAM gradient of the step's objective (the mean of the two quadratics)."""
    model, _, ctx, fb, calls = quadratic(grad_accum=2)
    h1, h2, rho = spd(seed=3), spd(seed=4), 0.1
    x0 = model.x.detach().clone()
    wrapped = SAM(rho=rho).wrap_forward_backward(ctx, fb)
    for micro, h in enumerate((h1, h2)):
        ctx.micro = micro
        wrapped({"H": h})
    assert len(calls) == 4 and torch.equal(calls[0], x0) and torch.equal(calls[1], x0)
    h = 0.5 * (h1 + h2)
    assert torch.allclose(model.x.grad, sam_grad(h, x0, rho), atol=1e-12)
    assert torch.allclose(calls[2], x0 + rho * h @ x0 / (h @ x0).norm(), atol=1e-12) and torch.equal(calls[2], calls[3])
    assert torch.equal(model.x.detach(), x0)  # restored exactly


def test_grad_accumulation_is_mean_of_per_micro_batch_sam_gradients(quadratic):
    """``perturb: micro``: each micro-batch perturbed by its own gradient (m-sharpness)."""
    model, _, ctx, fb, calls = quadratic(grad_accum=2)
    h1, h2, rho = spd(seed=3), spd(seed=4), 0.1
    x0 = model.x.detach().clone()
    wrapped = SAM(rho=rho, perturb="micro").wrap_forward_backward(ctx, fb)
    wrapped({"H": h1})
    wrapped({"H": h2})
    assert len(calls) == 4
    expected = 0.5 * (sam_grad(h1, x0, rho) + sam_grad(h2, x0, rho))
    assert torch.allclose(model.x.grad, expected, atol=1e-12)
    # the second micro-batch is perturbed by its own gradient only (m-sharpness), not by the stash
    assert torch.allclose(calls[3], x0 + rho * h2 @ x0 / (h2 @ x0).norm(), atol=1e-12)


def test_every_k_and_stages(quadratic):
    model, _, ctx, fb, calls = quadratic()
    h = spd()
    wrapped = SAM(rho=0.1, every_k=3).wrap_forward_backward(ctx, fb)
    per_step = []
    for step in range(7):
        ctx.step = step
        before = len(calls)
        wrapped({"H": h})
        model.x.grad = None
        per_step.append(len(calls) - before)
    assert per_step == [2, 1, 1, 2, 1, 1, 2]
    # general stage: SAM is off by default (stages=("domain",)), on when asked
    model, _, ctx, fb, calls = quadratic(stage="general")
    SAM(rho=0.1).wrap_forward_backward(ctx, fb)({"H": h})
    assert len(calls) == 1
    SAM(rho=0.1, stages=("general", "domain")).wrap_forward_backward(ctx, fb)({"H": h})
    assert len(calls) == 3


def test_registry_composes_and_validates():
    assert resolve(["lora-mu", "sam"]).stages == ("domain",)
    assert resolve(["lora-nu-mu", {"name": "sam", "rho": 0.1}]).stages == ("general", "domain")
    recipe = resolve(["hlora", {"name": "sam", "adaptive": True}])
    assert recipe.stages == ("general", "domain") and isinstance(recipe.plugins[1], SAM)
    with pytest.raises(ValueError):
        resolve({"name": "sam", "every_k": 0})
    with pytest.raises(ValueError):
        resolve({"name": "sam", "nope": 1})


# ------------------------------------------------------------------------------------- real (tiny) models
class GradRecorder(Method):
    def __init__(self):
        self.grads = []

    def before_optimizer_step(self, ctx):
        self.grads.append({n: p.grad.detach().clone() for n, p in ctx.trainable_parameters()})


class ForwardCounter:
    def __init__(self, model):
        self.count = 0  # the loss calls the backbone directly, so count embedding lookups
        model.get_input_embeddings().register_forward_pre_hook(self)

    def __call__(self, module, args):
        # training passes only: the loss's probe of its head split (at construction) runs without gradients
        self.count += torch.is_grad_enabled()


def test_weights_restored_exactly_on_lora_model_in_bf16_params(lora_model, make_ctx, device):
    model = lora_model(dtype=torch.bfloat16)
    for n, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.05)
    from forgetless.training.batches import collate
    from forgetless.training.loss import causal_lm_loss

    batch = to_device(collate(random_examples(2, 8), pad_token_id=0), device)
    ctx = make_ctx("domain", model, lr=0.1)
    before = {n: p.detach().clone() for n, p in ctx.trainable_parameters()}

    def fb(b):
        loss = causal_lm_loss(model, b)
        loss.backward()
        return loss.detach()

    SAM(rho=0.5).wrap_forward_backward(ctx, fb)(batch)
    for n, p in ctx.trainable_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is not None


@pytest.fixture
def one_step(lora_model, accelerator):
    """``one_step(precision, methods, steps=1, grad_accum=1)``: a domain stage of a fresh tiny LoRA model; returns the
    model, the gradients of every step, the number of forward passes and the stage's result."""

    def run(precision, methods, steps=1, grad_accum=1):
        model = lora_model()
        recorder = GradRecorder()
        counter = ForwardCounter(model)
        result = train_stage(model, random_examples(8, 8), TrainConfig(max_steps=steps, batch_size=2,
                                                                        grad_accum=grad_accum, lr=1e-2,
                                                                        precision=precision, progress=False,
                                                                        max_grad_norm=None),
                             [*methods, recorder], stage="domain", accelerator=accelerator)
        return model, recorder.grads, counter.count, result

    return run


def test_train_stage_passes_and_every_k_count_forward_calls(one_step):
    _, _, plain, _ = one_step("fp32", [], steps=4, grad_accum=2)
    _, _, sam, result = one_step("fp32", [SAM(rho=0.05)], steps=4, grad_accum=2)
    _, _, sam_k, _ = one_step("fp32", [SAM(rho=0.05, every_k=2)], steps=4, grad_accum=2)
    assert plain == 8 and sam == 16 and sam_k == 12
    assert all("sam_grad_norm" in row and "sam_perturbed_loss" in row for row in result.history)


def test_bf16_autocast_matches_fp32(one_step):
    _, g32, _, _ = one_step("fp32", [SAM(rho=0.05)])
    _, g16, _, _ = one_step("bf16", [SAM(rho=0.05)])
    flat32 = torch.cat([g.flatten() for g in g32[0].values()])
    flat16 = torch.cat([g.flatten() for g in g16[0].values()])
    assert all(g.dtype == torch.float32 for g in g16[0].values())
    assert flat32.norm() > 0
    assert float((flat16 - flat32).norm() / flat32.norm()) < 0.05
    # under plain SGD the update is -lr * gradient, so the updates agree to the same tolerance


def test_composition_with_hlora_through_train_stage(lora_model, accelerator):
    model = lora_model()
    hlora, sam = HLoRA(phi=1.0), SAM(rho=0.05)
    counter = ForwardCounter(model)
    cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-2, precision="fp32", progress=False)
    general = train_stage(model, random_examples(8, 8), cfg, [hlora, sam], stage="general", accelerator=accelerator)
    assert counter.count == 2 and "sam_grad_norm" not in general.history[0]
    domain = train_stage(model, random_examples(8, 8, seed=1), cfg, [hlora, sam], stage="domain",
                         accelerator=accelerator)
    assert counter.count == 2 + 4
    assert all("reg_loss" in row and "sam_grad_norm" in row for row in domain.history)


# ------------------------------------------------------------------------------------------ two processes
def test_two_processes_use_the_same_eps(tmp_path):
    launch_two_processes("_sam_ddp_script.py", tmp_path, port=29517)
    eps = [torch.load(tmp_path / f"eps_rank{r}.pt") for r in range(2)]
    local = [torch.load(tmp_path / f"local_grad_rank{r}.pt") for r in range(2)]
    assert eps[0].keys() == eps[1].keys() and eps[0]
    # the data differ per rank, so the local gradients differ, but the perturbation is shared
    assert any(not torch.allclose(local[0][k], local[1][k]) for k in local[0])
    for k in eps[0]:
        assert torch.equal(eps[0][k], eps[1][k]), k
    # and it is the perturbation of the averaged gradient
    mean = {k: (local[0][k] + local[1][k]) / 2 for k in local[0]}
    eps_mean, _ = sam_perturbation(list(mean.values()), list(mean.values()), 0.05)
    for k, e in zip(mean, eps_mean):
        assert torch.allclose(eps[0][k], e, atol=1e-6), k
    # perturb: micro, the loop's loss scales 0.5 and 1.5: the logged norm is that of the micro-batch's global mean-loss
    # gradient, mean_r(scale_r g_r) / mean_r(scale_r), on both ranks (each divided by its own scale: 2 other values)
    norms = [float(torch.load(tmp_path / f"micro_norm_rank{r}.pt")) for r in range(2)]
    want = torch.cat([((0.5 * local[0][k] + 1.5 * local[1][k]) / 2).flatten() for k in local[0]]).norm() / 1.0
    assert norms[0] == pytest.approx(norms[1], rel=1e-6) and norms[0] == pytest.approx(float(want), rel=1e-5), norms


def test_composition_with_ewc_through_registry(lora_model, accelerator):
    recipe = resolve(["ewc", {"name": "sam", "rho": 0.05}])
    assert recipe.stages == ("general", "domain") and [type(p).__name__ for p in recipe.plugins] == ["EWC", "SAM"]
    model = lora_model()
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, precision="fp32", progress=False)
    general = random_examples(8, 8)
    train_stage(model, general, cfg, recipe.plugins, stage="general", accelerator=accelerator)
    counter = ForwardCounter(model)  # after the Fisher pass at the end of the general stage
    domain = train_stage(model, random_examples(8, 8, seed=1), cfg, recipe.plugins, stage="domain",
                         general_examples=general, accelerator=accelerator)
    assert counter.count == 2 * 3  # two passes per step, the EWC penalty rides along in both
    rows = domain.history
    assert all("ewc_penalty" in r and "sam_grad_norm" in r for r in rows)
    assert rows[0]["ewc_penalty"] == 0.0 and rows[-1]["ewc_penalty"] > 0.0  # anchored at the general adapter


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_work_between_the_passes_does_not_grow_with_the_number_of_lora_matrices(adaptive, make_ctx, lora_model):
    """SAM's own work per micro-batch (the ascent gradient's norm, eps, keeping, perturbing and restoring the weights,
    adding back earlier micro-batches' gradients) is grouped ``_foreach`` operations: the same number of operations
    that run a kernel for 4 LoRA matrices as for 28. One operation per matrix, as before, is hundreds of kernel launches per
    pass on a 1-8B model with all-linear LoRA."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from forgetless.training.batches import collate
    from forgetless.training.loss import causal_lm_loss

    allocations = {torch.ops.aten.empty_like.default, torch.ops.aten.empty.memory_format}

    class Count(TorchDispatchMode):  # operations that run a kernel: views and allocations launch none
        on, ops = True, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            type(self).ops += type(self).on and not func.is_view and func not in allocations
            return func(*args, **(kwargs or {}))

    def ops_per_micro_batch(targets) -> int:
        model = lora_model(targets=targets)
        ctx = make_ctx("domain", model, lr=0.1, grad_accum=2)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(random_examples(2, 8), pad_token_id=0).items()}

        def fb(b):
            Count.on = False  # forward and backward grow with the model: not counted
            try:
                loss = causal_lm_loss(model, b)
                (loss / 2).backward()
                return loss.detach()
            finally:
                Count.on = True

        wrapped = SAM(rho=0.5, adaptive=adaptive).wrap_forward_backward(ctx, fb)
        wrapped(batch)  # the first micro-batch; the second adds its gradient to this one's
        Count.ops = 0
        with Count():
            wrapped(batch)
        return Count.ops

    few = ops_per_micro_batch(("q_proj", "v_proj"))
    many = ops_per_micro_batch(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert few == many and few < 40, (few, many)
