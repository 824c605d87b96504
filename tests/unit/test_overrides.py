"""``forgetless run exp.yaml KEY.PATH=VALUE ...``: command-line overrides of the YAML, checked as the file is, and
``--dry-run``: the plan without a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forgetless.cli import main
from forgetless.config import ConfigError, load_experiment

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
TASK = str(FIXTURES / "generic.jsonl")


def _experiment(tmp_path: Path, **over) -> Path:
    general = tmp_path / "general.jsonl"
    general.write_text("".join(f'{{"text": "Plants make sugar from light, sentence {i}."}}\n' for i in range(20)))
    exp = {"name": "tiny", "model": "no-model", "output": str(tmp_path / "out"), "seeds": [0],
           "general": {"train": str(general), "heldout": str(general), "block_size": 16},
           "tasks": [{"name": "t", "train": TASK, "test": TASK}], "methods": ["base", "lora-mu", "lora-nu-mu"],
           "train": {"general": {"max_steps": 2}, "domain": {"epochs": 2, "batch_size": 2}}} | over
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_overrides_replace_values_as_yaml(tmp_path):
    path = _experiment(tmp_path)
    exp = load_experiment(path, overrides=["train.domain.lr=1e-4", "seeds=[0,1]", "tasks[0].train_limit=3",
                                           "eval.batch_size=4", "lora.target_modules=[q_proj]", "train.general={}"])
    assert exp.train.domain.lr == 1e-4 and exp.train.domain.epochs == 2  # the rest of the section is kept
    assert exp.seeds == [0, 1]
    assert exp.tasks[0].train_limit == 3
    assert exp.eval.batch_size == 4  # a section the file does not have
    assert exp.lora.target_modules == ["q_proj"]
    assert exp.train.general.max_steps is None  # a whole section replaced
    assert load_experiment(path).seeds == [0]  # the file is not changed


def test_an_override_reaches_inside_a_text_source_given_as_a_bare_string(tmp_path):
    """`train: data/c4.jsonl` is the short form of {source: data/c4.jsonl}; general.train.limit=5 on it failed with
    "expected a mapping, got a string"."""
    path = _experiment(tmp_path)
    exp = load_experiment(path, overrides=["general.train.limit=5", "general.heldout.max_blocks=2"])
    assert exp.general.train.limit == 5 and exp.general.train.source == str(tmp_path / "general.jsonl")
    assert exp.general.heldout.max_blocks == 2 and exp.general.heldout.source == exp.general.train.source
    with pytest.raises(ConfigError, match="expected a mapping, got"):  # elsewhere a string is still no mapping
        load_experiment(path, overrides=["model.revision=main"])


def test_an_override_changes_one_use_of_a_yaml_anchor(tmp_path):
    """PyYAML gives every *alias of an anchor the same object: an override of one place changed every place using
    the anchor (methods[0].rho=1.0 moved SAM's rho in [replay, *sam] too, as examples/sam_shared.yaml writes them).
    An override of an x- key (anchors only) is an error saying to override the keys that use it; landscape=false is
    off (a bare 'landscape:' is on)."""
    general = tmp_path / "general.jsonl"
    general.write_text("".join(f'{{"text": "Plants make sugar from light, sentence {i}."}}\n' for i in range(20)))
    path = tmp_path / "exp.yaml"
    path.write_text(f"""
x-stage: &stage {{max_steps: 2, batch_size: 2}}
x-sam: &sam {{name: sam, rho: 0.05}}
name: tiny
model: no-model
output: {tmp_path / "out"}
general: {{train: {general}, heldout: {general}, block_size: 16}}
tasks: [{{name: t, train: {TASK}, test: {TASK}}}]
methods: [*sam, [replay, *sam]]
train: {{general: *stage, domain: *stage}}
landscape: {{grid: 3}}
""")
    exp = load_experiment(path, overrides=["methods[0].rho=1.0", "train.domain.max_steps=7", "landscape=false"])
    assert exp.methods == [{"name": "sam", "rho": 1.0}, ["replay", {"name": "sam", "rho": 0.05}]]
    assert (exp.train.general.max_steps, exp.train.domain.max_steps) == (2, 7)
    assert exp.landscape is None and load_experiment(path).landscape.grid == 3
    with pytest.raises(ConfigError, match=r"override 'x-stage.max_steps=5': x-stage holds YAML anchors, read when "
                                          r"the file is parsed; override the keys that use them"):
        load_experiment(path, overrides=["x-stage.max_steps=5"])


@pytest.mark.parametrize(("override", "message"), [
    ("train.domian.lr=1e-4", "exp.yaml: train: unknown key 'domian'; known: ['domain', 'general']"),
    ("train.domain.learning_rate=1", "exp.yaml: train.domain: unknown key 'learning_rate'"),
    ("trian.domain.lr=1", "exp.yaml: unknown key 'trian'"),
    ("train.domain.lr=-1", "exp.yaml: train.domain: lr must be > 0 and finite, got -1"),
    ("seeds=3", "exp.yaml: seeds: expected a list, got an integer 3"),
    ("tasks[1].train_limit=3", "exp.yaml: tasks: override 'tasks[1].train_limit=3': no item [1]"),
    ("name.x=1", "exp.yaml: name: override 'name.x=1': expected a mapping, got a string 'tiny'"),
    ("seeds", "override 'seeds': expected KEY.PATH=VALUE"),
    ("train..lr=1", "override 'train..lr=1': expected KEY.PATH=VALUE"),
    ("seeds=[0,", "override 'seeds=[0,': invalid YAML value"),
])
def test_a_bad_override_is_the_files_error_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=None) as info:
        load_experiment(_experiment(tmp_path), overrides=[override])
    assert message in str(info.value)


@pytest.mark.parametrize("override", ["train.domian.lr=1e-4", "train.domain.learning_rate=1", "trian.domain.lr=1",
                                      "train.domain.lr=-1", "seeds=3"])
def test_an_error_in_an_override_says_it_came_from_the_command_line(override, tmp_path):
    """``exp.yaml: train.domain: unknown key 'lrr'`` sent the user searching the file for a typo made on the command
    line; the error now names the override. An error of the file's own is not attributed to an override."""
    with pytest.raises(ConfigError) as info:
        load_experiment(_experiment(tmp_path), overrides=["train.general.lr=1e-3", override])
    assert str(info.value).endswith(f" (set on the command line: {override!r})")
    with pytest.raises(ConfigError) as info:
        load_experiment(_experiment(tmp_path, seeds=3), overrides=["train.domain.lr=1e-3"])
    assert "command line" not in str(info.value)


def test_run_takes_overrides_and_errors_are_one_line(tmp_path, capsys):
    path = _experiment(tmp_path)
    assert main(["run", str(path), "train.domain.batch_size=0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("forgetless: error: ") and "train.domain: batch_size and grad_accum must be >= 1" in err
    # after the flags too (argparse alone ends the list at the first flag), in the order given
    assert main(["run", str(path), "--dry-run", "train.domain.batch_size=2", "train.domain.batch_size=0"]) == 2
    assert "batch_size and grad_accum must be >= 1" in capsys.readouterr().err
    assert main(["run", str(path), "--dry-run", "stray"]) == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_dry_run_prints_the_plan_without_a_model(tmp_path, capsys, monkeypatch):
    import forgetless.models
    import forgetless.pipeline

    def fail(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(forgetless.models, "load_model", fail)
    monkeypatch.setattr(forgetless.pipeline, "load_model", fail)
    path = _experiment(tmp_path)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "base__t__seed0.json").write_text(  # finished, recorded without settings: reused
        '{"method": "base", "task": "t", "seed": 0, "general_ppl": 9.5, "tasks": {"t": {"acc": 0.5}}}')
    # an interrupted run leaves a checkpoint: the plan says where it resumes (a half-written one does not count)
    (out / "checkpoints" / "lora-nu-mu__t__seed1" / "domain" / "step-000040").mkdir(parents=True)
    (out / "checkpoints" / "lora-nu-mu__t__seed1" / "domain" / "step-000040" / "state.pt").write_bytes(b"")
    (out / "checkpoints" / "lora-nu-mu__t__seed1" / "domain" / "step-000050.tmp").mkdir()
    assert main(["run", str(path), "seeds=[0,1]", "--dry-run"]) == 0
    text = capsys.readouterr().out
    items = 3  # the items of tests/fixtures/data/generic.jsonl
    assert "experiment tiny: 6 runs, 1 already done" in text
    assert "  done     base__t__seed0" in text and "  to do    base__t__seed1" in text
    assert "  to do    lora-nu-mu__t__seed0\n" in text
    assert "  to do    lora-nu-mu__t__seed1 (resumes at the domain stage's step 40)\n" in text
    assert "run time to do" not in text  # no finished run with its time to go by
    general = [line for line in text.splitlines() if line.startswith("general stage ")]
    assert len(general) == 2 and all("to train, used by lora-nu-mu__t__seed" in line for line in general)
    assert "general: 2 (max_steps)" in text
    per_epoch = -(-items // 2)
    assert f"domain t: {2 * per_epoch} (2 epoch(s) of {items} examples)" in text
    assert not (out / "stages").exists() and not (out / ".forgetless.lock").exists()  # nothing run, nothing locked


def test_dry_run_steps_of_text_tasks_and_replay(tmp_path, capsys, monkeypatch):
    """Documents are packed into max_length blocks (not one example each: 6 documents said 3 steps, the run took 17),
    and replay's general examples lengthen the domain stage (34 steps at fraction 0.5)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(f'{{"text": "Document {i} about cells and light."}}\n' for i in range(6)))
    path = _experiment(tmp_path, tasks=[{"name": "t", "train": TASK, "test": TASK},
                                        {"name": "doc", "train": str(docs), "train_kind": "text", "test": TASK}],
                       methods=["lora-mu", {"name": "replay", "fraction": 0.5, "by": "examples"},
                                {"name": "replay", "fraction": 0.25}])
    assert main(["run", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    items = 3  # the items of tests/fixtures/data/generic.jsonl, and as many general ones at fraction 0.5
    assert f"  domain t: {2 * -(-items // 2)} (2 epoch(s) of {items} examples)\n" in text
    assert f"    replay(by=examples,fraction=0.5): {2 * -(-2 * items // 2)} (2 epoch(s) of {2 * items} examples " \
           f"with the replayed)\n" in text
    assert "    replay(fraction=0.25): more steps: replayed general text makes 0.25 of the labelled tokens (counted " \
           "once tokenized)\n" in text
    assert "  domain doc: 2 epoch(s) of the packed blocks (counted once tokenized)\n" in text


def test_train_flag_report_to(tmp_path):
    from forgetless.cli import _train_experiment, build_parser

    args = build_parser().parse_args(["train", "--domain", TASK, "--output", str(tmp_path / "a"),
                                      "--report-to", "tensorboard"])
    stage = _train_experiment(args).train.domain
    assert stage.report_to == ["tensorboard"] and stage.logging_dir == str(tmp_path / "a" / "logs")


def test_dry_run_estimates_the_time_left_from_the_finished_runs(tmp_path, capsys):
    import json

    path = _experiment(tmp_path)
    runs = tmp_path / "out" / "runs"
    runs.mkdir(parents=True)

    def record(method, seed, **more):  # a finished run's record, the fields that every record has and the times
        return json.dumps({"method": method, "task": "t", "seed": seed, "general_ppl": 9.5, "tasks": {}, **more})

    for seed, seconds in ((0, 3000.0), (2, 4200.0)):  # lora-mu took 3600 s on average
        (runs / f"lora-mu__t__seed{seed}.json").write_text(record("lora-mu", seed, seconds=seconds))
    assert main(["run", str(path), "seeds=[0,1,2,3]", "--dry-run"]) == 0
    text = capsys.readouterr().out
    # lora-mu seeds 1 and 3: 2 h; base and lora-nu-mu (8 runs) have no time yet
    assert "about 2.0 h for 2 run(s), and 8 run(s) of methods not run yet" in text
    # an interrupted run is credited with the steps its checkpoint holds: lora-nu-mu took 3600 s, 1000 of them in 10
    # general steps and 2000 in 10 domain steps; resuming at domain step 5 leaves 3600 - 1000 - 5 * 200 = 1600 s
    stages = [{"stage": "general", "steps": 10, "seconds": 1000.0}, {"stage": "domain", "steps": 10, "seconds": 2000.0}]
    (runs / "lora-nu-mu__t__seed0.json").write_text(record("lora-nu-mu", 0, seconds=3600.0, stages=stages))
    step = tmp_path / "out" / "checkpoints" / "lora-nu-mu__t__seed1" / "domain" / "step-000005"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")
    assert main(["run", str(path), "seeds=[0,1]", "methods=[lora-nu-mu]", "--dry-run"]) == 0
    assert "about 27 min for 1 run(s) (with --jobs N" in capsys.readouterr().out  # 1600 s


def test_dry_run_names_the_landscape_step_once_runs_are_recorded(tmp_path, capsys):
    import json

    path = _experiment(tmp_path)
    with_landscape = {"landscape": "{grid: 3}", "seeds": "[0]", "methods": "[lora-mu]"}
    overrides = [f"{k}={v}" for k, v in with_landscape.items()]
    assert main(["run", str(path), *overrides, "--dry-run"]) == 0
    assert "landscape step" not in capsys.readouterr().out  # nothing recorded: nothing to measure yet
    runs = tmp_path / "out" / "runs"
    runs.mkdir(parents=True)
    (runs / "lora-mu__t__seed0.json").write_text(json.dumps({"method": "lora-mu", "task": "t", "seed": 0,
                                                             "general_ppl": 9.5, "tasks": {}, "seconds": 60.0}))
    adapter = tmp_path / "out" / "adapters" / "lora-mu__t__seed0"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")  # trained weights: its LoRA directions are to measure
    assert main(["run", str(path), *overrides, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert ("flatness of the recorded runs (the runs to do are measured as each finishes, in the time above): 0/1 "
            "runs' flatness measured; the time left is estimated once a measurement of each kind has finished") in text


def test_the_time_left_counts_the_flatness_measured_after_each_run(tmp_path, tiny_model_dir, capsys):
    """Each run's flatness is measured right after it, so a run still to do is estimated at its method's mean time
    plus the mean time of a measurement (here 600 s + 1200 s)."""
    import json

    from tests.unit.test_experiment import write_experiment

    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 1, "trace_samples": 1, "ascent_steps": 1,
                 "all_weights_seeds": [0]}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[1], landscape=landscape)
    assert main(["run", str(path), "--quiet"]) == 0
    record_path = tmp_path / "out" / "runs" / "lora-mu__gen__seed1.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(record | {"seconds": 600.0, "landscape": record["landscape"] | {"seconds": 1200.0}}))
    capsys.readouterr()
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[1, 2], landscape=landscape)
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "about 30 min for 1 run(s)" in capsys.readouterr().out  # 600 + 1200 s


def test_the_dry_run_counts_an_epochs_short_last_step():
    """run --dry-run counted ceil(n / b) // grad_accum steps an epoch, dropping the short last window the loop
    trains: 10 examples in batches of 4 with grad_accum 2 are 2 steps an epoch (micro-batches 2 + 1), not 1."""
    from forgetless.cli import _steps
    from forgetless.training.config import TrainConfig

    assert _steps(TrainConfig(batch_size=4, grad_accum=2), 10, "examples").startswith("2 ")
    assert _steps(TrainConfig(batch_size=8, grad_accum=3, epochs=2.0), 100, "examples").startswith("10 ")
    assert _steps(TrainConfig(batch_size=4), 10, "examples").startswith("3 ")
