"""A tiny byte-level BPE tokenizer trained in-process on a few sentences (no downloads).

Byte-level like GPT-2/Llama-3 tokenizers: a space merges with the following word ("Ġanswer"), which is
what makes lm-evaluation-harness's whitespace handling in ``_encode_pair`` matter.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [
    "Question: What is the answer?\nAnswer: A",
    "The following are multiple choice questions (with answers) about biology.",
    "Plants make sugar from light and absorb carbon dioxide from the air.",
    "Answer: the answer is B. Choices: A. yes B. no C. maybe D. never",
    "Below is an instruction that describes a task. Write a response.",
    "### Instruction:\nSay hello.\n\n### Response:\nHello there!",
]


@lru_cache(maxsize=1)
def _core() -> str:
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_CORPUS, trainer=trainer)
    return core.to_str()  # cached as JSON: each caller gets an independent tokenizer object


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``<pad>`` 0, ``</s>`` 1 (EOS) and ``<s>`` 2 (BOS); never adds them itself."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_core()),
                                   pad_token="<pad>", eos_token="</s>", bos_token="<s>")
