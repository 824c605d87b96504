"""Where a method's extra time per step goes: torch.profiler over a few steps of HLoRA's general and domain stages
(or EWC's, SAM's, or a plain LoRA step's: ``plain``) at bench_gpu.py's shapes, with each of the method's hooks marked
as its own region.

Issue #15 asks HLoRA's recording and regularizer to cost at most 1.05x a plain step; on an H200 at the 1B shape they
measured 1.066 and 1.137 (bench/RESULTS.md), against ~5 ms of memory traffic estimated from the arithmetic. This
script says which kernels and hooks take the rest, so the next lever is chosen by measurement. It prints, per stage:

* each marked region (``hlora.extra_loss``, ``hlora.before_optimizer_step``, ...): host time and device time of
  the kernels it launched, per profiled step, beside the whole step's;
* the device time by kind of kernel (matmul, attention, the rest: element-wise, norms, reductions, copies) and how
  much of the step the device was busy (all kernels' time over the step's host time: below 1, the host or a sync
  left the device idle);
* the top kernels by device time (``key_averages``, self device time).

Issue #15's step rows (forgetless / Trainer + PEFT ≤ 0.80, MFU ≥ 0.45 at 1B with a bf16 base) were 0.838 and 0.431
with ``compile: true`` on an H100 (session 31). ``--methods plain --base bf16 --batch 16 --compile`` profiles that
step, to say where the time beyond the matmuls goes.

``--tiny`` runs it on the CPU (a smoke test of the code path: ``bash bench/gpu_session.sh`` with SMOKE=1). On a GPU::

    PYTHONPATH=. python3 bench/profile_methods.py --shape 1b --methods hlora --out $OUT/profile
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import make_examples  # noqa: E402
from bench_gpu import PLANS, build, on_cuda, train_config  # noqa: E402

from forgetless.methods import resolve  # noqa: E402
from forgetless.precision import resolve_precision  # noqa: E402
from forgetless.training.hooks import Method  # noqa: E402
from forgetless.training.loop import train_stage  # noqa: E402

HOOKS = ("on_stage_start", "extra_loss", "before_optimizer_step", "after_optimizer_step", "on_stage_end",
         "wrap_forward_backward")
STAGES = {"hlora": ("general", "domain"), "ewc": ("general", "domain"), "sam": ("domain",), "plain": ("general",)}
#: Kernel kinds by name (lower case), the first that matches: attention (flash, cuDNN's and the memory-efficient
#: sdpa kernels, whose names also say wgmma or cutlass), then matmuls (cuBLAS, cuBLASLt's nvjet, CUTLASS).
KINDS = (("attention", ("flash", "sdpa", "fmha", "attention")),
         ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "mma_")))


def mark(plugin: Method, name: str) -> Method:
    """``plugin`` with each of its hooks (those it overrides) inside ``record_function(f"{name}.{hook}")``."""
    for hook in HOOKS:
        own = getattr(type(plugin), hook, None)
        if own is None or own is getattr(Method, hook, None):
            continue
        bound = getattr(plugin, hook)

        @functools.wraps(bound)
        def marked(*args, _bound=bound, _label=f"{name}.{hook}", **kwargs):
            if _label.endswith(".wrap_forward_backward"):  # mark the micro-batch's forward/backward it returns
                wrapped = _bound(*args, **kwargs)
                return functools.wraps(wrapped)(lambda batch: _run(_label.replace("wrap_", ""), wrapped, batch))
            return _run(_label, _bound, *args, **kwargs)

        setattr(plugin, hook, marked)
    return plugin


def _run(label: str, fn, *args, **kwargs):
    with record_function(label):
        return fn(*args, **kwargs)


class StepMark(Method):
    """Steps the profiler after every optimizer step; put it last."""

    def __init__(self, prof: profile) -> None:
        self.prof = prof

    def after_optimizer_step(self, ctx) -> None:
        self.prof.step()


def device_us(event) -> float:
    """The device time of an averaged event (its kernels' time for a CPU region), microseconds."""
    for attr in ("device_time_total", "cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def kind(name: str) -> str:
    """The kind of a kernel by its name: one of :data:`KINDS`' names, else ``other``."""
    low = name.lower()
    return next((k for k, needles in KINDS if any(n in low for n in needles)), "other")


def profile_stage(model, method: str, stage: str, shape: str, precision: str, active: int, out: Path | None,
                  batch: int | None = None, levers: dict | None = None) -> str:
    plan = PLANS[shape]
    batch = batch or plan.batch
    levers = levers or {}
    plugins = [] if method == "plain" else [mark(resolve(method).plugins[0], method)]
    wait, warmup = 1, 1
    total = wait + warmup + active + 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda() else [])
    captured = []  # the active steps' events, when their cycle ends
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                 on_trace_ready=lambda p: captured.append(p.key_averages())) as prof:
        if stage == "domain" and method in ("hlora", "ewc"):  # its state from a short general stage first
            train_stage(model, make_examples(batch * 2, model.config.vocab_size, plan.seq, 3),
                        train_config(2, batch, precision, **levers), plugins, stage="general")
        train_stage(model, make_examples(batch * total, model.config.vocab_size, plan.seq, 4),
                    train_config(total, batch, precision, **levers), [*plugins, StepMark(prof)], stage=stage)
    if not captured:
        raise RuntimeError(f"{method} {stage}: the profiler's active steps did not finish")
    events = captured[0]
    sort = "self_device_time_total" if on_cuda() else "self_cpu_time_total"
    lines = [f"== {method} {stage} stage, {shape}, batch {batch} x {plan.seq}, {levers or 'no levers'}, {active} "
             f"profiled steps (per step: host ms / device ms)"]
    step = next((e for e in events if e.key.startswith("ProfilerStep")), None)
    for e in sorted((e for e in events if e.key.startswith(f"{method}.")), key=lambda e: e.key):
        lines.append(f"  {e.key:40s} {e.cpu_time_total / 1e3 / active:9.2f} / {device_us(e) / 1e3 / active:9.2f}"
                     f"   ({e.count // active} calls per step)")
    kernels = sum(device_us(e) for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if on_cuda() else 0
    if step is not None:
        lines.append(f"  {'whole step (host)':40s} {step.cpu_time_total / 1e3 / step.count:9.2f}")
    if on_cuda():
        lines.append(f"  {'all kernels (device)':40s} {'':9s}   {kernels / 1e3 / active:9.2f}")
        by_kind: dict[str, float] = {}
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + device_us(e)
        for name, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {name + ' kernels':38s} {'':9s}   {us / 1e3 / active:9.2f}   "
                         f"({us / max(kernels, 1e-9):.1%} of the device time)")
        if step is not None:
            busy = kernels / active / max(step.cpu_time_total / step.count, 1e-9)
            lines.append(f"  {'device busy / step':40s} {busy:9.2f}")
    table = events.table(sort_by=sort, row_limit=25, max_name_column_width=60)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{method}_{stage}_{shape}.txt").write_text("\n".join(lines) + "\n\n" + table + "\n")
    return "\n".join(lines) + "\n" + table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1b", help="bench_gpu.py's shapes: 1b (GPU) or tiny")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU: a smoke test of the code path")
    parser.add_argument("--methods", default="hlora", help="comma-separated: hlora, ewc, sam, plain (no method)")
    parser.add_argument("--base", choices=("fp32", "bf16"), default="fp32",
                        help="the base weights' dtype (bench_gpu.py's method rows: fp32; its bf16base rows: bf16)")
    parser.add_argument("--batch", type=int, help="examples per step (default: the shape's method-row batch)")
    parser.add_argument("--compile", action="store_true", help="compile: true (its compilation in the unprofiled "
                                                               "first step)")
    parser.add_argument("--fused-lora", action="store_true", help="fused_lora: true")
    parser.add_argument("--active", type=int, default=3, help="profiled optimizer steps per stage")
    parser.add_argument("--out", help="write each stage's table to this folder")
    args = parser.parse_args(argv)
    shape = "tiny" if args.tiny else args.shape
    if shape not in PLANS:
        parser.error(f"unknown shape {shape!r}; known: {sorted(PLANS)}")
    if shape != "tiny" and not on_cuda():
        parser.error("the GPU shapes need CUDA; --tiny runs the smoke test on the CPU")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in STAGES]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {sorted(STAGES)}")
    if args.tiny:
        torch.set_num_threads(1)
    precision = resolve_precision("auto", "cuda" if on_cuda() else "cpu")
    print(f"device {torch.cuda.get_device_name() if on_cuda() else 'cpu'}; precision {precision}; "
          f"torch {torch.__version__}", flush=True)
    for method in methods:
        for stage in STAGES[method]:
            model = build(shape, torch.bfloat16 if args.base == "bf16" else torch.float32)
            print(profile_stage(model, method, stage, shape, precision, args.active,
                                Path(args.out) if args.out else None, args.batch,
                                ({"compile": True} if args.compile else {})
                                | ({"fused_lora": True} if args.fused_lora else {})), flush=True)
            del model
            if on_cuda():
                torch.cuda.empty_cache()
    if args.tiny:
        print("(--tiny: a CPU smoke test of the code path; none of these numbers is a speed measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
