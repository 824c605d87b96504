"""Issue #12 items 8 and 9 on one GPU: peak memory of LoRA training at the 8B shape with a bf16 and a 4-bit base, with
and without gradient checkpointing, and the extra memory of HLoRA and EWC over plain LoRA (``lora-nu-mu``).

Model: Llama-3-8B shape with random weights (``bench_gpu.build``; memory does not depend on the values), batch
4 x 1024, LoRA r=16 alpha 32; precision ``auto`` (bf16 autocast). Each row is ``torch.cuda.max_memory_allocated`` over
a short stage (weights included), reset before it:

* ``bf16_nockpt``, ``bf16_ckpt``: a domain stage of plain LoRA on all seven projections, bf16 base, without and with
  ``gradient_checkpointing`` (targets: <= 24 GiB with it; the issue measured 48.0 GiB without).
* ``nf4_ckpt``: the same with a 4-bit base (NF4, double quantization, bf16 compute: forgetless's ``quantization:
  4bit``), loaded through ``transformers.from_pretrained`` from a copy of the random model saved to a temporary
  folder, as a user's model loads (target <= 12 GiB). Skipped without bitsandbytes.
* ``{method}_{targets}[_{variant}]_{stage}``: the peak of the general stage (HLoRA recording omega, EWC's Fisher)
  and of the domain stage (the regularizer / penalty) of ``hlora`` and ``ewc`` with LoRA on ``qv`` (q_proj, v_proj:
  the paper's setting) or ``all`` seven projections, bf16 base with checkpointing, at the method's defaults and with
  ``storage_dtype: bfloat16`` and ``offload: cpu``; ``extra_gib`` beside each is its peak minus ``lora-nu-mu``'s on
  the same targets and stage. Target (item 8/9): HLoRA and EWC on q_proj/v_proj within 10% of the bf16 base's size
  (~1.5 GiB at 8B) over plain LoRA. EWC's general stage computes the Fisher over ``--fisher-examples`` examples.

``--tiny`` runs every row on the CPU with the tiny shape (a smoke test of the code path, tests/unit/test_bench_gpu.py:
on the CPU "peak" is the process's max RSS, not per row, and means only "it ran"). The JSON is rewritten after each
row; a failing row records its error and the run goes on.

Usage: python bench/bench_gpu_memory.py [--json PATH] [--steps 3] [--fisher-examples 8] [--tiny] [--skip-4bit]
       [--methods hlora,ewc] [--targets qv,all]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_examples  # noqa: E402
from bench_gpu import LORA, SHAPES, Report, build, free, guarded, on_cuda, peak_gib, reset_peak  # noqa: E402

from forgetless.methods import resolve  # noqa: E402
from forgetless.models import LoraSettings, attach_lora  # noqa: E402
from forgetless.precision import resolve_precision  # noqa: E402
from forgetless.training.config import TrainConfig  # noqa: E402
from forgetless.training.loop import train_stage  # noqa: E402

QV = ["q_proj", "v_proj"]
TARGET_SETS = {"qv": QV, "all": LORA.target_modules}
VARIANTS = {"": {}, "bf16": {"storage_dtype": "bfloat16"}, "offload": {"offload": "cpu"}}


def base_gib(model: torch.nn.Module) -> float:
    """The size of the frozen base's weights (LoRA factors left out)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n) / 2**30


def stage(model, examples, batch: int, steps: int, precision: str, plugins, name: str, checkpointing: bool) -> float:
    """Peak memory (GiB) of one training stage of ``steps`` optimizer steps."""
    free()
    reset_peak()
    config = TrainConfig(max_steps=steps, batch_size=batch, lr=1e-4, precision=precision, progress=False,
                         gradient_checkpointing=checkpointing)
    train_stage(model, examples, config, plugins, stage=name)
    return peak_gib()


