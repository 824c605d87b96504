"""The LoRA toolkit: find a model's LoRA layers and compute their full-weight update ``dW = s * B @ A``.

Every consumer of the update (HLoRA, EWC, WiSE-FT, the landscape) calls :func:`delta_weight` or, for factors that
are not the module's current ones (stored, stacked), :func:`delta_from_factors`. The semantics are those of
PEFT's ``LoraLayer.get_delta_weight`` (``peft/tuners/lora/layer.py``)::

    dW = transpose(B @ A, fan_in_fan_out) * scaling[adapter]

so ``dW`` has the shape of the base layer's ``weight`` (``[out, in]`` for ``nn.Linear``, ``[in, out]`` for
GPT-2's ``Conv1D`` with ``fan_in_fan_out=True``). Unlike PEFT's, these functions are differentiable in A and B,
compute in float32 (or wider) whatever the factor dtype, and never merge anything into the base weight.

Per-step work over many modules: :func:`group_modules` puts modules whose factors have the same shapes, dtype, device
and layout in one :class:`LoraGroup`, whose updates are one batched matmul (a Llama with LoRA on all seven projections
has at most four groups, whatever its depth). Dense work over a group goes over its modules in chunks
(:func:`module_chunks`); :func:`weighted_distance` is HLoRA's and EWC's quadratic term with its gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from forgetless.kernels import triton_enabled, weighted_products

DEFAULT_ADAPTER = "default"


def lora_modules(model: torch.nn.Module, adapter: str = DEFAULT_ADAPTER) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every PEFT LoRA layer that has a Linear-style ``adapter`` (A: ``[r, in]``, B: ``[out, r]``).

    Modules whose LoRA factors are not plain linear maps (embeddings, convolutions) are skipped: their update is
    not ``B @ A``. A DoRA (or other variant) layer or one with a LoRA bias is a ValueError: its update is not
    ``s B A`` either, and a method that took it for one (HLoRA, EWC, WiSE-FT) would regularize or blend the wrong
    thing while its magnitude vector or bias moved freely.
    """
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear):
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if variant is not None or adapter in getattr(module, "lora_magnitude_vector", {}):
                raise ValueError(f"{name}: a {type(variant).__name__ if variant is not None else 'DoRA'} adapter "
                                 f"({adapter!r}); forgetless's methods take a LoRA update to be s*B@A, which a DoRA "
                                 "or other variant's is not: use plain LoRA (use_dora=False)")
            if b.bias is not None:
                raise ValueError(f"{name}: the adapter {adapter!r} has a LoRA bias (lora_bias=True); forgetless's "
                                 "methods take a LoRA update to be s*B@A and would leave the bias unregularized: "
                                 "use lora_bias=False")
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


