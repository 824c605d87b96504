"""forgetless methods inside the transformers Trainer and TRL's SFTTrainer (forgetless/integrations.py, issue #14).

3 optimizer steps of ``[hlora]``, ``[ewc]`` (each after a general stage, its state carried from one Trainer run to
the next through save_method_state / state_from) and ``[sam]`` under the Trainer give the LoRA weights of
forgetless's own loop: fp32, the same data order (the Trainer reads, in order, the permutation the loop's seeded
shuffle draws), AdamW with the same hyperparameters and no weight decay, the same linear schedule, and gradients
clipped at every step (so that a hook seeing clipped gradients would show).
The examples carry a loss on 1 to 11 tokens each, so a step's token mean and a mean of micro-batch means differ.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from forgetless.methods import resolve
from forgetless.training.batches import collate
from forgetless.training.config import TrainConfig
from forgetless.training.loop import train_stage
from tests.unit._train_parity import variable_examples
from tests.unit.tiny_model import make_lora_model

CASES = {  # name: (method entry, stages)
    "hlora": ([{"name": "hlora", "phi": 1e4}], ("general", "domain")),
    # every general example in the Fisher: the Trainer sees them in another order, and `samples` picks by position
    "ewc": ([{"name": "ewc", "lambda": 1e3, "estimator": "empirical", "samples": 16}], ("general", "domain")),
    "sam": ([{"name": "sam", "rho": 0.05}], ("domain",)),
    "sam-micro": ([{"name": "sam", "rho": 0.05, "perturb": "micro"}], ("domain",)),  # eps per micro-batch
}
STEPS, LR, SEED = 3, 1e-2, 0
CLIP = 0.2  # below every step's gradient norm here (0.23 to 0.28 without a method): clipping acts
DATA = {"general": partial(variable_examples, 16, seed=1), "domain": partial(variable_examples, 16, seed=2)}


def loop_order(examples: list[dict]) -> list[dict]:
    """The examples in the order the loop's DataLoader(shuffle=True, generator seeded SEED) reads them (one epoch)."""
    generator = torch.Generator().manual_seed(SEED)
    order = DataLoader(range(len(examples)), batch_size=None, shuffle=True, generator=generator)
    return [examples[int(i)] for i in order]


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_loop(case: str, batch_size: int, grad_accum: int, accelerator) -> dict[str, torch.Tensor]:
    entry, stages = CASES[case]
    model = make_lora_model(0, b_std=0.05).to(accelerator.device)
    plugins = resolve(entry).plugins
    cfg = TrainConfig(max_steps=STEPS, batch_size=batch_size, grad_accum=grad_accum, lr=LR, weight_decay=0.0,
                      scheduler="linear", max_grad_norm=CLIP, precision="fp32", seed=SEED, progress=False)
    for stage in stages:
        train_stage(model, DATA[stage](), cfg, plugins, stage=stage, accelerator=accelerator,
                    general_examples=DATA["general"]())
    return trainable(model)


def trainer_args(tmp_path, batch_size: int, grad_accum: int, device: torch.device, **extra) -> dict:
    """The loop's settings as TrainingArguments keywords; sequential sampling of data given in the loop's order."""
    return dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=grad_accum, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=CLIP, optim="adamw_torch", train_sampling_strategy="sequential",
                seed=SEED, report_to="none", save_strategy="no", use_cpu=device.type == "cpu", bf16=False,
                disable_tqdm=True, dataloader_num_workers=0, **extra)


def run_trainer(case: str, trainer_class, make_args, tmp_path, device: torch.device, dataset=list,
                **trainer_kwargs) -> dict[str, torch.Tensor]:
    entry, stages = CASES[case]
    model = make_lora_model(0, b_std=0.05).to(device)
    state = tmp_path / "general-state"
    for stage in stages:
        # Fresh plugins per run and no general examples: the general stage's state travels through the files only
        trainer = trainer_class(model=model, args=make_args(), train_dataset=dataset(loop_order(DATA[stage]())),
                                methods=resolve(entry).plugins, stage=stage,
                                state_from=state if stage == "domain" and "general" in stages else None,
                                **trainer_kwargs)
        trainer.train()
        assert trainer.state.global_step == STEPS
        if stage == "general":
            trainer.save_method_state(state)
    return trainable(model)


def assert_close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        scale = float(b[k].abs().max()) or 1.0
        assert float((a[k].cpu() - b[k].cpu()).abs().max()) <= rel * scale, k


def moved(a: dict, b: dict) -> float:
    return max(float((a[k].cpu() - b[k].cpu()).abs().max()) for k in a)


