"""The offline demo's data: fact table, generated multiple-choice task, general text."""

from __future__ import annotations

from collections import defaultdict

import pytest

from forgetless.data.demo import (
    DEMO_HELDOUT_TEXT,
    DEMO_TEMPLATES,
    Fact,
    demo_general_prompts,
    demo_task,
    load_facts,
    relation_values,
)


def _truth() -> dict[str, dict[str, str]]:
    truth: dict[str, dict[str, str]] = defaultdict(dict)
    for f in load_facts():
        truth[f.entity][f.relation] = f.value
    return truth


def _fact_of(item, split: str) -> tuple[str, str]:
    """Recover (entity, relation) of an item from its context."""
    for relation, templates in DEMO_TEMPLATES.items():
        prefix, suffix = templates[split].split("{entity}")
        if item.context.startswith(prefix) and item.context.endswith(suffix):
            return item.context[len(prefix) : len(item.context) - len(suffix)], relation
    raise AssertionError(f"context matches no template: {item.context!r}")


def test_table_loads():
    facts = load_facts()
    assert 40 <= len(facts) <= 60
    assert all(isinstance(f, Fact) for f in facts)
    assert {f.relation for f in facts} == set(DEMO_TEMPLATES)
    assert len({(f.entity, f.relation) for f in facts}) == len(facts)


def test_every_relation_has_at_least_four_short_values():
    values = relation_values(load_facts())
    for relation, vals in values.items():
        assert len(vals) >= 4, relation
        assert all(1 <= len(v.split()) <= 2 for v in vals), vals


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_index_true_value_and_distractors_from_same_relation(split):
    truth = _truth()
    values = relation_values(load_facts())
    items = demo_task(split)
    assert len(items) == len(load_facts())
    for item in items:
        entity, relation = _fact_of(item, split)
        assert len(item.choices) == 4
        assert len(set(item.choices)) == 4
        assert item.choices[item.answer] == truth[entity][relation]
        distractors = [c for i, c in enumerate(item.choices) if i != item.answer]
        assert truth[entity][relation] not in distractors
        assert all(d in values[relation] for d in distractors)
        assert item.target_delimiter == " "


def test_train_and_test_cover_same_facts_with_different_contexts():
    train, test = demo_task("train"), demo_task("test")
    train_facts = [_fact_of(i, "train") for i in train]
    test_facts = [_fact_of(i, "test") for i in test]
    assert train_facts == test_facts
    assert len(set(train_facts)) == len(train_facts)
    assert not {i.context for i in train} & {i.context for i in test}
    for relation, t in DEMO_TEMPLATES.items():
        assert t["train"] != t["test"], relation


def test_deterministic_for_seed_and_varies_with_seed():
    assert demo_task("test", seed=3) == demo_task("test", seed=3)
    a, b = demo_task("test", seed=0), demo_task("test", seed=1)
    assert [i.choices for i in a] != [i.choices for i in b]
    # the answer position is shuffled, not constant
    assert len({i.answer for i in a}) > 1


def test_n_choices():
    items = demo_task("train", n_choices=2)
    assert all(len(i.choices) == 2 for i in items)
    with pytest.raises(ValueError):
        demo_task("train", n_choices=1)
    with pytest.raises(ValueError):
        demo_task("train", n_choices=50)
    with pytest.raises(ValueError):
        demo_task("validation")


def test_malformed_row_names_the_line(tmp_path):
    path = tmp_path / "facts.tsv"
    path.write_text(
        "# comment\n"
        "velmora\ttreats\tlungs\n"
        "\n"
        "quist root\ttreats liver\n",  # only two fields
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="line 4"):
        load_facts(path)


@pytest.mark.parametrize(
    "row",
    ["a\tflies to\tmoon\n", "a\ttreats\t\n", "a\ttreats\tlungs\na\ttreats\tliver\n"],
)
def test_other_bad_rows_raise(tmp_path, row):
    path = tmp_path / "facts.tsv"
    path.write_text(row, encoding="utf-8")
    with pytest.raises(ValueError, match="line"):
        load_facts(path)


