"""A domain stage that no method of the run shapes is cached (``output/stages/domain-KEY``) and taken from there by
the next run with the same key: ``wise-ft`` trains ``lora-nu-mu``'s domain stage bit for bit, so an experiment with
both trains it once."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from forgetless.experiment import (domain_stage_name, general_stage_name, job_groups, load_experiment, plan_runs,
                                   run_experiment, shared_domain_stage)
from forgetless.methods import DOMAIN, resolve
from tests.unit.test_experiment import FIXTURES, write_experiment

EVAL = {"batch_size": 4, "every": 1, "every_items": 2, "every_blocks": 1}


@pytest.fixture
def domain_stages(monkeypatch):
    """The domain stages trained (by their method labels' order of training)."""
    import forgetless.pipeline as pipeline

    trained = []
    real = pipeline.train_stage

    def counted(model, examples, cfg, plugins, stage, **kw):
        if stage == DOMAIN:
            trained.append([type(p).__name__ for p in plugins])
        return real(model, examples, cfg, plugins, stage=stage, **kw)

    monkeypatch.setattr(pipeline, "train_stage", counted)
    return trained


def _records(out: Path) -> dict[str, dict]:
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    return {record["method"]: record for record in records}


def test_wise_ft_takes_lora_nu_mus_domain_stage_from_the_cache(tmp_path, tiny_model_dir, domain_stages):
    """One domain stage trained for the two runs; wise-ft's record is lora-nu-mu's model scored (the same scores and
    eval.every rows, its stage marked cached) with its interpolations, and they equal those of a wise-ft run that
    trained its own domain stage (theta_nu is found on the cached path too)."""
    from forgetless.landscape_runs import adapter_sha256

    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-nu-mu", "wise-ft"], seeds=[0], eval=EVAL)
    run_experiment(load_experiment(path), progress=False)
    assert len(domain_stages) == 1
    out = tmp_path / "out"
    recs = _records(out)
    lora, wise = recs["lora-nu-mu"], recs["wise-ft"]
    assert wise["domain_stage"] == lora["domain_stage"] and (out / wise["domain_stage"]).is_dir()
    assert "cached" not in lora["stages"][-1] and wise["stages"][-1]["cached"] is True
    assert wise["stages"][-1]["extras"]["eval_history"] == lora["stages"][-1]["extras"]["eval_history"]
    assert wise["general_ppl"] == lora["general_ppl"] and wise["tasks"] == lora["tasks"]
    assert adapter_sha256(out / "adapters" / wise["run_id"]) == adapter_sha256(out / "adapters" / lora["run_id"])
    assert len(wise["variants"]) == 3

    alone = tmp_path / "alone"
    alone.mkdir()
    path = write_experiment(alone, tiny_model_dir, methods=["wise-ft"], seeds=[0], eval=EVAL)
    run_experiment(load_experiment(path), progress=False)
    assert len(domain_stages) == 2  # its own, trained
    trained = _records(alone / "out")["wise-ft"]
    assert "cached" not in trained["stages"][-1]
    assert trained["variants"] == wise["variants"] and trained["general_ppl"] == wise["general_ppl"]
    assert trained["tasks"] == wise["tasks"]
    assert trained["stages"][-1]["extras"]["eval_history"] == wise["stages"][-1]["extras"]["eval_history"]
    assert adapter_sha256(alone / "out" / "adapters" / trained["run_id"]) == adapter_sha256(
        out / "adapters" / wise["run_id"])


def test_without_a_general_stage_theta_nu_is_the_domain_start_on_the_cached_path(tmp_path, tiny_model_dir,
                                                                                   domain_stages):
    """[lora-mu, wise-ft] (no general stage: theta_nu is the LoRA at the domain stage's start) takes lora-mu's
    domain stage from the cache, and its interpolations equal those of the same run trained without a cache. In
    factor space, so that A_nu counts (in weight space B_nu = 0 hides it)."""
    wise = {"name": "wise-ft", "space": "factors"}
    methods = ["lora-mu", ["lora-mu", wise]]
    path = write_experiment(tmp_path, tiny_model_dir, methods=methods, seeds=[0], eval={"batch_size": 4})
    run_experiment(load_experiment(path), progress=False)
    assert len(domain_stages) == 1
    label = "lora-mu+wise-ft(space=factors)"
    cached = _records(tmp_path / "out")[label]
    assert cached["stages"][-1]["cached"] is True
    alone = tmp_path / "alone"
    alone.mkdir()
    path = write_experiment(alone, tiny_model_dir, methods=[["lora-mu", wise]], seeds=[0], eval={"batch_size": 4})
    run_experiment(load_experiment(path), progress=False)
    trained = _records(alone / "out")[label]
    assert "cached" not in trained["stages"][-1] and trained["variants"] == cached["variants"]


def test_which_runs_share_a_domain_stage(tmp_path, tiny_model_dir):
    """The same key for recipes that train the domain stage alike (wise-ft's options do not enter it); another for
    another stage list, LoRA, seed or training setting; none for methods that shape the stage or with eval.select."""
    methods = ["base", "lora-mu", "lora-nu-mu", "wise-ft", {"wise-ft": {"alphas": [0.5]}}, "rslora", "ewc", "hlora",
               "sam", "replay", ["hlora", "wise-ft"]]
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=methods, seeds=[0, 1]))
    task = exp.tasks[0]
    key = {}
    for seed in (0, 1):
        for entry in methods:
            recipe = resolve(entry)
            key[recipe.label, seed] = domain_stage_name(exp, recipe, task, seed)
    assert key["base", 0] is None
    for shaped in ("ewc", "hlora", "sam", "replay", "hlora+wise-ft"):
        assert key[shaped, 0] is None, shaped
    assert key["lora-nu-mu", 0] == key["wise-ft", 0] == key["wise-ft(alphas=[0.5])", 0]
    assert key["wise-ft", 0].startswith("domain-")
    assert len({key["lora-mu", 0], key["lora-nu-mu", 0], key["rslora", 0], key["lora-nu-mu", 1]}) == 4
    other = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=methods, seeds=[0],
                                             train={"general": {"max_steps": 2, "batch_size": 4},
                                                    "domain": {"max_steps": 3, "batch_size": 2}}))
    assert domain_stage_name(other, resolve("wise-ft"), task, 0) != key["wise-ft", 0]
    tasks = [{"name": "gen", "train": str(FIXTURES / "generic.jsonl"), "test": str(FIXTURES / "generic.jsonl")},
             {"name": "sci", "train": str(FIXTURES / "sciq.jsonl"), "test": str(FIXTURES / "sciq.jsonl")}]
    every = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=methods, seeds=[0], tasks=tasks,
                                             eval=EVAL))
    select = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=methods, seeds=[0], tasks=tasks,
                                              eval=EVAL | {"select": {"max_general_drop": 0.1}}))
    assert domain_stage_name(every, resolve("wise-ft"), every.tasks[0], 0) not in (None, key["wise-ft", 0])
    assert domain_stage_name(select, resolve("wise-ft"), select.tasks[0], 0) is None
    # another task's test items: with eval.every the stage keeps the suite scores it took on them while training
    # (a redone run took the old items' curve from the cache), without it the stage is the same
    fewer = [tasks[0], dict(tasks[1], test_limit=3)]
    for evaluation, same in ((EVAL, False), ({k: v for k, v in EVAL.items() if not k.startswith("every")}, True)):
        names = [domain_stage_name(e, resolve("wise-ft"), e.tasks[0], 0) for e in (
            load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=methods, seeds=[0], tasks=listed,
                                             eval=evaluation)) for listed in (tasks, fewer))]
        assert (names[0] == names[1]) is same and None not in names, (evaluation, names)


