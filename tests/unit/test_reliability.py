"""Nothing wrong is ever recorded as a result (issue #11), on tiny models end to end through ``forgetless.cli.main``:
a diverged run stops and records nothing; a run's identity covers its settings (changed runs are refused, or redone
with the old record kept); run ids and general-stage keys of unchanged experiments stay as they were; adapters load
strictly; the output folder is locked; Ctrl-C says what was kept; no name leaves the output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from forgetless.cli import main
from tests.unit.test_experiment import write_experiment

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
TASK = str(FIXTURES / "generic.jsonl")
SMALL = {"seeds": [0], "methods": ["base", "lora-mu"], "precision": "fp32"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, what forgetless wrote to stderr from its first ``forgetless:`` line: libraries' progress
    bars before it are dropped)."""
    capsys.readouterr()
    code = main([*argv, "--quiet"] if argv[0] in ("run", "train") else list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    start = out.err.find("forgetless: ")
    return code, out.out, out.err[start:] if start >= 0 else ""


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}


# ------------------------------------------------------------------------------------------------ divergence
DIVERGING = {"lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["down_proj", "up_proj"]},
             "train": {"general": {"max_steps": 2, "batch_size": 4},
                       "domain": {"max_steps": 4, "batch_size": 2, "lr": 1.0e+20}}}  # NaN loss at step 2


def test_a_diverged_run_stops_and_records_nothing(tmp_path, tiny_model_dir, capsys):
    path = write_experiment(tmp_path, tiny_model_dir, **SMALL | DIVERGING | {"methods": ["lora-mu", "base"]})
    code, out, err = run(capsys, "run", str(path))
    assert code == 2
    assert err == ("forgetless: error: lora-mu__gen__seed0: non-finite loss (nan) at step 2 of the domain stage: "
                   "training diverged (lower the learning rate), or set on_nonfinite: skip_step to drop such steps\n")
    folder = tmp_path / "out"
    assert records(folder) == {} and not (folder / "adapters").exists() and not (folder / "results.md").exists()

    # skip_step drops the non-finite steps, but the model left by the step before is broken: its perplexity is not
    # a number, so the run stops at the evaluation and records nothing either
    train = DIVERGING["train"] | {"domain": DIVERGING["train"]["domain"] | {"on_nonfinite": "skip_step"}}
    path = write_experiment(tmp_path, tiny_model_dir, **SMALL | DIVERGING | {"methods": ["lora-mu"], "train": train})
    code, out, err = run(capsys, "run", str(path))
    assert code == 2 and err.startswith("forgetless: error: lora-mu__gen__seed0: non-finite general PPL (nan) at "
                                        "evaluation")
    assert records(folder) == {} and not (folder / "adapters").exists()


