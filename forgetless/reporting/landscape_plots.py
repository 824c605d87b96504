"""Figures of loss surfaces: a curve (1-D), a contour map and a 3-D surface (2-D).

They read a :class:`~forgetless.landscape.surfaces.Surface` (or its saved ``.npz``) and never touch a model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from forgetless.landscape.surfaces import Surface


def mark_origin(ax, surface, **style) -> None:
    """A red + at (0, 0), the weights themselves, where the grid holds it (a range such as [0.5, 1] does not: the
    marker would stretch the axes over blank space)."""
    a, b = (np.asarray(c) for c in surface.coords[:2])
    if a.min() <= 0 <= a.max() and b.min() <= 0 <= b.max():
        ax.plot([0], [0], "r+", **style)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _caption(surface: Surface) -> str:
    meta = surface.meta
    norm = "filter-normalized" if meta.get("filter_normalize") else "raw Gaussian"
    return f"{meta.get('params', '?')} weights, {norm} directions, seed {meta.get('seed', '?')}"


def plot_surface(surface: Surface, folder: str | Path, name: str = "surface", levels: int = 30) -> dict[str, Path]:
    """Write ``NAME_1d.png`` (1-D) or ``NAME_contour.png`` and ``NAME_3d.png`` (2-D); return their paths."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if surface.dims == 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(surface.coords[0], surface.losses, marker=".")
        ax.set_xlabel("a (direction 1)")
        ax.set_ylabel("loss (mean token NLL)")
        ax.set_title(_caption(surface), fontsize=8)
        ax.grid(alpha=0.3)
        paths["curve"] = folder / f"{name}_1d.png"
        fig.savefig(paths["curve"], dpi=120, bbox_inches="tight")
        plt.close(fig)
        return paths
    a, b = np.meshgrid(surface.coords[0], surface.coords[1], indexing="ij")
    losses = np.asarray(surface.losses)
    fig, ax = plt.subplots(figsize=(5, 4))
    filled = ax.contourf(a, b, losses, levels=levels, cmap="viridis")
    lines = ax.contour(a, b, losses, levels=levels, colors="k", linewidths=0.3)
    ax.clabel(lines, lines.levels[::4], inline=True, fontsize=6)
    fig.colorbar(filled, ax=ax, label="loss")
    mark_origin(ax, surface, ms=10)
    ax.set_xlabel("a (direction 1)")
    ax.set_ylabel("b (direction 2)")
    ax.set_title(_caption(surface), fontsize=8)
    paths["contour"] = folder / f"{name}_contour.png"
    fig.savefig(paths["contour"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    fig = plt.figure(figsize=(6, 5))
    ax3 = fig.add_subplot(projection="3d")
    ax3.plot_surface(a, b, losses, cmap="viridis", linewidth=0, antialiased=True)
    ax3.set_xlabel("a")
    ax3.set_ylabel("b")
    ax3.set_zlabel("loss", labelpad=12)
    ax3.set_title(_caption(surface), fontsize=8)
    paths["surface3d"] = folder / f"{name}_3d.png"
    fig.savefig(paths["surface3d"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
