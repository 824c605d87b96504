"""``forgetless train`` goes through the experiment runner: the same adapter, bit for bit, as ``forgetless run``."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetless.cli import main
from tests.unit.test_experiment import write_experiment
from tests.unit.tiny_model import make_tiny_model
from tests.unit.tiny_tokenizer import make_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
TASK = str(FIXTURES / "generic.jsonl")
STAGE = {"max_steps": 2, "batch_size": 2, "lr": 2.0e-4}  # both stages: `train` has one setting for both


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    tok = make_tiny_tokenizer()
    folder = tmp_path / "tiny-model"
    make_tiny_model(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_args(tmp_path: Path, model_dir: Path, method: str, output: Path, *extra: str) -> list[str]:
    """``forgetless train`` with the settings of ``write_experiment(..., **EXPERIMENT)``."""
    return ["train", "--model", str(model_dir), "--precision", "fp32", "--method", method,
            "--general", str(tmp_path / "general.jsonl"), "--domain", TASK, "--block-size", "16",
            "--batch-size", str(STAGE["batch_size"]), "--max-steps", str(STAGE["max_steps"]), "--lr", str(STAGE["lr"]),
            "--seed", "0", "--lora-r", "2", "--lora-alpha", "4", "--lora-dropout", "0", "--output", str(output),
            "--quiet", *extra]


EXPERIMENT = {"seeds": [0], "precision": "fp32", "train": {"general": STAGE, "domain": STAGE},
              "eval": {"batch_size": STAGE["batch_size"]}}


@pytest.mark.parametrize("entry, method", [("lora-nu-mu", "lora-nu-mu"), ("replay", "replay"),
                                           (["lora-mu", "ewc"], "lora-mu+ewc")])
def test_train_and_run_give_the_same_adapter(tmp_path, model_dir, entry, method):
    general = str(tmp_path / "general.jsonl")
    path = write_experiment(tmp_path, model_dir, methods=[entry], **EXPERIMENT,
                            general={"train": general, "heldout": general, "block_size": 16})
    assert main(["run", str(path)]) == 0
    (ran,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    adapter = tmp_path / "trained"
    assert main(train_args(tmp_path, model_dir, method, adapter, "--heldout", general, "--test", TASK)) == 0

    a = load_file(str(tmp_path / "out" / "adapters" / ran["run_id"] / "adapter_model.safetensors"))
    b = load_file(str(adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method
    trained = json.loads((adapter / "run.json").read_text())
    assert trained["method"] == ran["method"] and trained["general_ppl"] == ran["general_ppl"]
    assert trained["tasks"]["domain"] == ran["tasks"]["gen"]
    assert [s["history"] for s in trained["stages"]] == [s["history"] for s in ran["stages"]]


def test_train_takes_the_bases_dtype_quantization_and_checkpointing_as_the_yaml_does(tmp_path, model_dir):
    """``--dtype bf16``: the adapter of ``run`` with ``dtype: bf16``, bit for bit, and the record says the base (with
    ``--gradient-checkpointing`` too, which changes no number); ``--quantization`` and ``--gradient-checkpointing``
    reach the experiment as the YAML's keys would (4-bit itself is tested in test_quantized.py)."""
    from forgetless.cli import _train_experiment, parse_command_line

    general = str(tmp_path / "general.jsonl")
    path = write_experiment(tmp_path, model_dir, methods=["lora-nu-mu"], **EXPERIMENT | {"dtype": "bf16"},
                            general={"train": general, "heldout": general, "block_size": 16})
    assert main(["run", str(path)]) == 0
    (ran,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    assert ran["settings"]["dtype"] == "bf16"
    adapter = tmp_path / "trained"
    assert main(train_args(tmp_path, model_dir, "lora-nu-mu", adapter, "--heldout", general, "--dtype", "bf16",
                           "--gradient-checkpointing")) == 0
    a = load_file(str(tmp_path / "out" / "adapters" / ran["run_id"] / "adapter_model.safetensors"))
    b = load_file(str(adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = json.loads((adapter / "run.json").read_text())
    assert trained["settings"]["dtype"] == "bf16" and trained["computed"]["base_dtype"] == "bf16"
    assert trained["general_ppl"] == ran["general_ppl"]
    exp = _train_experiment(parse_command_line(train_args(tmp_path, model_dir, "lora-mu", tmp_path / "q",
                                                          "--quantization", "4bit", "--gradient-checkpointing")))
    assert exp.quantization == "4bit" and exp.dtype == "auto"
    assert exp.train.general.gradient_checkpointing and exp.train.domain.gradient_checkpointing


def test_train_wise_ft_records_its_variants(tmp_path, model_dir, capsys):
    write_experiment(tmp_path, model_dir)  # writes general.jsonl
    out = tmp_path / "wise"
    args = train_args(tmp_path, model_dir, "{name: wise-ft, alphas: [0.5]}", out, "--heldout",
                      str(tmp_path / "general.jsonl"), "--heldout-max-blocks", "4", "--test", TASK)
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["method"] == "wise-ft(alphas=[0.5])" and list(record["variants"]) == ["wise-ft(alpha=0.5)"]
    variant = record["variants"]["wise-ft(alpha=0.5)"]
    assert variant["general_ppl"] > 1 and set(variant["tasks"]) == {"domain"}
    assert (out / "adapter_model.safetensors").is_file()
    # train's folder records the theta_nu its domain stage started from, as run's adapters do: export --wise-ft
    # takes the folder's own general stage and refuses another one
    from forgetless.export import export_wise_ft
    from forgetless.methods import wise_ft
    from forgetless.models import AdapterError

    assert "domain_start" in json.loads((out / "forgetless_base.json").read_text())
    assert (out / wise_ft.FILENAME).is_file()
    assert main(["export", "--model", str(model_dir), "--adapter", str(out), "--wise-ft", "0.5", "--output",
                 str(tmp_path / "blend")]) == 0  # --theta-nu: the folder's own
    own = export_wise_ft(str(model_dir), out, out, 0.5, tmp_path / "blend1")
    weights = "adapter_model.safetensors"
    assert (own / weights).read_bytes() == (tmp_path / "blend" / weights).read_bytes()
    from safetensors.torch import load_file

    theta = load_file(out / wise_ft.FILENAME)
    wise_ft.STATE.save(tmp_path / "other", {k: v + 1e-3 for k, v in theta.items()}, {})  # another general stage
    with pytest.raises(AdapterError, match="not the theta_nu that .* domain stage started from"):
        export_wise_ft(str(model_dir), out, tmp_path / "other", 0.5, tmp_path / "blend2")
    # the blend's numbers: the run's own wise-ft(alpha=0.5) variant, evaluated from the exported adapter
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--adapter", str(tmp_path / "blend"), "--ppl",
                 str(tmp_path / "general.jsonl"), "--precision", "fp32", "--block-size", "16",
                 "--max-blocks", "4"]) == 0
    printed = capsys.readouterr().out
    scored = json.loads(printed[printed.index("{"):])
    assert scored["perplexity"]["ppl"] == pytest.approx(variant["general_ppl"], rel=1e-5)
    # a run that interpolated the factors (space: factors) scored another blend than export writes: said
    wise_ft.STATE.save(tmp_path / "factors", theta, {"options": {"alphas": [0.5], "space": "factors"}})
    with pytest.warns(UserWarning, match="interpolated the LoRA factors .* its scores differ"):
        export_wise_ft(str(model_dir), out, tmp_path / "factors", 0.5, tmp_path / "blend4")
    # another method trained over it (--overwrite) leaves no theta_nu of the old run behind for export to take
    assert main(train_args(tmp_path, model_dir, "lora-mu", out, "--overwrite")) == 0
    assert not (out / wise_ft.FILENAME).exists()
    capsys.readouterr()
    assert main(["export", "--model", str(model_dir), "--adapter", str(out), "--wise-ft", "0.5", "--output",
                 str(tmp_path / "blend3")]) == 2
    assert "go together" in capsys.readouterr().err


def test_train_without_test_data_saves_only_the_adapter(tmp_path, model_dir, capsys):
    write_experiment(tmp_path, model_dir)
    out = tmp_path / "plain"
    assert main(train_args(tmp_path, model_dir, "lora-mu", out)) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "run.json").exists()
    # --general with a method that never reads it was ignored without a word (a user believed it protected them)
    assert ("note: --general is not used: method 'lora-mu' has no general stage and reads no general text"
            in capsys.readouterr().err)
    assert main(train_args(tmp_path, model_dir, "lora-nu-mu", tmp_path / "two")) == 0
    assert "--general is not used" not in capsys.readouterr().err


