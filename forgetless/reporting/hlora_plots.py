"""Figures for HLoRA: where the general-stage importance sits, and how the domain-stage losses evolve."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

# a numbered block (Llama's layers.N, GPT-2's h.N, blocks.N, ...) and the module path inside it
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.(.+)$")
OUTSIDE = -1  # the "layer" of a module outside the numbered blocks (a LoRA on lm_head)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def importance_norms(importance: Mapping[str, torch.Tensor]) -> dict[tuple[str, int], float]:
    """(module kind, layer index) -> ||Omega||_2. The kind is the module's path inside its numbered block
    (``self_attn.q_proj``, ``mlp.experts.0.down_proj``, GPT-2's ``attn.c_attn``); a module outside the blocks is its
    own kind at layer :data:`OUTSIDE`. Modules that meet in one cell (the language and vision towers' layers of one
    index) give the norm of their importance together (root of the summed squares), not the last one's."""
    squares: dict[tuple[str, int], float] = {}
    for name, omega in importance.items():
        match = _LAYER.search(name)
        key = (match.group(2), int(match.group(1))) if match else (name, OUTSIDE)
        squares[key] = squares.get(key, 0.0) + float(torch.linalg.vector_norm(omega.detach().float())) ** 2
    return {key: math.sqrt(value) for key, value in squares.items()}


def plot_importance_heatmap(importance: Mapping[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """log10 ||Omega_l||_2: one column per layer index, one row per target module type."""
    plt = _pyplot()
    norms = importance_norms(importance)
    kinds = sorted({k for k, _ in norms})
    layers = sorted({layer for _, layer in norms})
    grid = torch.full((len(kinds), len(layers)), float("nan"))
    for (kind, layer), value in norms.items():
        grid[kinds.index(kind), layers.index(layer)] = math.log10(value) if value > 0 else float("nan")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 0.6 * len(kinds) + 1.8))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(layers)), ["-" if x == OUTSIDE else str(x) for x in layers], fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer")
    ax.set_title(title or "HLoRA importance: log10 ||Omega_l||_2")
    fig.colorbar(im, ax=ax, label="log10 ||Omega||")
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_domain_losses(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Task loss and the scaled regularization term phi * L_reg per domain-stage step (log y axis)."""
    plt = _pyplot()
    steps = [row.get("step", i + 1) for i, row in enumerate(history)]
    task = [row.get("task_loss", row.get("loss", float("nan"))) for row in history]
    reg = [row.get("reg_loss_scaled", float("nan")) for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, task, label="task loss")
    ax.plot(steps, [r if r > 0 else float("nan") for r in reg], label="phi * L_reg")
    ax.set_yscale("log")
    ax.set_xlabel("domain step")
    ax.set_ylabel("loss")
    ax.set_title(title or "HLoRA domain stage")
    ax.legend()
    return _save(plt, fig, path)


def hlora_section(results: Sequence[Mapping], folder: str | Path, top: int = 5) -> str:
    """Figures and a Markdown section for every run that used HLoRA in an experiment's results folder.

    Per run: the importance heatmap (from the general stage's saved importance, one figure per distinct
    general stage), the domain-stage loss curves (task loss and phi * L_reg), and the ``top`` modules with the
    largest layer coefficients c_l (eq 15) with the ratio between the largest and smallest coefficient.
    Returns "" when no run used HLoRA.
    """
    from forgetless.methods.hlora import FILENAME, load_importance

    folder = Path(folder)
    lines: list[str] = []
    heatmaps: dict[str, str] = {}
    for run in results:
        if "hlora" not in str(run.get("method", "")):
            continue
        rid = run.get("run_id", f"{run['method']}-{run.get('seed', 0)}")
        lines.append(f"### {run['method']} on {run.get('task', '?')} (seed {run.get('seed', 0)})\n")
        stage_dir = run.get("general_stage")
        importance_file = folder / stage_dir / FILENAME if stage_dir else None
        if importance_file is not None and importance_file.is_file():
            if stage_dir not in heatmaps:
                name = f"figures/hlora_importance-{Path(stage_dir).name}.png"
                plot_importance_heatmap(load_importance(importance_file)["omega"], folder / name,
                                        title=f"HLoRA importance, log10 ||Omega_l||_2 ({run['method']})")
                heatmaps[stage_dir] = name
            lines.append(f"![importance heatmap]({heatmaps[stage_dir]})\n")
        domain = [s for s in run.get("stages", []) if s.get("stage") == "domain"]
        if domain and domain[-1].get("history"):
            name = f"figures/hlora_domain_loss-{rid}.png"
            plot_domain_losses(domain[-1]["history"], folder / name, title=f"{run['method']}: domain stage")
            lines.append(f"![domain-stage losses]({name})\n")
        coeff = (domain[-1].get("extras", {}) if domain else {}).get("hlora_layer_coefficients")
        if coeff:
            ranked = sorted(coeff.items(), key=lambda kv: -kv[1])
            ratio = ranked[0][1] / ranked[-1][1] if ranked[-1][1] > 0 else float("inf")
            lines.append(f"Layer coefficients c_l over {len(ranked)} modules (uniform would be {1 / len(ranked):.4f}); "
                         f"largest / smallest = {ratio:.3g}. Modules that dominate:\n")
            lines.append("| module | c_l |\n|---|---|")
            lines.extend(f"| `{n}` | {v:.4f} |" for n, v in ranked[:top])
            lines.append("")
    if not lines:
        return ""
    return "\n## HLoRA: importance and regularization\n\n" + "\n".join(lines) + "\n"
