"""Choose the compute precision: bf16 autocast where the hardware runs bf16 matmuls fast, else float32.

On CUDA that is a GPU with native bf16 (Ampere and newer); older GPUs (T4, V100) get float32.

On CPUs without native bf16 instructions (no ``avx512_bf16`` / ``amx_bf16``), PyTorch emulates bf16
matmuls and they run about 100x *slower* than float32 (measured here on an AMD EPYC Zen 3: 1.3 vs
169 GFLOP/s), so "auto" picks float32 there.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp32")


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def cuda_supports_bf16() -> bool:
    """Native bf16 on the current CUDA device (sm 8.0+, Ampere and newer; ROCm): not torch's emulated bf16 on older
    GPUs (T4, V100), which ``is_bf16_supported()`` counts by default in the torch versions that have
    ``including_emulation``."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch whose is_bf16_supported has no such argument: its own answer
        return torch.cuda.is_bf16_supported()


def default_device() -> str:
    """Where a run computes when nothing says otherwise: ``"cuda"`` (this process's current GPU, which accelerate sets
    to its local rank) when there is one, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Turn "auto" into "bf16" or "fp32" for ``device``; check explicit choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if cuda_supports_bf16() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast context for a resolved precision ("bf16" or "fp32")."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
