"""EWC-LoRA: elastic weight consolidation of a LoRA update, with a diagonal Fisher from general text.

EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", eq 3) adds
``sum_i lambda/2 F_i (theta_i - theta*_i)**2``. Under LoRA only the update ``dW_l = s_l B_l A_l`` of each module's
base weight ``W_l`` moves, so the penalty is taken over the elements of the full weight, as EWC-LoRA does::

    L = L_mu + lambda * sum_l sum_ij F_l,ij (dW_l,ij - dW_ref_l,ij)**2             (lambda absorbs EWC's 1/2)

Fisher (diagonal), per example ``n``, never the square of a batch-mean gradient::

    G_n = d ell_n / dW = sum_t g_t x_t^T        ell_n: summed NLL of example n; x_t the module input at token t,
                                                g_t = d ell_n / d y_t the gradient of its output
    F   = sum_n G_n**2 / sum_n T_n              T_n: tokens of example n that carry a loss

* ``estimator="sampled"`` (default): the labels of ``ell_n`` are drawn from the model's own predictive
  distribution at every position (teacher-forced on the observed text). This is the Fisher of the EWC and
  EWC-LoRA papers, ``E_{y ~ p_theta}[(d log p / d theta)**2]``, the quantity EWC's Laplace argument needs (it is the
  Gauss-Newton approximation of the Hessian). ``"empirical"`` uses the observed next tokens, as the EWCLoRA
  authors' code does; it is a different matrix (Kunstner et al. 2019, "Limitations of the empirical Fisher
  approximation"), the same cost. Sampling: each example's labels come from a generator of its own, seeded from the
  stage seed and the example's place in the Fisher's list (:func:`example_generator`), one ``torch.multinomial``
  call over its labelled positions: the same draws whatever the batch size, the chunking or the number of processes
  (which each take every world-th example). Before session 33 one generator drew for the examples in order, so two
  processes drew other labels than one (and the same random numbers for their k-th examples).
* Scale: under sampled labels the cross-token terms of ``G_n**2`` vanish in expectation (each drawn token's score
  has zero mean given its context), so ``F`` is the average per-token Fisher: ``lambda * sum F dW**2`` is about
  ``2 lambda`` times the predicted increase of the mean general-text token loss, independent of block length.
  Code that squares the gradient of each example's *mean* token loss gets ``F / T`` for blocks of ``T`` tokens.
* ``fisher_over="lora"`` (default): the base weights of the LoRA target modules, from forward/backward hooks on
  a batched pass (``G_n`` from the module's input and output gradient, as HLoRA's exact estimator). ``"all"``:
  every weight of the model (embeddings, norms, all linear layers), as EWCLoRA does; computed example by example
  with autograd (tied weights handled by autograd). Only the entries under LoRA modules enter the penalty
  (nothing else trains); ``all`` is there to measure what a full Fisher costs to compute and store.
* ``fisher_precision="float32"`` (default): the Fisher's passes run with autocast off, so ``G_n`` is the exact
  per-example gradient on a float32 base (``dtype: fp32``, or ``auto`` where the run computes in float32). Where
  ``dtype: auto`` loaded the frozen base in bf16 (a GPU with bf16, a CPU with native bf16) its weights, and so the
  activations and gradients through it, are bf16 in these passes too: ``G_n`` then carries bf16 rounding (it is
  still squared and summed in float32). ``"run"``: under the run's precision (bf16 autocast on a GPU
  and on CPUs with native bf16), as training steps run; on a GPU the passes then use bf16 matmuls, and the values
  carry bf16 rounding. Measured on an H200 (bench/RESULTS.md, 1B shape, 64 x 1024 tokens): 11.5 s in float32,
  3.4-3.6 s under the run's bf16. Float32 stays the default because on a float32 base it is the exact one; ``run``
  is the choice for large models on a GPU, where a Fisher of a few hundred examples is worth the bf16 rounding of
  G_n.

When the Fisher is computed (and at which weights):

* the run has a general stage: at its end (``on_stage_end``), at the general-stage weights, over up to
  ``samples`` of that stage's examples (a random subset seeded by the stage seed). It is saved with the cached
  general stage (:data:`FILENAME`, safetensors; its size is printed) and reused by every domain run after it.
  EWC does not change how the general stage trains (:meth:`EWC.shapes_general_stage` is False), so ewc runs share
  ``lora-nu-mu``'s cached stage; when that cache has no Fisher of this run's Fisher options (:data:`FISHER_OPTIONS`),
  it is computed at the domain stage's start from the same examples, seed and weights: the same Fisher. That Fisher
  is kept in the stage's folder (``ewc_fisher-<digest of the Fisher options>.safetensors``), so the next run with
  those options (another lambda or anchor, a rerun) reads it instead of computing it again.
* no general stage (``[lora-mu, ewc]``): at the start of the domain stage over the run's general examples, at the
  base model (the adapter is zero there).

Default ``lambda = 100``, chosen by the recorded sweep of issue 13 (docs/results/defaults: SmolLM2, ARC-Easy, the
regime where plain LoRA forgets): the smallest of 10, 100 (1000 not finished) that removes at least 90 % of
``lora-nu-mu``'s general-perplexity increase (+28.6 % there; lambda 100: -3.6 %, lambda 10: +10.3 %, the old default
1 about +13 % in the pilot) with the domain gain within one standard error of ``lora-nu-mu``'s. The penalty was then
11 % of the task loss over the last 10 steps (lambda 1: 0.5 %).

Anchor ``dW_ref``: ``anchor="general"`` (default) is the adapter the domain stage starts from, i.e. the
general-stage update ``dW_nu`` (zero when there is no general stage); ``anchor="zero"`` pulls the whole LoRA
update towards zero, as the EWCLoRA code does. The anchor is not stored: the cached general stage's adapter is it.

The penalty is computed for groups of modules with equal factor shapes (:func:`forgetless.lora.group_modules`): the
Fisher of a group is one stacked tensor, and the group's penalty one :func:`forgetless.lora.weighted_distance`
(modules in chunks, ``dW`` and ``dW_ref`` a batched matmul each, in-place dense passes, nothing dense kept for the backward;
``fused = False`` on the plugin: module by module with autograd, the same value up to rounding). ``ewc_penalty`` is left to the loop as a
tensor (read at its logging interval: no host sync per step).

The wall time and payload size of the Fisher are recorded in the stage's ``extras["importance_cost"]["ewc"]``
(the report compares them with HLoRA's importance). Under several processes every process takes its share of
the examples and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgetless.lm import IGNORE_INDEX, HeadScorer, eval_mode
from forgetless.lora import (DEFAULT_ADAPTER, LoraGroup, compute_dtype, delta_from_factors, factors, fan_in_fan_out,
                             group_modules, lora_modules, scaling, update_shape, weighted_distance)
from forgetless.methods import DOMAIN, GENERAL, MethodSpec, register
from forgetless.methods.common import (STORAGE_DTYPES, Options, PendingState, StateFile, Timer, all_reduce_,
                                       check_modules, option, rank, shard, world_size)
from forgetless.precision import autocast, resolve_precision
from forgetless.progress import say
from forgetless.training.batches import collate
from forgetless.training.hooks import Batch, Method, StageContext

FILENAME = "ewc_fisher.safetensors"
STATE = StateFile(FILENAME, "ewc", "EWC Fisher")
ESTIMATORS = ("sampled", "empirical")
# The options a saved Fisher depends on (the others act on the domain stage or on where it is held).
FISHER_OPTIONS = ("estimator", "samples", "batch_size", "fisher_over", "storage_dtype", "adapter", "fisher_precision")
FISHER_PRECISIONS = ("float32", "run")
_SEED_OFFSET = 104729  # keeps the Fisher's subset and draws independent of the loader's shuffling stream


Draws = torch.Generator | Sequence[torch.Generator] | None  # one generator, or one per row of a batch


def example_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The generator of the sampled labels of example ``index`` (its place in the Fisher's whole list), on
    ``device``: seeded from ``seed`` and ``index`` apart (the seed in the high 32 bits, the index in the low)."""
    return torch.Generator(device=device).manual_seed(((int(seed) % 2**31) << 32) | (int(index) % 2**32))


