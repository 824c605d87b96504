"""End-to-end experiment runs on a tiny random model saved to a folder: runs, tables, resumption."""

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from forgetless.data import DataError
from forgetless.config import ConfigError, load_experiment
from forgetless.experiment import computed_elsewhere, plan_runs, run_experiment
from forgetless.methods import method_label, resolve
from forgetless.reporting.tables import summary_table
from tests.unit.tiny_model import make_tiny_model
from tests.unit.tiny_tokenizer import make_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture()
def tiny_model_dir(tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_model(vocab_size=len(tok))
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_experiment(tmp_path, model_dir, **over):
    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": f"Plants make sugar from light, sentence {i}."}) + "\n"
                            for i in range(40)))
    exp = {
        "name": "tiny", "model": str(model_dir), "output": str(tmp_path / "out"), "seeds": [0, 1],
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "general": {"train": {"source": str(text)}, "heldout": {"source": str(text), "limit": 10}, "block_size": 16},
        "tasks": [{"name": "gen", "train": str(FIXTURES / "generic.jsonl"), "test": str(FIXTURES / "generic.jsonl")}],
        "methods": ["base", "lora-mu", "lora-nu-mu"],
        "train": {"general": {"max_steps": 2, "batch_size": 4}, "domain": {"max_steps": 2, "batch_size": 2}},
        "eval": {"batch_size": 4},
    } | over
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_experiment_runs_writes_tables_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir))
    results = run_experiment(exp, progress=False)
    assert len(results) == 6  # 3 methods x 1 task x 2 seeds
    out = tmp_path / "out"
    assert len(list((out / "runs").glob("*.json"))) == 6
    assert (out / "adapters" / "lora-mu__gen__seed0" / "adapter_model.safetensors").is_file()
    md = (out / "results.md").read_text()
    assert "| lora-nu-mu |" in md and "gen acc ↑" in md
    for figure in ("tradeoff.png", "training_curves.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base = [r for r in results if r["method"] == "base"]
    assert base[0]["general_ppl"] == pytest.approx(base[1]["general_ppl"])  # untrained: seed-independent
    nu_mu = [r for r in results if r["method"] == "lora-nu-mu"]
    assert [s["stage"] for s in nu_mu[0]["stages"]] == ["general", "domain"]
    # the general stage is cached per seed and reused by later runs with the same general stage
    assert len(list((out / "stages").iterdir())) == 2

    import forgetless.experiment as experiment

    def boom(*a, **k):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(experiment, "run_recipe", boom)
    again = run_experiment(exp, progress=False)
    assert len(again) == 6


def test_domain_only_methods_share_the_plain_general_stage_and_get_the_same_numbers(tmp_path, tiny_model_dir):
    """sam (domain stage only), replay and wise-ft leave the general stage as lora-nu-mu trains it: one cached stage
    serves them all, and each run's scores equal those of the same run alone, training its own general stage."""
    from forgetless.experiment import general_stage_key
    from forgetless.methods import resolve

    methods = ["lora-nu-mu", "sam", "replay", {"name": "wise-ft", "alphas": [0.5]},
               {"name": "ewc", "samples": 6}, {"name": "ewc", "samples": 6, "estimator": "empirical"},
               {"name": "sam", "stages": ["general", "domain"]}]
    shared = tmp_path / "shared"
    shared.mkdir()
    exp = load_experiment(write_experiment(shared, tiny_model_dir, methods=methods, seeds=[0]))
    keys = [general_stage_key(exp, resolve(m), 0) for m in exp.methods]
    assert len(set(keys[:6])) == 1 and keys[6] != keys[0]  # SAM on the general stage trains its own
    results = {r["run_id"]: r for r in run_experiment(exp, progress=False)}
    stages = sorted(path.name.split("-")[0] for path in (shared / "out" / "stages").iterdir())
    assert stages == ["domain", "general", "general"]  # wise-ft's domain stage is lora-nu-mu's (test_domain_cache)
    # the adapter records the theta_nu its domain stage started from: export --wise-ft takes that run's general
    # stage and refuses the other one (SAM's), which it would otherwise blend in silently
    from forgetless.export import export_wise_ft
    from forgetless.models import AdapterError

    wise = next(r for r in results.values() if r["method"].startswith("wise-ft"))
    md = (shared / "out" / "results.md").read_text()  # its own row is alpha 1, said beside the table
    assert f"`{wise['method']}`: the row of the method itself is its run's domain-tuned model (alpha = 1" in md
    (adapter,) = (shared / "out" / "adapters").glob("wise-ft*")
    assert "domain_start" in json.loads((adapter / "forgetless_base.json").read_text())
    own = shared / "out" / wise["general_stage"]
    other = next(p for p in (shared / "out" / "stages").iterdir() if p.name.startswith("general") and p != own)
    assert export_wise_ft(str(tiny_model_dir), adapter, own, 0.5, tmp_path / "wise").is_dir()
    with pytest.raises(AdapterError, match="not the theta_nu that .* domain stage started from"):
        export_wise_ft(str(tiny_model_dir), adapter, other, 0.5, tmp_path / "wise2")
    assert not (tmp_path / "wise2").exists()
    for entry in methods[1:6]:  # trained alone, in a fresh folder: the general stage is its own, the numbers equal
        alone = tmp_path / f"alone-{len(list(tmp_path.iterdir()))}"
        alone.mkdir()
        (record,) = run_experiment(load_experiment(write_experiment(alone, tiny_model_dir, methods=[entry],
                                                                    seeds=[0])), progress=False)
        same = results[record["run_id"]]
        assert not record["stages"][0].get("cached") and same["stages"][0].get("cached"), entry
        assert record["general_ppl"] == same["general_ppl"] and record["tasks"] == same["tasks"], entry
        assert record.get("variants") == same.get("variants"), entry  # wise-ft: the interpolations too
        if (entry["name"] if isinstance(entry, dict) else entry) == "ewc":  # the Fisher: at the stage's end alone,
            penalty = [[row["ewc_penalty"] for row in r["stages"][-1]["history"]] for r in (record, same)]
            assert penalty[0] == penalty[1] and penalty[0][-1] > 0, entry  # at the domain start when shared


def test_method_entry_restricted_to_some_tasks(tmp_path, tiny_model_dir):
    tasks = [{"name": n, "train": str(FIXTURES / "generic.jsonl"), "test": str(FIXTURES / "generic.jsonl")}
             for n in ("a", "b")]
    path = write_experiment(tmp_path, tiny_model_dir, tasks=tasks, seeds=[0],
                            methods=["base", {"name": "lora-mu", "tasks": ["b"]}])
    exp = load_experiment(path)
    assert exp.methods == ["base", {"name": "lora-mu"}] and exp.method_tasks == [None, ["b"]]
    results = run_experiment(exp, progress=False)
    assert sorted(r["run_id"] for r in results) == ["base__a__seed0", "base__b__seed0", "lora-mu__b__seed0"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| lora-mu | - | - | - |" in md  # no run on task a: an empty cell, not an error
    path = write_experiment(tmp_path, tiny_model_dir, tasks=tasks, methods=[{"name": "lora-mu", "tasks": ["c"]}])
    with pytest.raises(ConfigError, match=r"exp\.yaml: methods\[0\]: 'tasks' must list task names"):
        load_experiment(path)


def test_summary_table_mean_and_std():
    results = [{"method": "m", "task": "t", "seed": s, "general_ppl": p, "tasks": {"t": {"acc": a, "acc_norm": a}}}
               for s, p, a in ((0, 10.0, 0.5), (1, 12.0, 0.7))]
    header, rows = summary_table(results)
    assert header[1:4] == ["t general PPL ↓", "t acc ↑", "t acc_norm ↑"]
    assert rows[0][1] == "11.000 ± 1.414"  # stdev of (10, 12) = sqrt(2)
    assert rows[0][2] == "60.0 ± 14.1"
    assert rows[0][-1] == "2"


def test_method_entries_compose():
    assert method_label(["lora-nu-mu", {"name": "lora-mu"}]) == "lora-nu-mu+lora-mu"
    with pytest.raises(ValueError, match="disagree"):
        resolve(["lora-nu-mu", "lora-mu"])
    assert resolve("base").stages == ()
    assert resolve({"lora-mu": None}).stages == ("domain",)
    with pytest.raises(ValueError, match="takes no options"):
        resolve({"name": "base", "phi": 1})


def test_instruction_training_data(tmp_path, tiny_model_dir):
    # max_length within the tiny model's 128 positions (the default 256 lets the longest rows run past them)
    tasks = [{"name": "gen", "train": str(FIXTURES / "alpaca.jsonl"), "train_kind": "instructions",
              "test": str(FIXTURES / "generic.jsonl"), "max_length": 128}]
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, tasks=tasks, methods=["lora-mu"], seeds=[0]))
    (result,) = run_experiment(exp, progress=False)
    assert result["stages"][0]["stage"] == "domain" and result["stages"][0]["history"]


