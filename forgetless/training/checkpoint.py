"""Mid-stage checkpoints: everything a training stage needs to go on exactly where it stopped.

A checkpoint is a folder ``step-000040`` inside the stage's checkpoint folder, written under a temporary name and
renamed when complete (a half-written checkpoint is never read), holding:

* ``trainable.safetensors``: the trainable parameters (the adapter);
* ``state.pt``: optimizer and scheduler state dicts, the RNG states (torch CPU and CUDA, Python, NumPy), the number of
  optimizer steps taken (the data position: the loader is replayed up to it), the stage's history so far, and each
  method's :meth:`~forgetless.training.hooks.Method.stage_state`.

Only the newest complete checkpoint is kept. Resuming gives the same weights as an uninterrupted stage, bit for bit
on a CPU in float32 (tested with a stage killed by SIGKILL).
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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: str | Path, step: int, named_params: Sequence[tuple[str, torch.nn.Parameter]], optimizer, scheduler,
         history: list[dict[str, float]], methods_state: list[dict[str, torch.Tensor]]) -> Path:
    """Write the checkpoint after ``step`` optimizer steps; remove older ones."""
    from safetensors.torch import save_file

    folder = Path(folder)
    final = folder / f"{_PREFIX}{step:06d}"
    tmp = folder / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().to("cpu").contiguous() for n, p in named_params}, str(tmp / "trainable.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "history": history, "methods": methods_state}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in folder.glob(f"{_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, named_params: Sequence[tuple[str, torch.nn.Parameter]], optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler from ``path``; return the rest (step, history, RNG, methods)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    names = [n for n, _ in named_params]
    if sorted(weights) != sorted(names):
        missing = sorted(set(names) - set(weights)) or sorted(set(weights) - set(names))
        raise ValueError(f"{path}: the checkpoint's trainable parameters do not match the model's "
                         f"(first mismatch: {missing[0]!r}); delete the checkpoint folder to start the stage again")
    with torch.no_grad():
        for name, param in named_params:
            param.copy_(weights[name].to(param.device, param.dtype))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)  # our own file, written above
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def restore_rng(state: dict[str, Any]) -> None:
    _set_rng_state(state["rng"])


def remove(folder: str | Path | None) -> None:
    """Delete a finished stage's checkpoints."""
    if folder is not None and Path(folder).is_dir():
        shutil.rmtree(folder)
