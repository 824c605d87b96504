"""The LoRA update added inside one matmul: ``fused_lora: true`` (a speed lever, docs/speed.md).

PEFT's LoRA linear layer computes ``result = base(x) + lora_B(lora_A(dropout(x))) * scaling``: besides the two
rank-r matmuls, three passes over the ``[tokens, out]`` output (lora_B's result written, scaled, added) in the
forward, and in the backward one more (the output gradient scaled before lora_B's matmuls). At the 1B shape,
all-linear, those passes are about 10 % of a step's memory traffic. Here the same sum is one ``torch.addmm(result,
h, B^T, alpha=scaling)`` with ``h = lora_A(dropout(x))``: the GEMM reads ``result`` in its epilogue and writes the
sum once, and its backward scales only the rank-r tensors (``grad @ B * s``, ``h^T grad * s``): the ``[tokens, out]``
passes are gone. (Unsloth's LoRA kernels and cuBLAS's epilogue do the same.)

The same function, not the same rounding: addmm adds ``s * (h @ B^T)`` to ``result`` inside the GEMM, in float32
with one rounding to the output's dtype, where PEFT rounds the product, the scaled product and the sum. In float32
the two agree to float32 rounding; under bf16 autocast the fused sum is the more exact one. So it is opt-in, as
``compile`` is (a default must be the eager path's exact numbers).

What it applies to: PEFT's plain ``lora.Linear`` (not Conv1D's ``fan_in_fan_out`` layout, not DoRA or other
variants, not a LoRA bias, not a quantized base's own layer classes), one active adapter, not merged, adapters
enabled, no ``adapter_names`` mixed batch, a Python number as the scaling, and the dtypes autocast or the weights
make equal. Anything else, checked at every call, takes PEFT's own forward. Module hooks still fire: the layer is
still called as a module, and so is ``lora_A``; only ``lora_B``'s call is folded into the addmm (forgetless hooks no
``lora_B``)."""

from __future__ import annotations

import functools

import torch

_MARK = "_forgetless_fused"  # set on a layer whose forward fuse_lora replaced


def _lora_linear_type():
    from peft.tuners.lora.layer import Linear

    return Linear


def _fusable(module, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter when the fused sum applies to this call, else None (PEFT's forward)."""
    if args or kwargs or not isinstance(x, torch.Tensor) or module.disable_adapters or module.merged:
        return None
    if getattr(module, "fan_in_fan_out", False):
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or module.lora_B[name].bias is not None:
        return None
    scale = module.scaling[name]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own
    result = self.base_layer(x)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    weight = lora_b.weight
    if not torch.is_autocast_enabled(x.device.type) and not (result.dtype == h.dtype == weight.dtype):
        # mixed dtypes without autocast (a bf16 base under fp32 LoRA): PEFT's sum, which promotes, then casts back
        return (result + torch.nn.functional.linear(h, weight) * self.scaling[name]).to(result.dtype)
    out = result.shape[-1]
    fused = torch.addmm(result.reshape(-1, out), h.reshape(-1, h.shape[-1]), weight.t(), alpha=self.scaling[name])
    return fused.view(result.shape).to(result.dtype)


def fuse_lora(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Route every PEFT ``lora.Linear`` of ``model`` through the fused sum (:func:`_fused_forward`, per instance, as
    a ``functools.partial``, so that a deep copy of the model keeps working; calls it does not apply to take PEFT's
    forward). Returns the modules changed; :func:`unfuse_lora` undoes it."""
    linear = _lora_linear_type()
    changed = []
    for module in model.modules():
        if type(module) is linear and "forward" not in module.__dict__:  # not fused already, nor patched by others
            module.forward = functools.partial(_fused_forward, module)
            module.__dict__[_MARK] = True
            changed.append(module)
    return changed


def unfuse_lora(modules: list[torch.nn.Module]) -> None:
    """Undo :func:`fuse_lora` for ``modules``: their forward is PEFT's again."""
    for module in modules:
        if module.__dict__.pop(_MARK, False):
            module.__dict__.pop("forward", None)


__all__ = ["fuse_lora", "unfuse_lora"]