def test_tables_show_the_planned_runs_and_name_the_other_records(tmp_path, tiny_model_dir):
    """Records the experiment no longer plans (a seed taken out of the YAML) were averaged into results.md without a
    word; now the tables hold the planned runs and a note names the others, which stay on disk."""
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"])  # seeds 0 and 1
    run_experiment(load_experiment(path), progress=False)
    md = (tmp_path / "out" / "results.md").read_text()
    lora = next(line for line in md.splitlines() if line.startswith("| lora-mu |"))
    assert lora.endswith("| 2 |") and "Not in these tables" not in md
    exp = yaml.safe_load(path.read_text())
    exp["seeds"] = [0]
    path.write_text(yaml.safe_dump(exp))
    results = run_experiment(load_experiment(path), progress=False)
    assert sorted((r["method"], r["seed"]) for r in results) == [("base", 0), ("lora-mu", 0)]
    md = (tmp_path / "out" / "results.md").read_text()
    lora = next(line for line in md.splitlines() if line.startswith("| lora-mu |"))
    assert lora.endswith("| 1 |") and " ± " not in lora  # one seed: no spread from the other one
    assert ("Not in these tables: 2 record(s) in runs/ that this experiment does not plan, or planned with other "
            "settings") in md and "lora-mu__gen__seed1" in md
    assert (tmp_path / "out" / "runs" / "lora-mu__gen__seed1.json").is_file()


