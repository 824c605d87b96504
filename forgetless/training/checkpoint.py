"""Mid-stage checkpoints: everything a training stage needs to go on exactly where it stopped.

A checkpoint is a folder ``step-000040`` inside the stage's checkpoint folder, written under a temporary name and
renamed when complete (a half-written checkpoint is never read), holding:

* ``trainable.safetensors``: the trainable parameters (the adapter);
* ``state.pt``: optimizer and scheduler state dicts, the RNG states (torch CPU, the current CUDA device's, Python,
  NumPy), the number of optimizer steps taken (the data position: the loader is replayed up to it), the stage's
  history so far, each method's :meth:`~forgetless.training.hooks.Method.stage_state`, and the stage's ``settings``
  (what changes its numbers: the training settings, the methods, the digests of the examples and the start weights,
  the resolved precision, the number of processes, the LoRA scaling and dropout; the trainable parameters' names and
  shapes are checked against the model). A checkpoint of
  other settings is refused, naming what differs: going on from it would train neither the old stage nor the new one.

Only the newest complete checkpoint is kept. Resuming gives the same weights as an uninterrupted stage, bit for bit
on a CPU in float32 (tested with a stage killed by SIGKILL).

Only the current CUDA device's RNG state is saved, so a checkpoint resumes on a machine with fewer visible GPUs, under
the same number of processes (one written
by an older version, holding every visible GPU's state, restores the current device's entry when it has one). Under
several processes only process 0 writes the checkpoint, so the RNG states saved are process 0's (its CUDA RNG state
is its own GPU's) and every process restores those: the other processes' RNG, their CUDA RNG included, is not
restored exactly.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

_PREFIX = "step-"


def latest(folder: str | Path | None) -> Path | None:
    """The newest complete checkpoint in ``folder`` (None when there is none)."""
    if folder is None or not Path(folder).is_dir():
        return None
    done = sorted(p for p in Path(folder).glob(f"{_PREFIX}*") if p.is_dir() and (p / "state.pt").is_file()
                  and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():  # the current device's only: a resume may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # written by an older version: every visible GPU's state
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def save(folder: str | Path, step: int, named_params: Sequence[tuple[str, torch.nn.Parameter]], optimizer, scheduler,
         history: list[dict[str, float]], methods_state: list[dict[str, torch.Tensor]],
         settings: dict[str, Any] | None = None, seconds: float | None = None) -> Path:
    """Write the checkpoint after ``step`` optimizer steps; remove older ones. ``seconds``: the stage's wall time so
    far, its earlier sessions included (a resumed stage reports its whole time)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    final = folder / f"{_PREFIX}{step:06d}"
    tmp = folder / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().to("cpu").contiguous() for n, p in named_params}, str(tmp / "trainable.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "history": history, "methods": methods_state, "settings": settings,
                "seconds": seconds},
               tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in folder.glob(f"{_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointMismatch(ValueError):
    """A checkpoint written by a stage with other settings or other trainable parameters."""


# stage settings that checkpoints written before them lack: such a checkpoint is taken without comparing them
LATER_KEYS = frozenset({"precision", "processes", "lora"})


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return [f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}" for k in keys]


def load(path: Path, named_params: Sequence[tuple[str, torch.nn.Parameter]], optimizer, scheduler,
         settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler from ``path``; return the rest (step, history, RNG, methods, the
    stage's seconds until then: None in a checkpoint of an older version).

    :class:`CheckpointMismatch` (nothing restored) when the checkpoint's trainable parameters differ from the model's
    in name or shape, or when both it and the caller give ``settings`` and they differ (a checkpoint written before
    settings were stored is taken as it is)."""
    from safetensors.torch import load_file

    again = f"delete {path.parent} to start the stage again"
    weights = load_file(str(path / "trainable.safetensors"))
    names = [n for n, _ in named_params]
    if sorted(weights) != sorted(names):
        missing = sorted(set(names) - set(weights)) or sorted(set(weights) - set(names))
        raise CheckpointMismatch(f"{path}: the checkpoint's trainable parameters do not match the model's "
                                 f"(first mismatch: {missing[0]!r}); {again}")
    for name, param in named_params:
        if tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointMismatch(f"{path}: the checkpoint's {name} has shape {tuple(weights[name].shape)}, the "
                                     f"model's {tuple(param.shape)} (another LoRA rank or target?); {again}")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)  # our own file, written above
    saved = state.get("settings")
    if saved is not None and settings is not None:  # a key added since (LATER_KEYS) is compared where it was written
        settings = {k: v for k, v in settings.items() if k in saved or k not in LATER_KEYS}
    if saved is not None and settings is not None and saved != settings:
        changed = _differences(saved, settings)
        if [c.split(":")[0] for c in changed] == ["start_weights"]:
            raise CheckpointMismatch(
                f"{path}: the model's trainable weights are not those the stage started from when it wrote this "
                f"checkpoint (a model already trained by an interrupted call, in the same process?): to resume, load "
                f"the model and its adapter as they were at the stage's start; {again} from the weights it has now")
        raise CheckpointMismatch(f"{path}: the checkpoint was written by a stage with other settings "
                                 f"({'; '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}): going on from it "
                                 f"would train neither; {again}")
    with torch.no_grad():
        for name, param in named_params:
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def restore_rng(state: dict[str, Any]) -> None:
    _set_rng_state(state["rng"])


def remove(folder: str | Path | None) -> None:
    """Delete a finished stage's checkpoints: the ``step-*`` folders this module wrote (complete or half-written), then
    ``folder`` itself if that left it empty. Anything else in it is the caller's and stays."""
    if folder is None or not Path(folder).is_dir():
        return
    for path in Path(folder).glob(f"{_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path)
    try:
        Path(folder).rmdir()
    except OSError:
        pass  # not empty: the caller's files
