"""Data loading: text corpora, multiple-choice tasks (lm-evaluation-harness formats) and instructions."""

from .errors import DataError
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
]
