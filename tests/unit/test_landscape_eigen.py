"""The Hessian's top eigenvalue is the largest algebraic one (shifted power iteration), against closed forms; the
dominant (largest-magnitude) one stays available; the experiment's landscape section over all weights."""

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import forgetless.landscape.metrics as metrics
from forgetless.landscape import (Objective, hessian_dominant_eigenvalue, hessian_eigenvalues, hessian_top_eigenvalue,
                                  load_surface)
from tests.unit.test_experiment import write_experiment
from tests.unit.tiny_model import make_tiny_model
from tests.unit.tiny_tokenizer import make_tiny_tokenizer
from tests.unit.test_landscape import quadratic_objective, symmetric

SPECTRA = {  # eigenvalues -> (largest algebraic, largest magnitude)
    "large negative": ([-6.0, 2.0, 1.0, 0.5, -0.3], (2.0, -6.0)),
    "all negative": ([-6.0, -2.0, -1.0], (-1.0, -6.0)),
    "positive dominant": ([7.0, 3.0, 1.0, -0.5, 0.2], (7.0, 7.0)),
    "negative semi-definite": ([-5.0, -1.0, 0.0, -3.0], (0.0, -5.0)),
}


@pytest.mark.parametrize("name", list(SPECTRA))
def test_top_and_dominant_eigenvalues_of_a_quadratic(name):
    spectrum, (top, dominant) = SPECTRA[name]
    obj = quadratic_objective(symmetric(spectrum), torch.linspace(-1, 1, len(spectrum), dtype=torch.float64))
    got = hessian_eigenvalues(obj, iters=300, tol=1e-15)
    assert got["top"] == pytest.approx(top, rel=1e-9, abs=1e-9)
    assert got["dominant"] == pytest.approx(dominant, rel=1e-9)
    assert hessian_top_eigenvalue(obj, iters=300, tol=1e-15) == got["top"]
    assert hessian_dominant_eigenvalue(obj, iters=300, tol=1e-15) == got["dominant"]


def test_the_residual_says_whether_the_dominant_pair_is_an_eigenpair():
    """A spectrum with close dominant eigenvalues (-6 and 5.5) from a start nearly orthogonal to the -6 eigenvector:
    after 300 products the pair is the dominant one (residual ~0); after 1 it is no eigenpair (residual of order 1);
    in between the iteration passes near 5.5 (a small residual, the wrong sign): the residual tells an eigenpair from a
    mixture, not the dominant eigenvalue from another one."""
    obj = quadratic_objective(symmetric([-6.0, 5.5, 1.0, 0.5, -0.3]), torch.ones(5, dtype=torch.float64))
    done = hessian_eigenvalues(obj, iters=300, tol=1e-15)
    assert done["dominant"] == pytest.approx(-6.0, rel=1e-6) and done["dominant_residual"] < 1e-4
    assert hessian_eigenvalues(obj, iters=1, tol=0.0)["dominant_residual"] > 0.5
    passing = hessian_eigenvalues(obj, iters=5, tol=0.0)
    assert passing["dominant"] == pytest.approx(5.5, rel=1e-2) and passing["dominant_residual"] < 0.1


def test_the_trace_estimate_has_the_standard_error_of_its_probes():
    """hutchinson_trace_estimate: the mean is hutchinson_trace's; the error is the sample std of z^T H z over the
    probes / sqrt(n), recomputed here from the probes themselves (0 for a diagonal H, where every probe is exact)."""
    from forgetless.landscape import hutchinson_trace, hutchinson_trace_estimate

    diag = quadratic_objective(torch.diag(torch.tensor([4.0, -1.0, 2.5], dtype=torch.float64)),
                               torch.ones(3, dtype=torch.float64))
    assert hutchinson_trace_estimate(diag, samples=5) == (pytest.approx(5.5, rel=1e-12), pytest.approx(0.0, abs=1e-12))
    h = symmetric([7.0, 3.0, 1.0, -0.5, 0.2], seed=1)
    obj = quadratic_objective(h, torch.zeros(5, dtype=torch.float64))
    mean, stderr = hutchinson_trace_estimate(obj, samples=40, seed=3)
    probes = [float(torch.cat(z) @ torch.cat(obj.hvp(z))) for z in
              (metrics._random_vector(obj, metrics.probe_seed(3, k), rademacher=True) for k in range(40))]
    assert mean == pytest.approx(np.mean(probes), rel=1e-12) == hutchinson_trace(obj, samples=40, seed=3)
    assert stderr == pytest.approx(np.std(probes, ddof=1) / math.sqrt(40), rel=1e-9) and stderr > 0
    assert math.isnan(hutchinson_trace_estimate(obj, samples=1)[1])


