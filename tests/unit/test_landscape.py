"""Loss landscape and flatness metrics against closed forms, plus the CLI and the experiment's landscape step."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from forgetless.landscape import (
    Objective,
    compute_surface,
    eps_sharpness,
    hessian_dominant_eigenvalue,
    hessian_top_eigenvalue,
    hutchinson_trace,
    load_surface,
    model_objective,
    random_direction,
    surface_metrics,
)
from forgetless.reporting.flatness import flatness_rows, reference_ppl, spearman
from tests.unit.test_experiment import write_experiment
from tests.unit.tiny_model import make_lora_model, make_tiny_model, random_examples

# ---------------------------------------------------------------- surface metrics on known surfaces


def test_surface_metrics_match_analytic_values_on_a_quadratic_surface():
    # L = c + p a^2 + q b^2 + r a b + s a + t b: central differences are exact on a quadratic.
    c, p, q, r, s, t = 1.5, 2.0, 0.5, -0.7, 0.3, -1.1
    a = np.linspace(-1, 1, 11)
    b = np.linspace(-2, 2, 9)  # another step along b
    A, B = np.meshgrid(a, b, indexing="ij")
    losses = c + p * A**2 + q * B**2 + r * A * B + s * A + t * B
    got = surface_metrics(losses, [a, b])
    Ai, Bi = A[1:-1, 1:-1], B[1:-1, 1:-1]
    la, lb = 2 * p * Ai + r * Bi + s, 2 * q * Bi + r * Ai + t
    assert got["surface_curvature"] == pytest.approx(abs(2 * p + 2 * q), rel=1e-12)
    assert got["average_gradient"] == pytest.approx(np.mean(np.hypot(la, lb)), rel=1e-12)
    assert got["mean_absolute_gradient"] == pytest.approx(np.mean((abs(la) + abs(lb)) / 2), rel=1e-12)


def test_surface_curvature_is_the_mean_absolute_laplacian_where_it_changes_sign():
    """On a quadratic the Laplacian is one positive constant, so |mean| and mean |.| agree and either passed. On
    L = a^3 + b^3 it is 6a + 6b, positive and negative: central differences are exact on a cubic's second
    derivative, so SC is the mean of |6a + 6b| over the interior points exactly (its mean is 0 by symmetry)."""
    a = np.linspace(-1, 1, 9)
    A, B = np.meshgrid(a, a, indexing="ij")
    got = surface_metrics(A**3 + B**3, [a, a])
    inner = 6 * A[1:-1, 1:-1] + 6 * B[1:-1, 1:-1]
    assert abs(np.mean(inner)) < 1e-12 < np.mean(np.abs(inner))
    assert got["surface_curvature"] == pytest.approx(np.mean(np.abs(inner)), rel=1e-9)


def test_surface_metrics_approach_the_continuum_integrals():
    # L = p (a^2 + b^2) on [-1, 1]^2: |grad| = 2 p |(a, b)|, whose mean over the square is
    # 2 p (sqrt 2 + ln(1 + sqrt 2)) / 3; (|L_a| + |L_b|) / 2 = p (|a| + |b|) has mean p; Laplacian 4 p.
    p = 1.7
    a = np.linspace(-1, 1, 801)
    A, B = np.meshgrid(a, a, indexing="ij")
    got = surface_metrics(p * (A**2 + B**2), [a, a])
    assert got["surface_curvature"] == pytest.approx(4 * p, rel=1e-9)
    assert got["average_gradient"] == pytest.approx(2 * p * (math.sqrt(2) + math.log(1 + math.sqrt(2))) / 3, rel=5e-3)
    assert got["mean_absolute_gradient"] == pytest.approx(p, rel=5e-3)


def test_surface_metrics_reject_bad_grids():
    a = np.linspace(-1, 1, 5)
    with pytest.raises(ValueError, match="2-D"):
        surface_metrics(np.zeros(5), [a])
    with pytest.raises(ValueError, match="uniform"):
        surface_metrics(np.zeros((5, 5)), [a, a**3])
    with pytest.raises(ValueError, match="at least 3"):
        surface_metrics(np.zeros((2, 5)), [a[:2], a])


# ---------------------------------------------------------------- Hessian metrics on f(x) = 1/2 x^T H x + b^T x


def symmetric(eigenvalues, seed=0):
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def quadratic_objective(h, x0, b=None):
    """Two parameter tensors (shapes (2,) and (n-2,)) so that the multi-tensor plumbing is exercised."""
    x1 = torch.nn.Parameter(x0[:2].clone())
    x2 = torch.nn.Parameter(x0[2:].clone())
    b = torch.zeros(len(x0), dtype=torch.float64) if b is None else b

    def loss():
        x = torch.cat([x1, x2])
        return 0.5 * x @ h @ x + b @ x

    return Objective(params=[x1, x2], chunks=[(1.0, loss)])


def test_hessian_vector_product_is_h_times_v():
    h = symmetric([7.0, 3.0, 1.0, -0.5, 0.2])
    obj = quadratic_objective(h, torch.linspace(-1, 1, 5, dtype=torch.float64))
    v = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.25], dtype=torch.float64)
    hv = obj.hvp([v[:2], v[2:]])
    assert torch.allclose(torch.cat(hv), h @ v, rtol=1e-12, atol=1e-12)


def test_hessian_top_eigenvalue_matches_h():
    h = symmetric([7.0, 3.0, 1.0, -0.5, 0.2])
    obj = quadratic_objective(h, torch.linspace(-1, 1, 5, dtype=torch.float64))
    assert hessian_top_eigenvalue(obj, iters=200, tol=1e-14) == pytest.approx(7.0, rel=1e-9)
    # the top eigenvalue is the largest algebraic one; the one of largest magnitude keeps its sign
    neg = quadratic_objective(symmetric([-6.0, 2.0, 1.0]), torch.ones(3, dtype=torch.float64))
    assert hessian_top_eigenvalue(neg, iters=200, tol=1e-14) == pytest.approx(2.0, rel=1e-9)
    assert hessian_dominant_eigenvalue(neg, iters=200, tol=1e-14) == pytest.approx(-6.0, rel=1e-9)


def test_hutchinson_trace_matches_h():
    diag = torch.diag(torch.tensor([4.0, -1.0, 2.5, 0.5], dtype=torch.float64))
    obj = quadratic_objective(diag, torch.ones(4, dtype=torch.float64))
    assert hutchinson_trace(obj, samples=3) == pytest.approx(6.0, rel=1e-12)  # exact for a diagonal H
    h = symmetric([7.0, 3.0, 1.0, -0.5, 0.2], seed=1)
    m = 2000
    obj = quadratic_objective(h, torch.zeros(5, dtype=torch.float64))
    off = h - torch.diag(torch.diag(h))
    std = math.sqrt(2 * float((off**2).sum()) / m)  # z^T H z = tr H + sum_{i != j} H_ij z_i z_j
    assert abs(hutchinson_trace(obj, samples=m) - 10.7) < 4 * std


def test_eps_sharpness_closed_forms_and_restores_weights():
    rho = 0.1
    # linear L = c^T x: the maximum rho ||c|| is reached by SAM's first step
    c = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)
    obj = quadratic_objective(torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), b=c)
    kept = [p.detach().clone() for p in obj.params]
    assert eps_sharpness(obj, rho=rho, steps=0) == pytest.approx(rho * 13.0, rel=1e-12)
    assert eps_sharpness(obj, rho=rho, steps=3) == pytest.approx(rho * 13.0, rel=1e-12)
    assert all(torch.equal(p, k) for p, k in zip(obj.params, kept))
    # at the minimum of a convex quadratic: 1/2 rho^2 lambda_max
    h = symmetric([5.0, 1.0, 0.5])
    obj = quadratic_objective(h, torch.zeros(3, dtype=torch.float64))
    assert eps_sharpness(obj, rho=rho, steps=60) == pytest.approx(0.5 * rho**2 * 5.0, rel=1e-8)


def test_eps_sharpness_of_a_diverged_loss_is_nan_and_a_failed_shift_restores_the_weights():
    """max() skipped NaN rises, so a model whose loss is NaN everywhere had eps-sharpness -inf ("flat"), and one NaN
    on the sphere among finite points gave the others' maximum. And a shift that failed at some weight (an
    out-of-memory) left the weights before it shifted: no __exit__ runs when __enter__ raises."""
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))

    def nan_loss():
        return (x * float("nan")).sum()

    obj = Objective(params=[x], chunks=[(1.0, nan_loss)])
    assert math.isnan(eps_sharpness(obj, rho=0.1, steps=2))

    def nan_off_centre():  # finite at theta, NaN at every point of the sphere
        centre = torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
        return (x**2).sum() + (0.0 if centre else float("nan"))

    assert math.isnan(eps_sharpness(Objective(params=[x], chunks=[(1.0, nan_off_centre)]), rho=0.1, steps=2))
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    shifts = Objective(params=[a, b], chunks=[(1.0, lambda: a.sum())])
    with pytest.raises(RuntimeError):
        with shifts.shifted([torch.full((3,), 0.5), torch.zeros(5)]):  # the second weight's shape is wrong
            pass
    assert torch.equal(a, torch.ones(3, dtype=torch.bfloat16)) and torch.equal(b, torch.ones(2, dtype=torch.bfloat16))


def test_eps_sharpness_reaches_the_trust_region_maximum():
    # max_{||d|| <= rho} g^T d + 1/2 d^T H d for H > 0: d = (mu I - H)^-1 g with mu > lambda_max, ||d|| = rho
    h = symmetric([4.0, 2.0, 1.0, 0.5], seed=3)
    x0 = torch.tensor([0.2, -0.1, 0.05, 0.3], dtype=torch.float64)
    rho = 0.5
    g = h @ x0
    eye = torch.eye(4, dtype=torch.float64)
    lo, hi = 4.0 + 1e-12, 4.0 + 100.0
    for _ in range(200):  # bisection on ||d(mu)|| = rho (decreasing in mu)
        mu = (lo + hi) / 2
        lo, hi = (mu, hi) if torch.linalg.solve(mu * eye - h, g).norm() > rho else (lo, mu)
    d = torch.linalg.solve(mu * eye - h, g)
    expected = float(g @ d + 0.5 * d @ h @ d)
    obj = quadratic_objective(h, x0)
    assert eps_sharpness(obj, rho=rho, steps=100) == pytest.approx(expected, rel=1e-7)
    from forgetless.landscape.metrics import eps_sharpness_parts

    total, first = eps_sharpness_parts(obj, rho=rho, steps=100)
    assert total == pytest.approx(expected, rel=1e-7) and first == pytest.approx(rho * float(g.norm()), rel=1e-12)
    assert 0 < total - first <= 0.5 * rho**2 * 4.0 + 1e-12  # what curvature adds: at most rho^2 lambda_max / 2


# ---------------------------------------------------------------- surfaces on models


def lora_model(seed=0, r=2):
    # B = 0 at initialisation: give the adapter something to be
    return make_lora_model(seed, r=r, alpha=2 * r, b_std=0.05, b_seed=seed + 7)


def test_directions_over_all_weights_give_the_base_weights_the_same_draws_whatever_the_adapter():
    """One generator ran through the parameters in the model's order, where PEFT puts each targeted layer's LoRA
    factors after its weight: the base run, a rank-2 q/v run and a rank-4 all-projection run were cut along
    different directions over the same base weights. The own weights now draw from their own stream (as a model
    without an adapter draws them) and the factors from another; LoRA-only directions are as before."""
    from forgetless.landscape.surfaces import _directions
    from forgetless.landscape.objective import select_parameters

    def by_name(model, params="all"):
        named = select_parameters(model, params)
        dirs = _directions(named, 2, seed=3, filter_normalize=True, one_d="zero")
        canonical = [n.removeprefix("base_model.model.").replace(".base_layer", "") for n, _ in named]
        return {name: [d[i] for d in dirs] for i, name in enumerate(canonical)}

    plain = by_name(make_tiny_model(0))
    small = by_name(lora_model(0, r=2))
    wide = by_name(make_lora_model(0, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj")))
    own = [name for name in plain if ".lora_" not in name]
    assert len(own) == len(plain) > 10 and any("down_proj" in name for name in own)
    for name in own:
        for k in range(2):
            assert torch.equal(small[name][k], plain[name][k]) and torch.equal(wide[name][k], plain[name][k]), name
    assert not torch.equal(plain[own[5]][0], plain[own[5]][1])  # two directions, not one twice
    # LoRA directions (params: trainable): one stream through the factors, as before
    model = lora_model(0, r=2)
    named = select_parameters(model, "trainable")
    g = torch.Generator().manual_seed(3)
    before = [random_direction([p for _, p in named], g) for _ in range(2)]
    now = _directions(named, 2, seed=3, filter_normalize=True, one_d="zero")
    assert all(torch.equal(a, b) for d0, d1 in zip(before, now) for a, b in zip(d0, d1))


def test_filter_normalized_direction_has_the_weights_row_norms():
    model = make_tiny_model()
    params = [p for _, p in model.named_parameters()]
    d = random_direction(params, torch.Generator().manual_seed(0), filter_normalize=True)
    checked = 0
    for p, di in zip(params, d):
        if p.dim() == 1:
            assert torch.count_nonzero(di) == 0  # norm scales are left out
        else:
            assert torch.allclose(di.norm(dim=1), p.detach().norm(dim=1), rtol=1e-5, atol=1e-7)
            assert not torch.allclose(di, p.detach())  # a new direction, not the weights
            checked += 1
    assert checked >= 8
    raw = random_direction(params, torch.Generator().manual_seed(0), filter_normalize=False)
    ratio = [(r.norm(dim=1) / di.norm(dim=1)) for r, di, p in zip(raw, d, params) if p.dim() == 2]
    assert not torch.allclose(ratio[0], torch.ones_like(ratio[0]))  # normalization changed something
    # one-dimensional weights (norm scales, biases): "filter" scales the draw to the weight's norm, "keep" keeps it
    ones = [(i, p) for i, p in enumerate(params) if p.dim() == 1]
    assert ones
    for one_d in ("filter", "keep"):
        got = random_direction(params, torch.Generator().manual_seed(0), filter_normalize=True, one_d=one_d)
        for i, p in ones:
            if one_d == "keep":
                assert torch.equal(got[i], raw[i])
            else:
                assert torch.allclose(got[i], raw[i] * p.detach().norm() / raw[i].norm(), rtol=1e-6)
        for i, p in enumerate(params):
            if p.dim() > 1:
                assert torch.equal(got[i], d[i])  # the same draws: only the 1-D rule differs


def test_surface_of_a_quadratic_module_matches_the_closed_form():
    # L(a, b) = 1/2 (x + a d1 + b d2)^T H (x + a d1 + b d2): L_aa + L_bb = d1^T H d1 + d2^T H d2 everywhere.
    n = 6
    h = symmetric([3.0, 2.0, 1.0, 0.7, 0.4, 0.1], seed=5)
    module = torch.nn.Module()
    module.x = torch.nn.Parameter(torch.linspace(-0.5, 0.5, n, dtype=torch.float64).view(2, 3))

    def loss():
        v = module.x.reshape(-1)
        return 0.5 * v @ h @ v

    surface = compute_surface(module, loss, dims=2, steps=7, span=(-0.5, 0.5), filter_normalize=False, seed=3)
    g = torch.Generator().manual_seed(3)
    d1, d2 = (random_direction([module.x], g, filter_normalize=False)[0].double().reshape(-1) for _ in range(2))
    expected = float(d1 @ h @ d1 + d2 @ h @ d2)
    assert surface.losses.shape == (7, 7)
    assert surface.losses[3, 3] == pytest.approx(float(loss().detach()), rel=1e-12)
    assert surface_metrics(surface.losses, surface.coords)["surface_curvature"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("params", ["trainable", "all"])
def test_surface_sweep_restores_weights_bit_exactly(params):
    model = lora_model().to(torch.bfloat16)  # bf16 weights: the perturbed values are rounded, the restore is not
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    examples = random_examples(3, 12)
    with model_objective(model, examples, params=params, batch_size=2, precision="fp32") as obj:
        centre = obj.value()
        surface = compute_surface(model, obj.value, dims=2, params=params, steps=3, span=(-1, 1), seed=1)
    assert surface.losses[1, 1] == centre  # a = b = 0 is the model itself, exactly
    assert not np.allclose(surface.losses, centre)  # and the others are not
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n]


def test_model_objective_is_the_mean_nll_and_its_hvp_matches_finite_differences():
    from forgetless.evaluation import perplexity

    model = lora_model(seed=1).double()
    blocks = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks]
    with model_objective(model, examples, batch_size=2, precision="fp32") as obj:
        # perplexity() takes the logits to float32 (this model is float64): equal to float32 precision
        assert obj.value() == pytest.approx(perplexity(model, blocks, precision="fp32", progress=False).mean_nll,
                                            rel=1e-6)
        g = torch.Generator().manual_seed(1)
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in obj.params]
        hv = obj.hvp(v)

        def central(eps):  # (g(theta + eps v) - g(theta - eps v)) / 2 eps = H v + O(eps^2)
            with obj.shifted([eps * t for t in v]):
                _, g_plus = obj.value_and_gradient()
            with obj.shifted([-eps * t for t in v]):
                _, g_minus = obj.value_and_gradient()
            return torch.cat([((a - b) / (2 * eps)).reshape(-1) for a, b in zip(g_plus, g_minus)])

        # Richardson's extrapolation cancels the eps^2 term; a smaller eps drowns in rounding instead (LlamaRMSNorm
        # computes in float32 even in a float64 model).
        fd = (4 * central(2e-3) - central(4e-3)) / 3
    exact = torch.cat([t.reshape(-1) for t in hv])
    assert float((exact - fd).norm() / fd.norm()) < 2e-5
    assert float(fd.norm()) > 1e-3  # a real curvature, not zeros on both sides


# ---------------------------------------------------------------- reporting


def test_spearman_and_reference_ppl():
    rows = [{"method": "m", "ppl_increase": y, "x": x} for x, y in zip([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])]
    rho, p, n = spearman(rows, "x")
    assert (rho, n) == (pytest.approx(0.8), 5)  # 1 - 6 * 4 / (5 * 24)
    import itertools

    def rho_of(perm):  # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
        return 1 - 6 * sum((i - j) ** 2 for i, j in enumerate(perm)) / (5 * 24)

    exact = [abs(rho_of(perm)) >= 0.8 - 1e-12 for perm in itertools.permutations(range(5))]
    assert p == pytest.approx(sum(exact) / 120, abs=1e-12)  # the exact two-sided p, not the t approximation
    three = [{"method": "m", "ppl_increase": float(i), "x": float(i)} for i in range(3)]
    assert spearman(three, "x")[:2] == (pytest.approx(1.0), pytest.approx(1 / 3))  # scipy's approximation: p = 0
    assert math.isnan(spearman(rows[:2], "x")[0])
    results = [{"method": "lora-mu", "task": "t", "seed": 0, "general_ppl": 12.0},
               {"method": "base", "task": "t", "seed": 0, "general_ppl": 10.0},
               {"method": "lora-mu", "task": "t", "seed": 1, "general_ppl": 13.0,
                "landscape": {"metrics": {"surface_curvature": 2.0}}}]
    assert reference_ppl(results, results[2]) == 10.0  # no base with seed 1: any base
    assert flatness_rows(results)[0]["ppl_increase"] == pytest.approx(3.0)
    no_base = [r for r in results if r["method"] != "base"]
    assert reference_ppl(no_base, no_base[1], methods=["lora-mu"]) == 13.0  # the first method, same seed
    # a base scored without held-out text (records gathered from several folders): passed over, not a TypeError
    unscored = [dict(results[1], seed=1, general_ppl=None)] + results
    assert reference_ppl(unscored, results[2]) == 10.0
    assert flatness_rows(unscored)[0]["ppl_increase"] == pytest.approx(3.0)


def test_flatness_section_names_the_interpolations_it_does_not_measure(tmp_path):
    from forgetless.reporting.flatness import flatness_section

    measured = {"landscape": {"metrics": {"surface_curvature": 2.0}}}
    results = [{"method": "base", "task": "t", "seed": 0, "general_ppl": 10.0},
               {"method": "lora-mu", "task": "t", "seed": 0, "general_ppl": 12.0, **measured}]
    plain = flatness_section(results, tmp_path)
    assert "## Flatness and forgetting" in plain and "Not measured" not in plain
    results.append({"method": "wise-ft", "task": "t", "seed": 0, "general_ppl": 11.0, **measured,
                    "variants": {"wise-ft(alpha=0.5)": {"general_ppl": 10.5}}})
    md = flatness_section(results, tmp_path)
    assert "Not measured: `wise-ft(alpha=0.5)`." in md
    assert "| wise-ft | t | 0 |" in md  # the run itself is in the per-run table


def test_flatness_table_shows_how_far_to_trust_the_hessian_numbers(tmp_path):
    """A 6-probe trace had a standard error about as large as the trace, and a residual says whether the power
    iteration ended on an eigenpair: the per-run table shows both beside the numbers (the Spearman rows use the
    numbers alone), and the footnote says how they were measured."""
    from forgetless.reporting.flatness import flatness_section

    settings = {"params": "trainable", "blocks": 4, "block_size": 128, "grid": 9, "span": 1.0, "hessian_iters": 10,
                "trace_samples": 12, "precision": "fp32"}
    metrics = {"hessian_top_eigenvalue": 14.17, "hessian_top_residual": 0.006173, "hessian_trace": 149.2,
               "hessian_trace_stderr": 28.97}
    results = [{"method": "base", "task": "t", "seed": 0, "general_ppl": 10.0},
               {"method": "lora-mu", "task": "t", "seed": 0, "general_ppl": 12.0,
                "landscape": {"settings": settings, "metrics": metrics}}]
    md = flatness_section(results, tmp_path)
    assert "| Hessian top eigenvalue (residual) | Hessian trace (± s.e.) |" in md
    assert "| lora-mu | t | 0 | 12.000 | +2 | 14.17 (0.0062) | 149.2 ± 29 |" in md
    assert ("the Hessian's top eigenvalue (the largest algebraic one) by power iteration of up to 10 products (twice "
            "that when the dominant eigenvalue is negative), its trace from 12 Hutchinson probes; in fp32.") in md
    assert "| Hessian trace | " in md.split("Spearman", 1)[1]  # the correlation rows keep the plain names
    older = [results[0], dict(results[1], landscape={"metrics": {"hessian_trace": 86.0}})]  # no precision recorded
    assert "| lora-mu | t | 0 | 12.000 | +2 | 86 |" in flatness_section(older, tmp_path)


def test_flatness_correlations_count_one_model_once(tmp_path):
    """WiSE-FT's alpha-1 run is lora-nu-mu's model: the same PPL and metrics. The per-run table keeps both; the
    Spearman correlations count the model once (a duplicate would weigh it double)."""
    from forgetless.reporting.flatness import distinct_models, flatness_rows, flatness_section

    results = [{"method": "base", "task": "t", "seed": 0, "general_ppl": 10.0}]
    for seed, (ppl, x) in enumerate([(12.0, 1.0), (15.0, 3.0), (11.0, 2.0), (14.0, 5.0)]):
        results.append({"method": "lora-nu-mu", "task": "t", "seed": seed, "general_ppl": ppl,
                        "landscape": {"metrics": {"surface_curvature": x}}})
        results.append({"method": "base", "task": "t", "seed": seed, "general_ppl": 10.0})
    results += [dict(r, method="wise-ft") for r in results if r["method"] == "lora-nu-mu"][:2]
    rows = flatness_rows(results)
    distinct, dropped = distinct_models(rows)
    assert len(rows) == 6 and len(distinct) == 4
    assert dropped == [("wise-ft", "lora-nu-mu")] * 2
    md = flatness_section(results, tmp_path)
    assert "2 run(s) of `wise-ft` (the model of `lora-nu-mu`) have the same measurements" in md
    spearman_row = next(line for line in md.splitlines() if line.startswith("| Surface Curvature | "))
    # increases 2, 5, 1, 4 against curvatures 1, 3, 2, 5: rho = 1 - 6 * (1 + 1 + 1 + 1) / (4 * 15) = 0.6, n = 4
    assert spearman_row.startswith("| Surface Curvature | 0.600, ") and "| 4 |" in spearman_row
    assert sum(line.startswith("| wise-ft | t |") for line in md.splitlines()) == 2  # the per-run table keeps them


def test_runs_measured_with_other_settings_are_left_out_of_the_correlations_and_named(tmp_path):
    """A run that could not be measured again after the landscape settings changed keeps its old metrics: they are
    on another scale (a span of 1.0 against 0.25) and joined the others' correlation, under the first record's
    settings' caption. The rows of the settings most runs have are kept; the others are named."""
    from forgetless.reporting.flatness import flatness_section

    results = [{"method": "base", "task": "t", "seed": s, "general_ppl": 10.0} for s in range(4)]
    stale = {"digest": "old", "settings": {"span": 1.0, "grid": 9}, "metrics": {"surface_curvature": 1.9}}
    results.append({"method": "lora-mu", "task": "t", "seed": 0, "general_ppl": 14.0, "landscape": stale})
    for seed, (ppl, x) in enumerate([(12.0, 0.10), (15.0, 0.30), (11.0, 0.12)], start=1):
        results.append({"method": "lora-mu", "task": "t", "seed": seed, "general_ppl": ppl,
                        "landscape": {"digest": "new", "settings": {"span": 0.25, "grid": 9},
                                      "metrics": {"surface_curvature": x}}})
    md = flatness_section(results, tmp_path)
    assert "Left out: 1 run(s) measured with other landscape settings than the rest (`lora-mu` (t, seed 0))" in md
    assert "| lora-mu | t | 0 |" not in md and "over [-0.25, 0.25]^2" in md and "1.9" not in md
    spearman_row = next(line for line in md.splitlines() if line.startswith("| Surface Curvature | "))
    # increases 2, 5, 1 against curvatures 0.10, 0.30, 0.12: rho = 1 - 6 * (1 + 0 + 1) / (3 * 8) = 0.5, n = 3
    assert spearman_row.startswith("| Surface Curvature | 0.500, ") and "| 3 |" in spearman_row


