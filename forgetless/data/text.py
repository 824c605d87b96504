"""Plain-text corpora for causal-LM training: loading documents and packing them into fixed blocks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import DataError
from .io import iter_records, read_utf8, resolve_local

_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")


def _read_txt(path: Path) -> list[str]:
    """A ``.txt`` file's documents: paragraphs separated by blank lines."""
    return [doc.strip() for doc in _BLANK_LINES.split(read_utf8(path))]


def load_texts(source: str, field: str = "text", split: str = "train", limit: int | None = None,
               name: str | None = None) -> list[str]:
    """Documents from a ``.txt`` file (split on blank lines), a ``.jsonl``/``.json`` file or a hub dataset.

    For JSON sources each record must carry a string ``field`` (else DataError). Empty or whitespace-only
    documents are dropped (wikitext has many empty rows); ``limit`` caps the number kept. ``name`` is the hub
    dataset configuration (e.g. ``wikitext-2-raw-v1``). A source with no text at all is a DataError.
    """
    local = resolve_local(source, split)
    if local is not None and local.suffix.lower() == ".txt":
        texts = _read_txt(local)
    else:
        texts, kept = [], 0
        for record in iter_records(source, split=split, name=name):  # streamed: stops once `limit` are kept
            if record.get(field) is None:  # absent, or null (as Parquet fills a column a row lacks)
                raise record.error("missing", field)
            value = record[field]
            if not isinstance(value, str):
                raise record.error(f"expected a string, got {type(value).__name__}", field)
            texts.append(value)
            kept += bool(value.strip())
            if limit is not None and kept >= limit:
                break
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError.empty(str(local or source), "text")
    return texts[:limit] if limit is not None else texts


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` where the tokenizer puts a BOS before a text by default (Llama, Gemma, Mistral), else ``[]``
    (SmolLM2, Qwen: none). What a model of the first kind saw at the start of every training sequence; Gemma's
    outputs are far off without it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if len(ids) > 0 and ids[0] == bos else []


def pack_blocks(texts: Sequence[str], tokenizer: Any, block_size: int,
                max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate tokenized documents (each followed by EOS) and cut them into full blocks.

    Where the tokenizer adds a BOS by default (:func:`bos_prefix`), every block starts with it and holds
    ``block_size - 1`` tokens of the stream (what such a model saw at the start of every training sequence;
    lm-evaluation-harness prefixes a document's first rolling window with it): the same number of predicted tokens per
    block either way, since a block's first token is never a target.
    Returns a LongTensor ``[n_blocks, block_size]``; the trailing partial block is dropped. Raises ValueError
    when there is not enough text for one block.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pack_blocks needs a tokenizer with an eos_token_id (it separates documents)")
    prefix = bos_prefix(tokenizer)
    if prefix and block_size < 2:
        raise ValueError(f"block_size must be at least 2 for a tokenizer that starts sequences with a BOS, got "
                         f"{block_size}")
    step = block_size - len(prefix)  # stream tokens per block
    needed = max_blocks * step if max_blocks is not None else None
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if needed is not None and len(ids) >= needed:
            break  # enough tokens: don't tokenize the rest of a large corpus
    n_blocks = len(ids) // step
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"not enough text for one block of {block_size} tokens ({len(ids)} tokens in all)")
    blocks = torch.tensor(ids[: n_blocks * step], dtype=torch.long).view(n_blocks, step)
    if prefix:
        blocks = torch.cat([torch.full((n_blocks, 1), prefix[0], dtype=torch.long), blocks], dim=1)
    return blocks


def lm_examples(blocks: torch.Tensor | Sequence[Sequence[int]]) -> list[dict[str, list[int]]]:
    """Causal-LM examples with the loss on every token (``labels == input_ids``; the model shifts)."""
    rows = blocks.tolist() if isinstance(blocks, torch.Tensor) else [list(b) for b in blocks]
    return [{"input_ids": list(row), "labels": list(row)} for row in rows]