@pytest.mark.parametrize("batch_size,grad_accum", [(4, 1), (2, 2)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_equals_loop(case, batch_size, grad_accum, accelerator, device, tol, tmp_path):
    from forgetless.integrations import ForgetlessTrainer

    initial = trainable(make_lora_model(0, b_std=0.05))
    ours = run_loop(case, batch_size, grad_accum, accelerator)
    kwargs = trainer_args(tmp_path, batch_size, grad_accum, device)
    theirs = run_trainer(case, ForgetlessTrainer, lambda: TrainingArguments(**kwargs), tmp_path, device,
                         data_collator=partial(collate, pad_token_id=0))
    assert moved(ours, initial) > 1e-3  # the weights did move
    assert_close(theirs, ours, rel=tol(1e-5))


def test_the_methods_matter(accelerator, device, tmp_path):
    """The comparison above can fail: a plain Trainer (no methods) ends elsewhere than the loop with HLoRA."""
    ours = run_loop("hlora", 4, 1, accelerator)
    kwargs = trainer_args(tmp_path, 4, 1, device)
    model = make_lora_model(0, b_std=0.05).to(device)
    for stage in ("general", "domain"):
        Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=loop_order(DATA[stage]()),
                data_collator=partial(collate, pad_token_id=0)).train()
    assert moved(trainable(model), ours) > 1e-4


def test_sft_trainer_equals_loop(accelerator, device, tol, tmp_path):
    """TRL's SFTTrainer with HLoRA (general, then domain) ends where the loop does: pre-tokenized examples with
    labels, no shuffling or packing of its own."""
    trl = pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'forgetless[trl]'")
    from datasets import Dataset

    from forgetless.integrations import with_methods
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer  # <pad> 0, </s> 1: the ids of the tiny model

    ours = run_loop("hlora", 2, 2, accelerator)
    kwargs = trainer_args(tmp_path, 2, 2, device)
    kwargs.update(shuffle_dataset=False, packing=False, max_length=None, dataset_num_proc=None)

    theirs = run_trainer("hlora", with_methods(trl.SFTTrainer), lambda: trl.SFTConfig(**kwargs), tmp_path, device,
                         dataset=Dataset.from_list, processing_class=make_tiny_tokenizer())
    assert_close(theirs, ours, rel=tol(1e-5))


def test_extra_terms_are_logged(device, tmp_path):
    """The methods' scalars join the Trainer's training logs; evaluation losses carry no extra term."""
    from forgetless.integrations import ForgetlessTrainer

    kwargs = trainer_args(tmp_path, 4, 1, device, logging_steps=1)
    model = make_lora_model(0, b_std=0.05).to(device)
    data = loop_order(DATA["domain"]())
    trainer = ForgetlessTrainer(model=model, args=TrainingArguments(**kwargs), train_dataset=data,
                                eval_dataset=data[:4], data_collator=partial(collate, pad_token_id=0),
                                methods=resolve(["sam", {"name": "ewc", "lambda": 1e3}]).plugins, stage="domain",
                                general_examples=DATA["general"]())
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == STEPS and all({"ewc_penalty", "sam_rho"} <= row.keys() for row in logged)
    assert logged[-1]["ewc_penalty"] > 0
    assert all(type(row["ewc_penalty"]) is float for row in logged)  # host floats: a checkpoint saves log_history
    json.dumps(trainer.state.log_history)  # as JSON (trainer_state.json)
    plain = trainer.evaluate()["eval_loss"]
    trainer.methods[1].lam = 1e9  # an evaluation that added the penalty would explode
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain, rel=1e-6)


def test_stage_must_be_known(tmp_path):
    from forgetless.integrations import ForgetlessTrainer

    with pytest.raises(ValueError, match="stage must be one of"):
        ForgetlessTrainer(model=make_lora_model(0), stage="warmup")


def test_a_dataset_without_labels_works_as_transformers_collator_reads_it(tmp_path):
    """The usual Trainer setup for a causal LM: a tokenized dataset of input_ids and attention_mask, and
    DataCollatorForLanguageModeling(mlm=False), which makes the labels. EWC's Fisher, computed from the dataset's rows
    at the end of the general run, read 'labels' and failed after training (KeyError); rows without labels now have
    their input ids as labels (padding masked), as that collator does: the same Fisher as with the labels given."""
    from transformers import DataCollatorForLanguageModeling

    from forgetless.integrations import ForgetlessTrainer
    from tests.unit.tiny_model import random_examples
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"])} for e in random_examples(8, 8)]
    fishers = []
    for labelled in (False, True):
        model = make_lora_model(0, b_std=0.05)
        data = [dict(r, labels=list(r["input_ids"])) for r in rows] if labelled else rows
        collator = partial(collate, pad_token_id=0) if labelled else DataCollatorForLanguageModeling(
            make_tiny_tokenizer(), mlm=False)
        plugin, = resolve({"name": "ewc", "estimator": "empirical", "samples": 8}).plugins
        ForgetlessTrainer(model=model, args=TrainingArguments(**trainer_args(tmp_path, 4, 1, torch.device("cpu"))),
                          train_dataset=data, data_collator=collator, methods=[plugin], stage="general").train()
        fishers.append({k: v.clone() for k, v in plugin.fisher.items()})
    assert fishers[0].keys() == fishers[1].keys() and fishers[0]
    for name, value in fishers[0].items():
        assert torch.equal(value, fishers[1][name]), name


