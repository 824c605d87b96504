"""Multiple-choice tasks in the exact prompt format of EleutherAI's lm-evaluation-harness.

Each schema adapter turns one dataset row into an :class:`MCItem` (context, choices, answer,
target_delimiter) reproducing the harness task's ``doc_to_text``, ``doc_to_choice``, ``doc_to_target`` and
``target_delimiter`` (default ``" "``), so that training prompts and evaluation prompts are the ones that
published zero-shot numbers use. The continuation scored for choice ``j`` is
``target_delimiter + choices[j]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .errors import DataError
from .io import Record, load_records


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: the prompt, the raw choice strings and the correct index."""

    context: str
    choices: tuple[str, ...]
    answer: int
    target_delimiter: str = " "
    # the start of ``context`` that the harness's task config calls its ``description`` (MMLU's subject line): under
    # a chat template it is the system turn, the rest of the context the user turn (forgetless.data.chat)
    description: str = ""
    # where the item was read (file and line), for an error found only when it is tokenized; not part of the item
    origin: str | None = field(default=None, compare=False, repr=False)
    line: int | None = field(default=None, compare=False, repr=False)

    def error(self, problem: str, field_name: str) -> Exception:
        """A DataError at the item's row when it was read from a file, else a ValueError."""
        if self.origin is None or self.line is None:
            return ValueError(problem)
        return DataError.at(self.origin, self.line, problem, field_name)

    def continuation(self, j: int) -> str:
        """The text scored for choice ``j`` (as the harness builds it)."""
        return self.target_delimiter + self.choices[j]

    @property
    def continuations(self) -> list[str]:
        """All continuations, in choice order."""
        return [self.continuation(j) for j in range(len(self.choices))]


# --- field validation: every problem names file, line and field ---------------------------------------

def _field(record: Record, name: str) -> Any:
    if name not in record or record[name] is None:
        raise record.error("missing", name)
    return record[name]


def _str(record: Record, name: str, value: Any = None, allow_empty: bool = True) -> str:
    value = _field(record, name) if value is None else value
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type(value).__name__} {value!r}", name)
    if not allow_empty and not value.strip():
        raise record.error("empty", name)
    return value


# an index written as a string: ASCII digits only (str.isdigit() also takes "²", which int() refuses)
_INDEX = re.compile(r"-?[0-9]+")


def _int(record: Record, name: str) -> int:
    value = _field(record, name)
    # bool is an int subclass; a JSON true/false here is a schema mix-up, not an index.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and _INDEX.fullmatch(value.strip()):
            return int(value)  # some exports store indices as strings ("2")
        raise record.error(f"expected an integer, got {type(value).__name__} {value!r}", name)
    return value


def _index(record: Record, name: str, n_choices: int, one_based_hint: str = "") -> int:
    value = _int(record, name)
    if not 0 <= value < n_choices:
        hint = one_based_hint if value == n_choices else ""
        raise record.error(f"{value} is not a valid choice index (0-{n_choices - 1}){hint}", name)
    return value


# MedMCQA's original release (GitHub JSON) counts cop from 1; the Hugging Face one, whose prompts the harness builds,
# from 0: a file of the first kind is read one answer off, and only its cop = 4 rows fail
MEDMCQA_ONE_BASED = ("; the Hugging Face MedMCQA counts cop from 0 (opa), the original release from 1: subtract 1 "
                     "from every cop of such a file")
ONE_BASED_SUSPECT = 50  # items of a 4-choice MedMCQA file, none answered opa: one-based (0.75 ** 50 by chance)


def _str_list(record: Record, name: str, value: Any = None) -> tuple[str, ...]:
    value = _field(record, name) if value is None else value
    if not isinstance(value, (list, tuple)):
        raise record.error(f"expected a list of strings, got {type(value).__name__}", name)
    if not value:
        raise record.error("empty choices", name)
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise record.error(f"item {j} is {type(item).__name__} {item!r}, expected a string", name)
    return tuple(value)


def _labelled_choices(record: Record) -> tuple[tuple[str, ...], list[str]]:
    """ARC/OpenBookQA ``choices: {text: [...], label: [...]}``."""
    choices = _field(record, "choices")
    if not isinstance(choices, dict):
        raise record.error(f"expected an object with 'text' and 'label', got {type(choices).__name__}",
                           "choices")
    for key in ("text", "label"):
        if key not in choices:
            raise record.error("missing", f"choices.{key}")
    texts = _str_list(record, "choices.text", choices["text"])
    labels = list(_str_list(record, "choices.label", choices["label"]))
    if len(texts) != len(labels):
        raise record.error(f"{len(texts)} texts but {len(labels)} labels", "choices")
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:  # the answer key would name either choice
        raise record.error(f"label {twice[0]!r} is given to more than one choice", "choices.label")
    return texts, labels


