"""HLoRA: hierarchical layer-wise and element-wise regularization of LoRA fine-tuning.

Paper: "How to Alleviate Catastrophic Forgetting in LLMs Finetuning? Hierarchical Layer-Wise and
Element-Wise Regularization". Equation numbers below refer to that paper.

For every LoRA module l the adapter's full-weight update is ``dW_l = s_l * B_l @ A_l`` (``B`` is zero at
init, so ``dW_l = 0`` at the start of the general stage).

General stage (nu): element-wise importance by path integral (eqs 6-13)::

    omega_l += -g~_l * (dW_l(t+1) - dW_l(t))                 per optimizer step   (eqs 8-10)
    g~_l     = s_l * (g_B @ A + B @ g_A - eta * g_B @ g_A)   "paper" estimator    (eq 11)
    g~_l     = dL/dW_l = sum_tokens grad_out^T x             "exact" estimator (from hooks)
    g~_l     = -(dW_l(t+1) - dW_l(t)) / eta_eff_l            "adam" estimator (below)
    Omega_l  = omega_l / (Delta_l**2 + xi_l),   Delta_l = dW_l(end) - dW_l(start)   (eqs 12-13)

The paper estimator is the full-weight gradient that plain SGD on (A, B) implies: with A' = A - eta g_A and
B' = B - eta g_B one gets dW' - dW = -eta * g~ exactly, so under SGD ``omega`` is -sum g~.(dW'-dW) = eta |g~|^2.

**The adam estimator.** Under AdamW eq 11 no longer describes the step (the step is -eta m^/(sqrt(v^)+eps) per
factor element plus weight decay; the issue measured ||dW' - dW + eta g~|| / ||dW' - dW|| = 0.997), so the path
integral with eq 11 is not the one the derivation claims. The path integral itself is
``omega_l,i = -sum_t G_l,i(t) (dW_l,i(t+1) - dW_l,i(t))`` with the true full-weight gradient G (the "exact"
estimator); summed over a module's elements it is, to first order in the step, the loss decrease that the step of
that module's factors caused::

    -<G_l, dW_l(t+1) - dW_l(t)>  =  -<g_A, A' - A> - <g_B, B' - B>  + O(|step|^2)  =:  dL_l(t)

(dW = s B A, so <G, s (B' - B) A> = <g_B, B' - B> and <G, s B (A' - A)> = <g_A, A' - A>), and dL_l(t) needs only
the factors' gradients and steps, whatever the optimizer did. The adam estimator keeps eq 11's idea -- g~ is the
gradient that reproduces the observed step, ``dW(t+1) - dW(t) = -eta_eff g~`` exactly -- and takes for each module
and step the one learning rate that makes the surrogate's path integral equal that first-order decrease::

    eta_eff_l(t) = ||dW_l(t+1) - dW_l(t)||^2 / dL_l(t),   so   -g~ . (dW(t+1) - dW(t)) = (dW(t+1) - dW(t))^2 / eta_eff

i.e. each step's module decrease dL_l(t) is shared among the module's elements in proportion to their squared
movement. Under plain SGD it reduces to eq 11's distribution (omega_i proportional to (dW'-dW)_i^2) with the module's
total being the true first-order decrease eta (|g_A|^2 + |g_B|^2) instead of eta |g~|^2. A step that raised the
loss (dL_l < 0, e.g. Adam's momentum overshooting) gives eta_eff < 0 and a negative contribution, which the
non-negativity rule below treats as for the other estimators. Cost: one copy of A, B and their gradients per step.

Domain stage (mu): quadratic pull towards the general-stage adapter ``dW_nu`` (eqs 14-16)::

    L_l   = sum_i Omega_l,i (dW_l,i - dW_nu_l,i)**2                                    (eq 14)
    c_l   = softmax_l(||Omega_l||_2 / T)                                               (eq 15)
    L     = L_task + phi * sum_l c_l L_l                                               (eq 16)
    L     = L_task + phi * sum_l c_l L_l / mean(Omega)          with phi_scale="mean"

Default choices (all options of :class:`HLoRA`):

* ``nonnegative="end"``: Omega is non-negative by construction, ``Omega = max(omega, 0) / (Delta^2 + xi)``. Where
  Omega < 0 the term Omega (dW - dW_nu)^2 *rewards* moving away, so eq 14 is no penalty; the issue measured
  omega < 0 in 24% of elements with the exact estimator under AdamW (~1% with eq 11). We clamp the *accumulated*
  omega at the end because the accumulated path integral is the quantity with a meaning: with the exact
  gradient it is the element's share of the general-loss decrease over the stage (Synaptic Intelligence, Zenke
  et al. 2017), and an element whose net movement raised the general loss contributed nothing to the general
  ability the domain stage should protect -- importance 0, no pull. The alternatives are options:
  ``"step"`` adds only the positive part of each step's contribution (it counts every downhill step of an
  oscillation and never the uphill ones, so noise becomes importance), ``"running"`` clamps the running sum after
  each step (path-dependent; what the authors' code is reported to do -- we could not check it here), and
  ``"none"`` is the paper's formula as printed (Omega may be negative). |omega| is not offered: it would make
  "moved uphill" as important as "moved downhill". Under SGD with eq 11 every contribution is eta g~^2 >= 0 and
  all rules coincide.
* ``xi_mode="relative"``, ``xi=0.1``: ``xi_l = xi * mean_i(Delta_l,i^2)`` per module. The paper's constant
  (``xi_mode="absolute"``, the SI default xi = 1e-3) is meaningless at LoRA's scale: the issue measured a median
  Delta^2 of 2.3e-5 with only 0.1% of elements above 1e-3, so Omega ~ 1000 omega and eq 13 normalises nothing;
  on examples/hlora_shared.yaml's general stage (SmolLM2, LoRA r 8 on q/v, 15 AdamW steps of 8 x 128 tokens at
  lr 2e-4, 13.3M elements) the median Delta^2 is 3.5e-9 and the mean 1.0e-8, none above 1e-3. In units of the
  module's own mean Delta^2 the damping follows the scale: on that run xi = 0.1 lets eq 13 divide 72% of the
  elements by their own Delta^2 (what eq 13 is for) while the least-moved element of a module is amplified at most
  5.3x more than its median element (the damping's purpose: omega/Delta^2 ~ g/Delta is noise for Delta -> 0);
  xi = 1 normalises only 28% (1.4x), xi = 0.01 91% but amplifies 44x. Measured with HLoRA(xi=0, xi_mode=
  "absolute", nonnegative="none") on that run, which also gave omega < 0 in 2.3% of the elements with eq 11 and
  in none with the adam estimator.
* ``phi = 10``, ``phi_scale="mean"``: the regularizer divided by the mean of Omega over all elements of all
  modules. Omega's absolute scale moves with the learning rate, the number of steps, the estimator and xi, so an
  absolute phi does not transfer between models or settings; relative to mean(Omega),
  ``phi * sum_l c_l sum_i (Omega_i / mean Omega) (dW_i - dW_nu_i)^2`` weighs squared movement of an
  average-importance element. phi 10 was chosen by the recorded sweep of issue 13 (docs/results/defaults: SmolLM2,
  ARC-Easy, the regime where plain LoRA forgets): the smallest phi of 0.1..100 that removes at least 90 % of
  ``lora-nu-mu``'s general-perplexity increase (+28.6 % there; phi 10: -3.7 %, phi 1: +4.4 %) with the domain
  gain within one standard error of ``lora-nu-mu``'s. The paper's ``phi = 1e-3`` with ``phi_scale="absolute"``
  (eq 16 as printed) is the option ``{phi: 0.001, phi_scale: absolute}``; at LoRA's scale it does nothing
  measurable (penalty ~1e-11 of the loss, issue 13).
* ``estimator="paper"`` (eq 11): the sweep chose phi with it, and ``"adam"`` (above; consistent with AdamW, the
  optimizer the loop uses) measured the same trade-off at phi 1 (+5.8 % PPL, +11.4 domain points, against +4.4 %
  and +11.0; one seed), so nothing measured argues for departing from the paper's; ``"exact"`` uses the true
  gradient w.r.t. each module's full weight, accumulated from
  forward/backward hooks over micro-batches. The loop backpropagates each micro-batch's share of the step's
  token-mean loss, so the hooks already see the gradient of the mean loss. Notes: with LoRA dropout > 0 this is
  the gradient w.r.t. the frozen path's weight (input without dropout); it assumes one backward per micro-batch,
  so a method that wraps the forward/backward on the general stage (SAM with ``stages: [general]``) is refused
  when the method list is resolved (:meth:`HLoRA.check_composition`): the hooks would add the gradients of both
  passes. Under several processes it is averaged across them before use. With ``"paper"`` and ``"adam"`` that
  composition runs, and their ``g`` is the gradient the optimizer steps with: SAM's, taken at ``w + eps``, not the
  task loss's gradient at ``w`` (the path integral then follows the path SAM's steps take, with SAM's gradients).
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

The paper's method exactly: ``{phi: 1e-3, phi_scale: absolute, estimator: paper, nonnegative: none, xi_mode:
absolute, xi: 1e-3, norm_scale: none, temperature: 1}``.

Efficiency: modules with the same shapes are stacked, and each group's dense work goes over its modules in chunks
(:func:`forgetless.lora.module_chunks`: about 2^20 elements of dW per chunk on the CPU, where small tensors stay in
cache and are reused by the allocator, 2^24 elsewhere, which bounds the transient memory), each chunk's dW a batched
matmul from the factors. The path integral keeps the factors before each step (not a dense dW(t)) and, per chunk,
forms dW(t) - dW(t+1) (one rank-2r matmul from both factor pairs, :func:`forgetless.lora.update_difference`: exact
differences, no cancellation) and g~ (one rank-2r matmul) and adds their product to omega in one pass: the only dense
state of the general stage is omega (and the exact estimator's full-weight gradient). The regularizer is one
:func:`forgetless.lora.weighted_distance` per group: per chunk, dW - dW_nu as one rank-2r matmul, weighted in place,
the value and the factors' gradients taken at once from it by two matmuls, nothing dense kept for the backward;
autograd over the same formula
wrote and kept several dense tensors of the group's full size (the new path takes about a seventh of its time at
SmolLM2's widths on the CPU, bench/RESULTS.md). ``fused = False`` on the plugin takes the plain path (the path
integral one module per chunk, the regularizer module by module with autograd), which gives the same numbers up to
rounding. No
per-step path reads a device value: ``reg_loss`` is left to the loop as a tensor and read at its logging interval.

State: ``dW_nu`` (eq 14's anchor) is kept as its factors ``(A_nu, B_nu)`` and scaling, ``r (in + out)`` numbers per
module instead of ``out x in``, and enters the regularizer through ``dW - dW_nu`` formed from both factor pairs (so it
is exactly 0 at the anchor, and the value and gradient are those of a dense anchor up to rounding); that costs
nothing over a dense anchor, for about half the state (omega is the rest). The saved file holds ``{module}.omega`` (in ``storage_dtype``) and
``{module}.ref_A`` / ``{module}.ref_B`` (in the factors' compute dtype: the anchor is exact and needs no snapping),
with the scalings and layouts in its metadata. Files written before (a dense ``{module}.dw_ref``) are still read: their
cached general stages stay usable. Where the adapter the domain stage starts from gives that dense ``dW_nu`` exactly
(the usual case: it is the adapter the general stage ended with), its factors replace the dense tensor (the same
numbers, without the memory); otherwise the dense tensor is kept and used as before.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetless.kernels import lowrank_product_accumulate_, triton_enabled
from forgetless.lora import (DEFAULT_ADAPTER, LoraGroup, compute_dtype, delta_from_factors, delta_weight,
                             difference_factors, group_modules, lora_modules, module_chunks, scaled_update, scaling,
                             scaling_tensor, update_difference, update_shape, weighted_distance)
from forgetless.methods import DOMAIN, GENERAL, MethodSpec, register
from forgetless.methods.common import (STORAGE_DTYPES, Options, PendingState, StateFile, Timer, all_reduce_,
                                       check_modules, option)
from forgetless.progress import say
from forgetless.training.hooks import Batch, Method, StageContext

FILENAME = "hlora_importance.safetensors"
STATE = StateFile(FILENAME, "hlora", "HLoRA importance")


@dataclass
class _Group(LoraGroup):
    """A :class:`LoraGroup` with HLoRA's per-group state (stacked over the group's modules)."""

    # general stage
    omega: torch.Tensor | None = None  # [n, out, in]
    start: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None  # dW(start) as factors (A, B); dense when
    # restored from a checkpoint written before factors
    before: tuple[torch.Tensor, torch.Tensor] | None = None  # A, B before this optimizer step (dW(t) as factors)
    grads: tuple[torch.Tensor, torch.Tensor] | None = None  # paper and adam estimators: g_A, g_B of this step
    eta: float = 0.0  # the lr of this step
    grad_full: torch.Tensor | None = None  # exact estimator: sum of grad_out^T x
    # domain stage
    importance: torch.Tensor | None = None
    ref_a: torch.Tensor | None = None  # dW_nu = ref_scaling * ref_b @ ref_a: [n, r, in], [n, out, r]
    ref_b: torch.Tensor | None = None
    ref_scaling: torch.Tensor | None = None  # [n, 1, 1]
    dw_ref: torch.Tensor | None = None  # dense dW_nu, only from a file written before factors (and not matched)
    coeff: torch.Tensor | None = None  # [n]
    hooks: list[Any] = field(default_factory=list)
    hook_seconds: float = 0.0  # time spent in the exact estimator's gradient hooks (importance cost)

    def reference_delta(self) -> torch.Tensor:
        """dW_nu of every module of the group, [n, *base weight shape] (no gradient)."""
        if self.dw_ref is not None:
            return self.dw_ref
        return delta_from_factors(self.ref_a, self.ref_b, self.ref_scaling, self.fan_in_fan_out, self.dtype)

    def moved_since_start(self, a: torch.Tensor, b: torch.Tensor, part: slice) -> torch.Tensor:
        """dW(a, b) - dW at the general stage's first step, of the modules ``part``: one rank-2r matmul from both
        factor pairs (:func:`forgetless.lora.update_difference`), or the two products when dW(start) is dense (a
        checkpoint written before factors)."""
        if isinstance(self.start, torch.Tensor):
            moved = scaled_update(a[part], b[part], self.scaling[part], self.fan_in_fan_out)
            return moved.sub_(self.start[part].to(self.device))
        a0, b0 = self.start
        return update_difference(a[part], b[part], self.scaling[part], a0[part], b0[part],
                                 fan_in_fan_out=self.fan_in_fan_out)


def _build_groups(model: torch.nn.Module, adapter: str) -> list[_Group]:
    return group_modules(lora_modules(model, adapter), adapter, _Group)  # type: ignore[return-value]


class ReferenceUpdates(Mapping):
    """``dW_nu`` per module, ``{name: tensor}``, held as factors and multiplied out on access (a fresh tensor each time,
    never a parameter). Modules read from a file written before factors may hold the dense tensor instead."""

    def __init__(self) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}  # name: (A, B, s, fan_in_fan_out)
        self.dense: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.dense:
            return self.dense[name]
        a, b, s, fan = self.factors[name]
        return delta_from_factors(a, b, s, fan)

    def __iter__(self) -> Iterator[str]:
        yield from self.factors
        yield from (n for n in self.dense if n not in self.factors)

    def __len__(self) -> int:
        return len(self.factors.keys() | self.dense.keys())

    def shapes(self) -> dict[str, torch.Tensor]:
        """``{name: a meta tensor of dW_nu's shape}``, for checking against a model without multiplying anything."""
        out = {n: torch.empty(t.shape, device="meta") for n, t in self.dense.items()}
        for n, (a, b, _, fan) in self.factors.items():
            shape = (b.shape[-2], a.shape[-1])
            out[n] = torch.empty(shape[::-1] if fan else shape, device="meta")
        return out

    def nbytes(self) -> int:
        """Bytes held (views into stacked tensors counted at their size)."""
        return (sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _, _ in self.factors.values())
                + sum(t.numel() * t.element_size() for t in self.dense.values()))