def test_only_tasks_that_are_trained_on_must_fit_the_models_context(tmp_path, tiny_model_dir):
    """Training examples longer than the model's 128 positions are an error naming max_length: for packed text
    before anything loads (what run --dry-run checks), for other kinds once tokenized. A task only scored by the
    runs left (methods: [base]) is not refused: it trains on nothing."""
    from forgetless.experiment import check_example_lengths, check_model, load_data, plan_runs

    long_text = tmp_path / "long.jsonl"
    long_text.write_text(json.dumps({"text": "Plants make sugar from light. " * 60}) + "\n")
    long_rows = tmp_path / "long_rows.jsonl"
    long_rows.write_text(json.dumps({"instruction": "Say hello. " * 60, "input": "", "output": "Hello."}) + "\n")
    for kind, source in (("text", long_text), ("instructions", long_rows)):
        task = {"name": "gen", "train": str(source), "train_kind": kind, "test": str(FIXTURES / "generic.jsonl"),
                "max_length": 200}
        scored = load_experiment(write_experiment(tmp_path, tiny_model_dir, tasks=[task], methods=["base"],
                                                  seeds=[0]))
        check_model(scored, plan_runs(scored))
        data = load_data(scored)
        check_example_lengths(scored, data, plan_runs(scored))
        trained = load_experiment(write_experiment(tmp_path, tiny_model_dir, tasks=[task], methods=["lora-mu"],
                                                   seeds=[0]))
        message = "tasks\\[0\\].max_length: 200 " + ("tokens is longer" if kind == "text" else
                                                        "lets this task's training examples reach 200 tokens")
        if kind == "text":
            with pytest.raises(ConfigError, match=message):
                check_model(trained, plan_runs(trained))
        else:
            check_model(trained, plan_runs(trained))
            with pytest.raises(ConfigError, match=message):
                check_example_lengths(trained, data, plan_runs(trained))
    (result,) = run_experiment(scored, progress=False)  # the base run scores the task it would not train on
    assert result["method"] == "base" and result["tasks"]["gen"]["n"] == 3


def test_hlora_runs_report_importance_and_coefficients(tmp_path, tiny_model_dir):
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["hlora"], seeds=[0]))
    (result,) = run_experiment(exp, progress=False)
    out = tmp_path / "out"
    coeff = result["stages"][-1]["extras"]["hlora_layer_coefficients"]
    assert sum(coeff.values()) == pytest.approx(1.0, abs=1e-6)
    assert len(coeff) == 2 * 2  # tiny model: 2 layers x (q_proj, v_proj)
    assert (out / result["general_stage"] / "hlora_importance.safetensors").is_file()
    md = (out / "results.md").read_text()
    assert "## HLoRA: importance and regularization" in md
    top = max(coeff, key=coeff.get)
    assert f"| `{top}` | {coeff[top]:.4f} |" in md  # the module that dominates is listed first
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert len(figures) == 2 and figures[0].startswith("hlora_domain_loss") and figures[1].startswith("hlora_importance")
    assert all((out / "figures" / f).read_bytes()[:4] == b"\x89PNG" for f in figures)


def test_summary_table_has_a_row_per_evaluation_variant():
    def run(seed, ppl, acc, variants):
        return {"method": "wise-ft", "task": "t", "seed": seed, "general_ppl": ppl, "tasks": {"t": {"acc": acc, "acc_norm": acc}},
                "variants": {k: {"general_ppl": p, "tasks": {"t": {"acc": a, "acc_norm": a}}} for k, (p, a) in variants.items()}}

    results = [run(0, 10.0, 0.5, {"wise-ft(alpha=0.5)": (8.0, 0.4)}), run(1, 12.0, 0.7, {"wise-ft(alpha=0.5)": (9.0, 0.6)})]
    header, rows = summary_table(results)
    assert [r[0] for r in rows] == ["wise-ft", "wise-ft @ wise-ft(alpha=0.5)"]
    assert rows[1][1] == "8.500 ± 0.707" and rows[1][2] == "50.0 ± 14.1" and rows[1][-1] == "2"


