"""Resumable stages (issue #12 item 6): a stage killed with SIGKILL after step k and resumed from its checkpoint
ends with the same adapter (and method state) as an uninterrupted stage, bit for bit on the CPU in float32."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetless.training import checkpoint
from tests.unit._resume_script import CASES, STEPS, run_stage

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_stage_resumes_bit_for_bit(case, tmp_path):
    folder = tmp_path / "ckpt"
    k = 3
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "tests.unit._resume_script", case, str(folder), str(k),
                           str(torch.get_num_threads())], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    saved = checkpoint.latest(folder)
    assert saved is not None and saved.name == f"step-{k:06d}"
    assert not list(folder.glob("*.tmp"))  # nothing half-written is left to be read
    before = torch.load(saved / "state.pt", weights_only=False)["seconds"]  # the killed session's time until step k

    resumed_weights, resumed_plugins, resumed = run_stage(case, folder)
    # the resumed stage reports its whole time, the killed session's included, and says where it resumed
    assert resumed.extras["resumed_from_step"] == k and resumed.extras["seconds_before_resume"] == round(before, 3)
    assert before > 0 and resumed.seconds > before
    weights, plugins, uninterrupted = run_stage(case)
    for name, w in weights.items():
        assert torch.equal(resumed_weights[name], w), name
    assert [row["loss"] for row in resumed.history] == [row["loss"] for row in uninterrupted.history]
    assert len(resumed.history) == STEPS
    for ours, theirs in zip(resumed_plugins, plugins):
        for attr in ("importance", "reference", "fisher"):
            for name, value in (getattr(theirs, attr, None) or {}).items():
                assert torch.equal(getattr(ours, attr)[name], value), (attr, name)
    assert not folder.exists()  # a finished stage's checkpoints are removed


def test_checkpoints_kept_when_asked_and_only_the_newest(tmp_path):
    folder = tmp_path / "ckpt"
    run_stage("sam", folder, keep=True)
    assert [p.name for p in folder.iterdir()] == [f"step-{STEPS - 1:06d}"]


def test_mismatched_checkpoint_is_an_error(tmp_path):
    folder = tmp_path / "ckpt"
    run_stage("sam", folder, keep=True)
    from safetensors.torch import load_file, save_file

    path = checkpoint.latest(folder) / "trainable.safetensors"
    weights = load_file(str(path))
    weights["renamed"] = weights.pop(next(iter(weights)))
    save_file(weights, str(path))
    with pytest.raises(ValueError, match="do not match"):
        run_stage("sam", folder)


@pytest.mark.parametrize("change, message", [
    ({"lr": 2e-2}, r"other settings \(train.lr: 0.01 -> 0.02\)"),
    ({"entry": [{"name": "sam", "rho": 0.1}]}, r"other settings \(method0: SAM \{'rho': 0.05.* -> SAM \{'rho': 0.1"),
    ({"r": 8}, r"has shape \(4, 32\), the model's \(8, 32\) \(another LoRA rank or target\?\)"),
    ({"alpha": 16}, r"other settings \(lora: .*'lora_alpha', 8\).* -> .*'lora_alpha', 16\)"),  # same shapes, other s
])
def test_a_checkpoint_of_other_settings_is_refused_and_kept(tmp_path, change, message):
    """Going on from a checkpoint of another learning rate, method option, LoRA rank or alpha would train neither stage
    (the old schedule and moments under the new settings): refused, naming what differs, the checkpoint untouched."""
    folder = tmp_path / "ckpt"
    run_stage("sam", folder, keep=True)
    saved = checkpoint.latest(folder)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(checkpoint.CheckpointMismatch, match=message):
        run_stage("sam", folder, **change)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_a_finished_stage_removes_only_its_own_checkpoints(tmp_path):
    """checkpoint_dir may be a folder of the caller's with other files in it: a finished stage removes the step-*
    folders it wrote and the folder only if that left it empty (it removed the whole folder, the caller's files too)."""
    folder = tmp_path / "my_run"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "plan.txt").write_text("keep me")
    (folder / "readme.txt").write_text("keep me too")
    run_stage("sam", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes", "readme.txt"]
    assert (folder / "notes" / "plan.txt").read_text() == "keep me"
    run_stage("sam", tmp_path / "only_checkpoints")
    assert not (tmp_path / "only_checkpoints").exists()


def test_a_checkpoint_of_other_data_or_other_start_weights_is_refused(tmp_path):
    """A kept checkpoint folder used again: by the same model once trained (it rolled the model back to the
    checkpoint and trained the same steps again) or on other examples with the same settings (it went on with the
    other data's state). Both are refused, naming what differs."""
    from accelerate import Accelerator

    from forgetless.models import LoraSettings, attach_lora
    from forgetless.training.config import TrainConfig
    from forgetless.training.loop import train_stage
    from tests.unit.tiny_model import make_tiny_model, random_examples

    folder = tmp_path / "ckpt"
    model = attach_lora(make_tiny_model(0), LoraSettings(r=4, alpha=8, dropout=0.0))
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, precision="fp32", progress=False, save_every=1,
                      keep_checkpoints=True)
    data = random_examples(6, 8, seed=3)
    train_stage(model, data, cfg, accelerator=Accelerator(cpu=True), checkpoint_dir=folder)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"the model's trainable weights are not those the stage "
                                                            r"started from .* to resume, load the model and its "
                                                            r"adapter as they were at the stage's start"):
        train_stage(model, data, cfg, accelerator=Accelerator(cpu=True), checkpoint_dir=folder)
    fresh = attach_lora(make_tiny_model(0), LoraSettings(r=4, alpha=8, dropout=0.0))
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"other settings \(examples: 6 examples, "):
        train_stage(fresh, random_examples(6, 8, seed=4), cfg, accelerator=Accelerator(cpu=True), checkpoint_dir=folder)
    again = attach_lora(make_tiny_model(0), LoraSettings(r=4, alpha=8, dropout=0.0))
    result = train_stage(again, data, cfg, accelerator=Accelerator(cpu=True), checkpoint_dir=folder)
    assert len(result.history) == 3  # the same model, data and settings: resumed at its last checkpoint


