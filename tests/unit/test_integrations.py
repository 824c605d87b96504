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
import os
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


def _fp16_trainer(tmp_path, entry, *, scale, optim="adamw_torch", max_grad_norm=CLIP, inf_at_step=None, steps=4,
                  collator=None, stage="general"):
    """A general-stage Trainer run whose backward is scaled as under ``fp16=True`` on a GPU: accelerate's GradScaler
    is put where accelerate puts it (torch's CPU GradScaler; its fp16 autocast switched off, so the loss scale is the
    only difference from a float32 run). ``inf_at_step``: one LoRA gradient made inf at that step (an fp16 overflow)."""
    from forgetless.integrations import ForgetlessTrainer

    model = make_lora_model(0, b_std=0.05)
    plugins = resolve(entry).plugins
    args = TrainingArguments(**trainer_args(tmp_path, 4, 1, torch.device("cpu")) | dict(
        max_steps=steps, optim=optim, max_grad_norm=max_grad_norm, logging_steps=1))
    trainer = ForgetlessTrainer(model=model, args=args, train_dataset=variable_examples(16, seed=1), methods=plugins,
                                stage=stage, data_collator=collator or partial(collate, pad_token_id=0))
    if scale is not None:
        from accelerate.utils import AutocastKwargs

        acc = trainer.accelerator
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=2)  # the scale changes in the run
        acc.native_amp = True
        acc.state._mixed_precision = "fp16"
        acc.autocast_handler = AutocastKwargs(enabled=False)  # the forward in float32: the loss scale alone differs
    if inf_at_step is not None:
        a = next(p for n, p in model.named_parameters() if "lora_A" in n)
        a.register_hook(lambda g: g * float("inf") if trainer.state.global_step == inf_at_step else g)
    return trainer, plugins[0]


@pytest.mark.parametrize("max_grad_norm", [CLIP, 0.0])
@pytest.mark.parametrize("estimator", ["paper", "adam", "exact"])
def test_hlora_importance_under_an_fp16_loss_scale_is_the_float32_one(estimator, max_grad_norm, tmp_path):
    """Under fp16 the Trainer back-propagates loss x S (GradScaler; S = 65536 at the start, changing as it runs) and
    accelerate unscales the gradients only inside its clipping, after the hooks had read them: HLoRA's importance was
    about S x (and S^2 x for the paper term) the float32 one (ratio 1190 to 1333 at S = 1024), and the exact
    estimator's, gathered in backward hooks, also without clipping. Scaling by a power of two is exact: the same
    numbers."""
    entry = [{"name": "hlora", "estimator": estimator}]
    plain, expected = _fp16_trainer(tmp_path / "a", entry, scale=None, max_grad_norm=max_grad_norm)
    plain.train()
    scaled, got = _fp16_trainer(tmp_path / "b", entry, scale=1024.0, max_grad_norm=max_grad_norm)
    scaled.train()
    assert scaled.accelerator.scaler.get_scale() == 4096.0  # grown twice: the steps ran under three scales
    assert got.steps == expected.steps == 4
    for name, omega in expected.importance.items():
        assert float(omega.abs().max()) > 0
        torch.testing.assert_close(got.importance[name], omega, rtol=1e-5, atol=1e-12)
    assert_close(trainable(scaled.model), trainable(plain.model), rel=1e-6)


@pytest.mark.parametrize("perturb", ["step", "micro"])
def test_sam_under_an_fp16_loss_scale_logs_and_trains_as_in_float32(perturb, tmp_path):
    """SAM's eps does not depend on the loss scale (rho g / ||g||), but its logged sam_grad_norm was S x the float32
    one; it is taken out as for HLoRA. Weights and logs equal the float32 run's."""
    entry = [{"name": "sam", "rho": 0.05, "perturb": perturb}]
    runs = []
    for scale in (None, 1024.0):
        trainer, _ = _fp16_trainer(tmp_path / str(scale), entry, scale=scale, stage="domain")
        trainer.train()
        runs.append((trainable(trainer.model), [h["sam_grad_norm"] for h in trainer.state.log_history
                                                if "sam_grad_norm" in h]))
    (plain, plain_norms), (scaled, scaled_norms) = runs
    assert len(plain_norms) == 4 and plain_norms == pytest.approx(scaled_norms, rel=1e-6)
    assert_close(scaled, plain, rel=1e-6)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_a_step_an_fp16_overflow_skips_is_skipped_by_the_methods_too(optim, tmp_path):
    """accelerate's optimizer_step_was_skipped stays False when a fused AdamW (the Trainer's default since torch 2.8)
    skips the step itself, so HLoRA counted the skipped step and added inf x 0 = NaN to its importance, for good. The
    fall of the loss scale tells the skip either way: the importance is that of the three steps taken."""
    entry = [{"name": "hlora", "estimator": "paper"}]
    trainer, hlora = _fp16_trainer(tmp_path, entry, scale=1024.0, optim=optim, inf_at_step=1)
    trainer.train()
    assert trainer.state.global_step == 4 and hlora.steps == 3
    assert all(bool(torch.isfinite(omega).all()) for omega in hlora.importance.values())
    assert sum(float(omega.abs().sum()) for omega in hlora.importance.values()) > 0


