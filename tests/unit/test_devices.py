"""State that a method builds at a stage's start lands on the device the model trains on.

Models are loaded on the CPU (``load_model``) and ``train_stage`` moves them to the accelerator's device; a method
that prepared its state (loaded importance, a Fisher, a weight snapshot) before that move kept it on the CPU and
the CUDA run failed or mixed devices. The loop now moves the model first. The tests below start every model on the
CPU, as a real run does, and train on each device; on a machine without a GPU only the CPU cases run, and the
stub-accelerator test checks the order of the loop there.
"""

import pytest
import torch

from forgetless.evaluation import perplexity
from forgetless.methods import resolve
from forgetless.training.hooks import Method
from forgetless.training.loop import TrainConfig, train_stage
from tests.unit.tiny_model import make_lora_model, random_examples


def cfg(steps=2):
    return TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, precision="fp32", progress=False)


def on(device, tensors):
    """Every tensor of ``tensors`` lives on ``device``."""
    tensors = list(tensors)
    return bool(tensors) and all(t.device == device for t in tensors)


class _Stop(Exception):
    pass


class DeviceRecorder(Method):
    """Records, at the stage's start, the accelerator's device and the devices of the model's parameters."""

    def __init__(self, stop: bool = False):
        self.stop, self.seen = stop, None

    def on_stage_start(self, ctx):
        self.seen = (ctx.accelerator.device, {p.device for p in ctx.model.parameters()})
        if self.stop:
            raise _Stop


def test_on_stage_start_sees_the_model_on_the_accelerators_device(accelerator, device):
    recorder = DeviceRecorder()
    model = make_lora_model()  # on the CPU, as loaded
    train_stage(model, random_examples(4, 6), cfg(1), [recorder], accelerator=accelerator)
    # accelerate names one GPU "cuda" while its tensors say "cuda:0" (torch.device("cuda") != "cuda:0")
    indexed = torch.empty(0, device=accelerator.device).device
    assert recorder.seen[0] == accelerator.device and recorder.seen[1] == {indexed}
    assert accelerator.device.type == device.type


def test_the_model_is_moved_before_on_stage_start_even_without_a_gpu():
    """The CPU-testable form of the contract: an accelerator whose device is not where the model is."""

    class ElsewhereAccelerator:
        device = torch.device("meta")  # no data: nothing past on_stage_start could run, so the recorder stops there

    recorder = DeviceRecorder(stop=True)
    with pytest.raises(_Stop):
        train_stage(make_lora_model(), random_examples(4, 6), cfg(1), [recorder], accelerator=ElsewhereAccelerator())
    assert recorder.seen == (torch.device("meta"), {torch.device("meta")})


@pytest.mark.parametrize("start", ["cpu", "device"])
def test_hlora_importance_loaded_from_a_folder_lands_on_the_models_device(tmp_path, accelerator, start):
    general_plugin, = resolve({"name": "hlora", "phi": 1.0}).plugins
    model = make_lora_model()
    train_stage(model, random_examples(8, 8), cfg(), [general_plugin], stage="general", accelerator=accelerator)
    general_plugin.save_state(tmp_path)
    adapter = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    fresh, = resolve({"name": "hlora", "phi": 1.0}).plugins
    fresh.load_state(tmp_path)
    other = make_lora_model(seed=1)  # a new model, as a run that reuses a cached general stage loads one
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n in adapter:
                p.copy_(adapter[n])
    if start == "device":
        other.to(accelerator.device)
    result = train_stage(other, random_examples(8, 8, seed=5), cfg(3), [fresh], stage="domain",
                         accelerator=accelerator)
    target = next(other.parameters()).device
    assert target.type == accelerator.device.type
    assert on(target, fresh.importance.values()) and on(target, fresh.reference.values())
    assert fresh.regularizer().device == target
    assert result.history[0]["reg_loss"] == pytest.approx(0.0, abs=1e-12)  # starts at the loaded dW_nu
    assert result.history[-1]["reg_loss"] > 0


def test_ewc_without_a_general_stage_builds_its_fisher_on_the_models_device(accelerator):
    recipe = resolve(["lora-mu", {"name": "ewc", "samples": 4}])
    plugin, = recipe.plugins
    model = make_lora_model()
    result = train_stage(model, random_examples(8, 8), cfg(3), recipe.plugins, stage="domain",
                         general_examples=random_examples(6, 8, seed=9), accelerator=accelerator)
    target = next(model.parameters()).device
    assert target.type == accelerator.device.type
    assert on(target, plugin.fisher.values())
    assert plugin.penalty().device == target
    assert result.history[0]["ewc_penalty"] == 0.0 and result.history[-1]["ewc_penalty"] > 0


def test_wise_ft_without_a_general_stage_snapshots_and_evaluates_on_the_models_device(accelerator):
    recipe = resolve(["lora-mu", {"name": "wise-ft", "alphas": [0.0, 0.5]}])
    plugin, = recipe.plugins
    model = make_lora_model()
    blocks = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    before = perplexity(model, blocks, precision="fp32", progress=False).mean_nll  # B = 0: the base model
    train_stage(model, random_examples(8, 8), cfg(3), recipe.plugins, stage="domain", accelerator=accelerator)
    target = next(model.parameters()).device
    assert target.type == accelerator.device.type
    assert on(target, plugin.theta_nu.values())
    after = perplexity(model, blocks, precision="fp32", progress=False).mean_nll
    assert after != pytest.approx(before, abs=1e-6)  # the domain stage moved the weights
    variants = dict(plugin.evaluation_variants(model))
    assert list(variants) == ["wise-ft(alpha=0.0)", "wise-ft(alpha=0.5)"]
    with variants["wise-ft(alpha=0.0)"]:
        assert on(target, model.parameters())
        # alpha 0: theta_nu is the domain stage's start, the untouched base model here
        assert perplexity(model, blocks, precision="fp32", progress=False).mean_nll == pytest.approx(before, rel=1e-4)
    with variants["wise-ft(alpha=0.5)"]:
        half = perplexity(model, blocks, precision="fp32", progress=False).mean_nll
        assert half != pytest.approx(before, abs=1e-6) and half != pytest.approx(after, abs=1e-6)
    assert perplexity(model, blocks, precision="fp32", progress=False).mean_nll == pytest.approx(after, rel=1e-6)
