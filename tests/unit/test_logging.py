"""Logging (issue #14): the stage's scalars in TensorBoard (read back with TensorBoard's own event reader), one
progress line per interval outside a terminal, and no device value read inside the step loop between intervals."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import forgetless
from forgetless.training.config import TrainConfig
from forgetless.training.hooks import Method
from forgetless.training.loop import train_stage
from tests.unit.tiny_model import random_examples

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# forgetless's own code: not a library in a virtualenv that a checkout named .../forgetless/.venv holds
PACKAGE_DIR = os.path.dirname(forgetless.__file__) + os.sep


class LogsATerm(Method):
    """A method's extra term, logged as a tensor (as HLoRA's reg_loss and EWC's penalty are)."""

    def extra_loss(self, ctx, batch):
        term = sum((p ** 2).sum() for _, p in ctx.trainable_parameters()) * 1e-3
        ctx.scalars["my_term"] = term.detach()
        return term

    def after_optimizer_step(self, ctx):  # scores taken while training, as EvalEvery records them
        if (ctx.step + 1) % 2 == 0:
            ctx.extras.setdefault("eval_history", []).append({"step": ctx.step + 1, "acc": 0.1 * ctx.step})


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**({"max_steps": 5, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "progress": False,
                           "log_every": 2} | kw))


def _scalars(folder) -> dict[str, list]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_steps_scalars(lora_model, accelerator, tmp_path):
    result = train_stage(lora_model(), random_examples(8, 8), _cfg(report_to=["tensorboard"], logging_dir=str(tmp_path)),
                         [LogsATerm()], accelerator=accelerator)
    scalars = _scalars(tmp_path)
    for name in ("loss", "task_loss", "lr", "grad_norm", "my_term"):
        logged = scalars[f"domain/{name}"]
        assert [e.step for e in logged] == [1, 2, 3, 4, 5]
        assert [e.value for e in logged] == pytest.approx([row[name] for row in result.history], rel=1e-6)
    assert [e.step for e in scalars["domain/tokens_per_s"]] == [2, 4, 5]  # one per logging interval
    assert all(e.value > 0 for e in scalars["domain/tokens_per_s"])
    assert [(e.step, e.value) for e in scalars["domain/eval/acc"]] == [(2, pytest.approx(0.1)), (4, pytest.approx(0.3))]
    assert all(isinstance(v, float) for row in result.history for k, v in row.items() if k != "step")  # host values


def test_run_folder_and_scores(tmp_path):
    from forgetless.training.logging import log_scores
    from forgetless.training.loop import _log_dir

    checkpoints = tmp_path / "out" / "checkpoints" / "lora-mu__piqa__seed0" / "domain"
    assert _log_dir(TrainConfig(), checkpoints) == tmp_path / "out" / "logs" / "lora-mu__piqa__seed0"
    assert _log_dir(TrainConfig(logging_dir="tb"), checkpoints).as_posix() == "tb/lora-mu__piqa__seed0"
    record = {"general_ppl": 12.5, "tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.25, "n": 4}}}
    log_scores(["tensorboard"], tmp_path / "run", record, step=7)
    scalars = _scalars(tmp_path / "run")
    assert {tag: [(e.step, e.value) for e in events] for tag, events in scalars.items()} == {
        "eval/general_ppl": [(7, 12.5)], "eval/piqa/acc": [(7, 0.5)], "eval/piqa/acc_norm": [(7, 0.25)]}


def test_progress_outside_a_terminal_is_one_line_per_interval(lora_model, accelerator, capsys):
    train_stage(lora_model(), random_examples(8, 8), _cfg(progress=True, log_every=2), accelerator=accelerator)
    lines = capsys.readouterr().err.strip().splitlines()  # pytest's captured stderr is not a terminal
    lines = [line for line in lines if line.startswith("train domain")]
    assert [line.split(":")[1].split()[1] for line in lines] == ["2/5", "4/5", "5/5"]
    assert all(" loss " in line and "tokens/s" in line and "\r" not in line for line in lines)


def test_no_device_value_is_read_between_intervals(lora_model, accelerator, monkeypatch):
    """No forgetless code reads a device value (Tensor.__float__, .item(), ...) between two logging intervals (the
    libraries' own reads, e.g. AdamW's step count, are on the CPU)."""
    reads = []
    for name in ("__float__", "item", "tolist", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            code = sys._getframe(1).f_code  # the batch's counts are read on the CPU, in the collate function
            if code.co_filename.startswith(PACKAGE_DIR) \
                    and code.co_name != "_collate_counted":
                reads.append(f"{code.co_filename}:{code.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    seen: list[int] = []

    class Count(Method):
        def after_optimizer_step(self, ctx):
            seen.append(len(reads))

    train_stage(lora_model(), random_examples(8, 8), _cfg(max_steps=4, log_every=4), [Count()], accelerator=accelerator)
    monkeypatch.undo()
    assert len(set(seen)) == 1, seen  # steps 1..4 read nothing (the read is after step 4's hooks)
    assert len(reads) > seen[-1]  # the interval's read is seen


def test_forgetless_run_logs_training_and_scores(tmp_path, tiny_model_dir):
    import yaml

    from forgetless.cli import main

    task = str(Path(__file__).resolve().parents[1] / "fixtures" / "data" / "generic.jsonl")
    general = tmp_path / "general.jsonl"
    general.write_text("".join(f'{{"text": "Plants make sugar from light, sentence {i}."}}\n' for i in range(20)))
    exp = {"name": "tiny", "model": str(tiny_model_dir), "output": str(tmp_path / "out"), "seeds": [0],
           "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
           "general": {"train": str(general), "heldout": str(general), "block_size": 16},
           "tasks": [{"name": "t", "train": task, "test": task}], "methods": ["lora-mu"],
           "train": {"domain": {"max_steps": 2, "batch_size": 2}}, "precision": "fp32", "eval": {"batch_size": 2}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    assert main(["run", str(path), "train.domain.report_to=[tensorboard]", "--quiet"]) == 0
    record = json.loads((tmp_path / "out" / "runs" / "lora-mu__t__seed0.json").read_text())
    scalars = _scalars(tmp_path / "out" / "logs" / "lora-mu__t__seed0")
    assert [e.value for e in scalars["domain/loss"]] == pytest.approx([r["loss"] for r in record["stages"][0]["history"]])
    assert [(e.step, e.value) for e in scalars["eval/t/acc"]] == [(2, pytest.approx(record["tasks"]["t"]["acc"]))]
    assert scalars["eval/general_ppl"][0].value == pytest.approx(record["general_ppl"], rel=1e-6)


def test_forgetless_train_report_to(tmp_path, tiny_model_dir):
    from forgetless.cli import main

    task = str(Path(__file__).resolve().parents[1] / "fixtures" / "data" / "generic.jsonl")
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_model_dir), "--domain", task, "--test", task, "--output", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--precision", "fp32", "--quiet",
                 "--report-to", "tensorboard"]) == 0
    record = json.loads((out / "run.json").read_text())
    scalars = _scalars(out / "logs")
    assert [e.step for e in scalars["domain/loss"]] == [1, 2]
    assert [(e.step, e.value) for e in scalars["eval/domain/acc"]] == [(2, pytest.approx(record["tasks"]["domain"]["acc"]))]