# ---------------------------------------------------------------- CLI and experiment


def test_landscape_cli_writes_grid_figures_and_metrics(tmp_path, tiny_model_dir, capsys):
    from forgetless.cli import main

    adapter = tmp_path / "adapter"
    model = lora_model()
    model.save_pretrained(adapter)
    text = tmp_path / "text.txt"
    text.write_text("Plants make sugar from light and absorb carbon dioxide from the air.\n" * 20)
    out = tmp_path / "land"
    rc = main(["landscape", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--text", str(text),
               "--blocks", "2", "--block-size", "16", "--grid", "5", "--range", "-0.5", "0.5", "--metrics",
               "--hessian-iters", "3", "--trace-samples", "2", "--ascent-steps", "1", "--output", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "landscape.json").read_text())
    surface = load_surface(out / "surface.npz")
    assert surface.losses.shape == (5, 5) and surface.coords[0][0] == -0.5
    assert report["surface_metrics"] == pytest.approx(surface_metrics(surface.losses, surface.coords))
    assert set(report["metrics"]) == {"hessian_top_eigenvalue", "hessian_dominant_eigenvalue", "hessian_trace",
                                      "eps_sharpness", "eps_first_order", "hessian_dominant_residual",
                                      "hessian_top_residual",
                                      "hessian_trace_stderr", "hessian_bottom_eigenvalue", "hessian_bottom_residual"}
    assert surface.losses[2, 2] == pytest.approx(report["loss"], rel=1e-6)
    rc = main(["landscape", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--text", str(text),
               "--blocks", "2", "--block-size", "16", "--grid", "3", "--metrics", "--hessian-method", "power",
               "--hessian-iters", "6", "--trace-samples", "1", "--ascent-steps", "-1", "--output", str(out / "lz"),
               "--quiet"])
    power = json.loads((out / "lz" / "landscape.json").read_text())["metrics"]  # the default is lanczos
    assert rc == 0 and "hessian_bottom_eigenvalue" not in power
    assert report["metrics"]["hessian_top_eigenvalue"] > report["metrics"]["hessian_bottom_eigenvalue"]
    for name in ("surface_contour.png", "surface_3d.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["landscape", "--model", str(tiny_model_dir), "--params", "all", "--no-filter-normalize",
               "--text", str(text), "--blocks", "1", "--block-size", "16", "--dims", "1", "--grid", "4",
               "--output", str(out / "one"), "--quiet"])
    assert rc == 0 and (out / "one" / "surface_1d.png").is_file()
    assert load_surface(out / "one" / "surface.npz").losses.shape == (4,)
    from tests.unit.test_experiment import FIXTURES

    rc = main(["landscape", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--task",
               str(FIXTURES / "generic.jsonl"), "--blocks", "3", "--dims", "1", "--grid", "3", "--output",
               str(out / "task"), "--quiet"])
    task_report = json.loads((out / "task" / "landscape.json").read_text())
    assert rc == 0 and task_report["data"]["examples"] == 3
    assert task_report["data"]["chat_template"] is False  # the tiny model's name says nothing of instruction tuning
    capsys.readouterr()
    rc = main(["landscape", "--model", str(tiny_model_dir), "--text", str(text), "--output", str(out / "x")])
    assert rc == 2 and "no trainable weights" in capsys.readouterr().err  # a user error, said in one line