def test_runs_sharing_an_uncached_domain_stage_stay_in_one_worker(tmp_path, tiny_model_dir):
    """With the general stage cached, lora-nu-mu and wise-ft are still one group (one worker trains the domain stage
    and the other takes it); once the domain stage is cached too, each run is a group of its own."""
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["lora-nu-mu", "wise-ft", "ewc"],
                                           seeds=[0]))
    jobs = plan_runs(exp)
    label = lambda groups: sorted(sorted(j.recipe.label for j in g) for g in groups)  # noqa: E731
    assert label(job_groups(exp, jobs)) == [["ewc", "lora-nu-mu", "wise-ft"]]  # one general stage (ewc's shape none)
    assert shared_domain_stage(exp, jobs[0].recipe, jobs[0].task, 0) == domain_stage_name(exp, jobs[1].recipe,
                                                                                          jobs[1].task, 0)
    alone = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["lora-nu-mu", "ewc"], seeds=[0]))
    assert domain_stage_name(alone, jobs[0].recipe, jobs[0].task, 0) is not None  # could be cached, but no other
    assert shared_domain_stage(alone, jobs[0].recipe, jobs[0].task, 0) is None  # run would take it: it is not
    for job in jobs:
        stage = exp.output / "stages" / general_stage_name(exp, job.recipe, job.seed)
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "adapter_model.safetensors").write_bytes(b"")
    assert label(job_groups(exp, jobs)) == [["ewc"], ["lora-nu-mu", "wise-ft"]]
    domain = exp.output / "stages" / domain_stage_name(exp, jobs[0].recipe, jobs[0].task, 0)
    domain.mkdir(parents=True)
    (domain / "adapter_model.safetensors").write_bytes(b"")
    assert label(job_groups(exp, jobs)) == [["ewc"], ["lora-nu-mu"], ["wise-ft"]]