@pytest.mark.parametrize("method, args, message", [
    ("base", [], "method 'base' trains nothing"),
    ("lora-nu-mu", ["--general", ""], "has a general stage: give the general text (--general)"),
    ("no-such", [], "--method: methods[0]: unknown method 'no-such'"),
    ("[lora-mu", [], "--method: invalid YAML"),
])
def test_train_errors_before_loading_anything(tmp_path, capsys, method, args, message):
    rc = main(train_args(tmp_path, tmp_path / "no-model", method, tmp_path / "x", *args))
    assert rc == 2 and message in capsys.readouterr().err


def test_train_keeps_an_earlier_runs_adapter_and_record_unless_told_to_replace_them(tmp_path, model_dir, capsys):
    """A second ``train`` into the same folder would replace the adapter and leave the first run's record beside it,
    describing an adapter that is gone. It is refused before anything is written; with --overwrite the old record goes
    first, and a run that is not evaluated leaves none."""
    write_experiment(tmp_path, model_dir)
    out = tmp_path / "adapter"
    general = str(tmp_path / "general.jsonl")
    assert main(train_args(tmp_path, model_dir, "lora-mu", out, "--heldout", general)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"adapter_model.safetensors", "run.json"} <= set(before)
    again = train_args(tmp_path, model_dir, "lora-mu", out, "--lora-r", "4")
    assert main(again) == 2
    err = capsys.readouterr().err
    assert f"--output: {out} already holds adapter_config.json, adapter_model.safetensors, run.json" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(again + ["--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4 and not (out / "run.json").exists()


def test_the_tracker_logs_of_an_earlier_train_are_its_outputs(tmp_path, model_dir, capsys):
    """A `train --report-to tensorboard` stopped before it saved the adapter left OUTPUT/logs: the folder was then
    "files of its own", refused even with --overwrite; and after a finished run --overwrite kept the old event files
    beside the new ones (TensorBoard showed both as one run). logs/ is now one of train's outputs, replaced."""
    write_experiment(tmp_path, model_dir)
    out = tmp_path / "adapter"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "events.out.tfevents.old").write_text("stopped run")
    again = train_args(tmp_path, model_dir, "lora-mu", out)
    assert main(again) == 2
    assert f"--output: {out} already holds logs of an earlier run" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0
    assert not (out / "logs" / "events.out.tfevents.old").exists() and (out / "adapter_config.json").is_file()


def test_eval_of_a_runs_adapter_says_which_flags_reproduce_the_runs_scores(tmp_path, model_dir, capsys):
    """`eval --adapter` with its own defaults (block size 128) scores a run trained and recorded with block size 16
    differently; it says so, naming the flag, and says nothing when the flags match the run's record."""
    write_experiment(tmp_path, model_dir)
    out = tmp_path / "adapter"
    general = str(tmp_path / "general.jsonl")
    assert main(train_args(tmp_path, model_dir, "lora-mu", out, "--heldout", general)) == 0
    capsys.readouterr()
    evaluate = ["eval", "--model", str(model_dir), "--adapter", str(out), "--ppl", general, "--precision", "fp32"]
    assert main(evaluate) == 0
    assert f"note: the run that trained this adapter ({out / 'run.json'}) was scored with other settings; to " \
           f"reproduce its scores, add --block-size 16" in capsys.readouterr().err
    assert main(evaluate + ["--block-size", "16"]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_eval_of_a_qlora_adapter_loads_the_base_as_its_run_did(tmp_path, model_dir, capsys):
    """An adapter trained on a 4-bit base was scored on a float base by `eval --adapter` (no flag could say
    otherwise): other numbers than its record, without a word. The base now loads as the run's record says, and the
    scores are the record's; --quantization none scores the float base on purpose."""
    write_experiment(tmp_path, model_dir)
    out = tmp_path / "adapter"
    general = str(tmp_path / "general.jsonl")
    assert main(train_args(tmp_path, model_dir, "lora-mu", out, "--heldout", general, "--quantization", "4bit")) == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["settings"]["quantization"] == "4bit"
    capsys.readouterr()
    evaluate = ["eval", "--model", str(model_dir), "--adapter", str(out), "--ppl", general, "--precision", "fp32",
                "--block-size", "16"]
    assert main(evaluate) == 0
    captured = capsys.readouterr()
    assert "note: the base is loaded with quantization 4bit, as the run that trained this adapter did" in captured.err
    scored = json.loads(captured.out[captured.out.index("{"):])
    assert scored["quantization"] == "4bit"
    assert scored["perplexity"]["ppl"] == pytest.approx(recorded["general_ppl"], rel=1e-5)
    assert main(evaluate + ["--quantization", "none"]) == 0
    printed = capsys.readouterr().out
    plain = json.loads(printed[printed.index("{"):])
    assert plain["quantization"] == "none" and plain["perplexity"]["ppl"] != pytest.approx(scored["perplexity"]["ppl"],
                                                                                          rel=1e-5)


def test_an_adapter_without_a_run_record_says_how_its_base_was_loaded(tmp_path, model_dir, capsys):
    """`train` without a test set or held-out text writes no run.json; `eval --adapter` and `landscape --adapter` then
    loaded its base with the defaults, a bf16 (or 4-bit) run's adapter on a float32 base. The adapter's own record
    (forgetless_base.json) now says how the base was loaded, and both commands load it so, saying it."""
    from forgetless.models import BASE_FILE

    write_experiment(tmp_path, model_dir)
    out = tmp_path / "adapter"
    assert main(train_args(tmp_path, model_dir, "lora-mu", out, "--dtype", "bf16")) == 0
    assert not (out / "run.json").exists() and json.loads((out / BASE_FILE).read_text())["dtype"] == "bf16"
    general = str(tmp_path / "general.jsonl")
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--adapter", str(out), "--ppl", general, "--precision", "fp32",
                 "--block-size", "16"]) == 0
    captured = capsys.readouterr()
    assert f"note: the base is loaded with dtype bf16, as the run that trained this adapter did ({out / BASE_FILE})" \
        in captured.err
    assert json.loads(captured.out[captured.out.index("{"):])["dtype"] == "bf16"
    assert main(["landscape", "--model", str(model_dir), "--adapter", str(out), "--text", general, "--grid", "3",
                 "--blocks", "1", "--block-size", "16", "--output", str(tmp_path / "ls"), "--quiet"]) == 0
    assert "note: the base is loaded with dtype bf16" in capsys.readouterr().err
    assert json.loads((tmp_path / "ls" / "landscape.json").read_text())["dtype"] == "bf16"


