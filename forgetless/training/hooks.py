"""The named moments of the training loop that anti-forgetting methods plug into.

A method (HLoRA, EWC, SAM, replay, ...) subclasses :class:`Method` and overrides only the hooks it
needs. The loop in :mod:`forgetless.training.loop` calls every method's hook at each moment, in the
order the methods were given, and never asks which method it is talking to. That is what makes
methods compose: ``[hlora, sam]`` runs HLoRA's extra loss inside both of SAM's passes.

Order of calls in one stage::

    on_stage_start(ctx)
    examples = prepare_examples(ctx, examples)            # e.g. replay mixes in general text
    fb = wrap_forward_backward(ctx, fb)                   # e.g. SAM: two passes per micro-batch
    for each optimizer step:
        for each micro-batch:
            fb(batch):  backward(task mean * ctx.loss_scale + sum(extra_loss(ctx, batch)) / accum)
        before_optimizer_step(ctx)                        # gradients final, before clipping
        clip, optimizer.step(), scheduler.step()
        after_optimizer_step(ctx)                         # e.g. HLoRA importance integration
        optimizer.zero_grad()
    on_stage_end(ctx)                                     # e.g. HLoRA normalizes importance

With ``save_every``, the loop checkpoints after every N-th optimizer step (adapter, optimizer, scheduler, RNG states,
data position and each method's :meth:`Method.stage_state`); a stage restarted on the same checkpoint folder runs
``on_stage_start`` and ``prepare_examples`` as before, then restores the checkpoint and goes on from there.

A method that must carry state from the general stage to a later domain stage (importance, Fisher,
a reference adapter) implements :meth:`Method.save_state` / :meth:`Method.load_state`, so that the
experiment runner can cache a finished general stage and reuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from forgetless.training.config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

Batch = dict[str, torch.Tensor]
ForwardBackward = Callable[[Batch], torch.Tensor]
"""Runs forward and backward on one micro-batch, accumulating into ``.grad``; returns the
(unscaled, detached) total loss of that micro-batch."""


@dataclass
class StageContext:
    """What a method may look at and change during one training stage."""

    stage: str  # "general" (nu) or "domain" (mu)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: "Accelerator"
    config: TrainConfig
    step: int = 0  # optimizer steps taken so far in this stage
    total_steps: int = 0
    grad_accum: int = 1  # micro-batches of the current optimizer step (an epoch's last step may have fewer)
    micro: int = 0  # the current micro-batch's index within its optimizer step (0 .. grad_accum - 1)
    # The weight of the current micro-batch's mean task loss in the step's objective: n_i * processes / N for its n_i
    # of the step's N labelled tokens (1 for one micro-batch on one process). Its loss is already scaled by it.
    loss_scale: float = 1.0
    # The factor the step's backward gradients carry: an fp16 GradScaler's loss scale in the transformers Trainer
    # (read at each micro-batch and before the step), 1 in forgetless's loop. ``p.grad`` is unscaled before ``before_optimizer_step``; what a
    # method gathers itself in backward hooks (HLoRA's exact estimator) is divided by it there.
    grad_scale: float = 1.0
    # The general-stage (nu) training examples, when the run has them: rehearsal mixes them in.
    general_examples: Sequence[dict] | None = None
    # Scalars a method wants logged at this step (e.g. {"reg_loss": ...}); the loop records them.
    scalars: dict[str, float] = field(default_factory=dict)
    # Seconds a method spent on other work than training since the loop last read it (eval.every's evaluation): the
    # loop leaves them out of the logged tokens_per_s and sets this back to 0.
    paused_seconds: float = 0.0
    # Free room for methods to leave things for each other or for the report.
    extras: dict[str, Any] = field(default_factory=dict)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use (first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Record a scalar of this step. A tensor stays on its device, detached: the loop reads the step's scalars
        together at its logging interval (``log_every``), so logging costs no host sync in the step."""
        self.scalars[name] = value.detach() if isinstance(value, torch.Tensor) else float(value)


def options_of(method: Any) -> dict[str, Any] | None:
    """A method's option values (its ``Options`` dataclass as a dict), None for a method without options: what, with
    its class, says what the method does (a checkpoint's stage settings; two method entries that train the same)."""
    options = getattr(method, "options", None)
    return asdict(options) if is_dataclass(options) else None


