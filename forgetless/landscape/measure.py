"""All flatness metrics of one model on one evaluation set: :func:`measure_flatness` is what ``forgetless landscape
--metrics`` and the experiment's ``landscape:`` section (:mod:`forgetless.landscape_runs`) run."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from forgetless.landscape.metrics import (eps_sharpness_parts, hessian_eigenvalues, hessian_lanczos,
                                         hutchinson_trace_estimate, surface_metrics)
from forgetless.landscape.objective import model_objective
from forgetless.precision import PRECISIONS
from forgetless.landscape.surfaces import Surface, compute_surface


@dataclass
class LandscapeSettings:
    """The ``landscape:`` section of an experiment (every key optional; small defaults).

    A metric is skipped when its size is 0: ``grid: 0`` (no surface), ``hessian_iters: 0``, ``trace_samples: 0``,
    ``ascent_steps: -1`` (``0`` keeps SAM's one-step estimate).
    """

    params: str = "trainable"  # or "all"; "trainable" skips runs without an adapter (base)
    blocks: int = 4  # held-out general-text blocks the metrics are measured on
    block_size: int | None = None  # tokens per block; default: the experiment's general.block_size
    batch_size: int = 4
    precision: str = "fp32"
    grid: int = 9  # points per axis of the 2-D surface
    span: float = 1.0  # a, b in [-span, span]
    filter_normalize: bool = True
    seed: int = 0
    hessian_iters: int = 10  # Lanczos steps; per power iteration: 10 products, up to 20 when the dominant is negative
    # "lanczos" (default since session 29): hessian_iters Lanczos steps, both ends of the spectrum at once (converges
    # where the power iteration does not: clustered or two-sided spectra; keeps hessian_iters parameter-sized vectors,
    # refused when they do not fit); "power": the (shifted) power iteration, two vectors, what experiments recorded
    # before session 29 measured (their YAMLs pin it)
    hessian_method: str = "lanczos"
    trace_samples: int = 8
    rho: float = 0.05
    ascent_steps: int = 3
    save_surfaces: bool = True  # OUTPUT/landscape/RUN/surface.npz and its contour / 3-D figures
    # Runs of these seeds also get the surface over *all* weights (same grid, span and seed; surface metrics only),
    # to set beside the one over the LoRA directions: OUTPUT/landscape/RUN/all_weights/. None: off.
    all_weights_seeds: list[int] | None = None

    def __post_init__(self) -> None:
        if self.params not in ("trainable", "all"):
            raise ValueError(f"params must be 'trainable' or 'all', got {self.params!r}")
        if self.blocks < 1 or self.batch_size < 1:
            raise ValueError("blocks and batch_size must be >= 1")
        if self.grid != 0 and self.grid < 3:
            raise ValueError(f"grid must be 0 (no surface) or >= 3, got {self.grid}")
        if not (math.isfinite(self.span) and self.span > 0) or not (math.isfinite(self.rho) and self.rho >= 0):
            raise ValueError(f"span must be finite and > 0 and rho finite and >= 0, got span {self.span}, "
                             f"rho {self.rho}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.hessian_method not in ("power", "lanczos"):
            raise ValueError(f"hessian_method must be 'power' or 'lanczos', got {self.hessian_method!r}")
        if self.hessian_iters < 0 or self.trace_samples < 0 or self.ascent_steps < -1:
            raise ValueError("hessian_iters and trace_samples must be >= 0, ascent_steps >= -1")
        if self.all_weights_seeds is not None and (self.params != "trainable" or not self.grid):
            raise ValueError("all_weights_seeds sets a surface over all weights beside the one over the trainable "
                             "(LoRA) directions: it needs params 'trainable' and a grid")

    def digest(self, extra: Any = None) -> str:
        """Identifies the measurement; not ``all_weights_seeds`` (it adds a measurement with its own digest), nor
        ``hessian_method: power``, so that measurements recorded before the option (all power) keep their digest."""
        fields_ = {k: v for k, v in asdict(self).items()
                   if k != "all_weights_seeds" and not (k == "hessian_method" and v == "power")}
        if self.params == "all":  # measurements over all weights drawn before session 32 are measured again
            from forgetless.landscape.surfaces import DIRECTIONS_ALL

            fields_["directions"] = DIRECTIONS_ALL
        return hashlib.sha1(json.dumps([fields_, extra], sort_keys=True, default=str).encode()).hexdigest()[:10]

    def all_weights(self) -> LandscapeSettings | None:
        """The settings of the all-weights surface (``all_weights_seeds``), or None when it is off."""
        if self.all_weights_seeds is None:
            return None
        return replace(self, params="all", hessian_iters=0, trace_samples=0, ascent_steps=-1, hessian_method="power",
                       all_weights_seeds=None)


def measure_flatness(model: torch.nn.Module, examples: Sequence[dict], settings: LandscapeSettings,
                     progress: bool = False) -> tuple[dict[str, float], Surface | None]:
    """The metrics of ``model`` on ``examples`` (``{input_ids, labels}``), and the 2-D surface if one was swept.

    Keys: ``loss`` (at the weights), ``surface_curvature``, ``average_gradient``, ``mean_absolute_gradient``,
    ``hessian_top_eigenvalue`` (largest algebraic), ``hessian_dominant_eigenvalue`` (largest magnitude, sign kept),
    ``hessian_trace``, ``eps_sharpness`` and its first-order part ``eps_first_order`` (rho times the gradient's
    norm; those not skipped), ``hessian_bottom_eigenvalue`` and its residual
    ``hessian_bottom_residual`` (``hessian_method: lanczos`` only), ``n_params``, and how far to trust two of them:
    ``hessian_dominant_residual`` and ``hessian_top_residual`` (relative residuals of the dominant and the top
    eigenpairs: near 0 an eigenpair, of order 1 not; one pair when the dominant eigenvalue is positive)
    and ``hessian_trace_stderr`` (standard error of the trace over its probes; with at least two).
    """
    s = settings
    metrics: dict[str, float] = {}
    surface = None
    with model_objective(model, examples, s.params, s.batch_size, s.precision) as objective:
        if s.hessian_iters and s.hessian_method == "lanczos":
            _check_lanczos_fits(objective.params, s.hessian_iters)  # before the surface: refused, nothing is lost
        _warn_reduced_weights(objective.params, s)
        metrics["loss"] = objective.value()
        metrics["n_params"] = int(sum(p.numel() for p in objective.params))
        if s.grid:
            surface = compute_surface(model, objective.value, dims=2, params=s.params, steps=s.grid,
                                      span=(-s.span, s.span), filter_normalize=s.filter_normalize, seed=s.seed,
                                      progress=progress)
            metrics.update(surface_metrics(surface.losses, surface.coords))
        if s.hessian_iters:
            if s.hessian_method == "lanczos":
                eigen = hessian_lanczos(objective, steps=s.hessian_iters, seed=s.seed)
                metrics["hessian_bottom_eigenvalue"] = eigen["bottom"]  # the smallest algebraic eigenvalue
                metrics["hessian_bottom_residual"] = eigen["bottom_residual"]
            else:
                eigen = hessian_eigenvalues(objective, iters=s.hessian_iters, seed=s.seed)
            metrics["hessian_top_eigenvalue"] = eigen["top"]  # the largest algebraic eigenvalue
            metrics["hessian_dominant_eigenvalue"] = eigen["dominant"]  # the largest in magnitude, sign kept
            metrics["hessian_dominant_residual"] = eigen["dominant_residual"]  # ~0: converged; ~1: too few iters
            metrics["hessian_top_residual"] = eigen["top_residual"]  # the same for the top (largest algebraic) pair
        if s.trace_samples:
            trace, stderr = hutchinson_trace_estimate(objective, samples=s.trace_samples, seed=s.seed)
            metrics["hessian_trace"] = trace
            if s.trace_samples > 1:  # one probe has no spread to estimate it from
                metrics["hessian_trace_stderr"] = stderr
        if s.rho > 0 and s.ascent_steps >= 0:
            metrics["eps_sharpness"], metrics["eps_first_order"] = eps_sharpness_parts(
                objective, rho=s.rho, steps=s.ascent_steps, seed=s.seed)
    return metrics, surface


def _warn_reduced_weights(params: Sequence[torch.Tensor], settings: LandscapeSettings) -> None:
    """eps-sharpness moves every weight by about rho / sqrt(N): over all weights of a 16-bit base that is mostly
    below the weights' own resolution (SmolLM2-135M at rho 0.05: 4e-6 against half a bf16 step of 6e-5 at |w| 0.03),
    so most of the shift rounds away; the Hessian products are 16-bit too."""
    reduced = sorted({str(p.dtype).removeprefix("torch.") for p in params
                      if p.dtype in (torch.bfloat16, torch.float16)})
    wants = (settings.rho > 0 and settings.ascent_steps >= 0) or settings.hessian_iters or settings.trace_samples
    if reduced and wants:
        warnings.warn(f"flatness over {settings.params} weights held in {', '.join(reduced)}: eps-sharpness's shift of "
                      f"rho / sqrt(N) per weight mostly rounds away and the Hessian products are computed at that "
                      f"precision; load the base in float32 (dtype: fp32) for these metrics")


def available_bytes(device: torch.device) -> int | None:
    """Free memory where ``device``'s tensors live: the GPU's free memory, or the host's available memory (Linux's
    MemAvailable); None where it cannot be told."""
    if device.type == "cuda":  # free on the card, plus what PyTorch's allocator holds unused (the sweep's)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(0, cached)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_lanczos_fits(params: Sequence[torch.Tensor], steps: int) -> None:
    """ValueError, before any work, when the Lanczos basis (``steps`` vectors the size of ``params``, in their work
    dtype, plus two in flight) would take more than half of the free memory: ``params: all`` on a billion-parameter
    model. The power iteration keeps two vectors."""
    from forgetless.landscape.objective import _work_dtype

    if not params:
        return
    size = sum(p.numel() * _work_dtype(p).itemsize for p in params)
    need, free = (steps + 2) * size, available_bytes(params[0].device)
    if free is not None and need > free // 2:
        raise ValueError(f"hessian_method lanczos keeps {steps} vectors of {sum(p.numel() for p in params):,} "
                         f"parameters: {need / 2**30:.1f} GiB, more than half of the {free / 2**30:.1f} GiB free on "
                         f"{params[0].device}; use hessian_method: power (two vectors), fewer hessian_iters, or "
                         f"params: trainable")
