"""HLoRA's and EWC's per-step work and HLoRA's state, new path vs old, side by side in one run (issues #12 item 8,
#15 item 3).

Model: a tiny random Llama with many LoRA modules (24 layers, LoRA r=8 on all seven projections: 168 modules;
hidden 128, intermediate 256, 2 of 4 heads for k/v), fp32, on the CPU unless --device says otherwise.

Timed, each as forward + backward of the term (what a domain step adds) or one path-integral step (general stage):

* ``hlora_regularizer``: new (``forgetless.lora.weighted_distance`` per shape group: dW_nu from its factors, a few
  in-place dense passes, the factors' gradients from one kept tensor) vs old (autograd over the formula per group with
  a dense dW_nu, the code before factors); also the plain module-by-module autograd loop (``fused=False``).
* ``hlora_path_integral``: ``before_optimizer_step`` + ``after_optimizer_step`` of the general stage, modules in
  chunks (new) vs one module at a time (``fused=False``), with an SGD step between.
* ``ewc_penalty``: new (modules grouped by shape: stacked Fisher, one ``weighted_distance`` per group) vs old (the
  autograd loop over modules, ``fused=False``).
* ``ewc_fisher_sampled`` / ``ewc_fisher_empirical``: ``fisher_diagonal`` (EWC's defaults, a smaller model: 8 layers,
  vocabulary 2048, 16 x 256 tokens) with the Fisher's NLL in one pass over the batch (new) vs example by example
  (old); the same Fisher bit for bit (tests/unit/test_ewc.py).

The machine is shared and loaded: the variants are interleaved within each repetition (so a slow minute hits all of
them) and each ratio is the median over repetitions of the per-repetition ratio of medians. Only ratios are printed
for times. Also printed: HLoRA's state in bytes (in memory after the general stage, and the saved file) with dW_nu
dense (before) and as factors (now), on this model and, from its shapes, on SmolLM2-135M with LoRA r=16 on all seven
projections (the demo's setting).

With ``--smollm2-widths`` the tiny Llama has SmolLM2-135M's widths and depth (hidden 576, intermediate 1536, 9 heads
of which 3 for k/v, 30 layers; vocabulary 256): the dense tensors of the regularizer and penalty are then SmolLM2's
(119M elements with LoRA on all seven projections), where memory traffic, not launches, sets their cost.

``--chunk-sweep`` times only ``forgetless.lora.weighted_distance`` (forward + backward) at chunk sizes 2^18 to
2^26 elements of dW and unchunked, each against autograd over the formula, on random factors of SmolLM2's shape
groups (r=16 on all seven projections): how ``CHUNK_ELEMENTS`` was chosen.

``--rank-2r`` times only the dense differences dW - dW' (HLoRA's path-integral step and ``weighted_distance``)
as one rank-2r matmul (:func:`forgetless.lora.update_difference`, new) against two rank-r products and a
subtraction (old), on SmolLM2's shape groups, and prints the fp32 accuracy of both.

Usage: python bench/bench_method_state.py [--reps 15] [--inner 5] [--layers 24] [--threads 1] [--device cpu]
       [--smollm2-widths] [--skip-fisher] [--chunk-sweep] [--rank-2r]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


WIDTHS = {"tiny": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2},
          "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                      "num_key_value_heads": 3}}


def make_model(layers: int, device: str, widths: str = "tiny") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetless.models import LoraSettings, attach_lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, **WIDTHS[widths], num_hidden_layers=layers, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model = attach_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=ALL_SEVEN))
    return model.to(device)


def lora_params(model):
    from forgetless.lora import lora_modules

    return [p for _, m in lora_modules(model) for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]


def perturb(model, seed: int, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_params(model):
            p.add_(std * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def ctx_for(stage: str, model, lr: float = 1e-2):
    from forgetless.training.config import TrainConfig
    from forgetless.training.hooks import StageContext

    opt = torch.optim.SGD(lora_params(model), lr=lr)
    return StageContext(stage=stage, model=model, optimizer=opt, scheduler=None, accelerator=None,
                        config=TrainConfig(precision="fp32", progress=False))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, inner: int, device: str) -> float:
    """Median of ``inner`` calls' wall times (or of the seconds a call returns: the part it timed itself)."""
    times = []
    for _ in range(inner):
        sync(device)
        start = time.perf_counter()
        own = fn()
        sync(device)
        times.append(own if own is not None else time.perf_counter() - start)
    return statistics.median(times)