def test_landscape_flags_are_checked_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """--rho, --ascent-steps and --range are said wrong in one line (exit 2) before the model loads: they were
    checked only after the whole surface sweep, with a traceback."""
    import forgetless.models as models
    from forgetless.cli import main

    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "a b c d e f g h"}\n')
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    common = ["landscape", "--model", str(tiny_model_dir), "--params", "all", "--text", str(text), "--dims", "1",
              "--grid", "3", "--quiet"]
    for extra, said in ((["--metrics", "--rho", "-1"], "rho finite and >= 0"),
                        (["--metrics", "--rho", "nan"], "rho finite and >= 0"),
                        (["--metrics", "--ascent-steps", "-2"], "ascent_steps >= -1"),
                        (["--range", "0", "0"], "LOW < HIGH"), (["--range", "1", "-1"], "LOW < HIGH"),
                        (["--range", "0", "inf"], "finite numbers")):
        rc = main(common + extra + ["--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "out").exists()


def test_landscape_output_is_checked_before_the_model_loads_and_not_overwritten(tmp_path, tiny_model_dir,
                                                                                 monkeypatch, capsys):
    """``landscape --output`` must be a new or empty folder (or --overwrite an earlier measurement), said before the
    model loads: a file given as the folder, or a folder holding a measurement, was found only after the surface."""
    import forgetless.models as models
    from forgetless.cli import main

    adapter = tmp_path / "adapter"
    lora_model().save_pretrained(adapter)
    text = tmp_path / "text.txt"
    text.write_text("Plants make sugar from light and absorb carbon dioxide from the air.\n" * 20)
    out = tmp_path / "land"

    def measure(*extra: str) -> int:
        return main(["landscape", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--text", str(text),
                     "--blocks", "1", "--block-size", "16", "--dims", "1", "--grid", "3", "--output", str(out),
                     "--quiet", *extra])

    assert measure("--seed", "0") == 0
    first = json.loads((out / "landscape.json").read_text())
    assert first["files"]["grid"] == str(out / "surface.npz") and not (tmp_path / "land.tmp").exists()
    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    capsys.readouterr()
    assert measure("--seed", "7") == 2 and not loads  # refused before the model loads
    assert "--output " + str(out) + " holds an earlier measurement (landscape.json)" in capsys.readouterr().err
    assert json.loads((out / "landscape.json").read_text()) == first
    assert measure("--seed", "7", "--overwrite") == 0 and loads
    assert json.loads((out / "landscape.json").read_text())["seed"] == 7
    # a 2-D measurement over the 1-D one: the 1-D curve's figure goes (it stayed beside the new surface); a file of
    # the user's stays
    (out / "notes.txt").write_text("mine")
    curve = set(json.loads((out / "landscape.json").read_text())["files"].values()) - {str(out / "surface.npz")}
    assert curve and all(Path(f).is_file() for f in curve)
    assert measure("--dims", "2", "--overwrite") == 0
    now = set(json.loads((out / "landscape.json").read_text())["files"].values())
    assert sorted(p.name for p in out.iterdir()) == sorted(["landscape.json", "notes.txt"] + [Path(f).name for f in now])
    assert not any(Path(f).exists() for f in curve - now)
    out = tmp_path / "text.txt" / "sub"
    assert measure() == 2
    assert "is not writable" in capsys.readouterr().err
    mine = tmp_path / "here.tmp"  # a folder named like the old fixed temporary: left alone
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    out = Path(".")  # an empty current folder: the files land in it
    assert measure() == 0 and (here / "landscape.json").is_file() and (mine / "notes.txt").read_text() == "mine"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".here.")]


