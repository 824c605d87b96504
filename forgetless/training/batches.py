"""Turn training examples (``{input_ids, labels}`` dicts of token lists) into batches.

* :func:`collate`: right-padded rows (padding has attention 0 and label -100); an example's own padding (its
  ``attention_mask`` 0) is dropped first.
* :func:`collate_packed`: padding-free, as TRL's ``padding_free`` / transformers' ``DataCollatorWithFlattening``: the
  examples concatenated into one row, ``position_ids`` restarting at 0 for each example and no attention mask, so
  that transformers' attention keeps each example to itself (a block-diagonal causal mask for sdpa and eager, the
  varlen kernel for flash attention); the first label of every example is -100, so no example predicts the next
  one's first token. Its loss is the padded batch's token mean: the same labelled positions, the same contexts.
* :func:`add_loss_index`: the flat positions of the next-token targets (and the targets), computed on the CPU while
  the batch is built, so the loss picks its rows with ``index_select`` instead of a boolean mask, which would make
  the host wait for the device to learn how many rows there are.
* :class:`LengthGroupedSampler`: examples of similar length in the same batch (less padding), as transformers'
  ``LengthGroupedSampler``: a random permutation cut into mega-batches of ``50 x batch_size``, each sorted by length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from forgetless.lm import IGNORE_INDEX

LOSS_INDEX, LOSS_TARGETS = "loss_index", "loss_targets"


def token_list(values) -> list[int]:
    """Token ids (or labels, or a mask) as a list of ints: lists, or tensors and arrays as a dataset may hand them."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def example_labels(example: dict) -> list[int]:
    """An example's labels. One without them (a tokenized dataset for a causal LM, as transformers'
    DataCollatorForLanguageModeling takes it) has its input ids as labels, its padding (attention_mask 0) masked
    (:func:`example_row` drops that padding when the example is collated)."""
    if "labels" in example:
        return token_list(example["labels"])
    if "input_ids" not in example:
        raise ValueError(f"an example needs input_ids (and labels, else its input ids are its labels); this one has "
                         f"{sorted(example)} (raw text must be tokenized first)")
    ids, mask = token_list(example["input_ids"]), example.get("attention_mask")
    return ids if mask is None else [t if m else IGNORE_INDEX for t, m in zip(ids, token_list(mask))]


def example_row(example: dict) -> tuple[list[int], list[int]]:
    """An example's (input ids, labels) as collated: of equal length, the positions its ``attention_mask`` marks as
    padding (0) dropped (a row padded to ``max_length``, on either side: its pad tokens are no context, and left
    padding would have shifted its positions); ValueError naming what is wrong."""
    lab = example_labels(example)
    ids = token_list(example["input_ids"])
    if len(ids) != len(lab):
        raise ValueError(f"input_ids and labels differ in length ({len(ids)} vs {len(lab)})")
    mask = example.get("attention_mask")
    if mask is not None:
        keep = token_list(mask)
        if len(keep) != len(ids):
            raise ValueError(f"attention_mask and input_ids differ in length ({len(keep)} vs {len(ids)})")
        if not all(keep):
            ids = [t for t, m in zip(ids, keep) if m]
            lab = [t for t, m in zip(lab, keep) if m]
    return ids, lab


def collated_length(example: dict) -> int:
    """The tokens of ``example`` once collated: its input ids less its own padding (``attention_mask`` 0)."""
    mask = example.get("attention_mask")
    return len(example["input_ids"]) if mask is None else int(sum(token_list(mask)))


def check_examples(examples: Sequence[dict]) -> None:
    """ValueError naming the first training example (by its index) that cannot be collated, before the stage starts
    rather than when its batch comes up; and when no example has a labelled target (a label other than -100 past the
    first position), as when every answer was cut off: such a stage would train nothing."""
    labelled = False
    for i, example in enumerate(examples):
        try:
            _, lab = example_row(example)
        except ValueError as err:
            raise ValueError(f"training example {i}: {err}") from None
        labelled = labelled or any(t != IGNORE_INDEX for t in lab[1:])
    if examples and not labelled:
        raise ValueError(f"none of the {len(examples)} training examples has a labelled token to learn from (every "
                         f"label is -100: were the answers cut off by max_length?)")


def _checked(examples: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    if not examples:
        raise ValueError("cannot collate an empty batch")
    rows = []
    for row, example in enumerate(examples):
        try:
            rows.append(example_row(example))
        except ValueError as err:
            raise ValueError(f"example {row}: {err}") from None
    return rows


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label -100."""
    rows = _checked(examples)
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        labels[row, : len(lab)] = torch.as_tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The examples as one row without padding: ``input_ids``, ``position_ids`` (0.. per example) and ``labels``
    (each example's first label -100), all ``[1, total length]``; no ``attention_mask``."""
    rows = _checked(examples)
    ids = [t for row, _ in rows for t in row]
    labels = [IGNORE_INDEX if i == 0 else t for _, lab in rows for i, t in enumerate(lab)]
    positions = [i for row, _ in rows for i in range(len(row))]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels])}


def add_loss_index(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``loss_index`` (flat indices into the ``[B * (T - 1)]`` next-token positions whose target is labelled, in
    row-major order: the rows a boolean mask would pick, in the same order) and ``loss_targets`` (their targets)."""
    targets = batch["labels"][:, 1:].reshape(-1)
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    batch[LOSS_INDEX], batch[LOSS_TARGETS] = index, targets[index]
    return batch


class LengthGroupedSampler(Sampler[int]):
    """Indices of ``lengths`` in batches of similar length, deterministic given ``generator``'s seed.

    Each epoch (``__iter__``) draws a permutation from ``generator``, cuts it into mega-batches of
    ``mega_batch_mult * batch_size`` indices (``mega_batch_mult`` = min(n // (4 * batch_size), 50), at least 1, as
    transformers' ``get_length_grouped_indices``), sorts each mega-batch by length, longest first, and moves the
    batch holding the longest example to the front (an out-of-memory shows at the first step). Every index comes once
    per epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                 mega_batch_mult: int | None = None) -> None:
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator
        if mega_batch_mult is None:
            mega_batch_mult = max(1, min(len(self.lengths) // (batch_size * 4), 50))
        self.mega = mega_batch_mult * batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        megas = [sorted(order[i:i + self.mega], key=lambda k: -self.lengths[k])
                 for i in range(0, len(order), self.mega)]
        if megas:
            longest = max(range(len(megas)), key=lambda m: self.lengths[megas[m][0]])
            megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
        return iter([k for mega in megas for k in mega])
