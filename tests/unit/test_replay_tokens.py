"""Replay by labelled tokens (the default) and by examples: the mixed set's share of general text is the fraction."""

import pytest

from forgetless.methods import resolve
from forgetless.methods.replay import Replay, labelled_tokens, sample_by_tokens
from forgetless.training.loop import TrainConfig, train_stage
from tests.unit.tiny_model import random_examples


def answers(n, prompt=6):
    """Multiple-choice-like examples: ``prompt`` tokens without a loss, then a one-token answer."""
    return [{"input_ids": list(range(3, 4 + prompt)), "labels": [-100] * prompt + [9], "tag": f"d{i}"}
            for i in range(n)]


def blocks(n, length=16):
    """General-text blocks: every token after the first carries a loss (``length - 1`` labelled tokens)."""
    return [{"input_ids": [10 + i] * length, "labels": [10 + i] * length, "tag": f"g{i}"} for i in range(n)]


def share(mixed, n_domain):
    general = sum(labelled_tokens(e) for e in mixed[n_domain:])
    return general / sum(labelled_tokens(e) for e in mixed), general


def test_labelled_tokens_count_the_positions_with_a_loss():
    assert labelled_tokens(answers(1)[0]) == 1 and labelled_tokens(blocks(1)[0]) == 15
    assert labelled_tokens({"input_ids": [5, 6, 7], "labels": [5, -100, 7]}) == 1  # the first label is never predicted


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("n_domain", [7, 40, 400])
def test_share_of_labelled_tokens_is_the_fraction(make_ctx, fraction, n_domain):
    domain, general = answers(n_domain), blocks(50)
    ctx = make_ctx("domain", general_examples=general)
    mixed = Replay(fraction=fraction).prepare_examples(ctx, domain)
    assert mixed[:n_domain] == domain
    got, tokens = share(mixed, n_domain)
    target = round(fraction / (1 - fraction) * n_domain)  # D = n_domain labelled tokens
    assert tokens == target and ctx.extras["replay_tokens"] == target
    assert abs(got - fraction) <= 1 / (n_domain + tokens)  # within one token, so within one example's tokens
    for e in mixed[n_domain:]:  # whole blocks, and at most one prefix of one
        whole = general[int(e["tag"][1:])]
        assert e["input_ids"] == whole["input_ids"][:len(e["input_ids"])] and e["labels"] == whole["labels"][:len(e["labels"])]
    assert sum(labelled_tokens(e) < 15 for e in mixed[n_domain:]) <= 1


def test_by_examples_keeps_the_share_of_examples(make_ctx):
    domain, general = answers(30), blocks(100)
    mixed = Replay(fraction=0.25, by="examples").prepare_examples(make_ctx("domain", general_examples=general), domain)
    assert len(mixed) == 40 and len({e["tag"] for e in mixed[30:]}) == 10
    assert share(mixed, 30)[0] == pytest.approx(150 / 180)  # the issue: general text dominates the gradient


def test_by_tokens_is_seeded_and_repeats_a_small_pool(make_ctx):
    domain = answers(300)
    tags = [[e["tag"] for e in Replay(fraction=0.5).prepare_examples(
        make_ctx("domain", general_examples=blocks(3), seed=seed), domain)[300:]] for seed in (0, 0, 1)]
    assert tags[0] == tags[1] and tags[0] != tags[2]
    assert len(tags[0]) == 20 and sorted(tags[0][:3]) == ["g0", "g1", "g2"]  # 300 tokens = 20 blocks of 15
    with pytest.raises(ValueError, match="no labelled tokens"):
        sample_by_tokens([{"input_ids": [3, 4], "labels": [-100, -100]}], 5, seed=0)
    assert sample_by_tokens(blocks(2), 0, seed=0) == []


@pytest.mark.parametrize("kind", ["tensor", "array"])
def test_by_tokens_cuts_tensor_and_array_examples_too(kind):
    """A dataset may hand examples as tensors or arrays (batches.token_list reads them): the last example is cut to the
    tokens left as a list's is (it was left whole: 15 labelled tokens where 10 were asked)."""
    import numpy as np
    import torch

    make = torch.tensor if kind == "tensor" else np.array
    pool = [{k: make(v) if k != "tag" else v for k, v in e.items()} for e in blocks(3)]
    got = sample_by_tokens(pool, 10, seed=0)
    assert len(got) == 1 and labelled_tokens(got[0]) == 10 and len(got[0]["input_ids"]) == 11
    assert got[0]["tag"] == pool[int(got[0]["tag"][1:])]["tag"]


def test_by_is_a_domain_option_and_runs_in_train_stage(lora_model, accelerator):
    from forgetless.methods import general_stage_entries

    recipe = resolve(["lora-mu", {"name": "replay", "fraction": 0.5, "by": "tokens"}])
    # replay acts on the domain stage only: its general stage is lora-nu-mu's, whatever its options
    assert general_stage_entries(resolve({"name": "replay", "by": "examples"}).entries) == [{"name": "lora-nu-mu"}]
    domain = [dict(e, labels=[-100] * 7 + e["labels"][7:]) for e in random_examples(4, 8)]  # 1 labelled token each
    result = train_stage(lora_model(r=2, alpha=4), domain, TrainConfig(max_steps=1, batch_size=4, progress=False,
                                                                       precision="fp32"),
                         recipe.plugins, stage="domain", general_examples=random_examples(6, 8, seed=3),
                         accelerator=accelerator)
    assert result.extras["replay_tokens"] == 4 and result.extras["replay_examples"] == 1  # a 4-token prefix
