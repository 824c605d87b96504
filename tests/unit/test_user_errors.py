"""Every malformed input is one line ``forgetless: error: WHERE: WHAT`` and exit code 2, before any model loads.

One row per case: (id, how to build the command line, the fragment the message must hold, the exit code). Each row
runs ``forgetless.cli.main`` in-process with the model loader patched to fail, so a check that comes only after
loading a model fails the row. Keep adding rows: a new malformed case is one line here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from forgetless.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
TASK = str(FIXTURES / "generic.jsonl")


@dataclass
class Workspace:
    """A folder with a tiny model (its config is real: LoRA targets are checked against it) and data files."""

    root: Path
    model: Path
    monkeypatch: pytest.MonkeyPatch | None = None
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # closed when the test ends

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def rows(self, name: str, rows: list[dict]) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    @property
    def general(self) -> str:
        return self.rows("general.jsonl", [{"text": f"Plants make sugar from light, sentence {i}."} for i in range(20)])

    @property
    def output(self) -> Path:
        return self.root / "out"

    def experiment(self, **over) -> str:
        """``run`` on an experiment YAML: a valid one, with the top-level keys of ``over`` replaced."""
        exp = {"name": "tiny", "model": str(self.model), "output": str(self.output), "seeds": [0],
               "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
               "general": {"train": self.general, "heldout": self.general, "block_size": 16},
               "tasks": [{"name": "t", "train": TASK, "test": TASK}], "methods": ["base", "lora-mu"],
               "train": {"general": {"max_steps": 2}, "domain": {"max_steps": 2}}, "precision": "fp32"} | over
        return self.file("exp.yaml", yaml.safe_dump(exp))

    def task(self, **over) -> list[dict]:
        return [{"name": "t", "train": TASK, "test": TASK} | over]

    def train(self, *extra: str) -> list[str]:
        return ["train", "--model", str(self.model), "--domain", TASK, "--output", str(self.output), "--quiet",
                *extra]

    def adapter(self, corrupt: Callable[[Path], None] | None = None) -> str:
        """A real adapter of the tiny model (made without the loader), optionally damaged."""
        from forgetless.models import LoraSettings, attach_lora, save_adapter
        from tests.unit.tiny_model import make_tiny_model

        folder = self.root / "adapter"
        save_adapter(attach_lora(make_tiny_model(), LoraSettings(r=2, dropout=0.0)), folder, "tiny")
        if corrupt is not None:
            corrupt(folder)
        return str(folder)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _broken_model(ws) -> str:
    """A copy of the workspace's model folder whose weights file is cut short."""
    import shutil

    broken = ws.root / "broken-model"
    shutil.copytree(ws.model, broken)
    _truncate(broken / "model.safetensors")
    return str(broken)