def test_only_the_current_gpus_cuda_rng_state_is_saved_and_restored(monkeypatch):
    """The checkpoint holds the current CUDA device's RNG state alone (a resume on a machine with fewer GPUs would fail
    to restore every GPU's); a checkpoint of the older format (every visible GPU's states, a list) restores the
    current device's entry when it has one. torch.cuda is stood in for, so this runs on a CPU."""
    restored = []

    def refuse(*args, **kwargs):
        raise AssertionError("every GPU's RNG state touched")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    def get_rng_state(device="cuda"):
        return torch.tensor([10 + device], dtype=torch.uint8)

    def set_rng_state(state, device="cuda"):
        restored.append((int(state[0]), device))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    state = checkpoint._rng_state()
    assert torch.equal(state["cuda"], torch.tensor([11], dtype=torch.uint8))
    checkpoint._set_rng_state(state)
    assert restored == [(11, 1)]
    restored.clear()
    old = [torch.tensor([20 + i], dtype=torch.uint8) for i in range(3)]  # written on a machine with 3 GPUs
    checkpoint._set_rng_state(state | {"cuda": old})
    assert restored == [(21, 1)]
    restored.clear()
    checkpoint._set_rng_state(state | {"cuda": old[:1]})  # no entry for this device: left as it is
    assert restored == []


def test_a_checkpoint_resumes_only_in_the_precision_and_processes_it_was_written_in(tmp_path):
    """precision: auto resolves per machine (bf16 on a GPU or an avx512_bf16 CPU, else fp32): a checkpoint written in
    bf16 went on in fp32 elsewhere, one run of two precisions. The resolved precision is now part of the checkpoint's
    settings; a checkpoint written before it was stored resumes as before."""
    from accelerate import Accelerator

    from forgetless.models import LoraSettings, attach_lora
    from forgetless.training.config import TrainConfig
    from forgetless.training.loop import train_stage
    from tests.unit.tiny_model import make_tiny_model, random_examples

    folder = tmp_path / "ckpt"
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, precision="fp32", progress=False, save_every=1,
                      keep_checkpoints=True)
    data = random_examples(6, 8, seed=3)

    def fresh():
        return attach_lora(make_tiny_model(0), LoraSettings(r=4, alpha=8, dropout=0.0))

    train_stage(fresh(), data, cfg, accelerator=Accelerator(cpu=True), checkpoint_dir=folder)
    state_file = checkpoint.latest(folder) / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["settings"]["precision"] == "fp32"
    state["settings"]["precision"] = "bf16"  # as a bf16 machine writes it
    torch.save(state, state_file)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"other settings \(precision: bf16 -> fp32\)"):
        train_stage(fresh(), data, cfg, accelerator=Accelerator(cpu=True), checkpoint_dir=folder)
    state["settings"]["precision"] = "fp32"
    # written by two processes: a global batch twice this one's, half the steps per epoch, another data position (it
    # was resumed in one process: examples trained twice, the schedule's length changed)
    assert state["settings"]["processes"] == 1
    state["settings"]["processes"] = 2
    torch.save(state, state_file)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"other settings \(processes: 2 -> 1\)"):
        train_stage(fresh(), data, cfg, accelerator=Accelerator(cpu=True), checkpoint_dir=folder)
    del state["settings"]["precision"], state["settings"]["processes"]  # as an older version wrote it
    torch.save(state, state_file)
    result = train_stage(fresh(), data, cfg, accelerator=Accelerator(cpu=True), checkpoint_dir=folder)
    assert result.extras["resumed_from_step"] == 2 and len(result.history) == 3


def test_the_examples_digest_is_as_before_unless_an_example_has_padding_of_its_own():
    """A checkpoint keeps a digest of the stage's examples. Examples without padding of their own digest as before
    session 33 (their checkpoints resume); one padded to max_length (attention_mask 0) now trains without its padding,
    so its digest differs and a checkpoint written before, which trained on it, is refused rather than mixed."""
    import hashlib
    from array import array

    from forgetless.training.loop import _examples_digest
    from tests.unit.tiny_model import random_examples

    def before(examples):  # the digest as ff42687 computed it
        h = hashlib.sha1()
        for e in examples:
            h.update(array("q", e["input_ids"]).tobytes())
            h.update(array("q", e["labels"]).tobytes())
            h.update(b"|")
        return f"{len(examples)} examples, {h.hexdigest()[:16]}"

    plain = random_examples(3, 6)
    masked = [dict(e, attention_mask=[1] * 6) for e in plain]
    padded = [dict(e, input_ids=e["input_ids"] + [0, 0], labels=e["labels"] + [-100, -100],
                   attention_mask=[1] * 6 + [0, 0]) for e in plain]
    assert _examples_digest(plain) == before(plain) == _examples_digest(masked)
    assert _examples_digest(padded) != before(padded) and _examples_digest(padded) == _examples_digest(plain)
