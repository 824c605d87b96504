"""A 4-bit (NF4, QLoRA) base through bitsandbytes, and an 8-bit one: every method trains on it, the methods that need dW = s B A never
read the packed base weight, and what needs float base weights refuses with a clear error (issue #12 item 2).
Runs where bitsandbytes has a backend for this machine (its CPU backend here); skipped elsewhere."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from forgetless.lora import delta_weight, lora_modules, update_shape
from forgetless.models import LoraSettings, ModelNotFoundError, attach_lora, is_quantized, load_model
from forgetless.training.config import TrainConfig
from forgetless.training.loop import train_stage
from tests.unit.tiny_model import random_examples

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama whose weights are a multiple of bitsandbytes' 64-element quantization blocks wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny64")
    LlamaForCausalLM(config).save_pretrained(folder)
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def quantized_lora(model_dir, quantization: str = "4bit"):
    try:
        model, _ = load_model(str(model_dir), quantization=quantization)
    except ModelNotFoundError as err:
        pytest.skip(f"bitsandbytes cannot run here: {err}")
    assert is_quantized(model)
    return attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))


ENTRIES = ["lora-nu-mu", "hlora", {"name": "hlora", "estimator": "exact"}, "ewc", "sam", "replay", "wise-ft",
           ["hlora", "sam"]]


@pytest.mark.parametrize("quantization, entry", [("4bit", e) for e in ENTRIES]
                         + [("8bit", e) for e in ("hlora", "ewc", "sam", "wise-ft")])
def test_every_method_trains_on_a_quantized_base(quantization, entry, model_dir):
    from forgetless.methods import resolve

    model = quantized_lora(model_dir, quantization)
    with torch.no_grad():  # an eval-mode forward first: bitsandbytes' CPU backend would repack (no backward after)
        model.eval()
        model(input_ids=torch.tensor([[3, 4, 5]]))
        model.train()
    packed = {n: m.get_base_layer().weight.detach().clone() for n, m in lora_modules(model)}
    if quantization == "4bit":  # packed two to a byte
        assert all(w.shape != update_shape(m) for (n, m), w in zip(lora_modules(model), packed.values()))
    else:  # int8, one per element
        assert all(w.dtype == torch.int8 for w in packed.values())
    plugins = resolve(entry).plugins
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, precision="fp32", progress=False)
    general = random_examples(8, 8, seed=1)
    train_stage(model, general, cfg, plugins, stage="general")
    result = train_stage(model, random_examples(8, 8, seed=2), cfg, plugins, stage="domain", general_examples=general)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    for plugin in plugins:
        for table in (getattr(plugin, "importance", None), getattr(plugin, "fisher", None)):
            for name, module in lora_modules(model):
                key = name if table is getattr(plugin, "importance", None) else f"{name}.base_layer.weight"
                if table:
                    assert tuple(table[key].shape) == update_shape(module)
                    assert float(table[key].abs().sum()) > 0, (key, "no gradient reached this module")
        for _label, setup in plugin.evaluation_variants(model):
            with setup:
                assert all(torch.isfinite(delta_weight(m)).all() for _, m in lora_modules(model))
    for name, module in lora_modules(model):  # the frozen base is never written
        assert torch.equal(module.get_base_layer().weight, packed[name])


def test_full_fisher_refuses_a_quantized_base(model_dir):
    from forgetless.methods.ewc import fisher_diagonal

    model = quantized_lora(model_dir)
    with pytest.raises(ValueError, match="quantized"):
        fisher_diagonal(model, random_examples(2, 8), fisher_over="all")


def test_missing_bitsandbytes_says_what_to_install(monkeypatch, model_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(ModelNotFoundError, match=r"forgetless\[qlora\]"):
        load_model(str(model_dir), quantization="4bit")


def test_running_out_of_memory_while_loading_is_not_blamed_on_bitsandbytes(monkeypatch, model_dir):
    """torch.OutOfMemoryError is a RuntimeError: a k-bit base that did not fit read as "it needs bitsandbytes with a
    backend for this device"."""
    import forgetless.models as models

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", full)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        load_model(str(model_dir), quantization="4bit")


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_embeddings_and_head_keep_the_base_dtype_norms_are_float32(model_dir, precision):
    """A 4-bit base keeps its embeddings and head in the base's dtype (bf16 when the run computes in bf16, float32
    when it is pinned to fp32) instead of PEFT's float32 for all (3.9 against 1.96 GiB at the 8B shape); the norms
    are float32 as PEFT has them; only LoRA trains."""
    try:
        model, _ = load_model(str(model_dir), precision=precision, quantization="4bit")
    except ModelNotFoundError as err:
        pytest.skip(f"bitsandbytes cannot run here: {err}")
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert model.get_input_embeddings().weight.dtype == want
    assert model.get_output_embeddings().weight.dtype == want
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_a_bf16_head_gives_the_float32_heads_logits_under_autocast_and_casts_outside():
    """Under bf16 autocast a bf16 head computes the same logits, bit for bit, as the float32 copy of the same weights
    (PEFT's recipe): autocast casts that copy to the same bf16 numbers. Outside autocast the pre-hook casts a float32
    input to the head's dtype, which is what a bf16 head computes on bf16 input."""
    from forgetless.models import _cast_to_weight

    g = torch.Generator().manual_seed(0)
    head16 = torch.nn.Linear(64, 96, bias=False).to(torch.bfloat16)
    head32 = torch.nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        head16.weight.copy_(torch.randn(96, 64, generator=g))
        head32.weight.copy_(head16.weight.float())
    head16.register_forward_pre_hook(_cast_to_weight)
    x = torch.randn(5, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head16(x), head32(x))
    assert torch.equal(head16(x), torch.nn.functional.linear(x.to(torch.bfloat16), head16.weight))