def test_same_seed_same_adapter_whatever_ran_before(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    import torch

    adapters = []
    for name in ("a", "b"):
        torch.rand(1000)  # other work in the same process moves the global RNG
        path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[0], output=str(tmp_path / name))
        run_experiment(load_experiment(path), progress=False)
        adapters.append(load_file(str(tmp_path / name / "adapters" / "lora-mu__gen__seed0" / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # LoRA init and training both seeded


def test_finished_runs_leave_no_checkpoint_folders(tmp_path, tiny_model_dir):
    """Checkpoints (save_every) are removed with each stage, and the run's and experiment's emptied folders with
    them; with keep_checkpoints they stay."""
    train = {"general": {"max_steps": 2, "batch_size": 4, "save_every": 1},
             "domain": {"max_steps": 2, "batch_size": 2, "save_every": 1}}
    run_experiment(load_experiment(write_experiment(tmp_path, tiny_model_dir, seeds=[0], train=train)),
                   progress=False)
    assert (tmp_path / "out" / "runs").is_dir() and not (tmp_path / "out" / "checkpoints").exists()
    train["domain"]["keep_checkpoints"] = True
    run_experiment(load_experiment(write_experiment(tmp_path, tiny_model_dir, seeds=[0], train=train,
                                                    output=str(tmp_path / "kept"))), progress=False)
    assert [p.name for p in (tmp_path / "kept" / "checkpoints" / "lora-mu__gen__seed0" / "domain").iterdir()] == [
        "step-000001"]  # the newest before the end (none is written at the last step)


def test_each_finished_run_says_how_many_are_recorded_and_the_time_left(tmp_path, tiny_model_dir, capsys):
    """After each run: K/N runs recorded, and from the second run of a method on, the time left estimated from the
    finished runs' seconds (as --dry-run does)."""
    from forgetless.experiment import left_line

    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[0, 1, 2])
    exp = load_experiment(path)
    assert left_line(exp) == "0/3 runs recorded; the time left is estimated once a run of each method has finished"
    run_experiment(exp, progress=False)
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if "runs recorded" in line]
    assert [line.split(";")[0] for line in lines] == ["[1/3 runs recorded", "[2/3 runs recorded", "[3/3 runs recorded]"]
    assert "left" in lines[0] and "left" in lines[1] and "not timed" not in lines[0]
    record = json.loads((tmp_path / "out" / "runs" / "lora-mu__gen__seed0.json").read_text())
    record["seconds"] = 7200.0  # two runs left at two hours each: 4 h, and 2 h on two workers
    for rid in ("lora-mu__gen__seed1", "lora-mu__gen__seed2"):
        (tmp_path / "out" / "runs" / f"{rid}.json").unlink()
    (tmp_path / "out" / "runs" / "lora-mu__gen__seed0.json").write_text(json.dumps(record))
    assert left_line(exp) == "1/3 runs recorded; about 4.0 h left"
    assert left_line(exp, workers=2) == "1/3 runs recorded; about 2.0 h left"


def test_the_time_left_on_workers_is_no_less_than_the_longest_group(tmp_path, tiny_model_dir, monkeypatch):
    """Runs that share a stage to train run one after another in one worker: four runs of an hour in groups of three
    and one take three hours on two workers, not two."""
    import forgetless.experiment as experiment

    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[0, 1, 2, 3]))
    jobs = plan_runs(exp)
    monkeypatch.setattr(experiment, "_job_seconds", lambda exp, todo: [3600.0] * len(todo))
    for groups, workers, hours in (([jobs[:3], jobs[3:]], 2, 3.0), ([jobs[:2], jobs[2:]], 2, 2.0),
                                   ([[j] for j in jobs], 3, 4 / 3), ([[j] for j in jobs], 1, 4.0)):
        monkeypatch.setattr(experiment, "job_groups", lambda exp, todo, groups=groups: groups)
        assert experiment.wall_seconds(exp, jobs, workers) == pytest.approx(hours * 3600), (groups, workers)


def test_a_run_stopped_while_it_evaluates_resumes_from_its_domain_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """The domain stage's checkpoints stay until the run is recorded: a run interrupted during its evaluation
    resumes its domain stage from the last checkpoint (not from step 0), gives the record of an uninterrupted run, and
    its checkpoint folder is gone once it is recorded."""
    import forgetless.pipeline as pipeline
    from forgetless.experiment import Interrupted
    from forgetless.training import checkpoint

    train = {"general": {"max_steps": 2, "batch_size": 4}, "domain": {"max_steps": 3, "batch_size": 2, "save_every": 1}}
    write = dict(seeds=[0], methods=["lora-mu"], train=train)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    reference = run_experiment(load_experiment(write_experiment(tmp_path / "a", tiny_model_dir, **write)),
                               progress=False)[0]
    real = pipeline.evaluate

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate", stop)
    path = write_experiment(tmp_path / "b", tiny_model_dir, **write)
    with pytest.raises(Interrupted):
        run_experiment(load_experiment(path), progress=False)
    kept = tmp_path / "b" / "out" / "checkpoints" / "lora-mu__gen__seed0" / "domain"
    assert [p.name for p in kept.iterdir()] == ["step-000002"]  # the newest before the end
    monkeypatch.setattr(pipeline, "evaluate", real)
    before = torch.load(kept / "step-000002" / "state.pt", weights_only=False)["seconds"]
    from forgetless.precision import resolve_precision

    here = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")  # write_experiment's: auto
    other = "fp32" if here == "bf16" else "bf16"
    settings = kept.parent / "settings.json"  # as if the interrupted session had computed in the other precision
    saved = json.loads(settings.read_text())
    assert saved["computed"] == {"precision": here}
    settings.write_text(json.dumps(saved | {"computed": {"precision": other}}))
    loads = []
    original = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda folder, *a, **k: loads.append(Path(folder).name) or original(
        folder, *a, **k))
    started = time.perf_counter()
    record = run_experiment(load_experiment(path), progress=False)[0]
    this_call = time.perf_counter() - started
    assert loads == ["step-000002"]  # resumed there: only the last domain step was trained again
    # its time counts the interrupted session's domain steps too, and the record says where it resumed
    domain = record["stages"][-1]
    assert domain["extras"]["resumed_from_step"] == 2 and domain["extras"]["seconds_before_resume"] == round(before, 3)
    assert before < record["seconds"] <= this_call + before + 1e-3  # added once, to this call's time
    assert record["computed"]["precision"] == f"{other}, then {here}"  # trained on two machines: the record says so
    assert record["general_ppl"] == reference["general_ppl"] and record["tasks"] == reference["tasks"]
    assert not (tmp_path / "b" / "out" / "checkpoints").exists()