def _answer_key(record: Record, labels: list[str], key: str) -> int:
    if key not in labels:
        raise record.error(f"{key!r} is not one of the choice labels {labels}", "answerKey")
    return labels.index(key)


# --- schema adapters -----------------------------------------------------------------------------------

def sciq(record: Record) -> MCItem:
    """SciQ (``allenai/sciq``), harness ``sciq/sciq.yaml``::

        doc_to_text: "{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:"
        doc_to_choice: "{{[distractor1, distractor2, distractor3, correct_answer]}}"
        doc_to_target: 3
    """
    support = _str(record, "support")
    question = _str(record, "question")
    choices = tuple(_str(record, k) for k in ("distractor1", "distractor2", "distractor3", "correct_answer"))
    return MCItem(f"{support.lstrip()}\nQuestion: {question}\nAnswer:", choices, 3)


def piqa(record: Record) -> MCItem:
    """PIQA (``piqa``), harness ``piqa/piqa.yaml``::

        doc_to_text: "Question: {{goal}}\\nAnswer:"
        doc_to_choice: "{{[sol1, sol2]}}"
        doc_to_target: label
    """
    goal = _str(record, "goal")
    choices = (_str(record, "sol1"), _str(record, "sol2"))
    return MCItem(f"Question: {goal}\nAnswer:", choices, _index(record, "label", 2))


MEDMCQA_LETTERS = ("A", "B", "C", "D")


def medmcqa(record: Record) -> MCItem:
    """MedMCQA (``openlifescienceai/medmcqa``), harness ``medmcqa/medmcqa.yaml`` + ``utils_medmcqa.py``::

        doc_to_text: "Question: " + question + "\\nChoices:\\n" + "A. {opa}\\nB. {opb}\\nC. {opc}\\nD. {opd}\\n"
                     + "Answer:"
        doc_to_choice: ['A', 'B', 'C', 'D']
        doc_to_target: cop
    """
    question = _str(record, "question")
    options = [_str(record, k) for k in ("opa", "opb", "opc", "opd")]
    prompt = "Question: " + question + "\nChoices:\n"
    prompt += "".join(f"{letter}. {option}\n" for letter, option in zip(MEDMCQA_LETTERS, options))
    prompt += "Answer:"
    return MCItem(prompt, MEDMCQA_LETTERS, _index(record, "cop", 4, MEDMCQA_ONE_BASED))


def arc(record: Record) -> MCItem:
    """ARC Easy/Challenge (``allenai/ai2_arc``), harness ``arc/arc_easy.yaml``::

        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: "{{choices.text}}"
        doc_to_target: "{{choices.label.index(answerKey)}}"
    """
    question = _str(record, "question")
    texts, labels = _labelled_choices(record)
    answer = _answer_key(record, labels, _str(record, "answerKey"))
    return MCItem(f"Question: {question}\nAnswer:", texts, answer)


def openbookqa(record: Record) -> MCItem:
    """OpenBookQA (``allenai/openbookqa``, main), harness ``openbookqa/openbookqa.yaml``::

        doc_to_text: question_stem
        doc_to_choice: "{{choices.text}}"
        doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"
    """
    stem = _str(record, "question_stem")
    texts, labels = _labelled_choices(record)
    answer = _answer_key(record, labels, _str(record, "answerKey").lstrip())
    return MCItem(stem, texts, answer)


MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu(record: Record) -> MCItem:
    """MMLU (``cais/mmlu``), harness ``mmlu/default/_default_template_yaml`` + per-subject yaml::

        description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
        doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n
                      D. {{choices[3]}}\\nAnswer:"
        doc_to_choice: ["A", "B", "C", "D"]
        doc_to_target: answer

    The harness prepends the subject's ``description`` (subject with ``_`` -> space) even at 0-shot.
    """
    question = _str(record, "question")
    subject = _str(record, "subject")
    options = _str_list(record, "choices")
    if len(options) != 4:
        raise record.error(f"expected 4 choices, got {len(options)}", "choices")
    description = ("The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n")
    body = question.strip() + "\n" + "".join(f"{l}. {o}\n" for l, o in zip(MMLU_LETTERS, options)) + "Answer:"
    return MCItem(description + body, MMLU_LETTERS, _index(record, "answer", 4), description=description)


BOOLQ_CHOICES = ("no", "yes")