def test_general_text():
    prompts = demo_general_prompts()
    assert 12 <= len(prompts) <= 24
    assert len(set(prompts)) == len(prompts)
    assert all(p.strip() and "Corvath" not in p for p in prompts)
    words = DEMO_HELDOUT_TEXT.split()
    assert 300 <= len(words) <= 600
    assert "Corvath" not in DEMO_HELDOUT_TEXT


def test_the_demo_samples_its_general_text_again_for_another_model_and_can_redo_changed_runs(tmp_path, monkeypatch):
    """`demo --model other` into the same folder kept the first model's sampled text, and refused to go on ("run
    again with --rerun-changed") with no such flag to give."""
    import forgetless.demo as demo
    import forgetless.experiment as experiment
    from forgetless.cli import main

    sampled = []
    monkeypatch.setattr(demo, "sample_general_text", lambda model, seed=0: sampled.append(model) or [f"by {model}"])
    demo.demo_experiment(tmp_path, model="a")
    demo.demo_experiment(tmp_path, model="a")
    assert sampled == ["a"]  # kept while the model is the same
    demo.demo_experiment(tmp_path, model="b")
    assert sampled == ["a", "b"] and "by b" in (tmp_path / "general_sampled.jsonl").read_text()

    class Stop(Exception):
        pass

    asked = {}

    def run_experiment(exp, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(experiment, "run_experiment", run_experiment)
    with pytest.raises(Stop):
        main(["demo", "--model", "b", "--output", str(tmp_path), "--rerun-changed", "--quiet"])
    assert asked["rerun_changed"] is True
    # runs recorded with model b: demo --model c without --rerun-changed is refused before the text is sampled again
    # or a file rewritten (it was refused only after that)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "base__corvath__seed0.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main(["demo", "--model", "c", "--output", str(tmp_path), "--quiet"]) == 2
    assert sampled == ["a", "b"] and {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_sample_from_before_the_note_counts_as_the_default_models(tmp_path, monkeypatch):
    import forgetless.demo as demo

    sampled = []
    monkeypatch.setattr(demo, "sample_general_text", lambda model, seed=0: sampled.append(model) or [f"by {model}"])
    (tmp_path / "general_sampled.jsonl").write_text('{"text": "old"}\n')  # no general_sampled.model beside it
    demo.demo_experiment(tmp_path, model=demo.DEFAULT_MODEL)
    assert sampled == [] and "old" in (tmp_path / "general_sampled.jsonl").read_text()
    (tmp_path / "general_sampled.model").unlink()
    demo.demo_experiment(tmp_path, model="other")
    assert sampled == ["other"]


def test_the_demo_writes_only_into_a_new_empty_or_demo_folder(tmp_path, monkeypatch, capsys):
    """demo --output on a folder of the user's (an experiment.yaml of theirs, a heldout.txt) is refused in one line
    and nothing there changes; a new folder, an empty one and an earlier demo's are written."""
    import forgetless.demo as demo
    from forgetless.cli import main

    monkeypatch.setattr(demo, "sample_general_text", lambda model, seed=0: ["sampled"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "experiment.yaml").write_text("name: my-study\n")
    (mine / "heldout.txt").write_text("my text")
    assert main(["demo", "--output", str(mine), "--quiet"]) == 2
    assert "not a forgetless demo's" in capsys.readouterr().err
    assert (mine / "experiment.yaml").read_text() == "name: my-study\n" and (mine / "heldout.txt").read_text() == \
        "my text" and sorted(p.name for p in mine.iterdir()) == ["experiment.yaml", "heldout.txt"]
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new", tmp_path / "empty", tmp_path / "new"):  # the last: an earlier demo's
        assert demo.demo_experiment(folder).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="a file, not a folder"):
        demo.demo_experiment(tmp_path / "file")
