"""WiSE-FT: weight-space ensembling of the model before and after domain fine-tuning.

Paper: Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", eq 1 (weight-space ensemble)::

    theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1

Here ``theta_0 = theta_nu`` are the trainable weights at the end of the general stage (or, when the run has
no general stage, at the start of the domain stage: for LoRA that is the untouched base model) and
``theta_1 = theta_mu`` the trainable weights after the domain stage.

Under LoRA the weights that eq 1 interpolates are the full weights ``W + dW`` with ``dW = s * B @ A``, so
(``space="weights"``, the default) the model is evaluated at::

    W_alpha = W + (1 - alpha) * dW_nu + alpha * dW_mu

done exactly by adding ``(1 - alpha) * (dW_nu - dW_mu)`` to each LoRA module's frozen base weight while the adapter
keeps ``theta_mu`` (the base weight is copied and restored bit-exactly). ``space="factors"`` interpolates the
adapter matrices A and B themselves, whose product ``s * B_alpha @ A_alpha`` is *not* between the two updates
(it has a term in ``alpha * (1 - alpha)``); it is kept to compare with. Other trainable parameters (a full
fine-tune, ``modules_to_save``) are interpolated directly, which is the paper's eq 1. Arithmetic is in float32,
then cast to the parameter dtype; alpha = 1 gives theta_mu bit-exactly.

After training, :meth:`WiseFT.evaluation_variants` yields ``("wise-ft(alpha=a)", context manager)`` for every
alpha; inside the context the model holds theta_alpha and on exit theta_mu is restored bit-exactly. The pipeline
evaluates each one and stores it in ``RunResult.variants``. theta_nu is saved with the general stage
(safetensors, :data:`FILENAME`) so a cached general stage works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from forgetless.methods import DOMAIN, GENERAL, MethodSpec, register
from forgetless.training.hooks import Method, StageContext

FILENAME = "wise_ft_theta_nu.safetensors"


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def interpolate(nu: torch.Tensor, mu: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * nu + alpha * mu in float32 (eq 1)."""
    return (1.0 - alpha) * nu.float() + alpha * mu.float()


class WiseFT(Method):
    name = "wise-ft"

    def __init__(self, alphas: Sequence[float] | float = (0.25, 0.5, 0.75), space: str = "weights") -> None:
        alphas = [alphas] if isinstance(alphas, (int, float)) else list(alphas)
        if not alphas:
            raise ValueError("wise-ft needs at least one alpha")
        if space not in ("weights", "factors"):
            raise ValueError(f"wise-ft space must be 'weights' or 'factors', got {space!r}")
        self.alphas = [float(a) for a in alphas]
        self.space = space
        self.theta_nu: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"WiseFT(alphas={self.alphas}, space={self.space!r})"

    def _snapshot(self, ctx: StageContext) -> None:
        self.theta_nu = {n: p.detach().clone() for n, p in ctx.trainable_parameters()}

    def on_stage_end(self, ctx: StageContext) -> None:
        if ctx.stage == GENERAL:
            self._snapshot(ctx)

    def on_stage_start(self, ctx: StageContext) -> None:
        if ctx.stage == DOMAIN and self.theta_nu is None:  # no general stage: theta_nu = weights before the domain
            self._snapshot(ctx)

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
        in_pairs = {key for _, a_key, b_key in merged for key in (a_key, b_key)}
        direct = [n for n in self.theta_nu if n not in in_pairs]
        kept = {n: params[n].detach().clone() for n in direct}
        bases = {id(m): m.get_base_layer().weight.detach().clone() for m, _, _ in merged}
        try:
            with torch.no_grad():
                for n in direct:
                    p = params[n]
                    p.copy_(interpolate(self.theta_nu[n].to(p.device), kept[n], alpha).to(p.dtype))
                for module, a_key, b_key in merged:
                    weight = module.get_base_layer().weight
                    scale = float(module.scaling["default"])
                    a_nu, b_nu = (self.theta_nu[k].to(weight.device).float() for k in (a_key, b_key))
                    a_mu, b_mu = params[a_key].float(), params[b_key].float()
                    shift = (1.0 - alpha) * scale * (b_nu @ a_nu - b_mu @ a_mu)
                    weight.copy_((weight.float() + shift).to(weight.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, w in kept.items():
                    params[n].copy_(w)
                for module, _, _ in merged:
                    module.get_base_layer().weight.copy_(bases[id(module)])

    def _lora_pairs(self, model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
        """(module, A's name, B's name) of every LoRA layer whose factors theta_nu holds."""
        from forgetless.methods.hlora import lora_modules

        pairs = []
        for name, module in lora_modules(model):
            a_key, b_key = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
            if a_key in self.theta_nu and b_key in self.theta_nu:
                pairs.append((module, a_key, b_key))
        return pairs

    def evaluation_variants(self, model: torch.nn.Module) -> Iterator[tuple[str, contextlib.AbstractContextManager]]:
        if self.theta_nu is None:
            return
        for alpha in self.alphas:
            yield f"wise-ft(alpha={alpha})", self.interpolated(model, alpha)

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.theta_nu is None:
            raise ValueError("wise-ft has no theta_nu to save (the general stage has not run)")
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.detach().to("cpu").contiguous() for n, t in self.theta_nu.items()}, str(path))

    def load_state(self, directory: Path) -> None:
        from safetensors.torch import load_file

        path = Path(directory)
        path = path / FILENAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no wise-ft theta_nu file at {path}")
        self.theta_nu = load_file(str(path))


def _build(**options: Any) -> WiseFT:
    return WiseFT(**options)


register(MethodSpec("wise-ft", "WiSE-FT: evaluate interpolations (1-a) theta_nu + a theta_mu after training",
                    stages=None, build=_build))

__all__ = ["WiseFT", "interpolate", "FILENAME"]
