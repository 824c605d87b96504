"""Speed levers (issue #15, item 3; docs/speed.md): each one computes the same thing as the default path.

attention implementation (sdpa vs eager), torch.compile of the decoder layers, padding-free packing (position ids
restarting per example, no attention mask), length-grouped batches, Liger (its errors; it runs on CUDA only), and the
step loop reading nothing from the device between logging intervals. All on the tiny Llama in float32.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest
import torch

import forgetless
from forgetless.models import (LeverUnavailable, attn_implementation_of, check_attn_implementation, compile_model,
                               liger_available, set_attn_implementation, uncompile)
from forgetless.training.batches import LengthGroupedSampler, add_loss_index, collate, collate_packed
from forgetless.training.config import TrainConfig
from forgetless.training.hooks import Method
from forgetless.training.loop import train_stage
from forgetless.training.loss import CausalLMLoss, causal_lm_loss
from tests.unit.tiny_model import make_lora_model

# forgetless's own code: not a library in a virtualenv that a checkout named .../forgetless/.venv holds
PACKAGE_DIR = os.path.dirname(forgetless.__file__) + os.sep


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**({"precision": "fp32", "progress": False, "lr": 1e-2, "seed": 0} | kw))


def _ragged(n: int = 6, seed: int = 0, prompt: int = 2) -> list[dict]:
    """Examples of different lengths (3..12 tokens), the first ``prompt`` tokens without a loss (like a question)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b))


def _loss_and_grads(model, batch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = CausalLMLoss(model)(**batch)
    loss.backward()
    return float(loss), _grads(model)


# ------------------------------------------------------------------------------------------------ attention
def test_attention_implementations_give_equal_logits():
    model = make_lora_model(0, b_std=0.05)
    batch = collate(_ragged(4), 0)
    logits = {}
    for impl in ("sdpa", "eager"):
        set_attn_implementation(model, impl)
        assert attn_implementation_of(model) == impl
        with torch.no_grad():
            logits[impl] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(logits["eager"][keep], logits["sdpa"][keep], rtol=1e-5, atol=1e-5)


def test_load_model_passes_the_attention_to_from_pretrained(tiny_model_dir):
    from forgetless.models import load_model

    model, _ = load_model(str(tiny_model_dir), dtype="fp32", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    assert model.config._attn_implementation == "sdpa"  # transformers' default


def test_a_stage_switches_the_attention(examples):
    model = make_lora_model(0)
    train_stage(model, examples, _cfg(max_steps=1, batch_size=4, attn_implementation="eager"))
    assert attn_implementation_of(model) == "eager"


def test_flash_attention_without_its_package_or_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        check_attn_implementation("flash")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        TrainConfig(attn_implementation="flash")
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn and CUDA are both here")
    with pytest.raises(LeverUnavailable, match="flash_attention_2 needs"):
        check_attn_implementation("flash_attention_2")


# ------------------------------------------------------------------------------------------------ Liger
@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None,
                    reason="Liger can run here")
def test_liger_without_its_package_or_a_gpu_is_a_clear_error():
    with pytest.raises(LeverUnavailable, match="liger") as err:
        liger_available()
    if importlib.util.find_spec("liger_kernel") is None:
        assert "pip install 'forgetless[liger]'" in str(err.value)
        with pytest.raises(ValueError, match=r"pip install 'forgetless\[liger\]'"):
            TrainConfig(liger=True)
    else:
        assert "CUDA" in str(err.value)


def test_liger_fused_cross_entropy_is_called_with_the_head_and_the_labelled_rows(monkeypatch):
    """``liger: true`` routes the loss through Liger's fused linear cross-entropy. Liger's kernels need CUDA, so here
    the function is a stand-in that computes, in plain torch, what Liger documents (mean CE of ``input @ weight.T +
    bias``, soft-capped): loss and LoRA gradients equal the plain path's, and the call gets the model's own head
    weight and one row per labelled token. bench/bench_gpu.py compares the real kernel on a GPU."""
    import types

    calls = []

    def reference(input, weight, target, bias=None, softcap=None, reduction="mean", **kw):
        calls.append((input, weight, target.clone(), bias, softcap))
        logits = torch.nn.functional.linear(input, weight, bias)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits.float(), target, reduction=reduction)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = reference
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    model = make_lora_model(b_std=0.05)
    examples = _ragged()
    for batch in (collate(examples, pad_token_id=0), add_loss_index(collate(examples, pad_token_id=0))):
        plain_loss, plain = _loss_and_grads(model, batch)
        model.zero_grad(set_to_none=True)
        fused = CausalLMLoss(model, fused_ce=True)
        assert fused.fused_ce
        loss = fused(**batch)
        loss.backward()
        assert float(loss) == pytest.approx(plain_loss, rel=1e-6) and _rel(_grads(model), plain) < 1e-5
        rows, weight, target, bias, softcap = calls.pop()
        labelled = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
        assert weight is model.get_base_model().lm_head.weight and bias is None and softcap is None
        assert rows.shape[0] == labelled == target.numel()
    wrapped = make_lora_model(targets=("q_proj", "lm_head"))  # a head that LoRA wraps: the plain path
    assert not CausalLMLoss(wrapped, fused_ce=True).fused_ce
    # a bf16 head after float32 norms (a 4-bit base keeps its head in the base's dtype): the kernel gets one dtype
    head = model.get_base_model().lm_head
    head.weight.data = head.weight.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        CausalLMLoss(model, fused_ce=True)(**add_loss_index(collate(examples, pad_token_id=0)))
    assert calls[-1][0].dtype == calls[-1][1].dtype == torch.bfloat16


