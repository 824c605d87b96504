"""Evaluation on a tiny random Llama, on every device, in float32: perplexity and harness-exact multiple-choice
scoring against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from forgetless.evaluation import (
    MCResult,
    PerplexityResult,
    evaluate_mc,
    evaluate_mc_reference,
    perplexity,
    perplexity_of_texts,
)
from forgetless.lm import HeadScorer
from tests.unit.tiny_model import make_tiny_model


@pytest.fixture
def adapted(lora_model):
    """``adapted(seed)``: a LoRA-wrapped tiny model whose adapters are non-zero (so they change the outputs)."""
    return lambda seed=0: lora_model(seed, b_std=0.5, b_seed=seed + 100)


def random_blocks(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (n, length), generator=g)


def hand_mean_nll(model: nn.Module, blocks: torch.Tensor) -> tuple[float, int]:
    """Plain loop: full logits, explicit log_softmax, -log p(x[t+1] | x[:t+1]) averaged."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block.unsqueeze(0).to(device)).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(len(block) - 1):
                total -= logp[t, block[t + 1]].item()
                count += 1
    return total / count, count


# ----------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_perplexity_equals_hand_computation(batch_size, tiny_model, tol):
    model = tiny_model(0).eval()
    blocks = random_blocks(5, 9)
    result = perplexity(model, blocks, batch_size=batch_size, precision="fp32", progress=False)
    mean_nll, count = hand_mean_nll(model, blocks)
    assert isinstance(result, PerplexityResult)
    assert result.tokens == count == 5 * 8
    assert result.mean_nll == pytest.approx(mean_nll, rel=tol(1e-5))
    assert result.ppl == pytest.approx(math.exp(mean_nll), rel=tol(1e-5))
    # HLoRA authors' convention: 2 ** (mean natural-log loss), not a perplexity in bits.
    assert result.ppl_base2 == pytest.approx(2.0**mean_nll, rel=tol(1e-5))
    assert result.ppl_base2 == pytest.approx(2.0**result.mean_nll, rel=1e-12)


def test_perplexity_lora_model_and_mode_restored(adapted, tol):
    model = adapted(1)
    model.train()
    blocks = random_blocks(3, 12, seed=3)
    result = perplexity(model, blocks, batch_size=2, precision="fp32", progress=False)
    assert model.training  # train mode restored
    model.eval()
    mean_nll, _ = hand_mean_nll(model, blocks)
    assert result.mean_nll == pytest.approx(mean_nll, rel=tol(1e-5))
    model.train(False)
    perplexity(model, blocks, precision="fp32", progress=False)
    assert not model.training


def test_the_scores_are_those_of_eval_mode_whatever_mode_the_model_is_in(char_tokenizer):
    """Every other test's model has no dropout, so train and eval mode gave the same numbers and a scorer that left
    the model in train mode passed them all. With LoRA dropout 0.5, perplexity, multiple choice and EWC's Fisher taken
    from a model in train mode are the eval-mode numbers, the same on every call, and the mode is given back."""
    from forgetless.methods.ewc import fisher_diagonal
    from tests.unit.tiny_model import make_lora_model, random_examples

    model = make_lora_model(1, b_std=0.5, dropout=0.5)
    blocks = random_blocks(3, 12, seed=3)
    items = _varied_items(_mcitem())[:4]
    examples = random_examples(4, 10, seed=2)

    def scores():
        torch.manual_seed(0)
        ppl = perplexity(model, blocks, batch_size=2, precision="fp32", progress=False).mean_nll
        mc = evaluate_mc(model, char_tokenizer, items, batch_size=2, precision="fp32", progress=False).loglikelihoods
        fisher, _ = fisher_diagonal(model, examples, "empirical", batch_size=2)
        return ppl, mc, fisher

    model.eval()
    want = scores()
    model.train()
    torch.manual_seed(0)
    noisy = [float(model(input_ids=blocks[:1]).logits.sum()) for _ in range(2)]
    assert noisy[0] != noisy[1]  # dropout acts in train mode: a scorer in train mode would not give `want`
    for _ in range(2):
        ppl, mc, fisher = scores()
        assert model.training  # given back
        assert ppl == want[0] and mc == want[1]
        for name, f in want[2].items():
            assert torch.equal(fisher[name], f), name


def test_head_scorer_uses_backbone_for_plain_and_peft_models(tiny_model, adapted):
    assert HeadScorer(tiny_model(0)).fast
    assert HeadScorer(adapted(0)).fast


