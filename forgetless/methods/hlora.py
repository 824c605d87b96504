"""HLoRA: hierarchical layer-wise and element-wise regularization of LoRA fine-tuning.

Paper: "How to Alleviate Catastrophic Forgetting in LLMs Finetuning? Hierarchical Layer-Wise and
Element-Wise Regularization". Equation numbers below refer to that paper.

For every LoRA module l the adapter's full-weight update is ``dW_l = s_l * B_l @ A_l`` (``B`` is zero at
init, so ``dW_l = 0`` at the start of the general stage).

General stage (nu): element-wise importance by path integral (eqs 6-13)::

    omega_l += -g~_l * (dW_l(t+1) - dW_l(t))                 per optimizer step   (eqs 8-10)
    g~_l     = s_l * (g_B @ A + B @ g_A - eta * g_B @ g_A)   "paper" estimator    (eq 11)
    g~_l     = dL/dW_l = sum_tokens grad_out^T x             "exact" estimator (from hooks)
    Omega_l  = omega_l / (Delta_l**2 + xi),   Delta_l = dW_l(end) - dW_l(start)   (eqs 12-13)

The paper estimator is the full-weight gradient that plain SGD on (A, B) implies: with A' = A - eta g_A and
B' = B - eta g_B one gets dW' - dW = -eta * g~ exactly, so under SGD ``omega`` is -sum g~.(dW'-dW) = eta |g~|^2.

Domain stage (mu): quadratic pull towards the general-stage adapter ``dW_nu`` (eqs 14-16)::

    L_l   = sum_i Omega_l,i (dW_l,i - dW_nu_l,i)**2                                    (eq 14)
    c_l   = softmax_l(||Omega_l||_2 / T)                                               (eq 15)
    L     = L_task + phi * sum_l c_l L_l                                               (eq 16)

Default choices (all options of :class:`HLoRA`):

* ``xi = 1e-3`` — the damping constant of synaptic-intelligence-style path integrals that the paper follows.
  LoRA updates are small (|Delta| ~ 1e-4..1e-2), so xi mostly dominates Delta**2; that is deliberate: a tiny
  xi turns elements that barely moved into huge, noisy weights (omega/Delta**2 ~ g/Delta).
* ``phi = 1e-3`` as in the paper.
* layer coefficients: eq 15 as written, ``softmax(||Omega_l||)``, depends on the absolute scale of the norms
  (which moves with lr, steps and 1/xi): one-hot once the norms differ by more than a few units, uniform when
  they are all small; the authors' released code multiplies the norms by 1e-8, which is uniform in practice.
  We compute ``c = softmax(||Omega_l|| / norm_scale / temperature)`` with ``norm_scale="max"`` (divide by the
  largest norm): scale-free, never one-hot (the largest ratio between two coefficients is e**(1/T)), ordered
  by importance as the paper intends. Default ``temperature=0.25``, chosen by measurement
  (``bench/hlora_temperature.py`` on the importance of a real SmolLM2 general stage, bench/RESULTS.md): T=1
  leaves the coefficients nearly uniform (58.4 effective modules of 60, largest/smallest 2.6), T=0.1 nearly
  one-hot (2.3 effective modules), T=0.25 weights the important modules up to ~50x the least important ones
  while about half the modules (29.7 effective) keep a say, the largest coefficient being 0.22.
  ``norm_scale="none", temperature=1`` is the formula as printed; ``temperature -> inf`` is uniform;
  ``layer_wise=False`` (method ``hlora-no-layer``) is exactly uniform.
* ``clamp=False``: the authors' code clamps omega at zero after each step; we offer it as an option.
* ``estimator="paper"``: eq 11. ``"exact"`` uses the true gradient w.r.t. each module's full weight,
  accumulated from forward/backward hooks over micro-batches. The loop backpropagates loss / grad_accum, so the
  hooks already see the gradient of the mean loss. Notes: with LoRA dropout > 0 this is the gradient w.r.t. the
  frozen path's weight (input without dropout); it assumes one backward per micro-batch (no SAM-style second
  pass, no activation checkpointing); under several processes it is averaged across them before use.

Efficiency: modules with the same shapes are stacked and processed with one ``bmm`` per group; ``dW`` is
computed once per step per module (the dW after a step is reused as the next step's dW(t) unless the LoRA
parameters were changed in between, detected through the tensors' version counters).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetless.methods import DOMAIN, GENERAL, MethodSpec, register
from forgetless.training.hooks import Batch, Method, StageContext

FILENAME = "hlora_importance.safetensors"
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class _Group:
    """LoRA modules with identical shapes and dtype, stacked so that per-step work is one bmm."""

    names: list[str]
    modules: list[torch.nn.Module]
    a_params: list[torch.nn.Parameter]
    b_params: list[torch.nn.Parameter]
    scaling: torch.Tensor  # [n, 1, 1]
    dtype: torch.dtype
    # general stage
    omega: torch.Tensor | None = None  # [n, out, in]
    dw_start: torch.Tensor | None = None
    dw_prev: torch.Tensor | None = None
    versions: tuple[int, ...] | None = None
    g_est: torch.Tensor | None = None
    grad_full: torch.Tensor | None = None  # exact estimator: sum of grad_out^T x
    # domain stage
    importance: torch.Tensor | None = None
    dw_ref: torch.Tensor | None = None
    coeff: torch.Tensor | None = None  # [n]
    hooks: list[Any] = field(default_factory=list)
    hook_seconds: float = 0.0  # time spent in the exact estimator's gradient hooks (importance cost)

    @property
    def device(self) -> torch.device:
        return self.a_params[0].device

    def stacked(self, detach: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        a = [p.detach() if detach else p for p in self.a_params]
        b = [p.detach() if detach else p for p in self.b_params]
        return torch.stack(a).to(self.dtype), torch.stack(b).to(self.dtype)

    def delta_weight(self, detach: bool = True) -> torch.Tensor:
        """dW = s * B @ A for all modules of the group at once: [n, out, in]."""
        a, b = self.stacked(detach)
        return torch.bmm(b, a) * self.scaling.to(device=a.device, dtype=self.dtype)

    def current_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.a_params) + tuple(p._version for p in self.b_params)


def lora_modules(model: torch.nn.Module, adapter: str = "default") -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every PEFT LoRA layer with a Linear-style ``adapter`` (A: [r, in], B: [out, r])."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            if getattr(module, "fan_in_fan_out", False):
                raise ValueError(f"{name} uses fan_in_fan_out (Conv1D); only nn.Linear bases are supported")
            found.append((name, module))
    return found


def _build_groups(model: torch.nn.Module, adapter: str) -> list[_Group]:
    by_key: dict[tuple, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in lora_modules(model, adapter):
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        by_key.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, str(a.device)), []).append((name, module))
    groups = []
    for (_, _, dtype, _), items in by_key.items():
        modules = [m for _, m in items]
        groups.append(_Group(
            names=[n for n, _ in items], modules=modules,
            a_params=[m.lora_A[adapter].weight for m in modules], b_params=[m.lora_B[adapter].weight for m in modules],
            scaling=torch.tensor([float(m.scaling[adapter]) for m in modules]).view(-1, 1, 1),
            dtype=torch.promote_types(dtype, torch.float32)))
    return groups


DEFAULT_TEMPERATURE = 0.25  # see the module docstring and bench/RESULTS.md


def layer_coefficients(norms: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, norm_scale: str = "max",
                       layer_wise: bool = True) -> torch.Tensor:
    """Eq 15: c = softmax(||Omega_l||_2 / scale / temperature) over modules; uniform when not layer-wise."""
    if not layer_wise or norms.numel() == 0:
        return torch.full_like(norms, 1.0 / max(1, norms.numel()))
    if norm_scale == "max":
        scale = norms.max()
    elif norm_scale == "mean":
        scale = norms.mean()
    elif norm_scale == "none":
        scale = torch.ones((), dtype=norms.dtype, device=norms.device)
    else:
        raise ValueError(f"norm_scale must be 'max', 'mean' or 'none', got {norm_scale!r}")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.softmax(norms / scale / temperature, dim=0)


def load_importance(path: str | Path) -> dict[str, Any]:
    """Read a file written by :meth:`HLoRA.save_state`.

    Returns ``{"omega": {module: Tensor}, "dw_ref": {module: Tensor}, "metadata": dict}`` (tensors in the
    stored dtype, on the CPU).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no HLoRA importance file at {path}")
    omega, ref = {}, {}
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("hlora", "{}"))
        for key in f.keys():
            name, kind = key.rsplit(".", 1)
            (omega if kind == "omega" else ref)[name] = f.get_tensor(key)
    names = metadata.get("modules") or sorted(omega)
    for name in names:
        if name not in omega or name not in ref:
            raise ValueError(f"HLoRA importance file {path} lacks omega or dw_ref of module {name!r}")
    return {"omega": omega, "dw_ref": ref, "metadata": metadata}


