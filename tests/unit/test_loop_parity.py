"""The training loop's objective does not depend on how a step's examples are split (issue #12 item 5).

Batch 2b on one process, b x 2 accumulated micro-batches, and b on each of 2 processes (gloo) give the same gradient
and the same weights on variable-length multiple-choice-like examples, for plain LoRA, HLoRA, EWC (empirical
Fisher: the sampled one draws labels per process, another sample of the same expectation) and SAM (its default
``perturb: step``: eps from the whole step's gradient), accumulation and processes together included. SAM with
``perturb: micro`` perturbs each micro-batch by its own gradient (m-sharpness, see forgetless/methods/sam.py): under
accumulation a different objective by design; with 2 processes it equals one batch. The learning-rate sequence is the same for 1 and 2
processes, and ``epochs`` counts epochs of the whole data set."""

from __future__ import annotations


import pytest
import torch

from tests.unit._train_parity import CASES, run, variable_examples
from tests.unit.tiny_model import launch_two_processes


def assert_close(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        scale = float(a[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) <= rel * scale, k


def test_examples_differ_in_labelled_tokens():
    counts = {sum(label != -100 for label in e["labels"][1:]) for e in variable_examples()}
    assert len(counts) >= 4


@pytest.mark.parametrize("case", sorted(set(CASES) - {"sam-micro"}))
def test_batch_equals_accumulation(case, accelerator):
    whole = run(case, batch_size=4, grad_accum=1, accelerator=accelerator)
    split = run(case, batch_size=2, grad_accum=2, accelerator=accelerator)
    for stage in whole["grads"]:
        assert_close(whole["grads"][stage], split["grads"][stage])
    assert_close(whole["weights"], split["weights"])
    assert whole["lrs"] == split["lrs"]


@pytest.mark.parametrize("case", ["lora", "hlora", "ewc", "sam"])
def test_batch_equals_accumulation_when_the_windows_do_not_divide_an_epoch(case, accelerator):
    """10 examples: batch 4 takes 3 steps an epoch (4, 4, 2 examples); 2 x 2 accumulated took 2 (the fifth
    micro-batch never trained) and, over two epochs, a window across the epochs' boundary. The epoch's last window
    is now shorter, as its last batch is: the same steps, examples and weights."""
    whole = run(case, batch_size=4, grad_accum=1, accelerator=accelerator, epochs=2.0, n=10)
    split = run(case, batch_size=2, grad_accum=2, accelerator=accelerator, epochs=2.0, n=10)
    assert whole["lrs"]["steps"] == split["lrs"]["steps"] and set(whole["lrs"]["steps"].values()) == {6}
    assert_close(whole["weights"], split["weights"])
    assert whole["lrs"] == split["lrs"]


def test_accumulation_windows_and_the_resume_position():
    from forgetless.training.loop import accumulation_windows, micro_batches_before

    assert accumulation_windows(5, 2) == [2, 2, 1] and accumulation_windows(4, 2) == [2, 2]
    assert accumulation_windows(3, 4) == [3] and accumulation_windows(7, 1) == [1] * 7
    windows = [2, 2, 1]
    assert [micro_batches_before(s, windows) for s in range(7)] == [0, 2, 4, 5, 7, 9, 10]


def test_mean_of_micro_batch_means_would_differ(accelerator):
    """The check above can fail: weighting each micro-batch's mean equally is a different objective here."""
    from forgetless.training.batches import collate
    from forgetless.training.loss import causal_lm_loss
    from tests.unit.tiny_model import make_lora_model

    model = make_lora_model(0, b_std=0.05)
    examples = variable_examples()[:4]
    params = [p for p in model.parameters() if p.requires_grad]
    whole = torch.autograd.grad(causal_lm_loss(model, collate(examples, 0)), params)
    halves = [torch.autograd.grad(causal_lm_loss(model, collate(examples[i:i + 2], 0)), params) for i in (0, 2)]
    mean_of_means = [(a + b) / 2 for a, b in zip(*halves)]
    assert max(float((w - m).abs().max() / w.abs().max()) for w, m in zip(whole, mean_of_means)) > 1e-3


def test_two_processes_equal_one(tmp_path):
    launch_two_processes("_train_parity.py", tmp_path, port=29519)
    two = torch.load(tmp_path / "two_processes.pt")
    for case in CASES:
        one = run(case, batch_size=4, grad_accum=1)
        for stage in one["grads"]:
            assert_close(one["grads"][stage], two[case]["grads"][stage])
        assert_close(one["weights"], two[case]["weights"])
        assert one["lrs"] == two[case]["lrs"], case
    # SAM (perturb: step), 1 example x 2 accumulated micro-batches on each of 2 processes: batch 4's gradient
    one = run("sam", batch_size=4, grad_accum=1)
    assert_close(one["grads"]["domain"], two["sam-accum"]["grads"]["domain"])
    assert_close(one["weights"], two["sam-accum"]["weights"])
    # the labelled-token counts reduced over a gloo group of their own (what an NCCL run does): the same run
    assert two["cpu_groups"] == 1
    lora = run("lora", batch_size=4, grad_accum=1)
    assert_close(lora["weights"], two["lora-cpu-group"]["weights"])
    assert lora["lrs"] == two["lora-cpu-group"]["lrs"]
    # epochs: 16 examples, a global batch of 4 -> 4 optimizer steps, with 1 process as with 2
    one_epoch = run("lora", batch_size=4, grad_accum=1, epochs=1.0)
    assert len(one_epoch["lrs"]["domain"]) == len(two["epochs"]["lrs"]["domain"]) == 4
    assert one_epoch["lrs"] == two["epochs"]["lrs"]
    # 10 examples over two epochs: accelerate evened out the last step with 2 examples from the epoch's start,
    # trained twice; now with null examples, which weigh nothing: the steps of one process with batch 4
    for case, result in two["ragged-epoch"].items():
        one = run(case, batch_size=4, grad_accum=1, epochs=2.0, n=10)
        assert one["lrs"] == result["lrs"] and set(one["lrs"]["steps"].values()) == {6}, case
        assert_close(one["weights"], result["weights"])
    # a loss that is not finite on one process only: both skip that step and stay equal, or both stop at it
    skip = [torch.load(tmp_path / f"nonfinite_skip_step_{rank}.pt") for rank in (0, 1)]
    assert skip[0]["skipped"] == skip[1]["skipped"] == [2]
    for name, w in skip[0]["weights"].items():
        assert torch.equal(w, skip[1]["weights"][name]), name
    stop = [torch.load(tmp_path / f"nonfinite_stop_{rank}.pt") for rank in (0, 1)]
    assert stop[0]["stopped"] == (2, "loss on another process") and stop[1]["stopped"] == (2, "loss")


def test_null_examples_are_not_counted_as_trained_tokens():
    """The null examples that fill a ragged last global batch under several processes count no input token in the
    logged tokens/s (they made a 2-process run look faster than it was); a real example without a labelled token
    (its answer cut off) still counts: the model read it."""
    from forgetless.training.loop import _COUNTS, _collate_counted, _null_examples

    examples = variable_examples()[:5]
    nulls = _null_examples(examples, batch_size=2, processes=2)
    assert len(nulls) == 3 and all(set(n["labels"]) == {-100} for n in nulls)
    cut = dict(examples[0], labels=[-100] * len(examples[0]["labels"]))
    labelled, tokens = _collate_counted([examples[1], cut, *nulls], pad_token_id=0)[_COUNTS]
    assert tokens == len(examples[1]["input_ids"]) + len(cut["input_ids"])
    assert labelled == sum(t != -100 for t in examples[1]["labels"][1:])


def test_a_micro_batch_without_labelled_tokens_adds_nothing(accelerator):
    """An example whose answer was cut off has no labelled token. As a micro-batch of its own it crashed the step (its
    zero loss had no grad_fn); now it adds nothing: one step over [a, empty, b, c] one example at a time equals one
    step over the batch [a, b, c], and the logged loss is theirs (finite)."""
    from forgetless.training.loop import TrainConfig, train_stage
    from tests.unit.tiny_model import make_lora_model

    labelled = variable_examples()[:3]
    empty = dict(labelled[1], labels=[-100] * len(labelled[1]["labels"]))

    def weights_after(examples, batch_size, grad_accum):
        model = make_lora_model(0, b_std=0.05)
        result = train_stage(model, examples, TrainConfig(max_steps=1, batch_size=batch_size, grad_accum=grad_accum,
                                                          lr=1e-2, precision="fp32", progress=False),
                             accelerator=accelerator)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, result

    split, result = weights_after([labelled[0], empty, *labelled[1:]], 1, 4)
    whole, reference = weights_after(labelled, 3, 1)
    assert_close(whole, split)
    assert result.history[0]["loss"] == pytest.approx(reference.history[0]["loss"], rel=1e-5)


def test_sams_two_ways_are_one_computation_with_one_micro_batch_per_step(accelerator):
    """``perturb: step`` (the default since session 27) and ``micro`` (before) give the same weights, bit for bit,
    when a step is one micro-batch: every recorded SAM run stands."""
    step = run("sam", batch_size=4, grad_accum=1, accelerator=accelerator)
    micro = run("sam-micro", batch_size=4, grad_accum=1, accelerator=accelerator)
    assert all(torch.equal(step["weights"][k], micro["weights"][k]) for k in step["weights"])
