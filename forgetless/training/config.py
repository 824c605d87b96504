"""Hyperparameters of one training stage.

Kept apart from the loop so that the hooks (:mod:`forgetless.training.hooks`), the experiment schema and the
methods can all import it without importing the loop.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Hyperparameters of one stage. ``max_steps`` (optimizer steps) wins over ``epochs`` when set."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "linear"  # any name transformers.get_scheduler knows
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # "auto": bf16 autocast where the hardware has it, else fp32
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("epochs must be > 0 (or set max_steps)")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
