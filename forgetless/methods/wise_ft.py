"""WiSE-FT: weight-space ensembling of the model before and after domain fine-tuning.

Paper: Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", eq 1 (weight-space ensemble)::

    theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1

Here ``theta_0 = theta_nu`` are the trainable weights at the end of the general stage (or, when the run has
no general stage, at the start of the domain stage: for LoRA that is the untouched base model) and
``theta_1 = theta_mu`` the trainable weights after the domain stage.

Under LoRA the weights that eq 1 interpolates are the full weights ``W + dW`` with ``dW = s * B @ A``, so
(``space="weights"``, the default) the model is evaluated at::

    W_alpha = W + (1 - alpha) * dW_nu + alpha * dW_mu = W + s * [(1 - alpha) B_nu, alpha B_mu] @ [A_nu; A_mu]

i.e. a LoRA update of rank 2r: inside the context each LoRA layer's factors are replaced by the stacked ones (the
layer's forward ``B(A(x)) * s`` does not depend on the rank) and the original parameters are put back on exit. The
frozen base weight is never touched, so this is exact whatever the base's dtype (bf16, 4-bit), and costs one rank-2r
adapter instead of a merged copy. ``space="factors"`` interpolates the adapter matrices A and B themselves, whose
product ``s * B_alpha @ A_alpha`` is *not* between the two updates (it has a term in ``alpha * (1 - alpha)``); it is
kept to compare with. Other trainable parameters (a full fine-tune, ``modules_to_save``) are interpolated directly,
which is the paper's eq 1. Arithmetic is in float32 (or wider), then cast to the parameter dtype; alpha = 1 gives
theta_mu exactly.

After training, :meth:`WiseFT.evaluation_variants` yields ``("wise-ft(alpha=a)", context manager)`` for every
alpha; inside the context the model holds theta_alpha and on exit theta_mu is restored bit-exactly. The pipeline
evaluates each one and stores it in ``RunResult.variants``. theta_nu is saved with the general stage
(safetensors, :data:`FILENAME`) so a cached general stage works, and beside the run's adapter (``forgetless train``'s
folder, ``forgetless run``'s ``adapters/<run>``), so ``forgetless export --wise-ft`` blends the adapter with its own
theta_nu.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from forgetless.lora import DEFAULT_ADAPTER, compute_dtype, lora_modules
from forgetless.methods import DOMAIN, GENERAL, MethodSpec, register
from forgetless.methods.common import Options, PendingState, StateFile, option
from forgetless.training.config import as_float
from forgetless.training.hooks import Method, StageContext

FILENAME = "wise_ft_theta_nu.safetensors"
STATE = StateFile(FILENAME, "wise_ft", "wise-ft theta_nu")


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def interpolate(nu: torch.Tensor, mu: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * nu + alpha * mu in float32 at least (eq 1)."""
    dtype = compute_dtype(mu.dtype)
    return (1.0 - alpha) * nu.to(dtype) + alpha * mu.to(dtype)


@dataclass(repr=False)
class WiseFTOptions(Options):
    alphas: list[float] = option([0.25, 0.5, 0.75], "interpolation coefficients to evaluate (0: theta_nu, 1: theta_mu)")
    space: str = option("weights", "interpolate the full-weight updates (eq 1) or the factors A, B (for comparison)",
                        choices=("weights", "factors"))
    adapter: str = option(DEFAULT_ADAPTER, "the PEFT adapter to interpolate")

    def check(self) -> None:
        alphas = [self.alphas] if isinstance(self.alphas, (int, float, str)) else list(self.alphas)
        if not alphas:
            raise ValueError("wise-ft needs at least one alpha")
        self.alphas = [as_float(f"alphas[{i}]", a) for i, a in enumerate(alphas)]
        bad = [a for a in self.alphas if not math.isfinite(a)]
        if bad:
            raise ValueError(f"alphas must be finite numbers, got {bad[0]}")