class HLoRA(Method):
    """Records element-wise importance on the general stage and regularizes the domain stage with it."""

    name = "hlora"

    def __init__(self, phi: float = 1e-3, xi: float = 1e-3, temperature: float = DEFAULT_TEMPERATURE, norm_scale: str = "max",
                 layer_wise: bool = True, clamp: bool = False, estimator: str = "paper",
                 storage_dtype: str = "float32", adapter: str = "default", snap_reference: bool = True) -> None:
        if estimator not in ("paper", "exact"):
            raise ValueError(f"estimator must be 'paper' or 'exact', got {estimator!r}")
        if storage_dtype not in _STORAGE:
            raise ValueError(f"storage_dtype must be one of {sorted(_STORAGE)}, got {storage_dtype!r}")
        if norm_scale not in ("max", "mean", "none"):
            raise ValueError(f"norm_scale must be 'max', 'mean' or 'none', got {norm_scale!r}")
        if temperature <= 0 or xi < 0 or phi < 0:
            raise ValueError("need temperature > 0, xi >= 0, phi >= 0")
        self.phi, self.xi, self.temperature, self.norm_scale = float(phi), float(xi), float(temperature), norm_scale
        self.layer_wise, self.clamp, self.estimator = bool(layer_wise), bool(clamp), estimator
        self.storage_dtype, self.adapter, self.snap_reference = storage_dtype, adapter, bool(snap_reference)
        self.groups: list[_Group] = []
        # Per-module results of the general stage (views into the groups' stacked tensors, or loaded ones).
        self.importance: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, Any] = {}
        self.steps = 0
        self._pending: Path | None = None
        self._model_name = ""
        self._seconds = 0.0  # wall time of recording importance (the report's cost table)

    def __repr__(self) -> str:
        return (f"HLoRA(phi={self.phi}, xi={self.xi}, temperature={self.temperature}, norm_scale={self.norm_scale!r}, "
                f"layer_wise={self.layer_wise}, clamp={self.clamp}, estimator={self.estimator!r})")

    # ----------------------------------------------------------------------------------------------- stages
    def on_stage_start(self, ctx: StageContext) -> None:
        self._remove_hooks()
        self.groups = _build_groups(ctx.model, self.adapter)
        if not self.groups:
            raise ValueError("HLoRA found no LoRA modules in the model (attach LoRA first)")
        self._model_name = str(getattr(getattr(ctx.model, "config", None), "_name_or_path", "") or "")
        if ctx.stage == GENERAL:
            self.steps, self._seconds = 0, 0.0
            self.importance, self.reference = {}, {}
            if self.estimator == "exact":
                self._install_hooks()
        elif ctx.stage == DOMAIN:
            self._start_domain(ctx)
        else:
            raise ValueError(f"HLoRA does not know stage {ctx.stage!r}")

    def on_stage_end(self, ctx: StageContext) -> None:
        self._remove_hooks()
        if ctx.stage != GENERAL:
            return
        started = _now(self.groups)
        norms = {}
        for g in self.groups:
            dw_end = g.delta_weight()
            if g.omega is None:  # no step was taken
                g.omega, g.dw_start = torch.zeros_like(dw_end), dw_end.clone()
            delta = dw_end - g.dw_start  # Delta_l (eq 13); equals dW(end) when B starts at zero
            g.importance = g.omega / (delta.square() + self.xi)  # Omega = omega / (Delta^2 + xi)  (eq 13)
            g.dw_ref = dw_end  # dW_nu: a fresh tensor, never a parameter, never moved
            for i, name in enumerate(g.names):
                self.importance[name], self.reference[name] = g.importance[i], g.dw_ref[i]
                norms[name] = float(torch.linalg.vector_norm(g.importance[i]))
            g.omega = g.dw_start = g.dw_prev = g.g_est = g.grad_full = None
        ctx.extras["hlora_importance_norms"] = norms
        self._seconds += _now(self.groups) - started + sum(g.hook_seconds for g in self.groups)
        size = _STORAGE[self.storage_dtype].itemsize
        ctx.extras.setdefault("importance_cost", {})["hlora"] = {
            "what": f"path-integral importance ({self.estimator} estimator) + dW_nu", "seconds": self._seconds,
            "bytes": sum(2 * t.numel() * size for t in self.importance.values()), "steps": self.steps,
            "tensors": 2 * len(self.importance)}
        self.metadata = self._describe()

    # ------------------------------------------------------------------------------ general: importance
    def before_optimizer_step(self, ctx: StageContext) -> None:
        if ctx.stage != GENERAL:
            return
        started = _now(self.groups)
        eta = ctx.lr  # the lr of this step (the scheduler steps after the optimizer)
        for g in self.groups:
            a, b = g.stacked()
            if g.omega is None:
                dw = torch.bmm(b, a) * g.scaling.to(a.device, g.dtype)
                g.scaling = g.scaling.to(a.device, g.dtype)
                g.omega, g.dw_start, g.dw_prev = torch.zeros_like(dw), dw.clone(), dw
            elif g.versions != g.current_versions():  # someone moved A/B after our last look: recompute dW(t)
                g.dw_prev = torch.bmm(b, a) * g.scaling
            if self.estimator == "paper":
                ga = torch.stack([_grad(p) for p in g.a_params]).to(g.dtype)
                gb = torch.stack([_grad(p) for p in g.b_params]).to(g.dtype)
                # g~ = s (g_B A + B g_A - eta g_B g_A) = s (g_B (A - eta g_A) + B g_A)   (eq 11)
                g.g_est = torch.baddbmm(torch.bmm(b, ga), gb, a - eta * ga) * g.scaling
            else:
                if g.grad_full is None:
                    g.grad_full = torch.zeros_like(g.dw_prev)
                _all_reduce_mean(g.grad_full)
                g.g_est = g.grad_full
        self._seconds += _now(self.groups) - started

    def after_optimizer_step(self, ctx: StageContext) -> None:
        if ctx.stage != GENERAL:
            return
        started = _now(self.groups)
        for g in self.groups:
            if g.g_est is None:
                continue
            dw_next = g.delta_weight()  # dW(t+1), computed once and reused as the next step's dW(t)
            # omega += -g~ * (dW(t+1) - dW(t)) = g~ * (dW(t) - dW(t+1))   (eqs 8-10), in place
            g.omega.add_(g.dw_prev.sub_(dw_next).mul_(g.g_est))
            if self.clamp:
                g.omega.clamp_(min=0)
            g.dw_prev, g.versions = dw_next, g.current_versions()
            if g.grad_full is not None:
                g.grad_full.zero_()
            g.g_est = None
        self.steps += 1
        self._seconds += _now(self.groups) - started

    def _install_hooks(self) -> None:
        for g in self.groups:
            for i, module in enumerate(g.modules):
                g.hooks.append(module.register_forward_hook(_ExactGradHook(g, i)))

    def _remove_hooks(self) -> None:
        for g in self.groups:
            for h in g.hooks:
                h.remove()
            g.hooks.clear()

    # --------------------------------------------------------------------------------- domain: regularizer
    def _start_domain(self, ctx: StageContext) -> None:
        if self._pending is not None:
            loaded = load_importance(self._pending)
            self.importance, self.reference, self.metadata = loaded["omega"], loaded["dw_ref"], loaded["metadata"]
            self.steps = int(self.metadata.get("steps", 0))
            self._pending = None
        if not self.importance:
            raise ValueError("HLoRA's domain stage needs importance: run the general stage with HLoRA first, "
                             "or load_state() a folder with " + FILENAME)
        self._validate()
        stored = self.metadata.get("model") or ""
        if stored and self._model_name and stored != self._model_name:
            warnings.warn(f"HLoRA importance was recorded on {stored!r}, the model now is {self._model_name!r}")
        snapped = False
        stored_dtype = next(iter(self.reference.values())).dtype
        for g in self.groups:
            dev = g.device
            g.importance = torch.stack([self.importance[n].to(dev, g.dtype) for n in g.names])
            g.dw_ref = torch.stack([self.reference[n].to(dev, g.dtype) for n in g.names])
            g.scaling = g.scaling.to(dev, g.dtype)
            if self.snap_reference and stored_dtype != g.dtype:
                # A reduced-precision reference: the adapter we continue from *is* dW_nu, in full precision.
                current = g.delta_weight()
                tol = 2.0 ** -7 * g.dw_ref.abs() + 1e-12
                if bool(((current - g.dw_ref).abs() <= tol).all()):
                    g.dw_ref, snapped = current, True
            for i, n in enumerate(g.names):
                self.importance[n], self.reference[n] = g.importance[i], g.dw_ref[i]
        self._update_coefficients(ctx)
        ctx.extras["hlora_reference_snapped"] = snapped

    def _validate(self) -> None:
        have = {n: (tuple(g.b_params[i].shape[:1]) + tuple(g.a_params[i].shape[1:]))
                for g in self.groups for i, n in enumerate(g.names)}
        for name, shape in have.items():
            if name not in self.importance:
                raise ValueError(f"HLoRA importance has no entry for LoRA module {name!r} of this model")
            for kind, table in (("omega", self.importance), ("dw_ref", self.reference)):
                if name not in table:
                    raise ValueError(f"HLoRA importance lacks {kind} of module {name!r}")
                if tuple(table[name].shape) != shape:
                    raise ValueError(f"HLoRA {kind} of module {name!r} has shape {tuple(table[name].shape)}, "
                                     f"the model's LoRA update there is {shape}")
        extra = sorted(set(self.importance) - set(have))
        if extra:
            raise ValueError(f"HLoRA importance has module {extra[0]!r} that this model has no LoRA layer for "
                             f"({len(extra)} such modules)")

    def _update_coefficients(self, ctx: StageContext) -> None:
        norms = torch.cat([torch.linalg.vector_norm(g.importance.flatten(1), dim=1).float().cpu() for g in self.groups])
        c = layer_coefficients(norms, self.temperature, self.norm_scale, self.layer_wise)  # eq 15
        start = 0
        for g in self.groups:
            g.coeff = c[start:start + len(g.names)].to(g.device, g.dtype)
            start += len(g.names)
        names = [n for g in self.groups for n in g.names]
        ctx.extras["hlora_layer_coefficients"] = {n: float(v) for n, v in zip(names, c)}

    def regularizer(self) -> torch.Tensor:
        """sum_l c_l sum_i Omega_l,i (dW_l,i - dW_nu_l,i)^2 (eqs 14-15), differentiable in A and B."""
        total = None
        for g in self.groups:
            with torch.autocast(device_type=g.device.type, enabled=False):
                diff = g.delta_weight(detach=False) - g.dw_ref
                per_module = (g.importance * diff.square()).sum(dim=(1, 2))  # L_l (eq 14)
                term = (g.coeff * per_module).sum()
            total = term if total is None else total + term
        return total

    def extra_loss(self, ctx: StageContext, batch: Batch) -> torch.Tensor | None:
        if ctx.stage != DOMAIN or self.phi == 0:
            return None
        reg = self.regularizer()
        scaled = self.phi * reg  # phi * L_reg (eq 16)
        ctx.log("reg_loss", reg)
        ctx.log("reg_loss_scaled", scaled)
        return scaled

    # ---------------------------------------------------------------------------------------- persistence
    def _describe(self) -> dict[str, Any]:
        names = [n for g in self.groups for n in g.names]
        return {"model": self._model_name, "modules": names,
                "shapes": {n: list(self.importance[n].shape) for n in names}, "steps": self.steps,
                "estimator": self.estimator, "dtype": self.storage_dtype, "xi": self.xi, "clamp": self.clamp,
                "adapter": self.adapter}

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self._pending is not None and not self.importance:
            self._copy_pending(Path(directory))
            return
        if not self.importance:
            raise ValueError("HLoRA has no importance to save (the general stage has not run)")
        dtype = _STORAGE[self.storage_dtype]
        tensors = {}
        for name in self.importance:
            tensors[f"{name}.omega"] = self.importance[name].detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.dw_ref"] = self.reference[name].detach().to("cpu", dtype).contiguous()
        meta = dict(self.metadata or self._describe())
        meta["dtype"] = self.storage_dtype
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"hlora": json.dumps(meta)})
        print(f"HLoRA importance: {path} ({path.stat().st_size / 2**20:.2f} MiB, {len(self.importance)} modules, "
              f"{self.storage_dtype})")

    def _copy_pending(self, directory: Path) -> None:
        import shutil

        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._pending, directory / FILENAME)

    def load_state(self, directory: Path) -> None:
        """Remember the file; it is read and checked against the model at the domain stage's start."""
        path = Path(directory)
        path = path / FILENAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no HLoRA importance file at {path}")
        self._pending = path
        self.importance, self.reference = {}, {}


