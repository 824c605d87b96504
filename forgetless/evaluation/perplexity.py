"""Token-level perplexity over fixed-length blocks.

Each block of ``T`` tokens is scored on its own (no context carried across blocks): tokens
``1..T-1`` are predicted from their prefix, so ``n`` blocks give ``n * (T - 1)`` predicted tokens and

    mean_nll = sum of -log p(token | prefix) / number of predicted tokens   (natural log)
    ppl      = exp(mean_nll)                                                 (the usual perplexity)
    ppl_base2 = 2 ** mean_nll

``ppl_base2`` reproduces the number the HLoRA authors' code reports as "perplexity": it raises 2 to
the mean *natural-log* loss. It is NOT a perplexity in bits (that would be ``2 ** (mean_nll /
ln 2) == ppl``); it is kept only to compare with their published figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from forgetless.progress import progress as show_progress

from forgetless.lm import HeadScorer, eval_mode
from forgetless.precision import autocast, resolve_precision

# Positions per output-head chunk: bounds the float32 logits buffer to chunk x vocab.
_HEAD_CHUNK = 512


@dataclass
class PerplexityResult:
    """``ppl = exp(mean_nll)``; ``ppl_base2 = 2 ** mean_nll`` (HLoRA code's convention, not bits)."""

    ppl: float
    ppl_base2: float
    mean_nll: float
    tokens: int


def perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    precision: str = "auto",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``blocks`` (``LongTensor[n, T]``), NLL summed in float32.

    Works for a plain transformers causal LM or a PEFT-wrapped one; the model's train/eval mode
    is restored afterwards.
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.shape[0] < 1:
        raise ValueError(f"blocks must be [n, T] with n >= 1 and T >= 2, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    total_nll = 0.0
    tokens = 0
    with eval_mode(model), torch.no_grad():
        scorer = HeadScorer(model)
        device = scorer.device
        resolved = resolve_precision(precision, device)
        starts = range(0, blocks.shape[0], batch_size)
        for start in show_progress(starts, "perplexity", unit="batch", enabled=progress):
            batch = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
            with autocast(resolved, device):
                # [B, T-1, H] (or [B, T-1, V] logits on the fallback path): position t predicts t+1
                hidden = scorer.hidden(batch)[:, :-1]
                targets = batch[:, 1:]
                for row in range(batch.shape[0]):
                    for pos in range(0, targets.shape[1], _HEAD_CHUNK):
                        h = hidden[row, pos : pos + _HEAD_CHUNK]
                        logits = scorer.logits(h).float()  # upcast before the softmax
                        total_nll += F.cross_entropy(
                            logits, targets[row, pos : pos + _HEAD_CHUNK], reduction="sum"
                        ).item()
            tokens += targets.numel()
    mean_nll = total_nll / tokens
    return PerplexityResult(ppl=math.exp(mean_nll), ppl_base2=2.0**mean_nll, mean_nll=mean_nll, tokens=tokens)


def perplexity_of_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    block_size: int = 512,
    max_blocks: int | None = None,
    batch_size: int = 8,
    precision: str = "auto",
    progress: bool = True,
) -> PerplexityResult:
    """Pack ``texts`` into ``block_size`` blocks (at most ``max_blocks``) with ``forgetless.data.pack_blocks``
    (documents joined by EOS, trailing partial block dropped) and score them with :func:`perplexity`."""
    from forgetless.data import pack_blocks  # lazy: the data module is optional for block users

    blocks = pack_blocks(list(texts), tokenizer, block_size, max_blocks=max_blocks)
    return perplexity(model, blocks, batch_size=batch_size, precision=precision, progress=progress)