def _row_generator(generator: Draws, row: int) -> torch.Generator | None:
    return generator[row] if isinstance(generator, Sequence) else generator


def _example_nll(logits: torch.Tensor, labels: torch.Tensor, estimator: str,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """Summed NLL of one example (``logits`` [T, V], ``labels`` [T], unshifted) and its number of loss tokens."""
    targets = labels[1:]
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:-1][keep].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    if estimator == "sampled":  # y_t ~ p_theta(. | observed context), the model's own predictive distribution
        y = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
    else:
        y = targets[keep]
    return -logp.gather(1, y[:, None]).sum(), int(keep.sum())


def rowwise_batch_nll(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, estimator: str,
                      generator: Draws) -> torch.Tensor:
    """The definition :func:`_batch_nll` computes in one pass: :func:`_example_nll` row by row, summed (``keep`` is
    unused; the signature is :func:`_batch_nll`'s). The reference of its test and of ``bench/bench_method_state.py``."""
    loss = None
    for row in range(logits.shape[0]):
        nll, _ = _example_nll(logits[row], labels[row], estimator, _row_generator(generator, row))
        loss = nll if loss is None else loss + nll
    return loss


def _batch_nll(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, estimator: str,
               generator: Draws) -> torch.Tensor:
    """The summed NLL of every example of a batch (``logits`` [B, T, V], ``labels`` [B, T] unshifted, ``keep`` [B, T-1]
    on the CPU: the positions with a loss), as :func:`_example_nll` summed over the rows, in one pass.

    The same numbers: log-softmax is row by row, the labels are drawn example by example in order, each with one
    ``torch.multinomial`` call on exactly the rows :func:`_example_nll` gives it (so the generator is used as it was),
    and the gradient with respect to the logits is bit for bit the same (tested); without a copy of the logits and
    of their gradient per example, and without reading the device (indices come from ``keep``)."""
    targets = labels[:, 1:]
    on_device = keep.to(logits.device, non_blocking=True)
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    if estimator == "sampled":  # y_t ~ p_theta(. | observed context), the model's own predictive distribution
        y = torch.zeros_like(targets)
        probs = logp.detach()
        for row in range(logits.shape[0]):
            if not bool(keep[row].any()):  # (a CPU tensor) nothing to draw
                continue
            index = keep[row].nonzero().squeeze(1).to(logits.device, non_blocking=True)
            drawn = torch.multinomial(probs[row].index_select(0, index).exp(), 1,
                                      generator=_row_generator(generator, row)).squeeze(1)
            y[row].index_copy_(0, index, drawn)
    else:
        y = torch.where(on_device, targets, 0)
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return -torch.where(on_device, picked, 0).sum()