def _cached_stage(ws: Workspace, method: str, damage: Callable[[Path], None]) -> list[str]:
    """``run`` on an experiment whose cached general stage (a real one, made without the loader) is damaged."""
    from forgetless.config import load_experiment
    from forgetless.experiment import general_stage_key
    from forgetless.methods import resolve

    path = ws.experiment(methods=[method])
    cache = ws.output / "stages" / f"general-{general_stage_key(load_experiment(path), resolve(method), 0)}"
    cache.parent.mkdir(parents=True)
    Path(ws.adapter()).rename(cache)
    (cache / "stage.json").write_text(json.dumps({"stage": "general", "steps": 2, "seconds": 1.0, "history": []}))
    (cache / "hlora_importance.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    damage(cache)
    return ["run", path]


def _cached_domain_stage(ws: Workspace, damage: Callable[[Path], None]) -> list[str]:
    """``run`` on an experiment whose cached domain stage (shared by lora-nu-mu and wise-ft; a real adapter, made
    without the loader) is damaged."""
    from forgetless.config import load_experiment
    from forgetless.experiment import plan_runs, shared_domain_stage

    path = ws.experiment(methods=["lora-nu-mu", "wise-ft"])
    exp = load_experiment(path)
    job = plan_runs(exp)[0]
    cache = ws.output / "stages" / shared_domain_stage(exp, job.recipe, job.task, job.seed)
    cache.parent.mkdir(parents=True)
    Path(ws.adapter()).rename(cache)
    (cache / "stage.json").write_text(json.dumps({"stage": "domain", "steps": 2, "seconds": 1.0, "history": []}))
    damage(cache)
    return ["run", path]


def _config_only(ws: Workspace) -> Path:
    """A model folder holding only the configuration: no weights, no tokenizer."""
    folder = ws.root / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((ws.model / "config.json").read_text())
    return folder


def _finished(ws: Workspace, **record) -> list[str]:
    """``run`` on an experiment that finds ``runs/base__t__seed0.json`` already there (its settings: the
    experiment's, updated with ``record["settings"]``)."""
    from forgetless.config import load_experiment
    from forgetless.experiment import plan_runs, settings_digest

    path = ws.experiment(methods=["base"])
    (job,) = plan_runs(load_experiment(path))
    settings = job.settings | record.pop("settings", {})
    record = {"settings": settings, "settings_digest": settings_digest(settings)} | record
    (ws.output / "runs").mkdir(parents=True)
    scores = {"method": "base", "task": "t", "seed": 0, "general_ppl": 10.0,
              "tasks": {"t": {"acc": 0.5, "acc_norm": 0.5}}}
    (ws.output / "runs" / "base__t__seed0.json").write_text(json.dumps(scores | record))
    return ["run", path]


def _corrupt_record(ws: Workspace, command: str) -> list[str]:
    """``run`` or ``report`` on a folder with a run record cut short."""
    (ws.output / "runs").mkdir(parents=True)
    ws.file("out/runs/base__t__seed0.json", '{"method": "base", "gen')
    return ["run", ws.experiment()] if command == "run" else ["report", str(ws.output)]


def _record_without(ws: Workspace, command: str) -> list[str]:
    """``run`` or ``report`` on a folder with a run record that parses but lacks a field (an edit gone wrong)."""
    (ws.output / "runs").mkdir(parents=True)
    ws.file("out/runs/base__t__seed0.json", '{"method": "base", "task": "t", "seed": 0, "general_ppl": 3.5}')
    return ["run", ws.experiment()] if command == "run" else ["report", str(ws.output)]


def _diverged_report(ws: Workspace) -> list[str]:
    _finished(ws, general_ppl=float("nan"))
    return ["report", str(ws.output)]


def _locked(ws: Workspace) -> list[str]:
    """``run`` while the output folder's lock is held (by this process, through a second descriptor)."""
    from forgetless.experiment import output_lock

    ws.output.mkdir()
    ws.held.enter_context(output_lock(ws.output))
    return ["run", ws.experiment()]


def _full_disk(ws: Workspace) -> list[str]:
    import shutil

    usage = shutil.disk_usage(ws.root)
    ws.monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    return ["run", ws.experiment()]


Case = tuple[str, Callable[..., list[str]], str, int]

CASES: list[Case] = [
    # the experiment file itself
    ("missing experiment file", lambda ws: ["run", str(ws.root / "nope.yaml")], "experiment file not found", 2),
    ("invalid YAML", lambda ws: ["run", ws.file("bad.yaml", "name: [unclosed\n")], "bad.yaml: invalid YAML", 2),
    ("python tag refused", lambda ws: ["run", ws.file("tag.yaml", "name: !!python/object/apply:os.system [id]\n")],
     "tag.yaml: invalid YAML", 2),
    ("unknown top-level key", lambda ws: ["run", ws.experiment(modle="x")], "exp.yaml: unknown key 'modle'", 2),
    ("misspelt train section", lambda ws: ["run", ws.experiment(train={"generall": {"max_steps": 2}})],
     "exp.yaml: train: unknown key 'generall'", 2),
    ("unknown key in general.train",
     lambda ws: ["run", ws.experiment(general={"train": {"source": ws.general, "limt": 3}, "heldout": ws.general})],
     "general.train: unknown key 'limt'", 2),
    ("unknown key in eval", lambda ws: ["run", ws.experiment(eval={"batchsize": 4})], "eval: unknown key 'batchsize'", 2),
    # types, ranges and choices
    ("seeds: x", lambda ws: ["run", ws.experiment(seeds="x")], "seeds: expected a list, got a string 'x'", 2),
    ("seeds: '12'", lambda ws: ["run", ws.experiment(seeds="12")], "seeds: expected a list, got a string '12'", 2),
    ("seeds: [0.7]", lambda ws: ["run", ws.experiment(seeds=[0.7])], "seeds[0]: expected an integer, got a number", 2),
    ("seeds: [-1]", lambda ws: ["run", ws.experiment(seeds=[-1])], "seeds: must be integers in [0, 2**32)", 2),
    ("methods: []", lambda ws: ["run", ws.experiment(methods=[])], "methods: must list at least one method", 2),
    ("methods: a string", lambda ws: ["run", ws.experiment(methods="lora-mu")], "methods: expected a list", 2),
    ("methods: [base, base]", lambda ws: ["run", ws.experiment(methods=["base", "base"])],
     "methods[1]: duplicate of methods[0] ('base')", 2),
    ("unknown method", lambda ws: ["run", ws.experiment(methods=["lora-muu"])], "unknown method 'lora-muu'", 2),
    ("bad precision", lambda ws: ["run", ws.experiment(precision="fp16")], "precision: must be one of", 2),
    ("bad stage precision", lambda ws: ["run", ws.experiment(train={"domain": {"precision": "half"}})],
     "train.domain: precision must be one of", 2),
    ("bad scheduler", lambda ws: ["run", ws.experiment(train={"domain": {"scheduler": "cosin"}})],
     "train.domain: scheduler must be one of", 2),
    ("max_steps: -1", lambda ws: ["run", ws.experiment(train={"domain": {"max_steps": -1}})],
     "train.domain: max_steps must be >= 1", 2),
    ("max_steps: 0", lambda ws: ["run", ws.experiment(train={"general": {"max_steps": 0}})],
     "train.general: max_steps must be >= 1", 2),
    ("lr: abc", lambda ws: ["run", ws.experiment(train={"domain": {"lr": "abc"}})], "train.domain.lr: expected a number",
     2),
    ("dropout 1.5", lambda ws: ["run", ws.experiment(lora={"dropout": 1.5})], "lora: dropout must be in [0, 1)", 2),
    ("no target modules", lambda ws: ["run", ws.experiment(lora={"target_modules": []})],
     "lora: target_modules must name at least one module", 2),
    ("unknown target module", lambda ws: ["run", ws.experiment(lora={"target_modules": ["q_proj", "vv_proj"]})],
     "lora: target_modules: 'vv_proj' is not a module of", 2),
    ("unknown target module, dry run", lambda ws: ["run", ws.experiment(lora={"target_modules": ["vv_proj"]}),
                                                   "--dry-run"], "lora: target_modules: 'vv_proj' is not a module of", 2),
    ("output under a file, dry run", lambda ws: ["run", ws.experiment(output=ws.file("f", "") + "/out"), "--dry-run"],
     "is not writable", 2),
    ("misspelt embedded model, dry run", lambda ws: ["run", ws.experiment(model="smollm2-13m"), "--dry-run"],
     "did you mean 'smollm2-135m'?", 2),
    ("test_limit: -1", lambda ws: ["run", ws.experiment(tasks=ws.task(test_limit=-1))],
     "tasks[0]: test_limit must be >= 1, got -1", 2),
    ("unknown schema", lambda ws: ["run", ws.experiment(tasks=ws.task(schema="sicq"))], "tasks[0]: schema must be one of",
     2),
    ("block_size: 0", lambda ws: ["run", ws.experiment(general={"train": ws.general, "heldout": ws.general,
                                                                "block_size": 0})], "general: block_size must be >= 1", 2),
    # names that would leave the output folder
    ("task name with ..", lambda ws: ["run", ws.experiment(tasks=ws.task(name="../../../ESCAPED"))],
     "the task name '../../../ESCAPED' may hold only letters, digits and '-_.=,+'", 2),
    ("task name with /", lambda ws: ["run", ws.experiment(tasks=ws.task(name="a/b"))], "the task name 'a/b'", 2),
    ("absolute task name", lambda ws: ["run", ws.experiment(tasks=ws.task(name="/tmp/x"))], "the task name '/tmp/x'", 2),
    ("task name with shell characters", lambda ws: ["run", ws.experiment(tasks=ws.task(name="x;rm -rf ~"))],
     "the task name 'x;rm -rf ~'", 2),
    ("task name ..", lambda ws: ["run", ws.experiment(tasks=ws.task(name=".."))], "the task name '..'", 2),
    # data files, read before any model loads
    ("misspelt bare task file", lambda ws: ["run", ws.experiment(tasks=ws.task(train="taks.jsonl"))],
     "exp.yaml: tasks[0].train: taks.jsonl: no such file (looked in the current folder, ", 2),
    ("misspelt bare general file",
     lambda ws: ["run", ws.experiment(general={"train": "genral.txt", "heldout": ws.general, "block_size": 16})],
     "exp.yaml: general.train: genral.txt: no such file (looked in the current folder, ", 2),
    ("train: misspelt bare file", lambda ws: ws.train("--domain", "taks.jsonl"), "--domain: taks.jsonl: no such file",
     2),
    ("answer longer than max_length", lambda ws: ["run", ws.experiment(tasks=ws.task(max_length=1))],
     "exp.yaml: tasks[0].train: " + TASK + ", line 1: field 'answer': answer of ", 2),
    ("missing test file", lambda ws: ["run", ws.experiment(tasks=ws.task(test=str(ws.root / "nope.jsonl")))],
     "tasks[0].test: ", 2),
    ("empty test file", lambda ws: ["run", ws.experiment(tasks=ws.task(test=ws.file("empty.jsonl", "")))],
     "exp.yaml: tasks[0].test: ", 2),
    ("empty test file says so", lambda ws: ["run", ws.experiment(tasks=ws.task(test=ws.file("empty.jsonl", "\n")))],
     "empty.jsonl: no multiple-choice items", 2),
    ("non-UTF-8 test file",
     lambda ws: ["run", ws.experiment(tasks=ws.task(test=ws.file("l1.jsonl", b'{"question": "caf\xe9"}\n')))],
     "l1.jsonl, line 1: not UTF-8 text (byte 0xe9", 2),
    ("non-UTF-8 general text",
     lambda ws: ["run", ws.experiment(general={"train": ws.file("g.txt", b"\xff\xfe"), "heldout": ws.general})],
     "general.train: ", 2),
    ("undetectable schema", lambda ws: ["run", ws.experiment(tasks=ws.task(train=ws.rows("x.jsonl", [{"q": 1}])))],
     "x.jsonl, line 1: cannot tell the schema", 2),
    # instructions in a task without train_kind (multiple choice): the error listed the multiple-choice schemas only
    ("instructions read as multiple choice", lambda ws: ["run", ws.experiment(tasks=ws.task(train=ws.rows(
        "a.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi."}])))],
     "a.jsonl, line 1: not multiple-choice items: fields ['input', 'instruction', 'output'] are instructions data; "
     "say so with train_kind: instructions (forgetless train: --domain-kind instructions) or auto", 2),
    # forgetless train reads the kind from the rows by default
    ("train on instructions by default", lambda ws: ws.train("--domain", ws.rows(
        "b.jsonl", [{"instruction": "Say hi.", "output": ""}])), "b.jsonl, line 1: field 'output': empty", 2),
    ("one-choice item",
     lambda ws: ["run", ws.experiment(tasks=ws.task(test=ws.rows("one.jsonl", [
         {"question": "q", "choices": ["a", "b"], "answer": 0}, {"question": "q", "choices": ["a"], "answer": 0}])))],
     "one.jsonl, line 2: field 'choices': needs at least two choices, got 1", 2),
    ("bad row", lambda ws: ["run", ws.experiment(tasks=ws.task(train=ws.rows("bad.jsonl", [
        {"question": "q", "choices": ["a", "b"], "answer": 5}])))], "bad.jsonl, line 1: field 'answer'", 2),
    ("unknown train_kind", lambda ws: ["run", ws.experiment(tasks=ws.task(train_kind="chatml"))],
     "tasks[0]: train_kind must be one of ['multiple_choice', 'instructions', 'chat',", 2),
    ("bad chat_template", lambda ws: ["run", ws.experiment(chat_template="yes please")],
     "exp.yaml: chat_template: must be auto, true or false, got 'yes please'", 2),
    ("chat row with an unknown role", lambda ws: ["run", ws.experiment(tasks=ws.task(train_kind="auto", train=ws.rows(
        "c.jsonl", [{"messages": [{"role": "human", "content": "hi"}]}])))],
     "c.jsonl, line 1: field 'messages[0].role': unknown role 'human'", 2),
    ("chat data for a tokenizer without a template", lambda ws: ["run", ws.experiment(tasks=ws.task(
        train_kind="chat", train=ws.rows("c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "yo"}]}])))],
     "tasks[0].train: this data needs the model's chat template, and its tokenizer has none", 2),
    ("chat_template true without a template", lambda ws: ["run", ws.experiment(chat_template=True)],
     "exp.yaml: chat_template: chat_template is true, but its tokenizer has no chat template", 2),
    ("empty completion", lambda ws: ws.train("--domain-kind", "prompt_completion", "--domain", ws.rows(
        "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])),
     "pc.jsonl, line 2: field 'completion': empty", 2),
    ("empty general text", lambda ws: ["run", ws.experiment(general={"train": ws.file("e.txt", "\n\n"),
                                                                     "heldout": ws.general})],
     "general.train: ", 2),
    # the model, the output folder, the finished runs, the cached stages
    ("missing model folder", lambda ws: ["run", ws.experiment(model=str(ws.root / "no-model"))],
     "no-model does not exist", 2),
    ("missing gguf", lambda ws: ["run", ws.experiment(model=str(ws.root / "m.gguf"))], "GGUF file not found", 2),

    ("misspelt embedded model", lambda ws: ["run", ws.experiment(model="smollm2-136m")],
     "exp.yaml: model: unknown model 'smollm2-136m': did you mean 'smollm2-135m'?", 2),
    ("misspelt embedded model (eval)", lambda ws: ["eval", "--model", "smolm2-135m", "--ppl", ws.general],
     "unknown model 'smolm2-135m': did you mean 'smollm2-135m'?", 2),
    ("output under a file", lambda ws: ["run", ws.experiment(output=ws.file("f", "") + "/out")], "is not writable", 2),
    ("output folder full", _full_disk, "MiB free in", 2),
    ("output folder in use", _locked, f"is in use by another forgetless run (pid {os.getpid()})", 2),
    ("corrupt run record", lambda ws: _corrupt_record(ws, "run"), "base__t__seed0.json: corrupt run record", 2),
    ("run record without a field", lambda ws: _record_without(ws, "run"),
     "base__t__seed0.json: not a run record (lacks the field 'tasks'); delete it to rerun that run", 2),
    ("changed settings", lambda ws: _finished(ws, settings={"model": "other-model", "seed": 3}),
     "base__t__seed0: model: other-model -> ", 2),
    ("old diverged record", lambda ws: _finished(ws, general_ppl=float("nan")),
     "base__t__seed0: has a non-finite number", 2),
    ("corrupt importance file", lambda ws: _cached_stage(ws, "hlora", lambda cache: None),
     "hlora_importance.safetensors: unreadable cached general-stage state", 2),
    ("missing importance file",
     lambda ws: _cached_stage(ws, "hlora", lambda c: (c / "hlora_importance.safetensors").unlink()),
     "no HLoRA importance file", 2),
    ("truncated cached adapter",
     lambda ws: _cached_stage(ws, "lora-nu-mu", lambda c: _truncate(c / "adapter_model.safetensors")),
     "adapter_model.safetensors: unreadable adapter weights", 2),
    ("corrupt cached stage record",
     lambda ws: _cached_stage(ws, "lora-nu-mu", lambda c: (c / "stage.json").write_text("{")),
     "stage.json: unreadable cached stage record", 2),
    ("truncated cached domain stage",
     lambda ws: _cached_domain_stage(ws, lambda c: _truncate(c / "adapter_model.safetensors")),
     "adapter_model.safetensors: unreadable adapter weights", 2),
    ("corrupt cached domain stage record",
     lambda ws: _cached_domain_stage(ws, lambda c: (c / "stage.json").write_text("[]")),
     "stage.json: not a stage record", 2),
    # forgetless train
    ("train into a folder of the user's", lambda ws: (ws.file("README.md", "# My project") and ws.train())[:-3] +
     ["--output", str(ws.root), "--quiet"], "holds files of its own (README.md, ", 2),
    ("export --wise-ft nan", lambda ws: ["export", "--model", str(ws.model), "--adapter", ws.adapter(), "--wise-ft",
                                         "nan", "--theta-nu", ws.adapter(), "--output", str(ws.root / "x")],
     "argument --wise-ft: must be a finite number, got 'nan'", 2),
    ("train --block-size past the context", lambda ws: ws.train("--general", ws.general, "--block-size", "100000"),
     "--block-size: 100000 tokens is longer than the model's context (", 2),
    ("run general.block_size past the context",
     lambda ws: ["run", ws.experiment(general={"train": ws.general, "heldout": ws.general, "block_size": 100000})],
     "exp.yaml: general.block_size: 100000 tokens is longer than the model's context (", 2),
    ("train --max-length past the context",
     lambda ws: ws.train("--domain-kind", "text", "--domain", ws.file("d.jsonl", '{"text": "%s"}\n' % ("word " * 300)),
                         "--max-length", "200"),
     "--max-length: 200 tokens is longer than the model's context (", 2),
    ("train --max-length lets instructions past the context",
     lambda ws: ws.train("--domain-kind", "instructions", "--domain", ws.file(
         "i.jsonl", '{"instruction": "%s", "input": "", "output": "ok"}\n' % ("word " * 300)), "--max-length", "200"),
     "--max-length: 200 lets this task's training examples reach 200 tokens, longer than the model's context (", 2),
    ("run tasks.max_length past the context",
     lambda ws: ["run", ws.experiment(tasks=ws.task(train=ws.file("d.jsonl", '{"text": "%s"}\n' % ("word " * 300)),
                                                   train_kind="text", max_length=200))],
     "exp.yaml: tasks[0].max_length: 200 tokens is longer than the model's context (", 2),
    ("run a non-UTF-8 experiment file", lambda ws: ["run", ws.file("latin1.yaml", b"name: caf\xe9\n")],
     "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 9); save the file as UTF-8", 2),
    ("eval --block-size past the context",
     lambda ws: ["eval", "--model", str(ws.model), "--ppl", ws.general, "--block-size", "100000"],
     "eval: --block-size 100000 is longer than the model's context (", 2),
    ("train --method base", lambda ws: ws.train("--method", "base"), "method 'base' trains nothing", 2),
    ("train --method foo", lambda ws: ws.train("--method", "foo"), "--method: methods[0]: unknown method 'foo'", 2),
    ("train --method bad YAML", lambda ws: ws.train("--method", "[lora-mu"), "--method: invalid YAML", 2),
    ("train --lora-dropout 1", lambda ws: ws.train("--lora-dropout", "1"), "train: dropout must be in [0, 1)", 2),
    ("train --target-modules ''", lambda ws: ws.train("--target-modules", ""), "train: target_modules must be", 2),
    ("train --target-modules unknown", lambda ws: ws.train("--target-modules", "q_proj,nope"),
     "--lora-*/--target-modules: target_modules: 'nope' is not a module", 2),
    ("train --max-steps 0", lambda ws: ws.train("--max-steps", "0"), "argument --max-steps: must be >= 1, got 0", 2),
    ("train --max-steps -1", lambda ws: ws.train("--max-steps", "-1"), "argument --max-steps: must be >= 1", 2),
    ("train --epochs 0", lambda ws: ws.train("--epochs", "0"), "train: epochs must be > 0", 2),
    ("train --lr 0", lambda ws: ws.train("--lr", "0"), "train: lr must be > 0", 2),
    ("train --seed -1", lambda ws: ws.train("--seed", "-1"), "argument --seed: must be >= 0, got -1", 2),
    ("train --schema", lambda ws: ws.train("--schema", "sicq"), "train: schema must be one of", 2),
    ("train --precision", lambda ws: ws.train("--precision", "fp16"), "argument --precision: invalid choice", 2),
    ("train --test-limit -1", lambda ws: ws.train("--test-limit", "-1"), "argument --test-limit: must be >= 1", 2),
    ("train empty --domain", lambda ws: ws.train("--domain", ws.file("e.jsonl", "")),
     "--domain: " , 2),
    ("train non-UTF-8 --test", lambda ws: ws.train("--test", ws.file("t.jsonl", b"\xff")), "--test: ", 2),
    ("train general stage without --general", lambda ws: ws.train("--method", "lora-nu-mu"),
     "has a general stage: give the general text (--general)", 2),
    ("train domain-only EWC without --general", lambda ws: ws.train("--method", "lora-mu+ewc"),
     "train: method 'lora-mu+ewc': EWC reads the general text in the domain stage too (a replay mix, a Fisher): give "
     "it (--general)", 2),
    ("train replay without --general", lambda ws: ws.train("--method", "[lora-mu, replay]"),
     "train: method 'lora-mu+replay': Replay reads the general text", 2),
    ("train output under a file", lambda ws: ws.train("--output", ws.file("f", "") + "/x"), "is not writable", 2),
    # forgetless eval and landscape
    ("eval with nothing to evaluate", lambda ws: ["eval", "--model", str(ws.model)], "eval: nothing to evaluate", 2),
    ("eval missing adapter", lambda ws: ["eval", "--model", str(ws.model), "--adapter", str(ws.root / "nope"),
                                         "--ppl", ws.general], "nope: no such adapter folder", 2),
    ("eval adapter weights file for the folder", lambda ws: ["eval", "--model", str(ws.model), "--ppl", ws.general,
                                                             "--adapter", ws.adapter() + "/adapter_model.safetensors"],
     "adapter_model.safetensors: a file; give the adapter folder that holds it and adapter_config.json (", 2),
    ("eval adapter without config", lambda ws: ["eval", "--model", str(ws.model), "--ppl", ws.general, "--adapter",
                                                ws.adapter(lambda f: (f / "adapter_config.json").unlink())],
     "not an adapter folder (no adapter_config.json)", 2),
    ("eval truncated adapter", lambda ws: ["eval", "--model", str(ws.model), "--ppl", ws.general, "--adapter",
                                           ws.adapter(lambda f: _truncate(f / "adapter_model.safetensors"))],
     "adapter_model.safetensors: unreadable adapter weights", 2),
    ("eval adapter without weights", lambda ws: ["eval", "--model", str(ws.model), "--ppl", ws.general, "--adapter",
                                                 ws.adapter(lambda f: (f / "adapter_model.safetensors").unlink())],
     "no adapter weights (adapter_model.safetensors)", 2),
    ("eval unknown schema", lambda ws: ["eval", "--model", str(ws.model), "--task", "piqa:sicq"],
     "--task: unknown schema 'sicq'", 2),
    ("eval non-UTF-8 --ppl", lambda ws: ["eval", "--model", str(ws.model), "--ppl", ws.file("p.txt", b"\xe9")],
     "--ppl: ", 2),
    ("eval empty --task", lambda ws: ["eval", "--model", str(ws.model), "--task", ws.file("e.jsonl", "")],
     "e.jsonl: no multiple-choice items", 2),
    ("eval --chat-template true without a template", lambda ws: ["eval", "--model", str(ws.model), "--task", TASK,
                                                                 "--chat-template", "true"],
     "--chat-template: chat_template is true, but its tokenizer has no chat template", 2),
    ("landscape --chat-template true without a template",
     lambda ws: ["landscape", "--model", str(ws.model), "--params", "all", "--task", TASK, "--chat-template", "true"],
     "--chat-template: chat_template is true, but its tokenizer has no chat template", 2),
    ("eval --num-fewshot -1", lambda ws: ["eval", "--ppl", ws.general, "--num-fewshot", "-1"],
     "argument --num-fewshot: must be >= 0, got -1", 2),
    ("eval --num-fewshot not a number", lambda ws: ["eval", "--ppl", ws.general, "--num-fewshot", "two"],
     "argument --num-fewshot: expected an integer, got 'two'", 2),
    ("eval --batch-size 0", lambda ws: ["eval", "--ppl", ws.general, "--batch-size", "0"],
     "argument --batch-size: must be >= 1", 2),
    ("eval missing model", lambda ws: ["eval", "--model", str(ws.root / "m.gguf"), "--ppl", ws.general],
     "GGUF file not found", 2),
    ("landscape without data", lambda ws: ["landscape", "--model", str(ws.model), "--params", "all"],
     "landscape: give the evaluation data", 2),
    ("landscape trainable without adapter", lambda ws: ["landscape", "--model", str(ws.model), "--text", ws.general],
     "a model without --adapter has no trainable weights", 2),
    ("landscape --grid 2", lambda ws: ["landscape", "--text", ws.general, "--params", "all", "--grid", "2"],
     "a 2-D surface needs --grid >= 3", 2),
    ("landscape --dims 1 --grid 1", lambda ws: ["landscape", "--text", ws.general, "--params", "all", "--dims", "1",
                                                "--grid", "1"], "landscape: --grid: a 1-D curve needs --grid >= 2", 2),
    # forgetless report
    ("report on a missing folder", lambda ws: ["report", str(ws.root / "nope")], "no such results folder", 2),
    ("report on a corrupt record", lambda ws: _corrupt_record(ws, "report"), "base__t__seed0.json: corrupt run record",
     2),
    ("report on a record without a field", lambda ws: _record_without(ws, "report"),
     "base__t__seed0.json: not a run record (lacks the field 'tasks')", 2),
    ("report on a file", lambda ws: ["report", ws.file("exp.yaml", "name: x\n")],
     "no such results folder (this is a file: give the experiment's output folder)", 2),
    ("report with only diverged runs", lambda ws: _diverged_report(ws), "every run record has a non-finite score", 2),
    ("report --output a file", lambda ws: _diverged_report(ws)[:2] + ["--output", ws.file("r.md", "mine")],
     "r.md is a file, not a folder", 2),
    # the command line itself
    ("unknown command", lambda ws: ["trian"], "argument command: invalid choice: 'trian'", 2),
    ("unknown flag", lambda ws: ["run", "x.yaml", "--rerun"], "unrecognized arguments: --rerun", 2),
]


def test_a_model_whose_weights_are_cut_short_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A truncated model.safetensors (a local folder, or forgetless's cached copy of a GGUF) raised safetensors'
    own error, which is not an OSError: a traceback. The load is the check here, so it is not among the cases
    above (they must fail before any model loads)."""
    ws = Workspace(tmp_path, tiny_model_dir, monkeypatch)
    with ws.held:
        broken = _broken_model(ws)
        capsys.readouterr()
        assert main(["eval", "--model", broken, "--ppl", ws.general]) == 2
    err = capsys.readouterr().err
    assert err.startswith("forgetless: error: cannot load the model ") and "broken-model (SafetensorError: " in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_model_whose_config_does_not_fit_its_weights_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Another model's config.json beside the weights: transformers' RuntimeError ('size mismatch ...') was a
    traceback without the folder's name."""
    import json
    import shutil

    ws = Workspace(tmp_path, tiny_model_dir, monkeypatch)
    with ws.held:
        other = ws.root / "other-config"
        shutil.copytree(ws.model, other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps(config | {"hidden_size": 2 * config["hidden_size"]}))
        capsys.readouterr()
        assert main(["eval", "--model", str(other), "--ppl", ws.general]) == 2
    err = capsys.readouterr().err  # transformers' loading bar and its table of shapes come first
    assert err.strip().splitlines()[-1].startswith(f"forgetless: error: cannot load the model {other}: its weights "
                                                   f"have other shapes than its config.json says"), err
    assert "Traceback" not in err, err


@pytest.fixture
def no_model(monkeypatch):
    """The model loader fails the test: every check above must come before a model loads."""
    import forgetless.models
    import forgetless.pipeline

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(forgetless.models, "load_model", fail)
    monkeypatch.setattr(forgetless.pipeline, "load_model", fail)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_clear_line(case: Case, tmp_path, tiny_model_dir, no_model, monkeypatch, capsys):
    _, build, fragment, code = case
    ws = Workspace(tmp_path, tiny_model_dir, monkeypatch)
    with ws.held:
        argv = build(ws)
        capsys.readouterr()
        existed = ws.output.exists()
        assert main(argv) == code
    err = capsys.readouterr().err
    if not existed and ws.output.exists():  # a folder the command made stays only with something written in it
        assert [p for p in ws.output.rglob("*") if p.is_file() and p.name != ".forgetless.lock"], \
            "an error before anything was written left the output folder behind"
    assert err.startswith("forgetless: error: ") and "Traceback" not in err, err
    assert fragment in err, err
    assert not (ws.output / "runs").is_dir() or not [p for p in (ws.output / "runs").iterdir()
                                                     if p.name.endswith(".json") and "base__t__seed0" not in p.name]
    assert not (ws.output / "adapters").exists()


def test_debug_shows_the_traceback(tmp_path, no_model):
    from forgetless.config import ConfigError

    with pytest.raises(ConfigError, match="eval: nothing to evaluate"):
        main(["--debug", "eval"])
    with pytest.raises(ConfigError, match="seeds: expected a list"):
        main(["run", Workspace(tmp_path, tmp_path).experiment(seeds="x"), "--debug"])


@pytest.mark.parametrize("model, said", [
    (lambda ws: ws.file("bad.gguf", b"not a gguf at all"), "bad.gguf as a GGUF model"),
    (lambda ws: str(_config_only(ws)), "cannot load the model "),
])
def test_a_model_that_fails_to_load_is_one_line_too(tmp_path, capsys, model, said):
    """Found only when loading (not a GGUF, a folder without weights): one line and exit code 2, not a traceback."""
    ws = Workspace(tmp_path, tmp_path / "tiny")
    from tests.unit.tiny_model import make_tiny_model
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    make_tiny_model(vocab_size=len(make_tiny_tokenizer())).save_pretrained(ws.model)
    capsys.readouterr()
    rc = main(["eval", "--model", model(ws), "--ppl", ws.general, "--precision", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