def test_a_resumed_trainer_stage_records_the_importance_of_an_uninterrupted_one(tmp_path):
    """train(resume_from_checkpoint=...) ran on_stage_start again and never restored what HLoRA had gathered before
    the checkpoint: the general stage's importance covered the steps after it alone (relative error 3.9), silently.
    The methods' stage state now travels in the Trainer's checkpoints; a checkpoint without it is refused."""
    from forgetless.integrations import STAGE_STATE_FILE, ForgetlessTrainer

    data = variable_examples(16, seed=1)

    def run(out, resume=None):
        model = make_lora_model(0, b_std=0.05)
        plugin, = resolve([{"name": "hlora", "phi": 1e4}]).plugins
        args = TrainingArguments(**trainer_args(tmp_path, 2, 2, torch.device("cpu")) | dict(
            output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=2))
        trainer = ForgetlessTrainer(model=model, args=args, train_dataset=data, methods=[plugin], stage="general",
                                    data_collator=partial(collate, pad_token_id=0))
        trainer.train(resume_from_checkpoint=resume)
        return plugin

    whole = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.steps == whole.steps == 4
    for name, omega in whole.importance.items():
        torch.testing.assert_close(resumed.importance[name], omega, rtol=1e-5, atol=1e-9)
    (tmp_path / "a" / "checkpoint-2" / STAGE_STATE_FILE).unlink()
    with pytest.raises(ValueError, match=f"checkpoint-2: no {STAGE_STATE_FILE}, the running state of HLoRA"):
        run(tmp_path / "c", resume=str(tmp_path / "a" / "checkpoint-2"))
    # a domain stage keeps no running state: its checkpoint without the file (any written before session 33) resumes
    state = tmp_path / "general-state"
    (tmp_path / "d").mkdir()
    whole.save_state(state)

    def domain(out, resume=None):
        plugin, = resolve([{"name": "hlora", "phi": 1e4}]).plugins
        plugin.load_state(state)
        args = TrainingArguments(**trainer_args(tmp_path, 2, 2, torch.device("cpu")) | dict(
            output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=2))
        trainer = ForgetlessTrainer(model=make_lora_model(0, b_std=0.05), args=args, train_dataset=data,
                                    methods=[plugin], stage="domain", data_collator=partial(collate, pad_token_id=0))
        trainer.train(resume_from_checkpoint=resume)
        return trainable(trainer.model)

    first = domain(tmp_path / "d")
    (tmp_path / "d" / "checkpoint-2" / STAGE_STATE_FILE).unlink()
    assert_close(domain(tmp_path / "e", resume=str(tmp_path / "d" / "checkpoint-2")), first, rel=1e-6)


def test_the_stage_state_goes_into_the_checkpoint_folder_of_a_search_trial(tmp_path):
    """Under hyperparameter_search the Trainer saves a trial's checkpoints in OUTPUT/run-ID/checkpoint-N; the stage
    state went to OUTPUT/checkpoint-N, which does not exist there (every search with saving died at its first
    checkpoint). The trial's folder is stood in for (optuna is not installed here)."""
    from types import SimpleNamespace

    from forgetless.integrations import STAGE_STATE_FILE, ForgetlessTrainer, _HookCallback

    args = TrainingArguments(**trainer_args(tmp_path, 2, 1, torch.device("cpu")))
    plugin, = resolve([{"name": "hlora", "phi": 1e4}]).plugins
    trainer = ForgetlessTrainer(model=make_lora_model(0), args=args, train_dataset=variable_examples(4, seed=1),
                                methods=[plugin], stage="domain", data_collator=partial(collate, pad_token_id=0))
    trainer.stage_context = SimpleNamespace(stage="domain")
    trainer._trial = {"lr": 1e-3}
    trainer._get_output_dir = lambda trial: str(tmp_path / "out" / ("run-0" if trial else ""))
    (tmp_path / "out" / "run-0" / "checkpoint-2").mkdir(parents=True)
    _HookCallback(trainer).on_save(args, SimpleNamespace(is_world_process_zero=True, global_step=2), None)
    assert (tmp_path / "out" / "run-0" / "checkpoint-2" / STAGE_STATE_FILE).is_file()