def compare(variants: dict, reps: int, inner: int, device: str, baseline: str) -> dict[str, float]:
    """Median over repetitions of (variant time / baseline time), the variants interleaved in each repetition."""
    for fn in variants.values():  # warm-up
        fn()
    ratios: dict[str, list[float]] = {name: [] for name in variants if name != baseline}
    for rep in range(reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        got = {name: timed(variants[name], inner, device) for name in order}
        for name in ratios:
            ratios[name].append(got[name] / got[baseline])
    return {name: statistics.median(r) for name, r in ratios.items()}


# ------------------------------------------------------------------------------------------------- HLoRA
def old_regularizer(plugin, dense_refs):
    """The regularizer as it was computed before (commit 0b675e1): a dense dW_nu held per group, per-group ops."""
    total = None
    for g, ref in zip(plugin.groups, dense_refs):
        with torch.autocast(device_type=g.device.type, enabled=False):
            diff = g.delta_weight(detach=False) - ref
            per_module = (g.importance * diff.square()).sum(dim=(1, 2))
            term = (g.coeff * per_module).sum()
        total = term if total is None else total + term
    return total


def hlora_general(model, plugin, steps: int, lr: float = 1e-2):
    """Drive HLoRA's general stage with random gradients and an SGD step (no model forward: only HLoRA's work)."""
    ctx = ctx_for("general", model, lr)
    plugin.on_stage_start(ctx)
    params = lora_params(model)
    g = torch.Generator().manual_seed(1)
    for p in params:  # fixed gradients: every step moves the adapter
        p.grad = (1e-2 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype)
    device = str(params[0].device)

    def step() -> float:
        """One step; returns the seconds spent in HLoRA's two hooks (not in the optimizer)."""
        sync(device)
        start = time.perf_counter()
        plugin.before_optimizer_step(ctx)
        sync(device)
        seconds = time.perf_counter() - start
        ctx.optimizer.step()
        sync(device)
        start = time.perf_counter()
        plugin.after_optimizer_step(ctx)
        sync(device)
        return seconds + time.perf_counter() - start

    for _ in range(steps):
        step()
    return ctx, step


def bench_hlora(args) -> tuple[dict, dict]:
    from forgetless.methods.hlora import HLoRA

    model = make_model(args.layers, args.device, args.widths)
    plugin = HLoRA()
    ctx, step = hlora_general(model, plugin, 3)
    plugin.on_stage_end(ctx)
    n_modules, n_groups = len(plugin.importance), len(plugin.groups)

    # --- state bytes after the general stage: dW_nu dense (before) vs as factors (now)
    omega_bytes = sum(t.numel() * t.element_size() for t in plugin.importance.values())
    dense_ref_bytes = omega_bytes  # one float32 element per weight element, as omega
    factor_bytes = plugin.reference.nbytes()
    with tempfile.TemporaryDirectory() as tmp:
        plugin.save_state(Path(tmp) / "new")
        new_file = (Path(tmp) / "new" / "hlora_importance.safetensors").stat().st_size
        from forgetless.lora import group_modules, lora_modules
        from forgetless.methods.hlora import STATE

        tensors = {}
        for g in group_modules(lora_modules(model)):  # the file as it was written before: dense dw_ref
            dense = g.delta_weight()
            for i, n in enumerate(g.names):
                tensors[f"{n}.omega"], tensors[f"{n}.dw_ref"] = plugin.importance[n], dense[i]
        old_path = STATE.save(Path(tmp) / "old", tensors, {k: v for k, v in plugin.metadata.items()
                                                           if k != "reference"})
        old_file = old_path.stat().st_size
    state = {"modules": n_modules, "groups": n_groups, "omega_bytes": omega_bytes,
             "state_before": omega_bytes + dense_ref_bytes, "state_now": omega_bytes + factor_bytes,
             "file_before": old_file, "file_now": new_file}

    # --- path-integral step: chunks of modules (new) vs one module at a time (old: fused=False)
    model_b = make_model(args.layers, args.device, args.widths)
    fused_plugin, plain_plugin = HLoRA(), HLoRA()
    plain_plugin.fused = False
    _, fused_step = hlora_general(model, fused_plugin, 1)
    _, plain_step = hlora_general(model_b, plain_plugin, 1)
    path = compare({"old": plain_step, "new": fused_step}, args.reps, args.inner, args.device, "old")

    # --- regularizer forward + backward: new (weighted_distance) vs old (autograd, dense dW_nu) vs plain loop (fused=False)
    plugin.on_stage_start(ctx_for("domain", model))
    perturb(model, seed=5)
    dense_refs = [g.reference_delta().clone() for g in plugin.groups]
    params = lora_params(model)

    def new():
        plugin.fused = True
        torch.autograd.grad(plugin.regularizer(), params)

    def plain():
        plugin.fused = False
        torch.autograd.grad(plugin.regularizer(), params)

    def old():
        torch.autograd.grad(old_regularizer(plugin, dense_refs), params)

    ids = torch.randint(3, 256, (4, 128), generator=torch.Generator().manual_seed(6)).to(args.device)

    def model_step():  # the domain step's own work, for scale: forward + backward of a 4 x 128-token batch
        torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)

    plugin.fused = True
    with torch.no_grad():
        value_new = float(plugin.regularizer())
        value_old = float(old_regularizer(plugin, dense_refs))
    reg = compare({"old": old, "new": new, "plain loop": plain, "model step": model_step}, args.reps, args.inner,
                  args.device, "old")
    reg["value_rel_diff"] = abs(value_new - value_old) / abs(value_old)
    return state, {"hlora_regularizer": reg, "hlora_path_integral": path}


