"""The loss the landscape tools probe: a fixed evaluation set, its value, gradient and Hessian-vector products.

An :class:`Objective` is ``L(theta) = sum_c w_c L_c(theta)`` over chunks ``c`` of the evaluation set (one chunk
per batch, ``w_c`` its share of the labelled tokens), so ``L`` is the mean token NLL of the whole set while the
memory stays that of one batch. The metrics in :mod:`forgetless.landscape.metrics` only use this interface, so
they are tested on closed-form objectives (``f(x) = 1/2 x^T H x``) and run unchanged on a language model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

Vector = list[torch.Tensor]  # one tensor per parameter


def _work_dtype(p: torch.Tensor) -> torch.dtype:
    """Float32 at least (bf16 weights), float64 kept (closed-form tests)."""
    return torch.promote_types(p.dtype, torch.float32)


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    """The fused attention kernels (flash, memory-efficient, CPU flash) have no double backward; the math one has."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


@dataclass
class Objective:
    """``L(theta) = sum_c weight_c * loss_c()``, differentiated with respect to ``params``."""

    params: list[torch.Tensor]
    chunks: list[tuple[float, Callable[[], torch.Tensor]]]

    def zeros(self) -> Vector:
        return [torch.zeros(p.shape, dtype=_work_dtype(p), device=p.device) for p in self.params]

    @torch.no_grad()
    def value(self) -> float:
        return float(sum(w * float(loss()) for w, loss in self.chunks))

    def value_and_gradient(self) -> tuple[float, Vector]:
        total, grads = 0.0, self.zeros()
        for w, loss_fn in self.chunks:
            with torch.enable_grad():
                loss = loss_fn()
                parts = torch.autograd.grad(w * loss, self.params, allow_unused=True)
            total += w * float(loss.detach())
            for g, part in zip(grads, parts):
                if part is not None:
                    g.add_(part.to(g.dtype))
        return total, grads

    def hvp(self, v: Vector) -> Vector:
        """``H v`` by double backward: ``d/dtheta (grad L(theta) . v)`` (Pearlmutter 1994)."""
        out = self.zeros()
        with _double_backward_attention():
            for w, loss_fn in self.chunks:
                with torch.enable_grad():
                    loss = w * loss_fn()
                    grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                    pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None]
                    if not pairs:
                        continue
                    dot = sum((g.to(vi.dtype) * vi).sum() for g, vi in pairs)
                    parts = torch.autograd.grad(dot, self.params, allow_unused=True)
                for o, part in zip(out, parts):
                    if part is not None:
                        o.add_(part.detach().to(o.dtype))
        return out

    def shifted(self, delta: Vector | None) -> contextlib.AbstractContextManager:
        """Inside: the parameters are ``theta + delta``; afterwards ``theta`` is restored bit-exactly."""
        return _Shift(self.params, delta)


class _Shift:
    def __init__(self, params: Sequence[torch.Tensor], delta: Vector | None) -> None:
        self.params, self.delta = params, delta
        self.kept: list[torch.Tensor] = []

    @torch.no_grad()
    def __enter__(self) -> None:
        self.kept = [p.detach().clone() for p in self.params]
        if self.delta is not None:
            try:
                for p, k, d in zip(self.params, self.kept, self.delta):
                    p.copy_((k.to(d.dtype) + d).to(p.dtype))
            except BaseException:  # an out-of-memory at some weight: the ones shifted before go back (no __exit__ runs
                self.__exit__()  # when __enter__ raises)
                raise

    @torch.no_grad()
    def __exit__(self, *exc) -> None:
        for p, k in zip(self.params, self.kept):
            p.copy_(k)


def dot(u: Vector, v: Vector) -> float:
    return float(sum((a * b).sum() for a, b in zip(u, v)))


def norm(v: Vector) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in v]))) if v else 0.0


def select_parameters(model: torch.nn.Module, params: str = "trainable") -> list[tuple[str, torch.nn.Parameter]]:
    """``trainable``: the parameters with ``requires_grad`` (the LoRA matrices of a PEFT model); ``all``: every one."""
    if params == "trainable":
        out = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elif params == "all":
        out = list(model.named_parameters())
    else:
        raise ValueError(f"params must be 'trainable' or 'all', got {params!r}")
    if not out:
        hint = " (a model without an adapter has none: load one, or use params 'all')" if params == "trainable" else ""
        raise ValueError(f"the model has no {params} parameters{hint}")
    return out


@contextlib.contextmanager
def model_objective(model: torch.nn.Module, examples: Sequence[dict], params: str = "trainable",
                    batch_size: int = 8, precision: str = "fp32") -> Iterator[Objective]:
    """The mean next-token NLL of ``model`` over ``examples`` (``{input_ids, labels}``; label -100: no loss).

    Inside, the model is in eval mode (no dropout) and the selected parameters require gradients; both are
    restored afterwards. The head is applied to the labelled positions only and the logits are taken to float32
    at least (float64 kept), as :func:`forgetless.evaluation.perplexity` does: for general-text blocks
    ``value()`` is the ``mean_nll`` of the perplexity.
    """
    from forgetless.lm import IGNORE_INDEX, HeadScorer, model_device, next_token_loss
    from forgetless.precision import autocast, resolve_precision
    from forgetless.training.batches import collate

    if not examples:
        raise ValueError("the evaluation set is empty")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    named = select_parameters(model, params)
    device = model_device(model)
    resolved = resolve_precision(precision, device)
    pad = 0  # right padding is masked and unlabelled: its id never reaches the loss
    batches = [collate(list(examples[i:i + batch_size]), pad) for i in range(0, len(examples), batch_size)]
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    if sum(counts) == 0:
        raise ValueError("the evaluation set has no labelled tokens")
    flags = [p.requires_grad for _, p in named]
    was_training = model.training
    model.eval()
    scorer = HeadScorer(model)  # backbone + head at chosen positions (verified), else the full logits

    def mean_nll(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Right padding only: the causal attention never lets a real token see the padding after it.
        with autocast(resolved, device):
            return next_token_loss(scorer, input_ids, labels)

    chunks = []
    for batch, count in zip(batches, counts):
        if count:
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            chunks.append((count / sum(counts), lambda ids=ids, labels=labels: mean_nll(ids, labels)))
    try:
        for _, p in named:
            p.requires_grad_(True)
        yield Objective(params=[p for _, p in named], chunks=chunks)
    finally:
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)
        model.train(was_training)
