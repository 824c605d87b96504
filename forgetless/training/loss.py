"""The task loss: next-token cross-entropy on the labelled tokens only (:func:`forgetless.lm.next_token_loss`).

Wrapped as a module so that ``accelerate``/DDP sees one forward per micro-batch (its gradient synchronization
hooks fire).

With ``fused_ce`` (the ``liger: true`` lever, CUDA) the head and the cross-entropy of the labelled rows are one
Liger kernel, ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``: it never holds the
``[rows, vocab]`` logits, which for packed text (every token labelled) are the largest activation of a step. It
is used only where it computes what the plain path does: a plain ``nn.Linear`` head (not one LoRA wraps) found
by the backbone/head split; the logit soft-capping of Gemma-2-style models is passed on.

Without Liger, when the labelled rows' logits would be large (``rows x vocab`` above :data:`CHUNK_ELEMENTS`, e.g.
4 x 1024 tokens of a 128k vocabulary: 2 GiB in float32, held three or four times over by the cross-entropy and its
backward), the head and the cross-entropy run in chunks of rows (:class:`ChunkedLinearCrossEntropy`, plain torch):
each chunk's logits, loss and gradient with respect to its hidden states are computed in the forward and dropped,
so only ``[rows, hidden]`` is kept for the backward. The same function: each row's gradient is computed as the plain
path's backward computes it (float32 softmax minus one-hot, divided by the rows, the head matmul in the logits'
dtype); only the order in which the rows' losses are summed differs. Below the threshold (every model and batch
of the test suite and the demo) the plain path runs. It applies to a frozen plain ``nn.Linear`` head (the LoRA
case); a trainable or LoRA-wrapped head keeps the plain path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from forgetless.lm import IGNORE_INDEX, HeadScorer, next_token_loss

CHUNK_ELEMENTS = 1 << 26  # logits elements per chunk (256 MiB in float32); larger [rows, vocab] go chunked


def chunkable_head(scorer: HeadScorer) -> bool:
    """Whether the head may run on chunks of rows, its gradient reaching the hidden states only: a verified split
    and a frozen plain ``nn.Linear`` head (the LoRA case; a trainable or LoRA-wrapped head needs its own gradient)."""
    head = scorer.head
    return bool(scorer.fast and type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters()))


def rows_per_chunk(rows: int, row_elements: int, limit: int | None) -> int | None:
    """Rows per chunk when ``rows`` rows of ``row_elements`` logits each exceed ``limit`` elements, else None (the
    whole at once; also when ``limit`` is None)."""
    if limit is None or rows * row_elements <= limit:
        return None
    return max(1, limit // row_elements)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label is not -100 (labels are shifted here)."""
    return CausalLMLoss(model)(**batch)


class CausalLMLoss(torch.nn.Module):
    """``forward(batch) -> loss`` around a (PEFT) causal LM.

    The training loop's batches (:mod:`forgetless.training.batches`) also carry ``loss_index``/``loss_targets`` (the
    labelled positions, found on the CPU: picking them with ``index_select`` needs no host sync, a boolean mask does)
    and, padding-free, ``position_ids`` without an ``attention_mask`` (transformers then keeps each packed example to
    itself). Without ``loss_index`` the positions are found from ``labels`` here; the loss is the same."""

    def __init__(self, model: torch.nn.Module, fused_ce: bool = False, chunk_elements: int | None | str = "auto",
                 compile_chunks: bool = False) -> None:
        super().__init__()
        self.model = model
        # the chunked cross-entropy's per-chunk work through torch.compile (the ``compile: true`` lever;
        # FORGETLESS_COMPILE_CE=0 keeps the chunks eager, as bench_gpu.py's compiled_ce row does on one side)
        self.compile_chunks = bool(compile_chunks) and os.environ.get("FORGETLESS_COMPILE_CE", "1") != "0"
        # Verified on a probe (in eval mode): a model that rescales its logits after the head (Granite, Cohere, ...)
        # or an unknown layout takes the full logits.
        self._scorer = HeadScorer(model)
        head = self._scorer.head
        self.fused_ce = bool(fused_ce and self._scorer.fast and type(head) is torch.nn.Linear)
        # chunked cross-entropy above this many logits elements (None: never; "auto": CHUNK_ELEMENTS when called);
        # a frozen plain nn.Linear head only
        self.chunk_elements = chunk_elements
        self._chunkable = chunkable_head(self._scorer)

    def _chunk_rows(self, rows: int) -> int | None:
        """Rows per chunk of the chunked cross-entropy, or None for the plain path."""
        if not self._chunkable:
            return None
        limit = CHUNK_ELEMENTS if self.chunk_elements == "auto" else self.chunk_elements
        return rows_per_chunk(rows, self._scorer.head.out_features, limit)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, loss_index: torch.Tensor | None = None,
                loss_targets: torch.Tensor | None = None) -> torch.Tensor:
        if (loss_index is None and position_ids is None and not self.fused_ce
                and self._chunk_rows(labels.shape[0] * (labels.shape[1] - 1)) is None):
            return next_token_loss(self._scorer, input_ids, labels, attention_mask)
        if loss_index is None:
            targets = labels[:, 1:].reshape(-1)
            loss_index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
            loss_targets = targets[loss_index]
        scorer = self._scorer
        inputs = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        hidden = scorer.backbone(**inputs).last_hidden_state if scorer.fast else self.model(**inputs).logits
        picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, loss_index)
        if picked.shape[0] == 0:  # no labelled row (a micro-batch of null examples, a truncated answer): 0, through
            return picked.sum() * 0.0  # the graph (the loop weighs it 0; every weight still gets its backward)
        if self.fused_ce:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            head = scorer.head
            if picked.dtype != head.weight.dtype:  # a reduced head after float32 norms (a k-bit base): its dtype, as
                picked = picked.to(head.weight.dtype)  # autocast or the head's pre-hook give the plain path
            return liger_fused_linear_cross_entropy(picked, head.weight, loss_targets, head.bias,
                                                    softcap=scorer.softcap or None)
        chunk = self._chunk_rows(picked.shape[0])
        if chunk is not None:
            head = scorer.head
            return ChunkedLinearCrossEntropy.apply(picked, head.weight, head.bias, loss_targets, scorer.softcap, chunk,
                                                   self.compile_chunks)
        rows = scorer.logits(picked)
        return F.cross_entropy(rows.to(torch.promote_types(rows.dtype, torch.float32)), loss_targets)


