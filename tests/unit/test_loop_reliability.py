"""The loop stops on non-finite numbers (or skips such steps when asked), and gradient checkpointing changes
nothing but memory: the same gradients, the same HLoRA importance, the same EWC Fisher and SAM steps."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from forgetless.methods import resolve
from forgetless.training.config import TrainConfig
from forgetless.training.hooks import Method
from forgetless.training.loop import NonFiniteError, gradient_checkpointing_on, train_stage
from tests.unit._train_parity import GradRecorder, variable_examples
from tests.unit.tiny_model import random_examples


class PoisonAt(Method):
    """Makes step ``step`` (1-based) non-finite: its loss (``what="loss"``) or one gradient (``"grad"``)."""

    def __init__(self, step: int, what: str) -> None:
        self.step, self.what = step, what

    def extra_loss(self, ctx, batch):
        if self.what == "loss" and ctx.step + 1 == self.step:
            return torch.tensor(float("nan"))
        return None

    def before_optimizer_step(self, ctx):
        if self.what == "grad" and ctx.step + 1 == self.step:
            next(p for _, p in ctx.trainable_parameters()).grad.fill_(float("inf"))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**({"max_steps": 4, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "progress": False} | kw))


@pytest.mark.parametrize(("what", "named"), [("loss", "loss"), ("grad", "gradient norm")])
@pytest.mark.parametrize("clip", [1.0, None])
def test_nonfinite_stops_the_stage_naming_the_step(what, named, clip, lora_model, accelerator):
    """Without clipping too: the gradient norm is then taken for the check only (a gradient that is not finite where
    the loss is, e.g. SAM's from the perturbed weights, was stepped with)."""
    model = lora_model()
    with pytest.raises(NonFiniteError, match=f"non-finite {named}.*step 3 of the domain stage") as info:
        train_stage(model, random_examples(8, 8), _cfg(max_grad_norm=clip), [PoisonAt(3, what)],
                    accelerator=accelerator)
    assert (info.value.stage, info.value.step, info.value.what) == ("domain", 3, named)


@pytest.mark.parametrize("clip", [1.0, None])
def test_skip_step_drops_the_update_and_counts_it(clip, lora_model, accelerator):
    model = lora_model()
    snapshots = []

    class Snapshot(Method):
        def before_optimizer_step(self, ctx):
            snapshots.append({n: p.detach().clone() for n, p in ctx.trainable_parameters()})

    result = train_stage(model, random_examples(8, 8), _cfg(on_nonfinite="skip_step", max_grad_norm=clip),
                         [PoisonAt(2, "grad"), Snapshot()], accelerator=accelerator)
    assert result.extras["skipped_steps"] == [2]
    assert [row.get("skipped", 0.0) for row in result.history] == [0.0, 1.0, 0.0, 0.0]
    for name in snapshots[1]:  # step 2 changed nothing: the weights before step 3 are those before step 2
        assert torch.equal(snapshots[1][name], snapshots[2][name])
    assert any(not torch.equal(snapshots[0][n], snapshots[1][n]) for n in snapshots[0])
    assert [row["lr"] for row in result.history] == pytest.approx([1e-2 * (1 - k / 4) for k in range(4)])


class NanActivationsAt(Method):
    """At optimizer step ``step`` (1-based) the embeddings' output is NaN: loss and every gradient non-finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_stage_start(self, ctx):
        import math

        emb = ctx.model.get_input_embeddings()
        self.hook = emb.register_forward_hook(lambda m, a, out: out * math.nan if ctx.step + 1 == self.step else out)

    def on_stage_end(self, ctx):
        self.hook.remove()


@pytest.mark.parametrize("estimator", ["exact", "paper", "adam"])
def test_a_skipped_step_leaves_nothing_in_hloras_importance(estimator, lora_model, accelerator):
    """HLoRA's exact estimator sums each step's full-weight gradient in its backward hooks and cleared the sum after
    the optimizer step, which a skipped step never reaches: a step skipped for NaN gradients made every later omega
    NaN, and one skipped for another reason (an infinite gradient norm) was counted into the next step. Skipped
    for NaN activations or for an infinite gradient, step 2 now leaves the same importance, finite."""
    importance = []
    for poison in (NanActivationsAt(2), PoisonAt(2, "grad")):
        model = lora_model()
        hlora = resolve({"name": "hlora", "estimator": estimator}).plugins[0]
        result = train_stage(model, random_examples(8, 8), _cfg(on_nonfinite="skip_step", max_grad_norm=1.0),
                             [poison, hlora], stage="general", accelerator=accelerator)
        assert result.extras["skipped_steps"] == [2]
        importance.append({k: v.clone() for k, v in hlora.importance.items()})
    for name, omega in importance[0].items():
        assert torch.isfinite(omega).all(), name
        assert torch.equal(omega, importance[1][name]), name
    assert any(omega.abs().sum() > 0 for omega in importance[0].values())


def test_eval_every_takes_its_row_on_a_skipped_step():
    """EvalEvery recorded only after an optimizer step, which a skipped step never reaches: a skipped last step lost
    the final row."""
    from forgetless.training.tracking import EvalEvery
    from tests.unit.tiny_model import make_lora_model

    rows = []
    tracker = EvalEvery(2, lambda model: rows.append(1) or {"domain_acc": 0.5}, stages=("domain",))
    train_stage(make_lora_model(0, b_std=0.05), random_examples(8, 8), _cfg(on_nonfinite="skip_step"),
                [PoisonAt(4, "grad"), tracker])
    assert [row["step"] for row in tracker.history] == [0, 2, 4]


def test_nonfinite_policy_is_validated():
    with pytest.raises(ValueError, match="on_nonfinite"):
        TrainConfig(on_nonfinite="ignore")


class Seen(Method):
    """Whether activations are recomputed, at the first step and at the end of each stage."""

    def __init__(self):
        self.on = []

    def before_optimizer_step(self, ctx):
        if ctx.step == 0:
            self.on.append(gradient_checkpointing_on(ctx.model))

    def on_stage_end(self, ctx):
        self.on.append(gradient_checkpointing_on(ctx.model))


@pytest.mark.parametrize("entry", ["lora-nu-mu", {"name": "hlora", "estimator": "exact", "phi": 1e3},
                                   {"name": "ewc", "lambda": 1e3, "samples": 8}, {"name": "sam", "rho": 0.05}])
def test_gradient_checkpointing_changes_nothing(entry, accelerator):
    from tests.unit.tiny_model import make_lora_model

    def run(checkpointing: bool):
        model = make_lora_model(0, b_std=0.05)
        model.get_base_model().config.use_cache = True
        model.train()
        recorder = GradRecorder()
        plugins = resolve(entry).plugins
        cfg = _cfg(max_steps=2, gradient_checkpointing=checkpointing, max_grad_norm=None)
        general = variable_examples(8, seed=1)
        seen = Seen()
        extras = train_stage(model, general, cfg, plugins + [recorder.plugin, seen], stage="general",
                             accelerator=accelerator).extras
        train_stage(model, variable_examples(8, seed=2), cfg, plugins + [recorder.plugin, seen], stage="domain",
                    accelerator=accelerator, general_examples=general)
        assert seen.on == [checkpointing] * 4  # on during each stage, Fisher at the general stage's end included
        assert not gradient_checkpointing_on(model)  # and off again afterwards
        assert model.get_base_model().config.use_cache  # as it was before
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return recorder.grads, weights, plugins, extras

    plain, with_ckpt = run(False), run(True)
    for stage in plain[0]:
        for name, grad in plain[0][stage].items():
            assert torch.allclose(with_ckpt[0][stage][name], grad, rtol=1e-5, atol=1e-8), (stage, name)
    for name, w in plain[1].items():
        assert torch.allclose(with_ckpt[1][name], w, rtol=1e-5, atol=1e-8), name
    for p_plain, p_ckpt in zip(plain[2], with_ckpt[2]):
        for attr in ("importance", "fisher"):
            table = getattr(p_plain, attr, None)
            if table:
                for name, value in table.items():
                    assert torch.allclose(getattr(p_ckpt, attr)[name], value, rtol=1e-5, atol=1e-10), (attr, name)


def test_the_fisher_recomputes_activations_under_checkpointing_with_the_same_values():
    """EWC's Fisher runs in eval mode (no dropout); the checkpointed layers must still recompute (transformers only
    recomputes a layer whose ``training`` flag is set), with the same Fisher, and the mode is restored."""
    from forgetless.methods.ewc import fisher_diagonal
    from forgetless.training.loop import disable_gradient_checkpointing, enable_gradient_checkpointing
    from tests.unit.tiny_model import make_lora_model

    examples = variable_examples(6, seed=3)
    results = {}
    for checkpointing in (False, True):
        model = make_lora_model(0, b_std=0.05, targets=("q_proj", "v_proj", "down_proj"))
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls = []
        layers = model.get_base_model().model.layers
        # attention: the recomputation stops early, once the backward has all it needs (inside the MLP, whose
        # forward then never returns), so attention's forward is what counts the passes (with gradients: the head
        # split's probe runs without)
        handles = [layer.self_attn.register_forward_hook(lambda *a: torch.is_grad_enabled() and calls.append(1))
                   for layer in layers]
        fisher, tokens = fisher_diagonal(model, examples, "sampled", batch_size=4, seed=5)
        for h in handles:
            h.remove()
        batches = 2  # 6 examples, 4 per pass
        assert len(calls) == len(layers) * batches * (2 if checkpointing else 1), checkpointing
        assert model.training and all(m.training for m in model.modules())  # the mode came back
        if checkpointing:
            disable_gradient_checkpointing(model)
        results[checkpointing] = fisher, tokens
    assert results[True][1] == results[False][1]
    assert set(results[True][0]) == set(results[False][0])
    for name, value in results[False][0].items():
        assert value.abs().sum() > 0, name
        assert torch.allclose(results[True][0][name], value, rtol=1e-5, atol=1e-12), name


def test_reduction_buckets_keep_order_and_bound_size():
    from forgetless.methods.common import _buckets

    sizes = [3, 4, 10, 1, 2, 2]
    runs = list(_buckets([torch.zeros(n) for n in sizes], 6))
    assert [[t.numel() for t in run] for run in runs] == [[3], [4], [10], [1, 2, 2]]


def test_a_step_without_labelled_tokens_moves_nothing(lora_model, accelerator):
    """A step none of whose examples has a labelled token (every answer cut off) has a zero gradient, yet AdamW's
    momentum and weight decay moved the weights and the step was logged as loss 0.0. It is skipped now: 2 steps over
    [labelled, unlabelled] one example at a time (either order) end where 1 step over [labelled] does."""
    labelled = random_examples(1, 8, seed=1)[0]
    unlabelled = dict(labelled, labels=[-100] * len(labelled["labels"]))
    cfg = _cfg(batch_size=1, scheduler="constant", weight_decay=0.1)

    def trained(examples, steps):
        model = lora_model(b_std=0.05)
        result = train_stage(model, examples, dataclasses.replace(cfg, max_steps=steps), accelerator=accelerator)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, result

    both, result = trained([labelled, unlabelled], 2)
    alone, _ = trained([labelled], 1)
    for name, w in alone.items():
        assert torch.equal(both[name], w), name
    skipped = [row for row in result.history if row.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["loss"] is None and result.extras["skipped_steps"] == [skipped[0]["step"]]


def test_bad_training_examples_are_named_before_the_stage_starts(lora_model, accelerator):
    """A malformed example was found when its batch came up, maybe many steps in, and named by its place in that
    batch; a stage whose examples have no labelled token at all trained nothing without a word."""
    examples = random_examples(6, 8)
    examples[4] = dict(examples[4], labels=examples[4]["labels"][:-1])
    with pytest.raises(ValueError, match=r"training example 4: input_ids and labels differ in length \(8 vs 7\)"):
        train_stage(lora_model(), examples, _cfg(), accelerator=accelerator)
    unlabelled = [dict(e, labels=[-100] * 8) for e in random_examples(3, 8)]
    with pytest.raises(ValueError, match="none of the 3 training examples has a labelled token"):
        train_stage(lora_model(), unlabelled, _cfg(), accelerator=accelerator)


def test_an_examples_own_padding_is_dropped(lora_model, accelerator):
    """A tokenized row padded to max_length with an attention_mask (left or right): the pad tokens were attended to
    (collate set attention 1 everywhere) and left padding shifted the positions. Its padding is dropped now: the
    padded rows train as the bare row does."""
    bare = random_examples(2, 6, seed=2)
    pad = 0

    def padded(example, left):
        ids, labels, n = example["input_ids"], example["labels"], 3
        mask = [0] * n + [1] * 6 if left else [1] * 6 + [0] * n
        return {"input_ids": [pad] * n + ids if left else ids + [pad] * n,
                "labels": [-100] * n + labels if left else labels + [-100] * n, "attention_mask": mask}

    results = []
    for examples in (bare, [padded(e, True) for e in bare], [padded(e, False) for e in bare]):
        model = lora_model(b_std=0.05)
        train_stage(model, examples, _cfg(max_steps=2, batch_size=2), accelerator=accelerator)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, w in results[0].items():
        torch.testing.assert_close(results[1][name], w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(results[2][name], w, rtol=1e-5, atol=1e-7)


class FailAt(Method):
    """Raises at optimizer step ``step`` (1-based)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def before_optimizer_step(self, ctx):
        if ctx.step + 1 == self.step:
            raise RuntimeError("boom")