def _chunk_examples(scorer: HeadScorer, rows: int, length: int) -> int | None:
    """Examples per chunk of the head and the NLL when a batch's ``[rows, length, vocab]`` logits would exceed
    :data:`forgetless.training.loss.CHUNK_ELEMENTS` (the training loss's threshold), or None: the whole batch at once.
    A frozen plain ``nn.Linear`` head only, as the chunked cross-entropy of training."""
    from forgetless.training import loss

    if not loss.chunkable_head(scorer):
        return None
    return loss.rows_per_chunk(rows, length * scorer.head.out_features, loss.CHUNK_ELEMENTS)


def _nll_grad_by_chunks(scorer: HeadScorer, hidden: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                        estimator: str, generator: Draws, chunk: int) -> torch.Tensor:
    """The gradient of :func:`_batch_nll` summed over the batch with respect to the backbone's ``hidden`` [B, T, H],
    computed ``chunk`` whole examples at a time: the head, the NLL and their backward for one chunk, whose logits are
    then dropped. The labels are drawn as :func:`_batch_nll` draws them (example by example, in order), and examples
    do not interact, so each example's gradient is the one the whole batch's logits give (to rounding)."""
    grad = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        part = hidden[rows].detach().requires_grad_()
        with torch.enable_grad():
            draws = generator[rows] if isinstance(generator, Sequence) else generator
            loss = _batch_nll(scorer.logits(part), labels[rows], keep[rows], estimator, draws)
        grad[rows] = torch.autograd.grad(loss, part)[0]
    return grad


