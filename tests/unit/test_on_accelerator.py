"""Issue #12 item 4: a run computes everything on its device. Every module call of an experiment (the ``base`` run,
training, EWC's Fisher, evaluation, WiSE-FT's interpolations, the flatness measurement) and of ``forgetless eval``
gets its inputs and has its weights on the run's device, which is the GPU when there is one.

On a machine without a GPU the device is the CPU and these tests check the recording itself (every call seen, on
one device); the GPU case runs where CUDA is (``bench/gpu_session.sh``'s ``cudatests`` part selects ``-k cuda``).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import yaml

from tests.unit.test_experiment import FIXTURES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_DEVICE = pytest.mark.parametrize("device", [pytest.param(DEVICE, id=DEVICE)])


class Devices:
    """A global forward pre-hook: the device type of every tensor a module is called with and of its own weights,
    counted per module class."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()
        self.handle = None

    def __enter__(self) -> Devices:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            for t in tensors:
                self.seen[(type(module).__name__, t.device.type)] += 1

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def elsewhere(self, device: str) -> dict[str, int]:
        return {f"{name} on {where}": n for (name, where), n in self.seen.items() if where != device}

    def calls(self, name: str) -> int:
        return sum(n for (module, _), n in self.seen.items() if module == name)


def _experiment(tmp_path, model_dir) -> str:
    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": f"Plants make sugar from light, sentence {i}."}) + "\n"
                            for i in range(24)))
    generic = str(FIXTURES / "generic.jsonl")
    exp = {"name": "device", "model": str(model_dir), "output": str(tmp_path / "out"), "seeds": [0],
           "precision": "fp32", "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
           "general": {"train": {"source": str(text)}, "heldout": {"source": str(text), "limit": 6}, "block_size": 16},
           "tasks": [{"name": "gen", "train": generic, "test": generic}],
           "methods": ["base", "lora-nu-mu", {"name": "ewc", "samples": 4}, "hlora", "wise-ft"],
           "train": {"general": {"max_steps": 2, "batch_size": 4}, "domain": {"max_steps": 2, "batch_size": 2}},
           "eval": {"batch_size": 4},
           "landscape": {"blocks": 1, "grid": 3, "batch_size": 2, "hessian_iters": 2, "trace_samples": 0,
                         "ascent_steps": 0}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return str(path)


@ON_DEVICE
def test_every_module_call_of_an_experiment_is_on_the_runs_device(tmp_path, tiny_model_dir, device):
    from forgetless.config import load_experiment
    from forgetless.experiment import run_experiment

    with Devices() as devices:
        results = run_experiment(load_experiment(_experiment(tmp_path, tiny_model_dir)), progress=False)
    assert {r["computed"]["device"] for r in results} == {device}
    assert devices.calls("Embedding") > 0 and devices.calls("Linear") > 0  # the hook saw the models' calls
    assert devices.elsewhere(device) == {}
    measured = [r for r in results if r["method"] != "base"]
    assert measured and all("metrics" in r["landscape"] for r in measured)  # the flatness step ran under the hook
    assert any(r["variants"] for r in results if r["method"] == "wise-ft")


@ON_DEVICE
def test_forgetless_eval_computes_on_the_device(tmp_path, tiny_model_dir, device, capsys):
    from forgetless.cli import main

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"Water boils at a hundred degrees, line {i}."}) + "\n"
                            for i in range(8)))
    with Devices() as devices:
        rc = main(["eval", "--model", str(tiny_model_dir), "--ppl", str(text), "--task",
                   str(FIXTURES / "generic.jsonl"), "--precision", "fp32", "--block-size", "16"])
    assert rc == 0, capsys.readouterr().err
    assert devices.calls("Embedding") > 0 and devices.elsewhere(device) == {}
