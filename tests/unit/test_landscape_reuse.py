"""The landscape step measures one model once: a run whose adapter files are byte for byte another measured run's
(WiSE-FT trains lora-nu-mu's model, with the same seed) gets that run's entry copied, marked ``same_model_as``."""

import json
from dataclasses import replace

import pytest

from forgetless.landscape import LandscapeSettings
from tests.unit.tiny_model import make_lora_model

LORA, WISE = "lora-nu-mu__t__seed0", "wise-ft__t__seed0"
SETTINGS = LandscapeSettings(blocks=2, grid=3, batch_size=2, hessian_iters=1, trace_samples=0, ascent_steps=-1)
TEXTS = [f"Plants make sugar from light, sentence {i}." for i in range(40)]


def _runs(out, adapters):
    """Run records and their adapters (run id -> the seed of its LoRA B: equal seeds, byte-identical files)."""
    (out / "runs").mkdir(parents=True)
    for rid, b_seed in adapters.items():
        record = {"run_id": rid, "method": rid.split("__")[0], "task": "t", "seed": 0, "general_ppl": 10.0,
                  "tasks": {}, "stages": [{"name": "domain"}]}
        (out / "runs" / f"{rid}.json").write_text(json.dumps(record))
        make_lora_model(0, r=2, alpha=4, b_std=0.05, b_seed=b_seed).save_pretrained(out / "adapters" / rid)


def _entry(out, rid):
    return json.loads((out / "runs" / f"{rid}.json").read_text()).get("landscape")