class WiseFT(Method):
    name = "wise-ft"
    Options = WiseFTOptions
    saves_with_adapter = True  # theta_nu beside the run's adapter: export --wise-ft needs no cached general stage

    def __init__(self, options: WiseFTOptions | None = None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.theta_nu: dict[str, torch.Tensor] | None = None
        self._state = PendingState(STATE)

    def _snapshot(self, model: torch.nn.Module) -> None:
        self.theta_nu = {n: p.detach().clone() for n, p in _trainable(model).items()}

    def on_stage_end(self, ctx: StageContext) -> None:
        if ctx.stage == GENERAL:
            self._snapshot(ctx.model)

    def on_stage_start(self, ctx: StageContext) -> None:
        lora_modules(ctx.model, self.adapter)  # a DoRA or LoRA-bias adapter: refused now, not at the evaluation
        if ctx.stage == DOMAIN:
            self._domain_start(ctx.model)

    def on_stage_skipped(self, stage: str, model: torch.nn.Module) -> None:
        if stage == DOMAIN:  # the domain stage comes from the cache: theta_nu is still what it starts from
            self._domain_start(model)

    def _domain_start(self, model: torch.nn.Module) -> None:
        loaded = self._state.take()
        if loaded is not None:
            self.theta_nu = loaded[0]
        if self.theta_nu is None:  # no general stage: theta_nu = weights before the domain stage
            self._snapshot(model)

    def shapes_domain_stage(self) -> bool:
        return False  # it evaluates interpolations after the domain stage and trains it as lora-nu-mu does

    @contextlib.contextmanager
    def interpolated(self, model: torch.nn.Module, alpha: float) -> Iterator[None]:
        """Inside: the model is at theta_alpha; on exit every weight from before is restored exactly."""
        if self.theta_nu is None:
            raise ValueError("wise-ft has no theta_nu (neither a general stage nor a domain stage has run)")
        params = _trainable(model)
        missing = sorted(set(self.theta_nu) - set(params))
        if missing:
            raise ValueError(f"wise-ft: the model has no trainable parameter {missing[0]!r} ({len(missing)} missing)")
        merged = self._lora_pairs(model) if self.space == "weights" else []
        if self.space == "weights" and not merged and any(".lora_A." in n for n in self.theta_nu):
            raise ValueError(f"wise-ft: the model has no LoRA adapter {self.adapter!r} to interpolate in weight space "
                             f"(its LoRA weights are of another adapter; set the option adapter to it)")
        in_pairs = {key for _, a_key, b_key in merged for key in (a_key, b_key)}
        direct = [n for n in self.theta_nu if n not in in_pairs]
        kept = {n: params[n].detach().clone() for n in direct}
        factors_kept = [(module.lora_A[self.adapter], module.lora_B[self.adapter], params[a_key], params[b_key])
                        for module, a_key, b_key in merged]
        try:
            with torch.no_grad():
                for n in direct:
                    p = params[n]
                    p.copy_(interpolate(self.theta_nu[n].to(p.device), kept[n], alpha).to(p.dtype))
                for (layer_a, layer_b, a_mu, b_mu), (_, a_key, b_key) in zip(factors_kept, merged):
                    dtype = compute_dtype(a_mu.dtype)
                    a_nu, b_nu = (self.theta_nu[k].to(a_mu.device, dtype) for k in (a_key, b_key))
                    # s [(1-a) B_nu, a B_mu] [A_nu; A_mu] = (1-a) dW_nu + a dW_mu: a rank-2r update
                    stacked_a = torch.cat([a_nu, a_mu.to(dtype)], dim=0)
                    stacked_b = torch.cat([(1.0 - alpha) * b_nu, alpha * b_mu.to(dtype)], dim=1)
                    layer_a.weight = torch.nn.Parameter(stacked_a, requires_grad=False)
                    layer_b.weight = torch.nn.Parameter(stacked_b, requires_grad=False)
            yield
        finally:
            with torch.no_grad():
                for n, w in kept.items():
                    params[n].copy_(w)
            for layer_a, layer_b, a_mu, b_mu in factors_kept:
                layer_a.weight, layer_b.weight = a_mu, b_mu

    def _lora_pairs(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
        """(module, A's name, B's name) of every LoRA layer whose factors theta_nu holds."""
        pairs = []
        for name, module in lora_modules(model, self.adapter):
            a_key, b_key = f"{name}.lora_A.{self.adapter}.weight", f"{name}.lora_B.{self.adapter}.weight"
            if a_key in self.theta_nu and b_key in self.theta_nu:
                pairs.append((module, a_key, b_key))
        return pairs

    def evaluation_variants(self, model: torch.nn.Module) -> Iterator[tuple[str, contextlib.AbstractContextManager]]:
        if self.theta_nu is None:
            return
        for alpha in self.alphas:
            yield f"wise-ft(alpha={alpha})", self.interpolated(model, alpha)

    def save_state(self, directory: Path) -> None:
        self._state.save(directory, self.theta_nu or {}, {"options": self.options.as_dict()})

    def shapes_general_stage(self) -> bool:
        return False  # theta_nu is the general stage's adapter: any plain LoRA general stage serves

    def load_state(self, directory: Path) -> None:
        """Remember the file; it is read at the domain stage's start. A cached general stage trained without
        wise-ft has none: theta_nu is then its adapter, the weights the domain stage starts from."""
        self.theta_nu = None
        self._state.remember(directory, missing_ok=True)


register(MethodSpec("wise-ft", "WiSE-FT: evaluate interpolations (1-a) theta_nu + a theta_mu after training",
                    stages=None, plugin=WiseFT))

__all__ = ["WiseFT", "interpolate", "FILENAME"]
