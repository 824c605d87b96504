"""Issue #15's table on one GPU in one run: forgetless beside transformers Trainer + PEFT, MFU, and the cost of
HLoRA, SAM and EWC's Fisher, each as a ratio of things measured side by side.

Models: Llama-shaped, random weights built from a config (speed and memory do not depend on the values):
``1b`` (TinyLlama-1.1B shape), ``8b`` (Llama-3-8B shape), ``tiny`` (a 4-layer toy, for ``--tiny``). LoRA r=16,
alpha 32, no dropout, on all seven linear projections. Precision: ``auto`` (bf16 autocast on CUDA) on both sides.

Rows (``--shapes 1b,8b``; the method rows run on the 1B shape only, as in the issue):

* ``step_vs_trainer_fp32base`` (1B, 8x1024, fp32 base): forgetless step / Trainer+PEFT step. The two sides are
  separate trainings on the very same model object, alternated (F T T F ...) over ``--rounds``; each side keeps
  the best of its per-round means, so machine drift hits both alike. A round's mean step time is one span over
  its timed steps, with the device synchronized at the span's ends only (issue #15's table synchronized after
  every step; that hides what a loop free of host syncs overlaps, for both sides).
* ``step_vs_trainer_bf16base`` (1B at 16x1024, 8B at 4x1024, bf16 base): as above, with a bf16 base.
* ``mfu_fp32base`` (1B, 8x1024), ``mfu_bf16base`` (the bf16-base batches above), from the same runs: model FLOP
  rate / bf16 matmul rate measured in this run (the better of a measurement at the start and at the end);
  ``trainer_mfu`` beside it.
  FLOPs per step (issue #15): tokens x (4 x non-embedding weights + 3 x 4 x seq x hidden x layers), i.e. forward
  and activation gradients of the frozen base, and attention scores and values forward and backward. LoRA's own
  FLOPs and the weight gradients of the frozen base (never computed) are not counted.
* ``hlora_record_offload_vs_plain``, ``hlora_regularize_offload_vs_plain``: the same with ``offload: cpu`` (omega and
  Omega in CPU memory, chunks copied to the GPU each step): what the memory option of issue #12 item 8 costs.
* ``hlora_record_vs_plain`` (general stage), ``hlora_regularize_vs_plain`` (domain stage): HLoRA acts on every
  other step of one stage on one model (bench/bench_hlora_cost.py's ``EveryOtherStep``); median(HLoRA steps) /
  median(plain steps). These rows and SAM's need each step's time, so they synchronize after every step.
* ``sam_vs_plain``, ``sam_every4_vs_plain``: one domain stage with ``sam`` ``every_k=4`` (bench/bench_sam_cost.py):
  SAM step / plain step, and the mean over windows of 4 steps / plain step.
* ``ewc_fisher``: ``fisher_diagonal`` with EWC's default options over 64 x 1024 tokens, as a ratio to plain training
  steps over the same number of tokens (plain steps timed just before and after it, same model); the seconds
  are recorded beside it. ``ewc_fisher_run_precision``: the same with ``fisher_precision: run`` (the Fisher's passes
  under the run's bf16 autocast rather than float32; values rounded to bf16, so it is not the "same values" target's
  row: it says what the float32 default costs).

Speed levers (issue #15 item 3, docs/speed.md; ``--levers``, on by default on the GPU, off with ``--tiny`` unless
given), each a forgetless step with the lever / the same step without it, on the same model, best of ``--rounds``
alternations, on the method rows' shape (1B) with a bf16 base:

* ``attn_eager_vs_sdpa``, ``attn_flash2_vs_sdpa`` (skipped without flash-attn), ``compile_vs_plain``
  (``compile: true``, its compilation inside the warm-up steps), ``compiled_ce_vs_eager_ce`` (both sides compiled,
  the chunked cross-entropy's chunks compiled on one side only: ``FORGETLESS_COMPILE_CE=0`` on the other; at 1B the
  8 x 1024 rows' logits go chunked), ``fused_lora_vs_plain`` (``fused_lora: true``) and
  ``fused_lora_compiled_vs_compiled`` (both sides compiled), ``liger_vs_plain`` (skipped without liger-kernel;
  measured after its plain side, not alternated: Liger's RoPE patch is process-wide and cannot be undone);
* ``padding_free_vs_padded``, ``group_by_length_vs_shuffled``: on examples of random lengths (seq/8 to seq), the time
  of the second of two epochs (every variant sees every example once per epoch; the first epoch is warm-up).

Peak memory: ``torch.cuda.max_memory_allocated`` of each variant (weights included); the interleaved rows (HLoRA,
SAM) can only give the peak of their whole stage. On the CPU (``--tiny``) the process's max RSS stands in: it
is not per variant and means nothing beyond "it ran".

``--tiny`` runs the same code on the CPU with the tiny shape and a handful of steps: a smoke test
(tests/unit/test_bench_gpu.py), not a speed measurement. On the CPU the bf16 "peak" is whatever this CPU does in
bf16, so its MFU is not meaningful either.

Usage: python bench/bench_gpu.py [--shapes 1b,8b] [--rounds 2] [--json PATH] [--attn sdpa] [--tiny] [--[no-]levers]
       [--only ROW,ROW] (the sections with a row name containing one of these: a partial rerun)
       [--compile] [--trainer-compile] (torch.compile on forgetless's / the Trainer's side of the step and method rows)
       [--fused-lora] (fused_lora: true on forgetless's side of the step and method rows)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import StepTimer, make_examples  # noqa: E402
from bench_hlora_cost import EveryOtherStep, split_medians  # noqa: E402

from forgetless.methods import resolve  # noqa: E402
from forgetless.methods.ewc import fisher_diagonal  # noqa: E402
from forgetless.models import LoraSettings, attach_lora  # noqa: E402
from forgetless.precision import resolve_precision  # noqa: E402
from forgetless.training.config import TrainConfig  # noqa: E402
from forgetless.training.hooks import Method  # noqa: E402
from forgetless.training.loop import train_stage  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=ALL_LINEAR)
SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,  # TinyLlama-1.1B
               num_attention_heads=32, num_key_value_heads=4),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,  # Llama-3-8B
               num_attention_heads=32, num_key_value_heads=8),
}
ATTENTION: dict[str, str | None] = {"implementation": None}  # --attn, read by build()
METHOD_SHAPES = ("tiny", "1b")  # the shapes the HLoRA, SAM and EWC rows run on (the rows are 1B)
SAM_K = 4


@dataclass(frozen=True)
class Plan:
    """Batch shapes and step counts of one model shape (sized so that --shapes 1b,8b runs in < 5 min on an H100)."""

    batch: int  # the fp32-base step comparison, the method rows
    seq: int
    bf16_batch: int  # the bf16-base MFU row
    steps: int  # timed steps per training (after warm-up)
    warmup: int
    method_steps: int  # timed steps per HLoRA stage (half HLoRA, half plain)
    sam_windows: int  # timed windows of SAM_K steps (after one warm-up window)
    fisher_examples: int
    fisher_seq: int
    fp32_base: bool  # also run the fp32-base comparison (8B: bf16 base only, as in the issue)


PLANS = {
    "tiny": Plan(batch=2, seq=32, bf16_batch=4, steps=2, warmup=1, method_steps=4, sam_windows=1,
                 fisher_examples=8, fisher_seq=32, fp32_base=True),
    "1b": Plan(batch=8, seq=1024, bf16_batch=16, steps=6, warmup=2, method_steps=12, sam_windows=4,
               fisher_examples=64, fisher_seq=1024, fp32_base=True),
    "8b": Plan(batch=4, seq=1024, bf16_batch=4, steps=4, warmup=2, method_steps=0, sam_windows=0,
               fisher_examples=0, fisher_seq=0, fp32_base=False),
}
TARGETS = {  # issue #15, item 2
    "step_vs_trainer_fp32base": "<= 0.80", "step_vs_trainer_bf16base": "<= 0.80",
    "mfu_bf16base@1b": ">= 0.45", "mfu_bf16base@8b": ">= 0.55",
    "hlora_record_vs_plain": "<= 1.05", "hlora_regularize_vs_plain": "<= 1.05",
    "sam_vs_plain": "<= 2.02", "sam_every4_vs_plain": "<= 1.30",
    # 3x below the H200's 11.5 s, which was 7.0x the 8 plain steps (0.206 s each) over the same 64 x 1024 tokens
    "ewc_fisher": "<= 2.3",
}


LEVER_ROWS = ("attn_eager_vs_sdpa", "attn_flash2_vs_sdpa", "compile_vs_plain", "compiled_ce_vs_eager_ce",
              "fused_lora_vs_plain", "fused_lora_compiled_vs_compiled", "liger_vs_plain", "padding_free_vs_padded",
              "group_by_length_vs_shuffled")


def expected_rows(shapes: list[str], levers: bool = False) -> list[str]:
    """The names of the rows a run over ``shapes`` writes (``name@shape``)."""
    rows = []
    for shape in shapes:
        if PLANS[shape].fp32_base:
            rows += [f"step_vs_trainer_fp32base@{shape}", f"mfu_fp32base@{shape}"]
        rows += [f"step_vs_trainer_bf16base@{shape}", f"mfu_bf16base@{shape}"]
        if shape in METHOD_SHAPES:
            rows += [f"{name}@{shape}" for name in ("hlora_record_vs_plain", "hlora_regularize_vs_plain",
                                                   "hlora_record_offload_vs_plain",
                                                   "hlora_regularize_offload_vs_plain",
                                                   "sam_vs_plain", "sam_every4_vs_plain", "ewc_fisher",
                                                   "ewc_fisher_run_precision")]
            if levers:
                rows += [f"{name}@{shape}" for name in LEVER_ROWS]
    return rows


# ---------------------------------------------------------------------------------------------------- device


def on_cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if on_cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """Peak allocated since the last reset_peak (CUDA); on the CPU the process's max RSS (not per variant)."""
    if on_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def free() -> None:
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