def scaled_update(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``transpose(B @ A, fan_in_fan_out) * scale`` with ``a``, ``b`` (and a tensor ``scale``) already in one dtype and
    on one device: a fresh tensor, scaled in place (no second dense tensor; autograd is fine with it, as the matmul's
    backward needs only its inputs). :func:`delta_from_factors` casts, then calls it."""
    out = torch.matmul(b, a)
    return (out.transpose(-2, -1) if fan_in_fan_out else out).mul_(scale)


def update_difference(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor, a_ref: torch.Tensor,
                      b_ref: torch.Tensor, scale_ref: float | torch.Tensor | None = None,
                      fan_in_fan_out: bool = False) -> torch.Tensor:
    """``dW - dW_ref`` for two stacks of factors of one shape (``dW = scaled_update(a, b, scale, ...)``, the reference
    likewise with ``scale_ref``; None: the same scaling), all in one dtype on one device, as **one** batched matmul of
    rank ``2r``::

        s B A - s B' A'   =  [s (B - B'),     s B']  @  [A ; A - A']      (one scaling)
        s B A - s' B' A'  =  [s B - s' B',  s' B']  @  [A ; A - A']

    One dense tensor is written, where two products and a subtraction wrote three and read four. With one scaling the
    difference is formed from the factors' own differences, so it is exactly 0 where the factors are equal and keeps
    its relative accuracy when dW and dW_ref are close (two rounded products lose it to cancellation: an optimizer
    step's dW(t) - dW(t+1)). Ranks that differ fall back to the two products."""
    pair = difference_factors(a, b, scale, a_ref, b_ref, scale_ref)
    if pair is None:
        ref = scaled_update(a_ref, b_ref, scale if scale_ref is None else scale_ref, fan_in_fan_out)
        return scaled_update(a, b, scale, fan_in_fan_out).sub_(ref)
    out = torch.matmul(*pair)  # [..., out, 2r] @ [..., 2r, in]
    return out.transpose(-2, -1) if fan_in_fan_out else out


def difference_factors(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor, a_ref: torch.Tensor,
                       b_ref: torch.Tensor, scale_ref: float | torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L [..., out, 2r], R [..., 2r, in])`` with ``L @ R = s B A - s' B' A'`` as in :func:`update_difference`
    (``R = [A ; A - A']``: its first ``r`` rows are ``A``); None when the ranks differ."""
    if a.shape[-2] != a_ref.shape[-2]:
        return None
    if scale_ref is None:
        scaled_ref = b_ref * scale
        left = torch.cat([(b - b_ref).mul_(scale), scaled_ref], dim=-1)
    else:
        scaled_ref = b_ref * scale_ref
        left = torch.cat([b * scale - scaled_ref, scaled_ref], dim=-1)
    return left, torch.cat([a, a - a_ref], dim=-2)


def delta_from_factors(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor, fan_in_fan_out: bool = False,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """``transpose(B @ A, fan_in_fan_out) * scale`` for factors ``A`` ``[..., r, in]`` and ``B`` ``[..., out, r]``.

    Leading dimensions broadcast (a stack of same-shaped modules is one batched matmul); ``scale`` may be a tensor
    broadcastable to the result (one factor per stacked module). Computed in ``dtype`` (default: at least float32).
    """
    dtype = dtype or compute_dtype(a.dtype)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=a.device, dtype=dtype)
    return scaled_update(a.to(dtype), b.to(dtype), scale, fan_in_fan_out)


def delta_weight(module: torch.nn.Module, adapter: str = DEFAULT_ADAPTER, dtype: torch.dtype | None = None,
                 detach: bool = False) -> torch.Tensor:
    """The module's current update ``dW`` (PEFT's ``get_delta_weight``), differentiable unless ``detach``."""
    a, b = factors(module, adapter)
    if detach:
        a, b = a.detach(), b.detach()
    return delta_from_factors(a, b, scaling(module, adapter), fan_in_fan_out(module), dtype)


def scaling_tensor(scales: Sequence[float], dtype: torch.dtype,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Per-module scalings as a ``[n, 1, 1]`` tensor in ``dtype``: each Python float rounded once to ``dtype``, as
    ``tensor * s`` rounds it, so a stacked ``delta_from_factors`` multiplies by the same numbers as one per module."""
    return torch.tensor([float(s) for s in scales], dtype=torch.float64).view(-1, 1, 1).to(device, dtype)


@dataclass
class LoraGroup:
    """LoRA modules whose factors have the same shapes, dtype, device and layout: their updates are one bmm."""

    names: list[str]
    modules: list[torch.nn.Module]
    a_params: list[torch.nn.Parameter]
    b_params: list[torch.nn.Parameter]
    scaling: torch.Tensor  # [n, 1, 1], in ``dtype`` on the factors' device
    dtype: torch.dtype  # the compute dtype (at least float32)
    fan_in_fan_out: bool  # base weights stored [in, out] (GPT-2 Conv1D): dW is (B A)^T

    @property
    def device(self) -> torch.device:
        return self.a_params[0].device

    def stacked(self, detach: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [n, r, in], B [n, out, r])`` in the compute dtype (a copy; differentiable unless ``detach``)."""
        a = [p.detach() if detach else p for p in self.a_params]
        b = [p.detach() if detach else p for p in self.b_params]
        return torch.stack(a).to(self.dtype), torch.stack(b).to(self.dtype)

    def delta_weight(self, detach: bool = True) -> torch.Tensor:
        """dW = s * B @ A for all modules of the group at once: [n, *base weight shape] (one batched matmul)."""
        a, b = self.stacked(detach)
        return delta_from_factors(a, b, self.scaling, self.fan_in_fan_out, self.dtype)

    def update_shape(self) -> tuple[int, int]:
        out, inp = self.b_params[0].shape[0], self.a_params[0].shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp)

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        """A [n, out, in] tensor in the base weight's layout."""
        return t.transpose(1, 2) if self.fan_in_fan_out else t

    def current_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.a_params) + tuple(p._version for p in self.b_params)


def group_modules(modules: Iterable[tuple[str, torch.nn.Module]], adapter: str = DEFAULT_ADAPTER,
                  group_type: type[LoraGroup] = LoraGroup) -> list[LoraGroup]:
    """``modules`` ((name, LoRA layer), e.g. from :func:`lora_modules`) in groups of equal factor shapes, dtype,
    device and layout, in order of first appearance (modules keep their order inside a group)."""
    by_key: dict[tuple, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in modules:
        a, b = factors(module, adapter)
        key = (tuple(a.shape), tuple(b.shape), a.dtype, str(a.device), fan_in_fan_out(module))
        by_key.setdefault(key, []).append((name, module))
    groups = []
    for (_, _, dtype, _, fan), items in by_key.items():
        mods = [m for _, m in items]
        a_params = [factors(m, adapter)[0] for m in mods]
        groups.append(group_type(
            names=[n for n, _ in items], modules=mods, a_params=a_params,
            b_params=[factors(m, adapter)[1] for m in mods],
            scaling=scaling_tensor([scaling(m, adapter) for m in mods], compute_dtype(dtype), a_params[0].device),
            dtype=compute_dtype(dtype), fan_in_fan_out=fan))
    return groups


#: Modules per chunk of :func:`weighted_distance`: as many as fit this many elements of dW (at least one). On the CPU
#: small chunks stay in cache and are reused by the C allocator instead of being mapped (and page-faulted) anew each
#: step (SmolLM2's widths: 0.12x autograd's time with 2**20, 0.22x with 2**23, 0.31x unchunked;
#: ``bench/bench_method_state.py --chunk-sweep``, bench/RESULTS.md);
#: on a GPU a chunk bounds the transient memory (two or three chunk-sized tensors, 64 MiB each in fp32: ~0.2 GiB
#: beside issue #12's 1.5 GiB budget for HLoRA at the 8B shape) for a few hundred launches per step there.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 24}


def module_chunks(n: int, shape: Sequence[int], device: torch.device, budget: int | None = None) -> list[slice]:
    """Slices of ``n`` stacked modules whose dW (``shape`` each) holds at most ``budget`` elements per slice (default
    :data:`CHUNK_ELEMENTS` for ``device``), at least one module each."""
    budget = budget or CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    size = max(1, budget // max(math.prod(shape), 1))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _WeightedDistance(torch.autograd.Function):
    """``sum_n c_n sum_ij W_nij (dW_nij - R_nij)**2`` with ``dW = transpose(B @ A) * s``: see :func:`weighted_distance`."""

    @staticmethod
    def forward(ctx, a, b, scale, weight, coeff, fan_in_fan_out, ref, ref_a, ref_b, ref_scale, budget):  # noqa: D102
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_a = torch.empty_like(a) if want_grad else None
        grad_b = torch.empty_like(b) if want_grad else None
        per_module = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
        same_scale = ref_scale is scale  # one scaling tensor (HLoRA, EWC): the difference from the factors' differences
        rank = a.shape[-2]
        # where Triton runs (CUDA): W (dW - R) is never formed, two fused kernels read W once each
        # (forgetless.kernels.weighted_products); nothing dense is formed, so a weight on the device is one chunk
        kernel = (a.dtype == torch.float32 and ref is None and (ref_a is None or ref_a.shape[-2] == rank)
                  and triton_enabled(a.device))  # factors of another rank: the dense path, in chunks
        whole = kernel and budget is None and weight.device == a.device
        for part in [slice(None)] if whole else module_chunks(a.shape[0], weight.shape[-2:], a.device, budget):
            w = weight[part].to(a.device, non_blocking=True)  # a chunk of a weight held in CPU memory: copied now
            if ref_a is not None:  # dW - R = L @ Rt from both factor pairs: one rank-2r matmul (update_difference)
                pair = difference_factors(a[part], b[part], scale[part], ref_a[part], ref_b[part],
                                          None if same_scale else ref_scale[part])
            else:
                pair = (b[part] * scale[part], a[part]) if ref is None else None  # dW = (s B) @ A
            if kernel and pair is not None:  # sum W (dW - R)^2 = sum L * (G Rt^T), B's gradient from G Rt^T too
                left, right = pair
                projected, left_product = weighted_products(left, right, w, b[part] if want_grad else None,
                                                            fan_in_fan_out)
                per_module[part] = (left * projected).sum(dim=(-2, -1))
                if want_grad:
                    factor = 2 * scale[part] * coeff[part].view(-1, 1, 1)
                    torch.mul(projected[..., :rank], factor, out=grad_b[part])
                    torch.mul(left_product, factor, out=grad_a[part])
                continue
            if pair is not None:  # dW - R low rank: W (dW - R) in place of it, the value from the factors below
                left, right = pair
                diff = torch.matmul(left, right)
                weighted = (diff.transpose(-2, -1) if fan_in_fan_out else diff).mul_(w)
            else:  # a dense anchor, or factors of another rank: two products
                diff = update_difference(a[part], b[part], scale[part], ref_a[part], ref_b[part], ref_scale[part],
                                         fan_in_fan_out) if ref_a is not None else \
                    scaled_update(a[part], b[part], scale[part], fan_in_fan_out).sub_(ref[part])
                weighted = diff * w
            g = weighted.transpose(-2, -1) if fan_in_fan_out else weighted  # W (dW - R) as [k, out, in]
            factor = 2 * scale[part] * coeff[part].view(-1, 1, 1)
            if pair is not None:
                # sum_ij W (dW - R)^2 = <L @ Rt, G> = sum (L * (G @ Rt^T)): G read once for the value and, as Rt's
                # first r rows are A, for B's gradient 2 c s G A^T too
                projected = torch.matmul(g, right.transpose(-2, -1))  # [k, out, 2r]
                per_module[part] = (left * projected).sum(dim=(-2, -1))
                if want_grad:
                    torch.mul(projected[..., :rank], factor, out=grad_b[part])
            else:
                per_module[part] = diff.mul_(weighted).sum(dim=(-2, -1))  # sum_ij W (dW - R)^2
                if want_grad:
                    torch.matmul(g, a[part].transpose(-2, -1), out=grad_b[part]).mul_(factor)
            if want_grad:  # d/d dW = 2 c W (dW - R) and dW = s B A: the factors' gradients, for a loss gradient of 1
                torch.matmul(b[part].transpose(-2, -1), g, out=grad_a[part]).mul_(factor)
            del diff, weighted, g
        ctx.save_for_backward(grad_a, grad_b)
        return (per_module * coeff).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        grad_a, grad_b = ctx.saved_tensors
        return (grad_a * grad if ctx.needs_input_grad[0] else None, grad_b * grad if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None, None, None)


def weighted_distance(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                      coeff: torch.Tensor | None = None, fan_in_fan_out: bool = False, ref: torch.Tensor | None = None,
                      ref_factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      chunk_elements: int | None = None) -> torch.Tensor:
    """``sum_n coeff_n sum_ij weight_nij (dW_nij - R_nij)**2`` for a stack of LoRA factors ``A [n, r, in]``,
    ``B [n, out, r]`` (at least float32) with ``dW = delta_from_factors(A, B, scale, fan_in_fan_out)``, differentiable
    in ``A`` and ``B``: HLoRA's eqs 14-15 and EWC's penalty. The anchor ``R`` is ``ref`` (``[n, *dW shape]``), or
    ``delta_from_factors(*ref_factors, fan_in_fan_out)`` for ``ref_factors = (A_ref, B_ref, scale_ref)``, or 0;
    ``weight`` is ``[n, *dW shape]``, in any dtype (a reduced storage dtype is promoted chunk by chunk) and on A's
    device or in CPU memory (offloaded: each chunk is copied when it is needed; pin it for asynchronous copies);
    ``coeff`` ``[n]`` (None: 1). No gradient flows to them.

    The number ``(coeff * (weight * (dW - R).square()).sum((1, 2))).sum()`` gives, up to rounding (the distance at
    the anchor is exactly 0: with ``ref_factors`` dW - R is formed from the factors' differences by
    :func:`update_difference`, with ``ref`` both are the same values), with far less memory traffic and memory: the
    modules go in chunks of about ``chunk_elements`` elements of dW (:data:`CHUNK_ELEMENTS`); a chunk writes one dense
    tensor (dW - R = L @ Rt, one rank-2r matmul from both factor pairs, weighted in place to G = W (dW - R)) and reads
    it twice: ``G @ Rt^T`` gives the value ``sum(L * G Rt^T)`` and B's gradient, ``B^T G`` A's, right away. With a
    dense ``ref`` (or factors of another rank) the difference and the value are formed densely. Nothing dense is
    kept for the backward (autograd over the formula would keep several tensors of the full size), which only scales
    those gradients. Not twice differentiable."""
    dtype, device = a.dtype, a.device
    coeff = torch.ones(a.shape[0], dtype=dtype, device=device) if coeff is None else coeff.to(device, dtype)
    ref_a = ref_b = ref_scale = None
    scale = scale.to(device, dtype)
    if ref_factors is not None:
        ref_a, ref_b = (t.to(device, dtype) for t in ref_factors[:2])
        ref_scale = scale if ref_factors[2] is scale else ref_factors[2].to(device, dtype)
    with torch.autocast(device.type, enabled=False):  # its products in the factors' dtype (they write float32 buffers)
        return _WeightedDistance.apply(a, b, scale, weight, coeff, fan_in_fan_out, ref, ref_a, ref_b,
                                       ref_scale, chunk_elements)


__all__: Sequence[str] = ["DEFAULT_ADAPTER", "LoraGroup", "compute_dtype", "delta_from_factors",
                          "delta_weight", "factors", "fan_in_fan_out", "group_modules", "lora_modules", "scaling",
                          "scaling_tensor", "module_chunks", "scaled_update", "difference_factors", "update_difference",
                          "update_shape",
                          "weighted_distance"]