# --------------------------------------------------------------------------------------------------- EWC
def bench_ewc(args) -> dict:
    from forgetless.methods.ewc import EWC

    model = make_model(args.layers, args.device, args.widths)
    perturb(model, seed=2)
    plugin = EWC()
    # a random positive Fisher of the right shapes (its value does not change the cost of the penalty)
    from forgetless.lora import lora_modules, update_shape

    g = torch.Generator().manual_seed(3)
    plugin.fisher = {f"{n}.base_layer.weight": torch.rand(update_shape(m), generator=g).to(args.device)
                     for n, m in lora_modules(model)}
    plugin.on_stage_start(ctx_for("domain", model))
    perturb(model, seed=4)
    params = lora_params(model)

    def run(fused):
        def fn():
            plugin.fused = fused
            torch.autograd.grad(plugin.penalty(), params)
        return fn

    with torch.no_grad():
        plugin.fused = True
        value_new = float(plugin.penalty())
        plugin.fused = False
        value_old = float(plugin.penalty())
    out = compare({"old": run(False), "new": run(True)}, args.reps, args.inner, args.device, "old")
    out["value_rel_diff"] = abs(value_new - value_old) / abs(value_old)
    return {"ewc_penalty": out}


# ------------------------------------------------------------------------------------------ EWC's Fisher
def bench_fisher(args) -> dict:
    """fisher_diagonal (EWC's defaults: LoRA on q_proj, v_proj; batch 4) over 16 examples of 256 tokens with a vocabulary
    of 2048, the one-pass NLL (new) vs the per-example loop (old); both give the same Fisher bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetless.methods import ewc
    from forgetless.models import LoraSettings, attach_lora

    torch.manual_seed(0)
    vocab = 2048
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = attach_lora(LlamaForCausalLM(config), LoraSettings(r=8, alpha=16, dropout=0.0)).to(args.device)
    g = torch.Generator().manual_seed(3)
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in torch.randint(3, vocab, (16, 256),
                                                                                               generator=g)]
    new_nll = ewc._batch_nll

    def run(nll, estimator):
        def fn():
            ewc._batch_nll = nll
            try:
                ewc.fisher_diagonal(model, examples, estimator, "lora", 4, 0)
            finally:
                ewc._batch_nll = new_nll
        return fn

    out = {}
    for estimator in ("sampled", "empirical"):
        ratios = compare({"old": run(ewc.rowwise_batch_nll, estimator), "new": run(new_nll, estimator)},
                         max(3, args.reps // 3), 1, args.device, "old")
        out[f"ewc_fisher_{estimator}"] = ratios
    return out


# ------------------------------------------------------------------------------------------ SmolLM2 shapes
def smollm2_state(r: int = 16) -> dict:
    """HLoRA's state on SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, 3 kv heads of 64) with LoRA r on all
    seven projections, float32: omega + dW_nu dense (before) vs omega + factors (now)."""
    h, i, kv, layers = 576, 1536, 3 * 64, 30
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in): q k v o gate up down
    dense = layers * sum(o * n for o, n in shapes)
    factors = layers * sum(r * (o + n) for o, n in shapes)
    return {"elements": dense, "state_before": 2 * dense * 4, "state_now": (dense + factors) * 4}


# ------------------------------------------------------------------------------------- weighted_distance chunks
def chunk_sweep(args) -> dict[str, float]:
    """``weighted_distance`` (forward + backward) at several chunk sizes against autograd over the formula, on
    random factors of SmolLM2-135M's shape groups with LoRA r=16 on all seven projections (119M elements of dW)."""
    from forgetless.lora import delta_from_factors, weighted_distance

    g = torch.Generator().manual_seed(0)
    groups = []
    for n, out, inp in ((60, 576, 576), (60, 192, 576), (60, 1536, 576), (30, 576, 1536)):  # q/o, k/v, gate/up, down
        a = torch.randn(n, 16, inp, generator=g).requires_grad_()
        b = torch.randn(n, out, 16, generator=g).requires_grad_()
        groups.append((a, b, torch.randn(n, 16, inp, generator=g), torch.randn(n, out, 16, generator=g),
                       torch.full((n, 1, 1), 2.0), torch.rand(n, out, inp, generator=g), torch.rand(n, generator=g)))

    def old():
        total = sum((c * (w * (delta_from_factors(a, b, s) - delta_from_factors(ra, rb, s)).square()).sum((1, 2))).sum()
                    for a, b, ra, rb, s, w, c in groups)
        torch.autograd.grad(total, [t for group in groups for t in group[:2]])

    def new(chunk):
        def fn():
            total = sum(weighted_distance(a, b, s, w, c, ref_factors=(ra, rb, s), chunk_elements=chunk)
                        for a, b, ra, rb, s, w, c in groups)
            torch.autograd.grad(total, [t for group in groups for t in group[:2]])
        return fn

    variants = {"old": old} | {f"2^{k}": new(1 << k) for k in (18, 20, 22, 23, 24, 26)} | {"unchunked": new(1 << 40)}
    return compare(variants, args.reps, args.inner, "cpu", "old")