def test_the_dry_run_lists_the_shared_domain_stage(tmp_path, tiny_model_dir, capsys):
    from forgetless.cli import main

    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu", "lora-nu-mu", "wise-ft"], seeds=[0])
    assert main(["run", str(path), "--dry-run"]) == 0
    exp = load_experiment(path)
    name = domain_stage_name(exp, resolve("wise-ft"), exp.tasks[0], 0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("domain stage ")]
    assert lines == [f"domain stage {name}: to train, used by lora-nu-mu__gen__seed0, wise-ft__gen__seed0"]


def test_a_run_that_trained_the_stage_and_was_stopped_goes_on_from_its_own_checkpoint(tmp_path, tiny_model_dir,
                                                                                        monkeypatch):
    """The stage is cached as soon as it is trained, before the run is evaluated and recorded: a run stopped then
    keeps its domain checkpoints, and on resume trains on from them (its record keeps its own time) rather than
    taking the stage from the cache as another run would."""
    import forgetless.experiment as experiment

    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["lora-nu-mu", "wise-ft"], seeds=[0]))
    job = plan_runs(exp)[0]
    given = []
    monkeypatch.setattr(experiment, "run_recipe", lambda *a, **k: given.append(k["domain_cache"]) or 1 / 0)
    checkpoints = tmp_path / "checkpoints"
    data = SimpleNamespace(tasks={job.task.name: ([], None)}, suite={}, general=None, heldout=None)
    for step in (None, "step-000002.tmp", "step-000002"):  # none, a half-written one, a checkpoint
        if step is not None:
            (checkpoints / DOMAIN / step).mkdir(parents=True)
        with pytest.raises(ZeroDivisionError):
            experiment.run_one(exp, job.entry, job.task, 0, data, adapter_dir=None, stages_dir=tmp_path / "stages",
                               checkpoint_dir=checkpoints)
    name = domain_stage_name(exp, job.recipe, job.task, 0)
    assert [None if f is None else f().name for f in given] == [name, name, None]
