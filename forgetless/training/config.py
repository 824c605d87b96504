"""Hyperparameters of one training stage.

Kept apart from the loop so that the hooks (:mod:`forgetless.training.hooks`), the experiment schema and the
methods can all import it without importing the loop.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields
from typing import Any

from forgetless.precision import PRECISIONS


# Schedules that need no extra arguments (reduce_lr_on_plateau needs a metric, greedy/warmup_stable_decay options).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
ON_NONFINITE = ("stop", "skip_step")
REPORT_TO = ("tensorboard", "wandb", "mlflow")  # the trackers of forgetless.training.logging
# transformers' attention implementations offered (forgetless.models.ATTN_IMPLEMENTATIONS is this tuple)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


# ---- values given in Python or as strings (YAML reads 1e-4, with no dot, as a string), checked as the schema would
def as_float(name: str, value: Any) -> float:
    """A float option's value: a number, or a string of one (YAML reads 1e-4, with no dot, as a string); not NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, not NaN (got {value!r})")
    return number


def as_bool(name: str, value: Any) -> bool:
    """A yes/no option's value: a bool, or the strings true/false (from Python or a command line); bool('false') is
    True, so a string is never taken as it is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def as_int(name: str, value: Any) -> int:
    """An integer option's value: an int, or a float or string holding a whole number."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = float(value) if isinstance(value, (float, str)) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


@dataclass
class TrainConfig:
    """Hyperparameters of one stage. ``max_steps`` (optimizer steps) wins over ``epochs`` when set."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "linear"  # one of SCHEDULERS (transformers.get_scheduler)
    # warmup steps: int(warmup_ratio x the stage's steps), rounded down, as every recorded run took it (transformers'
    # Trainer rounds up: 0.05 of 50 steps is 2 here, 3 there; a ratio under 1/steps gives no warmup here)
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # "auto": bf16 autocast where the hardware has it, else fp32
    seed: int = 0
    progress: bool = field(default=True, metadata={"numbers": False})
    # A non-finite loss or gradient norm: "stop" the run with an error naming the stage and step (default), or
    # "skip_step": drop that optimizer step (no update; the schedule still advances), counted in the stage record.
    # (A step none of whose examples has a labelled token is dropped so whatever this says.)
    on_nonfinite: str = "stop"
    # Recompute activations in the backward pass instead of keeping them: less memory, about a third more time.
    gradient_checkpointing: bool = field(default=False, metadata={"numbers": False})
    # Checkpoint the stage every N optimizer steps (adapter, optimizer, scheduler, RNG, data position, method state),
    # so that an interrupted run goes on from there; finished stages' checkpoints are removed unless kept.
    save_every: int | None = field(default=None, metadata={"numbers": False})
    keep_checkpoints: bool = field(default=False, metadata={"numbers": False})
    # Trackers that receive the stage's scalars (loss, the methods' terms, lr, gradient norm, tokens/s): any of
    # REPORT_TO; tensorboard writes to logging_dir (default OUTPUT/logs/RUN_ID under `forgetless run`).
    report_to: list[str] = field(default_factory=list, metadata={"numbers": False})
    logging_dir: str | None = field(default=None, metadata={"numbers": False})
    # The step's scalars stay on the device and are read every log_every optimizer steps (and at the stage's end):
    # the history rows, the trackers and the progress line are written then.
    log_every: int = field(default=10, metadata={"numbers": False})
    # Speed levers (docs/speed.md). They compute the same function, so they change no number beyond rounding and are
    # not part of a run's identity, except group_by_length, which changes which examples share a step.
    # attn_implementation: switch the model's attention for the stage (sdpa, eager, flash_attention_2); null: as
    # loaded (transformers' default, sdpa).
    attn_implementation: str | None = field(default=None, metadata={"numbers": False})
    # torch.compile the decoder layers for the stage, and the chunked cross-entropy's chunks where the loss goes
    # chunked (inductor; a C++ compiler on the CPU): slow first steps.
    compile: bool = field(default=False, metadata={"numbers": False})
    # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) in the model: pip install 'forgetless[liger]', CUDA only.
    liger: bool = field(default=False, metadata={"numbers": False})
    # Each micro-batch as one row without padding, position ids restarting per example (TRL's padding_free).
    padding_free: bool = field(default=False, metadata={"numbers": False})
    # Batches of examples of similar length (transformers' LengthGroupedSampler): less padding, other batches.
    group_by_length: bool = False
    # Each LoRA layer adds its update inside one matmul (addmm) instead of PEFT's three passes over the layer's output
    # (forgetless.fused_lora): the same function, rounded once instead of three times.
    fused_lora: bool = field(default=False, metadata={"numbers": False})

    def __post_init__(self) -> None:
        # the types, as the experiment schema checks them, for a TrainConfig built in Python too (a string '8', a
        # float 2.0 for an integer, 'false' for a bool: bool('false') is True)
        for name in ("epochs", "lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None or name != "max_grad_norm":
                number = as_float(name, value)  # checked; an int stays an int (epochs: 1 is in cache keys as 1)
                if isinstance(value, str):
                    setattr(self, name, number)
        for name in ("batch_size", "grad_accum", "seed", "max_steps", "save_every", "log_every"):
            if getattr(self, name) is not None or name not in ("max_steps", "save_every"):
                setattr(self, name, as_int(name, getattr(self, name)))
        for name in ("progress", "gradient_checkpointing", "keep_checkpoints", "compile", "liger", "padding_free",
                     "group_by_length", "fused_lora"):
            setattr(self, name, as_bool(name, getattr(self, name)))
        if self.max_steps is None and not math.isfinite(self.epochs):
            raise ValueError(f"epochs must be finite, got {self.epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or null to train for 'epochs'), got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError("epochs must be > 0 (or set max_steps)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if not (0 <= self.weight_decay < math.inf):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or null for no clipping), got {self.max_grad_norm}")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"save_every must be >= 1 (or null for no checkpoints), got {self.save_every}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        twice = sorted({name for name in self.report_to if self.report_to.count(name) > 1})
        if twice:  # two writers of one run: every scalar written twice
            raise ValueError(f"report_to lists {', '.join(twice)} more than once")
        for name in self.report_to:
            if name not in REPORT_TO:
                raise ValueError(f"report_to must list some of {list(REPORT_TO)}, got {name!r}")
            if importlib.util.find_spec(name) is None:
                extra = " (pip install forgetless[tensorboard])" if name == "tensorboard" else ""
                raise ValueError(f"report_to: {name} is not installed{extra}")
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)} (or null: as loaded), "
                             f"got {self.attn_implementation!r}")
        if self.liger and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("liger: true needs the Liger kernels: pip install 'forgetless[liger]' (CUDA GPUs only)")
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation: flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn --no-build-isolation) and a CUDA GPU; use sdpa or eager")
        for name, allowed in (("scheduler", SCHEDULERS), ("precision", PRECISIONS), ("on_nonfinite", ON_NONFINITE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")


# Fields that change no number of a run (metadata {"numbers": False}): never part of its identity or of a cache key.
NO_NUMBERS = frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("numbers") is False)