DEFAULT_TEMPERATURE = 0.25  # see the module docstring and bench/RESULTS.md
DEFAULT_XI = 0.1  # relative to each module's mean Delta^2; see the module docstring


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

    Returns ``{"omega": {module: Tensor}, "dw_ref": ReferenceUpdates, "metadata": dict}`` (tensors in the stored
    dtype, on the CPU). ``dw_ref[module]`` is ``dW_nu``, multiplied out from the stored factors on access (or the
    dense tensor of a file written before factors); ``dw_ref.factors[module]`` is ``(A_nu, B_nu, s, fan_in_fan_out)``.
    """
    return _split(*STATE.load(path), STATE.locate(path))


def _split(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """The stored ``{module}.omega`` and ``{module}.ref_A`` / ``.ref_B`` (or, in files written before factors, dense
    ``{module}.dw_ref``) tensors, as the importance table and the references."""
    omega: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, kind = key.rsplit(".", 1)
        if kind == "omega":
            omega[name] = tensor
        elif kind in ("ref_A", "ref_B", "dw_ref"):
            parts.setdefault(name, {})[kind] = tensor
        else:
            raise ValueError(f"HLoRA importance file {path} has an unknown tensor {key!r}")
    described = metadata.get("reference") or {}
    refs = ReferenceUpdates()
    for name, part in parts.items():
        if "dw_ref" in part:
            refs.dense[name] = part["dw_ref"]
            continue
        if set(part) != {"ref_A", "ref_B"}:
            raise ValueError(f"HLoRA importance file {path} has only {sorted(part)[0]} of module {name!r}'s dW_nu "
                             f"factors (needs ref_A and ref_B)")
        try:
            s, fan = float(described["scaling"][name]), bool(described["fan_in_fan_out"][name])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"HLoRA importance file {path} lacks the scaling of module {name!r}'s dW_nu factors in "
                             f"its metadata") from None
        a, b = part["ref_A"], part["ref_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"HLoRA importance file {path}: module {name!r}'s dW_nu factors have shapes "
                             f"{tuple(a.shape)} and {tuple(b.shape)}, not [r, in] and [out, r]")
        refs.factors[name] = (a, b, s, fan)
    for name in metadata.get("modules") or sorted(omega):
        if name not in omega or name not in refs:
            raise ValueError(f"HLoRA importance file {path} lacks omega or dW_nu of module {name!r}")
    return {"omega": omega, "dw_ref": refs, "metadata": metadata}


@dataclass(repr=False)
class HLoRAOptions(Options):
    phi: float = option(10.0, "weight of the regularizer (eq 16); the paper's is 1e-3 with phi_scale absolute",
                        domain=True, weight=True, was=1e-3)
    phi_scale: str = option("mean", "mean: the regularizer divided by the mean of Omega over all elements (a weight "
                                     "that transfers across models); absolute: phi as in eq 16",
                            choices=("absolute", "mean"), domain=True, was="absolute")
    xi: float = option(DEFAULT_XI, "damping of the importance normalisation Omega = omega / (Delta^2 + xi) (eq 13); "
                                   "with xi_mode relative, in units of each module's mean Delta^2")
    xi_mode: str = option("relative", "relative: xi_l = xi * mean(Delta_l^2) per module; absolute: the constant xi "
                                      "(the paper)", choices=("relative", "absolute"))
    nonnegative: str = option("end", "how Omega >= 0 holds: end (clamp the accumulated omega at zero), step (add "
                                     "each step's positive part), running (clamp the running sum after each step), "
                                     "none (the paper's formula, may be negative)",
                              choices=("end", "step", "running", "none"))
    temperature: float = option(DEFAULT_TEMPERATURE, "temperature of the layer coefficients' softmax (eq 15)",
                                domain=True)
    norm_scale: str = option("max", "divide the importance norms by their max, mean or nothing before eq 15",
                             choices=("max", "mean", "none"), domain=True)
    layer_wise: bool = option(True, "layer coefficients by eq 15 (False: uniform)", domain=True)
    estimator: str = option("paper", "the full-weight gradient of the path integral: paper (eq 11, SGD's), adam "
                                     "(the step over a per-module effective lr) or exact (hooks)",
                            choices=("paper", "adam", "exact"))
    storage_dtype: str = option("float32", "dtype of the importance, saved and held during the domain stage "
                                           "(bfloat16 halves both; the regularizer computes in float32)",
                                choices=tuple(STORAGE_DTYPES))
    # domain=True: where omega and Omega live changes no number, so a cached general stage serves either way
    offload: str = option("none", "keep omega (general stage) and Omega (domain stage) in CPU memory and copy each "
                                  "chunk of modules to the device when a step needs it (GPU memory for PCIe traffic)",
                          choices=("none", "cpu"), domain=True)
    adapter: str = option(DEFAULT_ADAPTER, "the PEFT adapter to regularize")
    snap_reference: bool = option(True, "use the adapter itself as dW_nu when a reduced-precision reference "
                                        "matches it", domain=True)

    def check(self) -> None:
        if self.temperature <= 0 or self.xi < 0 or self.phi < 0:
            raise ValueError("need temperature > 0, xi >= 0, phi >= 0")


class HLoRA(Method):
    """Records element-wise importance on the general stage and regularizes the domain stage with it."""

    name = "hlora"

    Options = HLoRAOptions

    def __init__(self, options: HLoRAOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.groups: list[_Group] = []
        # Per-module results of the general stage (views into the groups' stacked tensors, or loaded ones).
        self.importance: dict[str, torch.Tensor] = {}
        self._refs = ReferenceUpdates()  # dW_nu per module, as factors
        self.metadata: dict[str, Any] = {}
        self.steps = 0
        self._state = PendingState(STATE)
        self._model_name = ""
        self._timer = Timer()  # time of recording importance (device time on a GPU; the report's cost table)
        self._seconds_before = 0.0  # of that time, the sessions' before a resume (from the checkpoint)
        self._phi_unit = 1.0  # 1 / mean(Omega) with phi_scale "mean", set at the domain stage's start

    fused = True  # chunks of modules at once; False: the plain path, module by module (the same numbers)

    @property
    def reference(self) -> ReferenceUpdates:
        """``{module: dW_nu}`` (eq 14's anchor), multiplied out from the held factors on access."""
        return self._refs

    def check_composition(self, others: Sequence[Method]) -> None:
        """The exact estimator's hooks add the gradient of every backward pass: refuse a method that wraps the
        general stage's forward/backward (SAM there runs two passes per micro-batch, counting gradients twice)."""
        if self.estimator != "exact":
            return
        for other in others:
            wraps = type(other).wrap_forward_backward is not Method.wrap_forward_backward
            if wraps and GENERAL in getattr(other, "stages", (GENERAL, DOMAIN)):
                raise ValueError(
                    f"hlora with estimator: exact cannot run with {other.name} on the general stage: {other.name} "
                    f"replaces the forward/backward there (SAM: two passes per micro-batch) and the exact estimator's "
                    f"hooks would add the gradients of every pass. Use estimator: paper or adam, or run "
                    f"{other.name} on the domain stage only (stages: [domain])")

    # ----------------------------------------------------------------------------------------------- stages
    def on_stage_start(self, ctx: StageContext) -> None:
        self._remove_hooks()
        self.groups = _build_groups(ctx.model, self.adapter)
        if not self.groups:
            raise ValueError(f"HLoRA found no LoRA modules of adapter {self.adapter!r} in the model (attach LoRA "
                             f"first)")
        self._model_name = str(getattr(getattr(ctx.model, "config", None), "_name_or_path", "") or "")
        if ctx.stage == GENERAL:
            self.steps, self._timer, self._seconds_before = 0, Timer(self.groups[0].device), 0.0
            self.importance, self._refs = {}, ReferenceUpdates()
            if self.estimator == "exact":
                self._install_hooks()
        elif ctx.stage == DOMAIN:
            self._start_domain(ctx)
        else:
            raise ValueError(f"HLoRA does not know stage {ctx.stage!r}")

    def _held(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``t`` where this plugin keeps its dense state: on ``device``, or with ``offload: cpu`` in CPU memory
        (pinned when the device is a GPU, so the per-chunk copies are asynchronous)."""
        if self.offload != "cpu":
            return t.to(device)
        t = t.cpu()
        return t.pin_memory() if device.type == "cuda" else t

    def _new_held(self, g: _Group, fill: float | None = None) -> torch.Tensor:
        """A ``[n, *dW shape]`` tensor in the group's compute dtype where :meth:`_held` keeps state (zeros with
        ``fill`` 0), allocated there directly."""
        offloaded = self.offload == "cpu"
        kwargs = {"dtype": g.dtype, "device": "cpu" if offloaded else g.device,
                  "pin_memory": offloaded and g.device.type == "cuda"}
        shape = (len(g.names), *g.update_shape())
        return torch.zeros(shape, **kwargs) if fill == 0 else torch.empty(shape, **kwargs)

    def _sync_offloaded(self, device: torch.device) -> None:
        """Wait for the asynchronous copies into offloaded (pinned) state before the host reads it."""
        if self.offload == "cpu" and device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_stage_abort(self, ctx: StageContext) -> None:
        self._remove_hooks()

    def on_stage_end(self, ctx: StageContext) -> None:
        self._remove_hooks()
        if ctx.stage != GENERAL:
            return
        norms, counts = {}, torch.zeros(3, dtype=torch.float64)  # elements; omega < 0; Delta^2 > xi
        self._timer.__enter__()
        for g in self.groups:
            if g.omega is None:  # no step was taken
                g.scaling = g.scaling.to(g.device, g.dtype)
                g.omega, g.start = self._new_held(g, fill=0), g.stacked()
            g.importance = self._new_held(g)  # where omega is held
            (a_end, b_end), stats = g.stacked(), torch.zeros(3, dtype=torch.float64, device=g.device)
            for part in module_chunks(len(g.names), g.update_shape(), g.device):  # eq 13, a chunk of modules at once
                delta_sq = g.moved_since_start(a_end, b_end, part).square_()  # Delta_l^2 (Delta = dW(end): B0 = 0)
                xi = self._xi(delta_sq)
                omega = g.omega[part].to(g.device, non_blocking=True)
                stats += torch.stack([torch.tensor(omega.numel(), dtype=torch.float64, device=g.device),
                                      (omega < 0).sum().double(), (delta_sq > xi).sum().double()])
                if self.nonnegative == "end":
                    omega = omega.clamp(min=0)
                denominator = delta_sq.add_(xi)
                # Omega = omega / (Delta^2 + xi)  (eq 13); 0 where nothing moved and xi is 0
                importance = torch.where(denominator > 0, omega / denominator, torch.zeros_like(omega))
                g.importance[part].copy_(importance, non_blocking=True)
            self._sync_offloaded(g.device)
            counts += stats.cpu()
            # dW_nu as its factors (fresh copies, never parameters, never moved): dW(end) is this product
            g.ref_a, g.ref_b = a_end, b_end
            g.ref_scaling, g.dw_ref = g.scaling, None
            scales = [scaling(m, self.adapter) for m in g.modules]
            importance_norms = torch.linalg.vector_norm(g.importance.flatten(1), dim=1).tolist()
            for i, name in enumerate(g.names):
                self.importance[name] = g.importance[i]
                self._refs.factors[name] = (g.ref_a[i], g.ref_b[i], scales[i], g.fan_in_fan_out)
                norms[name] = float(importance_norms[i])
            g.omega = g.start = g.before = g.grads = g.grad_full = None
        ctx.extras["hlora_importance_norms"] = norms
        # diagnostics of eq 13: how much of omega was negative (before the rule) and how much eq 13 normalised
        ctx.extras["hlora_importance_stats"] = {"negative_omega": float(counts[1] / counts[0].clamp(min=1)),
                                                "delta_sq_above_xi": float(counts[2] / counts[0].clamp(min=1))}
        self._timer.__exit__()
        seconds = self._recording_seconds() + self._seconds_before  # with the sessions before a resume
        size = STORAGE_DTYPES[self.storage_dtype].itemsize
        ctx.extras.setdefault("importance_cost", {})["hlora"] = {
            "what": f"path-integral importance ({self.estimator} estimator) + dW_nu as factors", "seconds": seconds,
            "bytes": sum(t.numel() * size for t in self.importance.values()) + self._refs.nbytes(),
            "steps": self.steps, "tensors": 3 * len(self.importance)}
        self.metadata = self._describe()

    def _xi(self, delta_sq: torch.Tensor) -> torch.Tensor:
        """xi of eq 13 per module, [n, 1, 1]: the constant (absolute) or xi times the module's mean Delta^2."""
        if self.xi_mode == "absolute":
            return torch.full((delta_sq.shape[0], 1, 1), self.xi, dtype=delta_sq.dtype, device=delta_sq.device)
        return self.xi * delta_sq.mean(dim=(1, 2), keepdim=True)

    # ------------------------------------------------------------------------------ general: importance
    def before_optimizer_step(self, ctx: StageContext) -> None:
        """Keep what the path integral of this step needs: the factors before the step (dW(t)), the lr, and the
        factors' gradients (paper, adam) or the all-reduced full-weight gradient (exact). Nothing dense but omega
        (and the exact estimator's gradient) is held."""
        if ctx.stage != GENERAL:
            return
        with self._timer:
            for g in self.groups:
                if g.omega is None:
                    g.scaling = g.scaling.to(g.device, g.dtype)
                    g.omega, g.start = self._new_held(g, fill=0), g.stacked()  # dW(start) kept as factors
                g.before, g.eta = g.stacked(), ctx.lr  # the lr of this step (the scheduler steps after the optimizer)
                if self.estimator == "exact":
                    if g.grad_full is None:
                        g.grad_full = torch.zeros_like(g.omega, device=g.device)
                    all_reduce_([g.grad_full])
                    if ctx.grad_scale != 1.0:  # summed from the backward's own (loss-scaled) output gradients
                        g.grad_full.div_(ctx.grad_scale)
                else:
                    g.grads = (torch.stack([_grad(p) for p in g.a_params]).to(g.dtype),
                               torch.stack([_grad(p) for p in g.b_params]).to(g.dtype))

    def after_optimizer_step(self, ctx: StageContext) -> None:
        if ctx.stage != GENERAL:
            return
        with self._timer:
            for g in self.groups:
                if g.before is not None:
                    self._accumulate(g, None if self.fused else 1)
        self.steps += 1

    def on_step_skipped(self, ctx: StageContext) -> None:
        """A skipped step moved nothing: its path-integral term is zero, and what its hooks gathered (the exact
        estimator's summed gradient, NaN when the step was skipped for a NaN) must not reach the next step."""
        if ctx.stage != GENERAL:
            return
        for g in self.groups:
            if g.grad_full is not None:
                g.grad_full.zero_()
            g.before = g.grads = None

    def _accumulate(self, g: _Group, chunk_elements: int | None) -> None:
        """omega += g~ * (dW(t) - dW(t+1)) (eqs 8-10) for every module of the group, in chunks of modules
        (:func:`forgetless.lora.module_chunks`; ``chunk_elements`` 1: module by module, the plain path): each chunk's
        dW(t) - dW(t+1) is one rank-2r batched matmul from the factors before and after the step
        (:func:`forgetless.lora.update_difference`), g~ (paper) another, and omega takes their product in one pass."""
        (a0, b0), (a1, b1), s = g.before, g.stacked(), g.scaling
        if self.estimator == "adam":  # dL_l = -<g_A, A' - A> - <g_B, B' - B>: the module's first-order decrease
            ga, gb = g.grads
            decrease = (ga * (a0 - a1)).sum(dim=(1, 2)) + (gb * (b0 - b1)).sum(dim=(1, 2))
        # one fused kernel per chunk where Triton runs (CUDA): both rank-2r products formed tile by tile, omega read
        # and written once (forgetless.kernels); the same numbers up to float32 rounding
        kernel = (chunk_elements is None and self.estimator == "paper" and g.dtype == torch.float32
                  and a0.shape[-2] == a1.shape[-2] and triton_enabled(g.device))
        whole = kernel and self.offload != "cpu"  # nothing dense is formed: no chunks needed for memory
        for part in [slice(None)] if whole else module_chunks(len(g.names), g.update_shape(), g.device, chunk_elements):
            held = g.omega[part]
            omega = held.to(g.device, non_blocking=True)  # itself, unless offloaded (then a copy, written back)
            if kernel:
                lowrank_product_accumulate_(omega, *difference_factors(a0[part], b0[part], s[part], a1[part], b1[part]),
                                            *_paper_factors(g, part), mode=_KERNEL_MODES[self.nonnegative],
                                            transposed=g.fan_in_fan_out)
            else:
                # dW(t) - dW(t+1): one rank-2r matmul from both factor pairs (update_difference)
                descent = update_difference(a0[part], b0[part], s[part], a1[part], b1[part],
                                            fan_in_fan_out=g.fan_in_fan_out)
                if self.estimator == "paper":
                    estimate = _paper_gradient(g, part)
                elif self.estimator == "adam":
                    estimate = _adam_gradient(descent, decrease[part])
                else:
                    estimate = g.grad_full[part]
                if self.nonnegative == "step":  # only each step's positive part of g~ * (dW(t) - dW(t+1))
                    omega.add_(descent.mul_(estimate).clamp_(min=0))
                else:
                    omega.addcmul_(descent, estimate)  # omega += g~ * (dW(t) - dW(t+1)): one pass
                if self.nonnegative == "running":
                    omega.clamp_(min=0)
            if omega is not held:
                held.copy_(omega, non_blocking=True)  # stream-ordered: read on the host only after the stage
        if g.grad_full is not None:
            g.grad_full.zero_()
        g.before = g.grads = None

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
        path = self._state.path
        loaded = self._state.take()
        if loaded is not None:
            table = _split(*loaded, path)
            self.importance, self._refs, self.metadata = table["omega"], table["dw_ref"], table["metadata"]
            self.steps = int(self.metadata.get("steps", 0))
        if not self.importance:
            raise ValueError("HLoRA's domain stage needs importance: run the general stage with HLoRA first, "
                             "or load_state() a folder with " + FILENAME)
        self._validate()
        stored = self.metadata.get("model") or ""
        if stored and self._model_name and _model_id(stored) != _model_id(self._model_name):
            warnings.warn(f"HLoRA importance was recorded on {stored!r}, the model now is {self._model_name!r}")
        snapped = False
        for g in self.groups:
            dev = g.device
            held = STORAGE_DTYPES[self.storage_dtype]  # a reduced dtype is held as it is saved: a cached stage
            held = held if held.itemsize < 4 else g.dtype  # gives the same run; else the compute dtype
            g.importance = self._held(torch.stack([self.importance[n].to(held) for n in g.names]), dev)
            g.scaling = g.scaling.to(dev, g.dtype)
            g.ref_a = g.ref_b = g.ref_scaling = g.dw_ref = None
            if any(n in self._refs.dense for n in g.names):  # a file written before factors: dense dW_nu
                stored_dtype = next(self._refs.dense[n].dtype for n in g.names if n in self._refs.dense)
                g.dw_ref = torch.stack([self._refs[n].to(dev, g.dtype) for n in g.names])
                current = g.delta_weight()
                # The adapter we continue from gives this dW_nu exactly: keep its factors instead (the same numbers).
                adopt = bool(torch.equal(current, g.dw_ref))
            else:
                stored_dtype = self._refs.factors[g.names[0]][0].dtype
                ref_a, ref_b = _stack_padded([self._refs.factors[n][:2] for n in g.names], dev, g.dtype)
                g.ref_a, g.ref_b = ref_a, ref_b
                g.ref_scaling = scaling_tensor([self._refs.factors[n][2] for n in g.names], g.dtype, dev)
                adopt = False
            if not adopt and self.snap_reference and stored_dtype != g.dtype:
                # A reduced-precision reference: the adapter we continue from *is* dW_nu, in full precision.
                current, reference = g.delta_weight(), g.reference_delta()
                tol = 2.0 ** -7 * reference.abs() + 1e-12
                adopt = snapped = bool(((current - reference).abs() <= tol).all())
            if adopt:
                g.ref_a, g.ref_b = g.stacked()
                g.ref_scaling, g.dw_ref = g.scaling, None
            scales = [scaling(m, self.adapter) for m in g.modules] if adopt else \
                [self._refs.factors[n][2] if n in self._refs.factors else 0.0 for n in g.names]
            for i, n in enumerate(g.names):
                self.importance[n] = g.importance[i]
                if g.dw_ref is None:
                    self._refs.dense.pop(n, None)
                    self._refs.factors[n] = (g.ref_a[i], g.ref_b[i], scales[i], g.fan_in_fan_out)
                else:
                    self._refs.factors.pop(n, None)
                    self._refs.dense[n] = g.dw_ref[i]
        self._update_coefficients(ctx)
        ctx.extras["hlora_reference_snapped"] = snapped

    def _validate(self) -> None:
        source = self._state.source or "recorded in this run"
        have = {n: update_shape(m, self.adapter) for g in self.groups for n, m in zip(g.names, g.modules)}
        check_modules("HLoRA importance (omega)", source, self.importance, have)
        check_modules("HLoRA importance (dw_ref)", source, self._refs.shapes(), have)

    def _update_coefficients(self, ctx: StageContext) -> None:
        wide = [compute_dtype(g.importance.dtype) for g in self.groups]  # at least float32 (bfloat16 storage)
        norms = torch.cat([torch.linalg.vector_norm(g.importance.flatten(1), dim=1, dtype=d).float().cpu()
                           for g, d in zip(self.groups, wide)])
        c = layer_coefficients(norms, self.temperature, self.norm_scale, self.layer_wise)  # eq 15
        start = 0
        for g in self.groups:
            g.coeff = c[start:start + len(g.names)].to(g.device, g.dtype)
            start += len(g.names)
        names = [n for g in self.groups for n in g.names]
        ctx.extras["hlora_layer_coefficients"] = {n: float(v) for n, v in zip(names, c)}
        total = sum(float(g.importance.sum(dtype=d)) for g, d in zip(self.groups, wide))
        mean = total / sum(g.importance.numel() for g in self.groups)
        ctx.extras["hlora_importance_mean"] = mean
        # phi_scale "mean": phi * L_reg / mean(Omega), mean over all elements of all modules
        self._phi_unit = 1.0 / mean if self.phi_scale == "mean" and mean > 0 else 1.0

    def regularizer(self) -> torch.Tensor:
        """sum_l c_l sum_i Omega_l,i (dW_l,i - dW_nu_l,i)^2 (eqs 14-15), differentiable in A and B.

        One :func:`forgetless.lora.weighted_distance` per group of equal-shaped modules (in chunks of modules; no
        dense tensor kept for the backward).
        ``fused = False``: module by module with autograd (the same value up to rounding; the reference)."""
        if not self.fused:
            return self._regularizer_plain()
        total = None
        for g in self.groups:
            with torch.autocast(device_type=g.device.type, enabled=False):
                a, b = g.stacked(detach=False)
                refs = {"ref": g.dw_ref} if g.dw_ref is not None else {
                    "ref_factors": (g.ref_a, g.ref_b, g.ref_scaling)}
                term = weighted_distance(a, b, g.scaling, g.importance, g.coeff, g.fan_in_fan_out, **refs)
            total = term if total is None else total + term  # sum_l c_l L_l (eqs 14-15)
        return total

    def _regularizer_plain(self) -> torch.Tensor:
        """:meth:`regularizer` module by module: dW_l - dW_nu_l from each module's own factors."""
        total = None
        for g in self.groups:
            with torch.autocast(device_type=g.device.type, enabled=False):
                for i, (name, module) in enumerate(zip(g.names, g.modules)):
                    diff = delta_weight(module, self.adapter, g.dtype) - self._refs[name].to(g.dtype)
                    term = g.coeff[i] * (g.importance[i].to(diff.device) * diff.square()).sum()  # c_l L_l
                    total = term if total is None else total + term
        return total

    def extra_loss(self, ctx: StageContext, batch: Batch) -> torch.Tensor | None:
        if ctx.stage != DOMAIN or self.phi == 0:
            return None
        reg = self.regularizer()
        scaled = self.phi * self._phi_unit * reg  # phi * L_reg (eq 16); / mean(Omega) with phi_scale "mean"
        ctx.log("reg_loss", reg)  # read by the loop at its logging interval: no host sync here
        ctx.log("reg_loss_scaled", scaled)
        return scaled

    # ---------------------------------------------------------------------------------------- persistence
    def _describe(self) -> dict[str, Any]:
        names = [n for g in self.groups for n in g.names]
        return {"model": self._model_name, "modules": names,
                "shapes": {n: list(self.importance[n].shape) for n in names}, "steps": self.steps,
                "options": self.options.as_dict(), "estimator": self.estimator, "dtype": self.storage_dtype,
                "xi": self.xi, "xi_mode": self.xi_mode, "nonnegative": self.nonnegative, "adapter": self.adapter}

    def _reference_metadata(self) -> dict[str, Any]:
        factors = self._refs.factors
        return {"format": "factors" if not self._refs.dense else "mixed",
                "scaling": {n: f[2] for n, f in factors.items()},
                "fan_in_fan_out": {n: f[3] for n, f in factors.items()}}

    def save_state(self, directory: Path) -> None:
        """``{module}.omega`` in ``storage_dtype``; dW_nu as ``{module}.ref_A`` / ``.ref_B`` in the factors' dtype
        (``r (in + out)`` numbers: exact, and small beside omega); a dense dW_nu read from an old file stays dense."""
        tensors = {}
        dtype = STORAGE_DTYPES[self.storage_dtype]
        for name in self.importance:
            tensors[f"{name}.omega"] = self.importance[name].to(dtype)
            if name in self._refs.factors:
                a, b, _, _ = self._refs.factors[name]
                tensors[f"{name}.ref_A"], tensors[f"{name}.ref_B"] = a, b
            else:
                tensors[f"{name}.dw_ref"] = self._refs.dense[name].to(dtype)
        meta = dict(self.metadata or self._describe())
        meta["dtype"] = self.storage_dtype
        if self.importance:
            meta["reference"] = self._reference_metadata()
        path = self._state.save(directory, tensors, meta)
        if path is not None:
            say(f"HLoRA importance: {path} ({path.stat().st_size / 2**20:.2f} MiB, {len(self.importance)} modules, "
                f"{self.storage_dtype}; dW_nu as factors)")

    def _recording_seconds(self) -> float:
        return self._timer.seconds + sum(g.hook_seconds for g in self.groups)

    def stage_state(self, ctx: StageContext) -> dict[str, torch.Tensor]:
        """The running path integral of the general stage (for a mid-stage checkpoint)."""
        if ctx.stage != GENERAL:
            return {}
        if self.groups:
            self._sync_offloaded(self.groups[0].device)
        # the recording time so far, with the sessions before (a resumed stage's cost counts them all)
        state = {"steps": torch.tensor(self.steps), "seconds": torch.tensor(
            self._recording_seconds() + self._seconds_before, dtype=torch.float64)}
        for i, g in enumerate(self.groups):
            if g.omega is not None:
                state[f"{i}.omega"] = g.omega
                if isinstance(g.start, torch.Tensor):
                    state[f"{i}.dw_start"] = g.start
                else:
                    state[f"{i}.start_A"], state[f"{i}.start_B"] = g.start
        return state

    def load_stage_state(self, ctx: StageContext, state: dict[str, torch.Tensor]) -> None:
        if ctx.stage != GENERAL or not state:
            return
        self.steps = int(state["steps"])
        # the recording time before this session (absent in a checkpoint of an older version: not known, 0)
        self._seconds_before = float(state.get("seconds", 0.0))
        for i, g in enumerate(self.groups):
            if f"{i}.omega" in state:
                g.scaling = g.scaling.to(g.device, g.dtype)
                g.omega = self._held(state[f"{i}.omega"].to(g.dtype), g.device)
                if f"{i}.dw_start" in state:  # a checkpoint written before dW(start) was kept as factors
                    g.start = state[f"{i}.dw_start"].to(g.device, g.dtype)
                else:
                    g.start = (state[f"{i}.start_A"].to(g.device, g.dtype), state[f"{i}.start_B"].to(g.device, g.dtype))

    def load_state(self, directory: Path) -> None:
        """Remember the file; it is read and checked against the model at the domain stage's start."""
        self._state.remember(directory)
        self.importance, self._refs = {}, ReferenceUpdates()


def _model_id(name: str) -> str:
    """A model's name for comparing where importance was recorded: a GGUF's converted copy
    (``.../forgetless/models/STEM-KEY``) by its stem, as the copy's key changed with forgetless's version (by path
    and mtime, then by content) while the model did not."""
    path = Path(name)
    if path.parent.name == "models" and re.search(r"-[0-9a-f]{12}$", path.name):
        return re.sub(r"-[0-9a-f]{12}$", "", path.name)
    return name


def _stack_padded(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack factors ``(A [r, in], B [out, r])`` of one group; ranks that differ are padded with zeros (B A is the
    same)."""
    rank = max(a.shape[0] for a, _ in pairs)
    a_out, b_out = [], []
    for a, b in pairs:
        a, b = a.to(device, dtype), b.to(device, dtype)
        if a.shape[0] < rank:
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        a_out.append(a)
        b_out.append(b)
    return torch.stack(a_out), torch.stack(b_out)


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p)


def _paper_factors(g: _Group, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 11's g~ = s (g_B (A - eta g_A) + B g_A) of the modules ``part`` of a group as a rank-2r product
    ``[s g_B, s B] @ [A - eta g_A ; g_A]`` (``[n, out, 2r]``, ``[n, 2r, in]``), from the factors and gradients kept
    before the step."""
    (a, b), (ga, gb) = ((t[part] for t in pair) for pair in (g.before, g.grads))
    return torch.cat([gb, b], dim=-1) * g.scaling[part], torch.cat([a - g.eta * ga, ga], dim=-2)


def _paper_gradient(g: _Group, part: slice = slice(None)) -> torch.Tensor:
    """:func:`_paper_factors` multiplied out, in the base weight's layout (a single dense write)."""
    return g.layout(torch.matmul(*_paper_factors(g, part)))


#: HLoRA's ``nonnegative`` rule as the fused kernel's accumulation mode (forgetless.kernels.MODES)
_KERNEL_MODES = {"none": "add", "end": "add", "step": "add_positive", "running": "add_then_clamp"}


def _adam_gradient(descent: torch.Tensor, decrease: torch.Tensor) -> torch.Tensor:
    """The adam estimator's g~ = -(dW(t+1) - dW(t)) / eta_eff for every module of a chunk (module docstring).

    ``descent`` is dW(t) - dW(t+1); eta_eff = ||descent||^2 / dL with ``decrease`` dL = -<g_A, A' - A> - <g_B, B' - B>
    per module, the first-order loss decrease of the module's step, from the factors and gradients before the step."""
    moved = descent.square().sum(dim=(1, 2))  # ||dW(t+1) - dW(t)||^2
    inverse_eta = torch.where(moved > 0, decrease / moved.clamp(min=torch.finfo(moved.dtype).tiny), 0.0)
    return descent * inverse_eta.view(-1, 1, 1)


class _ExactGradHook:
    """Forward hook: ties a tensor hook on the module's output that adds grad_out^T x to the module's slot of
    the group's full-weight gradient (dL/dW for y = x W^T + ...)."""

    def __init__(self, group: _Group, index: int) -> None:
        self.group, self.index = group, index

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad) or not args:
            return
        if not module.training:  # an evaluation pass with gradients (EWC's Fisher at the stage's end, in eval mode,
            return  # before HLoRA's on_stage_end took these hooks off): not the training step's gradient
        x = args[0].detach()
        group, index = self.group, self.index

        def accumulate(grad_out: torch.Tensor) -> None:
            started = time.perf_counter()  # not synchronized: inside backward, approximate on CUDA
            if group.grad_full is None:
                n, r_in = len(group.names), group.a_params[0].shape[1]
                shape = group.layout(torch.empty(n, group.b_params[0].shape[0], r_in, device="meta")).shape
                group.grad_full = torch.zeros(shape, dtype=group.dtype, device=grad_out.device)
            go = grad_out.reshape(-1, grad_out.shape[-1]).to(group.dtype)
            xs = x.reshape(-1, x.shape[-1]).to(group.dtype)
            if group.fan_in_fan_out:  # y = x W with W [in, out]: dL/dW = x^T g
                group.grad_full[index].addmm_(xs.T, go)
            else:  # y = x W^T with W [out, in]: dL/dW = g^T x
                group.grad_full[index].addmm_(go.T, xs)
            group.hook_seconds += time.perf_counter() - started

        out.register_hook(accumulate)


register(MethodSpec("hlora", "HLoRA: element-wise path-integral importance on nu, layer-weighted quadratic pull on mu",
                    stages=(GENERAL, DOMAIN), plugin=HLoRA))
register(MethodSpec("hlora-no-layer", "HLoRA with uniform layer coefficients (element-wise regularization only)",
                    stages=(GENERAL, DOMAIN), plugin=HLoRA, fixed={"layer_wise": False}, general_as="hlora"))

__all__: Sequence[str] = ["HLoRA", "HLoRAOptions", "layer_coefficients", "load_importance", "lora_modules", "FILENAME"]
