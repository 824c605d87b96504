"""The report from hand-written run records: ranks, t-tests (against scipy), cost, sweep, Pareto, ablation,
notes for absent data; and from a real tiny experiment with EWC and HLoRA sweeps."""

import json
import math
import re

import pytest
from scipy.stats import ttest_ind, ttest_rel

from forgetless.cli import main
from forgetless.methods import method_label
from forgetless.reporting.report import (Results, build_report, pareto_front, parse_label, rank_marks,
                                         significance_tests, sweep_families, with_variants)

PNG = b"\x89PNG\r\n\x1a\n"

# (ppl, acc%) per seed, for tasks t1 and t2
DATA = {
    "base": {"t1": [(10.0, 25.0)] * 3, "t2": [(10.0, 30.0)] * 3},
    "lora-nu-mu": {"t1": [(13.0, 50.0), (13.5, 52.0), (12.5, 51.0)], "t2": [(14.0, 40.0), (14.2, 41.0), (13.8, 42.0)]},
    "hlora": {"t1": [(11.0, 55.0), (11.2, 56.0), (10.9, 57.0)], "t2": [(12.0, 44.0), (12.5, 43.0), (12.1, 45.0)]},
    "hlora-no-layer": {"t1": [(11.5, 54.0), (11.4, 53.0), (11.6, 55.5)], "t2": [(12.2, 42.0), (12.8, 44.0), (12.4, 43.0)]},
    "hlora(phi=0.01)": {"t1": [(10.5, 48.0), (10.6, 49.0), (10.4, 47.0)], "t2": [(11.0, 39.0), (11.1, 38.0), (11.2, 40.0)]},
    "ewc": {"t1": [(12.0, 53.0), (12.2, 52.0), (11.9, 54.0)], "t2": [(13.0, 41.0), (13.1, 42.5), (12.9, 41.5)]},
    "ewc(lambda=10.0)": {"t1": [(11.8, 50.0), (11.7, 51.0), (11.9, 52.0)], "t2": [(12.5, 40.0), (12.6, 40.5), (12.4, 39.5)]},
}


def suite_acc(method, ppl):
    """The synthetic general-suite score: base 0.40, a tuned run loses (PPL - 10) points."""
    return 0.40 if method == "base" else 0.40 - (ppl - 10.0) / 100


def run_record(method, task, seed, ppl, acc, suite=True):
    stages = []
    if method != "base":
        general = {"stage": "general", "steps": 4, "seconds": 10.0 + seed, "history": []}
        if method.startswith("hlora"):
            general["extras"] = {"importance_cost": {"hlora": {"what": "path integral", "seconds": 0.5,
                                                                "bytes": 2 * 2**20}}}
        if method.startswith("ewc"):
            general["extras"] = {"importance_cost": {"ewc": {"what": "Fisher", "seconds": 5.0 + seed,
                                                              "bytes": 8 * 2**20}}}
        domain = {"stage": "domain", "steps": 6, "seconds": 20.0, "history": []}
        if suite:  # eval.every rows: linear from the start (0.25, 0.40) to the final scores
            domain["extras"] = {"eval_history": [
                {"step": k, "domain_acc": 0.25 + (acc / 100 - 0.25) * k / 6,
                 "general_acc": 0.40 + (suite_acc(method, ppl) - 0.40) * k / 6} for k in (0, 3, 6)]}
        stages = [general, domain]
    record = {"method": method, "task": task, "seed": seed, "general_ppl": ppl, "general_ppl_base2": ppl / 2,
              "tasks": {task: {"acc": acc / 100, "acc_norm": acc / 100 - 0.01, "n": 100}}, "stages": stages,
              "variants": {}, "seconds": 40.0, "run_id": f"{method}__{task}__seed{seed}", "model": "tiny"}
    if suite:
        other = "t2" if task == "t1" else "t1"
        score = suite_acc(method, ppl)
        record["suite"] = {other: {"acc": score, "acc_norm": score, "n": 50}}
    return record


