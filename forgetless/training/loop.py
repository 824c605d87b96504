"""One training stage: a LoRA fine-tune of a model on one list of examples.

Built on ``accelerate``, so the same code runs on a CPU, one GPU, or several under
``accelerate launch``. Anti-forgetting methods never appear here by name: they plug in through the
hooks of :class:`forgetless.training.hooks.Method`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader, RandomSampler
from transformers import get_scheduler

from forgetless.fused_lora import fuse_lora, unfuse_lora
from forgetless.lm import IGNORE_INDEX, restore_train_flags, train_flags
from forgetless.models import (LeverUnavailable, apply_liger, attn_implementation_of, base_model,
                               check_attn_implementation, compile_model, is_quantized, liger_available,
                               set_attn_implementation, uncompile)
from forgetless.precision import autocast, resolve_precision
from forgetless.training import checkpoint
from forgetless.training.batches import (LOSS_INDEX, LengthGroupedSampler, add_loss_index, check_examples, collate,
                                        collate_packed, collated_length, example_row)
from forgetless.training.config import TrainConfig
from forgetless.training.hooks import Batch, Method, StageContext, call_all, options_of
from forgetless.training.logging import StageLog, open_trackers
from forgetless.training.loss import CausalLMLoss


@dataclass
class StageResult:
    stage: str
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # one row per optimizer step
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)


def _pad_id(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            return int(value)
    return 0


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm in a training stage (``on_nonfinite: stop``)."""

    def __init__(self, stage: str, step: int, what: str, value: float) -> None:
        super().__init__(f"non-finite {what} ({value}) at step {step} of the {stage} stage: training diverged "
                         f"(lower the learning rate), or set on_nonfinite: skip_step to drop such steps")
        self.stage, self.step, self.what, self.value = stage, step, what, value


# The collate function's counts, carried in the batch and taken out before the model sees it: (positions that carry
# a loss, i.e. next-token targets whose label is not -100; input tokens). Counted on the CPU while the batch is built,
# so the step's token weights need no device value.
_COUNTS = "forgetless_counts"
_NULL = "forgetless_null"  # marks a null example (see _null_examples): not counted in tokens/s


def _collate_counted(examples: Sequence[dict], pad_token_id: int, packed: bool = False) -> Batch:
    batch = add_loss_index(collate_packed(examples) if packed else collate(examples, pad_token_id))
    batch[_COUNTS] = (int(batch[LOSS_INDEX].numel()), sum(collated_length(e) for e in examples if not e.get(_NULL)))
    return batch


def check_levers(model: torch.nn.Module, config: TrainConfig, device: torch.device | str) -> None:
    """Errors for speed levers this machine or model cannot run, before any work: flash attention or Liger without
    their package or without CUDA (:class:`forgetless.models.LeverUnavailable`), padding-free batches with an
    attention that cannot keep packed examples apart."""
    check_attn_implementation(config.attn_implementation)
    if config.liger:
        liger_available()
        if torch.device(device).type != "cuda":
            raise LeverUnavailable("liger: true needs the run on a CUDA GPU (the Liger kernels are Triton kernels)")
    if config.padding_free:
        attn = config.attn_implementation or attn_implementation_of(model)
        if attn not in PACKED_ATTENTION:
            raise LeverUnavailable(f"padding_free: true needs an attention that keeps packed examples apart by their "
                             f"position ids ({list(PACKED_ATTENTION)}); this model uses {attn!r}")


# Attentions with which transformers (5.x) builds a per-example mask from position_ids when there is no attention mask
# (masking_utils.find_packed_sequence_indices for sdpa and eager; cu_seqlens for flash attention). Checked equal to the
# padded batch's loss and gradients in tests/unit/test_speed_levers.py (sdpa, eager, on the CPU).
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2")


