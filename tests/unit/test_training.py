"""The stage loop on a tiny LoRA model, on every device: the loss, the hooks' order, determinism, accumulation."""

import pytest
import torch

from forgetless.training.batches import collate
from forgetless.training.hooks import Method
from forgetless.training.loop import TrainConfig, train_stage
from forgetless.training.loss import causal_lm_loss
from tests.unit.tiny_model import make_tiny_model, random_examples, to_device


def test_loss_equals_transformers_loss_with_masked_prompt(lora_model, device, tol):
    model = lora_model()
    examples = random_examples(3, 10, prompt=4) + random_examples(2, 7, seed=1, prompt=2)
    batch = to_device(collate(examples, pad_token_id=0), device)
    ours = causal_lm_loss(model, batch)
    theirs = model(**batch).loss  # transformers shifts labels and ignores -100 itself
    assert torch.allclose(ours, theirs, atol=tol(1e-6))


def test_loss_ignores_prompt_tokens(lora_model, device, tol):
    model = lora_model()
    ex = random_examples(1, 12, prompt=8)
    batch = to_device(collate(ex, 0), device)
    # the loss is the mean over the 4 answer tokens alone: the masked prompt labels never count
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    ids = batch["input_ids"][0]
    by_hand = -torch.stack([logp[t - 1, ids[t]] for t in range(8, 12)]).mean()
    assert torch.allclose(causal_lm_loss(model, batch), by_hand, atol=tol(1e-5))


class Recorder(Method):
    def __init__(self):
        self.calls = []

    def on_stage_start(self, ctx):
        self.calls.append("start")

    def extra_loss(self, ctx, batch):
        self.calls.append("extra")
        return None

    def before_optimizer_step(self, ctx):
        self.calls.append("before")

    def after_optimizer_step(self, ctx):
        self.calls.append("after")

    def on_stage_end(self, ctx):
        self.calls.append("end")


def test_hooks_called_in_order_with_accumulation(lora_model, accelerator):
    rec = Recorder()
    train_stage(lora_model(), random_examples(8, 6), TrainConfig(max_steps=2, batch_size=2, grad_accum=2, precision="fp32",
                                                                 progress=False), methods=[rec], accelerator=accelerator)
    assert rec.calls == ["start", "extra", "extra", "before", "after", "extra", "extra", "before", "after", "end"]


def test_same_seed_same_weights_and_training_lowers_loss(lora_model, accelerator, examples, tol):
    """Bit for bit on the CPU; on CUDA to the device's floor (its attention backward may add in any order)."""
    def run(seed):
        model = lora_model()
        res = train_stage(model, examples, TrainConfig(max_steps=30, batch_size=8, lr=5e-2, seed=seed,
                                                                     scheduler="constant", precision="fp32",
                                                                     progress=False), accelerator=accelerator)
        return model, res

    m1, r1 = run(0)
    m2, _ = run(0)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.allclose(a, b, rtol=0.0, atol=tol(0.0)), n
    assert r1.history[-1]["loss"] < r1.history[0]["loss"] - 0.1


def test_gradient_accumulation_matches_full_batch(lora_model, accelerator, tol):
    grads = []
    for bs, accum in ((4, 1), (2, 2)):
        model = lora_model()

        class Grab(Method):
            def before_optimizer_step(self, ctx):
                grads.append({n: p.grad.clone() for n, p in ctx.trainable_parameters()})

        # only the first step's gradient is compared; no shuffling differences with 4 examples in one step
        train_stage(model, random_examples(4, 6), TrainConfig(max_steps=1, batch_size=bs, grad_accum=accum,
                                                               max_grad_norm=None, precision="fp32", progress=False),
                    methods=[Grab()], accelerator=accelerator)
    assert any(g.abs().max() > 0 for g in grads[0].values())  # B = 0: only B has a gradient at the first step
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=tol(1e-6)), name


def test_extra_loss_reaches_the_gradient(lora_model, accelerator):
    class Pull(Method):
        def extra_loss(self, ctx, batch):
            return sum((p ** 2).sum() for _, p in ctx.trainable_parameters()) * 100.0

    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    train_stage(model, random_examples(4, 6), TrainConfig(max_steps=3, lr=1e-2, precision="fp32", progress=False),
                methods=[Pull()], accelerator=accelerator)
    after = {n: p.detach() for n, p in model.named_parameters() if n in before}
    assert sum(a.norm() for a in after.values()) < sum(b.norm() for b in before.values())


