"""1-D and 2-D loss surfaces ``L(theta + a d1 + b d2)`` around a model's weights.

Method of Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets":

* section 3: 1-D linear interpolation / 2-D plots ``f(a, b) = L(theta* + a delta + b eta)`` along two random
  directions ``delta``, ``eta`` (Gaussian, i.i.d. N(0, 1) entries);
* section 4, "filter normalization": each filter of a direction is rescaled to the norm of the corresponding
  filter of the weights, ``d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||theta_{i,j}||`` (i: layer, j: filter). For a
  2-D weight ``[out, in]`` (``nn.Linear``, embeddings) a filter is a row (one output unit); for a convolution
  ``[out, in, k...]`` everything after the first axis. 1-D parameters (biases, norm scales) are set to zero in
  the direction (the paper's ``ignore='biasbn'``) unless ``one_d="filter"`` (then rescaled as a whole) or
  ``one_d="keep"`` (left Gaussian).

Caveat for LoRA: a row of ``B`` that is still zero (B is zero at initialisation) has norm 0, so the filter-
normalized direction is zero there; along such directions only ``A`` moves, which changes nothing while B = 0.
Use ``params="all"`` or ``filter_normalize=False`` to look at LoRA models at the start of training.

Directions live over the *trainable* parameters (``params="trainable"``, e.g. the LoRA matrices) or over
*all* parameters (``params="all"``). Weights are restored bit-exactly after the sweep.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from forgetless.progress import progress as show_progress

from forgetless.landscape.objective import select_parameters

LossFn = Callable[[], torch.Tensor | float]
"""Computes the loss of the model as its weights are now (on fixed data)."""


def random_direction(params: Sequence[torch.Tensor], generator: torch.Generator | None = None,
                     filter_normalize: bool = True, one_d: str = "zero") -> list[torch.Tensor]:
    """A Gaussian direction (float32, on the parameters' devices), filter-normalized if asked (Li et al. sec 4)."""
    if one_d not in ("zero", "filter", "keep"):
        raise ValueError(f"one_d must be 'zero', 'filter' or 'keep', got {one_d!r}")
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device)
        if filter_normalize:
            w = p.detach().float()
            if p.dim() <= 1:
                if one_d == "zero":
                    d = torch.zeros_like(d)
                elif one_d == "filter":
                    d = d * (w.norm() / (d.norm() + 1e-10))
            else:
                wn = w.flatten(1).norm(dim=1)
                dn = d.flatten(1).norm(dim=1)
                d = d * (wn / (dn + 1e-10)).view(-1, *([1] * (p.dim() - 1)))
        out.append(d)
    return out


def _loss_value(loss_fn: LossFn) -> float:
    value = loss_fn()
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


@torch.no_grad()
def loss_surface(params: Sequence[torch.Tensor], loss_fn: LossFn, directions: Sequence[Sequence[torch.Tensor]],
                 coords: Sequence[np.ndarray], progress: bool = False) -> np.ndarray:
    """``L(theta + sum_k c_k d_k)`` on the grid ``coords`` (one 1-D array per direction): shape
    ``[len(coords[0]), len(coords[1]), ...]``. Weights are set in float32 (float64 kept) and cast to their dtype;
    restored bit-exactly after, also on an error."""
    if len(directions) != len(coords) or len(directions) not in (1, 2):
        raise ValueError("give one or two directions, each with its coordinates")
    kept = [p.detach().clone() for p in params]
    base = [k.to(torch.promote_types(k.dtype, torch.float32)) for k in kept]
    shape = tuple(len(c) for c in coords)
    out = np.empty(shape, dtype=np.float64)
    try:
        for index in show_progress(list(np.ndindex(*shape)), "loss surface", unit="point", enabled=progress):
            for j, p in enumerate(params):
                w = base[j]
                for k, d in enumerate(directions):
                    w = w + float(coords[k][index[k]]) * d[j].to(w.dtype)
                p.copy_(w.to(p.dtype))
            out[index] = _loss_value(loss_fn)
    finally:
        for p, k in zip(params, kept):
            p.copy_(k)
    return out


@dataclass
class Surface:
    coords: list[np.ndarray]  # one array per direction (a, and b for 2-D)
    losses: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return len(self.coords)