def bf16_matmul_rate(tiny: bool) -> float:
    """FLOP/s of a square bf16 matmul on this device (the MFU denominator)."""
    n, reps = (256, 3) if tiny else (8192, 50)
    device = "cuda" if on_cuda() else "cpu"
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- models


def build(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight Llama of ``shape`` in ``dtype``, created on the device, with LoRA attached."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, tie_word_embeddings=False)
    if ATTENTION["implementation"]:  # --attn; else transformers' default (sdpa)
        config._attn_implementation = ATTENTION["implementation"]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an 8B float32 copy first would need 32 GiB more
    try:
        with torch.device("cuda" if on_cuda() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return attach_lora(model, LORA)


def flops_per_step(model: torch.nn.Module, batch: int, seq: int) -> float:
    """Issue #15's count: per token 4 x non-embedding base weights (frozen-base LoRA: forward and activation
    gradients) plus attention scores and values, 4 * seq * hidden per layer forward and three times that in all."""
    config = model.config
    weights = sum(p.numel() for name, p in model.named_parameters()
                  if "embed_tokens" not in name and "lora_" not in name)
    return batch * seq * (4 * weights + 3 * 4 * seq * config.hidden_size * config.num_hidden_layers)


SIDE_LEVERS: dict = {}  # --compile: levers of every forgetless stage of the step and method rows
TRAINER_COMPILE = {"on": False}  # --trainer-compile: TrainingArguments(torch_compile=True) on the Trainer side


def train_config(steps: int, batch: int, precision: str, **levers) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=batch, lr=1e-4, precision=precision, max_grad_norm=1.0,
                       progress=False, **(SIDE_LEVERS | levers))


# ---------------------------------------------------------------------------------------------------- the two sides


class Span:
    """The mean time of optimizer steps ``warmup + 1 .. total``, timed as one span: the device is synchronized
    at the span's two ends only. A sync after every step (as issue #15's table was measured) would make the
    host wait for the device each step and hide what a loop without host syncs overlaps."""

    def __init__(self, warmup: int, total: int) -> None:
        if not 1 <= warmup < total:
            raise ValueError("the span needs at least one warm-up step and one timed step")
        self.warmup, self.total, self.done = warmup, total, 0
        self.start = self.end = None

    def step_done(self) -> None:
        self.done += 1
        if self.done in (self.warmup, self.total):
            sync()
            if self.done == self.warmup:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()

    def seconds_per_step(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(f"the run stopped after {self.done} of {self.total} optimizer steps")
        return (self.end - self.start) / (self.total - self.warmup)


class SpanHook(Method):
    """:class:`Span` as a forgetless method: put it last in the method list."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def after_optimizer_step(self, ctx) -> None:
        self.span.step_done()


def forgetless_run(model, plan: Plan, batch: int, seq: int, precision: str) -> tuple[float, float]:
    """One forgetless training stage (general, no method); (seconds per step, peak GiB)."""
    span = Span(plan.warmup, plan.steps + plan.warmup)
    free()
    reset_peak()
    train_stage(model, make_examples(batch * span.total, model.config.vocab_size, seq),
                train_config(span.total, batch, precision), [SpanHook(span)], stage="general")
    return span.seconds_per_step(), peak_gib()


def trainer_run(model, plan: Plan, batch: int, seq: int, precision: str) -> tuple[float, float]:
    """The same training with a plain transformers Trainer on the same PEFT model; (seconds per step, peak GiB)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    span = Span(plan.warmup, plan.steps + plan.warmup)
    rows = [r | {"attention_mask": [1] * seq} for r in make_examples(batch * span.total, model.config.vocab_size, seq)]

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict:
            return rows[i]

    class Stamp(TrainerCallback):
        def on_step_end(self, *args, **kwargs):  # after the optimizer step, the schedule and zero_grad
            span.step_done()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=span.total,
                                 learning_rate=1e-4, lr_scheduler_type="linear", max_grad_norm=1.0,
                                 bf16=precision == "bf16", use_cpu=not on_cuda(), report_to=[],
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                 dataloader_num_workers=0, remove_unused_columns=False,
                                 torch_compile=TRAINER_COMPILE["on"])
        free()
        reset_peak()
        try:
            Trainer(model=model, args=args, train_dataset=Rows(), data_collator=default_data_collator,
                    callbacks=[Stamp()]).train()
        finally:  # accelerate keeps the Trainer's bf16 and compile settings process-wide, and its mixed-precision
            # wrapper on the model's forward: neither for the next side (the wrapper made every later forgetless round
            # take the Trainer's full-logits loss path, and its peak memory the Trainer's)
            from accelerate.state import AcceleratorState

            from forgetless.training.loop import take_off_mixed_precision

            AcceleratorState._reset_state()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for module, _ in take_off_mixed_precision(model):  # for good: the bench owns the model
                    module.__dict__.pop("_original_forward", None)
    return span.seconds_per_step(), peak_gib()


def side_by_side(model, plan: Plan, batch: int, seq: int, precision: str, rounds: int) -> dict:
    """forgetless and Trainer+PEFT alternated (F T, T F, ...) on one model; the best per-round mean of each."""
    ours, theirs, ours_mem, theirs_mem = [], [], 0.0, 0.0
    for r in range(rounds):
        for side in (("forgetless", "trainer") if r % 2 == 0 else ("trainer", "forgetless")):
            if side == "forgetless":
                seconds, mem = forgetless_run(model, plan, batch, seq, precision)
                ours.append(seconds)
                ours_mem = max(ours_mem, mem)
            else:
                seconds, mem = trainer_run(model, plan, batch, seq, precision)
                theirs.append(seconds)
                theirs_mem = max(theirs_mem, mem)
        print(f"    round {r}: forgetless {ours[-1]:.4f} s, Trainer+PEFT {theirs[-1]:.4f} s", flush=True)
    return {"forgetless_s": min(ours), "trainer_s": min(theirs), "forgetless_peak_gib": ours_mem,
            "trainer_peak_gib": theirs_mem, "rounds_forgetless_s": ours, "rounds_trainer_s": theirs}


# ---------------------------------------------------------------------------------------------------- the rows


class Report:
    """Rows as they come, written to --json after each one so that a run cut short keeps what it measured."""

    def __init__(self, path: str | None, env: dict) -> None:
        self.path, self.env, self.rows = path, env, {}

    def skip(self, name: str, reason: str) -> None:
        self.rows[name] = {"skipped": reason}
        print(f"  {name}: skipped ({reason})", flush=True)
        self.write()

    def add(self, name: str, value: float, **details) -> None:
        base = name.split("@")[0]
        target = TARGETS.get(name) or TARGETS.get(base)
        self.rows[name] = {"value": value, "target": target, **details}
        print(f"  {name}: {value:.4g}" + (f"  (target {target})" if target else ""), flush=True)
        self.write()

    def fail(self, names: list[str], error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}"[:600]
        for name in names:
            self.rows[name] = {"error": text, "traceback": traceback.format_exc()[-1500:]}
        print(f"  FAILED {', '.join(names)}: {text}", flush=True)
        self.write()

    def write(self) -> None:
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(self.path).with_suffix(".tmp")
            tmp.write_text(json.dumps({"env": self.env, "rows": self.rows}, indent=1))
            tmp.replace(self.path)


ONLY: list[str] = []  # --only: run the sections with a row name containing one of these (all when empty)


def selected(names: list[str]) -> bool:
    return not ONLY or any(part in name for name in names for part in ONLY)


def guarded(report: Report, names: list[str], fn) -> None:
    """Run one section (if ``--only`` selects it); a failure is recorded on its rows and the run goes on."""
    if not selected(names):
        return
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - one failure must not lose the other rows
        report.fail(names, error)
    finally:
        free()
        print(f"  [{', '.join(names)}: {time.perf_counter() - t0:.1f} s]", flush=True)


def step_rows(report: Report, shape: str, plan: Plan, precision: str, rounds: int, peak: float,
              dtype: torch.dtype, batch: int, tag: str) -> None:
    model = build(shape, dtype)
    flops = flops_per_step(model, batch, plan.seq)
    got = side_by_side(model, plan, batch, plan.seq, precision, rounds)
    lora_dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    common = {"batch": batch, "seq": plan.seq, "base_dtype": str(dtype).removeprefix("torch."),
              "lora_dtype": str(lora_dtype).removeprefix("torch."), "precision": precision}
    report.add(f"step_vs_trainer_{tag}@{shape}", got["forgetless_s"] / got["trainer_s"], **common, **got)
    report.add(f"mfu_{tag}@{shape}", flops / got["forgetless_s"] / peak, **common, flops_per_step=flops,
               trainer_mfu=flops / got["trainer_s"] / peak,
               forgetless_tokens_per_s=batch * plan.seq / got["forgetless_s"],
               forgetless_peak_gib=got["forgetless_peak_gib"], trainer_peak_gib=got["trainer_peak_gib"])


def hlora_rows(report: Report, shape: str, plan: Plan, precision: str, variant: str = "") -> None:
    """HLoRA's recording and regularizer against plain steps; ``variant="offload"``: with ``offload: cpu``."""
    model = build(shape, torch.float32)
    hlora = resolve({"name": "hlora", **({"offload": "cpu"} if variant == "offload" else {})}).plugins[0]
    tag = f"_{variant}" if variant else ""
    for stage, seed, name in (("general", 0, f"hlora_record{tag}_vs_plain"),
                              ("domain", 1, f"hlora_regularize{tag}_vs_plain")):
        timer, wrapped = StepTimer(), EveryOtherStep(hlora)
        total = plan.method_steps + plan.warmup
        free()
        reset_peak()
        train_stage(model, make_examples(plan.batch * total, model.config.vocab_size, plan.seq, seed),
                    train_config(total, plan.batch, precision), [wrapped, timer], stage=stage)
        plain, ours = split_medians(timer.stamps, plan.warmup)
        report.add(f"{name}@{shape}", ours / plain, plain_s=plain, hlora_s=ours, stage_peak_gib=peak_gib(),
                   hook_s_per_hlora_step=wrapped.hook_seconds / max(1, total // 2), batch=plan.batch, seq=plan.seq)


def sam_rows(report: Report, shape: str, plan: Plan, precision: str) -> None:
    model = build(shape, torch.float32)
    sam = resolve({"name": "sam", "every_k": SAM_K}).plugins[0]
    total = SAM_K * (plan.sam_windows + 1)  # the first window is warm-up
    timer = StepTimer()
    free()
    reset_peak()
    train_stage(model, make_examples(plan.batch * total, model.config.vocab_size, plan.seq), train_config(
        total, plan.batch, precision), [sam, timer], stage="domain")
    mem = peak_gib()
    times = timer.step_times()[SAM_K:]  # step i is a SAM step when i % SAM_K == 0
    sam_s = statistics.median(times[0::SAM_K])
    plain = statistics.median([t for i, t in enumerate(times) if i % SAM_K])
    windows = [sum(times[i:i + SAM_K]) / SAM_K for i in range(0, len(times), SAM_K)]
    report.add(f"sam_vs_plain@{shape}", sam_s / plain, sam_s=sam_s, plain_s=plain, stage_peak_gib=mem,
               batch=plan.batch, seq=plan.seq)
    report.add(f"sam_every4_vs_plain@{shape}", statistics.median(windows) / plain, window_s=statistics.median(windows),
               plain_s=plain, stage_peak_gib=mem, every_k=SAM_K)


def ewc_rows(report: Report, shape: str, plan: Plan, precision: str) -> None:
    model = build(shape, torch.float32)
    ewc = resolve("ewc").plugins[0]
    examples = make_examples(plan.fisher_examples, model.config.vocab_size, plan.fisher_seq, seed=3)
    plain, plain_mem = [], 0.0
    measured: dict[str, tuple[float, int, float, float]] = {}  # row -> (seconds, tokens, peak GiB, Fisher GiB)
    # plain steps bracket the Fishers (float32, the default; under the run's precision): drift hits all
    for part in ("plain", "ewc_fisher", "ewc_fisher_run_precision", "plain"):
        if part == "plain":
            seconds, mem = forgetless_run(model, plan, plan.batch, plan.seq, precision)
            plain.append(seconds)
            plain_mem = max(plain_mem, mem)
            continue
        free()
        reset_peak()
        sync()
        t0 = time.perf_counter()
        fisher, tokens = fisher_diagonal(model, examples, ewc.estimator, ewc.fisher_over, ewc.batch_size, 0,
                                         precision="fp32" if part == "ewc_fisher" else precision)
        sync()
        measured[part] = (time.perf_counter() - t0, tokens, peak_gib(),
                          sum(t.numel() * t.element_size() for t in fisher.values()) / 2**30)
        del fisher
    plain_s = min(plain)
    for row, (fisher_s, tokens, fisher_mem, fisher_gib) in measured.items():
        # plain training steps over as many predicted tokens as the Fisher's (seq - 1 per example in both)
        same_tokens = plain_s * tokens / (plan.batch * (plan.seq - 1))
        report.add(f"{row}@{shape}", fisher_s / same_tokens, fisher_s=fisher_s, tokens=tokens,
                   plain_step_s=plain_s, plain_steps_same_tokens_s=same_tokens, fisher_peak_gib=fisher_mem,
                   plain_peak_gib=plain_mem, fisher_gib=fisher_gib, estimator=ewc.estimator,
                   fisher_batch_size=ewc.batch_size, examples=plan.fisher_examples, seq=plan.fisher_seq,
                   fisher_precision="float32" if row == "ewc_fisher" else precision)


def ragged_examples(n: int, vocab: int, seq: int, seed: int = 7) -> list[dict]:
    """``n`` examples of random lengths from seq/8 to seq (short instructions and multiple-choice items)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, seq // 8), seq + 1, (n,), generator=g).tolist()
    return [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths)]


def lever_run(model, examples: list[dict], batch: int, warmup: int, total: int, precision: str,
              **levers) -> tuple[float, float]:
    """One forgetless stage with ``levers`` (TrainConfig fields, and ``compile_ce``: False keeps the chunked
    cross-entropy's chunks eager under ``compile``); (seconds per timed step, peak GiB)."""
    span = Span(warmup, total)
    free()
    reset_peak()
    compile_ce = levers.pop("compile_ce", True)
    saved = os.environ.get("FORGETLESS_COMPILE_CE")
    os.environ["FORGETLESS_COMPILE_CE"] = "1" if compile_ce else "0"
    try:
        train_stage(model, examples, train_config(total, batch, precision, **levers), [SpanHook(span)],
                    stage="general")
    finally:
        if saved is None:
            os.environ.pop("FORGETLESS_COMPILE_CE")
        else:
            os.environ["FORGETLESS_COMPILE_CE"] = saved
    return span.seconds_per_step(), peak_gib()


def lever_rows(report: Report, shape: str, plan: Plan, precision: str, rounds: int) -> None:
    """The speed levers, each against the same step without it (see the module docstring)."""
    import importlib.util

    model = build(shape, torch.bfloat16)
    total = plan.steps + plan.warmup
    fixed = make_examples(plan.batch * total, model.config.vocab_size, plan.seq)
    plain = {"attn_implementation": "sdpa"}  # a stage leaves its attention set: say it on every run

    def alternate(name: str, lever: dict, examples=fixed, warmup=plan.warmup, steps=total, baseline=None,
                  **details) -> None:
        ours, theirs, mem = [], [], {}
        for r in range(rounds):
            for side in (("plain", "lever") if r % 2 == 0 else ("lever", "plain")):
                seconds, peak = lever_run(model, examples, plan.batch, warmup, steps, precision,
                                          **(plain | lever if side == "lever" else plain | (baseline or {})))
                (ours if side == "lever" else theirs).append(seconds)
                mem[side] = max(mem.get(side, 0.0), peak)
        report.add(f"{name}@{shape}", min(ours) / min(theirs), lever_s=min(ours), plain_s=min(theirs),
                   lever_peak_gib=mem["lever"], plain_peak_gib=mem["plain"], rounds_lever_s=ours,
                   rounds_plain_s=theirs, batch=plan.batch, seq=plan.seq, base_dtype="bfloat16", **details)

    sections = [("attn_eager_vs_sdpa", lambda: alternate("attn_eager_vs_sdpa", {"attn_implementation": "eager"}))]
    if importlib.util.find_spec("flash_attn") is not None and on_cuda():
        sections.append(("attn_flash2_vs_sdpa", lambda: alternate("attn_flash2_vs_sdpa",
                                                                  {"attn_implementation": "flash_attention_2"})))
    else:
        report.skip(f"attn_flash2_vs_sdpa@{shape}", "flash-attn is not installed or no CUDA")
    sections.append(("compile_vs_plain", lambda: alternate("compile_vs_plain", {"compile": True})))
    sections.append(("compiled_ce_vs_eager_ce",  # both sides compiled; the chunked cross-entropy's chunks too on one
                     lambda: alternate("compiled_ce_vs_eager_ce", {"compile": True},
                                       baseline={"compile": True, "compile_ce": False})))
    sections.append(("fused_lora_vs_plain", lambda: alternate("fused_lora_vs_plain", {"fused_lora": True})))
    sections.append(("fused_lora_compiled_vs_compiled",  # both sides compiled: what the fusion adds to compile
                     lambda: alternate("fused_lora_compiled_vs_compiled", {"fused_lora": True, "compile": True},
                                       baseline={"compile": True})))

    # ragged data: two epochs, the first warm-up; every variant sees every example once per epoch
    # 8 batches: transformers' mega-batches hold min(n // (4 * batch), 50) batches, so fewer leave nothing to group
    ragged = ragged_examples(plan.batch * 8, model.config.vocab_size, plan.seq)
    epoch = len(ragged) // plan.batch
    tokens = sum(len(e["input_ids"]) for e in ragged)

    def ragged_row(name: str, lever: dict) -> None:
        alternate(name, lever, examples=ragged, warmup=epoch, steps=2 * epoch, examples_n=len(ragged),
                  tokens_per_epoch=tokens)

    sections.append(("padding_free_vs_padded", lambda: ragged_row("padding_free_vs_padded", {"padding_free": True})))
    sections.append(("group_by_length_vs_shuffled",
                     lambda: ragged_row("group_by_length_vs_shuffled", {"group_by_length": True})))
    for name, fn in sections:
        guarded(report, [f"{name}@{shape}"], fn)

    if importlib.util.find_spec("liger_kernel") is None or not on_cuda():
        report.skip(f"liger_vs_plain@{shape}", "liger-kernel is not installed or no CUDA")
        return

    def liger() -> None:  # plain first, then Liger (its patch cannot be undone), on a fresh model
        from forgetless.training.batches import add_loss_index, collate
        from forgetless.training.loss import CausalLMLoss

        fresh = build(shape, torch.bfloat16)
        plain_runs = [lever_run(fresh, fixed, plan.batch, plan.warmup, total, precision, **plain)
                      for _ in range(rounds)]
        batch = {k: v.to("cuda") for k, v in add_loss_index(collate(fixed[:plan.batch], pad_token_id=0)).items()}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            plain_loss = float(CausalLMLoss(fresh)(**batch))
        # the Liger rounds train the adapter further: its loss is compared at the weights the plain loss saw
        trained = {n: p.detach().to("cpu", copy=True) for n, p in fresh.named_parameters() if p.requires_grad}
        liger_runs = [lever_run(fresh, fixed, plan.batch, plan.warmup, total, precision, liger=True, **plain)
                      for _ in range(rounds)]
        with torch.no_grad():
            for n, p in fresh.named_parameters():
                if n in trained:
                    p.copy_(trained[n])
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # kernels patched, fused CE
            fused = CausalLMLoss(fresh, fused_ce=True)
            fused_loss = float(fused(**batch))
        theirs, ours = [r[0] for r in plain_runs], [r[0] for r in liger_runs]
        report.add(f"liger_vs_plain@{shape}", min(ours) / min(theirs), lever_s=min(ours), plain_s=min(theirs),
                   lever_peak_gib=max(r[1] for r in liger_runs), plain_peak_gib=max(r[1] for r in plain_runs),
                   rounds_lever_s=ours, rounds_plain_s=theirs, batch=plan.batch, seq=plan.seq, base_dtype="bfloat16",
                   fused_ce=fused.fused_ce, loss_plain=plain_loss, loss_liger=fused_loss,
                   loss_rel_diff=abs(fused_loss - plain_loss) / abs(plain_loss), loss_at="the same adapter weights",
                   order="plain rounds, then liger rounds (RMSNorm, SwiGLU, RoPE kernels and the fused linear CE)")

    model = None  # frees the model before Liger's fresh one (the closures above are done with it)
    guarded(report, [f"liger_vs_plain@{shape}"], liger)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1b,8b", help="comma-separated: 1b, 8b (tiny with --tiny)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of forgetless and Trainer+PEFT")
    parser.add_argument("--json", help="write the rows to this file (rewritten after each row)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny shape, a handful of steps")
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"),
                        help="attention implementation of the models (default: transformers' default, sdpa)")
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, default=None,
                        help="the speed-lever rows (default: on for the GPU shapes, off with --tiny)")
    parser.add_argument("--compile", action="store_true", help="compile: true on forgetless's side of the step and "
                                                                  "method rows (its compilation in the warm-up steps); use with "
                                                                  "--no-levers: it would compile both sides of those")
    parser.add_argument("--trainer-compile", action="store_true", help="torch_compile=True on the Trainer's side")
    parser.add_argument("--fused-lora", action="store_true", help="fused_lora: true on forgetless's side of the step "
                                                                     "and method rows (use with --no-levers)")
    parser.add_argument("--only", default="", help="comma-separated parts of row names: run only the sections with "
                                                   "such a row (e.g. ewc_fisher,hlora), to remeasure a few rows")
    args = parser.parse_args(argv)
    ONLY[:] = [part.strip() for part in args.only.split(",") if part.strip()]
    SIDE_LEVERS.clear()
    SIDE_LEVERS.update({"compile": True} if args.compile else {})
    SIDE_LEVERS.update({"fused_lora": True} if args.fused_lora else {})
    TRAINER_COMPILE["on"] = args.trainer_compile
    levers = (not args.tiny) if args.levers is None else args.levers
    ATTENTION["implementation"] = args.attn
    shapes = ["tiny"] if args.tiny else [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in PLANS]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {sorted(PLANS)}")
    if not args.tiny and not on_cuda():
        parser.error("the 1b and 8b shapes need a CUDA GPU; --tiny runs the smoke test on the CPU")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.tiny:  # toy matrices: threads only contend (20x slower on a loaded 2-core machine)
        torch.set_num_threads(1)
    started = time.perf_counter()
    import peft
    import transformers

    device = torch.cuda.get_device_name() if on_cuda() else "cpu"
    precision = resolve_precision("auto", "cuda" if on_cuda() else "cpu")
    peak = bf16_matmul_rate(args.tiny)
    env = {"command": "python " + " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])),
           "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "precision": precision, "threads": torch.get_num_threads(),
           "smoke_test_only": args.tiny, "attn_implementation": args.attn or "default",
           "forgetless_compile": args.compile, "forgetless_fused_lora": args.fused_lora,
           "trainer_compile": args.trainer_compile,
           "lora": "r=16 alpha=32 dropout=0 on " + ",".join(ALL_LINEAR),
           "bf16_matmul_flops_start": peak,
           "optimizers": {"forgetless": "torch.optim.AdamW (defaults)",
                          "trainer": str(transformers.TrainingArguments(output_dir=tempfile.gettempdir(),
                                                                        use_cpu=not on_cuda()).optim.value)}}
    print(f"command: {env['command']}\ndevice {device}; precision {precision}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}; bf16 matmul {peak / 1e12:.2f} TFLOP/s",
          flush=True)
    report = Report(args.json, env)
    # The MFU rows divide by the start's peak as they come; the peak is measured again at the end and they are
    # rescaled to the better of the two (drift), so a run cut short keeps start-peak MFUs.
    for shape in shapes:
        plan = PLANS[shape]
        print(f"shape {shape}: {SHAPES[shape]}", flush=True)
        if plan.fp32_base:
            names = [f"step_vs_trainer_fp32base@{shape}", f"mfu_fp32base@{shape}"]
            guarded(report, names, lambda: step_rows(report, shape, plan, precision, args.rounds, peak,
                                                     torch.float32, plan.batch, "fp32base"))
        names = [f"step_vs_trainer_bf16base@{shape}", f"mfu_bf16base@{shape}"]
        guarded(report, names, lambda: step_rows(report, shape, plan, precision, args.rounds, peak,
                                                 torch.bfloat16, plan.bf16_batch, "bf16base"))
        if shape in METHOD_SHAPES:
            guarded(report, [f"hlora_record_vs_plain@{shape}", f"hlora_regularize_vs_plain@{shape}"],
                    lambda: hlora_rows(report, shape, plan, precision))
            guarded(report, [f"hlora_record_offload_vs_plain@{shape}", f"hlora_regularize_offload_vs_plain@{shape}"],
                    lambda: hlora_rows(report, shape, plan, precision, "offload"))
            guarded(report, [f"sam_vs_plain@{shape}", f"sam_every4_vs_plain@{shape}"],
                    lambda: sam_rows(report, shape, plan, precision))
            guarded(report, [f"ewc_fisher@{shape}"], lambda: ewc_rows(report, shape, plan, precision))
            if levers:
                lever_rows(report, shape, plan, precision, args.rounds)
    end_peak = bf16_matmul_rate(args.tiny)
    best = max(peak, end_peak)
    for name, row in report.rows.items():  # MFU against the better of the two peak measurements
        if name.startswith("mfu_") and "value" in row:
            row["value"] *= peak / best
            row["trainer_mfu"] *= peak / best
    env.update(bf16_matmul_flops_end=end_peak, bf16_matmul_flops=best, seconds=time.perf_counter() - started)
    report.write()
    missing = [n for n in expected_rows(shapes, levers) if n not in report.rows and selected([n])]
    failed = [n for n, row in report.rows.items() if "error" in row]
    print(f"\n{'row':42s} {'value':>8s}  target   (bf16 matmul {best / 1e12:.2f} TFLOP/s; {env['seconds']:.0f} s)")
    for name, row in report.rows.items():
        value = f"{row['value']:8.4g}" if "value" in row else " skipped" if "skipped" in row else "  FAILED"
        print(f"{name:42s} {value}  {row.get('target') or ''}")
    if args.tiny:
        print("(--tiny: a CPU smoke test of the code path; none of these numbers is a speed measurement)")
    return 1 if missing or failed else 0


if __name__ == "__main__":
    sys.exit(main())
