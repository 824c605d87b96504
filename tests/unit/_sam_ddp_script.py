"""Run under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo): one SAM micro-batch with different data per rank.

The model is deliberately *not* wrapped in DDP, so nothing but SAM's own all-reduce synchronizes the ascent
gradient (as for non-final micro-batches, which the loop runs under ``no_sync``). Each rank writes its local
gradient and its eps to ``<out>/...rank{r}.pt``; the test checks the eps are identical.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from forgetless.methods.sam import SAM
from forgetless.training.batches import collate
from forgetless.training.hooks import StageContext
from forgetless.training.loss import causal_lm_loss
from tests.unit.tiny_model import make_lora_model, random_examples


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    assert accelerator.num_processes == 2 and torch.distributed.get_backend() == "gloo", "not a 2-process gloo run"
    model = make_lora_model(0)
    torch.manual_seed(1)  # same non-zero B on every rank, so that A gets a gradient too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = collate(random_examples(2, 8, seed=10 + rank), pad_token_id=0)  # different data per rank
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ctx = StageContext(stage="domain", model=model, optimizer=opt, scheduler=None, accelerator=accelerator, config=None)

    causal_lm_loss(model, batch).backward()
    local = {n: p.grad.detach().clone() for n, p in ctx.trainable_parameters()}
    opt.zero_grad(set_to_none=True)

    def fb(b):
        loss = causal_lm_loss(model, b)
        loss.backward()
        return loss.detach()

    sam = SAM(rho=0.05, record_eps=True)
    sam.wrap_forward_backward(ctx, fb)(batch)
    torch.save(local, out / f"local_grad_rank{rank}.pt")
    torch.save(sam.last_eps, out / f"eps_rank{rank}.pt")

    # perturb: micro with the loop's weights: rank r's micro-batch loss scaled by n_r * P / N (here 0.5 and 1.5)
    opt.zero_grad(set_to_none=True)
    ctx.loss_scale = (0.5, 1.5)[rank]

    def weighted(b):
        loss = causal_lm_loss(model, b)
        (loss * ctx.loss_scale).backward()
        return loss.detach()

    ctx.scalars = {}
    SAM(rho=0.05, perturb="micro").wrap_forward_backward(ctx, weighted)(batch)
    torch.save(float(ctx.scalars["sam_grad_norm"]), out / f"micro_norm_rank{rank}.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