def fisher_diagonal(model: torch.nn.Module, examples: Sequence[dict], estimator: str = "sampled",
                    fisher_over: str = "lora", batch_size: int = 4, seed: int = 0,
                    adapter: str = "default", precision: str = "fp32", offload: bool = False,
                    example_ids: Sequence[int] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """The diagonal Fisher ``F = sum_n G_n**2 / sum_n T_n`` over ``examples`` (``{input_ids, labels}``) in order.

    Returns ``({parameter name: F}, tokens)``; names are the model's parameter names (for a LoRA module
    ``<module>.base_layer.weight``). The model is put in eval mode (no dropout) and restored; no ``.grad`` is touched.
    Sampled labels: example ``k``'s from ``example_generator(seed, example_ids[k])`` (``example_ids``: the examples'
    places in the whole list when this process has a share of it; default ``0, 1, ...``), one ``torch.multinomial``
    call per example. Under several processes each passes its share; the sums are all-reduced.
    ``precision`` (:data:`forgetless.precision.PRECISIONS`): the forward, the backward and the per-example ``G_n``
    run with autocast off with ``"fp32"`` (the default: the exact Fisher on a float32 base; a bf16 base still
    computes in bf16), under bf16 autocast where it resolves to ``"bf16"`` (the training loop's matmul precision;
    ``G_n`` is squared and summed in float32 either way).

    Gradient checkpointing, when the model has it on, stays on: dropout is off (eval mode) but the checkpointed
    layers keep recomputing their activations (:func:`_eval_keeping_checkpointing`), and each module's input is held
    as a saved tensor of the backward (recomputed with the layer, not kept alive by a hook). ``offload``: the
    ``fisher_over="lora"`` sums are kept in CPU memory (each batch's ``sum_n G_n**2`` is copied there), so the device
    holds no Fisher-sized tensor while it is computed; the same numbers. When a batch's logits would be large (above
    the training loss's :data:`forgetless.training.loss.CHUNK_ELEMENTS`, e.g. 4 x 1024 tokens of a 128k vocabulary)
    the head and the NLL run a chunk of whole examples at a time (:func:`_nll_grad_by_chunks`): the same draws and,
    to rounding, the same Fisher, without the batch's ``[B, T, vocab]`` logits and their gradient.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not examples and world_size() == 1:  # under several processes one may have no share: the sum decides
        raise ValueError("EWC needs general-text examples to compute the Fisher")
    if example_ids is None:  # this process's share as methods.common.shard cuts it (every example for one process)
        ids = list(range(rank(), rank() + world_size() * len(examples), world_size()))
    else:
        ids = [int(i) for i in example_ids]
    if len(ids) != len(examples):
        raise ValueError(f"example_ids: {len(ids)} ids for {len(examples)} examples")
    device = next(model.parameters()).device
    draws = None if estimator != "sampled" else [example_generator(seed, i, device) for i in ids]
    with _eval_keeping_checkpointing(model), _fisher_autocast(precision, device):
        if fisher_over == "lora":
            fisher, tokens = _fisher_lora(model, examples, estimator, batch_size, draws, adapter, offload)
        elif fisher_over == "all":
            fisher, tokens = _fisher_all(model, examples, estimator, draws)
        else:
            raise ValueError(f"fisher_over must be 'lora' or 'all', got {fisher_over!r}")
    count = torch.tensor(float(tokens), device=device, dtype=torch.float64)
    all_reduce_(list(fisher.values()) + [count], op="sum")
    if not float(count):  # every process alike: the count is the sum
        raise ValueError(f"EWC's Fisher: none of its examples has a labelled token ({len(examples)} here)")
    for t in fisher.values():
        t.div_(max(float(count), 1.0))
    return fisher, int(count)


def _fisher_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The training loop's autocast for a bf16 ``precision``; for fp32, autocast switched off (not merely not
    entered: a caller's own autocast must not reach the Fisher's passes)."""
    if resolve_precision(precision, device) == "bf16":
        return autocast(precision, device)
    return torch.autocast(device_type=device.type, enabled=False)


@contextlib.contextmanager
def _eval_keeping_checkpointing(model: torch.nn.Module):
    """Eval mode (no dropout) for the Fisher's passes, except the ``training`` flag of the layers that checkpoint
    their activations: transformers recomputes a layer only when it is training (``gradient_checkpointing and
    training``), so a plain ``model.eval()`` would hold every activation of the batch, as a training step without
    checkpointing does (48 GiB at the 8B shape against 22 GiB with it). The flag of those layers themselves is all
    that is set: their children (attention and LoRA dropout) stay in eval mode. :func:`forgetless.lm.eval_mode`
    restores every module's mode on exit, those layers' included."""
    with eval_mode(model):
        for layer in model.modules():
            if getattr(layer, "gradient_checkpointing", False) is True:
                layer.training = True
        yield


class _SquaredExampleGradients(torch.autograd.Function):
    """Identity on a LoRA module's output whose backward hands ``(grad_output, input)`` to ``sink``.

    The input is a saved tensor of this node, so under non-reentrant gradient checkpointing it is dropped after the
    forward and recomputed with its layer when the backward reaches it, as the layer's own activations are (a hook
    closing over it would keep every module's input of the batch alive). The output is a copy: a later in-place
    operation on it cannot reach the module's own result."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, x: torch.Tensor, sink) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.sink = sink
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        ctx.sink(grad_output, x)
        return grad_output, None, None


def _fisher_lora(model, examples, estimator, batch_size, draws, adapter, offload=False):
    modules = lora_modules(model, adapter)
    if not modules:
        raise ValueError(f"EWC found no LoRA modules of adapter {adapter!r} in the model (attach LoRA first)")
    # verified on a probe before the hooks go in (a model that rescales its logits after the head: the full logits)
    scorer = HeadScorer(model)
    fisher: dict[str, torch.Tensor] = {}
    hooks = []
    batch_shape = [0, 0]  # (examples, positions) of the batch in the model now

    def by_example(t: torch.Tensor, name: str) -> torch.Tensor:
        """A module's input or output gradient as [examples, positions, features]: as the module saw it, or, where
        the model flattened the tokens before calling it ([examples x positions, features]: Qwen2-MoE's shared
        expert), unflattened; a module that sees only some tokens (a routed expert) has no per-example gradient."""
        examples_now, positions = batch_shape
        lead = t.shape[:-1]
        if lead and lead[0] == examples_now:
            return t.reshape(examples_now, -1, t.shape[-1])
        if math.prod(lead) == examples_now * positions:
            return t.reshape(examples_now, positions, t.shape[-1])
        raise ValueError(f"EWC's Fisher needs the examples of a batch apart in each LoRA module's input; {name} gets "
                         f"{list(t.shape)} for {examples_now} examples of {positions} positions (a routed expert?): "
                         f"leave it out of lora.target_modules")

    def install(key: str, module: torch.nn.Module, transpose: bool) -> None:
        def sink(grad_out: torch.Tensor, x: torch.Tensor) -> None:
            acc = fisher[key]
            dtype = acc.dtype
            go = by_example(grad_out, key.removesuffix(".base_layer.weight")).to(dtype)
            xi = by_example(x, key.removesuffix(".base_layer.weight")).to(dtype)
            # G_n = sum_t g_t x_t^T, one per example: [B, out, in] (a bf16 matmul under autocast; squared in fp32)
            g = torch.bmm(go.transpose(1, 2), xi).to(dtype)
            squares = (g.transpose(1, 2) if transpose else g).square().sum(0)  # in the base weight's layout
            acc.add_(squares.to(acc.device))  # a copy to CPU memory when offloaded, else nothing

        def forward_hook(mod, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not (isinstance(out, torch.Tensor) and out.requires_grad) or not args:
                return None
            wrapped = _SquaredExampleGradients.apply(out, args[0].detach(), sink)
            return (wrapped,) + tuple(output[1:]) if isinstance(output, tuple) else wrapped

        hooks.append(module.register_forward_hook(forward_hook))

    grad_inputs = []
    for name, module in modules:
        a_param = factors(module, adapter)[0]  # the update's shape, not the (possibly packed 4-bit) base weight's
        on_host = offload and a_param.device.type != "cpu"
        fisher[f"{name}.base_layer.weight"] = torch.zeros(update_shape(module, adapter),
                                                          dtype=compute_dtype(a_param.dtype),
                                                          device="cpu" if on_host else a_param.device)
        grad_inputs.append(factors(module, adapter)[0])
        install(f"{name}.base_layer.weight", module, fan_in_fan_out(module))
    tokens = 0
    try:
        for start in range(0, len(examples), batch_size):
            on_cpu = collate(examples[start:start + batch_size], pad_token_id=0)
            generator = None if draws is None else draws[start:start + batch_size]  # one per example
            batch_shape[:] = on_cpu["input_ids"].shape
            keep = on_cpu["labels"][:, 1:] != IGNORE_INDEX  # on the CPU: counts and indices without a device read
            tokens += int(keep.sum())
            batch = {k: v.to(grad_inputs[0].device) for k, v in on_cpu.items()}
            # d(sum_n ell_n)/dy is d ell_n/dy on example n's rows (examples do not interact): hooks see each G_n.
            # Asking for the LoRA A gradients makes autograd pass through every module output; .grad is untouched.
            chunk = _chunk_examples(scorer, *on_cpu["input_ids"].shape)
            if chunk is None:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = _batch_nll(logits, batch["labels"], keep, estimator, generator)
                torch.autograd.grad(loss, grad_inputs, allow_unused=True)
                continue
            # large logits (e.g. 4 x 1024 x 128k): the backbone once, the head and the NLL a chunk of examples at a
            # time, then one backward through the backbone with the chunks' gradients
            hidden = scorer.hidden(batch["input_ids"], batch["attention_mask"])
            grad = _nll_grad_by_chunks(scorer, hidden, batch["labels"], keep, estimator, generator, chunk)
            torch.autograd.grad(hidden, grad_inputs, grad_outputs=grad, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    return fisher, tokens


def _fisher_all(model, examples, estimator, draws):
    from forgetless.models import is_quantized

    if is_quantized(model):
        raise ValueError("EWC fisher_over: all needs float base weights; this base is quantized (use fisher_over: lora)")
    params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    saved = [p.requires_grad for _, p in params]
    fisher = {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params}
    tokens = 0
    try:
        for _, p in params:
            p.requires_grad_(True)
        for k, example in enumerate(examples):  # one at a time: autograd gives G_n of every weight, tied ones too
            batch = {k: v.to(params[0][1].device) for k, v in collate([example], pad_token_id=0).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, count = _example_nll(logits[0], batch["labels"][0], estimator, None if draws is None else draws[k])
            tokens += count
            grads = torch.autograd.grad(nll, [p for _, p in params], allow_unused=True)
            for (name, _), g in zip(params, grads):
                if g is not None:
                    fisher[name].add_(g.to(fisher[name].dtype).square())
    finally:
        for (_, p), flag in zip(params, saved):
            p.requires_grad_(flag)
    return fisher, tokens


def load_fisher(path: str | Path) -> dict[str, Any]:
    """Read a file written by :meth:`EWC.save_state`: ``{"fisher": {name: Tensor}, "metadata": dict}`` (CPU)."""
    fisher, metadata = STATE.load(path)
    return {"fisher": fisher, "metadata": metadata}


@dataclass(repr=False)
class EWCOptions(Options):
    lam: float = option(100.0, "weight of the penalty lambda * sum F (dW - dW_ref)^2 (chosen by the sweep of "
                               "docs/results/defaults)", yaml="lambda", domain=True, weight=True, was=1.0)
    estimator: str = option("sampled", "labels of the Fisher: drawn from the model (sampled) or observed (empirical)",
                            choices=ESTIMATORS)
    samples: int | None = option(128, "general examples the Fisher is computed over (null: all)")
    batch_size: int = option(4, "examples per batched pass when computing the Fisher")
    fisher_over: str = option("lora", "weights the Fisher covers: the LoRA target weights, or all (as EWCLoRA)",
                              choices=("lora", "all"))
    anchor: str = option("general", "pull towards the adapter the domain stage starts from, or towards zero",
                         choices=("general", "zero"), domain=True)
    fisher_precision: str = option("float32", "precision of the Fisher's passes: float32 (autocast off: exact "
                                              "per-example gradients on a float32 base) or run (the run's precision, "
                                              "bf16 autocast on GPUs: faster there, values rounded)",
                                   choices=FISHER_PRECISIONS)
    storage_dtype: str = option("float32", "dtype of the Fisher, saved and held in memory (bfloat16 halves both; the "
                                           "penalty is computed in float32)", choices=tuple(STORAGE_DTYPES))
    offload: str = option("none", "keep the Fisher in CPU memory, while it is computed and afterwards, and copy each "
                                  "module's part to the device when the penalty needs it (GPU memory for PCIe "
                                  "traffic)", choices=("none", "cpu"),
                          domain=True)
    adapter: str = option(DEFAULT_ADAPTER, "the PEFT adapter to regularize")

    def check(self) -> None:
        if self.lam < 0 or int(self.batch_size) < 1 or (self.samples is not None and int(self.samples) < 1):
            raise ValueError("need lambda >= 0, batch_size >= 1 and samples >= 1 (or null for all)")
        self.batch_size = int(self.batch_size)
        self.samples = None if self.samples is None else int(self.samples)


class EWC(Method):
    """EWC on the LoRA update ``dW = s B A`` with a diagonal Fisher of general text (see the module docstring)."""

    name = "ewc"

    Options = EWCOptions

    def __init__(self, options: EWCOptions | None = None, **kwargs: Any) -> None:
        if "lambda" in kwargs:  # the YAML name; `lambda` is a Python keyword
            kwargs["lam"] = kwargs.pop("lambda")
        super().__init__(options, **kwargs)
        self.fisher: dict[str, torch.Tensor] = {}  # parameter name -> F
        self.metadata: dict[str, Any] = {}
        self._stage_examples: Sequence[dict] | None = None
        self._state = PendingState(STATE)
        self._terms: list[_Term] = []  # one per group of equal-shaped modules
        self._stage_cache: Path | None = None  # the cached general stage load_state was given, if it is one
        self._given: Path | None = None  # a folder load_state was given that held no Fisher (for the error)

    fused = True  # one weighted_distance per group; False: module by module with autograd (the same value)

    # ----------------------------------------------------------------------------------------------- stages
    def prepare_examples(self, ctx: StageContext, examples: Sequence[dict]) -> Sequence[dict]:
        if ctx.stage == GENERAL:
            self._stage_examples = examples  # the Fisher is computed on them at the end of the stage
        return examples

    def on_stage_start(self, ctx: StageContext) -> None:
        lora_modules(ctx.model, self.adapter)  # a DoRA or LoRA-bias adapter: refused now, not after the stage
        if ctx.stage == GENERAL:
            self.fisher, self.metadata, self._state.path = {}, {}, None
        elif ctx.stage == DOMAIN:
            loaded = self._state.take()
            # a Fisher of other Fisher options (a shared cached stage's) is recomputed when the examples are here;
            # one loaded by hand with nothing to recompute it from is used as it is
            if loaded is not None and (self._fits(loaded[1]) or not ctx.general_examples):
                self.fisher, self.metadata = loaded
            kept = self._kept_file()
            if not self.fisher and kept is not None and ctx.general_examples:  # computed here by an earlier run
                try:
                    tensors, metadata = kept.load(self._stage_cache)
                except FileNotFoundError:
                    pass
                else:
                    if self._fits(metadata):
                        self.fisher, self.metadata = tensors, metadata
                        self._state.source = str(kept.locate(self._stage_cache))
                        self._report_cost(ctx, kept=True)
            # No Fisher yet: no general stage in this run (the Fisher of the base model, anchored at zero), or a
            # cached general stage shared with lora-nu-mu (its adapter is the general-stage weights: computed here
            # over the same examples with the same seed, it is the Fisher the stage's end would have given).
            if not self.fisher:
                if not ctx.general_examples:
                    given = (f" ({self._given} has no {FILENAME}: a stage trained without EWC, or a mistyped folder?)"
                             if self._given is not None else "")
                    raise ValueError(f"EWC needs a Fisher{given}: run a general stage with EWC first, load_state() a "
                                     f"folder with {FILENAME}, or give the domain stage general-text examples")
                self._compute(ctx, ctx.general_examples)
                if kept is not None and rank() == 0:  # beside the cached stage, for the next run of these
                    kept.save(self._stage_cache, self.fisher, self.metadata, STORAGE_DTYPES[self.storage_dtype])
            self._start_domain(ctx)
        else:
            raise ValueError(f"EWC does not know stage {ctx.stage!r}")

    def on_stage_end(self, ctx: StageContext) -> None:
        if ctx.stage == GENERAL:
            examples, self._stage_examples = self._stage_examples, None
            self._compute(ctx, examples or ())

    def needs_general_text(self, stages: Sequence[str]) -> bool:
        return GENERAL not in stages and self._state.path is None  # no general stage, no Fisher loaded: computed on it

    def shapes_general_stage(self) -> bool:
        return False  # the Fisher is read off the general stage, which trains as lora-nu-mu's (see on_stage_start)

    def _fits(self, metadata: dict[str, Any]) -> bool:
        """Whether a saved Fisher was computed as this run's would be (a shared cached stage may hold the one of an
        ewc run with other Fisher options)."""
        theirs, mine = metadata.get("options") or {}, self.options.as_dict()
        defaults = type(self.options)().as_dict()  # a key a Fisher saved before it existed had its default
        return all(theirs.get(k, defaults[k]) == mine[k] for k in FISHER_OPTIONS)

    def _compute(self, ctx: StageContext, examples: Sequence[dict]) -> None:
        seed = int(getattr(ctx.config, "seed", 0) or 0) if ctx.config is not None else 0
        chosen = list(examples)
        if not chosen:  # on every process alike (each would otherwise find only its own share empty)
            raise ValueError("EWC needs general-text examples to compute the Fisher")
        if self.samples is not None and self.samples < len(chosen):
            g = torch.Generator().manual_seed(seed + _SEED_OFFSET)
            chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=g)[: self.samples].tolist()]
        model = ctx.model
        with Timer(next(model.parameters()).device) as timer:
            precision = "fp32" if self.fisher_precision == "float32" else getattr(ctx.config, "precision", "auto")
            fisher, tokens = fisher_diagonal(model, shard(chosen), self.estimator, self.fisher_over, self.batch_size,
                                             seed + _SEED_OFFSET, self.adapter, precision, self.offload == "cpu",
                                             example_ids=shard(range(len(chosen))))
        seconds = timer.seconds
        self.fisher = fisher
        self.metadata = {"model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
                         "options": self.options.as_dict(),
                         "estimator": self.estimator, "fisher_over": self.fisher_over, "examples": len(chosen),
                         "tokens": tokens, "stage": ctx.stage, "seconds": seconds, "dtype": self.storage_dtype,
                         "shapes": {n: list(t.shape) for n, t in fisher.items()}}
        self._report_cost(ctx)

    def _report_cost(self, ctx: StageContext, kept: bool = False) -> None:
        """The report's cost table entry for this Fisher (``kept``: read from a file an earlier run computed; the
        seconds are that computation's)."""
        size = STORAGE_DTYPES[self.storage_dtype].itemsize
        meta = self.metadata
        ctx.extras.setdefault("importance_cost", {})["ewc"] = {
            "what": f"diagonal Fisher ({self.estimator}, over {self.fisher_over} weights)",
            "seconds": float(meta.get("seconds", 0.0)), "bytes": sum(t.numel() * size for t in self.fisher.values()),
            "examples": meta.get("examples"), "tokens": meta.get("tokens"), "tensors": len(self.fisher)} | (
            {"kept": True} if kept else {})

    # --------------------------------------------------------------------------------- domain: the penalty
    def _start_domain(self, ctx: StageContext) -> None:
        self._terms = []
        modules = lora_modules(ctx.model, self.adapter)
        if not modules:
            raise ValueError(f"EWC found no LoRA modules of adapter {self.adapter!r} in the model (attach LoRA first)")
        keys = {f"{name}.base_layer.weight": module for name, module in modules}
        source = self._state.source or "computed in this run"
        under_lora = {k: t for k, t in self.fisher.items() if k.endswith(".base_layer.weight")}  # 'all' has more
        check_modules("EWC Fisher", source, under_lora, {k: update_shape(m, self.adapter) for k, m in keys.items()})
        held = STORAGE_DTYPES[self.storage_dtype]
        for group in group_modules(modules, self.adapter):
            names = [f"{name}.base_layer.weight" for name in group.names]
            device = torch.device("cpu") if self.offload == "cpu" else group.device
            fisher = torch.stack([self.fisher[k].to(device, held) for k in names])  # [n, *weight shape]
            if self.offload == "cpu" and group.device.type == "cuda":
                fisher = fisher.pin_memory()
            for i, key in enumerate(names):  # the table now views the stack: the Fisher is held once
                self.fisher[key] = fisher[i]
            # The anchor dW_ref is kept as its factors (r (in + out) numbers, not out x in), multiplied out when the
            # penalty needs it.
            ref = group.stacked() if self.anchor == "general" else None
            self._terms.append(_Term(group, fisher, ref))
        ctx.extras["ewc_anchor"] = self.anchor

    def penalty(self) -> torch.Tensor:
        """``sum_l sum_ij F_l,ij (dW_l,ij - dW_ref_l,ij)**2``, differentiable in A and B."""
        if not self._terms:
            raise ValueError("EWC's penalty is used before the domain stage started")
        if not self.fused:
            return self._penalty_plain()
        total = None
        for term in self._terms:  # one weighted_distance per group of equal-shaped modules
            g = term.group
            with torch.autocast(device_type=g.device.type, enabled=False):
                a, b = g.stacked(detach=False)
                anchor = (*term.ref, g.scaling) if term.ref is not None else None  # the Fisher moves chunk by chunk
                t = weighted_distance(a, b, g.scaling, term.fisher, fan_in_fan_out=g.fan_in_fan_out, ref_factors=anchor)
            total = t if total is None else total + t
        return total

    def _penalty_plain(self) -> torch.Tensor:
        """:meth:`penalty` module by module, from each module's own factors."""
        total = None
        for term in self._terms:
            g = term.group
            for i, module in enumerate(g.modules):
                a, b = factors(module, self.adapter)
                s = scaling(module, self.adapter)
                with torch.autocast(device_type=a.device.type, enabled=False):
                    diff = delta_from_factors(a, b, s, g.fan_in_fan_out, g.dtype)
                    if term.ref is not None:
                        diff = diff - delta_from_factors(term.ref[0][i], term.ref[1][i], s, g.fan_in_fan_out, g.dtype)
                    t = (term.fisher[i].to(a.device, g.dtype, non_blocking=True) * diff.square()).sum()
                total = t if total is None else total + t
        return total

    def extra_loss(self, ctx: StageContext, batch: Batch) -> torch.Tensor | None:
        if ctx.stage != DOMAIN or self.lam == 0:
            return None
        pen = self.penalty()
        scaled = self.lam * pen
        ctx.log("ewc_penalty", pen)  # read by the loop at its logging interval: no host sync here
        ctx.log("ewc_penalty_scaled", scaled)
        return scaled

    # ---------------------------------------------------------------------------------------- persistence
    def save_state(self, directory: Path) -> None:
        path = self._state.save(directory, self.fisher, self.metadata, STORAGE_DTYPES[self.storage_dtype])
        if path is not None:
            say(f"EWC Fisher: {path} ({path.stat().st_size / 2**20:.2f} MiB, {len(self.fisher)} tensors, "
                f"{self.storage_dtype}, {self.metadata.get('seconds', 0.0):.1f} s to compute)")

    def load_state(self, directory: Path) -> None:
        """Remember the file; it is read and checked against the model at the domain stage's start. A cached general
        stage trained without EWC (lora-nu-mu's) has none: the Fisher is then computed when the domain stage starts,
        and kept beside the stage (:meth:`_kept_file`) for the next run with the same Fisher options."""
        self.fisher = {}
        self._state.remember(directory, missing_ok=True)
        self._given = None if self._state.path is not None else Path(directory)  # for the error when none is found
        stage = Path(directory)
        self._stage_cache = stage if (stage / "stage.json").is_file() else None  # a forgetless stage cache only

    def _kept_file(self) -> StateFile | None:
        """Where a Fisher computed at the domain start of a cached general stage is kept, in that stage's folder: one
        file per Fisher options (``ewc_fisher-<digest>.safetensors``), so runs that differ in lambda or the anchor
        (a sweep; a rerun) read it instead of recomputing (minutes at SmolLM2's size), and runs of other Fisher options
        keep their own. The stage's own ``ewc_fisher.safetensors`` (a stage an ewc run trained) is not touched."""
        if self._stage_cache is None:
            return None
        options = self.options.as_dict()
        key = json.dumps({k: options[k] for k in FISHER_OPTIONS}, sort_keys=True, default=str)
        return StateFile(f"ewc_fisher-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors", STATE.kind,
                         STATE.what)


class _Term:
    """The penalty's state for one group of equal-shaped LoRA modules: the stacked Fisher ``[n, *weight shape]`` (on
    the group's device, or in CPU memory when offloaded) and the anchor's stacked factors (None: anchored at zero)."""

    def __init__(self, group: LoraGroup, fisher: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.group, self.fisher, self.ref = group, fisher, ref


register(MethodSpec("ewc", "EWC-LoRA: diagonal Fisher of general text on the LoRA target weights, "
                           "lambda * sum F (dW - dW_ref)^2 on the domain stage", stages=None, plugin=EWC))

__all__: Sequence[str] = ["EWC", "fisher_diagonal", "load_fisher", "FILENAME", "ESTIMATORS"]