def test_no_trainable_parameters_is_a_clear_error():
    model = make_tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_stage(model, random_examples(2, 5), TrainConfig(max_steps=1, precision="fp32", progress=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="train_stage's own Accelerator picks the GPU; this compares CPU runs")
def test_precision_fp32_stays_fp32_whatever_accelerate_was_left_with(monkeypatch):
    """accelerate keeps its settings process-wide: after a bf16 Trainer (here its Accelerator) ran in the process, or
    under ``accelerate launch --mixed_precision bf16`` (the variable it sets), a stage's own Accelerator would wrap
    the model in bf16 autocast. The stage drops those (with a warning) and trains exactly as in a clean process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from tests.unit.tiny_model import make_lora_model

    examples = random_examples(8, 8)
    config = TrainConfig(max_steps=2, batch_size=4, lr=5e-2, precision="fp32", progress=False)

    def trained() -> list[torch.Tensor]:
        model = make_lora_model(0)
        train_stage(model, examples, config)
        AcceleratorState._reset_state(reset_partial_state=True)
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    AcceleratorState._reset_state(reset_partial_state=True)
    clean = trained()
    Accelerator(cpu=True, mixed_precision="bf16")  # what Trainer(bf16=True) leaves behind
    with pytest.warns(UserWarning, match="mixed precision 'bf16'"):
        after_trainer = trained()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr("forgetless.training.loop._SAID_ENV", [])
    with pytest.warns(UserWarning, match="ACCELERATE_MIXED_PRECISION=bf16 .* is not used"):
        launched = trained()
    for a, b, c in zip(clean, after_trainer, launched, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    # accelerate's own accumulation (DeepSpeed's launcher sets it) would divide every loss by it once more
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    for a, b in zip(clean, trained(), strict=True):
        assert torch.equal(a, b)


def test_a_stage_name_other_than_general_or_domain_is_an_error(lora_model, examples):
    """Methods act on the stages they name: with stage='mu' or 'Domain', sam, replay and wise-ft did nothing, silently."""
    with pytest.raises(ValueError, match="stage must be 'general' \\(nu\\) or 'domain' \\(mu\\), got 'mu'"):
        train_stage(lora_model(), examples, TrainConfig(max_steps=1, precision="fp32", progress=False), stage="mu")


def test_library_misuse_gets_a_message_that_says_what_to_do(tmp_path):
    """An adapter loaded for evaluation (frozen) given to train_stage; an adapter loaded into a model that already
    has LoRA; perplexity on no blocks (it divided by zero)."""
    from forgetless.evaluation.perplexity import perplexity
    from forgetless.models import AdapterError, LoraSettings, attach_lora, load_adapter, save_adapter
    from tests.unit.tiny_model import make_tiny_model

    folder = tmp_path / "adapter"
    save_adapter(attach_lora(make_tiny_model(), LoraSettings(r=2, dropout=0.0)), folder, "tiny")
    frozen = load_adapter(make_tiny_model(), folder)
    with pytest.raises(ValueError, match=r"load_adapter\(model, folder, trainable=True\)"):
        train_stage(frozen, random_examples(4, 6), TrainConfig(max_steps=1, precision="fp32", progress=False))
    with pytest.raises(AdapterError, match="the model already has LoRA adapters"):
        load_adapter(attach_lora(make_tiny_model(), LoraSettings(r=2, dropout=0.0)), folder)
    assert load_adapter(make_tiny_model(), folder, trainable=True) is not None
    with pytest.raises(ValueError, match="n >= 1"):
        perplexity(make_tiny_model(), torch.zeros((0, 8), dtype=torch.long), progress=False)


def test_a_plugin_reused_on_another_model_is_named(lora_model, examples, recwarn):
    """A general stage then a domain stage of one model reuse the plugin objects (their state is the point); the same
    objects on another model would carry the first model's importance to it, silently: a warning says so."""
    from forgetless.methods import resolve

    cfg = TrainConfig(max_steps=1, batch_size=4, precision="fp32", progress=False)
    plugins = resolve({"name": "hlora", "phi": 1.0}).plugins
    first = lora_model()
    train_stage(first, examples, cfg, plugins, stage="general")
    train_stage(first, examples, cfg, plugins, stage="domain")
    assert not [w for w in recwarn if "used with another model" in str(w.message)]
    with pytest.warns(UserWarning, match="HLoRA plugin was used with another model object before"):
        train_stage(lora_model(seed=1), examples, cfg, plugins, stage="domain")


def test_the_readme_python_example_runs(tmp_path):
    """README's "From Python" example, on a tiny model: general then domain with [hlora, sam], the adapter saved; and
    rslora's LoRA settings come through recipe.lora."""
    from forgetless.methods import resolve
    from forgetless.models import LoraSettings, attach_lora, save_adapter
    from tests.unit.tiny_model import make_tiny_model

    general_examples, domain_examples = random_examples(8, 8, seed=1), random_examples(8, 8, seed=2)
    model = make_tiny_model()
    recipe = resolve(["hlora", "sam"])
    model = attach_lora(model, LoraSettings(r=4, alpha=8, **recipe.lora))
    plugins = recipe.plugins
    train_stage(model, general_examples, TrainConfig(max_steps=2, lr=2e-4, progress=False), plugins, stage="general")
    result = train_stage(model, domain_examples, TrainConfig(epochs=1, lr=3e-3, progress=False), plugins,
                         stage="domain", general_examples=general_examples)
    assert result.history and "reg_loss" in result.history[-1]  # HLoRA acted on the domain stage
    save_adapter(model, tmp_path / "adapters" / "mine", "tiny")
    assert (tmp_path / "adapters" / "mine" / "adapter_model.safetensors").is_file()
    rs = attach_lora(make_tiny_model(), LoraSettings(r=4, alpha=8, **resolve("rslora").lora))
    assert rs.peft_config["default"].use_rslora