def fresh_lora(model, targets: list[str]):
    """``model``'s base with a new LoRA adapter on ``targets`` (the previous adapter unloaded)."""
    base = model.unload() if hasattr(model, "unload") else model
    return attach_lora(base, LoraSettings(r=LORA.r, alpha=LORA.alpha, dropout=0.0, target_modules=targets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows to this file (rewritten after each row)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per measured stage")
    parser.add_argument("--fisher-examples", type=int, default=8, help="examples of EWC's Fisher")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny shape")
    parser.add_argument("--skip-4bit", action="store_true", help="leave out the 4-bit base row")
    parser.add_argument("--methods", default="hlora,ewc", help="comma-separated methods of the method rows "
                                                               "(lora-nu-mu, their baseline, always runs)")
    parser.add_argument("--targets", default="qv,all", help=f"comma-separated LoRA target sets of the method rows "
                                                            f"({', '.join(TARGET_SETS)})")
    args = parser.parse_args(argv)
    methods = ["lora-nu-mu"] + [m.strip() for m in args.methods.split(",") if m.strip() not in ("", "lora-nu-mu")]
    target_sets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := [m for m in methods if m not in ("lora-nu-mu", "hlora", "ewc")] + \
            [t for t in target_sets if t not in TARGET_SETS]:
        parser.error(f"unknown method(s) or target set(s): {unknown}")
    if not args.tiny and not on_cuda():
        parser.error("this benchmark measures GPU memory: run it on a GPU, or with --tiny on the CPU")
    shape = "tiny" if args.tiny else "8b"
    batch, seq = (2, 32) if args.tiny else (4, 1024)
    precision = resolve_precision("auto", "cuda" if on_cuda() else "cpu")
    env = {"device": torch.cuda.get_device_name(0) if on_cuda() else "cpu", "torch": torch.__version__,
           "shape": shape, "batch": batch, "seq": seq, "precision": precision, "steps": args.steps}
    print(f"device {env['device']}; shape {shape}; batch {batch} x {seq}; precision {precision}", flush=True)
    report = Report(args.json, env)
    started = time.perf_counter()
    vocab = SHAPES[shape]["vocab_size"]
    data = {name: make_examples(batch * args.steps, vocab, seq, seed) for seed, name in enumerate(("general", "domain"))}
    model = build(shape, torch.bfloat16)
    env["base_gib"] = base = base_gib(model)

    for ckpt in (False, True):
        name = f"bf16_{'ckpt' if ckpt else 'nockpt'}@{shape}"
        guarded(report, [name], lambda ckpt=ckpt, name=name: report.add(
            name, stage(model, data["domain"], batch, args.steps, precision, [], "domain", ckpt), unit="GiB",
            target="<= 24" if ckpt and shape == "8b" else None, base_gib=base))

    plain: dict[tuple[str, str], float] = {}
    for key in target_sets:
        targets = TARGET_SETS[key]
        for method in methods:
            for variant, options in (VARIANTS.items() if method != "lora-nu-mu" else [("", {})]):
                label = "_".join(part for part in (method, key, variant) if part)
                names = [f"{label}_{part}@{shape}" for part in ("general", "domain")]

                def measure(method=method, options=options, targets=targets, key=key, names=names) -> None:
                    nonlocal model
                    model = fresh_lora(model, targets)
                    entry = {"name": method, **options} if method != "lora-nu-mu" else "lora-nu-mu"
                    if method == "ewc":
                        entry["samples"] = args.fisher_examples
                    plugins = resolve([entry]).plugins
                    for part, name in zip(("general", "domain"), names):
                        peak = stage(model, data[part], batch, args.steps, precision, plugins, part, True)
                        if method == "lora-nu-mu":
                            plain[(key, part)] = peak
                        extra = peak - plain.get((key, part), float("nan"))
                        report.add(name, peak, unit="GiB", extra_gib=extra, extra_of_base=extra / base,
                                   target="extra <= 0.10 x base" if key == "qv" and method != "lora-nu-mu" else None,
                                   targets=targets, options=options)

                guarded(report, names, measure)

    if args.skip_4bit:
        report.skip(f"nf4_ckpt@{shape}", "--skip-4bit")
    elif importlib.util.find_spec("bitsandbytes") is None:
        report.skip(f"nf4_ckpt@{shape}", "bitsandbytes is not installed (pip install 'forgetless[qlora]')")
    else:
        def nf4() -> None:
            nonlocal model
            from transformers import AutoModelForCausalLM

            from forgetless.models import quantization_config

            with tempfile.TemporaryDirectory() as tmp:
                model.unload().save_pretrained(tmp)  # the random bf16 base, as a user's model folder
                del model
                free()
                quantized = AutoModelForCausalLM.from_pretrained(
                    tmp, quantization_config=quantization_config("4bit", torch.bfloat16),
                    device_map={"": 0} if on_cuda() else "cpu", dtype=torch.bfloat16)
            quantized.config.use_cache = False
            for module in quantized.modules():  # as forgetless.models._load_quantized does on the CPU
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
            lora = attach_lora(quantized, LORA)
            report.add(f"nf4_ckpt@{shape}", stage(lora, data["domain"], batch, args.steps, precision, [], "domain",
                                                   True), unit="GiB", target="<= 12" if shape == "8b" else None,
                       base_gib=base_gib(lora))

        guarded(report, [f"nf4_ckpt@{shape}"], nf4)
    print(f"({time.perf_counter() - started:.0f} s)" + ("; --tiny: a CPU smoke test, no memory figure" if args.tiny
                                                        else ""), flush=True)
    return 1 if any("error" in row for row in report.rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
