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