# How directions over all weights are drawn (recorded in a surface's meta and in the landscape digest of
# params: all): "separate streams" since session 32. Before, one stream ran through the parameters in the model's
# order, where PEFT puts each targeted layer's LoRA factors right after its weight: the draws for every later base
# weight depended on the LoRA rank and targets, so the base run and LoRA runs were cut along different directions.
DIRECTIONS_ALL = "separate streams"
_LORA_STREAM = 1_000_003  # the LoRA factors' generator: seed + this


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def _directions(named: Sequence[tuple[str, torch.Tensor]], dims: int, seed: int, filter_normalize: bool,
                one_d: str) -> list[list[torch.Tensor]]:
    """``dims`` directions over the parameters ``named``, in their order. When they mix the model's own weights and
    LoRA factors (``params: all`` on an adapter), each kind draws from its own generator, one direction after the
    other: the own weights from ``seed`` (as a model without an adapter draws them), the factors from ``seed +``
    :data:`_LORA_STREAM`. Only factors (``params: trainable``) or only own weights: one generator seeded with
    ``seed``, as before."""
    kinds = [_is_lora(name) for name, _ in named]
    tensors = [p for _, p in named]
    if all(kinds) or not any(kinds):
        g = torch.Generator().manual_seed(seed)
        return [random_direction(tensors, g, filter_normalize, one_d) for _ in range(dims)]
    own = [p for p, lora in zip(tensors, kinds) if not lora]
    factors = [p for p, lora in zip(tensors, kinds) if lora]
    g_own, g_factors = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + _LORA_STREAM)
    out = []
    for _ in range(dims):
        parts = iter(random_direction(own, g_own, filter_normalize, one_d))
        lora_parts = iter(random_direction(factors, g_factors, filter_normalize, one_d))
        out.append([next(lora_parts) if lora else next(parts) for lora in kinds])
    return out


def compute_surface(model: torch.nn.Module, loss_fn: LossFn, dims: int = 2, params: str = "trainable",
                    steps: int = 21, span: tuple[float, float] = (-1.0, 1.0), filter_normalize: bool = True,
                    one_d: str = "zero", seed: int = 0, progress: bool = False) -> Surface:
    """A 1-D or 2-D surface around the model's current weights, on a ``steps`` (x ``steps``) grid over ``span``.

    ``loss_fn`` computes the loss of the model as it is (fixed evaluation data, e.g. ``Objective.value``). The
    directions come from a CPU generator seeded with ``seed``, so they are the same on any device. Over all weights
    (``params="all"``) the model's own weights and the LoRA factors draw from two streams (:func:`_directions`), so
    the base weights' part of a direction is the same for the base model and for any LoRA rank or targets.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    if steps < 2:
        raise ValueError("steps must be >= 2")
    named = select_parameters(model, params)
    tensors = [p for _, p in named]
    directions = _directions(named, dims, seed, filter_normalize, one_d)
    coords = [np.linspace(span[0], span[1], steps) for _ in range(dims)]
    was_training = model.training
    model.eval()
    try:
        losses = loss_surface(tensors, loss_fn, directions, coords, progress=progress)
    finally:
        model.train(was_training)
    meta = {"params": params, "n_params": int(sum(p.numel() for p in tensors)), "filter_normalize": filter_normalize,
            "one_d": one_d, "seed": seed, "steps": steps, "span": list(span)}
    if params == "all":
        meta["directions"] = DIRECTIONS_ALL
    return Surface(coords=coords, losses=losses, meta=meta)


def save_surface(surface: Surface, path: str | Path) -> Path:
    """Write the raw grid for re-plotting: ``coord0`` (a), ``coord1`` (b, 2-D only), ``losses``, ``meta`` (JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"coord{k}": c for k, c in enumerate(surface.coords)}
    np.savez(path, losses=surface.losses, meta=json.dumps(surface.meta), **arrays)
    return path


def load_surface(path: str | Path) -> Surface:
    """Read back what :func:`save_surface` wrote."""
    data = np.load(path)
    coords = [data[f"coord{k}"] for k in range(data["losses"].ndim)]
    return Surface(coords=coords, losses=data["losses"], meta=json.loads(str(data["meta"])))