def test_an_interrupted_run_with_changed_settings_is_refused_then_started_over(tmp_path, tiny_model_dir, monkeypatch,
                                                                                 capsys):
    """A run interrupted with a checkpoint, then run again with another learning rate: going on from the checkpoint
    would train the old schedule under the new settings' record. The dry run shows it as changed, ``run`` refuses it
    naming the change, and ``--rerun-changed`` starts it over (the old checkpoint folder kept beside) and gives the
    record of an uninterrupted run at the new rate."""
    import forgetless.pipeline as pipeline
    from forgetless.cli import _plan_text
    from forgetless.experiment import Interrupted

    train = {"general": {"max_steps": 2, "batch_size": 4}, "domain": {"max_steps": 3, "batch_size": 2, "save_every": 1}}
    faster = {"general": train["general"], "domain": dict(train["domain"], lr=1e-3)}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    reference = run_experiment(load_experiment(write_experiment(tmp_path / "a", tiny_model_dir, seeds=[0],
                                                                methods=["lora-mu"], train=faster)), progress=False)[0]
    real = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(Interrupted):
        run_experiment(load_experiment(write_experiment(tmp_path / "b", tiny_model_dir, seeds=[0],
                                                        methods=["lora-mu"], train=train)), progress=False)
    monkeypatch.setattr(pipeline, "evaluate", real)
    changed = load_experiment(write_experiment(tmp_path / "b", tiny_model_dir, seeds=[0], methods=["lora-mu"],
                                               train=faster))
    assert "changed  lora-mu__gen__seed0 (interrupted under other settings: train.domain.lr: default -> 0.001" in \
        _plan_text(changed)
    with pytest.raises(ConfigError, match="lora-mu__gen__seed0: train.domain.lr: default -> 0.001"):
        run_experiment(changed, progress=False)
    out = tmp_path / "b" / "out"
    assert (out / "checkpoints" / "lora-mu__gen__seed0" / "domain" / "step-000002").is_dir()  # untouched
    record = run_experiment(changed, progress=False, rerun_changed=True)[0]
    assert record["general_ppl"] == reference["general_ppl"] and record["tasks"] == reference["tasks"]
    kept = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(kept) == 1 and kept[0].startswith("lora-mu__gen__seed0.")  # the old one, set aside
    assert (out / "checkpoints" / kept[0] / "domain" / "step-000002").is_dir()


def test_a_changed_run_redone_does_not_go_on_from_its_kept_checkpoints(tmp_path, tiny_model_dir):
    """keep_checkpoints: true leaves a finished run's checkpoints; --rerun-changed after a LoRA alpha change went on
    from the old run's last one (resumed_from_step 3: three steps of the old alpha under the new record)."""
    train = {"general": {"max_steps": 2, "batch_size": 4},
             "domain": {"max_steps": 4, "batch_size": 2, "save_every": 1, "keep_checkpoints": True}}
    lora = {"r": 2, "alpha": 64, "dropout": 0.0}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    reference = run_experiment(load_experiment(write_experiment(tmp_path / "a", tiny_model_dir, seeds=[0],
                                                                methods=["lora-mu"], train=train, lora=lora)),
                               progress=False)[0]
    run_experiment(load_experiment(write_experiment(tmp_path / "b", tiny_model_dir, seeds=[0], methods=["lora-mu"],
                                                    train=train, lora=dict(lora, alpha=4))), progress=False)
    out = tmp_path / "b" / "out"
    assert (out / "checkpoints" / "lora-mu__gen__seed0" / "domain" / "step-000003").is_dir()
    record = run_experiment(load_experiment(write_experiment(tmp_path / "b", tiny_model_dir, seeds=[0],
                                                             methods=["lora-mu"], train=train, lora=lora)),
                            progress=False, rerun_changed=True)[0]
    assert "resumed_from_step" not in (record["stages"][-1].get("extras") or {})
    assert record["stages"][-1]["history"] == reference["stages"][-1]["history"]
    assert record["general_ppl"] == reference["general_ppl"] and record["tasks"] == reference["tasks"]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept[0] == "lora-mu__gen__seed0"
    assert len(kept) == 2 and kept[1].startswith("lora-mu__gen__seed0.")  # the old run's, set aside


