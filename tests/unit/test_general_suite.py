"""The general-ability suite (every run scored on the other tasks; forgetting = tuned - base) and forgetting over
training (``eval.every``, ``eval.select``), on a tiny experiment."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from forgetless.config import ConfigError, load_experiment
from forgetless.experiment import load_data, plan_runs, run_experiment
from forgetless.training.tracking import best_within_drop

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def exp_tasks(tmp_path):
    return yaml.safe_load((tmp_path / "exp.yaml").read_text())["tasks"]


def write_experiment(tmp_path, model_dir, eval_=None, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": f"Plants make sugar from light, sentence {i}."}) + "\n"
                            for i in range(40)))
    exp = {
        "name": "tiny", "model": str(model_dir), "output": str(tmp_path / "out"), "seeds": [0],
        "precision": "fp32", "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "general": {"train": {"source": str(text)}, "heldout": {"source": str(text), "limit": 10}, "block_size": 16},
        "tasks": [{"name": "gen", "train": str(FIXTURES / "generic.jsonl"), "test": str(FIXTURES / "generic.jsonl")},
                  # max_length within the tiny model's 128 positions (SciQ's supports make 151-token examples)
                  {"name": "sci", "train": str(FIXTURES / "sciq.jsonl"), "test": str(FIXTURES / "sciq.jsonl"),
                   "max_length": 128}],
        "methods": ["base", "lora-mu"],
        "train": {"domain": {"max_steps": 3, "batch_size": 2, "lr": 5.0e-2}},
        "eval": {"batch_size": 4} | (eval_ or {}),
    } | over
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def _model_scores(model_dir, adapter, items):
    from forgetless.evaluation import evaluate_mc
    from forgetless.models import load_adapter, load_model

    model, tok = load_model(str(model_dir), precision="fp32")
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.eval()
    return evaluate_mc(model, tok, items, batch_size=4, precision="fp32", progress=False)


def test_suite_scores_forgetting_and_report(tmp_path, tiny_model_dir):
    from forgetless.reporting.forgetting import forgetting_rows
    from forgetless.reporting.report import build_report

    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, eval_={"suite": ["auto", {
        "name": "arc", "test": str(FIXTURES / "arc_easy.jsonl"), "schema": "arc"}]}))
    results = {r["run_id"]: r for r in run_experiment(exp, progress=False)}
    assert set(results["base__gen__seed0"]["suite"]) == {"sci", "arc"}
    assert set(results["lora-mu__sci__seed0"]["suite"]) == {"gen", "arc"}
    data = load_data(exp)
    # the suite is scored by evaluate_mc on the same items, for base and for the tuned adapter
    tuned = tmp_path / "out/adapters/lora-mu__gen__seed0"
    for rid, adapter in (("base__gen__seed0", None), ("lora-mu__gen__seed0", tuned)):
        mc = _model_scores(tiny_model_dir, adapter, data.tasks["sci"][1])
        assert results[rid]["suite"]["sci"]["acc"] == pytest.approx(mc.acc, abs=1e-12)
        assert results[rid]["suite"]["sci"]["acc_norm"] == pytest.approx(mc.acc_norm, abs=1e-12)
        assert results[rid]["suite"]["sci"]["n"] == len(data.tasks["sci"][1])
    rows = forgetting_rows(list(results.values()))
    assert {(r["method"], r["task"]) for r in rows} == {("lora-mu", "gen"), ("lora-mu", "sci")}
    for row in rows:
        tuned, base = results[f"lora-mu__{row['task']}__seed0"], results[f"base__{row['task']}__seed0"]
        for task, delta in row["forgetting"].items():
            if task != "mean":
                assert delta == round(100.0 * (tuned["suite"][task]["acc"] - base["suite"][task]["acc"]), 9)
        assert row["forgetting"]["mean"] == pytest.approx(sum(v for k, v in row["forgetting"].items()
                                                              if k != "mean") / 2)
    assert "## Forgetting on the general suite" in (tmp_path / "out/results.md").read_text()
    report = build_report(tmp_path / "out").read_text()
    assert "## Forgetting on the general suite" in report and "| lora-mu | gen |" in report
    assert (tmp_path / "out/report/gain_vs_drop.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Forgetting over training" in report and "eval.every" in report  # not recorded here: a note


def test_new_eval_keys_at_defaults_keep_run_identity(tmp_path, tiny_model_dir):
    plain = load_experiment(write_experiment(tmp_path, tiny_model_dir))
    explicit = load_experiment(write_experiment(tmp_path, tiny_model_dir, eval_={
        "suite": "auto", "every_items": 32, "every_blocks": 4}))
    assert [j.digest for j in plan_runs(plain)] == [j.digest for j in plan_runs(explicit)]
    assert all(set(j.settings["eval"]) == {"batch_size"} for j in plan_runs(plain))
    off = load_experiment(write_experiment(tmp_path, tiny_model_dir, eval_={"suite": []}))
    assert [j.digest for j in plan_runs(off)] != [j.digest for j in plan_runs(plain)]


@pytest.mark.parametrize("eval_, message", [
    ({"suite": "all"}, r"exp\.yaml: eval: suite: must be 'auto'"),
    ({"suite": [{"name": "x"}]}, r"exp\.yaml: eval\.suite\[0\]: missing key 'test'"),
    ({"suite": [{"name": "gen", "test": "t.jsonl"}]}, r"exp\.yaml: eval\.suite: \['gen'\] are tasks"),
    ({"select": {"max_general_drop": 0.1}}, r"exp\.yaml: eval: select: needs 'every'"),
    ({"every": 0}, r"exp\.yaml: eval: every must be >= 1"),
    ({"every": 1, "suite": [], "select": {"max_general_drop": 0.1}}, r"exp\.yaml: eval\.select: needs a general suite"),
])
def test_suite_and_select_errors_name_file_and_key(tmp_path, tiny_model_dir, eval_, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(write_experiment(tmp_path, tiny_model_dir, eval_=eval_))


def test_missing_suite_file_is_an_error_naming_the_key(tmp_path, tiny_model_dir):
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, eval_={
        "suite": [{"name": "arc", "test": str(tmp_path / "nope.jsonl")}]}))
    from forgetless.data import DataError

    with pytest.raises(DataError, match=r"exp\.yaml: eval\.suite\[0\]\.test"):
        load_data(exp)


def test_best_within_drop_keeps_the_best_domain_step_inside_the_budget():
    history = [{"step": 0, "d": 0.2, "g": 0.60}, {"step": 2, "d": 0.5, "g": 0.58}, {"step": 4, "d": 0.9, "g": 0.40},
               {"step": 6, "d": 0.5, "g": 0.60}]
    assert best_within_drop("d", "g", 0.05)(history) == 1  # step 4 drops 0.2; step 6 ties step 2: the earlier
    assert best_within_drop("d", "g", 0.25)(history) == 2
    assert best_within_drop("d", "g", 0.0)(history) == 3
    assert best_within_drop("d", "g", 0.0)(history[:1]) == 0


def test_a_lower_is_better_suite_score_stays_out_of_general_acc_and_select():
    """A harness suite task whose main score is a perplexity (higher_is_better False) was averaged into
    general_acc, so eval.select read a rising perplexity as general ability improving."""
    from forgetless.data import MCItem
    from forgetless.models import LoraSettings
    from forgetless.pipeline import RunData, RunSettings, _tracker
    from forgetless.training.config import TrainConfig
    from tests.unit.tiny_model import make_tiny_model
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    class Perplexity:  # what suite_scores gives for a harness task that reports a perplexity only
        def __getitem__(self, part):
            return self

        def score(self, model, tokenizer, **kwargs):
            return {"acc": 25.0, "acc_norm": 25.0, "higher_is_better": False, "n": 10}

    tok = make_tiny_tokenizer()
    model = make_tiny_model(vocab_size=len(tok))
    items = [MCItem("Question: What is the answer?\nAnswer:", ("A", "B"), 0)] * 4
    settings = RunSettings(model="x", lora=LoraSettings(), general=TrainConfig(), domain=TrainConfig(), eval_every=1,
                           max_general_drop=0.05, precision="fp32", progress=False)
    for suite, general in (({"arc": items, "wikitext": Perplexity()}, True), ({"wikitext": Perplexity()}, False)):
        row = _tracker(tok, RunData([], [], None, {"dom": items}, suite), settings).evaluate(model)
        assert row["suite_lower/wikitext"] == 25.0 and "suite/wikitext" not in row
        if general:
            assert row["general_acc"] == row["suite/arc"] <= 1.0
        else:
            assert "general_acc" not in row
            choose = _tracker(tok, RunData([], [], None, {"dom": items}, suite), settings).choose
            with pytest.raises(ValueError, match="lower-is-better, e.g. a perplexity"):
                choose([row, row])


def test_eval_every_rows_final_row_and_selected_checkpoint(tmp_path, tiny_model_dir):
    from forgetless.evaluation import evaluate_mc
    from forgetless.models import load_adapter, load_model

    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], eval_={
        "every": 2, "every_items": 100, "every_blocks": 100, "select": {"max_general_drop": 1.0}}))
    results = {r["run_id"]: r for r in run_experiment(exp, progress=False)}
    run = results["lora-mu__gen__seed0"]
    (domain,) = [s for s in run["stages"] if s["stage"] == "domain"]
    rows = domain["extras"]["eval_history"]
    assert [r["step"] for r in rows] == [0, 2, 3]  # before the first step, every 2nd, and the last
    final = rows[-1]  # subsets as large as the sets: the last row is the run's final evaluation
    assert final["domain_acc"] == pytest.approx(run["tasks"]["gen"]["acc"], abs=1e-12)
    assert final["suite/sci"] == pytest.approx(run["suite"]["sci"]["acc"], abs=1e-12)
    assert final["general_acc"] == pytest.approx(run["suite"]["sci"]["acc"], abs=1e-12)
    assert final["general_ppl"] == pytest.approx(run["general_ppl"], rel=1e-6)
    # the budget admits every row: the kept step is the best domain row (the earliest on ties)
    best = max(range(len(rows)), key=lambda i: (rows[i]["domain_acc"], -i))
    assert run["selected"]["step"] == rows[best]["step"] == domain["extras"]["eval_selected_step"]
    assert run["selected"]["adapter"] == "lora-mu__gen__seed0.selected"
    # the selected adapter holds that step's weights: it scores what that row recorded
    model, tok = load_model(str(tiny_model_dir), precision="fp32")
    model = load_adapter(model, tmp_path / "out/adapters/lora-mu__gen__seed0.selected")
    model.eval()
    data = load_data(exp)
    mc = evaluate_mc(model, tok, data.tasks["gen"][1], batch_size=4, precision="fp32", progress=False)
    assert mc.acc == pytest.approx(rows[best]["domain_acc"], abs=1e-12)
    from forgetless.evaluation import perplexity

    ppl = perplexity(model, data.heldout, batch_size=4, precision="fp32", progress=False).ppl
    assert ppl == pytest.approx(rows[best]["general_ppl"], rel=1e-6)  # a continuous check of the weights
    assert len({r["general_ppl"] for r in rows}) == len(rows)  # every step's weights differ: the check can tell
    # the kept checkpoint is also evaluated in full, as an evaluation variant of the run
    assert run["variants"]["selected"]["general_ppl"] == pytest.approx(ppl, rel=1e-6)
    assert run["variants"]["selected"]["tasks"]["gen"]["acc"] == pytest.approx(mc.acc, abs=1e-12)
    assert set(run["variants"]["selected"]["suite"]) == {"sci"}
    assert "| lora-mu @ selected |" in (tmp_path / "out/results.md").read_text()
    assert "selected" in results["base__gen__seed0"] and results["base__gen__seed0"]["selected"] is None
    # scoring while training changes nothing of the training: the same adapter as a run without eval.every
    from safetensors.torch import load_file

    plain = load_experiment(write_experiment(tmp_path / "plain", tiny_model_dir, methods=["lora-mu"],
                                             tasks=exp_tasks(tmp_path)[:1]))
    run_experiment(plain, progress=False)
    a = load_file(tmp_path / "out/adapters/lora-mu__gen__seed0/adapter_model.safetensors")
    b = load_file(tmp_path / "plain/out/adapters/lora-mu__gen__seed0/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from forgetless.reporting.report import build_report

    report = build_report(tmp_path / "out").read_text()
    assert "![forgetting over training](forgetting_curves.png)" in report and "| lora-mu__gen__seed0 |" in report


def test_eval_every_state_survives_a_mid_stage_checkpoint():
    from types import SimpleNamespace

    import torch

    from forgetless.training.tracking import EvalEvery

    tracker = EvalEvery(2, lambda model: {})
    tracker.history = [{"step": 0, "domain_acc": 0.5, "general_ppl": 9.0}, {"step": 2, "domain_acc": 0.75}]
    tracker.best_step, tracker.best_state = 2, {"a.lora_A": torch.arange(4.0)}
    resumed, ctx = EvalEvery(2, lambda model: {}), SimpleNamespace(extras={})
    resumed.load_stage_state(ctx, tracker.stage_state(ctx))
    assert resumed.history == tracker.history and ctx.extras["eval_history"] == tracker.history
    assert resumed.best_step == 2 == ctx.extras["eval_selected_step"]
    assert torch.equal(resumed.best_state["a.lora_A"], torch.arange(4.0))


def test_results_md_s_forgetting_table_lists_the_wise_ft_interpolations(tmp_path):
    """results.md's forgetting table has a row per WiSE-FT interpolation, as its main table and `forgetless report`
    have (it was given the records without their variants, so it had only `wise-ft`); the drop is the variant's own
    suite score minus base's."""
    from types import SimpleNamespace

    from forgetless.experiment import _write_report

    def run(method, suite, variants=None):
        return {"method": method, "task": "t", "seed": 0, "run_id": f"{method}__t__seed0", "general_ppl": 10.0,
                "general_ppl_base2": 3.3, "tasks": {"t": {"acc": 0.5, "acc_norm": 0.5}},
                "suite": {"s": {"acc": suite}}} | ({"variants": variants} if variants else {})

    variant = {"general_ppl": 9.0, "general_ppl_base2": 3.1, "tasks": {"t": {"acc": 0.6, "acc_norm": 0.6}},
               "suite": {"s": {"acc": 0.55}}}
    results = [run("base", 0.7), run("wise-ft", 0.4, {"wise-ft(alpha=0.5)": variant})]
    exp = SimpleNamespace(output=tmp_path, methods=["base", "wise-ft"], tasks=[SimpleNamespace(name="t")],
                          landscape=None)
    _write_report(exp, results)
    text = (tmp_path / "results.md").read_text()
    forgetting = text[text.index("## Forgetting on the general suite"):text.index("## Forgetting over training")]
    assert "wise-ft @ wise-ft(alpha=0.5)" in forgetting and "-15.0" in forgetting  # 0.55 - 0.70, in points
    assert "-30.0" in forgetting  # the run itself: 0.40 - 0.70