def test_forgetless_train_refuses_liger_without_it(tmp_path, capsys):
    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed")
    from pathlib import Path

    from forgetless.cli import main

    task = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "generic.jsonl"
    code = main(["train", "--domain", str(task), "--output", str(tmp_path / "a"), "--liger", "--max-steps", "1"])
    assert code == 2
    assert "pip install 'forgetless[liger]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ padding-free
def test_collate_packed_restarts_positions_and_masks_each_boundary():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = collate_packed(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch
    add_loss_index(batch)  # targets at flat positions 0 (6), 1 (7), 3 (9); position 2 would predict 8 across the seam
    assert batch["loss_index"].tolist() == [0, 1, 3] and batch["loss_targets"].tolist() == [6, 7, 9]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_batch(impl):
    model = make_lora_model(0, b_std=0.05)
    set_attn_implementation(model, impl)
    examples = _ragged(6)
    padded = _loss_and_grads(model, add_loss_index(collate(examples, 0)))
    packed = _loss_and_grads(model, add_loss_index(collate_packed(examples)))
    plain = _loss_and_grads(model, collate(examples, 0))  # the boolean-mask path of causal_lm_loss
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    assert _rel(packed[1], padded[1]) <= 1e-5
    assert padded[0] == pytest.approx(plain[0], rel=1e-6) and _rel(padded[1], plain[1]) <= 1e-6


def test_packed_stage_equals_padded_stage():
    class Shapes(Method):  # what the model was given: equal numbers alone hold without packing too
        def wrap_forward_backward(self, ctx, forward_backward):
            def seen(batch):
                shapes.append((tuple(batch["input_ids"].shape), "position_ids" in batch, "attention_mask" in batch))
                return forward_backward(batch)
            return seen

    examples = _ragged(12, seed=3)
    runs = {}
    for packed in (False, True):
        model = make_lora_model(0)
        shapes: list[tuple] = []
        result = train_stage(model, examples, _cfg(max_steps=3, batch_size=4, padding_free=packed, log_every=1),
                             [Shapes()])
        runs[packed] = ([row["loss"] for row in result.history],
                        [p.detach().clone() for p in model.parameters() if p.requires_grad])
        assert len(shapes) == 3, shapes
        for (rows, _), positions, mask in shapes:  # packed: one row of the 4 examples, kept apart by position ids
            assert (rows, positions, mask) == ((1, True, False) if packed else (4, False, True)), shapes
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert _rel(runs[True][1], runs[False][1]) <= 1e-4  # three Adam steps on top of gradients equal to ~1e-6


def test_padding_free_refuses_an_attention_that_ignores_position_ids(examples):
    model = make_lora_model(0)
    model.get_base_model().config._attn_implementation = "flex_attention"
    with pytest.raises(LeverUnavailable, match="padding_free: true needs an attention"):
        train_stage(model, examples, _cfg(max_steps=1, padding_free=True))


# ------------------------------------------------------------------------------------------------ length grouping
def test_length_grouped_batches_see_every_example_once_and_group_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 200, (400,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=4, generator=torch.Generator().manual_seed(5))
    epochs = [list(sampler) for _ in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(400))  # every example exactly once per epoch
    assert epochs[0] != epochs[1]  # a new order each epoch
    again = LengthGroupedSampler(lengths, batch_size=4, generator=torch.Generator().manual_seed(5))
    assert [list(again) for _ in range(2)] == epochs  # deterministic given the seed
    assert lengths[epochs[0][0]] == max(lengths)  # the longest example first (an out-of-memory shows at once)

    def spread(order):  # mean (max - min) length within batches of 4
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        return sum(max(lengths[k] for k in b) - min(lengths[k] for k in b) for b in batches) / len(batches)

    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(5)).tolist()
    assert spread(epochs[0]) < spread(shuffled) / 5


