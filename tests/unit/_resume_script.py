"""A training stage that can be killed (SIGKILL) after k optimizer steps and resumed from its checkpoints, for
tests/unit/test_resume.py. As a script: ``python -m tests.unit._resume_script CASE CHECKPOINT_DIR K THREADS``
runs the stage and kills itself right after step K's checkpoint is complete."""

from __future__ import annotations

import os
import signal
import sys

import torch

CASES = {  # name: (method entry, stage)
    "sam": ([{"name": "sam", "rho": 0.05}], "domain"),
    "hlora": ([{"name": "hlora", "estimator": "paper"}], "general"),
    "ewc": (["lora-mu", {"name": "ewc", "lambda": 100.0, "samples": 6}], "domain"),
}
STEPS = 6


def run_stage(case: str, checkpoint_dir=None, kill_after: int | None = None, keep: bool = False, lr: float = 1e-2,
              r: int = 4, entry: list | None = None, alpha: int = 8):
    from accelerate import Accelerator

    from forgetless.methods import resolve
    from forgetless.models import LoraSettings, attach_lora
    from forgetless.training.config import TrainConfig
    from forgetless.training.hooks import Method
    from forgetless.training.loop import train_stage
    from tests.unit.tiny_model import make_tiny_model, random_examples, randomize_lora_b

    class Killer(Method):
        def before_optimizer_step(self, ctx) -> None:
            if kill_after is not None and ctx.step == kill_after:  # step kill_after's checkpoint is written
                os.kill(os.getpid(), signal.SIGKILL)

    entry, stage = (entry, CASES[case][1]) if entry is not None else CASES[case]
    torch.manual_seed(0)
    model = attach_lora(make_tiny_model(0), LoraSettings(r=r, alpha=alpha, dropout=0.1,
                                                         target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model, seed=1, std=0.05)
    plugins = resolve(entry).plugins
    cfg = TrainConfig(max_steps=STEPS, batch_size=2, grad_accum=2, lr=lr, precision="fp32", progress=False,
                      save_every=1, keep_checkpoints=keep)
    result = train_stage(model, random_examples(12, 8, seed=3, prompt=2), cfg, plugins + [Killer()], stage=stage,
                         accelerator=Accelerator(cpu=True), general_examples=random_examples(8, 8, seed=4),
                         checkpoint_dir=checkpoint_dir)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, plugins, result


if __name__ == "__main__":
    case, folder, k, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    run_stage(case, folder, kill_after=k)
    sys.exit(3)  # not reached: the stage kills itself
