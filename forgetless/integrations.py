"""forgetless methods inside the transformers ``Trainer`` and TRL's ``SFTTrainer``.

The methods are the same plugins as in forgetless's own loop (:mod:`forgetless.training.loop`), driven through the
same hooks of :class:`~forgetless.training.hooks.Method`, in the order given, without asking which method they are:

===========================  =====================================================================================
hook                         where the Trainer runs it
===========================  =====================================================================================
``on_stage_start``           ``train()``, before the Trainer builds its data loader (no optimizer exists yet)
``prepare_examples``         ``train()``, on ``train_dataset`` (a list or a map-style ``datasets.Dataset``)
``wrap_forward_backward``    ``train()``, once; ``training_step`` (forward + backward of one micro-batch) goes
                             through the wrapped function, so SAM runs two passes of the Trainer's own step
``extra_loss``               ``compute_loss``: added to the Trainer's loss, once per optimizer step
``before_optimizer_step``    before the Trainer clips the gradients (``_clip_grad_norm``; under fp16 they are
                             unscaled first), or in ``on_pre_optimizer_step`` when it does not clip
                             (``max_grad_norm`` 0; the Trainer has unscaled them for its norm)
``after_optimizer_step``     ``on_optimizer_step`` (the gradients are still there; the scheduler has not stepped
                             yet, unlike the loop: no method reads the learning rate there)
``on_step_skipped``          ``on_optimizer_step`` of a step an fp16 overflow skipped (the loss scale fell)
``on_stage_end``             ``on_train_end``
``on_stage_abort``           ``train()`` raised (an error, Ctrl-C) after ``on_stage_start``
===========================  =====================================================================================

The :class:`~forgetless.training.hooks.StageContext` holds the Trainer's model (unwrapped), optimizer, scheduler and
accelerator, with the loop's meanings: ``ctx.step`` is the number of optimizer steps taken (``state.global_step``),
``ctx.grad_accum`` the number of micro-batches of the current step, ``ctx.loss_scale`` the weight of the current
micro-batch's mean task loss in what is back-propagated (``n_i * processes / N`` when the loss is normalized by the
step's ``N`` labelled tokens, ``1 / grad_accum`` when the Trainer divides each micro-batch's mean), and ``ctx.config``
a :class:`~forgetless.training.config.TrainConfig` mirroring the ``TrainingArguments`` (seed, learning rate, batch
size, ...). The scalars methods log (``reg_loss``, ``ewc_penalty``, ``sam_rho``, ...) join the Trainer's logs,
averaged over the steps since the last log.

A general stage's state (HLoRA's importance, EWC's Fisher, WiSE-FT's theta_nu) carries to a later Trainer run as in
the runner: :meth:`save_method_state` after the general run, ``state_from=`` in the domain run (fresh plugins from
``resolve`` read it at the domain stage's start). What a method gathers during a stage (``Method.stage_state``:
HLoRA's running path integral) is written into each of the Trainer's checkpoints (``checkpoint-N/``
:data:`STAGE_STATE_FILE`) and read back by ``train(resume_from_checkpoint=...)``, after the Trainer has restored its
weights: a resumed stage records the importance an uninterrupted one does. As in the loop, resume with the model as
it was at the stage's start (freshly loaded, fresh plugins): ``on_stage_start`` runs again from those weights.

Usage::

    methods = resolve(["hlora"]).plugins
    trainer = ForgetlessTrainer(model=model, args=args, train_dataset=general, methods=methods, stage="general")
    trainer.train()
    trainer.save_method_state("general-state")

    SFT = with_methods(trl.SFTTrainer)      # any Trainer subclass
    SFT(model=model, args=sft_args, train_dataset=domain, methods=resolve(["hlora"]).plugins, stage="domain",
        state_from="general-state").train()
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from forgetless.lm import IGNORE_INDEX
from forgetless.training.config import SCHEDULERS, TrainConfig
from forgetless.training.hooks import Batch, Method, StageContext, call_all

STAGES = ("general", "domain")
STAGE_STATE_FILE = "forgetless_stage_state.pt"  # the methods' stage state, in each Trainer checkpoint folder


def train_config(args: Any) -> TrainConfig:
    """The :class:`TrainConfig` that ``TrainingArguments`` amount to, for methods that read ``ctx.config`` (seed)."""
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    return TrainConfig(epochs=float(args.num_train_epochs), max_steps=args.max_steps if args.max_steps > 0 else None,
                       batch_size=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
                       lr=args.learning_rate, weight_decay=args.weight_decay,
                       scheduler=scheduler if scheduler in SCHEDULERS else TrainConfig.scheduler,
                       max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
                       precision="bf16" if args.bf16 else "fp32", seed=args.seed, progress=False,
                       gradient_checkpointing=bool(getattr(args, "activation_checkpointing", None)
                                                   or getattr(args, "gradient_checkpointing", False)))


class MethodsMixin:
    """Runs forgetless methods inside a ``transformers.Trainer`` (sub)class; see the module docstring.

    Keyword arguments on top of the Trainer's: ``methods`` (plugins, e.g. ``resolve([...]).plugins``), ``stage``
    (``"general"`` or ``"domain"``), ``general_examples`` (the general-stage examples, for ``replay`` and for EWC
    without a general stage), ``state_from`` (a folder written by :meth:`save_method_state` in a general run).
    """

    def __init__(self, *args: Any, methods: Sequence[Method] = (), stage: str = "domain",
                 general_examples: Sequence[dict] | None = None, state_from: str | Path | None = None,
                 **kwargs: Any) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
        super().__init__(*args, **kwargs)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0 and not hasattr(Trainer, "_clip_grad_norm"):
            raise RuntimeError("this transformers version clips gradients inside its loop, before any hook could see "
                               "them: use transformers >= 5 (Trainer._clip_grad_norm) or max_grad_norm=0")
        self.methods = list(methods)
        sharded = str(getattr(self.accelerator.distributed_type, "value", self.accelerator.distributed_type))
        if self.methods and sharded in ("DEEPSPEED", "FSDP"):
            # DeepSpeed steps the optimizer inside backward (before any hook of ours) and ZeRO/FSDP shard the gradients
            # and LoRA factors the methods read: HLoRA would record zero importance, SAM perturb with a stepped weight
            raise ValueError(f"forgetless methods ({', '.join(type(m).__name__ for m in self.methods)}) run in one "
                             f"process or under DDP, not under {sharded}: it steps or shards the gradients and LoRA "
                             "factors where the methods cannot see them. Launch without a DeepSpeed/FSDP config "
                             "(accelerate launch --multi_gpu) or train without methods")
        names = ", ".join(type(m).__name__ for m in self.methods)
        if self.methods and getattr(self, "model_init", None) is not None:
            # train() builds a new model from model_init (a hyperparameter search's trials) after the methods were
            # put on self.model: HLoRA recorded zero importance, the regularizers and SAM acted on another model
            raise ValueError(f"forgetless methods ({names}) are put on the model the Trainer is given: pass model=, "
                             "not model_init= (a hyperparameter search: one ForgetlessTrainer per trial)")
        if self.methods and getattr(self.args, "n_gpu", 1) > 1:
            # a plain `python` run on several GPUs: the Trainer wraps the model in nn.DataParallel, whose replicas'
            # hooks write one buffer from several devices, and whose loss is averaged where the methods' terms are not
            raise ValueError(f"forgetless methods ({names}) run in one process or under DDP, not under "
                             f"nn.DataParallel ({self.args.n_gpu} GPUs in one process): launch with "
                             "`accelerate launch --multi_gpu` (or torchrun), or make one GPU visible")
        self.stage, self.general_examples = stage, general_examples
        if state_from is not None:
            for method in self.methods:
                method.load_state(Path(state_from))
        self.stage_context: StageContext | None = None
        self._forward_backward = None
        self._pass: tuple[torch.nn.Module, Any, tuple, dict] | None = None  # the micro-batch's step arguments
        self._before_done: int | None = None  # the step whose before_optimizer_step hooks have run
        self._scalars: dict[str, list[float]] = {}
        self._resume_dir: Path | None = None  # the checkpoint train() resumes from
        self.add_callback(_HookCallback(self))

    def save_method_state(self, directory: str | Path) -> None:
        """Every method's state for a later stage (HLoRA importance, EWC Fisher, ...), written to ``directory`` by the
        process that saves (``args.should_save``: the main one; every process holds the same state), the others
        waiting until it is there. Under ``accelerate launch`` every process calls it (two wrote one file at once)."""
        directory = Path(directory)
        if self.args.should_save:
            directory.mkdir(parents=True, exist_ok=True)
            for method in self.methods:
                method.save_state(directory)
        self.accelerator.wait_for_everyone()  # a process that goes on to load it finds it whole

    # ------------------------------------------------------------------------------------------ the stage
    def train(self, *args: Any, **kwargs: Any):
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if isinstance(resume, bool):  # as the Trainer resolves it (it raises its own error when there is none)
            from transformers.trainer_utils import get_last_checkpoint

            resume = get_last_checkpoint(self.args.output_dir) if resume else None
        self._resume_dir = Path(resume) if resume else None
        ctx = StageContext(stage=self.stage, model=self.model, optimizer=self.optimizer, scheduler=self.lr_scheduler,
                           accelerator=self.accelerator, config=train_config(self.args),
                           grad_accum=self.args.gradient_accumulation_steps, general_examples=self.general_examples)
        self.stage_context, self._before_done, self._scalars = ctx, None, {}
        self._micro_of = None  # the step whose micro-batches ctx.micro counts
        self._stage_ended = False  # on_stage_end has run (on_train_end)
        call_all(self.methods, "on_stage_start", ctx)
        given = self.train_dataset  # the caller's examples, put back after the stage: a second train() (a retry, a
        try:  # resume) prepares them again, not the already mixed set (replay's share compounded: 8, 16, 32 examples)
            examples = given
            for method in self.methods:
                examples = method.prepare_examples(ctx, examples)
            if examples is not given:
                self.train_dataset = examples
            fb = self._one_pass
            for method in self.methods:
                fb = method.wrap_forward_backward(ctx, fb)
            self._forward_backward = fb
            return super().train(*args, **kwargs)
        except BaseException:  # an error, Ctrl-C: the methods take back what on_stage_start put on the model (hooks),
            if not self._stage_ended:  # as the loop does (not after on_stage_end: an error of a later callback's)
                for method in self.methods:  # a plugin of an older protocol may lack on_stage_abort
                    getattr(method, "on_stage_abort", lambda _: None)(ctx)
            raise
        finally:
            self.train_dataset = given

    def _save_stage_state(self, folder: Path) -> None:
        """The methods' stage state into the checkpoint folder the Trainer has just written (main process)."""
        ctx = self.stage_context
        states = [{k: v.detach().cpu() for k, v in method.stage_state(ctx).items()} for method in self.methods]
        tmp = folder / f"{STAGE_STATE_FILE}.tmp"
        torch.save({"stage": self.stage, "methods": [type(m).__name__ for m in self.methods], "states": states}, tmp)
        tmp.replace(folder / STAGE_STATE_FILE)

    def _load_stage_state(self, folder: Path) -> None:
        """Restore what :meth:`_save_stage_state` wrote into ``folder``; ValueError when a method keeps stage state
        and the checkpoint has none for it (written without these methods, or by an older forgetless)."""
        path = folder / STAGE_STATE_FILE
        # the methods with state at this stage (HLoRA's path integral in the general stage; none in the domain stage,
        # whose checkpoints written before session 33, without the file, resume as they did)
        keeping = [type(m).__name__ for m in self.methods if m.stage_state(self.stage_context)]
        if not path.is_file():
            if keeping:
                raise ValueError(f"{folder}: no {STAGE_STATE_FILE}, the running state of {', '.join(keeping)} at "
                                 f"that checkpoint: resuming would restart it mid-stage; train the stage again")
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        names = [type(m).__name__ for m in self.methods]
        if saved.get("stage") != self.stage or saved.get("methods") != names:
            raise ValueError(f"{path}: written by the {saved.get('stage')} stage of {saved.get('methods')}, not by "
                             f"the {self.stage} stage of {names}")
        for method, state in zip(self.methods, saved["states"], strict=True):
            method.load_stage_state(self.stage_context, state)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None,
                      *args: Any, **kwargs: Any) -> torch.Tensor:
        ctx = self.stage_context
        # the micro-batches of this step (fewer in an epoch's last step), set by the Trainer before it calls us
        ctx.grad_accum = int(getattr(self, "current_gradient_accumulation_steps", ctx.config.grad_accum))
        ctx.micro = ctx.micro + 1 if self._micro_of == ctx.step else 0  # ctx.step is set as each step begins
        self._micro_of = ctx.step
        ctx.loss_scale = self._loss_scale(inputs, num_items_in_batch)
        if ctx.micro == 0:  # under fp16: the scale every backward of this step is multiplied by (update() comes after
            scaler = self._scaler()  # the step; SAM's logged norm, HLoRA's exact estimator): one host read per step
            ctx.grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        self._pass = (model, num_items_in_batch, args, kwargs)
        try:
            return self._forward_backward(inputs)
        finally:
            self._pass = None

    def _one_pass(self, batch: Batch) -> torch.Tensor:
        """The Trainer's own forward and backward of one micro-batch (SAM calls it twice)."""
        model, num_items_in_batch, args, kwargs = self._pass
        return super().training_step(model, batch, num_items_in_batch, *args, **kwargs)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._pass is None:  # evaluation: the task loss only
            return out
        extras = None
        for method in self.methods:
            extra = method.extra_loss(self.stage_context, inputs)
            if extra is not None:
                extras = extra if extras is None else extras + extra
        if extras is None:
            return out
        # Once per optimizer step, as in the loop: a loss the Trainer divides by the step's micro-batches gets the
        # whole term, a loss already normalized over the step gets term / micro-batches.
        share = extras if self._trainer_divides(num_items_in_batch) else extras / self.stage_context.grad_accum
        if return_outputs:
            loss, outputs = out
            return loss + share, outputs
        return out + share

    def _clip_grad_norm(self, model: torch.nn.Module):
        # The hooks see the step's gradients before clipping, as in the loop (the Trainer calls
        # on_pre_optimizer_step only after it has clipped), and unscaled under fp16: accelerate unscales them only
        # inside its clipping, so they are unscaled here first and its own unscaling skipped (torch refuses a second).
        scaler = self._scaler()
        if scaler is None:
            self._before_optimizer_step()
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        self._before_optimizer_step()
        self.accelerator.unscale_gradients = _unscaled_already
        try:
            return super()._clip_grad_norm(model)
        finally:
            del self.accelerator.unscale_gradients  # the method again

    def _scaler(self):
        """The fp16 GradScaler that scales this Trainer's backward (accelerate's, under fp16 mixed precision), else
        None."""
        acc = self.accelerator
        if getattr(acc, "scaler", None) is not None and acc.native_amp and acc.mixed_precision == "fp16":
            return acc.scaler
        return None

    def _before_optimizer_step(self) -> None:
        ctx = self.stage_context
        if self._before_done != ctx.step:
            self._before_done = ctx.step
            call_all(self.methods, "before_optimizer_step", ctx)  # ctx.grad_scale: read at the step's first micro

    def _step_was_skipped(self) -> bool:
        """Whether the optimizer step just taken was skipped for an fp16 overflow. accelerate's flag misses it with a
        fused optimizer (AdamW ``fused``, the Trainer's default since torch 2.8: GradScaler hands it the scale and it
        skips inside); the scale tells either way: ``update()`` lowers it exactly when it found inf or NaN."""
        if self.accelerator.optimizer_step_was_skipped:
            return True
        scaler = self._scaler()
        return scaler is not None and float(scaler.get_scale()) < self.stage_context.grad_scale  # read before the step

    # ---------------------------------------------------------------------------------------- loss scale
    def _trainer_divides(self, num_items_in_batch: Any) -> bool:
        """Whether ``Trainer.training_step`` divides the loss by the step's number of micro-batches (its rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                      or self.compute_loss_func is not None)
        return not scaled

    def _loss_scale(self, inputs: dict[str, Any], num_items_in_batch: Any) -> float:
        """The weight of this micro-batch's mean task loss in the loss the Trainer back-propagates."""
        if self._trainer_divides(num_items_in_batch) or num_items_in_batch is None:
            return 1.0 / self.stage_context.grad_accum
        labels = inputs.get("shift_labels")
        labels = inputs["labels"][..., 1:] if labels is None else labels
        here = int((labels != IGNORE_INDEX).sum())
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        total = float(num_items_in_batch.sum() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
        return here * processes / total if total > 0 else 0.0

    # ------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._scalars:  # a training log: the methods' scalars since the last one
            logs.update({k: float(sum(v) / len(v)) for k, v in self._scalars.items()})  # host floats: log_history is JSON
            self._scalars = {}
        super().log(logs, *args, **kwargs)


class _HookCallback(TrainerCallback):
    """The hooks that fall between the Trainer's own steps."""

    def __init__(self, trainer: MethodsMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        ctx, trainer = self.trainer.stage_context, self.trainer
        ctx.optimizer, ctx.scheduler, ctx.total_steps = trainer.optimizer, trainer.lr_scheduler, state.max_steps
        ctx.model, ctx.accelerator = trainer.model, trainer.accelerator
        if trainer._resume_dir is not None:  # the Trainer has restored the checkpoint's weights and optimizer
            ctx.step = state.global_step
            trainer._load_stage_state(trainer._resume_dir)

    def on_save(self, args, state, control, **kwargs) -> None:
        # where the Trainer writes the checkpoint: the main process, or each node's first with save_on_each_node
        if state.is_world_process_zero or (getattr(args, "save_on_each_node", False) and state.is_local_process_zero):
            trainer = self.trainer
            # the run folder the Trainer saved into (a hyperparameter search's trial has its own: run-ID)
            run_dir = Path(trainer._get_output_dir(trial=getattr(trainer, "_trial", None)))
            trainer._save_stage_state(run_dir / f"checkpoint-{state.global_step}")

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        ctx = self.trainer.stage_context
        ctx.step, ctx.scalars = state.global_step, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.trainer._before_optimizer_step()  # no-op when the clipping already ran them

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        trainer = self.trainer
        if trainer._step_was_skipped():  # fp16 overflow: no step, as the loop's skip_step
            call_all(trainer.methods, "on_step_skipped", trainer.stage_context)
            return
        ctx = trainer.stage_context
        call_all(trainer.methods, "after_optimizer_step", ctx)
        for name, value in ctx.scalars.items():
            trainer._scalars.setdefault(name, []).append(value)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        ctx = self.trainer.stage_context
        ctx.step = state.global_step
        call_all(self.trainer.methods, "on_stage_end", ctx)
        self.trainer._stage_ended = True  # an error after this point is not the stage's: no on_stage_abort


def _unscaled_already(optimizer: Any = None) -> None:
    """In place of ``Accelerator.unscale_gradients`` while the Trainer clips gradients the mixin has unscaled."""


@cache
def with_methods(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` (``Trainer`` or a subclass such as ``trl.SFTTrainer``) running forgetless methods."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"with_methods needs a transformers.Trainer subclass, got {trainer_class!r}")
    return type(f"Forgetless{trainer_class.__name__}", (MethodsMixin, trainer_class),
                {"__doc__": f"{trainer_class.__name__} with forgetless methods (forgetless.integrations)."})


ForgetlessTrainer = with_methods(Trainer)

__all__ = ["ForgetlessTrainer", "MethodsMixin", "train_config", "with_methods"]
