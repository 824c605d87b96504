"""One training run of a tiny LoRA model, as a function of (batch size, accumulation, processes), for the parity
tests of the loop (tests/unit/test_loop_parity.py). Run as a script under ``accelerate launch --multi_gpu
--num_processes 2`` (CPU, gloo) it writes, from rank 0, ``<out>/<case>.pt``; the test compares it with the same
function called in-process with one process.

The examples are multiple-choice-like: prompts of different lengths with a loss on 1 to 11 answer tokens, so that a
mean of micro-batch means and the mean over the step's tokens differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CASES = {  # name: (method entry, stages)
    "lora": ("lora-nu-mu", ("domain",)),
    "sam": ([{"name": "sam", "rho": 0.05}], ("domain",)),  # perturb: step, the default: eps from the whole step
    "sam-micro": ([{"name": "sam", "rho": 0.05, "perturb": "micro"}], ("domain",)),  # eps per micro-batch
    "hlora": ([{"name": "hlora", "phi": 1e4}], ("general", "domain")),
    "ewc": ([{"name": "ewc", "lambda": 1e3, "estimator": "empirical", "samples": 8}], ("general", "domain")),
    # the default estimator: its labels are drawn per example, so each process's share draws what one process does
    "ewc-sampled": ([{"name": "ewc", "lambda": 1e3, "samples": 8}], ("general", "domain")),
    "lora-chunked-ce": ("lora-nu-mu", ("domain",)),  # the loss's head + cross-entropy in chunks of 3 rows
}
CHUNKED_CE = {"lora-chunked-ce": 64 * 3}  # case -> CHUNK_ELEMENTS (the tiny vocabulary is 64)


def variable_examples(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 16, (1,), generator=g))
        answer = 1 + (i * 5) % min(11, length - 1)
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[length - answer:]})
    return out


class GradRecorder:
    """Keeps the trainable gradients of the first optimizer step of each stage (synchronized, before clipping)."""

    def __init__(self) -> None:
        from forgetless.training.hooks import Method

        recorder = self

        class _Plugin(Method):
            def before_optimizer_step(self, ctx) -> None:
                if ctx.step == 0:
                    recorder.grads[ctx.stage] = {n: p.grad.detach().clone() for n, p in ctx.trainable_parameters()}

        self.grads: dict[str, dict[str, torch.Tensor]] = {}
        self.plugin = _Plugin()


def run(case: str, batch_size: int, grad_accum: int, accelerator=None, epochs: float | None = None,
        n: int = 16) -> dict:
    from accelerate import Accelerator

    from forgetless.methods import resolve
    from forgetless.training.config import TrainConfig
    from forgetless.training.loop import train_stage
    from tests.unit.tiny_model import make_lora_model

    from forgetless.training import loss

    entry, stages = CASES[case]
    accelerator = accelerator or Accelerator(cpu=True)
    chunk_elements, loss.CHUNK_ELEMENTS = loss.CHUNK_ELEMENTS, CHUNKED_CE.get(case, loss.CHUNK_ELEMENTS)
    model = make_lora_model(0, b_std=0.05)
    recorder = GradRecorder()
    plugins = resolve(entry).plugins + [recorder.plugin]
    cfg = TrainConfig(max_steps=None if epochs else 3, epochs=epochs or 1.0, batch_size=batch_size,
                      grad_accum=grad_accum, lr=1e-2, scheduler="linear", max_grad_norm=None, precision="fp32",
                      progress=False)
    general = variable_examples(n, seed=1)
    lrs = {}
    try:
        for stage in stages:
            data = general if stage == "general" else variable_examples(n, seed=2)
            result = train_stage(model, data, cfg, plugins, stage=stage, accelerator=accelerator,
                                 general_examples=general)
            lrs[stage] = [row["lr"] for row in result.history]
            steps = lrs.setdefault("steps", {})
            steps[stage] = result.steps
    finally:
        loss.CHUNK_ELEMENTS = chunk_elements
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"grads": recorder.grads, "weights": weights, "lrs": lrs}


def nonfinite_on_one_process(accelerator, policy: str) -> dict:
    """A loss that is NaN on process 1 only, at step 2 (a constant term: the gradients, all-reduced, stay finite):
    what each process did. Both must skip that step (``skip_step``) or stop at it (``stop``)."""
    import torch

    from forgetless.training.config import TrainConfig
    from forgetless.training.hooks import Method
    from forgetless.training.loop import NonFiniteError, train_stage
    from tests.unit.tiny_model import make_lora_model

    class Poison(Method):
        def extra_loss(self, ctx, batch):
            if ctx.step == 1 and accelerator.process_index == 1:
                return torch.tensor(float("nan"))
            return None

    model = make_lora_model(0, b_std=0.05)
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, max_grad_norm=None, precision="fp32", progress=False,
                      on_nonfinite=policy, log_every=1)
    try:
        result = train_stage(model, variable_examples(16, seed=2), cfg, [Poison()], accelerator=accelerator)
    except NonFiniteError as err:
        return {"stopped": (err.step, err.what)}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"skipped": result.extras["skipped_steps"], "weights": weights}


if __name__ == "__main__":
    from accelerate import Accelerator

    from forgetless.methods import common

    common._REDUCE_BUCKET = 1500  # several tensors per bucket, and buckets of one (a tiny state would fit one bucket)
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, "run under accelerate launch with 2 processes"
    results = {case: run(case, batch_size=2, grad_accum=1, accelerator=accelerator) for case in CASES}
    results["epochs"] = run("lora", batch_size=2, grad_accum=1, accelerator=accelerator, epochs=1.0)
    # 10 examples, a global batch of 4: the last step's 2 examples, filled with examples that weigh nothing
    results["ragged-epoch"] = {case: run(case, batch_size=2, grad_accum=1, accelerator=accelerator, epochs=2.0, n=10)
                               for case in ("lora", "sam")}
    # SAM's whole-step eps under accumulation and processes together: 1 example x 2 micro-batches x 2 processes
    results["sam-accum"] = run("sam", batch_size=1, grad_accum=2, accelerator=accelerator)
    # the token counts over a gloo group of their own, as under NCCL (here the default group is gloo already)
    import torch.distributed as dist

    from forgetless.training import loop

    backend, dist.get_backend = dist.get_backend, lambda *a, **k: "nccl"
    try:
        results["lora-cpu-group"] = run("lora", batch_size=2, grad_accum=1, accelerator=accelerator)
    finally:
        dist.get_backend = backend
    results["cpu_groups"] = len(loop._CPU_GROUPS)
    for policy in ("skip_step", "stop"):  # each process's own outcome, saved by each
        torch.save(nonfinite_on_one_process(accelerator, policy),
                   out / f"nonfinite_{policy}_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(results, out / "two_processes.pt")
    accelerator.wait_for_everyone()