# ------------------------------------------------------------------------------ rank-2r differences (issue 15)
def smollm2_groups(device: str, r: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Random factors of SmolLM2-135M's shape groups, LoRA r on all seven projections (119M elements of dW at r=16):
    ``(A, B, A', B', s, W, c)`` per group, A' and B' one small step (1e-3 relative) away from A and B."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for n, out, inp in ((60, 576, 576), (60, 192, 576), (60, 1536, 576), (30, 576, 1536)):  # q/o, k/v, gate/up, down
        a, b = torch.randn(n, r, inp, generator=g), torch.randn(n, out, r, generator=g)
        a2, b2 = a + 1e-3 * torch.randn(a.shape, generator=g), b + 1e-3 * torch.randn(b.shape, generator=g)
        groups.append(tuple(t.to(device) for t in (a, b, a2, b2, torch.full((n, 1, 1), 2.0),
                                                    torch.rand(n, out, inp, generator=g), torch.rand(n, generator=g))))
    return groups


def rank_2r(args) -> dict[str, float]:
    """The two per-step dense passes that changed, new (one rank-2r matmul per difference, ``addcmul_``) against old
    (two rank-r products and a subtraction; the code before), chunk by chunk as the methods run them
    (``CHUNK_ELEMENTS`` of the device), on SmolLM2's shape groups:

    * ``path_integral``: HLoRA's general-stage step, eq 11's estimator: omega += g~ * (dW(t) - dW(t+1));
    * ``weighted_distance``: HLoRA's regularizer / EWC's penalty, forward and the factors' gradients, anchor as
      factors with the same scaling.

    Also the accuracy of dW(t) - dW(t+1) in fp32 for a step of 1e-3 relative size, new and old, against float64 of
    the same fp32 inputs."""
    from forgetless.lora import module_chunks, scaled_update, update_difference, weighted_distance

    device = args.device
    groups = smollm2_groups(device)
    omegas = [torch.zeros_like(w) for *_, w, _ in groups]
    eta = 1e-3

    def old_path():
        for (a0, b0, a1, b1, s, _, _), omega in zip(groups, omegas):
            ga, gb = a1 - a0, b1 - b0  # stand-ins for the gradients (the cost does not depend on their values)
            for part in module_chunks(a0.shape[0], omega.shape[-2:], a0.device):
                descent = scaled_update(a0[part], b0[part], s[part], False)
                descent.sub_(scaled_update(a1[part], b1[part], s[part], False))
                estimate = torch.baddbmm(torch.bmm(b0[part], ga[part]), gb[part], a0[part] - eta * ga[part]) * s[part]
                omega[part].add_(descent.mul_(estimate))

    def new_path():
        for (a0, b0, a1, b1, s, _, _), omega in zip(groups, omegas):
            ga, gb = a1 - a0, b1 - b0
            for part in module_chunks(a0.shape[0], omega.shape[-2:], a0.device):
                descent = update_difference(a0[part], b0[part], s[part], a1[part], b1[part])
                left = torch.cat([gb[part], b0[part]], dim=-1) * s[part]
                estimate = torch.matmul(left, torch.cat([a0[part] - eta * ga[part], ga[part]], dim=-2))
                omega[part].addcmul_(descent, estimate)

    def old_distance():
        for a, b, ra, rb, s, w, c in groups:
            per_module = torch.empty(a.shape[0], device=a.device)
            grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
            for part in module_chunks(a.shape[0], w.shape[-2:], a.device):
                diff = scaled_update(a[part], b[part], s[part], False)
                weighted = scaled_update(ra[part], rb[part], s[part], False)
                diff.sub_(weighted)
                torch.mul(diff, w[part], out=weighted)
                factor = 2 * s[part] * c[part].view(-1, 1, 1)
                torch.matmul(b[part].transpose(-2, -1), weighted, out=grad_a[part]).mul_(factor)
                torch.matmul(weighted, a[part].transpose(-2, -1), out=grad_b[part]).mul_(factor)
                per_module[part] = diff.mul_(weighted).sum(dim=(-2, -1))
            (per_module * c).sum()

    leaves = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b, *_ in groups]

    def new_distance():
        total = sum(weighted_distance(la, lb, s, w, c, ref_factors=(ra, rb, s))
                    for (la, lb), (_, _, ra, rb, s, w, c) in zip(leaves, groups))
        torch.autograd.grad(total, [t for pair in leaves for t in pair])

    out = {"path_integral": compare({"old": old_path, "new": new_path}, args.reps, args.inner, device, "old")["new"],
           "weighted_distance": compare({"old": old_distance, "new": new_distance}, args.reps, args.inner, device,
                                        "old")["new"]}
    a0, b0, a1, b1, s = (t[:4].float() for t in groups[0][:5])
    truth = (scaled_update(a0.double(), b0.double(), s.double(), False)
             - scaled_update(a1.double(), b1.double(), s.double(), False))
    for name, value in (("new", update_difference(a0, b0, s, a1, b1)),
                        ("old", scaled_update(a0, b0, s, False) - scaled_update(a1, b1, s, False))):
        out[f"descent_error_{name}"] = float((value.double() - truth).norm() / truth.norm())
    return out


