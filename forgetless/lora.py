"""The LoRA toolkit: find a model's LoRA layers and compute their full-weight update ``dW = s * B @ A``.

Every consumer of the update (HLoRA, EWC, WiSE-FT, the landscape) calls :func:`delta_weight` or, for factors that
are not the module's current ones (stored, stacked), :func:`delta_from_factors`. The semantics are those of
PEFT's ``LoraLayer.get_delta_weight`` (``peft/tuners/lora/layer.py``)::

    dW = transpose(B @ A, fan_in_fan_out) * scaling[adapter]

so ``dW`` has the shape of the base layer's ``weight`` (``[out, in]`` for ``nn.Linear``, ``[in, out]`` for
GPT-2's ``Conv1D`` with ``fan_in_fan_out=True``). Unlike PEFT's, these functions are differentiable in A and B,
compute in float32 (or wider) whatever the factor dtype, and never merge anything into the base weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_ADAPTER = "default"


def lora_modules(model: torch.nn.Module, adapter: str = DEFAULT_ADAPTER) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every PEFT LoRA layer that has a Linear-style ``adapter`` (A: ``[r, in]``, B: ``[out, r]``).

    Modules whose LoRA factors are not plain linear maps (embeddings, convolutions) are skipped: their update is
    not ``B @ A``.
    """
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear):
            found.append((name, module))
    return found


def factors(module: torch.nn.Module, adapter: str = DEFAULT_ADAPTER) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The LoRA parameters (A, B) of ``module`` for ``adapter``."""
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight


def scaling(module: torch.nn.Module, adapter: str = DEFAULT_ADAPTER) -> float:
    """``s``: ``alpha / r`` (``alpha / sqrt(r)`` under rsLoRA), as PEFT set it."""
    return float(module.scaling[adapter])


def fan_in_fan_out(module: torch.nn.Module) -> bool:
    """True when the base weight is stored ``[in, out]`` (GPT-2's Conv1D): dW is then ``(B @ A)^T``."""
    return bool(getattr(module, "fan_in_fan_out", False))


def update_shape(module: torch.nn.Module, adapter: str = DEFAULT_ADAPTER) -> tuple[int, int]:
    """The shape of ``dW``, which is the shape of the base layer's weight."""
    a, b = factors(module, adapter)
    shape = (b.shape[0], a.shape[1])
    return (shape[1], shape[0]) if fan_in_fan_out(module) else shape


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def delta_from_factors(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor, fan_in_fan_out: bool = False,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """``transpose(B @ A, fan_in_fan_out) * scale`` for factors ``A`` ``[..., r, in]`` and ``B`` ``[..., out, r]``.

    Leading dimensions broadcast (a stack of same-shaped modules is one batched matmul); ``scale`` may be a tensor
    broadcastable to the result (one factor per stacked module). Computed in ``dtype`` (default: at least float32).
    """
    dtype = dtype or compute_dtype(a.dtype)
    out = torch.matmul(b.to(dtype), a.to(dtype))
    if fan_in_fan_out:
        out = out.transpose(-2, -1)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=out.device, dtype=dtype)
    return out * scale


def delta_weight(module: torch.nn.Module, adapter: str = DEFAULT_ADAPTER, dtype: torch.dtype | None = None,
                 detach: bool = False) -> torch.Tensor:
    """The module's current update ``dW`` (PEFT's ``get_delta_weight``), differentiable unless ``detach``."""
    a, b = factors(module, adapter)
    if detach:
        a, b = a.detach(), b.detach()
    return delta_from_factors(a, b, scaling(module, adapter), fan_in_fan_out(module), dtype)


__all__: Sequence[str] = ["DEFAULT_ADAPTER", "compute_dtype", "delta_from_factors", "delta_weight",
                          "factors", "fan_in_fan_out", "lora_modules", "scaling", "update_shape"]
