"""The task loss: next-token cross-entropy on the labelled tokens only (:func:`forgetless.lm.next_token_loss`).

Wrapped as a module so that ``accelerate``/DDP sees one forward per micro-batch (its gradient synchronization
hooks fire).
"""

from __future__ import annotations

import torch

from forgetless.lm import HeadScorer, next_token_loss


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label is not -100 (labels are shifted here)."""
    return CausalLMLoss(model)(**batch)


class CausalLMLoss(torch.nn.Module):
    """``forward(batch) -> loss`` around a (PEFT) causal LM."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # Not verified on a probe: the model may be in train mode (dropout), and the backbone/head split of the
        # architectures transformers ships is exact; an unknown layout falls back to the full logits.
        self._scorer = HeadScorer(model, verify=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self._scorer, input_ids, labels, attention_mask)
