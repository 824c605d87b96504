"""The chunked head + cross-entropy (forgetless.training.loss.ChunkedLinearCrossEntropy): the loss and the gradients of
the plain path (head, float32 cross-entropy, autograd), without ever holding the [rows, vocab] logits."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from forgetless.training.batches import add_loss_index, collate
from forgetless.training.loss import ChunkedLinearCrossEntropy, CausalLMLoss
from tests.unit.tiny_model import make_lora_model, random_examples


def _plain(hidden, weight, bias, targets, softcap):
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_chunked_loss_and_hidden_gradient_equal_autograd_of_the_plain_path(softcap, chunk):
    g = torch.Generator().manual_seed(0)
    rows, hidden_size, vocab = 13, 8, 11
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    hidden = torch.randn(rows, hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = 0.7  # a scaled loss (as accumulation and SAM scale it) must scale the gradient

    expected = _plain(hidden, weight, bias, targets, softcap)
    (want,) = torch.autograd.grad(expected * upstream, hidden)
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, softcap, chunk)
    (have,) = torch.autograd.grad(got * upstream, hidden)
    # float32 log-sum-exp in the reference here (_plain upcasts to float32), float64 in the chunks
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(have, want, rtol=1e-5, atol=1e-7)
    assert got.dtype == torch.float64  # a float32 loss made a finite-difference check fail
    assert torch.autograd.gradcheck(lambda h: ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, softcap, chunk),
                                    (hidden,))
    # and the closed form: d mean CE / d h_i = W^T (softmax(W h_i + b) - onehot(t_i)) / rows (no soft-cap)
    if softcap is None:
        p = torch.softmax(hidden.detach() @ weight.T + bias, dim=-1)
        p[torch.arange(rows), targets] -= 1
        assert torch.allclose(have, upstream * (p @ weight) / rows, rtol=1e-5, atol=1e-7)


def test_the_loss_module_chunks_above_the_threshold_with_the_plain_numbers(monkeypatch):
    batch = add_loss_index(collate(random_examples(6, 9, prompt=3), pad_token_id=0))
    results = {}
    original = ChunkedLinearCrossEntropy.apply
    for name, elements in (("plain", None), ("chunked", 64 * 5)):  # vocab 64: chunks of 5 of the 36 rows
        model = make_lora_model(0, b_std=0.05)
        loss_module = CausalLMLoss(model, chunk_elements=elements)
        calls = []
        monkeypatch.setattr(ChunkedLinearCrossEntropy, "apply", lambda *a: calls.append(a[5]) or original(*a))
        loss = loss_module(**batch)
        loss.backward()
        assert calls == ([] if elements is None else [5])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = loss.detach(), grads
    assert torch.allclose(results["chunked"][0], results["plain"][0], rtol=1e-6)
    for name, grad in results["plain"][1].items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(results["chunked"][1][name], grad, rtol=1e-5, atol=1e-8), name


def test_small_logits_and_trainable_heads_keep_the_plain_path():
    model = make_lora_model(0)
    loss_module = CausalLMLoss(model)  # the default threshold: 64 M logits elements
    assert loss_module._chunk_rows(1000) is None  # 1000 x 64: far below
    assert loss_module._chunk_rows(2_000_000) == (1 << 26) // 64
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    assert CausalLMLoss(model)._chunk_rows(2_000_000) is None  # a trained head needs its own gradient


def test_under_bf16_autocast_the_chunks_round_as_the_plain_path():
    """The chunks' head matmuls run in the autocast dtype, as the plain path's forward and backward do."""
    g = torch.Generator().manual_seed(1)
    rows, hidden_size, vocab = 10, 16, 32
    weight = torch.randn(vocab, hidden_size, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    hidden = torch.randn(rows, hidden_size, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _plain(hidden, weight, None, targets, None)
        got = ChunkedLinearCrossEntropy.apply(hidden, weight, None, targets, None, 3)
    (want,) = torch.autograd.grad(expected, hidden)
    (have,) = torch.autograd.grad(got, hidden)
    assert got.dtype == expected.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)  # the same bf16 logits, summed in another order
    assert torch.allclose(have, want, rtol=1e-2, atol=1e-3)  # bf16 rounding of the gradient, in either order
    assert not torch.allclose(have, _fp32_grad(hidden, weight, targets), rtol=1e-4, atol=1e-6)  # it is bf16 work


def _fp32_grad(hidden, weight, targets):
    h = hidden.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_plain(h, weight, None, targets, None), h)
    return grad


def test_training_steps_with_the_chunked_loss_equal_the_plain_ones(accelerator):
    """Three optimizer steps of the training loop on variable-length examples, chunks of 3 rows against the plain
    loss (the same case runs on 2 gloo processes in test_loop_parity.py)."""
    from tests.unit._train_parity import run

    plain = run("lora", batch_size=4, grad_accum=1, accelerator=accelerator)
    chunked = run("lora-chunked-ce", batch_size=4, grad_accum=1, accelerator=accelerator)
    for name, grad in plain["grads"]["domain"].items():
        assert torch.allclose(chunked["grads"]["domain"][name], grad, rtol=1e-5, atol=1e-8), name
    for name, weight in plain["weights"].items():
        assert torch.allclose(chunked["weights"][name], weight, rtol=1e-5, atol=1e-7), name


def _tiny_granite(logits_scaling: float = 4.0):
    """A model that rescales its logits after the head (Granite divides them by ``logits_scaling``)."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           logits_scaling=logits_scaling, pad_token_id=0, use_cache=False)
    return GraniteForCausalLM(config)


