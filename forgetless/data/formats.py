"""The formats of a domain task's training data (``tasks[i].train_kind``): reading them and turning them into
training examples, one pair of functions per kind.

========================  ==========================================================  ==========================
kind                      rows                                                        loss on
========================  ==========================================================  ==========================
``multiple_choice``       a multiple-choice schema (:mod:`.multiple_choice`)           the correct answer
``instructions``          Alpaca ``{instruction, input?, output}``                    the output (+ EOS)
``chat``                  ``{messages: [{role, content}, ...]}``                      the assistant turns
``prompt_completion``     ``{prompt, completion}``: strings, or message lists (TRL)   the completion
``text``                  ``{text}`` (or a ``.txt`` file), packed into blocks         every token
``auto``                  the kind whose fields the first row has                     (that kind's)
========================  ==========================================================  ==========================

Every source is what :func:`~forgetless.data.io.iter_records` reads: a ``.jsonl``/``.json``/``.parquet`` file, a
folder of split files, a local dataset folder or a hub dataset (streamed up to the limit).
"""

from __future__ import annotations

from typing import Any

from .errors import DataError
from .io import iter_records, resolve_local, training_split

TRAIN_KINDS = ("multiple_choice", "instructions", "chat", "prompt_completion", "text", "auto")
AUTO = "auto"


def detect_kind(record: dict[str, Any]) -> str:
    """The training-data kind whose fields ``record`` has (``messages``: chat; ``prompt`` and ``completion``:
    prompt_completion; ``instruction`` and ``output``: instructions; ``text``: text; else multiple_choice, whose
    schema detection then names what is missing)."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "instructions"
    if keys == {"text"} or ("text" in keys and not keys & {"question", "question_stem", "goal", "choices"}):
        return "text"
    return "multiple_choice"


def resolve_kind(kind: str, source: str, split: str | None = None, name: str | None = None) -> str:
    """``kind``, or for ``auto`` the kind of the first row of ``source`` (a ``.txt`` file: text)."""
    if kind != AUTO:
        return kind
    if source.startswith("demo:"):
        return "multiple_choice"
    local = resolve_local(source, split)
    if local is not None and local.suffix.lower() == ".txt":
        return "text"
    for record in iter_records(source, split=split, name=name):
        return detect_kind(record)
    raise DataError.empty(source, "training rows")


def load_train(kind: str, source: str, split: str | None = None, limit: int | None = None,
               name: str | None = None) -> list:
    """The rows of ``source`` read and checked as ``kind`` (not ``multiple_choice``, which the experiment reads
    with its tasks' schema): instruction pairs, conversations, prompt/completion pairs or documents."""
    from .chat import load_chat, load_prompt_completion
    from .instructions import load_instructions
    from .text import load_texts

    split = training_split(source, split)
    if kind == "instructions":
        return load_instructions(source, split=split, limit=limit, name=name)
    if kind == "chat":
        return load_chat(source, split=split, limit=limit, name=name)
    if kind == "prompt_completion":
        return load_prompt_completion(source, split=split, limit=limit, name=name)
    if kind == "text":
        return load_texts(source, split=split, limit=limit, name=name)
    raise ValueError(f"unknown training-data kind {kind!r}; known: {list(TRAIN_KINDS)}")


def train_examples(kind: str, rows: list, tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """``{input_ids, labels}`` examples of rows read as ``kind`` (multiple-choice items included). Text is packed
    into blocks of ``max_length`` tokens (documents joined by EOS, as the general stage packs its text)."""
    from .chat import chat_examples, prompt_completion_examples
    from .instructions import instruction_examples
    from .multiple_choice import mc_train_examples
    from .text import lm_examples, pack_blocks

    if kind == "text":
        return lm_examples(pack_blocks(rows, tokenizer, max_length))
    encode = {"multiple_choice": mc_train_examples, "instructions": instruction_examples, "chat": chat_examples,
              "prompt_completion": prompt_completion_examples}[kind]
    return encode(rows, tokenizer, max_length=max_length)