class _LogitsOnly(nn.Module):
    """A causal LM with no discoverable backbone: forces the full-logits fallback."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


def test_perplexity_fallback_without_backbone(tiny_model, tol):
    inner = tiny_model(2).eval()
    wrapped = _LogitsOnly(inner)
    assert not HeadScorer(wrapped).fast
    blocks = random_blocks(4, 7, seed=5)
    assert perplexity(wrapped, blocks, batch_size=3, precision="fp32", progress=False).mean_nll == pytest.approx(
        hand_mean_nll(inner, blocks)[0], rel=tol(1e-5)
    )


def test_perplexity_rejects_bad_blocks():
    with pytest.raises(ValueError):
        perplexity(make_tiny_model(0), torch.zeros(3, 1, dtype=torch.long), progress=False)


def test_perplexity_of_texts_uses_pack_blocks(tiny_model, char_tokenizer, tol):
    from forgetless.data import pack_blocks

    tok = char_tokenizer
    model = tiny_model(0).eval()
    texts = ["the cat sat on the mat.", "a dog ran far away, then came back home again."]
    blocks = pack_blocks(texts, tok, 16)
    expected = perplexity(model, blocks, precision="fp32", progress=False)
    got = perplexity_of_texts(model, tok, texts, block_size=16, precision="fp32", progress=False)
    assert got.tokens == expected.tokens
    assert got.mean_nll == pytest.approx(expected.mean_nll, rel=tol(1e-6))


# ------------------------------------------------------------------------------ multiple choice


def _mcitem():
    from forgetless.data import MCItem

    return MCItem


def hand_loglikelihood(model: nn.Module, tok, context: str, continuation: str) -> float:
    """Independent char-level scoring: sum of log p(continuation tokens | context), full logits."""
    ctx = tok(context, add_special_tokens=False)["input_ids"] if context else [tok.bos_token_id]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(ctx) + k - 1, t].item() for k, t in enumerate(cont))


def test_acc_and_acc_norm_match_hand_scoring(tiny_model, char_tokenizer, tol):
    MCItem = _mcitem()
    model = tiny_model(0).eval()
    tok = char_tokenizer
    # A 2-character choice vs a 12-character one: the delimiter token counts in the loglikelihood
    # but not in the harness's length (len(choice)), so the short choice wins on raw loglikelihood
    # while the long one wins after dividing by the character length.
    context = "question: which one?"
    choices = ("ab", "the long one")
    lls = [hand_loglikelihood(model, tok, context, " " + c) for c in choices]
    raw_pred = int(np.argmax(lls))
    norm_pred = int(np.argmax(np.array(lls) / np.array([len(c) for c in choices], dtype=float)))
    assert raw_pred != norm_pred, "the crafted item should separate acc from acc_norm"
    items = [
        MCItem(context=context, choices=choices, answer=raw_pred),  # acc 1, acc_norm 0
        MCItem(context=context, choices=choices, answer=norm_pred),  # acc 0, acc_norm 1
        MCItem(context=context, choices=choices, answer=norm_pred),  # acc 0, acc_norm 1
    ]
    for result in (
        evaluate_mc(model, tok, items, batch_size=2, precision="fp32", progress=False),
        evaluate_mc_reference(model, tok, items, precision="fp32"),
    ):
        assert isinstance(result, MCResult)
        assert result.n == 3
        assert result.acc == pytest.approx(1 / 3)
        assert result.acc_norm == pytest.approx(2 / 3)
        # harness mean_stderr: sample std (ddof=1) / sqrt(n)
        assert result.acc_stderr == pytest.approx(np.std([1, 0, 0], ddof=1) / math.sqrt(3))
        assert result.acc_norm_stderr == pytest.approx(np.std([0, 1, 1], ddof=1) / math.sqrt(3))
        for item_lls in result.loglikelihoods:
            assert item_lls == pytest.approx(lls, abs=tol(1e-4))


def test_target_delimiter_and_empty_context(tiny_model, char_tokenizer, tol):
    MCItem = _mcitem()
    model = tiny_model(3).eval()
    tok = char_tokenizer
    items = [
        MCItem(context="answer:", choices=("yes", "no"), answer=0, target_delimiter="\n"),
        MCItem(context="", choices=("red", "blue", "green"), answer=2),  # harness: [prefix_token_id]
    ]
    expected = [
        [hand_loglikelihood(model, tok, "answer:", "\n" + c) for c in ("yes", "no")],
        [hand_loglikelihood(model, tok, "", " " + c) for c in ("red", "blue", "green")],
    ]
    for result in (evaluate_mc(model, tok, items, precision="fp32", progress=False),
                   evaluate_mc_reference(model, tok, items, precision="fp32")):
        for got, want in zip(result.loglikelihoods, expected, strict=True):
            assert got == pytest.approx(want, abs=tol(1e-4))
        want_acc = np.mean([float(np.argmax(e) == it.answer) for e, it in zip(expected, items, strict=True)])
        assert result.acc == pytest.approx(want_acc)


def _varied_items(MCItem):
    return [
        MCItem("is fire hot?", ("yes", "no"), 0),
        MCItem("to open a jar, you should", ("twist the lid", "hit it with a very large hammer", "cry"), 0),
        MCItem("q", ("a", "b", "c", "d"), 3),
        MCItem("how do you boil water in a small pot on a stove at home?", ("heat it", "freeze it"), 0),
        MCItem("pick a number:", ("1", "22", "333"), 1),
        # longer than the tiny model's 128 positions: truncated from the left like the harness
        MCItem("a long story. " * 12, ("the end", "not the end at all"), 0),
    ]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_equals_reference(batch_size, tiny_model, char_tokenizer, tol):
    MCItem = _mcitem()
    model = tiny_model(4).eval()
    tok = char_tokenizer
    items = _varied_items(MCItem)
    ref = evaluate_mc_reference(model, tok, items, precision="fp32")
    fast = evaluate_mc(model, tok, items, batch_size=batch_size, precision="fp32", progress=False)
    assert fast.n == ref.n == len(items)
    assert fast.acc == ref.acc and fast.acc_norm == ref.acc_norm
    for got, want in zip(fast.loglikelihoods, ref.loglikelihoods, strict=True):
        assert got == pytest.approx(want, abs=tol(1e-4))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_equals_reference_with_lora(batch_size, adapted, char_tokenizer, tol):
    MCItem = _mcitem()
    model = adapted(5)
    model.train()
    tok = char_tokenizer
    items = _varied_items(MCItem)
    fast = evaluate_mc(model, tok, items, batch_size=batch_size, precision="fp32", progress=False)
    assert model.training  # mode restored
    ref = evaluate_mc_reference(model, tok, items, precision="fp32")
    assert fast.acc == ref.acc and fast.acc_norm == ref.acc_norm
    for got, want in zip(fast.loglikelihoods, ref.loglikelihoods, strict=True):
        assert got == pytest.approx(want, abs=tol(1e-4))
    # the adapters matter: the base model alone scores differently
    with model.disable_adapter():
        base = evaluate_mc(model, tok, items, batch_size=batch_size, precision="fp32", progress=False)
    assert not np.allclose(np.concatenate(base.loglikelihoods), np.concatenate(fast.loglikelihoods), atol=1e-3)


# ------------------------------------------------------------------ shared-prefix scoring (one sequence per item)
def test_packed_item_mask_and_positions_are_each_requests_own(char_tokenizer):
    """Closed form on a hand-made item: prefix [5, 6], choice 0's own tokens [7], choice 1's [8, 9]. Each token sees
    the prefix before it and its own choice's tokens before it, at the positions it has in its own request; padding
    sees itself only. Scored rows: the continuation positions of each request, mapped into the packed row."""
    from forgetless.evaluation.multiple_choice import _pack, _packed_batch, _Request

    reqs = [_Request(0, 0, [5, 6, 7], [7, 3]), _Request(0, 1, [5, 6, 8, 9], [8, 9, 4])]
    pack = _pack(reqs)
    assert pack.ids == [5, 6, 7, 8, 9] and pack.positions == [0, 1, 2, 2, 3] and pack.owner == [-1, -1, 0, 1, 1]
    assert pack.rows == [[1, 2], [1, 3, 4]]  # request 0: input positions 1-2; request 1: 1-3 (1 is in the prefix)
    small = _pack([_Request(1, 0, [5], [6]), _Request(1, 1, [5], [7])])  # inputs equal: all prefix
    ids, positions, mask = _packed_batch([pack, small])
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 2, 3], [0, 0, 0, 0, 0]]
    want = [[1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],   # choice 0's token: the prefix and itself
            [1, 1, 0, 1, 0],   # choice 1's first token: not choice 0's
            [1, 1, 0, 1, 1]]
    assert mask.shape == (2, 1, 5, 5) and mask[0, 0].int().tolist() == want
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0]] + [[0] * k + [1] + [0] * (4 - k) for k in range(1, 5)]
    assert small.rows == [[0], [0]]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_prefix_equals_reference(batch_size, tiny_model, adapted, char_tokenizer, tol, monkeypatch):
    """Items packed one per row (the choices' common prefix once) score as the reference's one forward per request,
    with and without LoRA (varied items: a choice that is a prefix of another's tokens, an input truncated from the
    left), after the probe on the first item; off (the default) every request is its own padded row."""
    from forgetless.evaluation import multiple_choice

    MCItem = _mcitem()
    items = _varied_items(MCItem) + [MCItem("say", ("ab", "abc", "b"), 1)]
    calls = {"packed": 0, "padded": 0}
    real = {name: getattr(multiple_choice, f"_score_{name}") for name in calls}

    def counted(name):
        def fn(*args):
            calls[name] += 1
            return real[name](*args)
        return fn

    for name in calls:
        monkeypatch.setattr(multiple_choice, f"_score_{name}", counted(name))
    for model in (tiny_model(4).eval(), adapted(5)):
        ref = evaluate_mc_reference(model, char_tokenizer, items, precision="fp32")
        for share in (True, False):
            calls.update(packed=0, padded=0)
            got = evaluate_mc(model, char_tokenizer, items, batch_size=batch_size, precision="fp32", progress=False,
                              share_prefix=share)
            if share:  # the probe scores one item both ways; then every batch goes packed
                assert calls["padded"] == 1 and calls["packed"] > 1
            else:
                assert calls["packed"] == 0
            assert got.acc == ref.acc and got.acc_norm == ref.acc_norm
            for mine, want in zip(got.loglikelihoods, ref.loglikelihoods, strict=True):
                assert mine == pytest.approx(want, abs=tol(1e-4))


@pytest.mark.parametrize("broken", ["mask", "positions"])
def test_the_probe_refuses_a_model_that_ignores_the_mask_or_the_positions(broken, tiny_model, char_tokenizer,
                                                                         monkeypatch):
    """An attention that applied a plain causal mask instead of the custom one, or counted positions along the packed
    row: the probe sees it (bit-for-bit invariance of a choice's score to the other choices' tokens; agreement with the
    padded path) and the items go one row per choice, with a warning."""
    from forgetless.evaluation import multiple_choice
    from forgetless.lm import HeadScorer

    MCItem = _mcitem()
    # first (the probed item): a long first choice, so that positions counted along the row shift choice 1 far
    items = [MCItem("pick:", ("the first and much longer choice of all", "no"), 0)] + _varied_items(MCItem)
    model = tiny_model(4).eval()
    by_item = {}
    for r in multiple_choice._build_requests(model, char_tokenizer, items):
        by_item.setdefault(r.item, []).append(r)
    scorer = HeadScorer(model)
    with torch.no_grad():
        assert multiple_choice._probe_sharing(scorer, scorer.device, "fp32", by_item)
    real = multiple_choice._packed_batch

    def broken_batch(packs):
        ids, positions, mask = real(packs)
        if broken == "mask":
            width = ids.shape[1]
            return ids, positions, torch.tril(torch.ones(width, width, dtype=torch.bool)).expand_as(mask).clone()
        return ids, torch.arange(ids.shape[1]).expand_as(positions).clone(), mask

    monkeypatch.setattr(multiple_choice, "_packed_batch", broken_batch)
    with torch.no_grad():
        assert not multiple_choice._probe_sharing(scorer, scorer.device, "fp32", by_item)
    with pytest.warns(UserWarning, match="share_prefix"):
        got = evaluate_mc(model, char_tokenizer, items, precision="fp32", progress=False, share_prefix=True)
    ref = evaluate_mc_reference(model, char_tokenizer, items, precision="fp32")
    assert got.acc == ref.acc and got.acc_norm == ref.acc_norm


def test_one_token_choices_neither_probe_nor_vouch_for_a_broken_model(tiny_model, char_tokenizer, monkeypatch):
    """With one-token choices (MMLU's letters) every request's input is the context, so the probe's checks changed
    nothing and passed on a model that ignores the mask; the pass was kept for the model, and a later task with
    longer choices was scored packed, wrong by nats. Such items now pack without a verdict (exact for them), and the
    next task is probed."""
    from forgetless.evaluation import multiple_choice

    MCItem = _mcitem()
    letters = [MCItem(f"q{i}: pick one:", ("A", "B", "C", "D"), i % 4) for i in range(4)]
    longer = [MCItem("pick:", ("the first and much longer choice of all", "no"), 0)] + _varied_items(MCItem)
    model = tiny_model(4).eval()
    real = multiple_choice._packed_batch

    def plain_causal_mask(packs):
        ids, positions, mask = real(packs)
        width = ids.shape[1]
        return ids, positions, torch.tril(torch.ones(width, width, dtype=torch.bool)).expand_as(mask).clone()

    monkeypatch.setattr(multiple_choice, "_packed_batch", plain_causal_mask)
    multiple_choice._VERIFIED.pop(model, None)
    got = evaluate_mc(model, char_tokenizer, letters, precision="fp32", progress=False, share_prefix=True)
    ref = evaluate_mc_reference(model, char_tokenizer, letters, precision="fp32")
    for mine, want in zip(got.loglikelihoods, ref.loglikelihoods, strict=True):  # packing is exact for these
        assert mine == pytest.approx(want, abs=1e-4)
    assert "fp32" not in multiple_choice._VERIFIED.get(model, {})  # no verdict kept
    with pytest.warns(UserWarning, match="share_prefix"):
        got = evaluate_mc(model, char_tokenizer, longer, precision="fp32", progress=False, share_prefix=True)
    ref = evaluate_mc_reference(model, char_tokenizer, longer, precision="fp32")
    for mine, want in zip(got.loglikelihoods, ref.loglikelihoods, strict=True):
        assert mine == pytest.approx(want, abs=1e-4)


def test_shared_prefix_on_a_sliding_window_architecture(char_tokenizer, tol):
    """A tiny Gemma-3 (a sliding-window layer and a global one): inputs within the window score packed as the
    reference does; inputs longer than the window go one row per choice (the custom mask would drop the window)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from forgetless.evaluation import multiple_choice

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=96,
                              max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"],
                              pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma3ForCausalLM(config).eval()
    MCItem = _mcitem()
    items = _varied_items(MCItem)[:5]  # within the window of 96
    requests = multiple_choice._build_requests(model, char_tokenizer, items)
    assert max(len(r.inp) for r in requests) <= 96 and multiple_choice._sharing_possible(model, requests)
    ref = evaluate_mc_reference(model, char_tokenizer, items, precision="fp32")
    got = evaluate_mc(model, char_tokenizer, items, precision="fp32", progress=False, share_prefix=True)
    assert got.acc == ref.acc and got.acc_norm == ref.acc_norm
    for mine, want in zip(got.loglikelihoods, ref.loglikelihoods, strict=True):
        assert mine == pytest.approx(want, abs=tol(1e-4))
    longer = multiple_choice._build_requests(model, char_tokenizer, _varied_items(MCItem))  # one input of 128
    assert not multiple_choice._sharing_possible(model, longer)


def test_shared_prefix_falls_back_where_the_attention_takes_no_custom_mask(tiny_model, char_tokenizer, monkeypatch):
    """eager attention (and flash-attention) or a sliding window shorter than the inputs: the padded path."""
    from forgetless.evaluation import multiple_choice

    MCItem = _mcitem()
    items = _varied_items(MCItem)
    model = tiny_model(4).eval()
    requests = multiple_choice._build_requests(model, char_tokenizer, items)
    assert multiple_choice._sharing_possible(model, requests)
    model.config.sliding_window = 16
    assert not multiple_choice._sharing_possible(model, requests)
    model.config.sliding_window = None
    model.config._attn_implementation = "eager"
    assert not multiple_choice._sharing_possible(model, requests)
    monkeypatch.setattr(multiple_choice, "_score_packed", lambda *a: pytest.fail("packed on eager attention"))
    with pytest.warns(UserWarning, match="share_prefix"):
        evaluate_mc(model, char_tokenizer, items, precision="fp32", progress=False, share_prefix=True)


def test_evaluate_mc_rejects_empty_and_bad_answer(char_tokenizer):
    MCItem = _mcitem()
    model = make_tiny_model(0)
    tok = char_tokenizer
    with pytest.raises(ValueError):
        evaluate_mc(model, tok, [], progress=False)
    with pytest.raises(ValueError):
        evaluate_mc(model, tok, [MCItem("q", ("a", "b"), 2)], progress=False)