def test_a_failed_trainer_stage_takes_the_methods_hooks_off(tmp_path):
    """A Trainer stage that raised (a bad batch, Ctrl-C) left HLoRA's exact-estimator hooks on the model, and a later,
    unrelated backward still summed into its gradient; the loop gave the model back as it came, now the Trainer too."""
    calls = []

    def collator(rows):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bad batch")
        return collate(rows, pad_token_id=0)

    trainer, hlora = _fp16_trainer(tmp_path, [{"name": "hlora", "estimator": "exact"}], scale=None,
                                   collator=collator)
    hooks_before = sum(len(m._forward_hooks) for m in trainer.model.modules())
    with pytest.raises(RuntimeError, match="a bad batch"):
        trainer.train()
    assert sum(len(m._forward_hooks) for m in trainer.model.modules()) == hooks_before



def test_methods_under_deepspeed_or_fsdp_are_refused(tmp_path, monkeypatch):
    """DeepSpeed steps the optimizer inside backward and ZeRO/FSDP shard the gradients and factors: HLoRA recorded zero
    importance there, silently. The Trainer is now refused with methods under either."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from forgetless.integrations import ForgetlessTrainer

    args = TrainingArguments(**trainer_args(tmp_path, 2, 1, torch.device("cpu")))
    ForgetlessTrainer(model=make_lora_model(0), args=args, methods=resolve(["hlora"]).plugins)  # DDP, one process
    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with monkeypatch.context() as patch:
            patch.setattr(Accelerator, "distributed_type", property(lambda self, kind=kind: kind))
            with pytest.raises(ValueError, match=f"not under {kind.value}"):
                ForgetlessTrainer(model=make_lora_model(0), args=args, methods=resolve(["hlora"]).plugins)
            ForgetlessTrainer(model=make_lora_model(0), args=args, methods=[])  # no method: the Trainer's business


def test_methods_with_a_model_init_or_under_data_parallel_are_refused(tmp_path, monkeypatch):
    """With ``model_init`` the Trainer's train() builds a new model after the methods were put on the given one (HLoRA
    recorded zero importance); with several GPUs in one process it wraps the model in nn.DataParallel. Both are
    refused with methods; without methods they are the Trainer's business."""
    from forgetless.integrations import ForgetlessTrainer

    args = TrainingArguments(**trainer_args(tmp_path, 2, 1, torch.device("cpu")))
    with pytest.raises(ValueError, match="pass model=, not model_init="):
        ForgetlessTrainer(model_init=lambda: make_lora_model(0), args=args, methods=resolve(["hlora"]).plugins)
    ForgetlessTrainer(model_init=lambda: make_lora_model(0), args=args, methods=[])
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"not under nn.DataParallel \(2 GPUs in one process\)"):
        ForgetlessTrainer(model=make_lora_model(0), args=args, methods=resolve(["hlora"]).plugins)


def test_a_second_train_prepares_the_given_examples_again(tmp_path):
    """train() replaced the Trainer's dataset by the methods' prepared one for good: each further train() (a retry, a
    resume) mixed replay in again (8 domain examples: 16, 32, 64). The given dataset is put back after the stage."""
    from forgetless.integrations import ForgetlessTrainer

    domain = loop_order(DATA["domain"]())[:8]
    general = DATA["general"]()
    seen = []
    args = TrainingArguments(**trainer_args(tmp_path, 2, 1, torch.device("cpu")) | {"max_steps": 1})
    trainer = ForgetlessTrainer(model=make_lora_model(0), args=args, train_dataset=domain, general_examples=general,
                                data_collator=partial(collate, pad_token_id=0),
                                methods=resolve([{"name": "replay", "fraction": 0.5}]).plugins)
    real = trainer.get_train_dataloader

    def counting():
        seen.append(len(trainer.train_dataset))
        return real()

    trainer.get_train_dataloader = counting
    for _ in range(2):
        trainer.train()
        assert trainer.train_dataset is domain
    assert seen[0] == seen[1] > len(domain)