def test_forgetting_rows_on_hand_made_records():
    """Three suite tasks with unequal changes (with two, a mean is a median, and the experiment test had one row of
    zeros): each suite task's change in points, their mean, the domain gain; a run without a base of its task and
    seed, and a lower-is-better harness score, give no row or no column."""
    from forgetless.reporting.forgetting import MEAN, forgetting_rows

    def run(method, seed, suite, domain):
        return {"method": method, "task": "piqa", "seed": seed, "tasks": {"piqa": {"acc": domain}},
                "suite": {name: {"acc": acc} for name, acc in suite.items()}
                | {"wikitext": {"acc": 20.0 if method == "base" else 30.0, "higher_is_better": False}}}

    base = run("base", 0, {"arc": 0.50, "sciq": 0.80, "obqa": 0.30}, 0.60)
    tuned = run("lora-mu", 0, {"arc": 0.45, "sciq": 0.62, "obqa": 0.31}, 0.70)
    orphan = run("lora-mu", 1, {"arc": 0.1, "sciq": 0.1, "obqa": 0.1}, 0.9)  # no base of seed 1
    (row,) = forgetting_rows([base, tuned, orphan])
    assert row["method"] == "lora-mu" and row["seed"] == 0
    assert row["forgetting"] == pytest.approx({"arc": -5.0, "sciq": -18.0, "obqa": 1.0, MEAN: -22.0 / 3})
    assert row["gain"] == pytest.approx(10.0)
