"""Data loading: text corpora, multiple-choice tasks (lm-evaluation-harness formats), instructions, chat and
prompt/completion rows (docs/data_formats.md)."""

from .chat import (chat_examples, chat_mc_items, chat_template_on, load_chat, load_prompt_completion,
                   prompt_completion_examples, use_chat_template)
from .errors import DataError
from .formats import TRAIN_KINDS, detect_kind, load_train, resolve_kind, train_examples
from .instructions import instruction_examples, load_instructions
from .io import Record, load_records, read_records
from .multiple_choice import (SCHEMAS, MCItem, detect_schema, encode_pair, load_mc_task,
                              mc_train_examples)
from .text import lm_examples, load_texts, pack_blocks

__all__ = [
    "DataError", "Record", "read_records", "load_records",
    "load_texts", "pack_blocks", "lm_examples",
    "MCItem", "SCHEMAS", "detect_schema", "load_mc_task", "encode_pair", "mc_train_examples",
    "load_instructions", "instruction_examples",
    "load_chat", "chat_examples", "load_prompt_completion", "prompt_completion_examples",
    "chat_mc_items", "chat_template_on", "use_chat_template",
    "TRAIN_KINDS", "detect_kind", "resolve_kind", "load_train", "train_examples",
]