@pytest.fixture
def counted(monkeypatch):
    """Each measurement (its params) and each model load of the landscape step."""
    import forgetless.landscape_runs as measure
    import forgetless.models as models

    calls = {"measure": [], "load": 0}
    real_measure, real_load = measure._measure, models.load_model

    def measured(model, examples, settings, *a, **k):
        calls["measure"].append(settings.params)
        return real_measure(model, examples, settings, *a, **k)

    def loaded(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    monkeypatch.setattr(measure, "_measure", measured)
    monkeypatch.setattr(models, "load_model", loaded)  # the landscape step imports it when it measures
    return calls


def _measure_runs(out, model, settings=SETTINGS, only=None):
    from forgetless.landscape_runs import measure_runs

    return measure_runs(out, str(model), settings, lambda: TEXTS, 16, progress=False, only=only)


def test_a_run_with_the_same_adapter_copies_the_measurement(tmp_path, tiny_model_dir, counted, capsys):
    """Two byte-identical adapters: the second run loads and measures nothing; its entry is the first's (metrics,
    surface, all-weights entry) with ``same_model_as``, ``seconds`` 0 and the same adapter hash, and the time-left
    estimate counts the one measurement. An older entry without a hash is matched by hashing its adapter folder; a
    missing all-weights entry alone is copied too."""
    from forgetless.landscape_runs import _mean_seconds, _todo, adapter_sha256

    out = tmp_path / "out"
    _runs(out, {LORA: 7, WISE: 7})
    settings = replace(SETTINGS, all_weights_seeds=[0])
    assert _measure_runs(out, tiny_model_dir, settings) == 1
    assert counted == {"measure": ["trainable", "all"], "load": 1}
    assert f"{WISE}: the same adapter as {LORA} (identical files)" in capsys.readouterr().out
    first, copy = _entry(out, LORA), _entry(out, WISE)
    sha = adapter_sha256(out / "adapters" / WISE)
    assert first["adapter_sha256"] == copy["adapter_sha256"] == sha == adapter_sha256(out / "adapters" / LORA)
    assert "same_model_as" not in first and first["seconds"] > 0
    assert copy["same_model_as"] == LORA and copy["seconds"] == 0.0
    assert {k: v for k, v in copy.items() if k not in ("same_model_as", "seconds", "all_weights", "surface")} == {
        k: v for k, v in first.items() if k not in ("seconds", "all_weights", "surface")}  # metrics, tokens, digest
    # the surface files are its own copies: the record keeps its surface if LORA is set aside and measured again
    assert copy["surface"] == f"landscape/{WISE}/surface.npz" != first["surface"]
    assert (out / copy["surface"]).read_bytes() == (out / first["surface"]).read_bytes()
    assert (out / "landscape" / WISE / "surface_contour.png").is_file()
    every = copy["all_weights"]
    assert every["metrics"] == first["all_weights"]["metrics"]
    assert every["surface"] == f"landscape/{WISE}/all_weights/surface.npz"
    assert (out / every["surface"]).read_bytes() == (out / first["all_weights"]["surface"]).read_bytes()
    assert every["same_model_as"] == LORA and every["seconds"] == 0.0
    _, records, digests = _todo(out, str(tiny_model_dir), settings, 16, None)
    assert _mean_seconds(records, digests) == {"main": first["seconds"], "every": first["all_weights"]["seconds"]}

    # an entry measured before hashes were recorded: its adapter folder is hashed to match it
    lora_path, wise_path = out / "runs" / f"{LORA}.json", out / "runs" / f"{WISE}.json"
    older = json.loads(lora_path.read_text())
    del older["landscape"]["adapter_sha256"]
    lora_path.write_text(json.dumps(older))
    wise_path.write_text(json.dumps({k: v for k, v in json.loads(wise_path.read_text()).items() if k != "landscape"}))
    counted["measure"].clear()
    assert _measure_runs(out, tiny_model_dir, settings, only={WISE}) == 0
    assert counted == {"measure": [], "load": 1} and _entry(out, WISE) == copy

    # only the all-weights entry missing: copied alone, the LoRA entry left as it was
    wise_path.write_text(json.dumps(json.loads(wise_path.read_text()) | {"landscape": copy | {"all_weights": None}}))
    assert _measure_runs(out, tiny_model_dir, settings) == 0
    assert counted == {"measure": [], "load": 1} and _entry(out, WISE) == copy


def test_runs_with_different_adapters_are_each_measured(tmp_path, tiny_model_dir, counted, capsys):
    from forgetless.landscape_runs import adapter_sha256

    out = tmp_path / "out"
    _runs(out, {LORA: 7, WISE: 8})
    assert _measure_runs(out, tiny_model_dir) == 2
    assert counted == {"measure": ["trainable", "trainable"], "load": 2}
    first, second = _entry(out, LORA), _entry(out, WISE)
    assert "same adapter" not in capsys.readouterr().out
    assert "same_model_as" not in first and "same_model_as" not in second
    assert first["adapter_sha256"] == adapter_sha256(out / "adapters" / LORA) != second["adapter_sha256"]
    assert first["metrics"] != second["metrics"] and second["seconds"] > 0


def test_a_measurement_with_other_settings_or_on_another_base_is_not_copied(tmp_path, tiny_model_dir, counted):
    out = tmp_path / "out"
    _runs(out, {LORA: 7, WISE: 7})
    assert _measure_runs(out, tiny_model_dir, only={LORA}) == 1
    other = replace(SETTINGS, grid=5)  # another settings digest
    assert _measure_runs(out, tiny_model_dir, other, only={WISE}) == 1
    assert counted["measure"] == ["trainable", "trainable"]
    assert "same_model_as" not in _entry(out, WISE) and _entry(out, WISE)["digest"] != _entry(out, LORA)["digest"]

    # these settings, but the other run measured on another base (its entry's base): measured again
    lora_path, wise_path = out / "runs" / f"{LORA}.json", out / "runs" / f"{WISE}.json"
    record = json.loads(wise_path.read_text())
    record["landscape"] |= {"base": {"dtype": "bf16"}}
    lora_path.write_text(json.dumps(json.loads(lora_path.read_text()) | {"landscape": record["landscape"]}))
    wise_path.write_text(json.dumps({k: v for k, v in record.items() if k != "landscape"}))
    assert _measure_runs(out, tiny_model_dir, other, only={WISE}) == 1
    assert counted["measure"] == ["trainable"] * 3 and "same_model_as" not in _entry(out, WISE)


def test_adapter_hash_and_an_unreadable_record(tmp_path):
    """The hash covers the names and bytes of the files the adapter is loaded from (safetensors or .bin), nothing
    else; a record that cannot be read (being replaced, corrupt) is passed over, not an error."""
    from forgetless.landscape_runs import _same_model, adapter_sha256

    folder = tmp_path / "a"
    folder.mkdir()
    assert adapter_sha256(folder) is None
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"weights")
    (folder / "README.md").write_text("not read")
    sha = adapter_sha256(folder)
    (folder / "README.md").write_text("not read, changed")
    assert adapter_sha256(folder) == sha
    (folder / "adapter_model.bin").rename(folder / "adapter_model.safetensors")
    assert adapter_sha256(folder) not in (None, sha)
    (folder / "adapter_model.safetensors").write_bytes(b"weightz")
    changed = adapter_sha256(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    assert changed != adapter_sha256(folder) != sha
    # PEFT writes target_modules (a set) in the saving process's hash order: two orders are one adapter
    (folder / "adapter_config.json").write_text('{"r": 4, "target_modules": ["q_proj", "v_proj"]}')
    ordered = adapter_sha256(folder)
    (folder / "adapter_config.json").write_text('{"target_modules": ["v_proj", "q_proj"],  "r": 4}')
    assert adapter_sha256(folder) == ordered
    (folder / "adapter_config.json").write_text('{"target_modules": ["v_proj", "q_proj"], "r": 8}')
    assert adapter_sha256(folder) != ordered

    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    digests = {"main": "d1", "every": None}
    (out / "runs" / "half.json").write_text('{"run_id": "half", "landscape": {"dig')
    (out / "runs" / "list.json").write_text("[1, 2]")
    assert _same_model(out, "me", "abc", digests, {}, False) is None
    entry = {"digest": "d1", "metrics": {"loss": 1.0}, "adapter_sha256": "abc"}
    (out / "runs" / "x.json").write_text(json.dumps({"run_id": "x", "landscape": entry}))
    assert _same_model(out, "me", "abc", digests, {}, False) == ("x", entry)
    assert _same_model(out, "x", "abc", digests, {}, False) is None  # not itself
    assert _same_model(out, "me", "abc", digests, {"dtype": "bf16"}, False) is None


def test_wise_ft_in_an_experiment_copies_lora_nu_mus_flatness(tmp_path, tiny_model_dir, counted):
    """WiSE-FT trains lora-nu-mu's model with the same seed: its run is not measured again."""
    from forgetless.experiment import load_experiment, run_experiment
    from tests.unit.test_experiment import write_experiment

    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 1, "trace_samples": 0, "ascent_steps": -1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-nu-mu", "wise-ft"], seeds=[0],
                            landscape=landscape)
    results = {r["method"]: r for r in run_experiment(load_experiment(path), progress=False) if r.get("landscape")}
    assert counted["measure"] == ["trainable"]  # whichever run is measured first, the other copies it
    measured, copy = sorted((r["landscape"] for r in results.values()), key=lambda e: "same_model_as" in e)
    assert copy["same_model_as"] in {r["run_id"] for r in results.values()} and copy["metrics"] == measured["metrics"]
    assert "same_model_as" not in measured and copy["adapter_sha256"] == measured["adapter_sha256"]


