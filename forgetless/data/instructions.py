"""Instruction-tuning data in the Alpaca format (instruction, optional input, output)."""

from __future__ import annotations

from typing import Any

from .errors import DataError
from .io import iter_records

# The Stanford Alpaca prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction, using the with-input template only when input is non-empty."""
    if input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def load_instructions(source: str, split: str = "train", limit: int | None = None,
                      name: str | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs from Alpaca-style records (``instruction``, ``input`` optional, ``output``).
    ``name``: the hub dataset's configuration."""
    pairs = []
    for record in iter_records(source, split=split, name=name):  # streamed: stops at `limit`
        values = {}
        for field in ("instruction", "input", "output"):
            value = record.get(field)
            if value is None:
                if field == "input":
                    value = ""  # optional: many datasets (LIMA exports) omit it or store null
                else:
                    raise record.error("missing", field)
            if not isinstance(value, str):
                raise record.error(f"expected a string, got {type(value).__name__}", field)
            values[field] = value
        if not values["instruction"].strip():
            raise record.error("empty", "instruction")
        if not values["output"].strip():
            raise record.error("empty", "output")
        pairs.append((alpaca_prompt(values["instruction"], values["input"]), values["output"]))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError.empty(source, "instructions")
    return pairs


def instruction_examples(pairs: list[tuple[str, str]], tokenizer: Any,
                         max_length: int | None = None) -> list[dict[str, list[int]]]:
    """Tokenized examples with the loss on the response (plus a closing EOS) only.

    Prompt and response are tokenized separately (no special tokens) so the prompt/response boundary is
    exact; the prompt starts with the BOS where the tokenizer adds one by default (:func:`~.text.bos_prefix`; as
    TRL tokenizes a prompt, and as the harness scores), once where the prompt's text already starts with it. Over-long examples
    keep the BOS, the prompt's tail and then the response's head: the response is cut (it still ends in EOS only if
    it fits) only when the prompt alone leaves no room.
    """
    from .text import bos_prefix

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("instruction_examples needs a tokenizer with an eos_token_id")
    bos = bos_prefix(tokenizer)
    examples = []
    for prompt, response in pairs:
        p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        head, p = (p[:1], p[1:]) if bos and p[:1] == bos else (bos, p)  # one the prompt wrote is kept as ours
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos]
        budget = None if max_length is None else max_length - len(head)
        if budget is not None and len(p) + len(r) > budget:
            # Keep at least half the budget for the prompt's tail (its "### Response:" marker) so the model
            # learns responses conditioned on the template; the response is cut from the right.
            keep_prompt = min(len(p), max(budget - len(r), budget // 2))
            p = p[len(p) - keep_prompt:]
            r = r[: budget - len(p)]
        p = head + p
        examples.append({"input_ids": p + r, "labels": [-100] * len(p) + r})
    return examples
