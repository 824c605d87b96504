"""A tiny character-level tokenizer built in-process (no downloads), sized for ``make_tiny_model``.

Ids: 0 ``<pad>``, 1 ``</s>`` (EOS), 2 ``<s>`` (BOS), 3 ``<unk>``, then one token per character of
``_CHARS`` (lower-cased input); 49 ids in all, below the tiny model's vocabulary of 64.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

_SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]
_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,?!'-:;\n"


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in _CHARS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
