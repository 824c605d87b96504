"""A causal LM's backbone and output head, and the masked next-token loss: one copy for training, evaluation
and the landscape.

Scoring only needs log-probabilities at a few positions (the continuation tokens of a multiple-choice
request) or wants to bound memory (perplexity over long blocks), so instead of ``model(...).logits``
(a ``[batch, seq, vocab]`` tensor) we run the backbone to get hidden states and apply the output
embedding only where needed. ``HeadScorer`` checks once, on a probe input, that
``head(backbone(x))`` reproduces ``model(x).logits``; if it does not (an unknown architecture with
extra logit scaling, say), it falls back to the full logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt tokens, padding)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def train_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module's own train/eval flag, for :func:`restore_train_flags` (``model.train(mode)`` would set them all
    alike: e.g. the Fisher keeps its checkpointed layers in training mode inside eval)."""
    return [(module, module.training) for module in model.modules()]


def restore_train_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for module, training in flags:
        module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` inside; afterwards every module's own train/eval flag as it was (:func:`train_flags`)."""
    flags = train_flags(model)
    model.eval()
    try:
        yield model
    finally:
        restore_train_flags(flags)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place, so they stay)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            return get_base()
        except Exception:  # noqa: BLE001 - anything odd: use the model as it is
            return model
    return model


def find_backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder backbone returning hidden states, output embedding), or None if not found."""
    base = _unwrap(model)
    head = None
    get_out = getattr(base, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
    backbone = None
    get_dec = getattr(base, "get_decoder", None)
    if callable(get_dec):
        try:
            backbone = get_dec()
        except Exception:  # noqa: BLE001
            backbone = None
    if backbone is None or backbone is base:
        prefix = getattr(base, "base_model_prefix", "model")
        backbone = getattr(base, prefix, None) or getattr(base, "model", None)
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module) or backbone is base:
        return None
    return backbone, head


class HeadScorer:
    """Hidden states from the backbone plus the output head applied at chosen positions.

    ``fast`` is True when ``head(backbone(x))`` was verified to equal ``model(x).logits``; otherwise
    ``hidden`` returns the full logits and ``logits`` is the identity, so callers need no branch.
    """

    def __init__(self, model: nn.Module, verify: bool = True):
        self.model = model
        self.device = model_device(model)
        found = find_backbone_and_head(model)
        self.backbone, self.head = found if found is not None else (None, None)
        config = getattr(_unwrap(model), "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None) if config is not None else None
        self.fast = found is not None
        if self.fast and verify:
            self.fast = self._verify()

    @torch.no_grad()
    def _verify(self) -> bool:
        """One 7-token probe through both paths, in eval mode (no dropout; the mode is restored). It catches models
        that rescale their logits after the head (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Falcon-H1's
        ``lm_head_multiplier``, ...), which ``logits`` does not know: they take the full-logits path."""
        vocab = getattr(self.head, "out_features", None) or 2
        probe = (torch.arange(7, device=self.device) * 3 + 1) % vocab
        probe = probe.unsqueeze(0)
        try:
            with eval_mode(self.model):
                fast = self.logits(self.backbone(input_ids=probe, use_cache=False).last_hidden_state)
                full = self.model(input_ids=probe, use_cache=False).logits
        except Exception:  # noqa: BLE001 - any failure: use the plain path
            return False
        if fast.shape != full.shape:
            return False
        return bool(torch.allclose(fast.float(), full.float(), atol=1e-4, rtol=1e-4))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, H]`` hidden states (or ``[B, T, V]`` full logits when not ``fast``)."""
        extra = {k: v for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids)) if v is not None}
        if self.fast:
            return self.backbone(input_ids=input_ids, use_cache=False, **extra).last_hidden_state
        return self.model(input_ids=input_ids, use_cache=False, **extra).logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states taken from ``hidden`` (identity when not ``fast``)."""
        if not self.fast:
            return hidden
        out = self.head(hidden)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def next_token_loss(scorer: HeadScorer, input_ids: torch.Tensor, labels: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the next token over positions whose label is not -100 (labels shifted here).

    The output head is applied to the labelled positions only: for a multiple-choice example the answer is a few
    tokens of a long prompt, and the vocabulary projection is the costliest matmul of a small model. The logits
    are taken to float32 at least before the softmax.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = scorer.logits(scorer.hidden(input_ids, attention_mask)[:, :-1][keep])
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[keep])