def test_experiment_landscape_section_measures_runs_once(tmp_path, tiny_model_dir, monkeypatch):
    from forgetless.experiment import ConfigError, load_experiment, run_experiment

    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 2, "trace_samples": 1, "ascent_steps": 1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], landscape=landscape)
    results = run_experiment(load_experiment(path), progress=False)
    out = tmp_path / "out"
    tuned = [r for r in results if r["method"] == "lora-mu"]
    base = {r["seed"]: r for r in results if r["method"] == "base"}
    assert len(tuned) == 2 and all("skipped" in r["landscape"] for r in base.values())
    for r in tuned:
        metrics = r["landscape"]["metrics"]
        assert {"surface_curvature", "average_gradient", "mean_absolute_gradient", "hessian_top_eigenvalue",
                "hessian_trace", "eps_sharpness"} <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())
        assert (out / "landscape" / r["run_id"] / "surface_contour.png").is_file()
        grid = load_surface(out / r["landscape"]["surface"])
        assert surface_metrics(grid.losses, grid.coords)["surface_curvature"] == metrics["surface_curvature"]
    md = (out / "results.md").read_text()
    assert "## Flatness and forgetting" in md and "Spearman" in md
    row = next(line for line in md.splitlines() if line.startswith("| lora-mu | gen | 0 |"))
    increase = float(row.split("|")[5])
    assert increase == pytest.approx(tuned[0]["general_ppl"] - base[0]["general_ppl"], rel=1e-3)
    assert (out / "flatness_surface_curvature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import forgetless.landscape_runs as measure

    def boom(*a, **k):
        raise AssertionError("a measured run was measured again")

    monkeypatch.setattr(measure, "measure_flatness", boom)
    run_experiment(load_experiment(path), progress=False)  # resumable: nothing is recomputed
    monkeypatch.undo()
    calls = []
    real = measure.measure_flatness
    monkeypatch.setattr(measure, "measure_flatness", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], landscape=landscape | {"grid": 5})
    run_experiment(load_experiment(path), progress=False)
    assert len(calls) == 2  # other settings: measured again (the two tuned runs)

    bad = yaml.safe_load(path.read_text()) | {"landscape": {"params": "lora"}}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"landscape: params must be"):
        load_experiment(path)