def boolq(record: Record) -> MCItem:
    """BoolQ (``google/boolq``: ``answer`` a JSON boolean; SuperGLUE's ``aps/super_glue`` boolq: ``label`` 0/1),
    harness ``super_glue/boolq/default.yaml``::

        doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
        doc_to_choice: ["no", "yes"]
        doc_to_target: label
    """
    passage = _str(record, "passage")
    question = _str(record, "question")
    if "answer" in record:
        answer = record["answer"]
        if not isinstance(answer, bool):  # 0/1 or "true" would be a schema mix-up: say so rather than guess
            raise record.error(f"expected true or false, got {type(answer).__name__} {answer!r}", "answer")
        label = int(answer)
    else:
        label = _index(record, "label", 2)
    return MCItem(f"{passage}\nQuestion: {question}?\nAnswer:", BOOLQ_CHOICES, label)


def generic(record: Record) -> MCItem:
    """Generic JSON-lines schema ``{question, choices, answer, context?}`` (this project's own)::

        text: "{context}\\n" (when given) + "Question: {question}\\nAnswer:"
        choices: choices
        answer: an int index, or the correct choice string itself
    """
    question = _str(record, "question")
    context = record.get("context")
    if context is not None:
        context = _str(record, "context")
    choices = _str_list(record, "choices")
    empty = [j for j, choice in enumerate(choices) if not choice.strip()]
    if empty:  # it would train and score a lone delimiter
        raise record.error(f"choice {empty[0]} is empty", "choices")
    raw = _field(record, "answer")
    if isinstance(raw, str) and raw in choices:
        answer = choices.index(raw)
        if _INDEX.fullmatch(raw.strip()) and 0 <= int(raw) < len(choices) and int(raw) != answer:  # "1" of ["4", "3",
            # "2", "1"]
            raise record.error(f"{raw!r} is both choice {answer}'s text and the index of choice {int(raw)} "
                               f"({choices[int(raw)]!r}): give the index as a number", "answer")
    elif isinstance(raw, str) and not _INDEX.fullmatch(raw.strip()):
        raise record.error(f"{raw!r} is neither an index nor one of the choices", "answer")
    else:
        answer = _index(record, "answer", len(choices))
    prefix = f"{context}\n" if context else ""
    return MCItem(f"{prefix}Question: {question}\nAnswer:", choices, answer)


SCHEMAS: dict[str, Callable[[Record], MCItem]] = {
    "sciq": sciq,
    "piqa": piqa,
    "medmcqa": medmcqa,
    "arc": arc,
    "openbookqa": openbookqa,
    "mmlu": mmlu,
    "boolq": boolq,
    "generic": generic,
}

# Checked in order: more specific key sets first (mmlu before generic, which share question/choices/answer).
_SIGNATURES: list[tuple[str, frozenset[str]]] = [
    ("sciq", frozenset({"question", "distractor1", "distractor2", "distractor3", "correct_answer"})),
    ("piqa", frozenset({"goal", "sol1", "sol2"})),
    ("medmcqa", frozenset({"question", "opa", "opb", "opc", "opd"})),
    ("openbookqa", frozenset({"question_stem", "choices", "answerKey"})),
    ("arc", frozenset({"question", "choices", "answerKey"})),
    ("mmlu", frozenset({"question", "subject", "choices", "answer"})),
    ("generic", frozenset({"question", "choices", "answer"})),
    ("boolq", frozenset({"question", "passage"})),  # after generic: a generic row may carry a passage
]


def detect_schema(record: dict[str, Any]) -> str:
    """The schema name whose fields ``record`` has; DataError listing the known schemas if none fits."""
    keys = set(record)
    for name, required in _SIGNATURES:
        if required <= keys:
            return name
    from .formats import detect_kind

    kind = detect_kind(record)
    if kind != "multiple_choice":  # instructions, chat, ... read as multiple choice (a YAML task's default kind)
        problem = (f"not multiple-choice items: fields {sorted(keys)} are {kind} data; say so with train_kind: {kind} "
                   f"(forgetless train: --domain-kind {kind}) or auto")
    else:
        known = "; ".join(f"{name}: {sorted(req)}" for name, req in _SIGNATURES)
        problem = f"cannot tell the schema from fields {sorted(keys)}; known schemas: {known}"
    if isinstance(record, Record):
        raise record.error(problem)
    raise DataError(problem)