def test_skipped_steps_are_counted_in_the_run_record(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from forgetless.training.loss import CausalLMLoss

    forward, calls = CausalLMLoss.forward, []

    def nan_at_the_second_step(self, *args, **kwargs):
        calls.append(1)
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(CausalLMLoss, "forward", nan_at_the_second_step)
    stage = {"max_steps": 3, "batch_size": 2, "on_nonfinite": "skip_step"}
    path = write_experiment(tmp_path, tiny_model_dir, **SMALL | {"methods": ["lora-mu"]},
                            train={"general": {"max_steps": 1}, "domain": stage})
    assert run(capsys, "run", str(path))[0] == 0
    (record,) = records(tmp_path / "out").values()
    (domain,) = record["stages"]
    assert domain["extras"]["skipped_steps"] == [2]
    assert [row.get("skipped", 0.0) for row in domain["history"]] == [0.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------------ identity
def test_changed_settings_are_not_reused_and_rerun_keeps_the_old_record(tmp_path, tiny_model_dir, capsys,
                                                                        monkeypatch):
    path = write_experiment(tmp_path, tiny_model_dir, **SMALL)
    assert run(capsys, "run", str(path))[0] == 0
    out = tmp_path / "out"
    first = records(out)
    assert len({r["settings_digest"] for r in first.values()}) == 2
    assert first["lora-mu__gen__seed0"]["settings"]["train"]["domain"] == {"max_steps": 2, "batch_size": 2}

    import forgetless.experiment as experiment

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    with monkeypatch.context() as patch:  # the same settings: nothing is redone
        patch.setattr(experiment, "run_recipe", boom)
        code, printed, _ = run(capsys, "run", str(path))
        assert code == 0 and "2 runs, 2 already done" in printed

    # the domain stage changes: lora-mu's numbers would change, base's would not (it trains nothing)
    exp = yaml.safe_load(path.read_text())
    exp["train"]["domain"]["max_steps"] = 3
    path.write_text(yaml.safe_dump(exp))
    with monkeypatch.context() as patch:
        patch.setattr(experiment, "run_recipe", boom)
        code, _, err = run(capsys, "run", str(path))
    assert code == 2
    assert err.startswith(f"forgetless: error: {path}: output: 1 finished run(s) in {out} do not fit the experiment "
                          "now and are not reused:\n  lora-mu__gen__seed0: train.domain.max_steps: 2 -> 3\n")
    assert "--rerun-changed" in err and records(out) == first

    surface = out / "landscape" / "lora-mu__gen__seed0" / "surface.npz"  # what an old landscape: section measured
    surface.parent.mkdir(parents=True)
    surface.write_bytes(b"old surface")
    finished = out / "runs" / "lora-mu__gen__seed0.json"
    first["lora-mu__gen__seed0"]["landscape"] = {"digest": "d", "surface": "landscape/lora-mu__gen__seed0/surface.npz"}
    finished.write_text(json.dumps(first["lora-mu__gen__seed0"]))
    code, printed, _ = run(capsys, "run", str(path), "--rerun-changed")
    assert code == 0 and "redoing 1 run(s) whose settings changed" in printed
    now = records(out)
    old_digest = first["lora-mu__gen__seed0"]["settings_digest"]
    assert now["base__gen__seed0"] == first["base__gen__seed0"]
    assert now["lora-mu__gen__seed0"]["settings_digest"] != old_digest
    assert len(now["lora-mu__gen__seed0"]["stages"][0]["history"]) == 3
    kept = out / "runs" / f"lora-mu__gen__seed0.json.{old_digest}"
    old_record = json.loads(kept.read_text())  # beside the new one, not overwritten, its surface where it went
    assert old_record.pop("landscape") == {"digest": "d", "surface": f"landscape/lora-mu__gen__seed0.{old_digest}/"
                                                                     f"surface.npz"}
    assert old_record == {k: v for k, v in first["lora-mu__gen__seed0"].items() if k != "landscape"}
    assert (out / "adapters" / f"lora-mu__gen__seed0.{old_digest}" / "adapter_model.safetensors").is_file()
    assert (out / "landscape" / f"lora-mu__gen__seed0.{old_digest}" / "surface.npz").read_bytes() == b"old surface"
    assert not surface.exists()  # moved with the old record, which names its new place
    assert "| lora-mu |" in (out / "results.md").read_text()


def test_records_without_settings_are_reused_with_a_note(tmp_path, tiny_model_dir, capsys, monkeypatch):
    path = write_experiment(tmp_path, tiny_model_dir, **SMALL | {"methods": ["base"]})
    assert run(capsys, "run", str(path))[0] == 0
    record_path = tmp_path / "out" / "runs" / "base__gen__seed0.json"
    record = json.loads(record_path.read_text())
    old = {k: v for k, v in record.items() if k not in ("settings", "settings_digest")}  # an older forgetless's
    record_path.write_text(json.dumps(old))
    import forgetless.experiment as experiment

    monkeypatch.setattr(experiment, "run_recipe", lambda *a, **k: pytest.fail("a finished run was redone"))
    code, printed, _ = run(capsys, "run", str(path))
    assert code == 0 and "1 of them were recorded without their settings" in printed
    assert json.loads(record_path.read_text()) == old


def test_run_ids_and_general_stage_keys_of_unchanged_experiments_are_as_before(tmp_path):
    """Values computed with the code of 1632ffe (before issue #11), whose TrainConfig had no checkpointing fields:
    fields added since, at their defaults, change no key (existing caches are found), and change no run id."""
    from forgetless.config import load_experiment
    from forgetless.experiment import general_stage_key, run_id
    from forgetless.methods import resolve

    exp = {"name": "pin", "model": "smollm2-135m", "output": str(tmp_path / "x"), "seeds": [0, 1],
           "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
           "general": {"train": {"source": "g.jsonl", "limit": 20}, "heldout": "g.jsonl", "block_size": 16},
           "tasks": [{"name": "t", "train": "t.jsonl", "test": "t.jsonl"}],
           "methods": ["lora-nu-mu", {"name": "hlora", "phi": 0.01}, "hlora-no-layer", ["hlora", "sam"]],
           "train": {"general": {"max_steps": 3, "lr": "1e-3"}, "domain": {"max_steps": 4}}}
    path = tmp_path / "pin.yaml"
    path.write_text(yaml.safe_dump(exp))
    loaded = load_experiment(path)
    # [hlora, sam] had its own key (32e209f3c5) until SAM on the domain stage only was seen to leave the general
    # stage as hlora trains it: it shares hlora's now (tests/unit/test_experiment.py checks the numbers agree)
    pinned = [("3c2c07360b", "lora-nu-mu__t__seed1"), ("6f3752f421", "hlora_phi=0.01___t__seed1"),
              ("6f3752f421", "hlora-no-layer__t__seed1"), ("6f3752f421", "hlora+sam__t__seed1")]
    for entry, (key, rid) in zip(loaded.methods, pinned):
        recipe = resolve(entry)
        assert (general_stage_key(loaded, recipe, 1), run_id(recipe.label, "t", 1)) == (key, rid), entry
    loaded.train.general.save_every, loaded.train.general.gradient_checkpointing = 5, True  # change no number
    loaded.train.general.progress = False  # a field of the key's first format that changes no number either: it
    assert general_stage_key(loaded, resolve("lora-nu-mu"), 1) == "3c2c07360b"  # retrained a cached stage


def test_a_changed_method_default_changes_the_identity_of_runs_that_relied_on_it(monkeypatch):
    """A run that left an option out was made with the default of its day: when the default changes (``was=``), the
    option enters the identity at its new value, so the old record is "changed"; runs that wrote it are as before."""
    from dataclasses import dataclass

    from forgetless import methods
    from forgetless.methods.common import Options, option
    from forgetless.training.hooks import Method

    def spec_with(was):
        @dataclass(repr=False)
        class Opts(Options):
            lam: float = option(10.0, "weight", yaml="lambda", weight=True, **({"was": was} if was else {}))
            depth: int = option(2, "a general-stage option", was=2)  # default unchanged: never added

        class Plugin(Method):
            name = "pinned"
            Options = Opts

            def __init__(self, options):
                self.options = options
        return methods.MethodSpec("pinned", "test", plugin=Plugin)

    monkeypatch.setitem(methods.REGISTRY, "pinned", spec_with(None))
    assert methods.identity_entries([{"name": "pinned"}]) == [{"name": "pinned"}]
    monkeypatch.setitem(methods.REGISTRY, "pinned", spec_with(1.0))  # the default moved from 1 to 10
    assert methods.identity_entries([{"name": "pinned"}]) == [{"name": "pinned", "lambda": 10.0}]
    assert methods.identity_entries([{"name": "pinned", "lambda": 1.0}]) == [{"name": "pinned", "lambda": 1.0}]
    assert methods.identity_entries([{"name": "pinned", "lam": 3}]) == [{"name": "pinned", "lam": 3}]
    assert methods.general_stage_entries([{"name": "pinned"}]) == [{"name": "pinned", "lambda": 10.0}]
    assert methods.identity_entries([{"name": "lora-mu"}, {"name": "pinned"}])[0] == {"name": "lora-mu"}


# ------------------------------------------------------------------------------------------------ adapters
def _trained_adapter(tmp_path: Path, model_dir: Path, capsys) -> tuple[Path, dict]:
    write_experiment(tmp_path, model_dir)  # writes general.jsonl
    adapter = tmp_path / "adapter"
    args = ["train", "--model", str(model_dir), "--precision", "fp32", "--method", "lora-mu", "--domain", TASK,
            "--heldout", str(tmp_path / "general.jsonl"), "--block-size", "16", "--batch-size", "4",
            "--max-steps", "2", "--lr", "0.05", "--lora-r", "2", "--lora-dropout", "0", "--output", str(adapter)]
    assert run(capsys, *args)[0] == 0
    return adapter, json.loads((adapter / "run.json").read_text())


def _eval(capsys, model_dir: Path, adapter: Path, text: Path) -> tuple[int, str, str]:
    return run(capsys, "eval", "--model", str(model_dir), "--adapter", str(adapter), "--ppl", str(text),
               "--block-size", "16", "--batch-size", "4", "--precision", "fp32")


def test_eval_share_prefix_gives_the_same_accuracy(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """``forgetless eval --task ... --share-prefix`` (fp32): the items go packed, with the same acc and acc_norm as
    one row per choice."""
    from forgetless.evaluation import multiple_choice

    adapter, _ = _trained_adapter(tmp_path, tiny_model_dir, capsys)
    packed = []
    real = multiple_choice._score_packed
    monkeypatch.setattr(multiple_choice, "_score_packed", lambda *a: packed.append(1) or real(*a))
    scores = []
    for extra in ((), ("--share-prefix",)):
        code, printed, _ = run(capsys, "eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--task",
                               TASK, "--batch-size", "4", "--precision", "fp32", *extra)
        assert code == 0 and bool(packed) == bool(extra)
        scores.append(json.loads(printed)["tasks"][TASK])
    assert len(packed) > 1  # the probe and the batches
    assert scores[0]["n"] == scores[1]["n"] > 0
    assert scores[0]["acc"] == scores[1]["acc"] and scores[0]["acc_norm"] == scores[1]["acc_norm"]


def test_adapters_load_strictly(tmp_path, tiny_model_dir, capsys):
    adapter, record = _trained_adapter(tmp_path, tiny_model_dir, capsys)
    text = tmp_path / "general.jsonl"
    code, printed, _ = _eval(capsys, tiny_model_dir, adapter, text)
    assert code == 0 and json.loads(printed)["perplexity"]["ppl"] == pytest.approx(record["general_ppl"], rel=1e-6)

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    renamed = {k.replace("q_proj", "q_projection"): v for k, v in tensors.items()}  # loaded silently as nothing before
    save_file(renamed, str(weights))
    code, _, err = _eval(capsys, tiny_model_dir, adapter, text)
    assert code == 2 and err.startswith(f"forgetless: error: {adapter}: the adapter does not fit the model: key "
                                        f"{first!r} is missing")
    code, _, err = run(capsys, "landscape", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--text",
                       str(text), "--block-size", "16", "--grid", "3", "--output", str(tmp_path / "ls"))
    assert code == 2 and f"{adapter}: the adapter does not fit the model: key {first!r} is missing" in err

    save_file(tensors | {"base_model.model.extra.lora_A.weight": tensors[first].clone()}, str(weights))
    code, _, err = _eval(capsys, tiny_model_dir, adapter, text)
    assert code == 2 and "key 'base_model.model.extra.lora_A.weight' is unexpected" in err

    save_file(tensors, str(weights))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 4}))
    code, _, err = _eval(capsys, tiny_model_dir, adapter, text)
    assert code == 2 and f"key {first!r} has shape [2, 32] in the adapter, [4, 32] in the model" in err
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    from tests.unit.tiny_model import make_tiny_model

    other = tmp_path / "other-model"  # the same architecture, other weights
    make_tiny_model(seed=1, vocab_size=400).save_pretrained(other)
    for file in tiny_model_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            (other / file.name).write_bytes(file.read_bytes())
    code, _, err = _eval(capsys, other, adapter, text)
    assert code == 2 and f"{adapter}: the adapter was trained on another base model ({tiny_model_dir}, fingerprint" in err

    save_file({k: v * float("inf") if "lora_B" in k else v for k, v in tensors.items()}, str(weights))  # broken
    code, printed, err = _eval(capsys, tiny_model_dir, adapter, text)
    assert code == 2 and printed == "" and err.startswith(f"forgetless: error: eval: {adapter}: non-finite general PPL")