def test_a_runs_flatness_is_recorded_before_the_next_run_trains(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """An experiment stopped between runs (a session's end) has the finished runs' flatness already: each run is
    measured as soon as its record is written, while its adapter is there. A measurement that fails does not stop
    the runs: the landscape step at the end measures it."""
    import forgetless.experiment as experiment
    import forgetless.landscape_runs as measure
    from forgetless.experiment import load_experiment, run_experiment

    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 2, "trace_samples": 1, "ascent_steps": 1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu", "lora-nu-mu"], seeds=[0], landscape=landscape)
    runs = tmp_path / "out" / "runs"
    seen = {}
    real_train = experiment._train_job

    def train(exp, job, data, progress):  # what the records hold when each run starts
        seen[job.rid] = {p.stem: "landscape" in json.loads(p.read_text()) for p in runs.glob("*.json")}
        return real_train(exp, job, data, progress)

    monkeypatch.setattr(experiment, "_train_job", train)
    real_measure, calls = measure.measure_flatness, []

    def flaky(*a, **k):  # the first measurement fails, as a full disk or a non-finite loss would
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no space left on device")
        return real_measure(*a, **k)

    monkeypatch.setattr(measure, "measure_flatness", flaky)
    run_experiment(load_experiment(path), progress=False)
    out = capsys.readouterr().out
    assert seen == {"lora-mu__gen__seed0": {}, "lora-nu-mu__gen__seed0": {"lora-mu__gen__seed0": False}}
    assert ("landscape not measured now: lora-mu__gen__seed0: RuntimeError: no space left on device; the landscape "
            "step at the end tries again") in out
    assert out.index("lora-nu-mu__gen__seed0: loss ") < out.index("landscape: measuring 1 run(s)")
    assert len(calls) == 3  # the failed one, lora-nu-mu at once, lora-mu again at the end
    for p in runs.glob("*.json"):
        assert "hessian_trace" in json.loads(p.read_text())["landscape"]["metrics"]

    seen.clear()
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu", "lora-nu-mu"], seeds=[0, 1],
                            landscape=landscape)
    run_experiment(load_experiment(path), progress=False)  # working measurements: each right after its run
    assert seen == {"lora-mu__gen__seed1": {"lora-mu__gen__seed0": True, "lora-nu-mu__gen__seed0": True},
                    "lora-nu-mu__gen__seed1": {"lora-mu__gen__seed0": True, "lora-nu-mu__gen__seed0": True,
                                               "lora-mu__gen__seed1": True}}


