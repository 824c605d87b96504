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
    # a session stopped after its first run: that run's scores are logged all the same (the next session does not
    # redo it, so they were never logged)
    import forgetless.experiment as experiment

    real, calls = experiment.run_one, []

    def second_stops(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    import unittest.mock

    exp["output"], exp["methods"] = str(tmp_path / "two"), ["lora-mu", "lora-nu-mu"]
    path.write_text(yaml.safe_dump(exp))
    with unittest.mock.patch.object(experiment, "run_one", second_stops):
        assert main(["run", str(path), "train.domain.report_to=[tensorboard]", "--quiet"]) == 130
    (done,) = [p.stem for p in (tmp_path / "two" / "runs").glob("*.json")]
    assert "eval/t/acc" in _scalars(tmp_path / "two" / "logs" / done)


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


class _Recorder:
    def __init__(self):
        self.calls = []

    def log(self, scalars, step):
        self.calls.append((step, dict(scalars)))

    def close(self):
        pass


def test_each_step_is_logged_once_in_ascending_order():
    """The scores of a logging interval were written before its rows (steps 0 and 10, then 1-10): wandb drops a log
    whose step is below one it has seen, so it kept 2 rows in 10. One call per step now, in order, scores beside
    their step's row."""
    from forgetless.training.logging import StageLog

    tracker = _Recorder()
    log = StageLog("domain", 4, 0, False, [tracker])
    log.step(10)
    rows = [{"step": k, "loss": 1.0 / k, "lr": 0.1} for k in range(1, 5)]
    log.write(rows, [{"step": 0, "acc": 0.25}, {"step": 2, "acc": 0.5}, {"step": 4, "acc": 0.75}])
    assert [step for step, _ in tracker.calls] == [0, 1, 2, 3, 4]
    assert tracker.calls[0][1] == {"domain/eval/acc": 0.25}
    assert tracker.calls[2][1] == {"domain/eval/acc": 0.5, "domain/loss": 0.5, "domain/lr": 0.1}
    assert set(tracker.calls[4][1]) == {"domain/eval/acc", "domain/loss", "domain/lr", "domain/tokens_per_s"}


def test_report_to_listing_a_tracker_twice_is_refused():
    with pytest.raises(ValueError, match="report_to lists tensorboard more than once"):
        TrainConfig(report_to=["tensorboard", "tensorboard"])


def test_a_resumed_stage_purges_the_steps_it_redoes_and_logs_no_score_twice(lora_model, accelerator, tmp_path,
                                                                            monkeypatch):
    """A stage stopped after its checkpoint at step 4 had logged step 5; the resumed session wrote it again into a new
    events file (the curves went back), and logged the restored scores of steps 1-4 a second time."""
    import forgetless.training.loop as loop

    class Scores(Method):
        def __init__(self, stop_at=None):
            self.stop_at = stop_at

        def after_optimizer_step(self, ctx):
            ctx.extras.setdefault("eval_history", []).append({"step": ctx.step + 1, "acc": 0.1 * ctx.step})
            if ctx.step + 1 == self.stop_at:
                raise RuntimeError("stopped")

        def stage_state(self, ctx):
            return {"steps": torch.tensor([row["step"] for row in ctx.extras.get("eval_history", [])])}

        def load_stage_state(self, ctx, state):
            ctx.extras["eval_history"] = [{"step": int(s), "acc": 0.1 * (int(s) - 1)} for s in state["steps"]]

    examples = random_examples(8, 8)
    cfg = _cfg(max_steps=6, log_every=1, save_every=4, report_to=["tensorboard"], logging_dir=str(tmp_path / "tb"))
    with pytest.raises(RuntimeError, match="stopped"):
        train_stage(lora_model(), examples, cfg, [Scores(stop_at=6)], checkpoint_dir=tmp_path / "ck" / "run" / "domain",
                    accelerator=accelerator)
    assert [e.step for e in _scalars(tmp_path / "tb" / "run")["domain/loss"]] == [1, 2, 3, 4, 5]
    recorded = []
    real = loop.open_trackers
    monkeypatch.setattr(loop, "open_trackers", lambda *a, **k: [_Recording(t, recorded) for t in real(*a, **k)])
    train_stage(lora_model(), examples, cfg, [Scores()], checkpoint_dir=tmp_path / "ck" / "run" / "domain",
                accelerator=accelerator)
    assert sorted({step for step, scalars in recorded if "domain/eval/acc" in scalars}) == [5, 6]  # not 1-4 again
    scalars = _scalars(tmp_path / "tb" / "run")
    assert [e.step for e in scalars["domain/loss"]] == [1, 2, 3, 4, 5, 6]  # 5 was written by both: the first purged
    assert [e.step for e in scalars["domain/eval/acc"]] == [1, 2, 3, 4, 5, 6]


class _Recording:
    def __init__(self, tracker, calls):
        self.tracker, self.calls = tracker, calls

    def log(self, scalars, step):
        self.calls.append((step, dict(scalars)))
        self.tracker.log(scalars, step)

    def close(self):
        self.tracker.close()


def test_tokens_per_s_leaves_out_the_evaluations_and_checkpoint_writes(monkeypatch, lora_model, accelerator):
    """An interval holding an eval.every evaluation (or a checkpoint's write) logged a lower throughput: its time
    counted as training. The stage's time minus the paused seconds is used now."""
    from types import SimpleNamespace

    import forgetless.training.logging as logging_module
    from forgetless.training.logging import StageLog

    clock = [0.0]
    monkeypatch.setattr(logging_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    tracker = _Recorder()
    log = StageLog("domain", 2, 0, False, [tracker])
    clock[0] = 10.0
    log.step(100)
    log.pause(5.0)
    log.write([{"step": 1, "loss": 1.0, "lr": 0.1}])
    assert tracker.calls[-1][1]["domain/tokens_per_s"] == pytest.approx(20.0)  # 100 tokens in 10 - 5 s
    clock[0] = 14.0
    log.step(100)
    log.write([{"step": 2, "loss": 1.0, "lr": 0.1}])
    assert tracker.calls[-1][1]["domain/tokens_per_s"] == pytest.approx(25.0)  # the pause is spent: 100 in 4 s
    monkeypatch.undo()

    from forgetless.training.tracking import EvalEvery

    paused = []
    real = StageLog.pause
    monkeypatch.setattr(StageLog, "pause", lambda self, s: paused.append(s) or real(self, s))
    evaluate = EvalEvery(2, lambda model: {"acc": 0.5})
    train_stage(lora_model(), random_examples(8, 8), _cfg(max_steps=4), [evaluate], accelerator=accelerator)
    assert [s > 0 for s in paused] == [True, True, False, True]  # step 0's evaluation (in step 1), steps 2 and 4