@pytest.mark.parametrize("iters", [1, 2, 3, 5, 8])
def test_top_eigenvalue_is_a_rayleigh_quotient_at_any_iteration_count(iters):
    for spectrum, _ in SPECTRA.values():
        obj = quadratic_objective(symmetric(spectrum, seed=iters), torch.ones(len(spectrum), dtype=torch.float64))
        top = hessian_top_eigenvalue(obj, iters=iters, tol=0.0)
        assert min(spectrum) - 1e-12 <= top <= max(spectrum) + 1e-12  # a lower bound of lambda_max, never above


def test_an_unconverged_shift_is_shifted_again(monkeypatch):
    """If the first iteration stops above the smallest eigenvalue (here: -3 for a spectrum [-10, 0.5, 1]), H + 3 I
    has the dominant eigenvalue -7 < 0; shifting again by what it found reaches lambda_max = 1."""
    obj = quadratic_objective(symmetric([-10.0, 0.5, 1.0]), torch.ones(3, dtype=torch.float64))
    real = metrics._power_iteration
    shifts = []

    def first_unconverged(objective, iters, tol, seed, shift=0.0):
        shifts.append(shift)
        return (-3.0, -3.0, 1.0) if shift == 0.0 else real(objective, iters, tol, seed, shift)

    monkeypatch.setattr(metrics, "_power_iteration", first_unconverged)
    got = hessian_eigenvalues(obj, iters=300, tol=1e-15)
    assert got["top"] == pytest.approx(1.0, rel=1e-9) and len(shifts) == 3
    assert shifts[1] == -3.0 and shifts[2] == pytest.approx(-10.0, rel=1e-9)