def stage_accelerator() -> Accelerator:
    """The ``Accelerator`` a stage makes for itself: on the GPU when there is one, with accelerate's own mixed
    precision and compile off. forgetless casts (``precision``) and compiles (``compile``) itself; accelerate's
    would wrap the model in a second autocast, so ``precision: fp32`` would run in bf16, and compile the whole model
    on top of ``compile``. Both can come from outside the run: ``accelerate launch --mixed_precision bf16`` and
    ``ACCELERATE_*`` variables (explicit arguments win over those), or a transformers ``Trainer`` that ran earlier in
    the process, whose settings accelerate keeps in a process-wide state that a new ``Accelerator`` inherits. That
    state is dropped (the processes and their group, accelerate's ``PartialState``, are kept) and a warning says so.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DynamoBackend

    state = AcceleratorState._shared_state
    if state:
        precision = state.get("_mixed_precision", "no")
        backend = getattr(state.get("dynamo_plugin"), "backend", DynamoBackend.NO)
        if precision != "no" or backend != DynamoBackend.NO:
            warnings.warn(f"accelerate's process-wide state holds mixed precision {precision!r} and compile backend "
                          f"{str(backend)!r} from an earlier Accelerator or Trainer; forgetless casts and compiles "
                          f"itself (precision, compile), so they are dropped for this stage")
            AcceleratorState._reset_state()
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no" and not _SAID_ENV:
        _SAID_ENV.append(launched)
        warnings.warn(f"ACCELERATE_MIXED_PRECISION={launched} (accelerate launch --mixed_precision) is not used: "
                      f"forgetless's own precision setting decides (precision: auto | bf16 | fp32)")
    # one step per step: forgetless accumulates itself (grad_accum); accelerate's own would divide every loss once more.
    # A plugin, because accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS (DeepSpeed's launcher sets it) over
    # the plain argument
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", dynamo_backend="no",
                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1))


_SAID_ENV: list[str] = []  # the environment's mixed precision is named once per process


_CPU_GROUPS: dict[tuple[int, int], object] = {}  # (world size, default group id): a gloo group for host-side numbers


def _cpu_group() -> object | None:
    """A gloo process group over all processes, for numbers the host already has (None: the default group is gloo).
    Created once per process (a collective call: every process creates it at the same point, its first stage)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    key = (dist.get_world_size(), id(dist.group.WORLD))
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def _global_sum(accelerator: Accelerator, value: int) -> int:
    """``value`` summed over processes. The labelled-token counts are known on the host (the collate function), so
    they are reduced over a CPU (gloo) group: no device work, and no wait for the device's queue each step (an NCCL
    reduce read back with ``.item()`` would drain it at every optimizer step)."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=_cpu_group())
    return int(total[0])


def take_off_mixed_precision(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
    """accelerate's mixed-precision wrapper of a module's ``forward`` (an autocast and a cast of the outputs to
    float32), which a transformers ``Trainer`` run with ``bf16``/``fp16`` leaves on the model it trained: taken off
    for the stage, with a warning, and returned for :func:`put_back_mixed_precision`. Left on, a ``precision: fp32``
    stage ran in bf16 and the loss took the full-logits path (its check of the head saw other logits)."""
    found = []
    for module in model.modules():
        original = module.__dict__.get("_original_forward")
        if original is not None and "forward" in module.__dict__:
            found.append((module, module.__dict__.pop("forward")))
            if getattr(original, "__func__", None) is not getattr(type(module), "forward", None):
                module.forward = original  # else the class's own forward serves, as before the wrapper
    if found:
        warnings.warn("the model's forward carries accelerate's mixed-precision wrapper (left by a transformers "
                      "Trainer run with bf16 or fp16): taken off for this stage, which casts by its own precision "
                      "setting, and put back after it", stacklevel=3)
    return found


def put_back_mixed_precision(found: list[tuple[torch.nn.Module, Any]]) -> None:
    for module, wrapped in found:
        module.forward = wrapped
    found.clear()


def _check_accelerator(accelerator: Accelerator) -> None:
    """A caller's ``Accelerator`` must leave accumulation, casting and compiling to the stage (as
    :func:`stage_accelerator` does): its own accumulation divides every loss again (gradients, logged norm and
    clipping off by that factor), its mixed precision runs an ``fp32`` stage in bf16 (and records fp32)."""
    from accelerate.utils import DynamoBackend

    found = []  # read with defaults: a stand-in for an Accelerator (tests, a subclass) may lack some
    steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    if steps != 1:
        found.append(f"gradient_accumulation_steps={steps} (use grad_accum)")
    mixed = getattr(accelerator, "mixed_precision", "no")
    if mixed != "no":
        found.append(f"mixed_precision={mixed!r} (use precision)")
    backend = getattr(getattr(getattr(accelerator, "state", None), "dynamo_plugin", None), "backend", DynamoBackend.NO)
    if backend != DynamoBackend.NO:
        found.append(f"a dynamo backend {str(backend)!r} (use compile)")
    if found:
        raise ValueError(f"train_stage: the accelerator passed in sets {'; '.join(found)}: the stage accumulates, "
                         f"casts and compiles itself from its TrainConfig; pass an Accelerator() without them, or "
                         f"none")


def train_stage(
    model: torch.nn.Module,
    examples: Sequence[dict],
    config: TrainConfig,
    methods: Sequence[Method] = (),
    stage: str = "domain",
    accelerator: Accelerator | None = None,
    general_examples: Sequence[dict] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> StageResult:
    """Fine-tune the trainable parameters of ``model`` on ``examples`` (``{input_ids, labels}`` dicts).

    The loss of one optimizer step is the mean over all its labelled tokens, across its micro-batches and processes
    (the transformers Trainer's ``num_items_in_batch``): micro-batch ``i`` with ``n_i`` of the step's ``N`` tokens
    back-propagates ``mean_i * n_i * processes / N`` (DDP averages over processes), so batch ``k*b`` on one process,
    ``k`` accumulated micro-batches of ``b``, and ``b`` on each of ``k`` processes give the same gradient. Methods'
    extra terms count once per step. The schedule advances once per optimizer step, and ``epochs`` are epochs of the
    whole data set whatever the number of processes.

    With ``config.save_every`` and a ``checkpoint_dir`` the stage checkpoints every ``save_every`` optimizer steps
    (:mod:`forgetless.training.checkpoint`) and, called again with the same folder, resumes from the newest
    checkpoint written under the same settings, precision, number of processes and LoRA scaling; the folder is removed
    when the stage ends unless ``config.keep_checkpoints``.

    Refused before any work: trainable weights that are not float32 (or float64), and an ``accelerator`` that
    accumulates, casts or compiles (:func:`_check_accelerator`). The mixed-precision wrapper a transformers Trainer
    leaves on the model's ``forward`` is taken off for the stage and put back after it
    (:func:`take_off_mixed_precision`).

    Host syncs: the step's scalars (loss, task loss, gradient norm, and the ``ctx.scalars`` a method leaves as
    tensors, as ``StageContext.log`` keeps them) stay tensors and are read every
    ``config.log_every`` steps, at a checkpoint and at the end (the history rows, trackers and progress line are
    written then, with the same values). The labelled-token counts come from the collate function (CPU); several
    processes all-reduce the step's count (one integer, needed before the backward pass). A non-finite
    step with ``on_nonfinite: stop`` is found at the next read and named (the first such step); the steps after it
    are lost with the run anyway. ``skip_step`` must know before stepping, so it reads the loss and norm every step.
    """
    import time

    started = time.perf_counter()
    if stage not in ("general", "domain"):  # a method acts on the stages it names: any other would silently do nothing
        raise ValueError(f"stage must be 'general' (nu) or 'domain' (mu), got {stage!r}")
    if accelerator is None:
        accelerator = stage_accelerator()
    else:
        _check_accelerator(accelerator)
    set_seed(config.seed)
    precision = resolve_precision(config.precision, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: attach LoRA first (models.attach_lora), or load a saved "
                         "adapter to train on with models.load_adapter(model, folder, trainable=True)")
    low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in (torch.bfloat16, torch.float16)})
    if low:  # AdamW steps in the weights' dtype: at lr 1e-4 most bf16 updates round away (81% of a LoRA A unchanged)
        raise ValueError(f"the trainable parameters must be float32 (found {', '.join(low)}): the optimizer steps in "
                         f"their dtype, and small updates round away in 16 bits. forgetless keeps the LoRA weights in "
                         f"float32 over a bf16 base (models.attach_lora); cast them with "
                         f"`for p in model.parameters(): p.data = p.data.float() if p.requires_grad else p.data`")
    for p in params:  # gradients a caller's earlier (failed) call left would be added to the first step
        p.grad = None
    modes = train_flags(model)  # given back as they came on a failure
    # The model moves to the run's device before any method looks at it: state a method builds at stage start
    # (a loaded importance, a Fisher, a weight snapshot) is then created where the weights are.
    if not is_quantized(model):  # bitsandbytes places a quantized base itself (and refuses .to)
        model.to(accelerator.device)
    # gradient checkpointing is this stage's: turned on here, and off again at its end (unless it was on before)
    checkpointing = config.gradient_checkpointing and not gradient_checkpointing_on(model)
    use_cache = getattr(base_model(model).config, "use_cache", True)
    if checkpointing:
        enable_gradient_checkpointing(model)
    # what the stage changes on the model (checkpointing, fused LoRA, compiled layers, the methods' hooks) is undone
    # when it fails too: a caller that catches the error evaluates or trains the model as it came
    fused: list = []
    compiled: list = []
    log = ctx = None

    def give_back() -> None:  # on a failure: the methods' hooks and checkpointing off (a plugin of an older protocol
        for method in methods if ctx is not None else ():  # may lack on_stage_abort)
            getattr(method, "on_stage_abort", lambda _: None)(ctx)
        if checkpointing:
            disable_gradient_checkpointing(model, use_cache)
        for p in params:  # the failed step's partial gradients
            p.grad = None
        restore_train_flags(modes)  # each module's train/eval flag (dropout) as it came
        put_back_mixed_precision(wrapped)

    wrapped: list = []
    try:
        wrapped = take_off_mixed_precision(model)
        check_levers(model, config, accelerator.device)
        if config.attn_implementation is not None:
            set_attn_implementation(model, config.attn_implementation)
        # its head split is verified on the model as loaded; compile: the chunked cross-entropy's chunks compiled too
        task_loss = CausalLMLoss(model, fused_ce=config.liger, compile_chunks=config.compile)
        if config.liger:
            apply_liger(model)
        fused = fuse_lora(model) if config.fused_lora else []  # before compile, which traces it; undone at the end
        compiled = compile_model(model) if config.compile else []  # undone when the stage ends (evaluation runs eager)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        ctx = StageContext(stage=stage, model=model, optimizer=optimizer, scheduler=None, accelerator=accelerator,
                           config=config, grad_accum=config.grad_accum, general_examples=general_examples)
        _note_model(methods, model)
        call_all(methods, "on_stage_start", ctx)
        for method in methods:
            examples = method.prepare_examples(ctx, examples)
        examples = list(examples)  # an iterator too: read once, here
        if not examples:
            raise ValueError(f"stage {stage!r} has no training examples")
        check_examples(examples)

        generator = torch.Generator().manual_seed(config.seed)
        # grouped by the global batch (every process's micro-batches of a step): an optimizer step takes consecutive
        # examples of the sampler's order whatever the split, so batch kb, k x b accumulated and b on k processes group
        # alike (grouped by the micro-batch, they shared no step)
        global_batch = config.batch_size * config.grad_accum * accelerator.num_processes
        inner = RandomSampler(range(len(examples)), generator=generator) if not config.group_by_length else \
            LengthGroupedSampler([collated_length(e) for e in examples], global_batch, generator)
        nulls = _null_examples(examples, config.batch_size, accelerator.num_processes)
        # the loader's generator as before: shuffled, each epoch's iterator draws its base seed from it (shuffle=True
        # gave it the generator), grouped from the global RNG (the sampler alone had it): the same orders and draws
        loader = DataLoader(examples + nulls, batch_size=config.batch_size, sampler=_PaddedOrder(inner, len(nulls)),
                            generator=None if config.group_by_length else generator,
                            collate_fn=partial(_collate_counted, pad_token_id=_pad_id(model),
                                               packed=config.padding_free))
        raw_optimizer = optimizer
        wrapper, optimizer, loader = accelerator.prepare(task_loss, optimizer, loader)
        # After prepare: the loader is this process's shard, so an epoch is len(loader) micro-batches here. The
        # scheduler is not handed to accelerate, which would step it once per process at every optimizer step.
        windows = accumulation_windows(len(loader), config.grad_accum)
        steps_per_epoch = len(windows)
        total = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
        scheduler = get_scheduler(config.scheduler, raw_optimizer, num_warmup_steps=int(config.warmup_ratio * total),
                                  num_training_steps=total)
        ctx.optimizer, ctx.scheduler, ctx.total_steps = optimizer, scheduler, total
        processes = accelerator.num_processes
        # id(micro-batch) -> (n_i * processes / N, n_i / N_here): its weight in the step's objective, and in the loss
        # logged by this process (the token mean over its own micro-batches)
        weights: dict[int, tuple[float, float]] = {}

        def forward_backward(batch: Batch) -> torch.Tensor:
            weight, logged = weights[id(batch)]
            with autocast(precision, accelerator.device):
                loss = wrapper(**batch)
                if weight == 0:  # no labelled tokens (a truncated answer): its loss is a mean over nothing, NaN. Zero
                    # instead, through the graph, so that the backward still reaches every weight (it had no grad_fn,
                    # an error; several processes also need every one's backward to reach every weight)
                    loss = loss.nan_to_num(0.0) * 0.0
                task = loss * weight
                extras = None
                for method in methods:
                    extra = method.extra_loss(ctx, batch)
                    if extra is not None:
                        extras = extra if extras is None else extras + extra
            total_loss = task if extras is None else task + extras / ctx.grad_accum
            accelerator.backward(total_loss)
            if weight > 0:  # float64 on the device: the same sums as Python floats, without reading the value now
                ctx.scalars["task_loss"] = ctx.scalars.get("task_loss", 0.0) + loss.detach().double() * logged
            return (loss.detach() if extras is None else loss.detach() + extras.detach()) * logged

        fb = forward_backward
        for method in methods:
            fb = method.wrap_forward_backward(ctx, fb)

        result = StageResult(stage=stage, steps=total)
        skipped: list[int] = []
        wrapper.train()
        batches = _endless(loader)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        first, earlier = 0, 0.0  # steps and seconds of a checkpoint this stage resumes from
        resume_from = checkpoint.latest(checkpoint_dir)
        stage_settings = None  # what a checkpoint must share with this stage; computed only where one is written/read
        if checkpoint_dir is not None and (config.save_every or resume_from is not None):
            # precision: what "auto" resolved to (a bf16 GPU's checkpoint is not resumed in fp32 on a CPU)
            # processes: the global batch, the shards and the schedule's length depend on them
            stage_settings = _stage_settings(stage, config, methods) | {"examples": _examples_digest(examples),
                                                                        "start_weights": _weights_digest(named),
                                                                        "precision": precision,
                                                                        "processes": processes,
                                                                        "lora": _lora_settings(model)}
            regrouped = config.group_by_length and global_batch != config.batch_size
            if windows[-1] != config.grad_accum or nulls or regrouped:
                # the data order and steps of session 32 (an epoch's short last window, null examples, groups of the
                # global batch) differ from those a checkpoint written before took here: such a checkpoint is refused
                stage_settings["data_order"] = 2
        if resume_from is not None:
            saved = checkpoint.load(resume_from, named, optimizer, scheduler, stage_settings)
            first, result.history = saved["step"], saved["history"]
            known = saved.get("seconds")  # the stage's time until that checkpoint (None: written by an older version)
            earlier = float(known or 0.0)
            skipped = [int(row["step"]) for row in result.history if row.get("skipped")]
            for _ in range(micro_batches_before(first, windows)):  # the data position: replay the loader (and its RNG)
                next(batches)
            for method, state in zip(methods, saved["methods"], strict=True):
                method.load_stage_state(ctx, state)
            checkpoint.restore_rng(saved)
        main = accelerator.is_main_process
        trackers = open_trackers(config.report_to, _log_dir(config, checkpoint_dir), first) if main else []
        log = StageLog(stage, total, first, config.progress and main, trackers)
        synced = len(result.history)  # rows before this index hold host values
        # rows of ctx.extras["eval_history"] (scores taken while training, EvalEvery) already logged: a resumed stage's
        # restored ones were, by the session that took them
        scored = len(ctx.extras.get("eval_history", [])) if resume_from is not None else 0

        def sync() -> None:  # read the rows' device values; a non-finite step under "stop" ends the stage here
            nonlocal synced, scored
            rows = result.history[synced:]
            synced = len(result.history)
            first_bad = None
            for row in rows:
                row.update({k: float(v) for k, v in row.items() if isinstance(v, torch.Tensor)})
                bad = None if row.get("skipped") else _nonfinite(row["loss"], row.get("grad_norm"))
                if bad is not None and first_bad is None:
                    first_bad = (int(row["step"]), *bad)
            # the loss is each process's own: all stop when one saw a non-finite value (else the others would wait for
            # it in their next collective)
            if processes > 1 and _global_sum(accelerator, int(first_bad is not None)) and first_bad is None:
                first_bad = (int(rows[-1]["step"]) if rows else ctx.step, "loss on another process", math.nan)
            if first_bad is not None:
                raise NonFiniteError(stage, *first_bad)
            scores = ctx.extras.get("eval_history", [])
            log.write(rows, scores[scored:])
            scored = len(scores)

        for step in range(first, total):
            ctx.step, ctx.scalars = step, {}
            ctx.grad_accum = windows[step % steps_per_epoch]  # the epoch's last window may be shorter
            micro_batches = [next(batches) for _ in range(ctx.grad_accum)]
            counts = [b.pop(_COUNTS) for b in micro_batches]
            here = sum(n for n, _ in counts)
            step_tokens = _global_sum(accelerator, here)
            weights.clear()
            weights.update({id(b): (n * processes / step_tokens if step_tokens else 0.0, n / here if here else 0.0)
                            for b, (n, _) in zip(micro_batches, counts)})
            # float64: adding the float32 micro-batch losses gives the Python float sum, bit for bit
            loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for micro, batch in enumerate(micro_batches):
                ctx.micro, ctx.loss_scale = micro, weights[id(batch)][0]
                if micro < ctx.grad_accum - 1:
                    with accelerator.no_sync(wrapper):
                        loss_sum = loss_sum + fb(batch).double()
                else:
                    loss_sum = loss_sum + fb(batch).double()
            call_all(methods, "before_optimizer_step", ctx)
            grad_norm = _clip(accelerator, params, config.max_grad_norm)
            lr = ctx.lr
            bad, loss = None, math.nan
            if not step_tokens:  # no labelled token in the whole step (every answer cut off): nothing to learn, and
                # AdamW's momentum and weight decay would still move the weights; skipped, on every process alike
                bad = ("no labelled token", math.nan)
            elif config.on_nonfinite == "skip_step":  # the decision needs the values now: one read
                loss, norm = _read_now(loss_sum, grad_norm)
                bad = _nonfinite(loss, norm)
                # the loss is this process's own: every process skips when one of them saw a non-finite value
                if processes > 1 and _global_sum(accelerator, int(bad is not None)) and bad is None:
                    bad = ("loss on another process", math.nan)
            if bad is not None:
                skipped.append(step + 1)
                call_all(methods, "on_step_skipped", ctx)
                optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # the schedule advances on a dropped step (a first one too)
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    scheduler.step()
                # the loss is recorded as null when it is not finite: run records stay strict JSON
                result.history.append({"step": step + 1, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                                       "skipped": 1.0})
            else:
                optimizer.step()
                scheduler.step()
                call_all(methods, "after_optimizer_step", ctx)
                optimizer.zero_grad(set_to_none=True)
                row = {"step": step + 1, "loss": loss_sum, "lr": lr, **ctx.scalars}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                result.history.append(row)
            log.step(sum(t for _, t in counts))
            log.pause(ctx.paused_seconds)  # an evaluation (eval.every) is no training time
            ctx.paused_seconds = 0.0
            saving = (checkpoint_dir is not None and config.save_every and (step + 1) % config.save_every == 0
                      and step + 1 < total)
            if saving or (step + 1) % config.log_every == 0 or step + 1 == total:
                sync()  # on every process alike: a non-finite step stops them all at the same step
            if saving and main:
                writing = time.perf_counter()
                checkpoint.save(checkpoint_dir, step + 1, named, optimizer, scheduler, result.history,
                                [method.stage_state(ctx) for method in methods], stage_settings,
                                seconds=earlier + time.perf_counter() - started)
                log.pause(time.perf_counter() - writing)  # the next interval's throughput leaves the write out
        sync()  # nothing left when the loop ran; a stage resumed at its end has nothing either
    except BaseException:
        give_back()
        raise
    finally:
        if log is not None:
            log.close()
        uncompile(compiled)
        unfuse_lora(fused)
    ctx.step = total
    try:
        call_all(methods, "on_stage_end", ctx)  # a Fisher computed here still recomputes activations
    except BaseException:  # the model as it came here too (an EWC Fisher without a labelled token, say)
        give_back()
        raise
    if checkpointing:  # the next stage (its own config) and the evaluations get the model as it came
        disable_gradient_checkpointing(model, use_cache)
    put_back_mixed_precision(wrapped)
    wrapper.eval()
    result.seconds = earlier + time.perf_counter() - started  # a resumed stage: its earlier sessions' time too
    result.extras = ctx.extras
    if resume_from is not None:  # where it went on from, and the time before that (in result.seconds too)
        result.extras |= {"resumed_from_step": first,
                          "seconds_before_resume": round(earlier, 3) if known is not None else None}
    if skipped:
        result.extras["skipped_steps"] = skipped
    if not config.keep_checkpoints and accelerator.is_main_process:
        checkpoint.remove(checkpoint_dir)
    return result


def _note_model(methods: Sequence[Method], model: torch.nn.Module) -> None:
    """Methods carry state from one stage to the next of the same model (HLoRA's importance and dW_nu, EWC's Fisher,
    WiSE-FT's theta_nu): a method object used before on another model would bring that model's state to this one,
    silently. Say so (a model loaded again between the stages is a new object too: then the warning is moot)."""
    import weakref

    for method in methods:
        last = getattr(method, "_forgetless_model", None)
        if last is not None and last() is not model:
            warnings.warn(f"this {type(method).__name__} plugin was used with another model object before: any state "
                          f"it kept from that model (importance, Fisher, a weight snapshot) is used for this one; "
                          f"resolve() fresh plugins for a run on another model", stacklevel=3)
        try:
            method._forgetless_model = weakref.ref(model)
        except (AttributeError, TypeError):  # a method object that takes no attributes: nothing to compare
            pass


def _examples_digest(examples: Sequence[dict]) -> str:
    """The stage's examples (as the methods prepared them), token ids and labels, as a digest."""
    import hashlib
    from array import array

    h = hashlib.sha1()
    for example in examples:
        ids, labels = example_row(example)  # as collated: an example's own padding dropped (the same for one without)
        h.update(array("q", ids).tobytes())
        h.update(array("q", labels).tobytes())
        h.update(b"|")
    return f"{len(examples)} examples, {h.hexdigest()[:16]}"


def _weights_digest(named: Sequence[tuple[str, torch.nn.Parameter]]) -> str:
    """The trainable weights the stage starts from, as a digest (their bytes, on the host)."""
    import hashlib

    h = hashlib.sha1()
    for name, param in named:
        h.update(name.encode())
        h.update(param.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _stage_settings(stage: str, config: TrainConfig, methods: Sequence[Method]) -> dict[str, Any]:
    """What a checkpoint must share with the stage that resumes from it: the stage, the training settings that change
    its numbers (not progress, logging or speed levers: ``NO_NUMBERS``) and the methods with their options."""
    from dataclasses import fields

    from forgetless.training.config import NO_NUMBERS

    out: dict[str, Any] = {"stage": stage}
    out |= {f"train.{f.name}": getattr(config, f.name) for f in fields(config) if f.name not in NO_NUMBERS}
    for i, method in enumerate(methods):
        options = options_of(method)
        out[f"method{i}"] = type(method).__name__ + (f" {options}" if options is not None else "")
    return out


def _lora_settings(model: torch.nn.Module) -> str:
    """What of the model's LoRA configuration changes the numbers and not the trainable shapes (those are checked by
    name and shape): the scaling (alpha, rsLoRA, patterns) and the dropout. "" for a model without PEFT's config."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return ""
    keys = ("lora_alpha", "use_rslora", "alpha_pattern", "rank_pattern", "lora_dropout")
    return repr(sorted((name, [(k, getattr(c, k, None)) for k in keys]) for name, c in configs.items()))


def _clip(accelerator: Accelerator, params: list[torch.nn.Parameter],
          max_norm: float | None) -> torch.Tensor | float | None:
    """Clip to ``max_norm`` and return the gradient norm before clipping, unread. Without clipping the norm is still
    taken (not clipped): the non-finite check needs it, as the loss alone misses a gradient that is not finite
    where the loss is (SAM's gradient comes from the perturbed weights); None only when no weight has a gradient."""
    if max_norm is not None:
        return accelerator.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)  # the step's whole gradient (all-reduced already under several processes)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _read_now(loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> tuple[float, float | None]:
    """The step's loss and gradient norm as Python floats, in one device read."""
    if not isinstance(grad_norm, torch.Tensor):
        return float(loss), None if grad_norm is None else float(grad_norm)
    both = torch.stack([loss, grad_norm.detach().to(loss.device, torch.float64)]).tolist()
    return both[0], both[1]


def _log_dir(config: TrainConfig, checkpoint_dir: str | Path | None) -> Path:
    """``logging_dir``, else OUTPUT/logs beside OUTPUT/checkpoints; one folder per run (RUN_ID, named by the checkpoint
    folder OUTPUT/checkpoints/RUN_ID/STAGE that ``forgetless run`` passes)."""
    run = Path(checkpoint_dir).parent if checkpoint_dir is not None else None
    base = Path(config.logging_dir) if config.logging_dir else run.parent.parent / "logs" if run else Path("logs")
    return base / run.name if run else base


def _nonfinite(loss: float, grad_norm: float | None) -> tuple[str, float] | None:
    if not math.isfinite(loss):
        return "loss", loss
    if grad_norm is not None and not math.isfinite(grad_norm):
        return "gradient norm", grad_norm
    return None


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (transformers' non-reentrant checkpointing): memory for time.

    Non-reentrant checkpointing keeps the autograd graph of the first forward, so hooks on module outputs (HLoRA's
    exact estimator) fire once per backward, and the frozen embeddings need no ``requires_grad`` trick.
    transformers 5 calls it activation checkpointing (the old names warn); both are served.
    """
    base = base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    hooked = bool(getattr(base, "_require_grads_hooks", None))
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also hooks the input embeddings' output to require grad, a hook its disable leaves on the model:
    # remembered when it is this call's, so that disabling removes it
    base._forgetless_require_grads = not hooked and bool(getattr(base, "_require_grads_hooks", None))
    base.config.use_cache = False


def gradient_checkpointing_on(model: torch.nn.Module) -> bool:
    base = base_model(model)
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(base, name, False))


def disable_gradient_checkpointing(model: torch.nn.Module, use_cache: bool = True) -> None:
    """Undo :func:`enable_gradient_checkpointing`, with ``config.use_cache`` set back to ``use_cache``."""
    base = base_model(model)
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()
    if base.__dict__.pop("_forgetless_require_grads", False) and hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    base.config.use_cache = use_cache


class _PaddedOrder(torch.utils.data.Sampler):
    """``inner``'s order of the real examples, then the ``extra`` null examples after them (indices from
    ``len(inner)``). Its ``generator`` is ``inner``'s: accelerate keeps that one alike on every process."""

    def __init__(self, inner: torch.utils.data.Sampler, extra: int) -> None:
        self.inner, self.extra, self.generator = inner, extra, inner.generator

    def __iter__(self):
        yield from self.inner
        yield from range(len(self.inner), len(self.inner) + self.extra)

    def __len__(self) -> int:
        return len(self.inner) + self.extra


def _null_examples(examples: list[dict], batch_size: int, processes: int) -> list[dict]:
    """Examples without a labelled token that fill the epoch up to a multiple of ``batch_size`` x ``processes``.
    Under several processes accelerate otherwise evens out the last step with examples from the epoch's start,
    trained twice, so 2 processes trained other examples than 1 with the same global batch. A null
    example has no labelled token, so it weighs nothing in the step's token mean (the shortest example's tokens:
    the least padding). None on one process: its last, shorter batch is the one transformers' Trainer takes."""
    missing = -len(examples) % (batch_size * processes)
    if processes == 1 or not missing:
        return []
    shortest = min(examples, key=collated_length)
    return [dict(shortest, labels=[IGNORE_INDEX] * len(shortest["input_ids"]), **{_NULL: True})
            for _ in range(missing)]


def accumulation_windows(micro_batches: int, grad_accum: int) -> list[int]:
    """The micro-batches of each optimizer step of an epoch of ``micro_batches``: ``grad_accum`` each, the last one
    the rest when they do not divide (as transformers' Trainer steps on an epoch's last, shorter window). The
    step's loss is the token mean over its window whatever its length, so batch ``k b`` equals ``k`` x ``b``
    accumulated on every step, the last of an epoch included. Dropping the rest (as before session 32) left up to
    ``grad_accum - 1`` micro-batches of every epoch untrained, or made a window straddle two epochs."""
    full, rest = divmod(max(1, micro_batches), grad_accum)
    return [grad_accum] * full + ([rest] if rest else [])


def micro_batches_before(step: int, windows: list[int]) -> int:
    """How many micro-batches the steps before ``step`` (0-based) took, epochs of ``windows`` after one another."""
    epochs, within = divmod(step, len(windows))
    return epochs * sum(windows) + sum(windows[:within])


def _endless(loader: DataLoader):
    while True:
        yield from loader