def test_length_groups_are_the_same_for_a_batch_and_its_accumulated_split():
    """The sampler grouped by the micro-batch: batch 8 and 4 x 2 accumulated shared no optimizer step's examples.
    Grouped by the global batch, every step holds the same examples (and the longest comes first in both)."""
    examples = _ragged(48, seed=3, prompt=1)
    for i, e in enumerate(examples):
        e["input_ids"][0] = i  # a mark: which example a row is

    def steps(batch_size, grad_accum):
        seen = {}

        class Batches(Method):
            def wrap_forward_backward(self, ctx, fb):
                def wrapped(batch):
                    rows = seen.setdefault(ctx.step, [])
                    rows += [int(r[0]) for r in batch["input_ids"]]
                    return fb(batch)
                return wrapped

        train_stage(make_lora_model(0, b_std=0.05), examples, _cfg(max_steps=6, batch_size=batch_size,
                                                                   grad_accum=grad_accum, group_by_length=True),
                    [Batches()])
        return [sorted(seen[s]) for s in sorted(seen)]

    whole, split = steps(8, 1), steps(4, 2)
    assert whole == split and len(whole) == 6
    assert max(len(examples[i]["input_ids"]) for i in whole[0]) == max(len(e["input_ids"]) for e in examples)


def test_group_by_length_stage_uses_the_token_weighted_mean(monkeypatch):
    """A length-grouped stage's logged loss is the token mean over the step's micro-batches (ctx.loss_scale weights
    each micro-batch by its labelled tokens), whatever the batches hold."""
    examples = _ragged(16, seed=1, prompt=1)
    seen = []

    class Batches(Method):
        def wrap_forward_backward(self, ctx, fb):
            def wrapped(batch):
                seen.append({k: v.clone() for k, v in batch.items()})
                return fb(batch)
            return wrapped

    model = make_lora_model(0, b_std=0.05)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_stage(model, examples, _cfg(max_steps=1, batch_size=4, grad_accum=2, group_by_length=True,
                                               lr=1e-9, log_every=1), [Batches()])
    model.load_state_dict(snapshot)
    with torch.no_grad():
        losses = [float(causal_lm_loss(model, {k: b[k] for k in ("input_ids", "attention_mask", "labels")}))
                  for b in seen]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in seen]
    expected = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    widths = [b["input_ids"].shape[1] for b in seen]
    assert widths[0] == max(len(e["input_ids"]) for e in examples)  # the longest first