def test_a_cached_general_stage_that_does_not_fit_is_an_error(tmp_path, tiny_model_dir, capsys):
    path = write_experiment(tmp_path, tiny_model_dir, **SMALL | {"methods": ["lora-nu-mu"]})
    assert run(capsys, "run", str(path))[0] == 0
    out = tmp_path / "out"
    (cache,) = (out / "stages").iterdir()
    (out / "runs" / "lora-nu-mu__gen__seed0.json").unlink()
    weights = cache / "adapter_model.safetensors"
    save_file({k.replace("v_proj", "w_proj"): v for k, v in load_file(str(weights)).items()}, str(weights))
    code, _, err = run(capsys, "run", str(path))  # was: used as if loaded ('cached': true), with another PPL
    assert code == 2 and f"{cache}: the adapter does not fit the model: key " in err and "v_proj" in err
    assert records(out) == {}


# ------------------------------------------------------------------------------------------------ the folder
def test_the_output_folder_is_locked_and_a_stale_lock_is_taken_over(tmp_path, tiny_model_dir, capsys):
    from forgetless.experiment import LOCK_FILE, output_lock

    path = write_experiment(tmp_path, tiny_model_dir, **SMALL | {"methods": ["base"]})
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from forgetless.experiment import output_lock; from pathlib import Path\n"
                               "with output_lock(Path(sys.argv[2])):\n    print('held', flush=True); time.sleep(60)",
                               str(Path(__file__).resolve().parents[2]), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run(capsys, "run", str(path))
        assert code == 2 and err == (f"forgetless: error: {out} is in use by another forgetless run (pid "
                                     f"{holder.pid}); wait for it to end or stop it, or write to another output "
                                     "folder\n")
        assert not (out / "runs").exists()
    finally:
        holder.kill()
        holder.wait()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(dead.stdout)  # a lock file whose process is gone
    code, printed, _ = run(capsys, "run", str(path))
    assert code == 0 and f"taking over the lock of {out} from pid {dead.stdout.strip()}" in printed
    assert (out / LOCK_FILE).read_text() == ""  # released
    with output_lock(out):
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("stop, code, said", [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_exits_saying_what_was_kept(tmp_path, tiny_model_dir, capsys, monkeypatch, stop, code, said):
    """Ctrl-C, and SIGTERM (`kill`, a scheduler's time limit) the same way: the run in progress is named as not
    recorded, the finished ones as kept; exit 130, or 128 + 15."""
    import os
    import signal

    import forgetless.experiment as experiment

    path = write_experiment(tmp_path, tiny_model_dir, **SMALL)
    real = experiment.run_one

    def interrupted_second(exp, entry, *args, **kwargs):
        if entry == "lora-mu":
            if stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("SIGTERM did not stop the run")
            raise KeyboardInterrupt
        return real(exp, entry, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_one", interrupted_second)
    before = signal.getsignal(signal.SIGTERM)
    got, _, err = run(capsys, "run", str(path))
    out = tmp_path / "out"
    assert got == code
    assert err == (f"forgetless: {said}: lora-mu__gen__seed0 was stopped and is not recorded; the finished "
                   f"runs' records in {out / 'runs'} are kept; `forgetless run` again resumes\n")
    assert list(records(out)) == ["base__gen__seed0"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the command's only


@pytest.mark.parametrize("label", ["x(adapter=../../../../etc)", "/abs/path", "..", "a;rm -rf ~", "$(id)`id`",
                                   "x(stages=['..', '/'])", "\\..\\x"])
def test_no_method_label_leaves_the_output_folder(tmp_path, label):
    from forgetless.config import ConfigError
    from forgetless.experiment import _inside, run_id

    rid = run_id(label, "t", 0)
    assert "/" not in rid and "\\" not in rid and rid not in (".", "..")  # one file name, never a step up
    assert _inside(tmp_path, tmp_path / "runs" / f"{rid}.json").resolve().parent == (tmp_path / "runs").resolve()
    with pytest.raises(ConfigError, match="outside the output folder"):
        _inside(tmp_path / "out", tmp_path / "out" / ".." / "escaped")


def test_a_full_disk_during_a_run_is_an_error_naming_the_run(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A bare "[Errno 28] No space left on device" says neither which run failed nor what was kept."""
    import forgetless.pipeline as pipeline

    path = write_experiment(tmp_path, tiny_model_dir, **SMALL | {"methods": ["base", "lora-mu"]})
    real = pipeline.save_adapter

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "save_adapter", full)
    code, _, err = run(capsys, "run", str(path))
    assert code == 2
    assert err.startswith("forgetless: error: lora-mu__gen__seed0: OSError: [Errno 28] No space left on device; "
                          "nothing of this run is recorded, the finished runs' records are kept")
    assert [p.name for p in (tmp_path / "out" / "runs").glob("*.json")] == ["base__gen__seed0.json"]
    monkeypatch.setattr(pipeline, "save_adapter", real)
    assert run(capsys, "run", str(path))[0] == 0  # space again: it goes on