def _now(groups: Sequence[_Group]) -> float:
    """A wall-clock reading after the device's queued work is done (CUDA runs asynchronously)."""
    if groups and groups[0].device.type == "cuda":
        torch.cuda.synchronize(groups[0].device)
    return time.perf_counter()


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p)


def _all_reduce_mean(t: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t.div_(dist.get_world_size())


class _ExactGradHook:
    """Forward hook: ties a tensor hook on the module's output that adds grad_out^T x to the module's slot of
    the group's full-weight gradient (dL/dW for y = x W^T + ...)."""

    def __init__(self, group: _Group, index: int) -> None:
        self.group, self.index = group, index

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad) or not args:
            return
        x = args[0].detach()
        group, index = self.group, self.index

        def accumulate(grad_out: torch.Tensor) -> None:
            started = time.perf_counter()  # not synchronized: inside backward, approximate on CUDA
            if group.grad_full is None:
                n, r_in = len(group.names), group.a_params[0].shape[1]
                group.grad_full = torch.zeros(n, group.b_params[0].shape[0], r_in, dtype=group.dtype,
                                              device=grad_out.device)
            go = grad_out.reshape(-1, grad_out.shape[-1]).to(group.dtype)
            group.grad_full[index].addmm_(go.T, x.reshape(-1, x.shape[-1]).to(group.dtype))
            group.hook_seconds += time.perf_counter() - started

        out.register_hook(accumulate)


def _build(layer_wise: bool):
    def build(**options: Any) -> HLoRA:
        if not layer_wise and options.get("layer_wise", False):
            raise TypeError("hlora-no-layer is uniform by definition; use hlora for layer_wise")
        options.setdefault("layer_wise", layer_wise)
        return HLoRA(**options)

    return build


_DOMAIN_OPTIONS = frozenset({"phi", "temperature", "norm_scale", "layer_wise", "snap_reference"})
register(MethodSpec("hlora", "HLoRA: element-wise path-integral importance on nu, layer-weighted quadratic pull on mu",
                    stages=(GENERAL, DOMAIN), build=_build(True), domain_options=_DOMAIN_OPTIONS,
                    weight_option=("phi", 1e-3)))
register(MethodSpec("hlora-no-layer", "HLoRA with uniform layer coefficients (element-wise regularization only)",
                    stages=(GENERAL, DOMAIN), build=_build(False), domain_options=_DOMAIN_OPTIONS,
                    weight_option=("phi", 1e-3), general_as="hlora"))

__all__: Sequence[str] = ["HLoRA", "layer_coefficients", "load_importance", "lora_modules", "FILENAME"]
