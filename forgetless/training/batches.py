"""Turn training examples (``{input_ids, labels}`` dicts of token lists) into padded batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forgetless.lm import IGNORE_INDEX


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label -100."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids, lab = list(example["input_ids"]), list(example["labels"])
        if len(ids) != len(lab):
            raise ValueError(f"example {row}: input_ids and labels differ in length ({len(ids)} vs {len(lab)})")
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        labels[row, : len(lab)] = torch.as_tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