def test_dora_and_lora_bias_adapters_are_refused_by_the_methods():
    """HLoRA, EWC and WiSE-FT take a module's update to be s*B@A; a DoRA adapter's is not (its magnitude vector moved
    unregularized), nor one with a LoRA bias. They were accepted silently; export already refused them."""
    from peft import LoraConfig, get_peft_model

    from forgetless.lora import lora_modules
    from tests.unit.tiny_model import make_tiny_model

    plain = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert len(lora_modules(plain)) == 2
    dora = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"q_proj: a DoraLinearVariant adapter \('default'\).*use_dora=False"):
        lora_modules(dora)
    bias = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match=r"q_proj: the adapter 'default' has a LoRA bias"):
        lora_modules(bias)
    # every method that reads the factors refuses at the stage's start, before a step: EWC's general stage first met
    # the adapter in its Fisher at the stage's end, WiSE-FT at the evaluation
    from forgetless.methods.ewc import EWC
    from forgetless.methods.hlora import HLoRA
    from forgetless.methods.wise_ft import WiseFT

    for stage, plugin in (("general", EWC(samples=4)), ("domain", WiseFT()), ("general", HLoRA())):
        before = {n: p.detach().clone() for n, p in dora.named_parameters() if p.requires_grad}
        with pytest.raises(ValueError, match="DoraLinearVariant"):
            train_stage(dora, variable_examples(8, seed=1), TrainConfig(max_steps=2, batch_size=4, lr=1e-2,
                                                                         precision="fp32", progress=False),
                        [plugin], stage=stage)
        assert all(torch.equal(p, before[n]) for n, p in dora.named_parameters() if p.requires_grad)


def test_an_error_after_the_stage_ended_does_not_abort_it(tmp_path):
    """A later callback's on_train_end that raises (after ours ran on_stage_end) called on_stage_abort after
    on_stage_end, which the hook's contract excludes; an error in on_stage_end itself still aborts, as in the loop."""
    from transformers import TrainerCallback

    from forgetless.integrations import ForgetlessTrainer
    from forgetless.training.hooks import Method

    class Spy(Method):
        def __init__(self, fail_at_end=False):
            self.calls, self.fail_at_end = [], fail_at_end

        def on_stage_end(self, ctx):
            self.calls.append("end")
            if self.fail_at_end:
                raise RuntimeError("on_stage_end failed")

        def on_stage_abort(self, ctx):
            self.calls.append("abort")

    class Late(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            raise RuntimeError("a later callback")

    for spy, callbacks, message in ((Spy(), [Late()], "a later callback"),
                                    (Spy(fail_at_end=True), [], "on_stage_end failed")):
        args = TrainingArguments(**trainer_args(tmp_path, 2, 1, torch.device("cpu")))
        trainer = ForgetlessTrainer(model=make_lora_model(0), args=args, train_dataset=variable_examples(8, seed=1),
                                    methods=[spy], data_collator=partial(collate, pad_token_id=0))
        for callback in callbacks:  # after the mixin's own: its on_train_end runs later
            trainer.add_callback(callback)
        with pytest.raises(RuntimeError, match=message):
            trainer.train()
        assert spy.calls == (["end"] if callbacks else ["end", "abort"])


def test_only_the_saving_process_writes_the_method_state_and_all_wait(tmp_path, monkeypatch):
    """Under `accelerate launch` every process called save_method_state and wrote one file at once through one
    temporary name: one process's rename failed ('No such file ... .tmp') and it died, the others hung."""
    from forgetless.integrations import ForgetlessTrainer

    device = torch.device("cpu")
    trainer = ForgetlessTrainer(model=make_lora_model(0, b_std=0.05), args=TrainingArguments(
        **trainer_args(tmp_path, 4, 1, device)), train_dataset=loop_order(DATA["general"]()),
        data_collator=partial(collate, pad_token_id=0), methods=resolve("hlora").plugins, stage="general")
    trainer.train()
    waits = []
    monkeypatch.setattr(trainer.accelerator, "wait_for_everyone", lambda: waits.append(1))
    for should_save, folder in ((False, tmp_path / "other-rank"), (True, tmp_path / "main-rank")):
        monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self, v=should_save: v))
        trainer.save_method_state(folder)
        assert folder.is_dir() == should_save and len(waits) == 1 + should_save
    assert sorted(p.name for p in (tmp_path / "main-rank").iterdir()) == ["hlora_importance.safetensors"]


def test_two_writers_of_one_state_file_each_rename_a_whole_file():
    """Workers (or ranks) saving the same state wrote through one fixed FILE.tmp: a rename could find it gone."""
    import tempfile
    import threading

    from forgetless.methods.common import StateFile

    state = StateFile("race.safetensors", "race", "race state")
    folder = tempfile.mkdtemp()
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        tensors = {"w": torch.full((256, 1024), float(seed))}
        try:
            for _ in range(40):
                state.save(folder, tensors, {"seed": seed})
        except BaseException as err:  # noqa: BLE001 - collected for the assert
            errors.append(err)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    tensors, meta = state.load(folder)
    assert float(tensors["w"][0, 0]) == meta["seed"] and bool((tensors["w"] == meta["seed"]).all())
    assert sorted(os.listdir(folder)) == ["race.safetensors"]  # no temporary left