def test_eval_share_prefix_is_part_of_a_runs_identity_and_scores_packed(tmp_path, tiny_model_dir, monkeypatch):
    """``eval: {share_prefix: true}`` scores the runs' multiple choice one packed sequence per item, and is in the
    run's identity (its scores may differ from the default's by rounding, so a recorded run is never reused for it)."""
    from forgetless.evaluation import multiple_choice
    from forgetless.experiment import plan_runs, run_settings, settings_digest

    calls = []
    real = multiple_choice._score_packed
    monkeypatch.setattr(multiple_choice, "_score_packed", lambda *a: calls.append(1) or real(*a))
    shared = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["base"], seeds=[0],
                                              eval={"batch_size": 4, "share_prefix": True}))
    (tmp_path / "plain").mkdir()
    plain = load_experiment(write_experiment(tmp_path / "plain", tiny_model_dir, methods=["base"], seeds=[0]))
    job, plain_job = plan_runs(shared)[0], plan_runs(plain)[0]
    mine = run_settings(shared, job.recipe, job.task, job.seed)
    assert mine["eval"]["share_prefix"] is True
    assert "share_prefix" not in run_settings(plain, plain_job.recipe, plain_job.task, plain_job.seed).get("eval", {})
    assert settings_digest(mine) != settings_digest(run_settings(plain, plain_job.recipe, plain_job.task, 0))
    record = run_experiment(shared, progress=False)[0]
    assert calls and 0 <= record["tasks"]["gen"]["acc"] <= 1


def test_a_record_says_how_auto_was_computed_and_a_resumed_experiment_warns(tmp_path, tiny_model_dir, capsys):
    """``precision: auto`` is bf16 on a CPU with native bf16 and fp32 on an AVX2-only one: each record says what it
    got, an experiment resumed on a machine that resolves it otherwise warns, and the report names the runs."""
    from forgetless.precision import resolve_precision

    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], seeds=[0])
    results = run_experiment(load_experiment(path), progress=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where run_recipe puts the model
    here = resolve_precision("auto", device)
    threads = {"threads": torch.get_num_threads()} if device == "cpu" else {}
    assert [r["computed"] for r in results] == [{"device": device, "precision": here, "base_dtype": here} | threads] * 2
    other = "fp32" if here == "bf16" else "bf16"
    record_path = tmp_path / "out" / "runs" / "lora-mu__gen__seed0.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(record | {"computed": record["computed"] | {"precision": other}}))
    capsys.readouterr()
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], seeds=[0, 1])
    run_experiment(load_experiment(path), progress=False)
    out = capsys.readouterr().out
    assert (f"warning: finished runs, cached general stages or checkpoints here were computed in another precision "
            f"than this machine gives precision 'auto' ({here}): 1 in {other} (run lora-mu__gen__seed0). The runs "
            f"left will not be computed alike") in out
    md = (tmp_path / "out" / "results.md").read_text()
    assert "**Not scored alike.**" in md and f"- task gen, precision: {json.dumps(other)} (lora-mu__gen__seed0); " in md
    assert computed_elsewhere(load_experiment(path)) != ""  # and the seed-0 run alone: nothing to warn about
    record_path.write_text(json.dumps(record))
    assert computed_elsewhere(load_experiment(path)) == ""

    (tmp_path / "pinned").mkdir()
    pinned = write_experiment(tmp_path / "pinned", tiny_model_dir, methods=["lora-mu"], seeds=[0], precision="fp32")
    (result,) = run_experiment(load_experiment(pinned), progress=False)
    assert result["computed"] == {"device": device, "precision": "fp32", "base_dtype": "fp32"} | threads


def test_a_cached_stage_or_checkpoint_computed_in_another_precision_is_named(tmp_path, tiny_model_dir):
    """What a resumed experiment goes on from, not only its finished runs: a cached general stage and an interrupted
    run's checkpoint say how they computed, and one computed otherwise than here is named before training."""
    from forgetless.precision import resolve_precision

    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-nu-mu"], seeds=[0])
    exp = load_experiment(path)
    (record,) = run_experiment(exp, progress=False)
    here = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    other = "fp32" if here == "bf16" else "bf16"
    stage = tmp_path / "out" / record["general_stage"] / "stage.json"
    saved = json.loads(stage.read_text())
    assert saved["computed"]["precision"] == here and computed_elsewhere(exp) == ""
    stage.write_text(json.dumps(saved | {"computed": saved["computed"] | {"precision": other}}))
    assert f"1 in {other} (general stage {stage.parent.name})" in computed_elsewhere(exp)
    stage.write_text(json.dumps(saved))
    settings = tmp_path / "out" / "checkpoints" / "lora-nu-mu__gen__seed0" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"settings_digest": "x", "settings": {}, "computed": {"precision": other}}))
    assert f"1 in {other} (checkpoint lora-nu-mu__gen__seed0)" in computed_elsewhere(exp)
    settings.rename(settings.parent.parent / "elsewhere.json")  # not this experiment's (set aside, say): not counted
    (settings.parent.parent / "lora-nu-mu__gen__seed0.0123abcd").mkdir()
    (settings.parent.parent / "elsewhere.json").rename(settings.parent.parent / "lora-nu-mu__gen__seed0.0123abcd" /
                                                       "settings.json")
    assert computed_elsewhere(exp) == ""


