"""Flatness / sharpness metrics of a loss around the current weights.

Surface metrics, on a 2-D surface ``L_ij = L(theta + a_i d1 + b_j d2)`` (:mod:`forgetless.landscape.surfaces`)
with uniform steps ``h_a``, ``h_b``. "Revisiting Catastrophic Forgetting in Large Language Model Tuning" (Li,
Ding, Fang, Tao 2024) compares runs by Surface Curvature, Average Gradient and Mean Absolute Gradient of such a
surface; we could not check its exact formulas, so these definitions are ours. Central differences at the interior
points ``I`` (``1 <= i <= n_a - 2``, ``1 <= j <= n_b - 2``; ``N = |I|``)::

    L_a  = (L[i+1,j] - L[i-1,j]) / (2 h_a)              L_b  = (L[i,j+1] - L[i,j-1]) / (2 h_b)
    L_aa = (L[i+1,j] - 2 L[i,j] + L[i-1,j]) / h_a^2     L_bb = (L[i,j+1] - 2 L[i,j] + L[i,j-1]) / h_b^2

    surface_curvature      SC  = 1/N sum_I |L_aa + L_bb|              (mean absolute Laplacian)
    average_gradient       AG  = 1/N sum_I sqrt(L_a^2 + L_b^2)        (mean gradient magnitude)
    mean_absolute_gradient MAG = 1/N sum_I (|L_a| + |L_b|) / 2        (mean absolute partial derivative)

The differences are exact on a quadratic surface, so there the metrics equal their analytic values at the grid
points. Their unit is that of the coordinates ``a``, ``b`` (filter-normalized or raw Gaussian directions): compare
runs measured with the same settings only.

Hessian metrics over the selected parameters ``theta`` (Hessian-vector products by double backward):

* top eigenvalue ``lambda_max``, the largest *algebraic* one, by shifted power iteration: power iteration
  ``v <- H v / ||H v||``, ``lambda = v^T H v`` gives the dominant eigenvalue ``lambda_1`` (largest magnitude, sign
  kept: :func:`hessian_dominant_eigenvalue`). If ``lambda_1 >= 0`` it is ``lambda_max``. Otherwise ``lambda_1`` is
  the smallest eigenvalue, the spectrum of ``H - lambda_1 I`` is ``lambda_i - lambda_1 >= 0``, its dominant
  eigenvalue is ``lambda_max - lambda_1``, and a second power iteration on ``(H - lambda_1 I) v = H v - lambda_1 v``
  gives ``lambda_max = v^T H v`` (a Rayleigh quotient, so never above the true ``lambda_max``). Away from a minimum
  the Hessian is indefinite and its dominant eigenvalue is often negative: that is a direction of negative
  curvature, not sharpness, so flatness is compared with ``lambda_max``. If the first iteration had not converged
  (``lambda_1`` above the smallest eigenvalue), the shifted one can come out negative; it is then re-shifted by
  what it found (at most three rounds);
* or, with ``hessian_method: lanczos``, both ends of the spectrum at once by the Lanczos process with full
  reorthogonalisation (:func:`hessian_lanczos`): ``m`` products build an orthonormal basis ``V`` of the Krylov space
  and the tridiagonal ``T = V^T H V``; the extreme eigenvalues of ``T`` (Ritz values) approach ``lambda_max`` and
  ``lambda_min`` from inside, far faster than a power iteration of the same ``m`` products when eigenvalues cluster
  or both ends are of similar size (the SAM-trained models of docs/results/forgetting-rerun, where 10-20 power
  products left residuals of 0.5-3). A Ritz pair's residual ``||H y - theta y|| = beta_m |s_m|`` (``s`` its
  eigenvector of ``T``) costs nothing more. It keeps ``m`` vectors the size of the parameters;
* trace: Hutchinson's estimator ``tr H ~ 1/m sum_k z_k^T H z_k`` with Rademacher ``z_k`` (entries +-1);
  exact for a diagonal H, unbiased otherwise with variance ``2 sum_{i != j} H_ij^2 / m``.

eps-sharpness: ``max_{||delta||_2 <= rho} L(theta + delta) - L(theta)`` (Keskar et al. 2017; the inner problem
of SAM), by projected normalized gradient ascent started at SAM's ``delta_0 = rho g / ||g||`` (a random point of
the sphere where ``g = 0``)::

    delta <- P(delta + alpha rho grad L(theta + delta) / ||grad L(theta + delta)||),   P: projection on the ball

The largest increase seen along the way is returned: a lower bound of the true maximum, exact for a linear L
after the first step and for a quadratic at its minimum once the ascent (then a power iteration) has converged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from forgetless.landscape.objective import Objective, Vector, dot, norm

SURFACE_METRICS = ("surface_curvature", "average_gradient", "mean_absolute_gradient")


def _step(coord: np.ndarray, axis: str) -> float:
    coord = np.asarray(coord, dtype=np.float64)
    if coord.ndim != 1 or len(coord) < 3:
        raise ValueError(f"surface metrics need at least 3 points along {axis}, got {len(coord)}")
    steps = np.diff(coord)
    if not np.allclose(steps, steps[0], rtol=1e-6, atol=0) or steps[0] == 0:
        raise ValueError(f"the grid along {axis} must be uniform and increasing")
    return float(steps[0])


def surface_metrics(losses: np.ndarray, coords: Sequence[np.ndarray]) -> dict[str, float]:
    """Surface Curvature, Average Gradient, Mean Absolute Gradient of a 2-D loss grid (formulas in the module doc)."""
    loss = np.asarray(losses, dtype=np.float64)
    if loss.ndim != 2 or len(coords) != 2:
        raise ValueError("surface metrics need a 2-D surface (two directions)")
    ha, hb = _step(coords[0], "a"), _step(coords[1], "b")
    if loss.shape != (len(coords[0]), len(coords[1])):
        raise ValueError(f"losses have shape {loss.shape}, coordinates {len(coords[0])} x {len(coords[1])}")
    centre = loss[1:-1, 1:-1]
    la = (loss[2:, 1:-1] - loss[:-2, 1:-1]) / (2 * ha)
    lb = (loss[1:-1, 2:] - loss[1:-1, :-2]) / (2 * hb)
    laa = (loss[2:, 1:-1] - 2 * centre + loss[:-2, 1:-1]) / ha**2
    lbb = (loss[1:-1, 2:] - 2 * centre + loss[1:-1, :-2]) / hb**2
    return {
        "surface_curvature": float(np.mean(np.abs(laa + lbb))),
        "average_gradient": float(np.mean(np.sqrt(la**2 + lb**2))),
        "mean_absolute_gradient": float(np.mean((np.abs(la) + np.abs(lb)) / 2)),
    }


def hessian_vector_product(objective: Objective, v: Vector) -> Vector:
    """``H v`` at the current parameters."""
    return objective.hvp(v)


def _random_vector(objective: Objective, seed: int, rademacher: bool = False) -> Vector:
    g = torch.Generator().manual_seed(seed)
    out = []
    for z in objective.zeros():
        if rademacher:
            r = torch.randint(0, 2, z.shape, generator=g).to(z.dtype) * 2 - 1
        else:
            r = torch.randn(z.shape, generator=g, dtype=torch.float64).to(z.dtype)
        out.append(r.to(z.device))
    return out


def _unit_start(objective: Objective, seed: int) -> Vector:
    """The start of the power iteration and of Lanczos: a Gaussian vector of unit norm, drawn from ``seed``."""
    v = _random_vector(objective, seed)
    n = norm(v)
    return [t / n for t in v]


def _power_iteration(objective: Objective, iters: int, tol: float, seed: int,
                     shift: float = 0.0) -> tuple[float, float, float]:
    """Dominant eigenvalue of ``H - shift I`` (sign kept), the Rayleigh quotient ``v^T H v`` of its last vector, and
    that pair's relative residual.

    Stops after ``iters`` products or once the pair's relative residual ``||H v - mu v|| / |mu|`` (``mu = lambda +
    shift``, the eigenvalue of ``H`` estimated) is at most ``sqrt(tol)``, which puts the Rayleigh quotient within
    about ``tol`` (relative, times |mu| / gap) of the eigenvalue. Stopping when the Rayleigh quotient changed by less
    than ``tol`` from one product to the next, as this did before, stops early where the iteration is slow: after a
    shift by a large negative ``lambda_1`` it returned 4.34 for a true top eigenvalue of 5.0 (the spectrum of
    tests/unit/test_landscape_eigen.py's shifted-iteration test, 1000 products allowed). The residual is near 0 when
    the pair is an eigenpair of ``H``, of order 1 when it is a mixture (a power iteration stopped early returns a
    Rayleigh quotient). It cannot tell the dominant eigenpair from another one the iteration is passing near, from a
    start nearly orthogonal to the dominant eigenvector (tests/unit/test_landscape_eigen.py).
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    v = _unit_start(objective, seed)
    eigenvalue, residual = 0.0, float("nan")
    for _ in range(iters):
        hv = [h - shift * t for h, t in zip(objective.hvp(v), v)] if shift else objective.hvp(v)
        eigenvalue = dot(v, hv)
        size = norm(hv)
        if size == 0.0:  # A v = 0 exactly: an eigenpair
            residual = 0.0
            break
        residual = norm([h - eigenvalue * t for t, h in zip(v, hv)]) / max(abs(eigenvalue + shift), 1e-300)
        v = [t / size for t in hv]
        if residual <= math.sqrt(tol):
            break
    return eigenvalue, eigenvalue + shift, residual


def hessian_eigenvalues(objective: Objective, iters: int = 20, tol: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """``{"top": lambda_max, "dominant": lambda_1, "dominant_residual": r1, "top_residual": r}``: the largest
    algebraic eigenvalue of the Hessian and the one of largest magnitude (sign kept), by (shifted) power iteration
    (module docstring), and the relative residuals of the two pairs (near 0: an eigenpair; of order 1: ``iters`` was
    too few, and the number is a Rayleigh quotient, not an eigenvalue). When ``lambda_1 >= 0`` the two are one pair.
    Costs ``iters`` Hessian-vector products when ``lambda_1 >= 0``, up to ``2 iters`` otherwise (more only if the
    first iteration had not converged).
    """
    dominant, _, dominant_residual = _power_iteration(objective, iters, tol, seed)
    top, shift, top_residual = dominant, dominant, dominant_residual
    for round_ in range(3 if dominant < 0 else 0):
        shifted, top, top_residual = _power_iteration(objective, iters, tol, seed + 1 + round_, shift=shift)
        if shifted >= 0:  # the dominant eigenvalue of H - shift I is lambda_max - shift; top = v^T H v
            break
        shift = top  # the shift was above the smallest eigenvalue: shift again by what was found
    return {"top": top, "dominant": dominant, "dominant_residual": dominant_residual, "top_residual": top_residual}


def hessian_lanczos(objective: Objective, steps: int = 20, seed: int = 0) -> dict[str, float]:
    """:func:`hessian_eigenvalues`' keys (and ``"bottom"``, the smallest algebraic eigenvalue, with
    ``"bottom_residual"``) by ``steps`` Lanczos steps (``steps`` Hessian-vector products) with full
    reorthogonalisation, from the same start as the power iteration. The residuals are those of the Ritz pairs,
    relative to the eigenvalue: near 0 an eigenpair, of order 1 when ``steps`` was too few. Stops early when the
    Krylov space is invariant (then the Ritz values are eigenvalues and the residuals 0)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    basis = [_unit_start(objective, seed)]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = objective.hvp(basis[j])
        alphas.append(dot(basis[j], w))
        for _ in range(2):  # Gram-Schmidt twice against the whole basis: the Ritz values stay free of ghost copies
            for q in basis:
                c = dot(q, w)
                w = [a - c * b for a, b in zip(w, q)]
        beta = norm(w)
        betas.append(beta)
        if j + 1 == steps or beta <= 1e-12 * max(abs(a) for a in alphas):  # done, or an invariant subspace
            break
        basis.append([t / beta for t in w])
    m = len(alphas)
    if not all(math.isfinite(x) for x in alphas + betas):  # a diverged loss: no spectrum to speak of
        nan = float("nan")
        return dict.fromkeys(("top", "dominant", "dominant_residual", "top_residual", "bottom", "bottom_residual"),
                             nan)
    t = np.diag(np.array(alphas)) + np.diag(np.array(betas[:m - 1]), 1) + np.diag(np.array(betas[:m - 1]), -1)
    theta, s = np.linalg.eigh(t)
    last = betas[m - 1] if m == steps else 0.0  # an invariant space: the Ritz pairs are eigenpairs

    def residual(i: int) -> float:
        return float(abs(last * s[m - 1, i]) / max(abs(theta[i]), 1e-300))

    dom = int(np.argmax(np.abs(theta)))
    return {"top": float(theta[-1]), "dominant": float(theta[dom]), "dominant_residual": residual(dom),
            "top_residual": residual(m - 1), "bottom": float(theta[0]), "bottom_residual": residual(0)}


def hessian_top_eigenvalue(objective: Objective, iters: int = 20, tol: float = 1e-4, seed: int = 0) -> float:
    """The Hessian's largest algebraic eigenvalue ``lambda_max`` (shifted power iteration, module docstring)."""
    return hessian_eigenvalues(objective, iters, tol, seed)["top"]


def hessian_dominant_eigenvalue(objective: Objective, iters: int = 20, tol: float = 1e-4, seed: int = 0) -> float:
    """The Hessian's eigenvalue of largest magnitude, sign kept (plain power iteration on Hessian-vector products)."""
    return _power_iteration(objective, iters, tol, seed)[0]


def probe_seed(seed: int, k: int) -> int:
    """The seed of Hutchinson probe ``k`` of a measurement seeded ``seed``: measurements of different seeds share no
    probe (``seed + 1000 + k`` made seeds s and s + 1 share all but one), so each is an independent repeat."""
    return (seed + 1) * 1_000_003 + k


def hutchinson_trace(objective: Objective, samples: int = 10, seed: int = 0) -> float:
    """Hutchinson's estimate of ``tr H``: the mean of ``z^T H z`` over ``samples`` Rademacher vectors ``z``."""
    return hutchinson_trace_estimate(objective, samples, seed)[0]


def hutchinson_trace_estimate(objective: Objective, samples: int = 10, seed: int = 0) -> tuple[float, float]:
    """``(mean, standard error)`` of Hutchinson's ``z^T H z`` over ``samples`` Rademacher probes (the probes of
    :func:`hutchinson_trace`; the error is NaN for one probe). On a language model the probes spread widely: on
    SmolLM2's LoRA parameters single probes ranged from -97 to +186 around a trace of about 25
    (docs/results/forgetting-lr3e-3), so a few probes give a sign, at best."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    values = []
    for k in range(samples):
        z = _random_vector(objective, probe_seed(seed, k), rademacher=True)
        values.append(dot(z, objective.hvp(z)))
    mean = sum(values) / samples
    if samples < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (samples - 1) / samples)


def eps_sharpness(objective: Objective, rho: float = 0.05, steps: int = 5, step_size: float = 1.0,
                  seed: int = 0) -> float:
    """``max_{||delta|| <= rho} L(theta + delta) - L(theta)``, estimated by ``steps`` projected ascent steps.

    Costs ``steps + 1`` gradients and one loss evaluation; the parameters are restored bit-exactly.
    """
    return eps_sharpness_parts(objective, rho, steps, step_size, seed)[0]


def eps_sharpness_parts(objective: Objective, rho: float = 0.05, steps: int = 5, step_size: float = 1.0,
                        seed: int = 0) -> tuple[float, float]:
    """(:func:`eps_sharpness`, ``rho * ||g||``): the second is its first-order part, the rise along the gradient
    alone. Away from a minimum (a held-out loss after tuning) it is most of eps-sharpness, and eps-sharpness minus it
    is what the curvature adds (``rho^2 lambda_max / 2`` at most, to second order)."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    base, g = objective.value_and_gradient()
    size = norm(g)
    first_order = rho * size
    if size == 0.0:  # at an exact stationary point the gradient gives no direction: start anywhere on the sphere
        g = _random_vector(objective, seed)
        size = norm(g)
    delta = [rho * t / size for t in g]
    rises = []  # a NaN loss anywhere makes the estimate NaN (max() skipped it: -inf, "flat", for a diverged model)
    for _ in range(steps):
        with objective.shifted(delta):
            value, g = objective.value_and_gradient()
        rises.append(value - base)
        size = norm(g)
        if size == 0.0:
            break
        delta = [d + step_size * rho * t / size for d, t in zip(delta, g)]
        length = norm(delta)
        if length > rho:
            delta = [d * (rho / length) for d in delta]
    with objective.shifted(delta):
        rises.append(objective.value() - base)
    return (float("nan") if any(math.isnan(r) for r in rises) else max(rises)), first_order


__all__ = ["SURFACE_METRICS", "eps_sharpness", "eps_sharpness_parts", "hessian_dominant_eigenvalue",
           "hessian_eigenvalues", "hessian_top_eigenvalue", "hessian_vector_product", "hutchinson_trace",
           "hutchinson_trace_estimate", "surface_metrics"]