@pytest.mark.parametrize("chunk_elements", ["auto", 64])
def test_a_model_that_rescales_its_logits_gets_the_loss_of_its_own_logits(chunk_elements):
    """Granite's logits are the head's divided by logits_scaling: the head split is found wrong on the probe (in eval
    mode, the model's train mode kept), so the loss is the cross-entropy of the model's own logits, never of the bare
    head's (more than 10 % off here), chunked threshold or not."""
    model = _tiny_granite(0.05).train()  # logits 20x the head's
    examples = random_examples(3, 12, vocab_size=64, seed=1, prompt=4)
    batch = add_loss_index(collate(examples, pad_token_id=0))
    module = CausalLMLoss(model, chunk_elements=chunk_elements)
    assert model.training and not module._scorer.fast
    model.eval()  # no dropout in either loss below
    got = module(**batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 64).float(), labels.reshape(-1), ignore_index=-100)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    bare = F.cross_entropy(model.lm_head(hidden)[:, :-1].reshape(-1, 64).float(), labels.reshape(-1), ignore_index=-100)
    assert abs(bare.item() - want.item()) > 0.1 * want.item()  # what an unverified split would have trained on


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) needs a C++ compiler on the CPU")
@pytest.mark.skipif(sys.version_info >= (3, 14), reason="torch.compile does not support this Python")
def test_compiled_chunks_give_the_eager_loss_and_gradient_for_every_chunk_shape(monkeypatch):
    """``compile: true`` sends each chunk through torch.compile: the same loss and hidden gradient as the eager chunks
    (float32, rel 1e-6 of the loss and of the gradient's norm), for the full chunks, the shorter last one and a batch
    with another number of rows, with and without soft-capping; the compiled function is what ran (its calls are
    counted)."""
    import forgetless.training.loss as loss_mod

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: graphs compiled by earlier tests counted here
    monkeypatch.setattr(loss_mod, "_compiled_chunk", None)
    compiled = loss_mod.compiled_chunk_loss_and_grad()
    calls = []
    monkeypatch.setattr(loss_mod, "compiled_chunk_loss_and_grad", lambda: lambda *a: calls.append(a[0].shape[0]) or
                        compiled(*a))
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 16, generator=g)
    for rows, softcap in ((23, None), (17, None), (23, 2.5), (1, None)):
        targets = torch.randint(0, 37, (rows,), generator=g)
        hidden = torch.randn(rows, 16, generator=g, requires_grad=True)
        got, want = [], []
        for flag, out in ((True, got), (False, want)):
            value = ChunkedLinearCrossEntropy.apply(hidden, weight, None, targets, softcap, 8, flag)
            out.extend([value.detach(), torch.autograd.grad(value * 0.5, hidden)[0]])
        assert got[0].item() == pytest.approx(want[0].item(), rel=1e-6)
        # as a whole (an element that cancels to ~1e-5 of the others differs by float32 rounding of its terms)
        assert (got[1] - want[1]).norm() <= 1e-6 * want[1].norm() and want[1].norm() > 0
    assert calls == [8, 8, 7, 8, 9, 8, 8, 7]  # 17 rows: the last row joins the chunk before; 1 row: eager
    # one dynamic-shape graph for chunks of 7 to 9 rows in batches of 23 and 17 rows; the soft-cap compiles its own
    # (automatic dynamic shapes compiled a static graph first, then more per change; a one-row chunk compiled a third)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_the_stage_passes_compile_on_to_the_loss(monkeypatch):
    """``compile: true`` reaches the loss module (its chunks compiled); off, the chunks stay eager."""
    import forgetless.training.loop as loop_mod

    seen = []
    original = loop_mod.CausalLMLoss

    def recording(*args, **kwargs):
        module = original(*args, **kwargs)
        seen.append(module.compile_chunks)
        return module

    monkeypatch.setattr(loop_mod, "CausalLMLoss", recording)
    compiled = []  # the layers' compile is stubbed (slow here), but it must be asked for exactly when compile is on
    monkeypatch.setattr(loop_mod, "compile_model", lambda model: compiled.append(model) or [])
    from forgetless.training.config import TrainConfig

    models = []
    for flag in (True, False):
        models.append(make_lora_model(0))
        loop_mod.train_stage(models[-1], random_examples(4, 8), TrainConfig(max_steps=1, batch_size=2, compile=flag,
                                                                             progress=False, precision="fp32"), [],
                             stage="general")
    assert seen == [True, False] and compiled == models[:1]