# ------------------------------------------------------------------------- SAM's work between its passes (issue 15)
def sam_work(args) -> dict[str, float]:
    """SAM's own work per micro-batch, everything but its two forward/backward passes (the norm of the ascent
    gradient, eps, keeping, perturbing and restoring the weights, adding back the earlier micro-batches'
    gradients): grouped ``_foreach`` operations (new, ``forgetless.methods.sam``) against one operation per LoRA
    matrix (old, the code before, copied here), over the LoRA matrices of SmolLM2-135M (``--smollm2-widths``-like:
    30 layers) or of the 1B shape (``--shape 1b``: 22 layers, TinyLlama's widths), r=16 on all seven projections."""
    from forgetless.methods.sam import add_back_, perturb_, restore_, sam_perturbation

    layers, hidden, kv, inter = (22, 2048, 256, 5632) if args.sam_shape == "1b" else (30, 576, 192, 1536)
    shapes = [(o, i) for _ in range(layers) for o, i in ((hidden, hidden), (kv, hidden), (kv, hidden),
                                                         (hidden, hidden), (inter, hidden), (inter, hidden),
                                                         (hidden, inter))]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(args.device))
              for o, i in shapes for s in ((16, i), (o, 16))]
    grads = [torch.randn(p.shape, generator=g).to(args.device) for p in params]
    stash = [torch.randn(p.shape, generator=g).to(args.device) for p in params]

    def old():
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        g32 = [p.grad.detach().float().clone() for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g32]))
        scale = 1.0 / (norm + 1e-12)
        eps = [x * scale for x in g32]
        with torch.no_grad():
            kept = [p.detach().clone() for p in params]
            for p, e in zip(params, eps):
                p.add_(e.to(p.dtype))
            for p, gr in zip(params, grads):  # the second pass's gradients (stand-ins)
                p.grad = gr.clone()
            for p, w in zip(params, kept):
                p.copy_(w)
        for p, s in zip(params, stash):
            p.grad = s if p.grad is None else p.grad.add_(s)

    def new():
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        eps, _ = sam_perturbation(params, [p.grad.detach().float() for p in params], 1.0)
        kept = perturb_(params, eps)
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        restore_(params, kept)
        add_back_(params, stash)

    def baseline():  # the gradient stand-ins' copies alone, which both include
        for _ in range(2):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()

    ratios = compare({"old": old, "new": new, "copies": baseline}, args.reps, args.inner, args.device, "old")
    return {"tensors": len(params), "elements": sum(p.numel() for p in params), **ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="repetitions (each times every variant)")
    parser.add_argument("--inner", type=int, default=5, help="calls per variant and repetition (their median)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smollm2-widths", action="store_true", help="SmolLM2-135M's widths and 30 layers")
    parser.add_argument("--skip-fisher", action="store_true", help="leave out the Fisher's timing")
    parser.add_argument("--chunk-sweep", action="store_true", help="only weighted_distance's chunk sizes (CPU)")
    parser.add_argument("--rank-2r", action="store_true",
                        help="only the dense differences as one rank-2r matmul vs two products (new vs old)")
    parser.add_argument("--sam", action="store_true",
                        help="only SAM's work between its passes, grouped (_foreach) vs one op per matrix (new vs old)")
    parser.add_argument("--sam-shape", choices=("smollm2", "1b"), default="smollm2",
                        help="with --sam: the LoRA matrices of SmolLM2-135M or of the 1B shape")
    args = parser.parse_args()
    if args.sam:
        if args.threads and args.device == "cpu":
            torch.set_num_threads(args.threads)
        got = sam_work(args)
        print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); SAM's work between "
              f"its passes on {got['tensors']} LoRA matrices ({args.sam_shape}, r=16, all seven projections, "
              f"{got['elements'] / 1e6:.1f}M elements); time / old, median over {args.reps} reps of {args.inner}:")
        print(f"  new (grouped _foreach)                      {got['new']:.3f}")
        print(f"  the gradient stand-ins' copies both include {got['copies']:.3f}")
        return 0
    if args.rank_2r:
        if args.threads and args.device == "cpu":
            torch.set_num_threads(args.threads)
        got = rank_2r(args)
        print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); SmolLM2's shape "
              f"groups, r=16 on all seven projections; new / old time, median over {args.reps} reps of {args.inner}:")
        print(f"  path_integral (eq 11 step)            {got['path_integral']:.3f}")
        print(f"  weighted_distance (forward + grads)   {got['weighted_distance']:.3f}")
        print(f"  |dW(t) - dW(t+1)| fp32 relative error vs float64, step 1e-3: new {got['descent_error_new']:.1e}, "
              f"old {got['descent_error_old']:.1e}")
        return 0
    if args.chunk_sweep:
        if args.threads:
            torch.set_num_threads(args.threads)
        ratios = chunk_sweep(args)
        print(f"weighted_distance forward + backward / autograd over the formula, SmolLM2's groups, r=16, "
              f"{torch.get_num_threads()} thread(s), median over {args.reps} reps of {args.inner} call(s):")
        print("  " + ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))
        return 0
    args.widths = "smollm2" if args.smollm2_widths else "tiny"
    if args.smollm2_widths:
        args.layers = 30
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    state, hlora = bench_hlora(args)
    ewc = bench_ewc(args)
    if not args.skip_fisher:
        ewc.update(bench_fisher(args))
    mib = 2 ** 20
    print(f"device {args.device}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); "
          f"{args.reps} reps x {args.inner} calls; {args.widths} Llama widths, {args.layers} layers, LoRA r=8 on all seven "
          f"projections: {state['modules']} modules in {state['groups']} shape groups")
    print("\nper-step time, ratio to the old path (median over repetitions; < 1 is faster)")
    for name, ratios in {**hlora, **ewc}.items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in ratios.items() if k not in ("value_rel_diff", "model step"))
        print(f"  {name:22s} {parts}   (|new - old| / old of the value: {ratios.get('value_rel_diff', 0.0):.1e})"
              if "value_rel_diff" in ratios else f"  {name:22s} {parts}")
    reg = hlora["hlora_regularizer"]
    print(f"  for scale: the old regularizer (forward + backward) is {1 / reg['model step']:.3f} of this model's "
          f"forward + backward on 4 x 128 tokens; the new one is {reg['new'] / reg['model step']:.3f} of it")
    print("\nHLoRA state, dW_nu dense (before) vs as factors (now), float32")
    print(f"  in memory after the general stage: {state['state_before'] / mib:.2f} -> "
          f"{state['state_now'] / mib:.2f} MiB (x{state['state_now'] / state['state_before']:.3f})")
    print(f"  saved file:                        {state['file_before'] / mib:.2f} -> {state['file_now'] / mib:.2f} MiB "
          f"(x{state['file_now'] / state['file_before']:.3f})")
    smol = smollm2_state()
    print(f"  SmolLM2-135M, r=16 on all seven (from its shapes): {smol['state_before'] / mib:.0f} -> "
          f"{smol['state_now'] / mib:.0f} MiB (x{smol['state_now'] / smol['state_before']:.3f})")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
