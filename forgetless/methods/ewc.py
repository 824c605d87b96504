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
  approximation"), the same cost. Sampling: a generator seeded from the stage seed, one ``torch.multinomial``
  call per example (in the order used) over that example's labelled positions.
* Scale: under sampled labels the cross-token terms of ``G_n**2`` vanish in expectation (each drawn token's score
  has zero mean given its context), so ``F`` is the average per-token Fisher: ``lambda * sum F dW**2`` is about
  ``2 lambda`` times the predicted increase of the mean general-text token loss, independent of block length.
  Code that squares the gradient of each example's *mean* token loss gets ``F / T`` for blocks of ``T`` tokens.
* ``fisher_over="lora"`` (default): the base weights of the LoRA target modules, from forward/backward hooks on
  a batched pass (``G_n`` from the module's input and output gradient, as HLoRA's exact estimator). ``"all"``:
  every weight of the model (embeddings, norms, all linear layers), as EWCLoRA does; computed example by example
  with autograd (tied weights handled by autograd). Only the entries under LoRA modules enter the penalty
  (nothing else trains); ``all`` is there to measure what a full Fisher costs to compute and store.

When the Fisher is computed (and at which weights):

* the run has a general stage: at its end (``on_stage_end``), at the general-stage weights, over up to
  ``samples`` of that stage's examples (a random subset seeded by the stage seed). It is saved with the cached
  general stage (:data:`FILENAME`, safetensors; its size is printed) and reused by every domain run after it.
* no general stage (``[lora-mu, ewc]``): at the start of the domain stage over the run's general examples, at the
  base model (the adapter is zero there).

Anchor ``dW_ref``: ``anchor="general"`` (default) is the adapter the domain stage starts from, i.e. the
general-stage update ``dW_nu`` (zero when there is no general stage); ``anchor="zero"`` pulls the whole LoRA
update towards zero, as the EWCLoRA code does. The anchor is not stored: the cached general stage's adapter is it.