def test_under_several_processes_the_landscape_waits_for_the_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Under ``accelerate launch`` only the main process measures; measuring after each run would keep the others
    waiting in the next run's first collective (past its timeout on a large model), so it is all done at the end."""
    import forgetless.experiment as experiment
    from forgetless.experiment import load_experiment, run_experiment

    class TwoProcesses:  # what the main process of two sees; the training itself runs in this one process
        num_processes, is_main_process = 2, True

        def wait_for_everyone(self):
            pass

    monkeypatch.setattr(experiment, "PartialState", TwoProcesses)
    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 1, "trace_samples": 1, "ascent_steps": 1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[0, 1], landscape=landscape)
    run_experiment(load_experiment(path), progress=False)
    out = capsys.readouterr().out
    assert out.index("[2/2] lora-mu__gen__seed1") < out.index("landscape: measuring 2 run(s) (0 already measured)")


def test_a_trained_run_without_its_adapter_is_named_not_marked_skipped(tmp_path, tiny_model_dir, capsys):
    """Records restored on another machine without their (uncommitted) adapters: a trained run cannot be measured
    there. It is named, with what to do, and its record is left as it was (an older measurement kept, never a
    "skipped" that would stick); the others are measured and the tables written before the error."""
    import shutil

    from forgetless.cli import main
    from forgetless.experiment import load_experiment, run_experiment

    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], seeds=[0])
    run_experiment(load_experiment(path), progress=False)
    out = tmp_path / "out"
    shutil.rmtree(out / "adapters" / "lora-mu__gen__seed0")
    (out / "results.md").unlink()
    tuned = out / "runs" / "lora-mu__gen__seed0.json"
    older = {"digest": "0123456789", "metrics": {"surface_curvature": 0.5}}
    tuned.write_text(json.dumps(json.loads(tuned.read_text()) | {"landscape": older}))
    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 1, "trace_samples": 1, "ascent_steps": 1,
                 "all_weights_seeds": [0]}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], seeds=[0], landscape=landscape)
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert ("forgetless: error: landscape: 1 run(s) not measured (the others are):\n  - lora-mu__gen__seed0: its "
            f"adapter {out / 'adapters' / 'lora-mu__gen__seed0'} is missing (adapters stay on the machine that trained "
            f"them): restore it there, or delete {tuned} to train the run again") in err
    assert json.loads(tuned.read_text())["landscape"] == older
    base = json.loads((out / "runs" / "base__gen__seed0.json").read_text())["landscape"]
    assert "skipped" in base and "metrics" in base["all_weights"]  # base: nothing trainable, all weights measured
    assert (out / "results.md").is_file()