def test_without_model_an_adapter_s_recorded_base_is_used(tmp_path, capsys):
    """eval / landscape / export --adapter without --model take the base the adapter's forgetless_base.json names
    (said on stderr), instead of loading the default model and failing after that on missing keys; --model given
    wins; an adapter without a record, or no adapter, keeps the default."""
    import json

    from forgetless.cli import parse_command_line
    from forgetless.models import BASE_FILE, DEFAULT_MODEL

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / BASE_FILE).write_text(json.dumps({"model": "/models/tiny", "fingerprint": "x"}))
    for argv in (["eval", "--adapter", str(adapter), "--ppl", "t.jsonl"],
                 ["landscape", "--adapter", str(adapter), "--text", "t.jsonl"],
                 ["export", "--adapter", str(adapter), "--output", str(tmp_path / "o")]):
        assert parse_command_line(argv).model == "/models/tiny", argv
        assert "/models/tiny, the base" in capsys.readouterr().err
        assert parse_command_line(argv + ["--model", "other"]).model == "other"
    (adapter / BASE_FILE).unlink()
    assert parse_command_line(["eval", "--adapter", str(adapter), "--ppl", "t.jsonl"]).model == DEFAULT_MODEL
    assert parse_command_line(["eval", "--ppl", "t.jsonl"]).model == DEFAULT_MODEL
    assert parse_command_line(["train", "--domain", "d.jsonl", "--output", str(tmp_path / "t")]).model == DEFAULT_MODEL