class Method:
    """Base class of an anti-forgetting method. Every hook is a no-op by default.

    A method's options are one dataclass, ``Options`` (see :mod:`forgetless.methods.common`); the plugin is built
    from an instance of it, or from keyword arguments for it, and reads them as attributes (``self.phi``).
    """

    name: str = "method"
    Options: ClassVar[type] = type(None)  # a dataclass; subclasses set theirs
    # whether the run saves this method's state (save_state) beside the adapter it saves, because using the adapter
    # needs it (wise-ft's theta_nu: `forgetless export --wise-ft` blends with it); other state stays with the
    # cached general stage only (HLoRA's importance is as large as the model's targeted weights)
    saves_with_adapter: ClassVar[bool] = False

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and (kwargs or not isinstance(options, self.Options)):
            raise TypeError(f"{type(self).__name__}: give a {self.Options.__name__} or options by keyword")
        self.options = options if options is not None else self.Options(**kwargs)

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in getattr(options, "__dataclass_fields__", {}):
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        options = self.__dict__.get("options")
        if options is not None and name in getattr(options, "__dataclass_fields__", {}):
            setattr(options, name, value)  # one source of truth: the options object
        else:
            object.__setattr__(self, name, value)

    def check_composition(self, others: Sequence["Method"]) -> None:
        """Called once when a method list is resolved, with the other methods of the same run; raise ValueError
        for a combination this method cannot run with (default: composes with anything)."""

    def shapes_general_stage(self) -> bool:
        """Whether this method changes what a general stage trains or saves (its examples, loss, steps or state
        files). One that acts on the domain stage only says False: a run with it shares the cached general stage of
        the same recipe without it (``[hlora, sam]`` that of ``hlora``, ``replay`` that of ``lora-nu-mu``)."""
        return True

    def shapes_domain_stage(self) -> bool:
        """Whether this method changes what a domain stage trains (its examples, loss, steps or updates). One that
        only reads the result (WiSE-FT evaluates interpolations of it) says False: a run with it may take the domain
        stage of the same recipe without it from the cache (``wise-ft`` that of ``lora-nu-mu``)."""
        return True

    def needs_general_text(self, stages: Sequence[str]) -> bool:
        """Whether a run of ``stages`` must give this method the general training text even where it has no general
        stage (``StageContext.general_examples``: replay mixes it in, EWC computes its Fisher on it), so that a run
        without it is refused before any model loads (default: no)."""
        return False

    def on_stage_skipped(self, stage: str, model: torch.nn.Module) -> None:
        """Called instead of the domain stage's hooks when that stage comes from the cache rather than training
        (:func:`forgetless.experiment.domain_stage_name`): ``model`` is at the stage's start (the cached weights are
        loaded after this call). A cached general stage brings the methods' state through :meth:`load_state`."""

    def on_stage_start(self, ctx: StageContext) -> None:
        """Called once before the first step of a stage."""

    def prepare_examples(self, ctx: StageContext, examples: Sequence[dict]) -> Sequence[dict]:
        """May return a different list of training examples (``{input_ids, labels}`` dicts)."""
        return examples

    def planned_examples(self, stage: str, examples: int) -> tuple[int | None, str] | None:
        """What :meth:`prepare_examples` will make of ``examples`` rows in ``stage``, for ``run --dry-run``'s step
        count before any tokenizer: None when it leaves them as they are, else (how many, what they are) or (None,
        why the count is known only once tokenized)."""
        return None

    def extra_loss(self, ctx: StageContext, batch: Batch) -> torch.Tensor | None:
        """A term added to the task loss of every micro-batch (before dividing by accumulation)."""
        return None

    def wrap_forward_backward(self, ctx: StageContext, forward_backward: ForwardBackward) -> ForwardBackward:
        """May replace how one micro-batch's gradient is computed (SAM calls it twice)."""
        return forward_backward

    def before_optimizer_step(self, ctx: StageContext) -> None:
        """Gradients of the whole step are final (accumulated, synchronized), not yet clipped."""

    def after_optimizer_step(self, ctx: StageContext) -> None:
        """The optimizer has moved the weights; gradients are still there until zero_grad."""

    def on_step_skipped(self, ctx: StageContext) -> None:
        """This step was dropped after :meth:`before_optimizer_step`: ``on_nonfinite: skip_step`` (its loss or
        gradient norm was not finite, here or on another process), or none of its examples had a labelled token. The
        weights did not move and the gradients are about to be zeroed. Drop whatever this step's hooks gathered, or it
        would reach the next step."""

    def on_stage_end(self, ctx: StageContext) -> None:
        """Called once after the last step of a stage."""

    def on_stage_abort(self, ctx: StageContext) -> None:
        """The stage failed (an error, an interrupt) after :meth:`on_stage_start`: undo what that put on the model
        (hooks), so that a caller who catches the error has the model as it came. :meth:`on_stage_end` is not called."""

    def evaluation_variants(self, model: torch.nn.Module) -> Iterator[tuple[str, AbstractContextManager]]:
        """Extra models to evaluate after training, as (label, context manager that sets them up).

        Weight interpolation uses this to evaluate several coefficients. Default: none.
        """
        return iter(())

    def save_state(self, directory: Path) -> None:
        """Write what a later stage needs (called after the general stage)."""

    def load_state(self, directory: Path) -> None:
        """Read back what :meth:`save_state` wrote."""

    def stage_state(self, ctx: StageContext) -> dict[str, torch.Tensor]:
        """What the method accumulates *during* a stage (HLoRA's running path integral), for a mid-stage checkpoint.

        State built at stage start needs nothing here: a resumed stage runs ``on_stage_start`` again from the same
        weights and seed before the checkpoint is restored."""
        return {}

    def load_stage_state(self, ctx: StageContext, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`stage_state` when a stage resumes from a checkpoint."""

    def __repr__(self) -> str:
        options = self.__dict__.get("options")
        return f"{type(self).__name__}({'' if options is None else repr(options)})"


def call_all(methods: Sequence[Method], hook: str, *args: Any) -> None:
    for method in methods:
        getattr(method, hook)(*args)