def test_the_landscape_step_measures_only_the_runs_the_experiment_plans(tmp_path, tiny_model_dir, capsys):
    """The step measured every record in the folder: seeds or methods the file no longer names cost their time, and
    one that could not be measured (its adapter gone, a record of another base model) failed a run whose planned runs
    all succeeded (exit 2). The tables already leave such records out; so does the landscape step now."""
    import shutil

    from forgetless.cli import main
    from forgetless.experiment import load_experiment, run_experiment

    run_experiment(load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"])),
                   progress=False)  # seeds 0 and 1
    out = tmp_path / "out"
    shutil.rmtree(out / "adapters" / "lora-mu__gen__seed1")
    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 1, "trace_samples": 1, "ascent_steps": 1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], seeds=[0], landscape=landscape)
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "landscape: measuring 2 run(s) (0 already measured)" in printed, printed
    for seed, measured in ((0, True), (1, False)):
        record = json.loads((out / "runs" / f"lora-mu__gen__seed{seed}.json").read_text())
        assert ("landscape" in record) is measured, seed


def test_the_landscape_command_measures_in_fp32_unless_told():
    """As an experiment's landscape: section does: in bf16, near a minimum, the gradient is mostly rounding (which
    moves eps-sharpness), and the curvature of a fine grid grows with the rounding divided by h^2. The other commands
    keep precision auto."""
    from forgetless.cli import parse_command_line

    assert parse_command_line(["landscape", "--text", "t.jsonl"]).precision == "fp32"
    assert parse_command_line(["landscape", "--text", "t.jsonl", "--precision", "bf16"]).precision == "bf16"
    assert parse_command_line(["eval", "--ppl", "t.jsonl"]).precision == "auto"
    assert parse_command_line(["train", "--domain", "d.jsonl", "--output", "o"]).precision == "auto"