# ------------------------------------------------------------------------------------------------ torch.compile
def _has_compiler() -> bool:
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile (inductor) needs a C++ compiler on the CPU")
@pytest.mark.skipif(sys.version_info >= (3, 14), reason="torch.compile does not support this Python")
def test_compiled_layers_give_equal_loss_and_gradients():
    """One layer's graph, compiled once (the second layer and the backward reuse it): ~1-2 min on a loaded 2-core
    CPU, most of it inductor's C++ build."""
    torch._dynamo.reset()
    model = make_lora_model(0, b_std=0.05)
    batch = add_loss_index(collate(_ragged(4), 0))
    ref = _loss_and_grads(model, batch)
    compiled = compile_model(model)
    assert len(compiled) == 2 and all(m._compiled_call_impl is not None for m in compiled)
    got = _loss_and_grads(model, batch)
    uncompile(compiled)
    assert all(m._compiled_call_impl is None for m in compiled)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert _rel(got[1], ref[1]) <= 1e-5


# ------------------------------------------------------------------------------------------------ host syncs
def test_logged_tensors_stay_on_the_device_until_the_interval(examples, monkeypatch):
    """ctx.log keeps a tensor as it is (read with the step's other scalars at log_every), and a stage with a method
    logging a tensor at every step reads no device value in forgetless code between intervals."""
    reads = []
    for name in ("__float__", "item", "tolist", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            code = sys._getframe(1).f_code
            if code.co_filename.startswith(PACKAGE_DIR) \
                    and code.co_name not in ("_collate_counted", "__iter__"):  # CPU: the batch's counts, the order
                reads.append(f"{code.co_filename}:{code.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    seen: list[int] = []

    class Logs(Method):
        def extra_loss(self, ctx, batch):
            term = sum((p ** 2).sum() for p in ctx.model.parameters() if p.requires_grad) * 1e-6
            ctx.log("l2", term)
            return term

        def after_optimizer_step(self, ctx):
            assert isinstance(ctx.scalars["l2"], torch.Tensor)
            seen.append(len(reads))

    result = train_stage(make_lora_model(0), examples + examples, _cfg(max_steps=4, batch_size=4, log_every=4,
                                                                       group_by_length=True), [Logs()])
    monkeypatch.undo()
    assert seen == [0, 0, 0, 0], reads
    assert all(isinstance(row["l2"], float) for row in result.history)


def tiny_gemma3_multimodal() -> torch.nn.Module:
    """A tiny Gemma3ForConditionalGeneration (what Gemma-3 4B-27B load as): a SigLIP vision tower and a text decoder,
    both with q_proj/v_proj."""
    import transformers

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, head_dim=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_compile_takes_the_language_models_layers_of_a_multimodal_model():
    """Gemma-3 4B-27B loads as Gemma3ForConditionalGeneration, whose first `layers` list is its vision tower's:
    `compile: true` compiled the SigLIP encoder and left the text decoder eager."""
    from forgetless.models import _decoder_layers

    model = tiny_gemma3_multimodal()
    layers = _decoder_layers(model)
    assert layers is model.get_decoder().layers and type(layers[0]).__name__ == "Gemma3DecoderLayer"


def test_lora_on_a_multimodal_model_wraps_the_language_model_only():
    """The default q_proj/v_proj targets matched Gemma-3's SigLIP attention too: LoRA matrices that never get a
    gradient from text, counted in HLoRA's and EWC's importance and saved in the adapter."""
    from forgetless.models import LoraSettings, attach_lora

    model = attach_lora(tiny_gemma3_multimodal(), LoraSettings(r=2, alpha=4))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 4 and all("language_model.layers." in n for n in wrapped)  # 2 layers x q, v
