"""Replay (rehearsal): mix general-text examples into the domain stage.

The classic rehearsal baseline against catastrophic forgetting (e.g. Robins 1995; "experience replay" in
continual learning): while fine-tuning on the domain, keep training on a sample of the general (nu) data.

With ``fraction = f`` (0 <= f < 1) and ``n`` domain examples, the domain stage trains on the ``n`` domain
examples plus ``k = round(f / (1 - f) * n)`` general examples, so that general text is a fraction ``f`` of
the mixed set (f = 0.25: one general example for every three domain ones). The ``k`` examples are drawn
without replacement from ``ctx.general_examples`` (a random permutation, repeated when ``k`` exceeds the
number of general examples) with a generator seeded by the stage seed (``TrainConfig.seed``), so a run is
reproducible. The loop's data loader shuffles the mixed list. Only the domain stage is changed.

Note: when the domain stage is sized in epochs, the mixed set is larger, so the stage takes more optimizer steps
(``1 / (1 - f)`` times as many); with ``max_steps`` the number of steps is unchanged and a fraction ``f`` of them
is spent on general text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forgetless.methods import DOMAIN, MethodSpec, register
from forgetless.methods.common import Options, option
from forgetless.training.hooks import Method, StageContext

_SEED_OFFSET = 7919  # keeps the replay sample independent of the loader's shuffling stream


def replay_count(n_domain: int, fraction: float) -> int:
    """How many general examples make them a ``fraction`` of the mixed set."""
    return int(round(fraction / (1.0 - fraction) * n_domain))


def sample_indices(n_pool: int, k: int, seed: int) -> list[int]:
    """``k`` indices into a pool of ``n_pool``: without replacement, cycling through fresh permutations."""
    g = torch.Generator().manual_seed(int(seed) + _SEED_OFFSET)
    out: list[int] = []
    while len(out) < k:
        out.extend(torch.randperm(n_pool, generator=g).tolist()[: k - len(out)])
    return out


@dataclass(repr=False)
class ReplayOptions(Options):
    fraction: float = option(0.25, "share of the domain stage's training examples that are general text, in [0, 1)")

    def check(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"replay fraction must be in [0, 1), got {self.fraction}")


class Replay(Method):
    name = "replay"
    Options = ReplayOptions

    def prepare_examples(self, ctx: StageContext, examples: Sequence[dict]) -> Sequence[dict]:
        if ctx.stage != DOMAIN or self.fraction == 0.0:
            return examples
        pool = ctx.general_examples
        if not pool:
            raise ValueError("replay needs general-text examples in the domain stage (StageContext.general_examples "
                             "is empty): give the run a general training set")
        k = replay_count(len(examples), self.fraction)
        seed = getattr(ctx.config, "seed", 0) if ctx.config is not None else 0
        replayed = [pool[i] for i in sample_indices(len(pool), k, seed)]
        ctx.extras["replay_examples"] = k
        return list(examples) + replayed


register(MethodSpec("replay", "rehearsal: a fraction of general-text examples mixed into the domain stage",
                    stages=None, plugin=Replay))

__all__ = ["Replay", "replay_count", "sample_indices"]