def test_eval_reads_a_tasks_split_and_limits_task_items_only(tmp_path, model_dir, capsys):
    """`eval --task FOLDER` could not choose a split (the documented HUB_NAME form always failed on a dataset of
    several splits), and --limit, "items of each task", also cut the --ppl text to its first documents."""
    write_experiment(tmp_path, model_dir)
    general = str(tmp_path / "general.jsonl")
    folder = tmp_path / "task"
    folder.mkdir()
    rows = (FIXTURES / "generic.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text(rows[0] + "\n")
    (folder / "test.jsonl").write_text("\n".join(rows) + "\n")
    scored = []
    for extra in ([], ["--task", str(folder), "--split", "test", "--limit", "1"]):
        assert main(["eval", "--model", str(model_dir), "--ppl", general, "--precision", "fp32", "--block-size", "16",
                     *extra]) == 0
        printed = capsys.readouterr().out
        scored.append(json.loads(printed[printed.index("{"):]))
    assert scored[1]["perplexity"] == scored[0]["perplexity"]  # the same text, whatever --limit says
    assert scored[1]["tasks"][str(folder)]["n"] == 1
    assert main(["eval", "--model", str(model_dir), "--ppl", general, "--split", "test"]) == 2
    assert "eval: --split choose the data of --task, and no --task was given" in capsys.readouterr().err


def test_a_train_stopped_while_it_scores_keeps_the_trained_adapter(tmp_path, model_dir, monkeypatch, capsys):
    """`forgetless train` has no checkpoints to resume from, and it saved the adapter only after scoring it: an error
    or Ctrl-C in the final evaluation lost the whole training. The adapter is now saved as trained, without scores;
    a non-finite score still saves nothing (a diverged model)."""
    import forgetless.pipeline as pipeline
    from forgetless.models import load_adapter, load_model
    from forgetless.pipeline import NonFiniteScore

    write_experiment(tmp_path, model_dir)
    trained = {}

    def stop(model, *args, **kwargs):
        trained.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate", stop)
    out = tmp_path / "adapter"
    assert main(train_args(tmp_path, model_dir, "lora-mu", out, "--test", TASK)) == 130
    assert f"the trained adapter is saved to {out} without scores" in capsys.readouterr().err
    assert not (out / "run.json").exists()
    model, _ = load_model(str(model_dir), precision="fp32")
    saved = {n: p for n, p in load_adapter(model, out).named_parameters() if "lora_" in n}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[n], trained[n]) for n in saved)

    def diverged(*args, **kwargs):
        raise NonFiniteScore("general PPL", float("nan"))

    monkeypatch.setattr(pipeline, "evaluate", diverged)
    again = tmp_path / "diverged"
    assert main(train_args(tmp_path, model_dir, "lora-mu", again, "--test", TASK)) != 0
    assert not (again / "adapter_model.safetensors").exists()
