"""The task loss: next-token cross-entropy on the labelled tokens only.

Wrapped as a module so that ``accelerate``/DDP sees one forward per micro-batch (its gradient
synchronization hooks fire), while the loss itself projects only the labelled positions onto the
vocabulary: for a multiple-choice example the answer is a few tokens out of a long prompt, and the
vocabulary projection (49k rows for SmolLM2) is the costliest single matmul of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forgetless.training.batches import IGNORE_INDEX


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, "model", None)
    if head is None or backbone is None or getattr(base.config, "final_logit_softcapping", None):
        return None  # unusual architecture: fall back to the model's own loss
    return backbone, head


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label is not -100 (labels are shifted here)."""
    parts = _backbone_and_head(model)
    if parts is None:
        return model(**batch).loss
    backbone, head = parts
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


class CausalLMLoss(torch.nn.Module):
    """``forward(batch) -> loss`` around a (PEFT) causal LM."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
