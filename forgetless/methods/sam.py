"""SAM: sharpness-aware minimization (Foret et al. 2021), with the adaptive variant ASAM (Kwon et al. 2021).

Paper equations implemented (SAM, "Sharpness-Aware Minimization for Efficiently Improving Generalization"):

* eq 2 (the first-order solution of the inner maximization)::

      eps(w) = rho * g / ||g||_2,          g = grad L_B(w)

* eq 3 (the SAM gradient used by the base optimizer)::

      g_SAM = grad L_B(w) |_{w + eps(w)}

ASAM ("ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning", eq 10 with p = 2 and the
element-wise operator ``T_w = |w|``)::

      eps(w) = rho * T_w^2 g / ||T_w g||_2

(the ASAM paper adds a small constant, ``T_w = |w| + eta``; we use ``T_w = |w|`` exactly, so a weight that is
exactly zero -- LoRA's B at initialisation -- is not perturbed by ASAM).

Two ways to take eps under gradient accumulation (``perturb``):

* ``step`` (the default): pass 1 of every micro-batch of the optimizer step accumulates the step's gradient, as a
  plain step does; at the step's last micro-batch eps is taken from that gradient (all-reduced, so the same on every
  process), and pass 2 replays the step's micro-batches at w + eps. The SAM gradient of the step's whole objective:
  a batch of 2b, b x 2 accumulated micro-batches and b on each of 2 processes give the same gradient
  (tests/unit/test_loop_parity.py), so the method does not change when memory forces a user to split the batch.
  The micro-batches are held until the step's end (token ids: small); under several processes the replayed passes
  synchronize their gradients (a mean of already-averaged values plus the new ones: the same result, more traffic).
* ``micro``: as below, eps from each micro-batch's own gradient (the SAM paper's m-sharpness, m = the micro-batch).
  With one micro-batch per step (``grad_accum: 1``, every recorded experiment of this repository) the two compute
  the same thing, bit for bit. ``step`` became the default in session 27 without entering run identities (which
  would have marked every recorded SAM run as changed although none changes): a SAM run with ``grad_accum`` > 1
  recorded before then computed ``micro``, and a results folder holding one reuses it; delete its record to
  recompute it.

How ``micro`` runs, for every micro-batch (in :meth:`SAM.wrap_forward_backward`)::

    stash the gradients accumulated so far (earlier micro-batches) and clear .grad
    fb(batch)                        -> g at w        (pass 1)
    eps = rho * g / ||g||            norm over ALL trainable parameters together, float32
    (several processes: g is all-reduced (mean) first, so every process uses the same eps)
    keep a copy of w; w += eps; clear .grad
    fb(batch)                        -> g at w + eps  (pass 2)
    w = the kept copy                (restored bit-exactly, whatever the parameter dtype)
    .grad = pass-2 gradient + stash

Exactly two forward/backward passes per micro-batch (one when SAM is off for that step/stage).

Notes:

* **m-sharpness** (``perturb: micro``). The perturbation is computed per micro-batch, from that micro-batch's
  gradient only (the paper's m-sharpness, section 4.1 / appendix, with m = the micro-batch size), not from the
  gradient of the whole accumulated batch. With ``grad_accum = k`` the final gradient is the mean of the k
  per-micro-batch SAM gradients. Under several processes the ascent gradient is averaged over processes, so m = micro-batch size x
  number of processes (every process perturbs by the same eps, as DDP requires for consistent replicas).
* **Mixed precision.** Forward passes run under the loop's bf16 autocast; the parameters and their ``.grad``
  stay float32 (autocast does not change parameter dtypes), eps is computed in float32 from the float32
  gradients. Scaling the loss by the micro-batch's share of the step's tokens does not change eps (eps is
  normalized).
* **Clipping** happens after: the loop clips the final (SAM) gradient in ``clip_grad_norm_``, as in the
  reference implementations; the ascent step itself is never clipped.
* **Weight decay.** The base optimizer (AdamW) steps normally on g_SAM, so its decoupled weight decay is kept.
* **Several processes** (``accelerate launch``): non-final micro-batches run under ``no_sync``, so their
  gradients are local. We all-reduce (mean) the ascent gradient and the stash of earlier micro-batches together in
  one buffer each micro-batch; averaging is idempotent on already-averaged values, so the final gradient is the
  mean over processes whether or not DDP also synchronized a pass.
* **every_k** (cheaper variant): SAM only on optimizer steps with ``step % every_k == 0``; a plain step (one
  pass) otherwise.
* Works for any trainable parameters (LoRA matrices or a full fine-tune). Memory: one extra copy of the
  trainable parameters (the kept ``w``) plus the stash.

Default ``rho = 1.0``, chosen by the recorded sweep of issue 13 (docs/results/defaults: SmolLM2, ARC-Easy, LoRA r16
on all seven projections, the regime where plain LoRA forgets) with the rule used for HLoRA's phi and EWC's lambda:
the smallest weight that removes at least 90 % of ``lora-nu-mu``'s general-perplexity increase with the domain gain
within one standard error, else the one with the lowest increase. No rho of 0.05, 0.2, 1.0 reached 90 %: 0.05 and 0.2
left +21.7 % and +23.2 % of +28.6 % (noise-level), 1.0 left +6.9 % at +10.8 domain points against +11.0 (one seed).
Above it (closing the bracket): 2.0 removes 91 % but costs 3.4 domain points (+7.6, more than one standard error), and
4.0 breaks training (+146 % perplexity, no domain gain), so the rule keeps 1.0.
The radius is over the LoRA matrices together, whose norm is far larger than a single step, so the 0.05 that SAM
papers use on full weights perturbs them very little. ``{sam: {rho: 0.05}}`` is the papers' setting.

Logged per step (``ctx.log``): ``sam_rho``, ``sam_grad_norm`` (``perturb: step``, the default: ||g|| of the
step's whole loss, the gradient eps is taken from; ``perturb: micro``: the mean over micro-batches of ||g|| of each
micro-batch's mean loss; with ``adaptive: true`` (ASAM) the norm is ||T_w g|| = || |w| * g ||, the one eps is
scaled by), ``sam_perturbed_loss`` (the loss at w + eps; ``loss``/``task_loss`` stay the loss at w).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from forgetless.methods import DOMAIN, GENERAL, MethodSpec, register
from forgetless.methods.common import Options, all_reduce_, option, world_size
from forgetless.training.hooks import Batch, ForwardBackward, Method, StageContext


def sam_perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                     adaptive: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """eps of SAM (eq 2) or ASAM (T = |w|), in float32; also returns the global norm ||g|| (or ||T g||).

    The norm is taken over all tensors together. The per-tensor work is ``torch._foreach_*``: a few grouped kernels
    on a GPU instead of several launches per LoRA matrix (hundreds of them on a 1-8B model with all-linear LoRA);
    on the CPU the same per-tensor operations, so the same numbers.
    """
    g32 = [g.float() for g in grads]
    if not g32:
        return [], torch.zeros(())
    if adaptive:
        t = torch._foreach_abs([p.detach().float() for p in params])
        tg = torch._foreach_mul(t, g32)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tg)))
        scale = rho / (norm + 1e-12)
        eps = torch._foreach_mul(torch._foreach_mul(t, tg), scale)  # rho T^2 g / ||T g||
    else:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g32)))
        scale = rho / (norm + 1e-12)
        eps = torch._foreach_mul(g32, scale)
    return eps, norm


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], eps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """w += eps in place, in grouped (``_foreach``) operations; returns a copy of w for :func:`restore_`."""
    kept = [torch.empty_like(p) for p in params]
    torch._foreach_copy_(kept, params)
    torch._foreach_add_(params, [e.to(p.dtype) for p, e in zip(params, eps)])
    return kept


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], kept: Sequence[torch.Tensor]) -> None:
    """w = the copy :func:`perturb_` kept, bit for bit."""
    torch._foreach_copy_(params, kept)


def add_back_(params: Sequence[torch.nn.Parameter], stash: Sequence[torch.Tensor | None]) -> None:
    """Each parameter's gradient plus its stashed one (earlier micro-batches' gradients), grouped."""
    both = [(p.grad, s) for p, s in zip(params, stash) if s is not None and p.grad is not None]
    if both:
        torch._foreach_add_([g for g, _ in both], [s for _, s in both])
    for p, s in zip(params, stash):
        if s is not None and p.grad is None:
            p.grad = s


@dataclass(repr=False)
class SAMOptions(Options):
    rho: float = option(1.0, "radius of the worst-case perturbation (eq 2), over all trainable weights together "
                             "(chosen by the sweep of docs/results/defaults; SAM papers use 0.05 on full weights)",
                        weight=True, was=0.05)
    adaptive: bool = option(False, "ASAM: perturbation scaled element-wise by |w| (scale-invariant)")
    every_k: int = option(1, "SAM on one optimizer step in every_k, plain steps otherwise (cheaper)")
    perturb: str = option("step", "eps from the whole optimizer step's gradient (step: the same SAM gradient for "
                                  "any split of the step into micro-batches and processes) or from each micro-batch's "
                                  "own (micro: m-sharpness with m = the micro-batch)", choices=("step", "micro"))
    stages: list[str] = option([DOMAIN], "stages SAM runs on (general, domain)")
    record_eps: bool = option(False, "keep the last perturbation (tests, diagnostics)")

    def check(self) -> None:
        if self.rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {self.rho}")
        self.every_k = int(self.every_k)
        if self.every_k < 1:
            raise ValueError(f"SAM every_k must be >= 1, got {self.every_k}")
        if not isinstance(self.stages, (str, list, tuple)):
            raise ValueError(f"SAM stages must be a stage or a list of them ({GENERAL}, {DOMAIN}), got {self.stages!r}")
        self.stages = [self.stages] if isinstance(self.stages, str) else list(self.stages)
        bad = [s for s in self.stages if s not in (GENERAL, DOMAIN)]
        if bad:
            raise ValueError(f"SAM stages must be among {(GENERAL, DOMAIN)}, got {bad}")


class SAM(Method):
    """Sharpness-aware minimization as a wrapper of the loop's forward/backward (two passes per micro-batch)."""

    name = "sam"
    Options = SAMOptions

    def __init__(self, options: SAMOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.last_eps: dict[str, torch.Tensor] | None = None  # filled when record_eps (tests, diagnostics)
        self._norms: list[float] = []
        self._perturbed = 0.0
        self._step_seen: int | None = None
        self._held: list[tuple[Batch, float]] = []  # perturb: step: the step's micro-batches so far, with their scale

    def shapes_general_stage(self) -> bool:
        return GENERAL in self.stages

    def active(self, ctx: StageContext) -> bool:
        return ctx.stage in self.stages and self.rho > 0 and ctx.step % self.every_k == 0

    def wrap_forward_backward(self, ctx: StageContext, forward_backward: ForwardBackward) -> ForwardBackward:
        if ctx.stage not in self.stages:
            return forward_backward

        def sam_forward_backward(batch: Batch) -> torch.Tensor:
            if not self.active(ctx):
                return forward_backward(batch)
            if self.perturb == "step":
                return self._sam_whole_step(ctx, forward_backward, batch)
            return self._sam_step(ctx, forward_backward, batch)

        return sam_forward_backward

    def _sam_step(self, ctx: StageContext, fb: ForwardBackward, batch: Batch) -> torch.Tensor:
        """``perturb: micro``: both passes of this micro-batch, eps from its own gradient."""
        self._start_step(ctx)
        named = ctx.trainable_parameters()
        params = [p for _, p in named]
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None

        loss = fb(batch)  # pass 1: gradient at w
        grads = _first_pass_gradients(params)
        stash_present = [i for i, s in enumerate(stash) if s is not None]
        share = ctx.loss_scale  # the micro-batch's weight in the step's objective
        if world_size() > 1:
            # One buffer: ascent gradients, then the (possibly unsynchronized) stash of earlier micro-batches, then
            # this process's loss scale: their mean over processes is the micro-batch's global weight (the averaged
            # gradient is mean_p(scale_p g_p); divided by one process's own scale, each rank logged another norm)
            stash32 = [stash[i].detach().float() for i in stash_present]
            scale = torch.tensor([ctx.loss_scale], dtype=torch.float32, device=grads[0].device)
            all_reduce_(grads + stash32 + [scale])
            for i, s32 in zip(stash_present, stash32):
                stash[i] = s32.to(stash[i].dtype)
            share = float(scale[0])  # one read per micro-batch, beside this step's collectives
        eps = self._ascent(named, grads, share * ctx.grad_scale)
        self._at_perturbed(ctx, params, eps, lambda: fb(batch).detach())  # pass 2: gradient at w + eps
        add_back_(params, stash)
        self._log(ctx)
        return loss

    def _sam_whole_step(self, ctx: StageContext, fb: ForwardBackward, batch: Batch) -> torch.Tensor:
        """``perturb: step``: pass 1 of every micro-batch accumulates the step's gradient as a plain step does; at the
        step's last micro-batch eps is taken from it (all-reduced: the same on every process), and pass 2 replays the
        step's micro-batches at w + eps, each with its own loss scale. The result is the SAM gradient of the step's
        whole objective, the same for a batch of 2b, b x 2 accumulated and b on each of 2 processes."""
        self._start_step(ctx)
        loss = fb(batch)  # pass 1: accumulates into .grad as a plain micro-batch does
        self._held.append((batch, ctx.loss_scale))
        if ctx.micro < ctx.grad_accum - 1:
            return loss
        named = ctx.trainable_parameters()
        params = [p for _, p in named]
        grads = _first_pass_gradients(params)
        if world_size() > 1:  # the last pass synchronized them; a mean of equal values changes nothing
            all_reduce_(grads)
        eps = self._ascent(named, grads, ctx.grad_scale)  # the step's (token-mean) loss: its gradient's norm as it
        # is (an fp16 loss scale taken out: eps's direction does not depend on it)

        def replay() -> torch.Tensor:  # pass 2 of every micro-batch of the step, at w + eps
            scale, total = ctx.loss_scale, 0.0
            try:
                for held, held_scale in self._held:
                    ctx.loss_scale = held_scale
                    total = total + fb(held).detach()
            finally:
                ctx.loss_scale, self._held = scale, []
            return total

        self._at_perturbed(ctx, params, eps, replay)
        self._log(ctx)
        return loss

    def _start_step(self, ctx: StageContext) -> None:
        if self._step_seen != ctx.step:  # first micro-batch of a new optimizer step
            self._step_seen, self._norms, self._perturbed, self._held = ctx.step, [], 0.0, []

    def _ascent(self, named: list[tuple[str, torch.nn.Parameter]], grads: list[torch.Tensor],
                loss_scale: float) -> list[torch.Tensor]:
        """eps from the first pass's gradients; notes the norm of the mean-loss gradient (the loss it came from is
        scaled by ``loss_scale``) and, with ``record_eps``, eps."""
        eps, norm = sam_perturbation([p for _, p in named], grads, self.rho, self.adaptive)
        if loss_scale > 0:
            self._norms.append(norm.detach() / loss_scale)  # a tensor: no host sync
        if self.record_eps:
            self.last_eps = {n: e.detach().clone() for (n, _), e in zip(named, eps)}
        return eps

    def _at_perturbed(self, ctx: StageContext, params: list[torch.nn.Parameter], eps: list[torch.Tensor],
                      second_pass: Callable[[], torch.Tensor]) -> None:
        """``second_pass()`` at w + eps with fresh gradients, then w restored bit for bit; the losses it adds to the
        step's scalars are dropped (the losses at w stay; the perturbed loss is logged apart)."""
        scalars_after_first = dict(ctx.scalars)
        kept = perturb_(params, eps)
        for p in params:
            p.grad = None
        try:
            perturbed = second_pass()
        finally:
            restore_(params, kept)
        self._perturbed = self._perturbed + perturbed  # fb returns the micro-batch's share of the step's loss
        ctx.scalars.update(scalars_after_first)

    def _log(self, ctx: StageContext) -> None:
        ctx.log("sam_rho", self.rho)
        ctx.log("sam_grad_norm", sum(self._norms) / max(1, len(self._norms)))
        ctx.log("sam_perturbed_loss", self._perturbed)


def _first_pass_gradients(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The first pass's gradients in float32, as they are (zeros where none). p.grad is set to None before the second
    pass, which then allocates new ones, so nothing writes to these (an all-reduce of them, in place, is ours)."""
    return [torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.detach().float() for p in params]


register(MethodSpec("sam", "SAM / ASAM: gradient at the worst-case perturbation w + rho g/||g|| (domain stage by "
                           "default); composes with lora-mu, lora-nu-mu, hlora", stages=None, plugin=SAM))

__all__ = ["SAM", "sam_perturbation"]
