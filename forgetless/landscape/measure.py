"""All flatness metrics of one model on one evaluation set, and the experiment step that adds them to runs.

:func:`measure_flatness` is what ``forgetless landscape --metrics`` and the experiment's ``landscape:`` section
run. :func:`measure_runs` goes over an experiment's finished runs, loads each run's domain-stage model (its
saved adapter), measures it on a small fixed held-out general-text set and writes the metrics into the run's
JSON; runs that already have metrics for the same settings are skipped, so it is resumable.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from forgetless.landscape.metrics import eps_sharpness, hessian_top_eigenvalue, hutchinson_trace, surface_metrics
from forgetless.landscape.objective import model_objective
from forgetless.landscape.surfaces import Surface, compute_surface, save_surface


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
    hessian_iters: int = 10
    trace_samples: int = 8
    rho: float = 0.05
    ascent_steps: int = 3
    save_surfaces: bool = True  # OUTPUT/landscape/RUN/surface.npz and its contour / 3-D figures

    def __post_init__(self) -> None:
        if self.params not in ("trainable", "all"):
            raise ValueError(f"params must be 'trainable' or 'all', got {self.params!r}")
        if self.blocks < 1 or self.batch_size < 1:
            raise ValueError("blocks and batch_size must be >= 1")
        if self.grid != 0 and self.grid < 3:
            raise ValueError(f"grid must be 0 (no surface) or >= 3, got {self.grid}")
        if self.span <= 0 or self.rho < 0:
            raise ValueError("span must be > 0 and rho >= 0")
        if self.hessian_iters < 0 or self.trace_samples < 0 or self.ascent_steps < -1:
            raise ValueError("hessian_iters and trace_samples must be >= 0, ascent_steps >= -1")

    def digest(self, extra: Any = None) -> str:
        return hashlib.sha1(json.dumps([asdict(self), extra], sort_keys=True, default=str).encode()).hexdigest()[:10]


def measure_flatness(model: torch.nn.Module, examples: Sequence[dict], settings: LandscapeSettings,
                     progress: bool = False) -> tuple[dict[str, float], Surface | None]:
    """The metrics of ``model`` on ``examples`` (``{input_ids, labels}``), and the 2-D surface if one was swept.

    Keys: ``loss`` (at the weights), ``surface_curvature``, ``average_gradient``, ``mean_absolute_gradient``,
    ``hessian_top_eigenvalue``, ``hessian_trace``, ``eps_sharpness`` (those not skipped), ``n_params``.
    """
    s = settings
    metrics: dict[str, float] = {}
    surface = None
    with model_objective(model, examples, s.params, s.batch_size, s.precision) as objective:
        metrics["loss"] = objective.value()
        metrics["n_params"] = int(sum(p.numel() for p in objective.params))
        if s.grid:
            surface = compute_surface(model, objective.value, dims=2, params=s.params, steps=s.grid,
                                      span=(-s.span, s.span), filter_normalize=s.filter_normalize, seed=s.seed,
                                      progress=progress)
            metrics.update(surface_metrics(surface.losses, surface.coords))
        if s.hessian_iters:
            metrics["hessian_top_eigenvalue"] = hessian_top_eigenvalue(objective, iters=s.hessian_iters, seed=s.seed)
        if s.trace_samples:
            metrics["hessian_trace"] = hutchinson_trace(objective, samples=s.trace_samples, seed=s.seed)
        if s.rho > 0 and s.ascent_steps >= 0:
            metrics["eps_sharpness"] = eps_sharpness(objective, rho=s.rho, steps=s.ascent_steps, seed=s.seed)
    return metrics, surface


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def measure_runs(output: Path, model_name: str, settings: LandscapeSettings, heldout_texts: Callable[[], list[str]],
                 block_size: int, data_key: Any = None, progress: bool = True) -> int:
    """Add ``record["landscape"]`` to every run JSON under ``output/runs`` that lacks it (for these settings).

    The model of a run is ``model_name`` plus the run's adapter (``output/adapters/RUN_ID``, the weights after the
    domain stage); a run without an adapter (``base``) is measured only with ``params: all``. The evaluation set
    is the first ``settings.blocks`` blocks of ``heldout_texts()`` (loaded only if a run needs measuring).
    Returns how many runs were measured.
    """
    from forgetless.data import lm_examples, pack_blocks
    from forgetless.models import load_model
    from forgetless.reporting.landscape_plots import plot_surface

    block = settings.block_size or block_size
    digest = settings.digest({"data": data_key, "block_size": block, "model": model_name})
    paths = sorted((Path(output) / "runs").glob("*.json"))
    todo = []
    for path in paths:
        record = json.loads(path.read_text())
        if (record.get("landscape") or {}).get("digest") != digest:
            todo.append((path, record))
    if not todo:
        return 0
    print(f"landscape: measuring {len(todo)} run(s) ({len(paths) - len(todo)} already measured)")
    examples = None
    measured = 0
    for path, record in todo:
        rid = record.get("run_id", path.stem)
        adapter = Path(output) / "adapters" / rid
        entry: dict[str, Any] = {"digest": digest, "settings": asdict(settings) | {"block_size": block}}
        has_adapter = (adapter / "adapter_config.json").is_file()
        if not has_adapter and settings.params == "trainable":
            entry["skipped"] = "no trained weights (a run without an adapter has no trainable parameters)"
            _write_json(path, record | {"landscape": entry})
            continue
        model, tokenizer = load_model(model_name)
        if examples is None:
            blocks = pack_blocks(heldout_texts(), tokenizer, block, max_blocks=settings.blocks)
            examples = lm_examples(blocks)
        if has_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        started = time.perf_counter()
        metrics, surface = measure_flatness(model, examples, settings, progress=progress)
        entry["metrics"] = metrics
        entry["tokens"] = int(sum(len(e["input_ids"]) - 1 for e in examples))
        entry["seconds"] = round(time.perf_counter() - started, 2)
        if surface is not None and settings.save_surfaces:
            folder = Path(output) / "landscape" / rid
            save_surface(surface, folder / "surface.npz")
            plot_surface(surface, folder)
            entry["surface"] = str(Path("landscape") / rid / "surface.npz")
        _write_json(path, record | {"landscape": entry})
        measured += 1
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "n_params")
        print(f"    {rid}: {shown} ({entry['seconds']:.0f} s)")
        del model
    return measured