def test_top_eigenvalue_of_a_small_network_matches_its_dense_hessian():
    """A non-quadratic loss (tanh network) whose Hessian at this point is indefinite with a negative dominant
    eigenvalue: the shifted power iteration finds the largest algebraic eigenvalue of the dense Hessian."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
    w1 = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
    w2 = torch.nn.Parameter(3 * torch.randn(4, 1, generator=g, dtype=torch.float64))  # far from a minimum

    def loss_of(a, b):
        return (torch.tanh(x @ a) @ b - y).square().mean()

    obj = Objective(params=[w1, w2], chunks=[(1.0, lambda: loss_of(w1, w2))])
    dense = torch.autograd.functional.hessian(lambda flat: loss_of(flat[:12].view(3, 4), flat[12:].view(4, 1)),
                                              torch.cat([w1.detach().flatten(), w2.detach().flatten()]))
    spectrum = torch.linalg.eigvalsh(dense)
    assert spectrum[0] < 0 < spectrum[-1] and abs(spectrum[0]) > spectrum[-1]  # the case of the issue
    got = hessian_eigenvalues(obj, iters=2000, tol=1e-14)
    assert got["dominant"] == pytest.approx(float(spectrum[0]), rel=1e-6)
    assert got["top"] == pytest.approx(float(spectrum[-1]), rel=1e-6)


# ---------------------------------------------------------------- the experiment's landscape section, all weights
def test_experiment_landscape_over_all_weights(tmp_path, tiny_model_dir):
    from forgetless.experiment import load_experiment, run_experiment
    from tests.unit.tiny_model import make_tiny_model
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    landscape = {"params": "all", "blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 3, "trace_samples": 1,
                 "ascent_steps": 1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], landscape=landscape, seeds=[0])
    results = {r["method"]: r for r in run_experiment(load_experiment(path), progress=False)}
    n_base = sum(p.numel() for p in make_tiny_model(vocab_size=len(make_tiny_tokenizer())).parameters())
    for method, r in results.items():  # base is measured too: all weights need no adapter
        entry = r["landscape"]
        assert "skipped" not in entry and entry["settings"]["params"] == "all", method
        m = entry["metrics"]
        assert all(math.isfinite(v) for v in m.values())
        # lanczos (the default): top and bottom are the spectrum's ends, the dominant is the one larger in magnitude
        top, bottom, dominant = (m[f"hessian_{k}_eigenvalue"] for k in ("top", "bottom", "dominant"))
        assert top > bottom and dominant == (top if abs(top) >= abs(bottom) else bottom), (top, bottom, dominant)
        surface = load_surface(tmp_path / "out" / entry["surface"])
        assert surface.meta["params"] == "all" and surface.losses.shape == (3, 3)
        assert surface.meta["n_params"] == m["n_params"]
    assert results["base"]["landscape"]["metrics"]["n_params"] == n_base
    lora = sum(p.numel() for n, p in _lora_parameters(tmp_path / "out" / "adapters" / results["lora-mu"]["run_id"]))
    assert results["lora-mu"]["landscape"]["metrics"]["n_params"] == n_base + lora > n_base


def test_all_weights_surface_beside_the_lora_one_is_added_without_remeasuring(tmp_path, tiny_model_dir, monkeypatch):
    """``all_weights_seeds``: the runs of those seeds (base too) get a second surface, over every weight, measured on
    its own: adding it to a measured experiment measures only it, and leaves the LoRA measurement as it was."""
    import forgetless.landscape_runs as measure
    from forgetless.experiment import load_experiment, run_experiment

    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 0, "trace_samples": 0, "ascent_steps": -1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], landscape=landscape, seeds=[0, 1])
    first = {r["run_id"]: r for r in run_experiment(load_experiment(path), progress=False)}
    calls = []
    real = measure.measure_flatness
    monkeypatch.setattr(measure, "measure_flatness", lambda m, e, s, **k: calls.append(s.params) or real(m, e, s, **k))
    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], seeds=[0, 1],
                            landscape=landscape | {"all_weights_seeds": [0]})
    results = {r["run_id"]: r for r in run_experiment(load_experiment(path), progress=False)}
    assert calls == ["all", "all"]  # base and lora-mu of seed 0; the LoRA surfaces were kept
    out = tmp_path / "out"
    n_base = sum(p.numel() for p in make_tiny_model(vocab_size=len(make_tiny_tokenizer())).parameters())
    for rid, r in results.items():
        entry = r["landscape"]
        assert entry.get("metrics") == first[rid]["landscape"].get("metrics"), rid
        if r["seed"] == 1:
            assert "all_weights" not in entry
            continue
        every = entry["all_weights"]
        assert set(every["metrics"]) == {"loss", "n_params", "surface_curvature", "average_gradient",
                                         "mean_absolute_gradient"}
        surface = load_surface(out / every["surface"])
        assert surface.meta["params"] == "all" and surface.losses.shape == (3, 3)
        if r["method"] == "lora-mu":  # both surfaces pass through the tuned weights: the same loss at the centre
            lora = load_surface(out / entry["surface"])
            assert every["metrics"]["n_params"] > n_base > entry["metrics"]["n_params"]
            assert surface.losses[1, 1] == pytest.approx(lora.losses[1, 1], rel=1e-5)
            assert not np.allclose(surface.losses, lora.losses)
        else:
            assert every["metrics"]["n_params"] == n_base and "skipped" in entry
    md = (out / "results.md").read_text()
    assert "## Loss surface over the LoRA directions and over all weights" in md
    assert (out / "surfaces_lora_vs_all.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(line.startswith("| lora-mu | 0 |") for line in md.splitlines()) == 2  # LoRA and all weights rows


def _lora_parameters(adapter):
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors")).items()


def test_landscape_left_line_estimates_from_the_measured_runs(tmp_path):
    """The landscape step's progress line: runs measured out of all, and the time left as the mean seconds of each
    kind of measurement (LoRA directions, all weights) times what is left of it, over the workers; a run without
    trained weights costs nothing when only the trainable directions are measured."""
    import json

    from forgetless.landscape import LandscapeSettings
    from forgetless.landscape_runs import _todo, left_line

    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    settings = LandscapeSettings(all_weights_seeds=[0])
    records = {"a": 0, "b": 0, "c": 1, "base": 1}  # run -> seed
    def record(rid, seed, **more):  # the fields every run record has (read_record checks them)
        return json.dumps({"run_id": rid, "method": rid, "task": "t", "seed": seed, "general_ppl": 10.0, "tasks": {},
                           **more})

    for rid, seed in records.items():
        (out / "runs" / f"{rid}.json").write_text(record(rid, seed))
        if rid != "base":
            (out / "adapters" / rid).mkdir(parents=True)
            (out / "adapters" / rid / "adapter_config.json").write_text(json.dumps({"run": rid}))  # distinct models
    assert left_line(out, "m", settings, 128) == (
        "0/4 runs' flatness measured; the time left is estimated once a measurement of each kind has finished")
    digests = _todo(out, "m", settings, 128, None)[2]
    measured = json.loads(record("a", 0, landscape={"digest": digests["main"], "seconds": 100.0,
                                                     "all_weights": {"digest": digests["every"], "seconds": 40.0}}))
    (out / "runs" / "a.json").write_text(json.dumps(measured))
    # left: b (LoRA 100 s + all weights 40 s), c (LoRA 100 s), base (seed 1: skipped at once) = 240 s
    assert left_line(out, "m", settings, 128) == "1/4 runs' flatness measured; about 4 min left"
    assert left_line(out, "m", settings, 128, workers=2) == "1/4 runs' flatness measured; about 2 min left"
    assert left_line(out, "m", settings, 128, jobs_hint=True) == (
        "1/4 runs' flatness measured; about 4 min left (with --jobs N, about 1/N of it)")
    measured["landscape"].pop("all_weights")
    (out / "runs" / "a.json").write_text(json.dumps(measured))  # a needs its all-weights surface again
    assert left_line(out, "m", settings, 128) == (
        "0/4 runs' flatness measured; about 3 min left besides 2 measurement(s) of a kind not timed yet")


def test_the_shifted_iteration_runs_until_the_top_eigenvalue_itself_has_converged():
    """After a shift by a large negative dominant eigenvalue (-100), convergence was judged against the shifted value
    (|lambda_1| + lambda_max ~ 105), so the iteration stopped at 4.34 for a true top of 5.0 here, at the default
    tolerance and with 1000 iterations allowed. Judged against the top eigenvalue itself it gets there, and its own residual
    says it is an eigenpair; with too few iterations that residual says it is not."""
    spectrum = [-100.0, 5.0, 4.5, 4.0] + list(np.linspace(-3.0, 3.0, 36))
    obj = quadratic_objective(symmetric(spectrum, seed=2), torch.zeros(len(spectrum), dtype=torch.float64))
    found = metrics.hessian_eigenvalues(obj, iters=1000)
    assert found["dominant"] == pytest.approx(-100.0, rel=1e-4)
    assert found["top"] == pytest.approx(5.0, rel=2e-3) and found["top_residual"] <= 0.01  # sqrt(tol)
    early = metrics.hessian_eigenvalues(obj, iters=10)
    assert early["top"] < 4.0 and early["top_residual"] > 0.1  # not converged, and it says so


def test_trace_probes_of_different_seeds_are_different():
    """Seeds s and s + 1 shared all probes but one (seed + 1000 + k): their trace estimates were not independent."""
    obj = quadratic_objective(symmetric([3.0, 1.0, -2.0, 0.5], seed=1), torch.zeros(4, dtype=torch.float64))
    seeds = {s: {tuple(torch.cat(metrics._random_vector(obj, metrics.probe_seed(s, k), rademacher=True)).tolist())
                 for k in range(24)} for s in (0, 1)}
    seeds_2d = {s: [metrics.probe_seed(s, k) for k in range(24)] for s in (0, 1)}
    assert not set(seeds_2d[0]) & set(seeds_2d[1])
    assert len(seeds[0]) > 1 and seeds[0] != seeds[1]


@pytest.mark.parametrize("name", list(SPECTRA))
def test_lanczos_is_exact_once_it_has_spanned_the_space(name):
    """n Lanczos steps on an n-dimensional quadratic span the whole space: the Ritz values are the eigenvalues and
    the residuals 0; the smallest algebraic eigenvalue comes with them."""
    spectrum, (top, dominant) = SPECTRA[name]
    obj = quadratic_objective(symmetric(spectrum), torch.linspace(-1, 1, len(spectrum), dtype=torch.float64))
    got = metrics.hessian_lanczos(obj, steps=len(spectrum) + 3)
    assert got["top"] == pytest.approx(top, rel=1e-9, abs=1e-9)
    assert got["dominant"] == pytest.approx(dominant, rel=1e-9)
    assert got["bottom"] == pytest.approx(min(spectrum), rel=1e-9)
    assert max(got["top_residual"], got["dominant_residual"], got["bottom_residual"]) < 1e-8


def _two_sided_clustered(n=300):
    """A spectrum like the SAM-trained models': the smallest eigenvalue -3.8, larger in magnitude than the top 1.6,
    which sits in a cluster (1.6, 1.59, 1.58, 1.57), above a bulk in [-1, 1]."""
    rng = np.random.default_rng(0)
    spectrum = [-3.8, 1.6, 1.59, 1.58, 1.57] + list(rng.uniform(-1.0, 1.0, n - 5))
    return spectrum, quadratic_objective(symmetric(spectrum, seed=2), torch.zeros(n, dtype=torch.float64))


def test_lanczos_finds_the_top_of_a_two_sided_clustered_spectrum_where_the_power_iteration_does_not():
    """The same products (20 for Lanczos; 10 + 10 for the shifted power iteration, the experiment's setting):
    Lanczos has both ends to 1e-3 and says so with small residuals; the power iteration's top is off and its
    residual says that too."""
    spectrum, obj = _two_sided_clustered()
    lanczos = metrics.hessian_lanczos(obj, steps=20)
    assert lanczos["bottom"] == pytest.approx(-3.8, rel=1e-6) and lanczos["dominant"] == lanczos["bottom"]
    assert lanczos["top"] == pytest.approx(1.6, abs=1e-2) and lanczos["top"] <= 1.6 + 1e-12  # a Ritz value: inside
    assert lanczos["bottom_residual"] < 1e-4
    power = hessian_eigenvalues(obj, iters=10)
    assert abs(power["top"] - 1.6) > 5 * abs(lanczos["top"] - 1.6)
    assert power["top_residual"] > 10 * lanczos["top_residual"]


def test_the_lanczos_residuals_shrink_with_steps():
    spectrum, obj = _two_sided_clustered()
    few, more = metrics.hessian_lanczos(obj, steps=4), metrics.hessian_lanczos(obj, steps=40)
    assert more["top_residual"] < few["top_residual"] and more["bottom_residual"] < few["bottom_residual"]
    assert abs(more["top"] - 1.6) < abs(few["top"] - 1.6)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        metrics.hessian_lanczos(obj, steps=0)


def test_hessian_method_keeps_the_digests_recorded_before_it_and_is_validated():
    """The power iteration (the default until session 29, pinned by the recorded experiments' YAMLs) leaves the
    settings' digest as it was before the option existed (the value below was computed by the code before it), so
    recorded measurements are not measured again; lanczos, now the default, is another measurement; an unknown method
    is refused."""
    from forgetless.landscape import LandscapeSettings

    assert LandscapeSettings(hessian_method="power").digest() == "4e181bc209"
    assert LandscapeSettings().hessian_method == "lanczos"
    assert LandscapeSettings().digest() != LandscapeSettings(hessian_method="power").digest()
    with pytest.raises(ValueError, match="hessian_method must be 'power' or 'lanczos'"):
        LandscapeSettings(hessian_method="arnoldi")


def test_measure_flatness_with_lanczos_on_a_tiny_model():
    """Lanczos on a real (tiny) model's LoRA-free weights: top >= bottom, the top agrees with a long power iteration,
    and the smallest eigenvalue is recorded."""
    from forgetless.landscape import LandscapeSettings, measure_flatness
    from forgetless.landscape.objective import model_objective

    torch.manual_seed(0)
    model = make_tiny_model()
    examples = [{"input_ids": torch.randint(0, 50, (12,)), "labels": torch.randint(0, 50, (12,))} for _ in range(3)]
    settings = LandscapeSettings(params="all", grid=0, hessian_iters=60, hessian_method="lanczos", trace_samples=0,
                                 rho=0.0, precision="fp32")
    got, _ = measure_flatness(model, examples, settings)
    assert got["hessian_top_eigenvalue"] >= got["hessian_bottom_eigenvalue"]
    with model_objective(model, examples, "all", 4, "fp32") as objective:
        long = hessian_eigenvalues(objective, iters=400, tol=1e-12)
    assert got["hessian_top_eigenvalue"] == pytest.approx(long["top"], rel=1e-3)


def test_lanczos_ritz_values_and_residuals_equal_an_independent_krylov_projection():
    """Fewer steps than dimensions: the Ritz values and the relative residuals ||H y - theta y|| / |theta| of the top,
    bottom and dominant pairs equal those computed from scratch: an orthonormal basis Q of the Krylov space
    [v, Hv, ..., H^(m-1) v] (the same start v), T = Q^T H Q, y = Q s."""
    spectrum = [-4.0, 3.0, 2.5, 1.0, 0.5, -0.2, -1.5, 0.1, 2.0, -3.0, 0.7, 1.7]
    h = symmetric(spectrum, seed=4)
    obj = quadratic_objective(h, torch.zeros(len(spectrum), dtype=torch.float64))
    m = 5
    got = metrics.hessian_lanczos(obj, steps=m)
    v = torch.cat(metrics._random_vector(obj, 0))
    krylov = torch.stack([torch.linalg.matrix_power(h, k) @ v for k in range(m)], dim=1)
    q, _ = torch.linalg.qr(krylov)
    theta, s = torch.linalg.eigh(q.T @ h @ q)
    y = q @ s
    residual = [float(torch.linalg.vector_norm(h @ y[:, i] - theta[i] * y[:, i]) / abs(theta[i])) for i in range(m)]
    dom = int(torch.argmax(theta.abs()))
    assert got["top"] == pytest.approx(float(theta[-1]), rel=1e-9)
    assert got["bottom"] == pytest.approx(float(theta[0]), rel=1e-9)
    assert got["dominant"] == pytest.approx(float(theta[dom]), rel=1e-9)
    assert got["top_residual"] == pytest.approx(residual[-1], rel=1e-6)
    assert got["bottom_residual"] == pytest.approx(residual[0], rel=1e-6)
    assert got["dominant_residual"] == pytest.approx(residual[dom], rel=1e-6)
    assert min(residual) > 1e-3  # not converged at 5 steps: the residuals are tested, not a stop that zeroes them


def test_lanczos_on_a_diverged_loss_gives_nan_not_a_spectrum():
    h = symmetric([3.0, 1.0, -2.0])
    h[0, 0] = float("nan")
    obj = quadratic_objective(h, torch.zeros(3, dtype=torch.float64))
    got = metrics.hessian_lanczos(obj, steps=3)
    assert all(math.isnan(value) for value in got.values())


def test_the_all_weights_surface_keeps_its_digest_under_either_hessian_method():
    """The all-weights measurement computes no Hessian: switching to lanczos must not measure it again."""
    from forgetless.landscape import LandscapeSettings

    power = LandscapeSettings(all_weights_seeds=[0], hessian_method="power")
    lanczos = LandscapeSettings(all_weights_seeds=[0], hessian_method="lanczos")
    assert power.all_weights().digest() == lanczos.all_weights().digest()
    assert power.digest() != lanczos.digest()


def test_lanczos_that_would_not_fit_is_refused_before_any_work(monkeypatch):
    """The Lanczos basis is hessian_iters parameter-sized vectors: when that is more than half of the free memory
    (params: all on a large model) the measurement is refused with the numbers and the remedy, before a product is
    computed; the power iteration (two vectors) still runs."""
    from forgetless.landscape import LandscapeSettings, measure, measure_flatness

    torch.manual_seed(0)
    model = make_tiny_model()
    examples = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.randint(0, 50, (8,))}]
    n = sum(p.numel() for p in model.parameters())
    need = 12 * n * 4  # 10 steps + 2 in flight, float32
    monkeypatch.setattr(measure, "available_bytes", lambda device: 2 * need - 2)  # half of it is need - 1 bytes
    calls, swept = [], []
    monkeypatch.setattr(measure, "hessian_lanczos", lambda *a, **k: calls.append(1))
    real_surface = measure.compute_surface
    monkeypatch.setattr(measure, "compute_surface", lambda *a, **k: swept.append(1) or real_surface(*a, **k))
    settings = LandscapeSettings(params="all", grid=3, hessian_iters=10, trace_samples=0, rho=0.0)
    with pytest.raises(ValueError, match=rf"keeps 10 vectors of {n:,} parameters.*hessian_method: power"):
        measure_flatness(model, examples, settings)
    assert calls == [] and swept == []  # refused before the surface is swept
    monkeypatch.setattr(measure, "available_bytes", lambda device: 2 * need)  # exactly fits
    with pytest.raises(TypeError):  # reached the (stubbed) Lanczos, which returned None
        measure_flatness(model, examples, settings)
    assert calls == [1] and swept == [1]
    power, _ = measure_flatness(model, examples, replace(settings, hessian_method="power", hessian_iters=3))
    assert math.isfinite(power["hessian_top_eigenvalue"])


def test_available_bytes_reads_the_host_memory():
    from forgetless.landscape.measure import available_bytes

    free = available_bytes(torch.device("cpu"))
    if not os.path.exists("/proc/meminfo"):  # elsewhere it cannot be told (and the memory guard stands aside)
        assert free is None
        return
    assert isinstance(free, int) and 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