def write_runs(folder, data=DATA, suite=True):
    (folder / "runs").mkdir(parents=True)
    for method, tasks in data.items():
        for task, values in tasks.items():
            for seed, (ppl, acc) in enumerate(values):
                rec = run_record(method, task, seed, ppl, acc, suite)
                (folder / "runs" / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    return folder


def table_rows(md, heading):
    """The rows of the first table after ``heading``: {method: [cells]}."""
    part = md.split(heading, 1)[1]
    rows = {}
    for line in part.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_report_sections_ranks_and_ttests(tmp_path):
    folder = write_runs(tmp_path / "exp")
    path = build_report(folder)
    assert path == folder / "report" / "report.md"
    md = path.read_text()
    rows = table_rows(md, "## Main results")
    # columns: t1 PPL, t1 acc, t2 PPL, t2 acc, seeds. base (PPL 10) is not ranked.
    assert rows["base"][0] == "10.00 ± 0.00"
    assert rows["hlora(phi=0.01)"][0].startswith("**10.50") and rows["hlora"][0].startswith("<u>11.03")
    assert rows["hlora"][1] == "**56.0 ± 1.0**" and rows["hlora-no-layer"][1].startswith("<u>54.2")
    assert rows["hlora"][3] == "**44.0 ± 1.0**" and rows["hlora-no-layer"][3] == "<u>43.0 ± 1.0</u>"
    assert rows["lora-nu-mu"][1] == "51.0 ± 1.0" and rows["base"][4] == "3"
    assert sum(line.count("**") // 2 for line in md.split("## Significance")[0].splitlines() if line.startswith("| ")) == 4

    # t-tests against lora-nu-mu, paired by seed (every method ran seeds 0-2), checked against scipy
    res = Results([json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")])
    tests = significance_tests(res, "lora-nu-mu")
    assert {t["method"] for t in tests} == set(DATA) - {"lora-nu-mu"}
    welch = table_rows(md, "## Significance")

    def values(method, task, metric):  # suite change: base's suite is 40 points, a tuned run loses (PPL - 10)
        return [{"general_ppl": ppl, "domain_acc": acc, "suite_change": -(ppl - 10.0)}[metric]
                for ppl, acc in DATA[method][task]]

    assert {t["metric"] for t in tests} == {"general_ppl", "domain_acc", "suite_change"}
    assert not [t for t in tests if t["method"] == "base" and t["metric"] == "suite_change"]  # base: no change
    for t in tests:
        a, b = values(t["method"], t["task"], t["metric"]), values("lora-nu-mu", t["task"], t["metric"])
        expected = ttest_rel(a, b)
        assert t["test"] == "paired"
        if t["method"] == "base" and t["metric"] == "general_ppl":
            assert math.isfinite(t["p"])  # zero variance on one side only: still defined
        assert t["p"] == pytest.approx(expected.pvalue, rel=1e-12)
        assert t["t"] == pytest.approx(expected.statistic, rel=1e-12)
        assert t["diff"] == pytest.approx(sum(a) / 3 - sum(b) / 3)
        column = ["t1", "t2"].index(t["task"]) * 3 + ["general_ppl", "domain_acc", "suite_change"].index(t["metric"])
        assert f"(p={t['p']:.3g})" in welch[t["method"]][column]
    assert "lora-nu-mu" not in welch
    tied = Results([{"method": m, "task": "t1", "seed": k, "general_ppl": 10.0, "tasks": {"t1": {"acc": acc}}}
                    for m, acc in (("a", 0.5), ("b", 0.6)) for k in range(2)])
    (row,) = [t for t in significance_tests(tied, "b") if t["metric"] == "domain_acc"]
    assert math.isnan(row["p"]) and math.isnan(row["t"])  # the same difference on each seed: scipy's p = 0 is no test
    hl = next(t for t in tests if (t["method"], t["task"], t["metric"]) == ("hlora", "t1", "domain_acc"))
    assert welch["hlora"][1] == f"+5.0 (p={hl['p']:.3g})"
    assert "Skipped: the reference method `lora-mu` has no runs here." in md  # the other default reference
    md = build_report(folder, output=folder / "two", reference=["hlora", "lora-nu-mu"]).read_text()
    first, second = table_rows(md, "### Against `hlora`"), table_rows(md, "### Against `lora-nu-mu`")
    assert "hlora" not in first and "lora-nu-mu" not in second and "lora-nu-mu" in first
    assert second["hlora"] == welch["hlora"] and first["lora-nu-mu"][1] == "-5.0 (p=" + welch["hlora"][1].split("=")[1]

    # cost: importance of HLoRA vs EWC and training times
    cost = table_rows(md, "## Cost")
    assert "base" not in cost
    assert cost["ewc"][1] == "6.00 ± 0.89" and cost["ewc"][2] == "8.00 ± 0.00"  # seconds 5, 6, 7 on two tasks
    assert cost["hlora"][1] == "0.50 ± 0.00" and cost["hlora"][2] == "2.00 ± 0.00"
    assert cost["lora-nu-mu"][1] == "-" and cost["lora-nu-mu"][5] == "31.0 ± 0.9" and cost["lora-nu-mu"][6] == "6"
    assert "(12× as long for EWC)" in md and "(HLoRA's is 25% of EWC's)" in md

    # sweep: phi for hlora (default 1e-3 and 0.01), lambda for ewc (default 1 and 10)
    families = sweep_families(res)
    assert sorted(families.values()) == [[(0.001, "hlora"), (0.01, "hlora(phi=0.01)")],
                                         [(1.0, "ewc"), (10.0, "ewc(lambda=10.0)")]]
    sweep = table_rows(md, "## Sweep")
    assert sweep["ewc(lambda=10.0)"][0] == "lambda=10" and sweep["hlora"][0] == "phi=0.001"

    # Pareto front on t1: means (ppl, acc)
    assert pareto_front({"a": (1.0, 1.0), "b": (2.0, 2.0), "c": (2.0, 1.5), "d": (0.5, 0.5), "e": (1.0, 1.0)}) == [
        "d", "a", "e", "b"]
    front_t1 = re.search(r"- \*\*t1\*\*: (.*)", md).group(1)
    assert front_t1 == "`base`, `hlora(phi=0.01)`, `hlora`"  # hlora-no-layer is dominated by hlora

    ablation = table_rows(md, "## Ablation")
    assert list(ablation) == ["hlora", "hlora-no-layer", "lora-nu-mu"]
    assert ablation["hlora"][1] == "**56.0 ± 1.0**" and ablation["lora-nu-mu"][0] == "13.00 ± 0.50"
    forgetting = md.split("## Forgetting on the general suite", 1)[1].split("\n\n## ", 1)[0]
    assert "| method | domain task | t2 | t1 | suite mean | domain gain | runs |" in forgetting
    # lora-nu-mu on t1: PPL 13, 13.5, 12.5 -> suite t2 falls 3, 3.5, 2.5 points below base's; domain gain 25, 27, 26
    assert "| lora-nu-mu | t1 | -3.0 ± 0.5 | - | -3.0 ± 0.5 | +26.0 ± 1.0 | 3 |" in forgetting
    assert "| lora-nu-mu | t2 | - | -4.0 ± 0.2 | -4.0 ± 0.2 | +11.0 ± 1.0 | 3 |" in forgetting
    assert "| lora-nu-mu | all | -3.0 ± 0.5 | -4.0 ± 0.2 | -3.5 ± 0.6 | +18.5 ± 8.3 | 6 |" in forgetting
    assert "| base |" not in forgetting
    # front of (suite drop, domain gain) on t1: hlora(phi=0.01) drops 0.5 for +23, hlora 1.03 for +31; every other
    # method drops more for less (ewc 2.03 for +28, hlora-no-layer 1.5 for +29.2, lora-nu-mu 3 for +26)
    assert re.search(r"- \*\*t1\*\*: (.*)", forgetting).group(1) == "`hlora(phi=0.01)`, `hlora`"
    assert "![forgetting over training](forgetting_curves.png)" in md
    for figure in ("box_general_ppl.png", "box_domain_acc.png", "sweep.png", "pareto.png", "gain_vs_drop.png",
                   "forgetting_curves.png"):
        assert f"]({figure})" in md
        assert (folder / "report" / figure).read_bytes()[:8] == PNG
    assert "Skipped" not in md


def test_sweep_on_one_task_only_shows_that_task(tmp_path):
    data = {m: dict(v) for m, v in DATA.items()}
    data["hlora(phi=0.01)"].pop("t2")
    data["ewc(lambda=10.0)"].pop("t2")
    md = build_report(write_runs(tmp_path / "r", data)).read_text()
    part = md.split("## Sweep", 1)[1].split("\n## ", 1)[0]
    assert "t1 domain acc" in part and "t2" not in part
    sweep = table_rows(md, "## Sweep")
    assert sweep["hlora(phi=0.01)"][1] == "48.0 ± 1.0" and sweep["hlora"][1] == "56.0 ± 1.0"


def test_rank_marks_ties_and_direction():
    """Competition ranking: two tied for best leave no second (dense ranking underlined b, which two methods beat);
    a tie for second marks both."""
    assert rank_marks({"a": 1.0, "b": 2.0, "c": 1.0, "d": 3.0}, lower_is_better=True) == {"a": "best", "c": "best"}
    assert rank_marks({"a": 1.0, "b": 2.0, "c": 2.0, "d": 3.0}, lower_is_better=True) == {
        "a": "best", "b": "second", "c": "second"}
    assert rank_marks({"a": 1.0, "b": 2.0, "c": 3.0}, lower_is_better=False) == {"c": "best", "b": "second"}
    assert rank_marks({"a": 1.0, "b": 2.0, "c": math.nan}, lower_is_better=False) == {"b": "best", "a": "second"}


def test_absent_data_gives_one_line_notes(tmp_path):
    data = {"base": {"t1": [(10.0, 25.0)]}, "lora-mu": {"t1": [(12.0, 40.0)]}}
    folder = write_runs(tmp_path / "small", data)
    md = build_report(folder, output=tmp_path / "out").read_text()
    assert "Skipped: the reference method `lora-nu-mu` has no runs here." in md
    assert "Skipped: no method was run at two or more values" in md
    assert "Skipped: needs `hlora`" in md
    assert "## Cost" in md and "Skipped: no run recorded" not in md
    rows = table_rows(md, "## Main results")
    assert rows["lora-mu"][:2] == ["**12.00**", "**40.0**"]  # the only ranked method, one seed: no ±
    md = build_report(folder, output=tmp_path / "out2", reference=None).read_text()
    assert "Skipped: no reference method" in md
    older = write_runs(tmp_path / "older", data, suite=False)  # records from before the general suite still load
    md = build_report(older).read_text()
    assert "Skipped: no tuned run has general-suite scores" in md and "Skipped: no run recorded scores during" in md
    only_base = write_runs(tmp_path / "base-only", {"base": {"t1": [(10.0, 25.0)]}})
    assert "Skipped: no run recorded training stages." in build_report(only_base).read_text()
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nothing-here")


def test_two_seeds_against_one_gives_differences_alone(tmp_path):
    data = {"lora-nu-mu": {"t1": [(12.0, 40.0)]}, "hlora": {"t1": [(11.0, 45.0), (11.5, 47.0)]}}
    md = build_report(write_runs(tmp_path / "x", data)).read_text()
    assert table_rows(md, "## Significance")["hlora"] == ["-0.75 (n=2/1)", "+6.0 (n=2/1)"]
    assert "No p-values: every method or the reference has fewer than two seeds" in md
    # one seed everywhere: plain differences, no "n/a" column
    data = {"lora-nu-mu": {"t1": [(12.0, 40.0)]}, "hlora": {"t1": [(11.0, 45.0)]}, "ewc": {"t1": [(13.0, 41.0)]}}
    md = build_report(write_runs(tmp_path / "y", data)).read_text()
    rows = table_rows(md, "## Significance")
    assert rows["hlora"] == ["-1.00", "+5.0"] and rows["ewc"] == ["+1.00", "+1.0"]
    assert "(p)" not in md.split("## Significance")[1].split("\n## ")[0]
    # one method tested over two seeds on each side: p-values, and the single-seed one says n/a (hlora's differences
    # vary over the two seeds: a paired test of equal differences has no p)
    data = {"lora-nu-mu": {"t1": [(12.0, 40.0), (12.5, 42.0)]}, "hlora": {"t1": [(11.0, 45.0), (11.4, 47.5)]},
            "ewc": {"t1": [(13.0, 41.0)]}}
    rows = table_rows(build_report(write_runs(tmp_path / "z", data)).read_text(), "## Significance")
    assert rows["ewc"] == ["+0.75 (p=n/a, n=1/2)", "+0.0 (p=n/a, n=1/2)"] and "p=0." in rows["hlora"][0]


def test_parse_label_inverts_method_label():
    for entry in ("hlora", {"name": "hlora", "phi": 0.01}, [{"name": "ewc", "lambda": 10.0, "anchor": "zero"}, "sam"],
                  {"name": "wise-ft", "alphas": [0.25, 0.5]}):
        label = method_label(entry)
        parsed = parse_label(label)
        items = entry if isinstance(entry, list) else [entry]
        want = [(i, {}) if isinstance(i, str) else (i["name"], {k: v for k, v in i.items() if k != "name"})
                for i in items]
        assert parsed == want, label


def test_cli_report(tmp_path, capsys):
    folder = write_runs(tmp_path / "exp")
    assert main(["report", str(folder), "--reference", "ewc", "--metric", "acc_norm"]) == 0
    out = capsys.readouterr().out
    assert "report.md" in out
    md = (folder / "report" / "report.md").read_text()
    assert "multiple-choice `acc_norm`" in md and "### Against `ewc`" in md and "### Against `lora" not in md
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_report_from_a_tiny_experiment_with_sweeps(tmp_path):
    from forgetless.config import load_experiment
    from forgetless.experiment import run_experiment
    from tests.unit.test_experiment import write_experiment
    from tests.unit.tiny_model import make_tiny_model
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model_dir = tmp_path / "tiny-model"
    make_tiny_model(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    methods = ["lora-nu-mu", "rslora", "hlora", {"name": "hlora", "phi": 0.01},
               {"name": "ewc", "samples": 4, "batch_size": 2},
               {"name": "ewc", "samples": 4, "batch_size": 2, "lambda": 10.0}]  # the default is 100
    exp = load_experiment(write_experiment(tmp_path, model_dir, methods=methods, **{"x-sizes": {"steps": 2}}))
    results = run_experiment(exp, progress=False)
    assert len(results) == 12
    out = tmp_path / "out"
    # per seed: lora-nu-mu's (ewc shares it and computes its Fisher at the domain start), rslora, one hlora stage
    # shared by both phi
    assert len(list((out / "stages").iterdir())) == 6
    assert not list((out / "stages").glob("*/ewc_fisher.safetensors"))
    md = build_report(out).read_text()
    cost = table_rows(md, "## Cost")
    assert cost["ewc(batch_size=2,samples=4)"][0].startswith("ewc: diagonal Fisher (sampled")
    assert cost["hlora"][0].startswith("hlora: path") and cost["lora-nu-mu"][0] == "-"
    assert "EWC's Fisher" in md
    families = sweep_families(Results(results))
    assert sorted(len(v) for v in families.values()) == [2, 2]
    # a run that left the weight out sits at the default it ran under (its record's identity says so)
    weights = {label: w for family in families.values() for w, label in family}
    assert weights["hlora"] == 10.0 and weights["ewc(batch_size=2,samples=4)"] == 100.0
    assert "## Ablation" in md and "Skipped: needs" not in md  # hlora and lora-nu-mu are enough


def test_a_run_with_a_non_finite_score_is_never_ranked(tmp_path):
    """An older forgetless recorded diverged runs (PPL NaN or inf, with an accuracy above every other method's): the
    report and the result tables leave them out and name them."""
    from forgetless.reporting.tables import write_tables

    data = {"lora-nu-mu": DATA["lora-nu-mu"], "hlora": DATA["hlora"],
            "diverged": {"t1": [(float("nan"), 99.0), (float("inf"), 99.0)]}}
    folder = write_runs(tmp_path / "exp", data)
    md = build_report(folder).read_text()
    rows = table_rows(md, "## Main results")
    assert "diverged" not in rows and rows["hlora"][1] == "**56.0 ± 1.0**" and rows["hlora"][0].startswith("**11.03")
    assert ("Left out: 2 run(s) with a non-finite score (training diverged), never ranked: diverged__t1__seed0, "
            "diverged__t1__seed1.") in md
    assert "diverged" not in md.split("Left out")[1].split("\n", 1)[1]  # in no section, no figure

    runs = [json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")]
    table = write_tables(runs, tmp_path)
    assert "diverged" not in table and "| hlora | 11.033 ± 0.153 | 56.0 ± 1.0 |" in table
    assert "Left out: 2 run(s)" in (tmp_path / "results.md").read_text()


def test_evaluation_variants_are_methods_of_their_own(tmp_path):
    """WiSE-FT's interpolations (a run's ``variants``) get rows in every table with their own scores, and no training
    cost of their own."""
    folder = write_runs(tmp_path / "exp", {k: DATA[k] for k in ("base", "lora-nu-mu")})
    for seed, (ppl, acc) in enumerate(DATA["lora-nu-mu"]["t1"]):
        rec = run_record("wise-ft", "t1", seed, ppl, acc)
        rec["variants"] = {f"wise-ft(alpha={a})": {"general_ppl": 10.0 + 10 * a + seed, "tasks": {"t1": {
            "acc": (30 + 40 * a) / 100, "acc_norm": 0.3, "n": 100}}, "suite": {"t2": {"acc": 0.40 - a / 10,
                                                                                   "acc_norm": 0.3, "n": 50}}}
            for a in (0.25, 0.5)}
        (folder / "runs" / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    md = build_report(folder).read_text()
    assert "15 runs (and 6 evaluation variants of them" in md
    main_rows = table_rows(md, "## Main results")
    assert list(main_rows)[-3:] == ["wise-ft", "wise-ft(alpha=0.25)", "wise-ft(alpha=0.5)"]
    # PPL 15, 16, 17; acc 50: third (lora-nu-mu and wise-ft tie for best at 51), so not underlined
    assert main_rows["wise-ft(alpha=0.5)"][:2] == ["16.00 ± 1.00", "50.0 ± 0.0"]
    assert main_rows["wise-ft"][1] == main_rows["lora-nu-mu"][1] == "**51.0 ± 1.0**"
    cost = table_rows(md, "## Cost")
    assert "wise-ft" in cost and not any(m.startswith("wise-ft(") for m in cost)
    forgetting = table_rows(md, "## Forgetting on the general suite")
    assert forgetting["wise-ft(alpha=0.25)"][1] == "-2.5 ± 0.0"  # 0.40 - 0.025 against base's 0.40
    # a variant whose label does not name its run's method keeps the method in front
    (run,) = [r for r in with_variants([run_record("sam", "t1", 0, 12.0, 50.0) | {
        "variants": {"ema": {"general_ppl": 11.0, "tasks": {}}}}]) if "variant_of" in r]
    assert run["method"] == "sam @ ema" and run["run_id"] == "sam__t1__seed0@ema"


def test_a_folder_of_json_files_keeps_the_run_records_and_says_what_it_skipped(tmp_path, capsys):
    """`forgetless report FOLDER` on a plain folder (not an experiment's output): JSON files that are not run records
    are skipped, and one line says which and why, where before they vanished silently."""
    import json

    from forgetless.reporting.report import load_runs

    record = {"method": "lora-mu", "task": "t", "seed": 0, "general_ppl": 3.5, "tasks": {"t": {"acc": 0.5}}}
    (tmp_path / "a.json").write_text(json.dumps(record))
    (tmp_path / "b.json").write_text(json.dumps({k: v for k, v in record.items() if k != "tasks"}))
    (tmp_path / "c.json").write_text("{not json")
    assert load_runs(tmp_path) == [record]
    err = capsys.readouterr().err
    assert "skipped 2 JSON file(s)" in err and "b.json (lacks the field 'tasks')" in err and "c.json (not a JSON" in err


def test_runs_scored_on_different_items_are_named_in_the_report(tmp_path, capsys):
    """A `base` run scored on 1 held-out block and 4 test items beside tuned runs scored on 2 and 8: the report would
    read as if tuning halved the perplexity. It says, task by task, which setting differs and for which runs; runs
    scored alike (whatever their training) get no such note."""
    from forgetless.reporting.report import build_report
    from forgetless.reporting.tables import scoring_note

    def record(method, seed, heldout, test_limit, lr=None):
        settings = {"model": "m", "precision": "fp32", "general": {"heldout": heldout, "block_size": 64},
                    "task": {"name": "t", "test": "t.jsonl", "test_limit": test_limit}, "seed": seed}
        if lr is not None:
            settings["train"] = {"domain": {"lr": lr}}
        return {"run_id": f"{method}__t__seed{seed}", "method": method, "task": "t", "seed": seed, "model": "m",
                "general_ppl": 50.0 + seed, "tasks": {"t": {"acc": 0.5, "acc_norm": 0.5}}, "settings": settings}

    alike = [record("lora-mu", s, {"source": "h.jsonl", "max_blocks": 2}, 8, lr=1e-3) for s in (0, 1)]
    alike.append(record("base", 0, {"source": "h.jsonl", "max_blocks": 2}, 8))
    assert scoring_note(alike) == ""
    odd = record("base", 1, {"source": "h.jsonl", "max_blocks": 1}, 4)
    note = scoring_note(alike + [odd])
    assert note.startswith("\n**Not scored alike.**")
    assert ('- task t, general.heldout: {"max_blocks": 1, "source": "h.jsonl"} (base__t__seed1); '
            '{"max_blocks": 2, "source": "h.jsonl"} (lora-mu__t__seed0 and 2 more)') in note
    assert "- task t, task.test_limit: 4 (base__t__seed1); 8 (lora-mu__t__seed0 and 2 more)" in note
    assert len(note.splitlines()) == 4  # the two differences only: training settings and seeds are not scoring
    (tmp_path / "runs").mkdir()
    for r in alike + [odd]:
        (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    text = build_report(tmp_path).read_text()
    assert "**Not scored alike.**" in text and "- task t, task.test_limit: 4 (base__t__seed1); 8 (" in text
    assert "not scored alike" in capsys.readouterr().err

    # precision as the run resolved it (`computed`); an older record asked for "auto" says nothing about it
    older = [dict(r, settings=dict(r["settings"], precision="auto")) for r in alike]
    newer = dict(record("base", 2, {"source": "h.jsonl", "max_blocks": 2}, 8),
                 computed={"device": "cpu", "precision": "bf16", "base_dtype": "bf16"})
    assert scoring_note(older + [newer]) == ""
    assert ('- task t, precision: "bf16" (base__t__seed2); "fp32" (lora-mu__t__seed0 and 2 more)'
            in scoring_note(alike + [newer]))  # pinned fp32 against a run computed in bf16
    # which split of a hub dataset was scored, and the harness version that defines the suite's harness tasks
    split = record("base", 3, {"source": "h.jsonl", "max_blocks": 2}, 8)
    split["settings"]["task"]["test_split"] = "validation"
    assert "- task t, task.test_split: \"validation\" (base__t__seed3); default (" in scoring_note(alike + [split])
    harness = [dict(r, settings=dict(r["settings"], lm_eval=v)) for r, v in zip(alike, ("0.4.13", "0.4.13", "0.4.9"))]
    assert '- task t, lm_eval: "0.4.9" (base__t__seed0); "0.4.13" (lora-mu__t__seed0 and 1 more)' in \
        scoring_note(harness)


def test_equal_suite_changes_stay_equal_whatever_the_summation_order():
    """Two methods with the same suite change in exact arithmetic (+32/27 points: item counts over 300 items), computed
    in another order, differed by 6e-16: the Pareto front of gain against drop then kept the dominated one (the
    recorded lr 3e-3 report listed WiSE-FT 0.75 beside ewc, which has the same drop and a larger gain)."""
    from forgetless.reporting.forgetting import MEAN, gain_drop_front

    rows = [{"method": "ewc", "task": "t", "seed": 0, "gain": 15.4, "forgetting": {MEAN: 1.1851851851851867}},
            {"method": "wise-ft", "task": "t", "seed": 0, "gain": 14.87, "forgetting": {MEAN: 1.1851851851851873}}]
    assert gain_drop_front(rows, "t") == ["ewc"]


def test_the_flatness_section_counts_the_suite_change_in_the_reports_metric(tmp_path):
    """A report by acc_norm showed the flatness correlations against the suite change by acc."""
    from forgetless.reporting.flatness import flatness_rows

    def run(method, acc, acc_norm):
        return {"method": method, "task": "t", "seed": 0, "general_ppl": 10.0, "tasks": {"t": {"acc": 0.5,
                "acc_norm": 0.5}}, "suite": {"s": {"acc": acc, "acc_norm": acc_norm}},
                "landscape": {"metrics": {"surface_curvature": 1.0}}}

    runs = [run("base", 0.50, 0.60), run("lora-mu", 0.52, 0.55)]
    by = {m: next(r for r in flatness_rows(runs, metric=m) if r["method"] == "lora-mu")["suite_forgetting"]
          for m in ("acc", "acc_norm")}
    assert by == {"acc": pytest.approx(2.0), "acc_norm": pytest.approx(-5.0)}


def test_the_cost_section_names_runs_resumed_from_a_checkpoint():
    """A resumed stage's time includes the sessions before the resume when its checkpoint kept it; one written by an
    older version did not, so that run's times are lower bounds, and the section says which runs those are."""
    from forgetless.reporting.report import section_cost

    def run(seed, extras=None):
        stage = {"stage": "domain", "steps": 10, "seconds": 100.0 + seed, **({"extras": extras} if extras else {})}
        return {"run_id": f"lora-mu__t__seed{seed}", "method": "lora-mu", "task": "t", "seed": seed,
                "general_ppl": 10.0, "tasks": {"t": {"acc": 0.5}}, "stages": [stage]}

    plain = section_cost(Results([run(0), run(1)]))
    assert "| lora-mu | - | - | - | - | 100.5 ± 0.7 | 100.5 ± 0.7 | 2 |" in plain and "Resumed" not in plain
    text = section_cost(Results([run(0), run(1, {"resumed_from_step": 4, "seconds_before_resume": 40.0}),
                                 run(2, {"resumed_from_step": 8, "seconds_before_resume": None})]))
    assert ("Resumed from a checkpoint: `lora-mu__t__seed1`, `lora-mu__t__seed2`; their stage times include the "
            "sessions before the resume, except for `lora-mu__t__seed2`, whose checkpoint (an older version's) did not "
            "keep its time: theirs are lower bounds.") in text


def test_records_without_a_general_perplexity_make_a_report(tmp_path):
    """``forgetless train`` without held-out text records ``general_ppl: null`` (the schema allows it): the report
    and the tables leave the perplexity empty instead of failing on float(None)."""
    from forgetless.reporting.report import build_report
    from forgetless.reporting.tables import write_tables

    (tmp_path / "runs").mkdir()
    records = [{"run_id": f"{m}__A__seed{s}", "method": m, "task": "A", "seed": s, "general_ppl": None,
                "tasks": {"A": {"acc": 0.5 + 0.1 * s, "acc_norm": 0.5}}} for m in ("base", "lora-mu") for s in (0, 1)]
    for r in records:
        (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    md = build_report(tmp_path).read_text()
    assert "## Main results" in md
    write_tables(records, tmp_path)
    assert "| lora-mu |" in (tmp_path / "results.md").read_text()


def test_a_cell_over_fewer_seeds_says_so_and_is_not_ranked(tmp_path):
    """hlora with seed 0 only beside lora-mu's three seeds: its single number was marked best among 3-seed means,
    and the seeds column (the union over tasks) hid that it had one."""
    from forgetless.reporting.report import build_report

    (tmp_path / "runs").mkdir()
    records = [{"run_id": f"lora-mu__A__seed{s}", "method": "lora-mu", "task": "A", "seed": s, "general_ppl": 10.0 + s,
                "tasks": {"A": {"acc": 0.5 + 0.01 * s, "acc_norm": 0.5}}} for s in range(3)]
    records += [{"run_id": "lora-nu-mu__A__seed" + str(s), "method": "lora-nu-mu", "task": "A", "seed": s,
                 "general_ppl": 11.0, "tasks": {"A": {"acc": 0.45, "acc_norm": 0.5}}} for s in range(3)]
    records.append({"run_id": "hlora__A__seed0", "method": "hlora", "task": "A", "seed": 0, "general_ppl": 9.0,
                    "tasks": {"A": {"acc": 0.9, "acc_norm": 0.5}}})
    for r in records:
        (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    rows = table_rows(build_report(tmp_path).read_text(), "## Main results")
    assert rows["hlora"][:2] == ["9.00 (n=1)", "90.0 (n=1)"]  # shown with its n, neither bold nor underlined
    assert rows["lora-mu"][:2] == ["**11.00 ± 1.00**", "**51.0 ± 1.0**"]
    from forgetless.reporting.tables import summary_table

    _, plain = summary_table(records)
    assert plain[2] == ["hlora", "9.000 (n=1)", "90.0 (n=1)", "50.0 (n=1)", "1"] and "(n=" not in plain[0][1]


def test_gathered_records_that_repeat_a_seed_or_mix_settings_are_named(tmp_path, capsys):
    """`forgetless report` over records gathered from two folders counted a repeated method/task/seed as one more
    seed, and averaged runs of another learning rate into a method's mean, without a word."""
    folder = tmp_path / "gathered"
    folder.mkdir()
    for seed, lr in ((0, 2e-3), (1, 2e-3), (0, 3e-3)):
        rec = run_record("lora-mu", "t1", seed, 12.0 + seed, 60.0)
        rec["settings"] = {"seed": seed, "train": {"domain": {"lr": lr}}, "model": "tiny"}
        (folder / f"lr{lr}_seed{seed}.json").write_text(json.dumps(rec))
    base = run_record("base", "t1", 0, 10.0, 50.0)
    (folder / "base.json").write_text(json.dumps(base))
    md = build_report(folder).read_text()
    assert "**Duplicate runs:** 1 method, task and seed have more than one record" in md
    assert "`lora-mu` on t1, seed 0 (2 records)" in md
    assert "**Mixed settings:**" in md and "`lora-mu` on t1 (2 settings)" in md
    assert "repeat a method, task and seed" in capsys.readouterr().err
    # one folder's records, one setting per method: neither note
    clean = build_report(write_runs(tmp_path / "clean")).read_text()
    assert "Duplicate runs" not in clean and "Mixed settings" not in clean


def test_runs_of_the_same_seeds_are_compared_pair_by_pair(tmp_path):
    """Welch's test treated the seeds of two methods as independent samples: a gain of one point on each of five
    seeds, which share data order and initialization, got p = 0.85 from the seed-to-seed spread. The test is now
    paired by seed (scipy's ttest_rel) where both sides ran the same seeds, and Welch's (said in the cell) where not."""
    spread = [40.0, 50.0, 60.0, 45.0, 55.0]
    data = {"lora-mu": {"t1": [(12.0, acc) for acc in spread]},
            "hlora": {"t1": [(12.0 - 0.1 * k, acc + 1.0 + 0.1 * k) for k, acc in enumerate(spread)]},
            "ewc": {"t1": [(12.0, acc + 1.0) for acc in spread[:4]]}}  # seeds 0-3 only: no pairs for seed 4
    folder = write_runs(tmp_path / "r", data=data, suite=False)
    res = Results([json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")])
    rows = {(t["method"], t["metric"]): t for t in significance_tests(res, "lora-mu")}
    hl = rows[("hlora", "domain_acc")]
    a, b = [acc + 1.0 + 0.1 * k for k, acc in enumerate(spread)], spread
    assert hl["test"] == "paired" and hl["p"] == pytest.approx(ttest_rel(a, b).pvalue, rel=1e-12)
    assert hl["p"] < 1e-3 < 0.8 < ttest_ind(a, b, equal_var=False).pvalue
    ewc = rows[("ewc", "domain_acc")]
    ewc_acc = [acc + 1.0 for acc in spread[:4]]
    assert ewc["test"] == "welch"
    assert ewc["p"] == pytest.approx(ttest_ind(ewc_acc, spread, equal_var=False).pvalue, rel=1e-12)
    md = build_report(folder, reference="lora-mu").read_text()
    cells = table_rows(md, "## Significance")
    assert cells["hlora"][1] == f"+1.2 (p={hl['p']:.3g})"
    assert cells["ewc"][1] == f"-0.2 (p={ewc['p']:.3g}, n=4/5, Welch)"  # 49.75 - 50
    # --test welch: Welch's throughout, as the reports of docs/results were written
    welch = {(t["method"], t["metric"]): t for t in significance_tests(res, "lora-mu", test="welch")}
    assert welch[("hlora", "domain_acc")]["test"] == "welch"
    assert welch[("hlora", "domain_acc")]["p"] == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    assert main(["report", str(folder), "--reference", "lora-mu", "--test", "welch", "--output",
                 str(tmp_path / "w")]) == 0
    cells = table_rows((tmp_path / "w" / "report.md").read_text(), "## Significance")
    assert cells["hlora"][1] == f"+1.2 (p={welch[('hlora', 'domain_acc')]['p']:.3g})"  # every cell is Welch's
    assert "two-sided Welch's t-test over seeds" in (tmp_path / "w" / "report.md").read_text()


def test_cells_that_print_alike_share_their_mark_and_odd_seed_counts_are_said(tmp_path):
    """Marks were decided on unrounded means: two cells printed 42.60 and only one was bold. The Welch table said
    nothing when a method had fewer seeds than its reference."""
    data = {"base": {"t1": [(10.0, 50.0)] * 3},
            "lora-mu": {"t1": [(42.601, 60.0), (42.601, 61.0), (42.601, 62.0)]},
            "lora-nu-mu": {"t1": [(42.604, 60.0), (42.604, 61.0), (42.604, 62.0)]},
            "hlora": {"t1": [(42.70, 59.0), (42.70, 60.0)]},
            "ewc": {"t1": [(43.00, 58.0), (43.10, 58.5), (43.20, 59.0)]}}
    md = build_report(write_runs(tmp_path / "r", data=data, suite=False), reference="lora-mu").read_text()
    main = table_rows(md, "## Main results")
    assert main["lora-mu"][0] == main["lora-nu-mu"][0] == "**42.60 ± 0.00**"
    assert main["ewc"][0] == "43.10 ± 0.10"  # third after the two tied for best; hlora has 2 of 3 seeds: not ranked
    welch = next(line for line in md.splitlines() if line.startswith("| hlora | ") and "(p=" in line)
    assert "n=2/3" in welch
    assert "n=" not in next(line for line in md.splitlines() if line.startswith("| ewc | ") and "(p=" in line)


def test_a_record_from_before_the_suite_was_in_a_runs_identity_is_not_a_mixed_setting():
    """An experiment takes a record written before session 33 (no "suite" in its settings) beside newer seeds that
    have it: the report called them mixed settings. The suite is left to the scoring note, which knows the older
    record does not say; another learning rate is still mixed."""
    from forgetless.reporting.tables import gathered_note

    settings = {"model": "m", "train": {"domain": {"lr": 0.001}}}
    old = {"method": "lora-mu", "task": "gen", "seed": 0, "settings": settings | {"seed": 0}}
    new = {"method": "lora-mu", "task": "gen", "seed": 1,
           "settings": settings | {"seed": 1, "suite": {"arc": {"test": "arc.jsonl"}}}}
    assert gathered_note([old, new]) == ""
    other = {"method": "lora-mu", "task": "gen", "seed": 2,
             "settings": {"model": "m", "train": {"domain": {"lr": 0.01}}, "seed": 2}}
    assert "`lora-mu` on gen (2 settings)" in gathered_note([old, new, other])