def load_mc_task(source: str, schema: str | None = None, split: str | None = None, name: str | None = None,
                 limit: int | None = None) -> list[MCItem]:
    """Load a multiple-choice task as MCItems from a local file or hub dataset.

    ``schema`` is one of :data:`SCHEMAS`; when None it is detected from the first record's fields (so
    ``allenai/sciq``, ``piqa``, ``openlifescienceai/medmcqa``, ``allenai/ai2_arc``, ``allenai/openbookqa``,
    ``cais/mmlu`` and ``google/boolq`` all map to their schema). Every bad row raises DataError naming file, line
    and field, and so does a source without items or an item with fewer than two choices (it would score 100%).
    """
    if schema is not None and schema not in SCHEMAS:
        raise DataError(f"unknown schema {schema!r}; known: {sorted(SCHEMAS)}")
    records = load_records(source, split=split, name=name, limit=limit)  # a hub source is streamed up to limit
    if not records:
        raise DataError.empty(source, "multiple-choice items")
    adapter = SCHEMAS[schema or detect_schema(records[0])]
    items = []
    for record in records:
        item = adapter(record)
        if len(item.choices) < 2:
            raise record.error(f"needs at least two choices, got {len(item.choices)}", "choices")
        items.append(replace(item, origin=record.origin, line=record.line) if isinstance(record, Record) else item)
    if adapter is medmcqa and len(items) >= ONE_BASED_SUSPECT and all(item.answer != 0 for item in items):
        import warnings

        warnings.warn(f"{source}: none of {len(items)} MedMCQA items has cop 0: if the file counts cop from 1 (the "
                      f"original release; the Hugging Face one counts from 0), every answer is read one choice off: "
                      f"subtract 1 from every cop", stacklevel=2)
    return items


# --- tokenization ----------------------------------------------------------------------------------------

def _prefix_token(tokenizer: Any) -> int | None:
    """HFLM's ``prefix_token_id``: BOS if the tokenizer has one, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok(tokenizer: Any, text: str, special: bool | None = None) -> list[int]:
    """``HFLM.tok_encode`` of lm-evaluation-harness 0.4.13 (the ``lmeval`` extra's pin): the tokenizer's own default
    for special tokens (a BOS where it adds one: Llama, Gemma; SmolLM2's adds none), except none when the text
    already starts with the prefix token's text (a chat template wrote the BOS). ``special``: say it instead."""
    if special is None:
        prefix = _prefix_token(tokenizer)
        special = not (prefix is not None and text.startswith(tokenizer.decode(prefix)))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), exactly as lm-evaluation-harness's ``HFLM._encode_pair`` (0.4.13).

    Trailing whitespace of the context moves onto the continuation; the continuation ids are the tail of
    ``tok(context + continuation)`` after ``len(tok(context))`` tokens, so merges across the boundary are
    the ones the model sees at evaluation. Both are encoded as :func:`_tok` says (with a BOS where the tokenizer
    adds one). An empty context becomes ``[prefix_token_id]`` (BOS if the tokenizer has one, else EOS) with
    ``tok(continuation)`` without special tokens, or, when the continuation's first token is that prefix, its
    first token (``HFLM.loglikelihood``). A context of whitespace only takes that path too, with the whitespace on
    the continuation (the harness asserts there; its context would be empty and score from no position).
    """
    if context.strip() == "":
        cont = _tok(tokenizer, context + continuation, special=False)
        prefix = _prefix_token(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok(tokenizer, context + continuation)
    context_enc = _tok(tokenizer, context)
    return context_enc, whole[len(context_enc):]


def mc_train_examples(items: list[MCItem], tokenizer: Any,
                      max_length: int | None = None) -> list[dict[str, list[int]]]:
    """Training examples ``prompt + correct answer`` with the loss on the answer tokens only.

    Tokenized with :func:`encode_pair`, so the answer ids equal those the harness scores. If an example is
    longer than ``max_length`` the context is cut from the left, after its BOS where it starts with the one the
    tokenizer adds (:func:`~.text.bos_prefix`: Llama's, Gemma's; as :func:`~.instructions.instruction_examples`
    keeps it); answer tokens are never dropped.
    """
    from .text import bos_prefix

    bos = bos_prefix(tokenizer)
    examples = []
    for item in items:
        context, continuation = encode_pair(tokenizer, item.context, item.continuation(item.answer))
        if max_length is not None and len(context) + len(continuation) > max_length:
            if len(continuation) >= max_length:  # at least one context token: the first answer token's loss
                raise item.error(f"answer of {len(continuation)} tokens leaves no room for the question in "
                                 f"max_length={max_length}: {item.continuation(item.answer)!r}", "answer")
            head = context[:1] if bos and context[:1] == bos else []
            rest = context[len(head):]
            context = head + rest[len(context) + len(continuation) - max_length:]
        examples.append({"input_ids": context + continuation, "labels": [-100] * len(context) + continuation})
    return examples
