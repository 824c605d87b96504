"""Central differences of a scalar function of parameters, entry by entry, to check an analytic gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch


def central_differences(fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], h: float,
                        per_param: int = 3, seed: int = 0) -> Iterator[tuple[torch.Tensor, tuple[int, ...], float]]:
    """For ``per_param`` random entries of each of ``params``: ``(param, index, (fn(+h) - fn(-h)) / 2h)``, moving
    that one entry in place (and putting it back) while ``fn()`` is evaluated."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        for _ in range(per_param):
            idx = tuple(int(torch.randint(0, d, (1,), generator=g)) for d in p.shape)
            with torch.no_grad():
                old = p[idx].item()
                p[idx] = old + h
                up = fn().item()
                p[idx] = old - h
                down = fn().item()
                p[idx] = old
            yield p, idx, (up - down) / (2 * h)
