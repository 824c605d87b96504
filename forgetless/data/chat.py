"""Chat data: conversations (``messages``) and prompt/completion rows, the loss on what the model should write.

Two row formats, the ones TRL's ``SFTTrainer`` reads (``trl/data_utils.py``):

* **chat**: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}``,
  rendered with the tokenizer's chat template (``tokenizer.apply_chat_template``); the loss is on the assistant
  turns only.
* **prompt/completion**: ``{"prompt": "...", "completion": "..."}`` (plain text: ``prompt + completion + EOS``, no
  template, the loss on the completion and EOS), or TRL's conversational form where both are message lists
  (``prompt`` the turns before, ``completion`` the assistant's reply): rendered with the chat template, the loss on
  the completion's turns.

An assistant turn's tokens are those the template writes between the generation prompt of the conversation so far
(``apply_chat_template(messages[:i], add_generation_prompt=True)``) and the end of the turn
(``apply_chat_template(messages[:i + 1])``): the reply and the template's end-of-turn marker, so the model also
learns to stop. The conversation is tokenized once and the spans are mapped onto its tokens by character offsets,
so the labelled tokens are exactly those the model sees.

The same module holds the chat template of multiple-choice prompts (:func:`chat_mc_items`, lm-evaluation-harness's
``--apply_chat_template``) and the ``chat_template: auto`` rule (:func:`use_chat_template`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from forgetless.lm import IGNORE_INDEX

from .errors import DataError
from .io import Record, iter_records
from .multiple_choice import MCItem

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, str]
Conversation = list[Message]


class Located(list):
    """A row's messages that remember the row (file and line), so that a problem found only when the row is
    tokenized (a chat template that refuses it) still names where it is."""

    def __init__(self, messages: list, record: Record, field: str) -> None:
        super().__init__(messages)
        self.origin, self.line, self.field = record.origin, record.line, field

    def error(self, err: Exception) -> DataError:
        return DataError.at(self.origin, self.line, str(err), self.field)


def _located(messages: list, err: ValueError) -> Exception:
    return messages.error(err) if isinstance(messages, Located) else err


# --- reading rows: every problem names file, line and field ---------------------------------------------------

def check_messages(record: Record, field: str) -> Conversation:
    """``record[field]`` as a list of ``{role, content}`` messages (a DataError naming file, line and
    ``field[i].key`` otherwise). Keys other than role and content (``name``, ``tool_calls``...) are kept."""
    value = record.get(field)
    if value is None:
        raise record.error("missing", field)
    if not isinstance(value, (list, tuple)):
        raise record.error(f"expected a list of {{role, content}} messages, got {type(value).__name__}", field)
    if not value:
        raise record.error("empty list of messages", field)
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise record.error(f"expected a {{role, content}} object, got {type(message).__name__}", where)
        for key in ("role", "content"):
            if message.get(key) is None:
                raise record.error("missing", f"{where}.{key}")
            if not isinstance(message[key], str):
                raise record.error(f"expected a string, got {type(message[key]).__name__}", f"{where}.{key}")
        if message["role"] not in ROLES:
            raise record.error(f"unknown role {message['role']!r}; known: {list(ROLES)}", f"{where}.role")
        messages.append({k: v for k, v in message.items() if v is not None})  # parquet fills absent keys with null
    return messages


def _assistant_turns(record: Record, field: str, messages: Conversation) -> None:
    turns = [m for m in messages if m["role"] == "assistant"]
    if not turns:
        raise record.error("no assistant turn (nothing to learn from)", field)
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise record.error("empty assistant turn", f"{field}[{i}].content")


def _rows(source: str, split: str | None, name: str | None, limit: int | None, what: str) -> list[Record]:
    rows = []
    for record in iter_records(source, split=split, name=name):  # a hub source is streamed up to limit
        rows.append(record)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError.empty(source, what)
    return rows


def load_chat(source: str, split: str | None = "train", limit: int | None = None,
              name: str | None = None) -> list[Conversation]:
    """Conversations from rows ``{"messages": [{role, content}, ...]}`` with at least one non-empty assistant
    turn. Roles: system, user, assistant, tool."""
    conversations = []
    for record in _rows(source, split, name, limit, "conversations"):
        messages = check_messages(record, "messages")
        _assistant_turns(record, "messages", messages)
        if messages[0]["role"] == "assistant":  # its tokens would start before any generation prompt
            raise record.error("the conversation opens with the assistant's turn; a user (or system) turn must come "
                               "first", "messages[0].role")
        conversations.append(Located(messages, record, "messages"))
    return conversations


PromptCompletion = tuple[str, str] | tuple[Conversation, Conversation]


def load_prompt_completion(source: str, split: str | None = "train", limit: int | None = None,
                           name: str | None = None) -> list[PromptCompletion]:
    """(prompt, completion) pairs from rows ``{"prompt": str, "completion": str}``, or TRL's conversational rows
    whose prompt and completion are message lists (the completion's turns all from the assistant)."""
    pairs: list[PromptCompletion] = []
    for record in _rows(source, split, name, limit, "prompt/completion rows"):
        for key in ("prompt", "completion"):
            if record.get(key) is None:
                raise record.error("missing", key)
        prompt = record["prompt"]
        if isinstance(prompt, str):
            completion = record["completion"]
            if not isinstance(completion, str):
                raise record.error(f"expected a string like the prompt, got {type(completion).__name__}",
                                   "completion")
            if not completion.strip():
                raise record.error("empty", "completion")
            pairs.append((prompt, completion))
            continue
        if not isinstance(prompt, (list, tuple)):
            raise record.error(f"expected a string or a list of messages, got {type(prompt).__name__}", "prompt")
        prompt_messages = check_messages(record, "prompt")
        if isinstance(record["completion"], str):
            raise record.error("expected a list of messages like the prompt, got str", "completion")
        completion_messages = check_messages(record, "completion")
        for i, message in enumerate(completion_messages):
            if message["role"] != "assistant":
                raise record.error(f"the completion is the assistant's reply, got role {message['role']!r}",
                                   f"completion[{i}].role")
        _assistant_turns(record, "completion", completion_messages)
        pairs.append((Located(prompt_messages, record, "prompt"), Located(completion_messages, record, "completion")))
    return pairs


# --- tokenizing -------------------------------------------------------------------------------------------------

def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class TemplateRefused(ValueError):
    """The chat template raised on a conversation (roles that do not alternate, a system turn it does not take)."""


NO_TEMPLATE = ("this data needs the model's chat template, and its tokenizer has none (a base model?): use "
               "prompt/completion rows with plain strings, or a model with a chat template")


def render(tokenizer: Any, messages: Conversation, add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    import jinja2

    if not has_chat_template(tokenizer):
        raise ValueError(NO_TEMPLATE)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:
        roles = [m["role"] for m in messages]
        raise TemplateRefused(f"the model's chat template refused a conversation with roles {roles}: {err}") from None


def _spans(tokenizer: Any, messages: Conversation, trained: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the turns ``trained`` (indices into ``messages``)."""
    text = render(tokenizer, messages)  # a template that refuses it: TemplateRefused, a ValueError
    spans = []
    for i in trained:
        start = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = render(tokenizer, messages[: i + 1])
        if not (text.startswith(end) and end.startswith(start)):
            # A template that rewrites earlier turns once later ones exist (some drop past reasoning) has no fixed
            # place for turn i; refuse rather than label the wrong tokens.
            raise ValueError("the chat template does not render the conversation turn by turn (a prefix of the "
                             "conversation is not a prefix of its text), so the assistant's tokens cannot be "
                             "located")
        spans.append((len(start), len(end)))
    return text, spans


def _encode_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]],
                  max_length: int | None) -> dict[str, list[int]]:
    """``text`` tokenized (no special tokens added: the template writes its own), labels on the tokens that overlap
    one of ``spans``: also a token that begins in the template and ends in the reply (a byte-level tokenizer merges
    the template's ``\n`` with a reply's leading whitespace), as transformers' ``return_assistant_tokens_mask`` marks
    the token holding a span's first character."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chat data needs a fast tokenizer (its character offsets locate the assistant's tokens)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if any(a < e and max(a + 1, b) > s for s, e in spans):  # overlaps [s, e) (a zero-width token: at a)
            labels[t] = ids[t]
    if max_length is not None and len(ids) > max_length:
        # keep the beginning; when the first reply starts beyond it, half the budget for the turns before it, after
        # the BOS the template wrote where the tokenizer adds one by default (Llama's <|begin_of_text|>, Gemma's
        # <bos>: what such a model saw first in every sequence; not SmolLM2's <|im_start|>, which opens every turn)
        from .text import bos_prefix

        first = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
        if first < max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        else:
            head = 1 if ids[:1] == bos_prefix(tokenizer) != [] else 0
            budget = max_length - head
            lo = min(first - budget // 2, len(ids) - budget)
            ids, labels = ids[:head] + ids[lo: lo + budget], labels[:head] + labels[lo: lo + budget]
    return {"input_ids": ids, "labels": labels}


def chat_examples(conversations: list[Conversation], tokenizer: Any,
                  max_length: int | None = None) -> list[dict[str, list[int]]]:
    """Tokenized conversations, the loss on the assistant turns only (see the module docstring). Over-long
    conversations keep their first ``max_length`` tokens (or, when the first assistant turn starts beyond them, a
    full window with at most half its budget before that turn)."""
    if conversations and not has_chat_template(tokenizer):
        raise ValueError(NO_TEMPLATE)  # the model's problem, not a row's
    examples = []
    for messages in conversations:
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        examples.append(_encode_turns(tokenizer, messages, trained, max_length, located_by=messages))
    return examples


def _encode_turns(tokenizer: Any, messages: Conversation, trained: list[int], max_length: int | None,
                  located_by: Any) -> dict[str, list[int]]:
    """The conversation through the chat template, the loss on the ``trained`` turns; a template error is located at
    the row of ``located_by`` (a message list that keeps its row)."""
    try:
        text, spans = _spans(tokenizer, messages, trained)
    except ValueError as err:
        raise _located(located_by, err) from None
    return _encode_spans(tokenizer, text, spans, max_length)


def prompt_completion_examples(pairs: list[PromptCompletion], tokenizer: Any,
                               max_length: int | None = None) -> list[dict[str, list[int]]]:
    """Tokenized (prompt, completion) pairs, the loss on the completion only.

    Plain strings: ``prompt + completion + EOS``, prompt and completion tokenized apart (as
    :func:`~forgetless.data.instructions.instruction_examples` does, with its truncation). Message lists: the
    conversation ``prompt + completion`` through the chat template, the loss on the completion's turns.
    """
    from .instructions import instruction_examples

    if any(not isinstance(prompt, str) for prompt, _ in pairs) and not has_chat_template(tokenizer):
        raise ValueError(NO_TEMPLATE)  # the model's problem, not a row's
    examples = []
    for prompt, completion in pairs:
        if isinstance(prompt, str):
            examples.extend(instruction_examples([(prompt, completion)], tokenizer, max_length=max_length))
            continue
        messages = list(prompt) + list(completion)
        trained = list(range(len(prompt), len(messages)))
        examples.append(_encode_turns(tokenizer, messages, trained, max_length, located_by=prompt))
    return examples


# --- the chat template of multiple-choice prompts ---------------------------------------------------------------

def chat_mc_items(items: list[MCItem], tokenizer: Any) -> list[MCItem]:
    """The items as lm-evaluation-harness builds them under ``--apply_chat_template`` (``fewshot_context`` and
    ``construct_requests`` in lm_eval/api/task.py, ``HFLM.apply_chat_template``): the context becomes one user turn
    (a task's ``description`` the system turn; dropped, as the harness drops it, where the template refuses a system
    turn) rendered with ``add_generation_prompt=True``, and the target delimiter is ``""`` (the template's generation prompt already separates the answer). Scoring then proceeds as usual."""
    out = []
    for item in items:
        messages = [{"role": "user", "content": item.context[len(item.description):]}]
        if item.description:
            messages.insert(0, {"role": "system", "content": item.description})
        try:
            try:
                context = render(tokenizer, messages, add_generation_prompt=True)
            except TemplateRefused:
                if not item.description:
                    raise
                # HFLM.apply_chat_template: a template without a system role gets the history without its system
                # turns
                context = render(tokenizer, messages[1:], add_generation_prompt=True)
        except TemplateRefused as err:  # at the item's row where it was read from a file
            raise item.error(str(err), "context") from None
        out.append(replace(item, context=context, target_delimiter="", description=""))
    return out


# A model name that says it was tuned to follow instructions: Llama-3.2-1B-Instruct, Qwen2.5-0.5B-Instruct,
# gemma-2-2b-it, Llama-2-7b-chat-hf, SmolLM2-135M-Instruct.Q4_1.gguf.
_INSTRUCT_NAME = re.compile(r"instruct|(^|[-_.])(chat|it|sft|dpo|rlhf)([-_.]|$)", re.IGNORECASE)


def looks_instruct(model: str) -> bool:
    """Whether the model's own name (the last part of a path or hub id; an embedded model's GGUF file name) says it
    is instruction-tuned. Only the last part: a folder ``runs/chat-tests/llama-base`` is a base model."""
    from forgetless.models import EMBEDDED_MODELS

    name = EMBEDDED_MODELS[model].filename if model in EMBEDDED_MODELS else Path(model.rstrip("/")).name
    return bool(_INSTRUCT_NAME.search(name))


CHAT_TEMPLATE_CHOICES = ("auto", True, False)


def chat_template_on(setting: str | bool, model: str) -> bool:
    """``chat_template`` resolved without loading anything: ``true``/``false`` as given; ``auto`` on when the model's
    name says it is instruction-tuned (:func:`looks_instruct`). :func:`use_chat_template` then checks the tokenizer."""
    if setting not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"chat_template must be auto, true or false, got {setting!r}")
    return looks_instruct(model) if setting == "auto" else bool(setting)


def use_chat_template(setting: str | bool, model: str, tokenizer: Any) -> bool:
    """Whether multiple-choice prompts go through the chat template: :func:`chat_template_on`, and a ValueError
    when it is on and the tokenizer has no template (``auto`` included: an instruct model without its template
    would silently be scored another way than its digest says)."""
    on = chat_template_on(setting, model)
    if on and not has_chat_template(tokenizer):
        why = "the model's name says it is instruction-tuned" if setting == "auto" else "chat_template is true"
        raise ValueError(f"{why}, but its tokenizer has no chat template; set chat_template: false")
    return on