def test_the_landscape_loads_the_base_as_the_run_did(tmp_path, tiny_model_dir, monkeypatch):
    """A run's flatness is measured on the base it trained on: its dtype (bf16 here, in the run's settings) and its
    quantization. A quantized base gets no surface over all weights (they are packed integers; marked skipped, with
    why) and ``params: all`` on it is refused by name."""
    from dataclasses import replace

    import forgetless.models as models
    from forgetless.experiment import load_experiment, run_experiment
    from forgetless.landscape import LandscapeSettings
    from forgetless.landscape_runs import LandscapeFailed, measure_runs

    seen, real = [], models.load_model

    def spy(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        seen.append((kwargs.get("dtype"), kwargs.get("quantization"), model.get_input_embeddings().weight.dtype))
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", spy)  # the landscape step imports it when it measures
    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 1, "trace_samples": 1, "ascent_steps": 1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[0], dtype="bf16",
                            landscape=landscape)
    run_experiment(load_experiment(path), progress=False)
    assert seen == [("bf16", "none", torch.bfloat16)]

    # the same run as if its base had been 4-bit (bitsandbytes stand-in: the float base, reported as quantized)
    record = tmp_path / "out" / "runs" / "lora-mu__gen__seed0.json"
    data = json.loads(record.read_text())
    data["settings"]["quantization"] = "4bit"
    del data["landscape"]
    record.write_text(json.dumps(data))
    seen.clear()

    def as_if_quantized(*args, **kwargs):
        seen.append(("asked", kwargs.get("quantization")))
        return spy(*args, **(kwargs | {"quantization": "none"}))

    monkeypatch.setattr(models, "load_model", as_if_quantized)
    monkeypatch.setattr(models, "is_quantized", lambda model: True)
    settings = LandscapeSettings(**landscape, all_weights_seeds=[0])
    texts = [f"Plants make sugar from light, sentence {i}." for i in range(40)]
    assert measure_runs(tmp_path / "out", str(tiny_model_dir), settings, lambda: texts, 16, progress=False) == 1
    assert ("asked", "4bit") in seen
    entry = json.loads(record.read_text())["landscape"]
    assert "metrics" in entry and "4bit-quantized" in entry["all_weights"]["skipped"]
    assert entry["base"] == {"dtype": "bf16", "quantization": "4bit"}  # a later base change measures it again
    # only the all-weights entry missing: marked skipped without loading a model
    record.write_text(json.dumps(json.loads(record.read_text()) | {"landscape": entry | {"all_weights": None}}))
    seen.clear()
    assert measure_runs(tmp_path / "out", str(tiny_model_dir), settings, lambda: texts, 16, progress=False) == 0
    assert seen == [] and "skipped" in json.loads(record.read_text())["landscape"]["all_weights"]
    with pytest.raises(LandscapeFailed, match=r"lora-mu__gen__seed0: ValueError: landscape params: all .* 4bit"):
        measure_runs(tmp_path / "out", str(tiny_model_dir), replace(settings, params="all", all_weights_seeds=None),
                     lambda: texts, 16, progress=False)


def test_flatness_over_16_bit_weights_says_what_it_costs():
    """eps-sharpness moves each of N weights by about rho / sqrt(N): over all weights of a bf16 base most of that
    rounds away (a review measured 71 % of the step realized, at a cosine of 0.55 to it). Measured anyway, with a
    warning that says to load the base in float32; float32 weights measure without one."""
    import warnings

    from forgetless.landscape import LandscapeSettings, measure_flatness

    settings = LandscapeSettings(params="all", grid=0, hessian_iters=0, trace_samples=0, ascent_steps=0, rho=1e-3,
                                 batch_size=4)
    examples = random_examples(4, 8)
    with pytest.warns(UserWarning, match="flatness over all weights held in bfloat16: eps-sharpness's shift"):
        metrics, _ = measure_flatness(make_tiny_model().to(torch.bfloat16), examples, settings)
    assert math.isfinite(metrics["eps_sharpness"]) and metrics["eps_first_order"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure_flatness(make_tiny_model(), examples, settings)


def test_the_origin_is_marked_only_where_the_grid_holds_it(tmp_path):
    """A range that leaves (0, 0) out (e.g. [0.5, 1]) drew the marker anyway, stretching the axes over blank space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forgetless.reporting.landscape_plots import mark_origin

    class S:  # a Surface's coordinates
        def __init__(self, low, high):
            self.coords = [torch.linspace(low, high, 5).numpy()] * 2

    for (low, high), marked in (((-1.0, 1.0), 1), ((0.5, 1.0), 0), ((0.0, 1.0), 1)):
        fig, ax = plt.subplots()
        mark_origin(ax, S(low, high), ms=5)
        assert len(ax.lines) == marked
        plt.close(fig)


def test_the_lora_vs_all_weights_section_shows_each_model_once_and_plots_the_runs_with_surfaces(tmp_path):
    """A run given another run's measurement (``same_model_as``: WiSE-FT's alpha-1 copy) got a second pair of rows;
    and the figure took the first ``most`` runs before dropping those without surface files, so a figure could be
    left out while later runs had their files."""
    from forgetless.landscape import Surface, save_surface
    from forgetless.reporting.flatness import all_weights_section, plot_surface_pairs

    def surface(name, scale):
        a = np.linspace(-1, 1, 3)
        save_surface(Surface([a, a], scale * (a[:, None] ** 2 + a[None, :] ** 2), {}), tmp_path / name)
        return name

    metrics = {"loss": 1.0, "n_params": 10, "surface_curvature": 1.0, "average_gradient": 1.0,
               "mean_absolute_gradient": 1.0}

    def record(method, seed, files=True, copy_of=None):
        every = {"metrics": metrics, "surface": surface(f"{method}{seed}_all.npz", 3.0) if files else None}
        entry = {"metrics": metrics, "surface": surface(f"{method}{seed}.npz", 1.0) if files else None,
                 "all_weights": every}
        if copy_of:
            entry["same_model_as"] = every["same_model_as"] = copy_of
        return {"method": method, "seed": seed, "landscape": entry}

    runs = [record("lora-nu-mu", 0), record("wise-ft(alpha=1.0)", 0, copy_of="lora-nu-mu__t__seed0")]
    md = all_weights_section(runs, tmp_path, tmp_path)
    assert sum(line.startswith("| lora-nu-mu | 0 |") for line in md.splitlines()) == 2
    assert not any(line.startswith("| wise-ft") for line in md.splitlines())
    assert "wise-ft(alpha=1.0) (seed 0) = `lora-nu-mu__t__seed0`" in md
    pairs = [(r, r["landscape"]["all_weights"]) for r in (record("sam", 0, files=False), record("sam", 1))]
    assert plot_surface_pairs(pairs, tmp_path, tmp_path / "pairs.png", most=1) == tmp_path / "pairs.png"
