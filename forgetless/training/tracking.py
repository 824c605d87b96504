"""Scores taken while a stage trains: forgetting over training (``eval_every``).

:class:`EvalEvery` is a plugin like the anti-forgetting methods: after every ``every``-th optimizer step (and before
the first moves the weights, as step 0; a resumed stage restores that row) it calls ``evaluate(model) -> {name:
score}`` with the model in eval mode and records a row ``{"step": k, **scores}`` in ``ctx.extras["eval_history"]``.
Evaluation draws no random numbers and restores the model's mode, so the training that follows is the same as without
it (tested).

With ``choose(history) -> index of the row to keep, or None`` (e.g. :func:`best_within_drop`), the trainable weights
are snapshot (a CPU copy) whenever the newest row is the one chosen: ``best_step`` and ``best_state`` then hold the
kept checkpoint, and ``ctx.extras["eval_selected_step"]`` its step. After training, the kept checkpoint is an
evaluation variant (``selected``), evaluated like WiSE-FT's interpolations; :meth:`EvalEvery.selected` swaps it in.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch

from forgetless.training.hooks import Method, StageContext

Evaluate = Callable[[torch.nn.Module], dict[str, float]]
Choose = Callable[[list[dict[str, float]]], "int | None"]


def best_within_drop(domain: str, general: str, max_drop: float) -> Choose:
    """A ``choose`` for :class:`EvalEvery`: the row with the highest ``domain`` score among those whose ``general``
    score is at most ``max_drop`` below the first row's (step 0); the earliest such row on ties."""

    def choose(history: list[dict[str, float]]) -> int | None:
        if general not in history[0]:
            raise ValueError(f"eval.select chooses by {general!r}, which the scores taken while training do not have "
                             f"(every general-suite task's main score is lower-is-better, e.g. a perplexity): add "
                             f"a multiple-choice suite task")
        start = history[0][general]
        allowed = [i for i, row in enumerate(history) if start - row[general] <= max_drop + 1e-12]
        return max(allowed, key=lambda i: (history[i][domain], -i)) if allowed else None

    return choose


class EvalEvery(Method):
    name = "eval-every"

    def __init__(self, every: int, evaluate: Evaluate, stages: tuple[str, ...] = ("domain",),
                 at_start: bool = True, choose: Choose | None = None) -> None:
        if int(every) < 1:
            raise ValueError(f"eval_every must be >= 1, got {every}")
        self.every, self.evaluate, self.stages, self.at_start = int(every), evaluate, tuple(stages), at_start
        self.choose = choose
        self.history: list[dict[str, float]] = []
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self._start_pending = False  # step 0's row is still to take (on_stage_start, before_optimizer_step)

    def _record(self, ctx: StageContext, step: int) -> None:
        started = time.perf_counter()
        try:
            self._evaluate(ctx, step)
        finally:  # the stage's logged throughput leaves this time out
            ctx.paused_seconds += time.perf_counter() - started

    def _evaluate(self, ctx: StageContext, step: int) -> None:
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            with torch.no_grad():
                row = {"step": step, **self.evaluate(ctx.model)}
        finally:
            ctx.model.train(was_training)
        self.history.append(row)
        ctx.extras["eval_history"] = list(self.history)
        if self.choose is not None and self.choose(self.history) == len(self.history) - 1:
            self.best_step = step
            self.best_state = {n: p.detach().to("cpu", copy=True) for n, p in ctx.trainable_parameters()}
            ctx.extras["eval_selected_step"] = step

    def on_stage_start(self, ctx: StageContext) -> None:
        self.history, self.best_step, self.best_state = [], None, None
        # step 0's row is taken before the first optimizer step moves the weights (before_optimizer_step), not here:
        # a stage that resumes from a checkpoint restores it instead (load_stage_state), and evaluating here cost a
        # whole evaluation that the restored history then replaced
        self._start_pending = ctx.stage in self.stages and self.at_start

    def before_optimizer_step(self, ctx: StageContext) -> None:
        if self._start_pending:  # the weights are still the stage's starting ones
            self._start_pending = False
            self._record(ctx, 0)

    def stage_state(self, ctx: StageContext) -> dict[str, torch.Tensor]:
        """The rows and the kept checkpoint so far, for a mid-stage checkpoint (a resumed stage keeps them)."""
        keys = sorted({k for row in self.history for k in row})
        state = {f"history/{k}": torch.tensor([float(row.get(k, math.nan)) for row in self.history],
                                              dtype=torch.float64) for k in keys}
        if self.best_state is not None:
            state |= {"best_step": torch.tensor(self.best_step)} | {f"best/{n}": t for n, t in self.best_state.items()}
        return state

    def load_stage_state(self, ctx: StageContext, state: dict[str, torch.Tensor]) -> None:
        self._start_pending = False  # the checkpoint's history has step 0's row
        columns = {k.removeprefix("history/"): v.tolist() for k, v in state.items() if k.startswith("history/")}
        rows = len(columns.get("step", []))
        self.history = [{k: (int(v[i]) if k == "step" else v[i]) for k, v in columns.items() if not math.isnan(v[i])}
                        for i in range(rows)]
        if self.history:
            ctx.extras["eval_history"] = list(self.history)
        if "best_step" in state:
            self.best_step = int(state["best_step"])
            self.best_state = {k.removeprefix("best/"): v for k, v in state.items() if k.startswith("best/")}
            ctx.extras["eval_selected_step"] = self.best_step

    @contextlib.contextmanager
    def selected(self, model: torch.nn.Module) -> Iterator[None]:
        """``model`` with the kept checkpoint's trainable weights inside the block, its own weights after it."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        own = {n: params[n].detach().clone() for n in self.best_state}
        with torch.no_grad():
            try:
                for name, value in self.best_state.items():
                    params[name].copy_(value)
                yield
            finally:
                for name, value in own.items():
                    params[name].copy_(value)

    def evaluation_variants(self, model: torch.nn.Module) -> Iterator[tuple[str, contextlib.AbstractContextManager]]:
        if self.best_state is not None:
            yield "selected", self.selected(model)

    def after_optimizer_step(self, ctx: StageContext) -> None:
        done = ctx.step + 1
        if ctx.stage in self.stages and (done % self.every == 0 or done == ctx.total_steps):
            self._record(ctx, done)

    def on_step_skipped(self, ctx: StageContext) -> None:
        """A skipped step still counts (the weights are those of the step before): its row, the final one included,
        is taken as on any other step."""
        self.after_optimizer_step(ctx)