def test_a_recorded_runs_leftover_checkpoints_are_removed_at_the_next_start(tmp_path, tiny_model_dir):
    """Killed between writing its record and removing its checkpoints, a run left them behind for good (it counts as
    done): the next start removes them, unless the stage keeps its checkpoints."""
    train = {"general": {"max_steps": 2, "batch_size": 4}, "domain": {"max_steps": 2, "batch_size": 2}}
    path = write_experiment(tmp_path, tiny_model_dir, seeds=[0], methods=["lora-mu"], train=train)
    run_experiment(load_experiment(path), progress=False)
    folder = tmp_path / "out" / "checkpoints" / "lora-mu__gen__seed0"
    (folder / "domain" / "step-000001").mkdir(parents=True)
    (folder / "settings.json").write_text("{}")
    aside = tmp_path / "out" / "checkpoints" / "lora-mu__gen__seed0.0123abcd"  # set aside by --rerun-changed: kept
    aside.mkdir()
    run_experiment(load_experiment(path), progress=False)
    assert not folder.exists() and aside.is_dir()
    (folder / "domain" / "step-000001").mkdir(parents=True)
    kept = {"general": train["general"], "domain": dict(train["domain"], keep_checkpoints=True)}
    run_experiment(load_experiment(write_experiment(tmp_path, tiny_model_dir, seeds=[0], methods=["lora-mu"],
                                                    train=kept)), progress=False)
    assert (folder / "domain" / "step-000001").is_dir()


def test_a_run_that_stops_on_an_error_removes_no_kept_checkpoints(tmp_path, tiny_model_dir):
    """Checkpoints a finished run kept (``keep_checkpoints: true`` when it trained) stay when the YAML later says
    false: neither a run that stops on a data error nor one that goes through removes them."""
    train = {"general": {"max_steps": 2, "batch_size": 4}, "domain": {"max_steps": 3, "batch_size": 2,
                                                                      "save_every": 1, "keep_checkpoints": True}}
    run_experiment(load_experiment(write_experiment(tmp_path, tiny_model_dir, seeds=[0], methods=["lora-mu"],
                                                    train=train)), progress=False)
    kept = tmp_path / "out" / "checkpoints" / "lora-mu__gen__seed0"
    listing = sorted(str(p.relative_to(kept)) for p in kept.rglob("*"))
    assert "domain/step-000002" in listing
    train["domain"]["keep_checkpoints"] = False
    bad = tmp_path / "bad.jsonl"
    bad.write_text((FIXTURES / "generic.jsonl").read_text() + '{"question": "q", "choices": ["a"], "answer": 3}\n')
    generic = str(FIXTURES / "generic.jsonl")
    path = write_experiment(tmp_path, tiny_model_dir, seeds=[0], methods=["lora-mu", "lora-nu-mu"], train=train,
                            tasks=[{"name": "gen", "train": generic, "test": generic},
                                   {"name": "other", "train": generic, "test": str(bad)}])
    with pytest.raises(DataError, match="bad.jsonl, line"):
        run_experiment(load_experiment(path), progress=False)
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == listing
    path = write_experiment(tmp_path, tiny_model_dir, seeds=[0], methods=["lora-mu", "lora-nu-mu"], train=train)
    run_experiment(load_experiment(path), progress=False)
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == listing


def test_the_other_tasks_test_sets_a_run_is_scored_on_are_part_of_its_identity(tmp_path, tiny_model_dir):
    """With ``suite: auto`` a run is also scored on the other tasks' test sets; what defines their items was not part
    of its identity, so after another task's test_limit changed, the finished runs were reused, scored on the old
    items beside new runs scored on the new ones (a -10 point 'forgetting' made by the items). Now they are changed
    runs; a record written before the suite was in the identity is taken as it was."""
    from forgetless.experiment import SUITE_KEY, _sort_finished, plan_runs, settings_digest

    generic = str(FIXTURES / "generic.jsonl")

    def experiment(limit, **over):
        tasks = [{"name": "gen", "train": generic, "test": generic},
                 {"name": "other", "train": generic, "test": generic, "test_limit": limit}]
        return load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["base"], seeds=[0], tasks=tasks,
                                                **over))

    before, after = experiment(3), experiment(2)
    job = plan_runs(before)[0]
    assert job.task.name == "gen" and job.settings[SUITE_KEY] == {"other": {"test": generic, "test_limit": 3}}
    assert plan_runs(experiment(3, eval={"batch_size": 4, "suite": []}))[0].settings.get(SUITE_KEY) is None
    (before.output / "runs").mkdir(parents=True)
    record = before.output / "runs" / f"{job.rid}.json"
    fields = {"run_id": job.rid, "method": "base", "task": "gen", "seed": 0, "general_ppl": 10.0,
              "tasks": {"gen": {"acc": 0.5}}}
    record.write_text(json.dumps(fields | {"settings": job.settings, "settings_digest": job.digest}))
    new_job = plan_runs(after)[0]
    _, stale, _ = _sort_finished(after, [new_job])
    assert [j.rid for j, _ in stale] == [job.rid]
    assert _sort_finished(before, [job])[1] == []
    legacy = {k: v for k, v in job.settings.items() if k != SUITE_KEY}  # a record of before session 33
    record.write_text(json.dumps(fields | {"settings": legacy, "settings_digest": settings_digest(legacy)}))
    assert _sort_finished(after, [new_job])[1] == []


