"""Scores taken while a stage trains: forgetting over training (``eval_every``).

:class:`EvalEvery` is a plugin like the anti-forgetting methods: after every ``every``-th optimizer step (and before
the first, as step 0) it calls ``evaluate(model) -> {name: score}`` with the model in eval mode and records a row
``{"step": k, **scores}`` in ``ctx.extras["eval_history"]``. Evaluation draws no random numbers and restores the
model's mode, so the training that follows is the same as without it (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from forgetless.training.hooks import Method, StageContext

Evaluate = Callable[[torch.nn.Module], dict[str, float]]


class EvalEvery(Method):
    name = "eval-every"

    def __init__(self, every: int, evaluate: Evaluate, stages: tuple[str, ...] = ("domain",),
                 at_start: bool = True) -> None:
        if int(every) < 1:
            raise ValueError(f"eval_every must be >= 1, got {every}")
        self.every, self.evaluate, self.stages, self.at_start = int(every), evaluate, tuple(stages), at_start
        self.history: list[dict[str, float]] = []

    def _record(self, ctx: StageContext, step: int) -> None:
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            with torch.no_grad():
                row = {"step": step, **self.evaluate(ctx.model)}
        finally:
            ctx.model.train(was_training)
        self.history.append(row)
        ctx.extras["eval_history"] = list(self.history)

    def on_stage_start(self, ctx: StageContext) -> None:
        self.history = []
        if ctx.stage in self.stages and self.at_start:
            self._record(ctx, 0)

    def after_optimizer_step(self, ctx: StageContext) -> None:
        done = ctx.step + 1
        if ctx.stage in self.stages and (done % self.every == 0 or done == ctx.total_steps):
            self._record(ctx, done)