def test_the_time_left_counts_each_distinct_adapter_once(tmp_path, tiny_model_dir):
    """The progress line's estimate: a run whose adapter equals one already measured, or one counted before it in
    this estimate, will be copied and costs nothing; distinct adapters each cost the mean measurement."""
    from forgetless.landscape_runs import left_line

    out = tmp_path / "out"
    sam, replay, other = "sam__t__seed0", "replay__t__seed0", "ewc__t__seed0"
    _runs(out, {LORA: 7, WISE: 7, sam: 9, replay: 9, other: 11})
    assert _measure_runs(out, tiny_model_dir, only={sam}) == 1
    path = out / "runs" / f"{sam}.json"
    record = json.loads(path.read_text())
    record["landscape"]["seconds"] = 1800.0  # the mean of the measurements recorded: half an hour each
    path.write_text(json.dumps(record))
    line = left_line(out, str(tiny_model_dir), SETTINGS, 16)
    # to do: LORA and WISE (one model), replay (sam's, measured), other: two measurements of half an hour
    assert line == "1/5 runs' flatness measured; about 1.0 h left"
    assert left_line(out, str(tiny_model_dir), SETTINGS, 16, workers=2) == (
        "1/5 runs' flatness measured; about 30 min left")
    # one distinct model left: two workers do not halve it
    (out / "adapters" / other).rename(out / "adapters" / "gone")
    (out / "runs" / f"{other}.json").unlink()
    assert left_line(out, str(tiny_model_dir), SETTINGS, 16, workers=2) == (
        "1/4 runs' flatness measured; about 30 min left")

    # the measured run's entry was on another base than its run's (it is to measure again): not a model to copy from
    record = json.loads(path.read_text())
    record["landscape"]["base"] = {"dtype": "bf16"}
    path.write_text(json.dumps(record))
    # to do: sam again, with replay (its model: copied), and LORA with WISE: two measurements (before the fix, sam's
    # stale entry made both sam and replay count as copies: half an hour)
    assert left_line(out, str(tiny_model_dir), SETTINGS, 16) == "0/4 runs' flatness measured; about 1.0 h left"


def test_landscape_workers_get_one_task_per_distinct_adapter(tmp_path):
    """Runs with byte-identical adapters go to one worker (it measures the first and copies for the rest); a run
    without an adapter is a task of its own."""
    from forgetless.experiment import landscape_groups

    out = tmp_path / "out"
    sam = "sam__t__seed0"
    _runs(out, {LORA: 7, sam: 9, WISE: 7})
    assert landscape_groups(out, [LORA, sam, WISE, "base__t__seed0"]) == [[LORA, WISE], [sam], ["base__t__seed0"]]
