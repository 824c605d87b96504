"""Fused GPU kernels (Triton) for the methods' dense per-step work, with the plain-torch formula they replace.

HLoRA's path integral adds, at every optimizer step and for every element of every LoRA module's update,
``omega += (dW(t) - dW(t+1)) * g~`` (eqs 8-10), where both factors are rank-2r products of the module's LoRA
factors (:func:`forgetless.lora.difference_factors`, eq 11's ``g~``). In torch that is two batched matmuls that
each write a dense tensor of the module's size and an ``addcmul_`` that reads both and omega and writes omega: about
six passes over the update's elements. :func:`lowrank_product_accumulate_` computes both products tile by tile in
registers and reads and writes omega once: two passes. At the 1B shape, all-linear (968 M elements of dW in float32)
that is about 15 GB less memory traffic per step (issue #15: HLoRA's recording at most 1.05x a plain step).

HLoRA's regularizer and EWC's penalty (:func:`forgetless.lora.weighted_distance`) need, per module, ``G = W * (dW -
dW_ref)`` only through ``G @ Rt^T`` (the value and B's gradient) and ``B^T @ G`` (A's gradient), where ``dW - dW_ref
= L @ Rt`` is again rank 2r. :func:`weighted_products` gives both with two kernels that form their tiles of ``L @ Rt``
in registers and read ``W`` once each, without atomics (each output block is summed by one program in a fixed order,
so runs repeat bit for bit): about 2 passes over the module's elements where torch made about 6.

The kernel runs where Triton does (CUDA; on the CPU only under Triton's interpreter, ``TRITON_INTERPRET=1``, which
the tests use; the kernels themselves are in :mod:`forgetless._triton_kernels`); elsewhere, and with
``FORGETLESS_TRITON=0``, the torch formula runs. The path integral's products are taken in IEEE float32
(``input_precision="ieee"``: no TF32), the weighted products' in three TF32 parts (:data:`WEIGHTED_PRECISION`), so
the kernels agree with the formula to float32 rounding (the order of the rank-2r sums, a few units more for tf32x3).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

#: How the product enters the accumulator: ``add`` (omega += P1 P2), ``add_positive`` (omega += max(P1 P2, 0): HLoRA's
#: ``nonnegative="step"``), ``add_then_clamp`` (omega = max(omega + P1 P2, 0): ``nonnegative="running"``).
MODES = {"add": 0, "add_positive": 1, "add_then_clamp": 2}

#: tl.dot's precision in :func:`weighted_products`' kernels. With "ieee" (float32 multiply-adds on the CUDA cores)
#: they were compute-bound: about 110 multiply-adds per element of W, 3.7 ms per group and step at the 1B shape on an
#: H100, several times the time to read W. "tf32x3" (three TF32 tensor-core products, each operand split into a high
#: and a low part) keeps float32's accuracy to a few units of its rounding (each product's error about 2^-22
#: relative, against 2^-24) at the tensor cores' rate. The path integral's kernel stays "ieee": its dW(t) - dW(t+1) is
#: a difference of nearly equal updates, whose value is float32's last bits.
WEIGHTED_PRECISION = "tf32x3"


@functools.lru_cache(maxsize=1)
def _triton():
    """(triton, tl, the kernels by name) where Triton is installed, else None. Imported on first use only: no Triton
    import when the CPU or ``FORGETLESS_TRITON=0`` never asks."""
    try:
        import triton
        import triton.language as tl

        from forgetless._triton_kernels import KERNELS
    except ImportError:
        return None
    return triton, tl, KERNELS


_FAILED: dict[tuple, str] = {}  # the launches that failed here, by kernel and block sizes: the torch formula for those


def _failed(key: tuple, err: Exception) -> None:
    _FAILED[key] = f"{type(err).__name__}: {err}"
    warnings.warn(f"forgetless's fused Triton kernel {key[0]} (blocks {key[1:]}) failed to compile or launch "
                  f"({_FAILED[key][:300]}); that kernel uses the torch formula instead from now on (same numbers, "
                  f"slower on a GPU). FORGETLESS_TRITON=0 silences this")


def triton_enabled(device: torch.device | str) -> bool:
    """Whether the fused kernels run for tensors on ``device``: Triton importable, the device CUDA (or the CPU under
    Triton's interpreter), and not switched off with ``FORGETLESS_TRITON=0``. A kernel whose launch failed here for
    some block sizes (an old Triton, a large rank's tiles beyond the GPU's shared memory) takes the torch formula for
    those from then on (:data:`_FAILED`)."""
    if os.environ.get("FORGETLESS_TRITON", "1") == "0":
        return False
    device = torch.device(device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpreted and device.type == "cpu"):
        return False
    return _triton() is not None


def _check_stacks(what: str, *named: tuple[str, torch.Tensor, tuple]) -> None:
    """Each ``(name, tensor, shape)``: the tensor is 3-D of ``shape`` (None: any size there), and all are on one
    device. A kernel trusts its arguments' shapes (a mismatch reads out of bounds), so they are checked here."""
    for name, tensor, shape in named:
        if tensor.dim() != 3 or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
            expected = ", ".join("*" if w is None else str(w) for w in shape)
            raise ValueError(f"{what}: shapes do not fit: {name} is {tuple(tensor.shape)}, expected ({expected}) ("
                             + ", ".join(f"{n} {tuple(t.shape)}" for n, t, _ in named) + ")")
    devices = {t.device for _, t, _ in named}
    if len(devices) > 1:
        raise ValueError(f"{what}: tensors on several devices ({', '.join(f'{n} on {t.device}' for n, t, _ in named)})"
                         f"; move them to one")


def _kernel_or_formula(key: tuple, launch, formula):
    """``launch()`` unless the kernel failed here before for these block sizes (``key``); a launch that fails is
    remembered and said once (:func:`_failed`); else, and then, ``formula()``."""
    if key not in _FAILED:
        try:
            return launch()
        except Exception as err:  # noqa: BLE001 - a Triton that cannot compile it (its version, the GPU, the tiles)
            _failed(key, err)
    return formula()


def _block(k: int) -> int:
    """tl.dot's inner size: a power of two, at least 16 (the columns past ``k`` are loaded as 0)."""
    return max(16, 1 << (k - 1).bit_length())


def lowrank_product_accumulate_(out: torch.Tensor, l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor,
                                r2: torch.Tensor, mode: str = "add", transposed: bool = False) -> torch.Tensor:
    """``out += (l1 @ r1) * (l2 @ r2)`` in place (with ``mode``: see :data:`MODES`) for stacks ``l [n, rows, k]``,
    ``r [n, k, cols]`` of one dtype (float32) and ``out`` ``[n, rows, cols]``, or ``[n, cols, rows]`` with
    ``transposed`` (a base weight stored ``[in, out]``: the products' transpose is added). One fused kernel where
    :func:`triton_enabled`, else the torch formula. Returns ``out``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    n, rows, k1 = l1.shape if l1.dim() == 3 else (None, None, None)
    cols, k2 = r1.shape[-1], l2.shape[-1]
    _check_stacks("lowrank_product_accumulate_", ("l1", l1, (None, None, None)), ("r1", r1, (n, k1, None)),
                  ("l2", l2, (n, rows, None)), ("r2", r2, (n, k2, cols)),
                  ("out", out, (n, cols, rows) if transposed else (n, rows, cols)))
    dtypes = {t.dtype for t in (out, l1, r1, l2, r2)}
    if not triton_enabled(out.device) or dtypes != {torch.float32}:
        return _torch_formula(out, l1, r1, l2, r2, mode, transposed)
    triton, _, kernels = _triton()
    s_o = out.stride()
    s_oi, s_oj = (s_o[2], s_o[1]) if transposed else (s_o[1], s_o[2])
    bm = bn = 64
    key = ("accumulate", bm, bn, _block(k1), _block(k2))
    grid = (triton.cdiv(rows, bm) * triton.cdiv(cols, bn), n)

    def launch() -> torch.Tensor:
        kernels["accumulate"][grid](l1, r1, l2, r2, out, rows, cols, k1, k2,
                                    *l1.stride(), *r1.stride(), *l2.stride(), *r2.stride(), s_o[0], s_oi, s_oj,
                                    MODE=MODES[mode], BM=bm, BN=bn, BK1=key[3], BK2=key[4])
        return out

    return _kernel_or_formula(key, launch, lambda: _torch_formula(out, l1, r1, l2, r2, mode, transposed))


def weighted_products(left: torch.Tensor, right: torch.Tensor, weight: torch.Tensor, b: torch.Tensor | None,
                      transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With ``G = weight * (left @ right)`` (``left [n, rows, k]``, ``right [n, k, cols]``, float32; ``weight``
    ``[n, rows, cols]``, or ``[n, cols, rows]`` with ``transposed``, in any float dtype): ``(G @ right^T [n, rows, k],
    b^T @ G [n, r, cols])`` for ``b [n, rows, r]`` (None: the second is not computed). ``G`` is never held: two fused
    kernels where :func:`triton_enabled` (one over blocks of rows, one over blocks of columns, each forming its tiles
    of ``left @ right`` and reading ``weight`` once: deterministic, no atomics), else the torch formula. HLoRA's
    regularizer and EWC's penalty: :func:`forgetless.lora.weighted_distance`."""
    n, rows, k = left.shape if left.dim() == 3 else (None, None, None)
    cols = right.shape[-1]
    named = [("left", left, (None, None, None)), ("right", right, (n, k, None)),
             ("weight", weight, (n, cols, rows) if transposed else (n, rows, cols))]
    _check_stacks("weighted_products", *named, *([("b", b, (n, rows, None))] if b is not None else []))
    dtypes = {left.dtype, right.dtype} | ({b.dtype} if b is not None else set())
    if not triton_enabled(left.device) or dtypes != {torch.float32} or not weight.dtype.is_floating_point:
        return _weighted_formula(left, right, weight, b, transposed)
    blocks = (64, 64, _block(k), _block(b.shape[-1]) if b is not None else 0)
    return _kernel_or_formula(("weighted", *blocks),
                              lambda: _weighted_kernels(left, right, weight, b, transposed, blocks),
                              lambda: _weighted_formula(left, right, weight, b, transposed))


def _weighted_formula(left, right, weight, b, transposed):
    g = torch.matmul(left, right).mul_(weight.transpose(-2, -1) if transposed else weight)
    return torch.matmul(g, right.transpose(-2, -1)), None if b is None else torch.matmul(b.transpose(-2, -1), g)


def _weighted_kernels(left, right, weight, b, transposed, blocks):
    n, rows, k = left.shape
    cols = right.shape[-1]
    triton, _, kernels = _triton()
    s_w = weight.stride()
    s_wi, s_wj = (s_w[2], s_w[1]) if transposed else (s_w[1], s_w[2])
    bm, bn, block_k, block_r = blocks
    projected = torch.empty(n, rows, k, dtype=left.dtype, device=left.device)
    kernels["projection"][(triton.cdiv(rows, bm), n)](
        left, right, weight, projected, rows, cols, k, *left.stride(), *right.stride(), s_w[0], s_wi, s_wj,
        *projected.stride(), BM=bm, BN=bn, BK=block_k, PRECISION=WEIGHTED_PRECISION)
    if b is None:
        return projected, None
    r = b.shape[-1]
    product = torch.empty(n, r, cols, dtype=left.dtype, device=left.device)
    kernels["left_product"][(triton.cdiv(cols, bn), n)](
        b, left, right, weight, product, rows, cols, k, r, *b.stride(), *left.stride(), *right.stride(), s_w[0], s_wi,
        s_wj, *product.stride(), BM=bm, BN=bn, BK=block_k, BR=block_r, PRECISION=WEIGHTED_PRECISION)
    return projected, product


def _torch_formula(out, l1, r1, l2, r2, mode, transposed):
    first = torch.matmul(l1, r1)
    product = first.mul_(torch.matmul(l2, r2))
    if transposed:
        product = product.transpose(-2, -1)
    if mode == "add_positive":
        product.clamp_(min=0)
    out.add_(product)
    if mode == "add_then_clamp":
        out.clamp_(min=0)
    return out


__all__ = ["MODES", "lowrank_product_accumulate_", "triton_enabled", "weighted_products"]
