"""One training stage: a LoRA fine-tune of a model on one list of examples.

Built on ``accelerate``, so the same code runs on a CPU, one GPU, or several under
``accelerate launch``. Anti-forgetting methods never appear here by name: they plug in through the
hooks of :class:`forgetless.training.hooks.Method`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from forgetless.precision import autocast, resolve_precision
from forgetless.training.batches import collate
from forgetless.training.config import TrainConfig
from forgetless.training.hooks import Batch, Method, StageContext, call_all
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


def train_stage(
    model: torch.nn.Module,
    examples: Sequence[dict],
    config: TrainConfig,
    methods: Sequence[Method] = (),
    stage: str = "domain",
    accelerator: Accelerator | None = None,
    general_examples: Sequence[dict] | None = None,
) -> StageResult:
    """Fine-tune the trainable parameters of ``model`` on ``examples`` (``{input_ids, labels}`` dicts)."""
    import time

    started = time.perf_counter()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    precision = resolve_precision(config.precision, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (attach LoRA first)")
    # The model moves to the run's device before any method looks at it: state a method builds at stage start
    # (a loaded importance, a Fisher, a weight snapshot) is then created where the weights are.
    model.to(accelerator.device)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ctx = StageContext(stage=stage, model=model, optimizer=optimizer, scheduler=None, accelerator=accelerator,
                       config=config, grad_accum=config.grad_accum, general_examples=general_examples)
    call_all(methods, "on_stage_start", ctx)
    for method in methods:
        examples = method.prepare_examples(ctx, examples)
    if not examples:
        raise ValueError(f"stage {stage!r} has no training examples")

    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(list(examples), batch_size=config.batch_size, shuffle=True, generator=generator,
                        collate_fn=partial(collate, pad_token_id=_pad_id(model)))
    steps_per_epoch = max(1, len(loader) // config.grad_accum)
    total = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=int(config.warmup_ratio * total),
                              num_training_steps=total)
    wrapper, optimizer, loader, scheduler = accelerator.prepare(CausalLMLoss(model), optimizer, loader, scheduler)
    ctx.optimizer, ctx.scheduler, ctx.total_steps = optimizer, scheduler, total

    def forward_backward(batch: Batch) -> torch.Tensor:
        with autocast(precision, accelerator.device):
            loss = wrapper(**batch)
            total_loss = loss
            for method in methods:
                extra = method.extra_loss(ctx, batch)
                if extra is not None:
                    total_loss = total_loss + extra
        accelerator.backward(total_loss / ctx.grad_accum)
        ctx.scalars["task_loss"] = ctx.scalars.get("task_loss", 0.0) + float(loss.detach()) / ctx.grad_accum
        return total_loss.detach()

    fb = forward_backward
    for method in methods:
        fb = method.wrap_forward_backward(ctx, fb)

    result = StageResult(stage=stage, steps=total)
    wrapper.train()
    batches = _endless(loader)
    bar = tqdm(total=total, desc=f"train {stage}", disable=not config.progress or not accelerator.is_main_process)
    for step in range(total):
        ctx.step, ctx.scalars = step, {}
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            batch = next(batches)
            if micro < config.grad_accum - 1:
                with accelerator.no_sync(wrapper):
                    loss_sum += float(fb(batch))
            else:
                loss_sum += float(fb(batch))
        call_all(methods, "before_optimizer_step", ctx)
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        lr = ctx.lr
        optimizer.step()
        scheduler.step()
        call_all(methods, "after_optimizer_step", ctx)
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": loss_sum / config.grad_accum, "lr": lr, **ctx.scalars}
        result.history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    bar.close()
    ctx.step = total
    call_all(methods, "on_stage_end", ctx)
    wrapper.eval()
    result.seconds = time.perf_counter() - started
    result.extras = ctx.extras
    return result


def _endless(loader: DataLoader):
    while True:
        yield from loader