def test_a_failed_stage_gives_the_model_back_as_it_came(lora_model, accelerator):
    """An error inside the stage left gradient checkpointing on, LoRA fused and HLoRA's exact-estimator hooks on the
    model, so a caller catching it evaluated or trained a changed model."""
    from forgetless.fused_lora import _MARK

    model = lora_model()
    hlora = resolve({"name": "hlora", "estimator": "exact"}).plugins[0]
    with pytest.raises(RuntimeError, match="boom"):
        train_stage(model, random_examples(8, 8), _cfg(gradient_checkpointing=True, fused_lora=True),
                    [hlora, FailAt(2)], stage="general", accelerator=accelerator)
    assert not gradient_checkpointing_on(model)
    assert not any(getattr(m, _MARK, False) or "forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    # a stage that ends well leaves no hook either (transformers' checkpointing left its embedding hook on)
    train_stage(model, random_examples(8, 8), _cfg(gradient_checkpointing=True), accelerator=accelerator)
    assert not gradient_checkpointing_on(model) and not any(m._forward_hooks for m in model.modules())


class Interrupt(Method):
    """Ctrl-C in the second micro-batch of the second step: the trainable weights hold partial gradients."""

    def extra_loss(self, ctx, batch):
        if (ctx.step, ctx.micro) == (1, 1):
            raise KeyboardInterrupt
        return None


def test_a_retry_after_an_interrupted_stage_trains_as_a_first_try(lora_model, accelerator):
    """The interrupted stage left its partial gradients on the weights and the model in training mode (dropout on),
    and a second train_stage added those gradients to its first step (weights off by up to 0.03 here)."""
    cfg = _cfg(max_steps=3, batch_size=2, grad_accum=2, max_grad_norm=None)
    examples = variable_examples(12)
    clean = lora_model()
    train_stage(clean, examples, cfg, accelerator=accelerator)
    model = lora_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    model.get_submodule(next(n for n, _ in model.named_modules() if n.endswith("lora_A"))).train()  # a mixed one
    modes = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(KeyboardInterrupt):
        train_stage(model, examples, cfg, [Interrupt()], accelerator=accelerator)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
        for p in model.parameters():  # gradients a caller left on the weights are not stepped with either
            if p.requires_grad:
                p.grad = torch.ones_like(p)
    train_stage(model, examples, cfg, accelerator=accelerator)
    for (name, p), (_, q) in zip(model.named_parameters(), clean.named_parameters()):
        assert torch.equal(p, q), name


def test_an_accelerator_that_casts_accumulates_or_compiles_is_refused(lora_model):
    """A caller's Accelerator(gradient_accumulation_steps=4) divided every gradient by 4 again (clipping 4x too late);
    one with mixed_precision bf16 ran a precision: fp32 stage in bf16 and recorded fp32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    for kwargs, said in (({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 (use grad_accum)"),
                         ({"mixed_precision": "bf16"}, "mixed_precision='bf16' (use precision)")):
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            with pytest.raises(ValueError, match=re.escape(said)):
                train_stage(lora_model(), random_examples(8, 8), _cfg(max_steps=1), accelerator=Accelerator(cpu=True,
                                                                                                            **kwargs))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)


def test_sixteen_bit_trainable_weights_are_refused(lora_model, accelerator):
    """AdamW steps in the weights' dtype: at lr 1e-4 81% of a bf16 LoRA A's entries did not move in a step."""
    model = lora_model()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.bfloat16()
    with pytest.raises(ValueError, match=r"must be float32 \(found bfloat16\)"):
        train_stage(model, random_examples(8, 8), _cfg(max_steps=1), accelerator=accelerator)


def test_warmup_steps_are_the_ratio_of_the_steps_rounded_down(lora_model, accelerator):
    """warmup_ratio 0.25 of 10 steps: 2 warmup steps (int(2.5)), as every recorded run took it (transformers' Trainer
    rounds up: 3), then the linear decay over the 8 others; the lr logged at step k is the one it stepped with."""
    result = train_stage(lora_model(), random_examples(8, 8), _cfg(max_steps=10, warmup_ratio=0.25, lr=1e-2),
                         accelerator=accelerator)
    lrs = [row["lr"] / 1e-2 for row in result.history]
    assert lrs == pytest.approx([0.0, 0.5] + [(10 - k) / 8 for k in range(2, 10)])


def test_an_iterator_of_examples_is_read_once_and_trained_on(lora_model, accelerator):
    """The check of the examples ran before they were listed: a generator was used up by it, and the stage then had
    none ('num_samples=0')."""
    result = train_stage(lora_model(), (e for e in random_examples(8, 8)), _cfg(max_steps=2), accelerator=accelerator)
    assert len(result.history) == 2


class FailAtEnd(Method):
    def on_stage_end(self, ctx):
        raise RuntimeError("end")


def test_a_stage_whose_end_fails_gives_the_model_back_as_it_came(lora_model, accelerator):
    """on_stage_end (an EWC Fisher without a labelled token, say) ran outside the stage's clean-up: its error left
    gradient checkpointing on and HLoRA's exact-estimator hooks on the model."""
    model = lora_model()
    hlora = resolve({"name": "hlora", "estimator": "exact"}).plugins[0]
    with pytest.raises(RuntimeError, match="end"):
        train_stage(model, random_examples(8, 8), _cfg(max_steps=2, gradient_checkpointing=True),
                    [FailAtEnd(), hlora], stage="general", accelerator=accelerator)
    assert not gradient_checkpointing_on(model) and not any(m._forward_hooks for m in model.modules())


def test_an_examples_padding_is_not_counted_as_its_length():
    """Padding (attention_mask 0) is dropped when collated; the tokens/s count, group_by_length's lengths and the
    null examples' choice of the shortest example used the padded length (every row padded to max_length looked the
    same length, and grouping did nothing)."""
    from forgetless.training.batches import collated_length
    from forgetless.training.loop import _COUNTS, _collate_counted, _null_examples

    short, long = ({"input_ids": [5] * n + [0] * (10 - n), "labels": [5] * n + [-100] * (10 - n),
                    "attention_mask": [1] * n + [0] * (10 - n)} for n in (3, 8))
    assert (collated_length(short), collated_length(long), collated_length({"input_ids": [1, 2]})) == (3, 8, 2)
    assert _collate_counted([short, long], pad_token_id=0)[_COUNTS][1] == 11
    assert _null_examples([long, short, long], batch_size=2, processes=2)[0]["input_ids"] == short["input_ids"]


def test_a_trainers_mixed_precision_wrapper_is_taken_off_for_the_stage(lora_model, device):
    """A transformers Trainer run with bf16 leaves accelerate's autocast wrapper on the model's forward: a later
    precision: fp32 stage on that model ran in bf16 (and the loss lost its labelled-rows path). The stage takes it
    off, trains as on a model that never had it, and puts it back."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    examples = random_examples(8, 8)
    clean = lora_model()
    train_stage(clean, examples, _cfg(max_steps=2))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        model = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16").prepare_model(lora_model())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    wrapped = model.__dict__["forward"]
    with pytest.warns(UserWarning, match="accelerate's mixed-precision wrapper"):
        train_stage(model, examples, _cfg(max_steps=2))
    for (name, p), (_, q) in zip(model.named_parameters(), clean.named_parameters()):
        assert torch.equal(p, q), name  # bf16 autocast would differ by far more than nothing
    assert model.__dict__["forward"] is wrapped  # the caller's model as it came


def test_a_resumed_stage_does_not_evaluate_step_0_again(lora_model, accelerator, tmp_path):
    """EvalEvery evaluated step 0 as the stage started, before the checkpoint was loaded, whose history then replaced
    that row: a whole evaluation for nothing in every resumed stage. Step 0 is now taken before the first optimizer
    step (the starting weights still) and only when no checkpoint is resumed."""
    from forgetless.training.tracking import EvalEvery

    class StopAt(Method):
        armed = True

        def after_optimizer_step(self, ctx):
            if self.armed and ctx.step + 1 == 3:
                raise RuntimeError("stopped")

    def weights_sum(model):
        return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))

    examples = random_examples(8, 8)
    cfg = TrainConfig(max_steps=4, batch_size=4, lr=1e-2, precision="fp32", progress=False, save_every=2)
    first = lora_model()
    start = weights_sum(first)
    calls = []
    tracker = EvalEvery(2, lambda model: calls.append(weights_sum(model)) or {"acc": 0.5})
    with pytest.raises(RuntimeError, match="stopped"):
        train_stage(first, examples, cfg, [tracker, StopAt()], checkpoint_dir=tmp_path / "ck",
                    accelerator=accelerator)
    assert len(calls) == 2 and calls[0] == start != calls[1]  # step 0 on the starting weights, then step 2
    calls.clear()
    tracker = EvalEvery(2, lambda model: calls.append(weights_sum(model)) or {"acc": 0.5})
    disarmed = StopAt()
    disarmed.armed = False
    result = train_stage(lora_model(), examples, cfg, [tracker, disarmed], checkpoint_dir=tmp_path / "ck",
                         accelerator=accelerator)
    assert len(calls) == 1  # step 4 only
    assert [row["step"] for row in result.extras["eval_history"]] == [0, 2, 4]