def test_settings_that_never_reach_a_run_are_not_part_of_its_identity(tmp_path, tiny_model_dir):
    """lora-mu has no general stage: a change of train.general (or of the general training text, which it does not
    read) made it a changed run, recomputed to the same numbers; base trains nothing: a task's training data or
    eval.every did the same. A record written before (with those settings in its digest) is taken as it was."""
    from forgetless.experiment import _sort_finished, plan_runs, run_settings, settings_digest

    generic = str(FIXTURES / "generic.jsonl")
    methods = ["base", "lora-mu", "lora-nu-mu", {"name": "replay", "fraction": 0.5}]

    def digests(**over):
        exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=methods, seeds=[0], **over))
        return {job.rid.split("__")[0]: job.digest for job in plan_runs(exp)}

    plain = digests()
    general = {"general": {"max_steps": 3, "batch_size": 4, "lr": 1e-3}, "domain": {"max_steps": 2, "batch_size": 2}}
    text = tmp_path / "other-general.jsonl"
    text.write_text(json.dumps({"text": "Another general document about the sea."}) + "\n")
    for over, changed in (({"train": general}, {"lora-nu-mu", "replay_fraction=0.5"}),
                          ({"general": {"train": {"source": str(text)}, "block_size": 16,
                                        "heldout": {"source": str(tmp_path / "general.jsonl"), "limit": 10}}},
                           {"lora-nu-mu", "replay_fraction=0.5"}),  # replay reads the general text, lora-mu not
                          ({"tasks": [{"name": "gen", "train": generic, "test": generic, "train_limit": 2}]},
                           {"lora-mu", "lora-nu-mu", "replay_fraction=0.5"}),
                          ({"eval": {"batch_size": 4, "every": 1}}, {"lora-mu", "lora-nu-mu", "replay_fraction=0.5"})):
        now = digests(**over)
        assert {m for m in now if now[m] != plain[m]} == changed, over
    # a record of before this change carries the digest with those settings: reused, not a changed run
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=methods, seeds=[0]))
    (exp.output / "runs").mkdir(parents=True)
    for job in plan_runs(exp):
        legacy = run_settings(exp, job.recipe, job.task, job.seed, legacy=True)
        assert (legacy != job.settings) == (job.recipe.label in ("base", "lora-mu")), job.rid
        (exp.output / "runs" / f"{job.rid}.json").write_text(json.dumps(
            {"run_id": job.rid, "method": job.recipe.label, "task": "gen", "seed": 0, "general_ppl": 10.0,
             "tasks": {"gen": {"acc": 0.5}}, "settings": legacy, "settings_digest": settings_digest(legacy)}))
    pending, stale, _ = _sort_finished(exp, plan_runs(exp))
    assert pending == [] and stale == []


def test_a_run_stopped_while_it_caches_its_general_stage_resumes_it(tmp_path, tiny_model_dir, monkeypatch):
    """The general stage removed its checkpoints when it ended, before it was written to the cache: a run stopped in
    that window (an 8B model's importance takes a while to write) trained the general stage again from step 0."""
    import forgetless.pipeline as pipeline
    from forgetless.experiment import Interrupted

    train = {"general": {"max_steps": 4, "batch_size": 2, "save_every": 1},
             "domain": {"max_steps": 2, "batch_size": 2}}
    path = write_experiment(tmp_path, tiny_model_dir, seeds=[0], methods=["hlora"], train=train)
    real = pipeline._save_stage
    monkeypatch.setattr(pipeline, "_save_stage", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(Interrupted):
        run_experiment(load_experiment(path), progress=False)
    monkeypatch.setattr(pipeline, "_save_stage", real)
    record = run_experiment(load_experiment(path), progress=False)[0]
    general = record["stages"][0]
    assert general["stage"] == "general" and general["extras"]["resumed_from_step"] == 3
    out = tmp_path / "out"
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").rglob("step-*"))
    assert len([p for p in (out / "stages").iterdir() if p.name.startswith("general-")]) == 1


def test_evaluation_progress_and_run_lines_show_on_the_main_process_only(tmp_path, tiny_model_dir, monkeypatch,
                                                                         capsys):
    """Under accelerate launch every process drew the evaluation's progress bars (training gated its own to the main
    process) and printed the experiment's lines: four garbled copies with four processes."""
    import forgetless.experiment as experiment

    seen = []
    real = experiment.run_recipe
    monkeypatch.setattr(experiment, "run_recipe", lambda recipe, data, settings, **k: seen.append(settings.progress)
                        or real(recipe, data, settings, **k))
    monkeypatch.setattr(experiment, "is_main_process", lambda: False)
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[0]))
    run_experiment(exp, progress=True)
    assert seen == [False]
    out = capsys.readouterr().out
    assert "experiment tiny" not in out and "[1/1]" not in out


def test_a_redone_runs_tracker_files_under_logging_dir_are_set_aside(tmp_path):
    """--rerun-changed set aside OUTPUT/logs/RUN_ID only: with logging_dir set, the old run's events stayed in
    LOGGING_DIR/RUN_ID and the new run's were written beside them (one run in TensorBoard, two runs' curves)."""
    from types import SimpleNamespace

    from forgetless.experiment import _set_aside

    out, tb = tmp_path / "out", tmp_path / "tb"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "r.json").write_text("{}")
    (tb / "r").mkdir(parents=True)
    (tb / "r" / "events.out").write_text("old")
    _set_aside(out, SimpleNamespace(rid="r"), {"settings_digest": "abc"}, [None, str(tb)])
    assert not (tb / "r").exists() and (tb / "r.abc" / "events.out").read_text() == "old"
    assert (out / "runs" / "r.json.abc").is_file()