def _chunk_loss_and_grad(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor,
                         softcap: float | None, rows: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of :class:`ChunkedLinearCrossEntropy`: the sum of its rows' losses and, with ``need_grad``, the
    gradient of ``sum / rows`` with respect to ``h`` (the plain path's backward, row by row)."""
    logits = F.linear(h, weight, bias)
    if softcap:
        capped = torch.tanh(logits / softcap)  # kept for the derivative, as autograd keeps tanh's output
        logits = capped * softcap
    logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least, as the plain path
    lse = torch.logsumexp(logits32, dim=-1)
    loss = (lse - logits32.gather(1, t[:, None]).squeeze(1)).sum()
    if not need_grad:
        return loss, None
    grad = torch.exp(logits32 - lse[:, None])  # softmax
    grad[torch.arange(grad.shape[0], device=grad.device), t] -= 1.0
    grad /= rows
    grad = grad.to(logits.dtype)
    if softcap:  # d(c tanh(x / c))/dx = 1 - tanh(x / c)**2, in the logits' dtype as autograd's would be
        grad = grad * (1 - capped * capped)
    return loss, (grad @ weight.to(grad.dtype)).to(h.dtype)


_compiled_chunk = None


def compiled_chunk_loss_and_grad():
    """:func:`_chunk_loss_and_grad` through ``torch.compile``, built once per process: inductor fuses the float32
    log-sum-exp, the softmax, the one-hot subtraction, the scaling and the cast into few passes over the chunk's
    ``[rows, vocab]`` logits, where eager makes about eight. Compiled with dynamic shapes from the start: one graph
    serves the full chunks, the shorter last one and every batch's number of labelled rows (with automatic dynamic
    shapes these were three graphs or more, each a stall of seconds inside the step loop). A chunk of exactly one row
    would compile a graph of its own (size-1 specialization): :class:`ChunkedLinearCrossEntropy` folds a one-row last
    chunk into the one before and computes a batch of one labelled row eagerly. What still compiles again: a change of
    autocast, soft-cap or gradient mode."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=True)
    return _compiled_chunk


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean_i CE(head(hidden_i), target_i)`` over chunks of ``chunk`` rows, never holding ``[rows, vocab]``.

    The forward computes, chunk by chunk, the logits (``F.linear`` under the caller's autocast, so in the dtype the
    plain path's would have), their optional soft-capping, the float32 log-sum-exp and loss, and the gradient with
    respect to the chunk's hidden states: ``(softmax - onehot) / rows`` (times the soft-cap's derivative), cast to
    the logits' dtype and multiplied by the head weight, as the plain path's backward does. Only that ``[rows,
    hidden]`` gradient is saved; the backward scales it by the incoming gradient. The head is frozen (no gradient).
    Under bf16 the saved gradient is rounded before that scaling, the plain path's after it: a loss weight other than
    1 (accumulated micro-batches) gives gradients equal to bf16 rounding, not bit for bit. float64 inputs compute in
    float64 (a finite-difference check holds).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                softcap: float | None, chunk: int, compiled: bool = False) -> torch.Tensor:
        rows = hidden.shape[0]
        compiled = compiled and rows > 1  # one row: eager (a size-1 graph of its own would compile, a stall of seconds)
        step = compiled_chunk_loss_and_grad() if compiled else _chunk_loss_and_grad
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        bounds = list(range(0, rows, chunk)) + [rows]
        if compiled and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]  # a one-row last chunk joins the one before (one row more than a chunk: same graph)
        for start, end in zip(bounds, bounds[1:]):
            h = hidden[start:end]
            if h.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
                h = h.to(weight.dtype)  # a reduced head outside autocast computes in its dtype (models.prepare_quantized)
            loss, grad = step(h, weight, bias, targets[start:end], softcap, rows, grad_hidden is not None)
            total += loss
            if grad_hidden is not None:
                grad_hidden[start:end] = grad
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden)
        return total / rows

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None, None, None
