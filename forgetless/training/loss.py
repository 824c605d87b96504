"""The task loss: next-token cross-entropy on the labelled tokens only (:func:`forgetless.lm.next_token_loss`).

Wrapped as a module so that ``accelerate``/DDP sees one forward per micro-batch (its gradient synchronization
hooks fire).

With ``fused_ce`` (the ``liger: true`` lever, CUDA) the head and the cross-entropy of the labelled rows are one
Liger kernel, ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``: it never holds the
``[rows, vocab]`` logits, which for packed text (every token labelled) are the largest activation of a step. It
is used only where it computes what the plain path does: a plain ``nn.Linear`` head (not one LoRA wraps) found
by the backbone/head split; the logit soft-capping of Gemma-2-style models is passed on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forgetless.lm import IGNORE_INDEX, HeadScorer, next_token_loss


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label is not -100 (labels are shifted here)."""
    return CausalLMLoss(model)(**batch)


class CausalLMLoss(torch.nn.Module):
    """``forward(batch) -> loss`` around a (PEFT) causal LM.

    The training loop's batches (:mod:`forgetless.training.batches`) also carry ``loss_index``/``loss_targets`` (the
    labelled positions, found on the CPU: picking them with ``index_select`` needs no host sync, a boolean mask does)
    and, padding-free, ``position_ids`` without an ``attention_mask`` (transformers then keeps each packed example to
    itself). Without ``loss_index`` the positions are found from ``labels`` here; the loss is the same."""

    def __init__(self, model: torch.nn.Module, fused_ce: bool = False) -> None:
        super().__init__()
        self.model = model
        # Not verified on a probe: the model may be in train mode (dropout), and the backbone/head split of the
        # architectures transformers ships is exact; an unknown layout falls back to the full logits.
        self._scorer = HeadScorer(model, verify=False)
        head = self._scorer.head
        self.fused_ce = bool(fused_ce and self._scorer.fast and type(head) is torch.nn.Linear)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, loss_index: torch.Tensor | None = None,
                loss_targets: torch.Tensor | None = None) -> torch.Tensor:
        if loss_index is None and position_ids is None and not self.fused_ce:
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
        if self.fused_ce:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            head = scorer.head
            return liger_fused_linear_cross_entropy(picked, head.weight, loss_targets, head.bias,
                                                    softcap=scorer.softcap or None)
        rows = scorer.logits(picked)
        return F.cross_entropy(rows.to(torch.promote_types(rows.dtype, torch.float32)), loss_targets)
