"""``forgetless merge``: results folders of one experiment, run in parts, gathered into one without losing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgetless.cli import main
from forgetless.config import ConfigError
from forgetless.experiment import output_lock
from forgetless.merge import merge_results
from forgetless.reporting.tables import load_results


def _run(folder: Path, rid: str, ppl: float, landscape: bool = False, stage: str | None = None) -> None:
    """A finished run as `forgetless run` leaves it: record, adapter folder, optionally landscape and a stage."""
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    record = {"run_id": rid, "method": rid.split("__")[0], "task": rid.split("__")[1], "seed": 0, "general_ppl": ppl,
              "tasks": {}, "settings_digest": "d"}
    (folder / "runs" / f"{rid}.json").write_text(json.dumps(record))
    adapter = folder / "adapters" / rid
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(f"weights of {rid} in {folder.name}".encode())
    if landscape:
        (folder / "landscape" / rid).mkdir(parents=True)
        (folder / "landscape" / rid / "surface.npz").write_bytes(b"grid")
    if stage:
        (folder / "stages" / stage).mkdir(parents=True, exist_ok=True)
        (folder / "stages" / stage / "adapter_model.safetensors").write_bytes(f"stage {stage}".encode())


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".forgetless.lock"}


def test_merge_copies_every_run_with_its_files_and_leaves_the_sources(tmp_path):
    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0, stage="general-1")
    _run(b, "hlora__t__seed0", 9.0, landscape=True, stage="general-2")
    _run(b, "hlora__t__seed1", 9.5, stage="domain-3")
    before_a, before_b = _tree(a), _tree(b)
    summary = merge_results(dest, [a, b])
    assert summary.copied == {str(a): ["lora-mu__t__seed0"], str(b): ["hlora__t__seed0", "hlora__t__seed1"]}
    assert sorted(summary.stages) == ["domain-3", "general-1", "general-2"]
    assert "merge: 3 cached stage(s) copied (2 general, 1 domain)" in summary.lines(dest)  # domain ones were "general"
    merged = _tree(dest)
    for src, tree in ((a, before_a), (b, before_b)):
        assert _tree(src) == tree  # sources only read
        for name, content in tree.items():
            assert merged[name] == content
    assert set(merged) == set(before_a) | set(before_b)
    assert sorted(r["run_id"] for r in load_results(dest)) == ["hlora__t__seed0", "hlora__t__seed1",
                                                               "lora-mu__t__seed0"]
    assert not list(dest.rglob("*.merging"))


def test_merge_again_skips_identical_runs(tmp_path):
    a, dest = tmp_path / "a", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0)
    merge_results(dest, [a])
    _run(a, "lora-mu__t__seed1", 11.0)  # a run finished in the source since
    summary = merge_results(dest, [a])
    assert summary.skipped == ["lora-mu__t__seed0"]
    assert summary.copied == {str(a): ["lora-mu__t__seed1"]}


def test_a_run_recorded_differently_is_refused_and_nothing_is_copied(tmp_path):
    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0)
    _run(b, "lora-mu__t__seed0", 10.5)  # the same run id, other numbers
    _run(b, "sam__t__seed0", 9.0)  # no conflict, but the merge is all or nothing
    with pytest.raises(ConfigError) as err:
        merge_results(dest, [a, b])
    message = str(err.value)
    assert "lora-mu__t__seed0" in message and str(a / "runs" / "lora-mu__t__seed0.json") in message
    assert str(b / "runs" / "lora-mu__t__seed0.json") in message and "nothing was copied" in message
    assert _tree(dest) == {}
    # the same against a record already in the destination
    merge_results(dest, [a])
    before = _tree(dest)
    with pytest.raises(ConfigError, match="1 run"):
        merge_results(dest, [b])
    assert _tree(dest) == before


def test_leftovers_of_an_unrecorded_run_in_the_destination_are_kept_aside(tmp_path):
    a, dest = tmp_path / "a", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0)
    leftover = dest / "adapters" / "lora-mu__t__seed0"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"interrupted here")
    (dest / "runs").mkdir()
    summary = merge_results(dest, [a])
    assert summary.set_aside == [str(leftover)]
    kept = dest / "adapters" / "lora-mu__t__seed0.unrecorded" / "adapter_model.safetensors"
    assert kept.read_bytes() == b"interrupted here"
    assert (leftover / "adapter_model.safetensors").read_bytes() == b"weights of lora-mu__t__seed0 in a"


def test_a_running_source_gives_its_finished_runs_and_a_busy_destination_is_refused(tmp_path):
    a, dest = tmp_path / "a", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0, stage="general-1")
    (a / "adapters" / "sam__t__seed0").mkdir()  # a run in progress: adapter saved, record not yet written
    (a / "stages" / "general-2.tmp").mkdir()  # a general stage being written
    with output_lock(a):
        summary = merge_results(dest, [a])
    assert summary.copied == {str(a): ["lora-mu__t__seed0"]} and summary.stages == ["general-1"]
    assert not (dest / "adapters" / "sam__t__seed0").exists() and not (dest / "stages" / "general-2.tmp").exists()
    before = _tree(dest)
    with output_lock(dest), pytest.raises(ConfigError, match="in use by another forgetless run"):
        merge_results(dest, [a])
    assert _tree(dest) == before


def test_flatness_measured_since_the_last_merge_updates_the_run(tmp_path):
    a, dest = tmp_path / "a", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0)
    merge_results(dest, [a])
    path = a / "runs" / "lora-mu__t__seed0.json"
    record = json.loads(path.read_text())
    for entry, files in (({"digest": "x", "curvature": 1.0}, ["surface.npz"]),
                         ({"digest": "x", "curvature": 1.0, "all_weights": {"digest": "y"}},
                          ["surface.npz", "all_weights/surface.npz"])):
        (a / "landscape" / "lora-mu__t__seed0" / "all_weights").mkdir(parents=True, exist_ok=True)
        for name in files:
            (a / "landscape" / "lora-mu__t__seed0" / name).write_bytes(name.encode())
        path.write_text(json.dumps(record | {"landscape": entry}))
        summary = merge_results(dest, [a])
        assert summary.updated == ["lora-mu__t__seed0"] and not summary.copied
        assert _tree(dest) == {k: v for k, v in _tree(a).items() if not k.startswith("stages")}
    assert merge_results(dest, [a]).skipped == ["lora-mu__t__seed0"]
    # flatness that differs (not measured further: measured otherwise) is a conflict like any other number
    path.write_text(json.dumps(record | {"landscape": {"digest": "z", "curvature": 2.0}}))
    with pytest.raises(ConfigError, match="recorded differently"):
        merge_results(dest, [a])


def test_a_source_that_is_not_a_results_folder_is_refused(tmp_path):
    a, dest = tmp_path / "a", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no runs/ folder"):
        merge_results(dest, [tmp_path / "empty"])
    with pytest.raises(ConfigError, match="the destination itself"):
        merge_results(a, [a])
    with pytest.raises(ConfigError, match="given twice"):
        merge_results(dest, [a, tmp_path / "a"])


def test_cli_merge(tmp_path, capsys):
    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0)
    _run(b, "sam__t__seed0", 9.0)
    assert main(["merge", str(a), str(b), "--into", str(dest)]) == 0
    assert "merge: 1 run(s) from" in capsys.readouterr().out
    assert len(load_results(dest)) == 2
    _run(tmp_path / "c", "sam__t__seed0", 8.0)
    assert main(["merge", str(tmp_path / "c"), "--into", str(dest)]) == 2
    assert "forgetless: error: merge: 1 run(s) recorded differently" in capsys.readouterr().err


def test_checkpoints_of_unfinished_runs_come_along_from_a_source_no_run_holds(tmp_path):
    a, dest = tmp_path / "a", tmp_path / "dest"
    _run(a, "lora-mu__t__seed0", 10.0)
    step = a / "checkpoints" / "sam__t__seed0" / "domain" / "step-000030"  # an interrupted run: resumes at 30
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"state")
    (a / "checkpoints" / "hlora__t__seed0" / "domain").mkdir(parents=True)  # nothing complete in it
    (a / "checkpoints" / "lora-mu__t__seed0" / "domain" / "step-000010").mkdir(parents=True)  # finished since
    (a / "checkpoints" / "lora-mu__t__seed0" / "domain" / "step-000010" / "state.pt").write_bytes(b"old")
    with output_lock(a):  # still running: its checkpoints are being rewritten
        summary = merge_results(dest, [a])
    assert summary.running == [str(a)] and not summary.checkpoints and not (dest / "checkpoints").exists()
    summary = merge_results(dest, [a])
    assert summary.checkpoints == ["sam__t__seed0"] and summary.skipped == ["lora-mu__t__seed0"]
    assert (dest / "checkpoints" / "sam__t__seed0" / "domain" / "step-000030" / "state.pt").read_bytes() == b"state"
    assert sorted(p.name for p in (dest / "checkpoints").iterdir()) == ["sam__t__seed0"]
    assert merge_results(dest, [a]).checkpoints == []  # the destination has them now: never overwritten
