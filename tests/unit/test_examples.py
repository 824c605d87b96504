"""The shipped example experiments parse and name only known methods, tasks and options."""

from pathlib import Path

import pytest

from forgetless.config import load_experiment
from forgetless.methods import resolve

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_experiment_loads(path):
    exp = load_experiment(path)
    assert exp.tasks and exp.methods and len(exp.method_tasks) == len(exp.methods)
    for entry, tasks in zip(exp.methods, exp.method_tasks):
        resolve(entry)  # builds every plugin with its options
        assert tasks is None or set(tasks) <= {t.name for t in exp.tasks}


def test_paper_tables_sweeps_piqa_only():
    exp = load_experiment(Path(__file__).resolve().parents[2] / "examples" / "paper_tables.yaml")
    assert len(exp.seeds) >= 3 and {t.name for t in exp.tasks} == {"piqa", "medmcqa", "arc_easy"}
    assert [t for t in exp.method_tasks if t is not None] == [["piqa"]] * 4


@pytest.mark.parametrize("name", ["paper_tables.yaml", "hlora_shared.yaml", "sam_shared.yaml"])
def test_the_recorded_examples_run_what_was_recorded(name):
    """These files are the configurations of docs/results/paper, hlora and sam, recorded before issue #13 changed
    the methods' defaults. Every option whose default changed since is written in them (the identity adds none), and
    HLoRA is the formula as recorded: absolute xi, Omega as summed, phi on the absolute scale."""
    from forgetless.methods import _normalize, identity_entries

    exp = load_experiment(Path(__file__).resolve().parents[2] / "examples" / name)
    hloras = 0
    for entry in exp.methods:
        items = _normalize(entry)
        assert identity_entries(items) == items, entry
        for item in items:
            if item["name"].startswith("hlora"):
                hloras += 1
                assert (item["phi_scale"], item["xi_mode"], item["xi"], item["nonnegative"]) == \
                    ("absolute", "absolute", 1e-3, "none"), entry
            if item["name"] == "replay":
                assert item["by"] == "examples"
    assert hloras


def test_the_readme_lists_every_training_setting_at_its_default():
    """README's "Training settings" block: every key of TrainConfig that a YAML sets, at its default."""
    from dataclasses import MISSING, fields

    import yaml

    from forgetless.training.config import TrainConfig

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("### Training settings"):]
    listed = yaml.safe_load(section[section.index("```yaml") + 7:section.index("```\n")])["train"]["domain"]
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(TrainConfig)
                if f.name != "progress"}  # progress: the CLI's --quiet
    assert listed == defaults
