"""Replay (rehearsal): mix general-text examples into the domain stage.

The classic rehearsal baseline against catastrophic forgetting (e.g. Robins 1995; "experience replay" in
continual learning): while fine-tuning on the domain, keep training on a sample of the general (nu) data.

``fraction = f`` (0 <= f < 1) is the share of the mixed set that is general text, counted in

* labelled tokens (``by: tokens``, the default): with ``D`` labelled tokens in the domain examples, general examples
  are added until they carry ``T = round(f / (1 - f) * D)`` labelled tokens, the last one cut after its
  ``T - (tokens so far)``-th labelled token (a prefix of it), so that ``T / (D + T)`` is ``f`` within one token;
* examples (``by: examples``): ``k = round(f / (1 - f) * n)`` general examples beside the ``n`` domain ones
  (f = 0.25: one general example for every three domain ones).

A labelled token is one whose label is not -100 after the first position (the loss predicts token t from t - 1).
The general examples are drawn without replacement from ``ctx.general_examples`` (a random permutation, repeated
when more are needed than the pool holds) with a generator seeded by the stage seed (``TrainConfig.seed``), so a
run is reproducible. The loop's data loader shuffles the mixed list. Only the domain stage is changed.

Why tokens by default: the loop's loss of a step is the mean over all its labelled tokens, so every labelled token
weighs the same in the gradient and general text's share of the gradient (over an epoch) is its share of the
labelled tokens, not of the examples. Counting examples ties that share to the task's answer length: a general
block carries 127 labelled tokens and a multiple-choice answer a handful, so ``fraction: 0.25`` of examples gave
general text 89% of the gradient on MedMCQA and 59% on PIQA (issue 13's measurement): replay then trains on
general text more than on the task, and the same setting means different things on different tasks. With
``by: tokens``, ``fraction`` is the share of the training signal on every task. The price: on a task with short
answers few general texts are replayed (0.25 of 400 five-token answers is 667 tokens, about 5 blocks), each of
them in every epoch; ``by: examples`` keeps the old meaning.

Note: when the domain stage is sized in epochs, the mixed set is larger, so the stage takes more optimizer steps;
with ``max_steps`` the number of steps is unchanged and part of each step's batches are general text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from forgetless.lm import IGNORE_INDEX
from forgetless.methods import DOMAIN, MethodSpec, register
from forgetless.methods.common import Options, option
from forgetless.training.batches import example_labels
from forgetless.training.hooks import Method, StageContext

_SEED_OFFSET = 7919  # keeps the replay sample independent of the loader's shuffling stream


def replay_count(n_domain: int, fraction: float) -> int:
    """How many general items (examples, or labelled tokens) make them a ``fraction`` of the mixed set."""
    return int(round(fraction / (1.0 - fraction) * n_domain))


def labelled_tokens(example: dict) -> int:
    """Tokens that carry a loss: labels after the first position that are not -100."""
    return sum(1 for label in example_labels(example)[1:] if label != IGNORE_INDEX)


def _index_stream(n_pool: int, seed: int) -> Iterator[int]:
    """Indices into a pool of ``n_pool``: fresh seeded permutations, one after the other."""
    g = torch.Generator().manual_seed(int(seed) + _SEED_OFFSET)
    while True:
        yield from torch.randperm(n_pool, generator=g).tolist()


def sample_indices(n_pool: int, k: int, seed: int) -> list[int]:
    """``k`` indices into a pool of ``n_pool``: without replacement, cycling through fresh permutations."""
    return list(islice(_index_stream(n_pool, seed), k))


def _prefix(example: dict, tokens: int) -> dict:
    """The example cut right after its ``tokens``-th labelled token (lists as long as ``input_ids`` are cut)."""
    seen, end = 0, len(example["input_ids"])
    for position, label in enumerate(example_labels(example)):
        if position > 0 and label != IGNORE_INDEX:
            seen += 1
            if seen == tokens:
                end = position + 1
                break
    length = len(example["input_ids"])
    return {k: v[:end] if _per_position(v, length) else v for k, v in example.items()}


def _per_position(value: Any, length: int) -> bool:
    """Whether ``value`` holds one entry per token: a list, tensor or array as long as the input ids."""
    if isinstance(value, (str, bytes, dict)):
        return False
    try:
        return len(value) == length
    except TypeError:  # a number, a 0-d tensor
        return False


def sample_by_tokens(pool: Sequence[dict], tokens: int, seed: int) -> list[dict]:
    """General examples (seeded, as :func:`sample_indices`) that carry exactly ``tokens`` labelled tokens, the last
    one cut to a prefix."""
    if tokens > 0 and not any(labelled_tokens(e) for e in pool):
        raise ValueError("replay by tokens: the general-text examples have no labelled tokens")
    out, have = [], 0
    for i in _index_stream(len(pool), seed):
        if have >= tokens:
            break
        n = labelled_tokens(pool[i])
        if n == 0:
            continue
        out.append(pool[i] if have + n <= tokens else _prefix(pool[i], tokens - have))
        have += min(n, tokens - have)
    return out


@dataclass(repr=False)
class ReplayOptions(Options):
    fraction: float = option(0.25, "share of the domain stage's training set that is general text, in [0, 1)")
    by: str = option("tokens", "what the fraction counts: labelled tokens (the loss's weighting) or examples",
                     choices=("tokens", "examples"), domain=True)

    def check(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"replay fraction must be in [0, 1), got {self.fraction}")


class Replay(Method):
    name = "replay"
    Options = ReplayOptions

    def needs_general_text(self, stages: Sequence[str]) -> bool:
        return self.fraction > 0.0

    def shapes_general_stage(self) -> bool:
        return False  # general text is mixed into the domain stage only

    def planned_examples(self, stage: str, examples: int) -> tuple[int | None, str] | None:
        if stage != DOMAIN or self.fraction == 0.0:
            return None
        if self.by == "examples":
            return examples + replay_count(examples, self.fraction), "examples with the replayed"
        return None, f"replayed general text makes {self.fraction:g} of the labelled tokens"

    def prepare_examples(self, ctx: StageContext, examples: Sequence[dict]) -> Sequence[dict]:
        if ctx.stage != DOMAIN or self.fraction == 0.0:
            return examples
        pool = ctx.general_examples
        if not pool:
            raise ValueError("replay needs general-text examples in the domain stage (StageContext.general_examples "
                             "is empty): give the run a general training set")
        seed = getattr(ctx.config, "seed", 0) if ctx.config is not None else 0
        if self.by == "tokens":
            domain_tokens = sum(labelled_tokens(e) for e in examples)
            replayed = sample_by_tokens(pool, replay_count(domain_tokens, self.fraction), seed)
            ctx.extras["replay_tokens"] = sum(labelled_tokens(e) for e in replayed)
            ctx.extras["domain_tokens"] = domain_tokens
        else:
            replayed = [pool[i] for i in sample_indices(len(pool), replay_count(len(examples), self.fraction), seed)]
        ctx.extras["replay_examples"] = len(replayed)
        return list(examples) + replayed


register(MethodSpec("replay", "rehearsal: a fraction of general text (labelled tokens or examples) mixed into the "
                              "domain stage", stages=None, plugin=Replay))

__all__ = ["Replay", "labelled_tokens", "replay_count", "sample_by_tokens", "sample_indices"]