The wall time and payload size of the Fisher are recorded in the stage's ``extras["importance_cost"]["ewc"]``
(the report compares them with HLoRA's importance). Under several processes every process takes its share of
the examples and the sums are all-reduced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from forgetless.methods import DOMAIN, GENERAL, MethodSpec, register
from forgetless.methods.hlora import lora_modules
from forgetless.training.batches import IGNORE_INDEX, collate
from forgetless.training.hooks import Batch, Method, StageContext

FILENAME = "ewc_fisher.safetensors"
ESTIMATORS = ("sampled", "empirical")
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SEED_OFFSET = 104729  # keeps the Fisher's subset and draws independent of the loader's shuffling stream


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


def _shard(indices: list[int]) -> list[int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return indices[dist.get_rank()::dist.get_world_size()]
    return indices


def _all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def fisher_diagonal(model: torch.nn.Module, examples: Sequence[dict], estimator: str = "sampled",
                    fisher_over: str = "lora", batch_size: int = 4, seed: int = 0,
                    adapter: str = "default") -> tuple[dict[str, torch.Tensor], int]:
    """The diagonal Fisher ``F = sum_n G_n**2 / sum_n T_n`` over ``examples`` (``{input_ids, labels}``) in order.

    Returns ``({parameter name: F}, tokens)``; names are the model's parameter names (for a LoRA module
    ``<module>.base_layer.weight``). The model is put in eval mode (no dropout) and restored; no ``.grad`` is touched.
    Sampled labels: ``torch.Generator(device).manual_seed(seed)``, one ``torch.multinomial`` call per example.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not examples:
        raise ValueError("EWC needs general-text examples to compute the Fisher")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            if fisher_over == "lora":
                fisher, tokens = _fisher_lora(model, examples, estimator, batch_size, generator, adapter)
            elif fisher_over == "all":
                fisher, tokens = _fisher_all(model, examples, estimator, generator)
            else:
                raise ValueError(f"fisher_over must be 'lora' or 'all', got {fisher_over!r}")
    finally:
        model.train(was_training)
    count = torch.tensor(float(tokens), device=device, dtype=torch.float64)
    _all_reduce_sum(list(fisher.values()) + [count])
    for t in fisher.values():
        t.div_(max(float(count), 1.0))
    return fisher, int(count)


def _fisher_lora(model, examples, estimator, batch_size, generator, adapter):
    modules = lora_modules(model, adapter)
    if not modules:
        raise ValueError("EWC found no LoRA modules in the model (attach LoRA first)")
    fisher: dict[str, torch.Tensor] = {}
    hooks = []

    def install(key: str, module: torch.nn.Module) -> None:
        def forward_hook(mod, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not (isinstance(out, torch.Tensor) and out.requires_grad) or not args:
                return
            x = args[0].detach()

            def accumulate(grad_out: torch.Tensor) -> None:
                acc = fisher[key]
                go = grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1]).to(acc.dtype)
                xi = x.reshape(x.shape[0], -1, x.shape[-1]).to(acc.dtype)
                g = torch.bmm(go.transpose(1, 2), xi)  # G_n = sum_t g_t x_t^T, one per example: [B, out, in]
                acc.add_(g.square().sum(0))

            out.register_hook(accumulate)

        hooks.append(module.register_forward_hook(forward_hook))

    grad_inputs = []
    for name, module in modules:
        weight = module.get_base_layer().weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        fisher[f"{name}.base_layer.weight"] = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        grad_inputs.append(module.lora_A[adapter].weight)
        install(f"{name}.base_layer.weight", module)
    tokens = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(grad_inputs[0].device) for k, v in
                     collate(examples[start:start + batch_size], pad_token_id=0).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = None
            for row in range(logits.shape[0]):  # per example, in order: the draws do not depend on batch_size
                nll, count = _example_nll(logits[row], batch["labels"][row], estimator, generator)
                loss = nll if loss is None else loss + nll
                tokens += count
            # d(sum_n ell_n)/dy is d ell_n/dy on example n's rows (examples do not interact): hooks see each G_n.
            # Asking for the LoRA A gradients makes autograd pass through every module output; .grad is untouched.
            torch.autograd.grad(loss, grad_inputs, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    return fisher, tokens


def _fisher_all(model, examples, estimator, generator):
    params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    saved = [p.requires_grad for _, p in params]
    fisher = {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params}
    tokens = 0
    try:
        for _, p in params:
            p.requires_grad_(True)
        for example in examples:  # one example at a time: autograd gives G_n of every weight, tied ones included
            batch = {k: v.to(params[0][1].device) for k, v in collate([example], pad_token_id=0).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, count = _example_nll(logits[0], batch["labels"][0], estimator, generator)
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
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no EWC Fisher file at {path}")
    with safe_open(str(path), framework="pt") as fh:
        metadata = json.loads((fh.metadata() or {}).get("ewc", "{}"))
        fisher = {key: fh.get_tensor(key) for key in fh.keys()}
    return {"fisher": fisher, "metadata": metadata}


class EWC(Method):
    """EWC on the LoRA update ``dW = s B A`` with a diagonal Fisher of general text (see the module docstring)."""

    name = "ewc"

    def __init__(self, lam: float = 1.0, estimator: str = "sampled", samples: int | None = 128, batch_size: int = 4,
                 fisher_over: str = "lora", anchor: str = "general", storage_dtype: str = "float32",
                 adapter: str = "default") -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if fisher_over not in ("lora", "all"):
            raise ValueError(f"fisher_over must be 'lora' or 'all', got {fisher_over!r}")
        if anchor not in ("general", "zero"):
            raise ValueError(f"anchor must be 'general' or 'zero', got {anchor!r}")
        if storage_dtype not in _STORAGE:
            raise ValueError(f"storage_dtype must be one of {sorted(_STORAGE)}, got {storage_dtype!r}")
        if lam < 0 or int(batch_size) < 1 or (samples is not None and int(samples) < 1):
            raise ValueError("need lambda >= 0, batch_size >= 1 and samples >= 1 (or null for all)")
        self.lam, self.estimator, self.fisher_over, self.anchor = float(lam), estimator, fisher_over, anchor
        self.samples = None if samples is None else int(samples)
        self.batch_size, self.storage_dtype, self.adapter = int(batch_size), storage_dtype, adapter
        self.fisher: dict[str, torch.Tensor] = {}  # parameter name -> F
        self.metadata: dict[str, Any] = {}
        self._stage_examples: Sequence[dict] | None = None
        self._pending: Path | None = None
        self._terms: list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor | None]] = []

    def __repr__(self) -> str:
        return (f"EWC(lambda={self.lam}, estimator={self.estimator!r}, samples={self.samples}, "
                f"fisher_over={self.fisher_over!r}, anchor={self.anchor!r})")

    # ----------------------------------------------------------------------------------------------- stages
    def prepare_examples(self, ctx: StageContext, examples: Sequence[dict]) -> Sequence[dict]:
        if ctx.stage == GENERAL:
            self._stage_examples = examples  # the Fisher is computed on them at the end of the stage
        return examples

    def on_stage_start(self, ctx: StageContext) -> None:
        if ctx.stage == GENERAL:
            self.fisher, self.metadata, self._pending = {}, {}, None
        elif ctx.stage == DOMAIN:
            if self._pending is not None:
                loaded = load_fisher(self._pending)
                self.fisher, self.metadata, self._pending = loaded["fisher"], loaded["metadata"], None
            if not self.fisher:  # no general stage in this run: the Fisher of the base model, anchored at zero
                if not ctx.general_examples:
                    raise ValueError("EWC needs a Fisher: run a general stage with EWC first, load_state() a folder "
                                     f"with {FILENAME}, or give the domain stage general-text examples")
                self._compute(ctx, ctx.general_examples)
            self._start_domain(ctx)
        else:
            raise ValueError(f"EWC does not know stage {ctx.stage!r}")

    def on_stage_end(self, ctx: StageContext) -> None:
        if ctx.stage == GENERAL:
            examples, self._stage_examples = self._stage_examples, None
            self._compute(ctx, examples or ())

    def _compute(self, ctx: StageContext, examples: Sequence[dict]) -> None:
        seed = int(getattr(ctx.config, "seed", 0) or 0) if ctx.config is not None else 0
        chosen = list(examples)
        if self.samples is not None and self.samples < len(chosen):
            g = torch.Generator().manual_seed(seed + _SEED_OFFSET)
            chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=g)[: self.samples].tolist()]
        model = ctx.model
        device = next(model.parameters()).device
        _synchronize(device)
        started = time.perf_counter()
        fisher, tokens = fisher_diagonal(model, _shard(chosen), self.estimator, self.fisher_over, self.batch_size,
                                         seed + _SEED_OFFSET, self.adapter)
        _synchronize(device)
        seconds = time.perf_counter() - started
        self.fisher = fisher
        size = _STORAGE[self.storage_dtype].itemsize
        payload = sum(t.numel() * size for t in fisher.values())
        self.metadata = {"model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
                         "estimator": self.estimator, "fisher_over": self.fisher_over, "examples": len(chosen),
                         "tokens": tokens, "stage": ctx.stage, "seconds": seconds, "dtype": self.storage_dtype,
                         "shapes": {n: list(t.shape) for n, t in fisher.items()}}
        ctx.extras.setdefault("importance_cost", {})["ewc"] = {
            "what": f"diagonal Fisher ({self.estimator}, over {self.fisher_over} weights)", "seconds": seconds,
            "bytes": payload, "examples": len(chosen), "tokens": tokens, "tensors": len(fisher)}

    # --------------------------------------------------------------------------------- domain: the penalty
    def _start_domain(self, ctx: StageContext) -> None:
        self._terms = []
        modules = lora_modules(ctx.model, self.adapter)
        if not modules:
            raise ValueError("EWC found no LoRA modules in the model (attach LoRA first)")
        for name, module in modules:
            key = f"{name}.base_layer.weight"
            a, b = module.lora_A[self.adapter].weight, module.lora_B[self.adapter].weight
            if key not in self.fisher:
                raise ValueError(f"EWC Fisher has no entry for LoRA module {name!r} of this model")
            shape = (b.shape[0], a.shape[1])
            if tuple(self.fisher[key].shape) != shape:
                raise ValueError(f"EWC Fisher of module {name!r} has shape {tuple(self.fisher[key].shape)}, "
                                 f"the model's LoRA update there is {shape}")
            dtype = torch.promote_types(a.dtype, torch.float32)
            fisher = self.fisher[key].to(a.device, dtype)
            ref = _delta_weight(module, self.adapter, dtype).detach() if self.anchor == "general" else None
            self._terms.append((name, module, fisher, ref))
        ctx.extras["ewc_anchor"] = self.anchor

    def penalty(self) -> torch.Tensor:
        """``sum_l sum_ij F_l,ij (dW_l,ij - dW_ref_l,ij)**2``, differentiable in A and B."""
        total = None
        for _, module, fisher, ref in self._terms:
            with torch.autocast(device_type=fisher.device.type, enabled=False):
                diff = _delta_weight(module, self.adapter, fisher.dtype)
                if ref is not None:
                    diff = diff - ref
                term = (fisher * diff.square()).sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("EWC's penalty is used before the domain stage started")
        return total

    def extra_loss(self, ctx: StageContext, batch: Batch) -> torch.Tensor | None:
        if ctx.stage != DOMAIN or self.lam == 0:
            return None
        pen = self.penalty()
        scaled = self.lam * pen
        ctx.log("ewc_penalty", pen)
        ctx.log("ewc_penalty_scaled", scaled)
        return scaled

    # ---------------------------------------------------------------------------------------- persistence
    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._pending is not None and not self.fisher:
            import shutil

            shutil.copyfile(self._pending, path)
            return
        if not self.fisher:
            raise ValueError("EWC has no Fisher to save (the general stage has not run)")
        dtype = _STORAGE[self.storage_dtype]
        tensors = {n: t.detach().to("cpu", dtype).contiguous() for n, t in self.fisher.items()}
        save_file(tensors, str(path), metadata={"ewc": json.dumps(self.metadata)})
        print(f"EWC Fisher: {path} ({path.stat().st_size / 2**20:.2f} MiB, {len(tensors)} tensors, "
              f"{self.storage_dtype}, {self.metadata.get('seconds', 0.0):.1f} s to compute)")

    def load_state(self, directory: Path) -> None:
        """Remember the file; it is read and checked against the model at the domain stage's start."""
        path = Path(directory)
        path = path / FILENAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no EWC Fisher file at {path}")
        self._pending, self.fisher = path, {}


def _delta_weight(module: torch.nn.Module, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    return (b.to(dtype) @ a.to(dtype)) * float(module.scaling[adapter])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(**options: Any) -> EWC:
    if "lambda" in options:  # the YAML name; `lambda` is a Python keyword
        if "lam" in options:
            raise TypeError("give 'lambda' or 'lam', not both")
        options["lam"] = options.pop("lambda")
    return EWC(**options)


register(MethodSpec("ewc", "EWC-LoRA: diagonal Fisher of general text on the LoRA target weights, "
                           "lambda * sum F (dW - dW_ref)^2 on the domain stage",
                    stages=None, build=_build, domain_options=frozenset({"lambda", "lam", "anchor"}),
                    weight_option=("lambda", 1.0)))

__all__: Sequence[str] = ["EWC", "fisher_diagonal", "load_fisher", "FILENAME", "ESTIMATORS"]