def test_a_bf16_base_trains_with_fp32_precision_and_a_chunked_loss(model_dir):
    """``dtype: bf16`` with ``precision: fp32``: the reduced head gets a float32 hidden state outside autocast, on the
    plain and on the chunked cross-entropy path (same loss), and a step trains."""
    from forgetless.training.loss import CausalLMLoss

    try:
        model, _ = load_model(str(model_dir), dtype="bf16", precision="fp32", quantization="4bit")
    except ModelNotFoundError as err:
        pytest.skip(f"bitsandbytes cannot run here: {err}")
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    plain, chunked = CausalLMLoss(model, chunk_elements=None), CausalLMLoss(model, chunk_elements=64 * 5)
    assert chunked._chunk_rows(22) == 5
    lp, lc = plain(input_ids=ids, labels=ids), chunked(input_ids=ids, labels=ids)
    lp, lc = float(lp.detach()), float(lc.detach())
    assert math.isfinite(lp) and abs(lp - lc) <= 1e-5 * lp
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, precision="fp32", progress=False)
    result = train_stage(model, random_examples(8, 8, seed=2), cfg, [], stage="domain")
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)


def test_prepare_quantized_casts_nothing_for_methods_peft_leaves_alone():
    """As PEFT's recipe: a GPTQ (or AQLM, EETQ, HQQ, torchao) model keeps its 16-bit weights' dtypes (their kernels
    expect them); only the base is frozen. A bitsandbytes model gets float32 norms."""
    from transformers.utils.quantization_config import QuantizationMethod

    from forgetless.models import prepare_quantized
    from tests.unit.tiny_model import make_tiny_model

    for method, norms in ((QuantizationMethod.GPTQ, torch.bfloat16), (QuantizationMethod.BITS_AND_BYTES, torch.float32)):
        model = make_tiny_model(0).to(torch.bfloat16)
        model.quantization_method = method
        prepare_quantized(model)
        assert all(p.dtype == norms for n, p in model.named_parameters() if "norm" in n)
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
        assert not any(p.requires_grad for p in model.parameters())


def test_a_qlora_adapter_loaded_for_evaluation_computes_as_it_trained(model_dir, tmp_path):
    """load_adapter did not prepare a k-bit base as attach_lora does: eval --adapter of a QLoRA run kept bf16 norms
    where training had float32 ones, and scored other numbers than the run's own evaluation."""
    from forgetless.models import load_adapter, save_adapter

    def base():  # a bf16 base, as on a GPU or an avx512_bf16 CPU, computing in fp32 (pinned: the same on every CPU)
        try:
            return load_model(str(model_dir), quantization="4bit", dtype="bf16", precision="fp32")[0]
        except ModelNotFoundError as err:
            pytest.skip(f"bitsandbytes cannot run here: {err}")

    trained = attach_lora(base(), LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    save_adapter(trained, tmp_path / "adapter", str(model_dir))
    loaded = load_adapter(base(), tmp_path / "adapter")
    assert sorted({str(p.dtype) for n, p in loaded.named_parameters() if "norm" in n}) == ["torch.float32"]
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    trained.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
