"""forgetless.kernels: the fused Triton kernel gives the torch formula's numbers, alone and inside HLoRA's path integral.

Triton runs on CUDA; on a machine without a GPU the same kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``,
set before Triton is imported, hence a subprocess) where Triton is installed, and the tests skip where it is not
(the CPU install does not need it: HLoRA then takes the torch formula, which the other HLoRA tests cover). On a GPU
(``bench/gpu_session.sh``'s ``cudatests``, ``-k cuda``) they run in-process on the device.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
WHERE = ["cuda"] if torch.cuda.is_available() and HAVE_TRITON else ["interpreted"]


def hlora_kernels_failed() -> dict:
    """The kernels whose launch failed in this process: a failure falls back to the torch formula with a warning
    only, so a check that compares the two must also see that the kernels ran."""
    from forgetless import kernels

    return dict(kernels._FAILED)


_LAUNCHED: list[str] = []


def launches() -> list[str]:
    """The kernels launched in this process so far, by name (``accumulate``, ``weighted``): the numbers alone cannot
    tell a kernel from the torch formula it is checked against (a dispatcher that always took the formula passed)."""
    from forgetless import kernels

    if not getattr(kernels._kernel_or_formula, "counted", False):
        real = kernels._kernel_or_formula

        def counting(key, launch, formula):
            return real(key, lambda: _LAUNCHED.append(key[0]) or launch(), formula)

        counting.counted = True
        kernels._kernel_or_formula = counting
    return _LAUNCHED


def check_formula(device: str) -> None:
    """Every mode, a transposed accumulator, ranks below tl.dot's 16 and sizes that are no multiple of a tile."""
    from forgetless import kernels

    assert kernels.triton_enabled(device)
    launched = launches()
    g = torch.Generator().manual_seed(0)
    for n, rows, cols, k1, k2, transposed in [(2, 70, 90, 8, 8, False), (3, 33, 130, 32, 32, True),
                                              (1, 64, 64, 4, 32, False)]:
        for mode in kernels.MODES:
            l1, r1, l2, r2 = (torch.randn(shape, generator=g).to(device) for shape in
                              [(n, rows, k1), (n, k1, cols), (n, rows, k2), (n, k2, cols)])
            out = torch.randn((n, cols, rows) if transposed else (n, rows, cols), generator=g).to(device)
            want = kernels._torch_formula(out.clone(), l1, r1, l2, r2, mode, transposed)
            got = kernels.lowrank_product_accumulate_(out.clone(), l1, r1, l2, r2, mode, transposed)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), (mode, transposed)
            if mode == "add_then_clamp":
                assert (got >= 0).all()
    # a non-finite product stays non-finite in every mode, as in torch (max(NaN, 0) is NaN, not 0)
    ones, r1 = torch.ones(1, 2, 1, device=device), torch.tensor([[[float("nan"), 1.0, float("inf")]]], device=device)
    r2 = torch.tensor([[[1.0, 1.0, 0.0]]], device=device)
    for mode in kernels.MODES:
        want = kernels._torch_formula(torch.zeros(1, 2, 3, device=device), ones, r1, ones, r2, mode, False)
        got = kernels.lowrank_product_accumulate_(torch.zeros(1, 2, 3, device=device), ones, r1, ones, r2, mode)
        assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any(), (mode, got, want)
    with pytest.raises(ValueError, match="shapes do not fit"):
        kernels.lowrank_product_accumulate_(torch.zeros(1, 3, 4), torch.zeros(1, 4, 2), torch.zeros(1, 2, 3),
                                            torch.zeros(1, 4, 2), torch.zeros(1, 2, 3))
    assert not hlora_kernels_failed(), hlora_kernels_failed()  # the kernel ran each time
    assert launched == ["accumulate"] * (3 * len(kernels.MODES) + len(kernels.MODES)), launched


def check_hlora(device: str) -> None:
    """A general stage's importance with the kernel equals the torch path's, for every nonnegative rule, and for a
    GPT-2 model (fan_in_fan_out: weights stored [in, out])."""
    import forgetless.methods.hlora as hlora
    from forgetless.methods.hlora import HLoRA
    from forgetless.training.loop import TrainConfig, train_stage
    from tests.unit.test_lora_toolkit import tiny_gpt2
    from tests.unit.tiny_model import make_lora_model, random_examples

    config = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, precision="fp32", progress=False)
    for nonnegative, build in [("end", lambda: make_lora_model(0, targets=("q_proj", "v_proj", "up_proj"))),
                               ("step", lambda: make_lora_model(0)), ("running", lambda: make_lora_model(0)),
                               ("none", lambda: tiny_gpt2().float())]:
        importance, calls = [], []
        real = hlora.lowrank_product_accumulate_
        hlora.lowrank_product_accumulate_ = lambda *a, **k: calls.append(1) or real(*a, **k)
        for use in ("1", "0"):
            os.environ["FORGETLESS_TRITON"] = use
            plugin = HLoRA(nonnegative=nonnegative)
            model = build().to(device)
            launches().clear()
            train_stage(model, random_examples(12, 8), config, [plugin], stage="general")
            importance.append({k: v.detach().cpu() for k, v in plugin.importance.items()})
            if use == "1":
                assert len(calls) == 3 * len(plugin.groups), (len(calls), nonnegative)  # one per group and step
            # each call launched the kernel (and only it: the importance takes no weighted products)
            assert launches() == (["accumulate"] * len(calls) if use == "1" else []), (use, launches())
        os.environ.pop("FORGETLESS_TRITON")
        hlora.lowrank_product_accumulate_ = real
        assert not hlora_kernels_failed(), hlora_kernels_failed()
        kernel, plain = importance
        assert kernel.keys() == plain.keys() and kernel
        for name, want in plain.items():
            assert want.abs().max() > 0, (nonnegative, name)
            assert torch.allclose(kernel[name], want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), (nonnegative,
                                                                                                         name)


def check_weighted_distance(device: str) -> None:
    """weighted_distance's value and factor gradients through the two kernels = through the torch formula: factor
    anchors with one scaling and with another, no anchor, fan_in_fan_out, a bfloat16 weight, coefficients."""
    from forgetless.lora import weighted_distance

    g = torch.Generator().manual_seed(1)
    for n, out, inp, r, fan, wdtype, anchor in [(3, 70, 90, 4, False, torch.float32, "same"),
                                               (2, 33, 130, 16, True, torch.float32, "other"),
                                               (2, 64, 40, 8, False, torch.bfloat16, None)]:
        a = torch.randn(n, r, inp, generator=g).to(device).requires_grad_()
        b = torch.randn(n, out, r, generator=g).to(device).requires_grad_()
        scale = torch.rand(n, 1, 1, generator=g).to(device) + 0.5
        weight = torch.rand((n, inp, out) if fan else (n, out, inp), generator=g).to(device, wdtype)
        coeff = torch.rand(n, generator=g).to(device)
        refs = {}
        if anchor is not None:
            ref_scale = scale if anchor == "same" else torch.rand(n, 1, 1, generator=g).to(device) + 0.5
            refs["ref_factors"] = (torch.randn(n, r, inp, generator=g).to(device),
                                   torch.randn(n, out, r, generator=g).to(device), ref_scale)
        results = []
        for use in ("1", "0"):
            os.environ["FORGETLESS_TRITON"] = use
            launches().clear()
            value = weighted_distance(a, b, scale, weight, coeff, fan, **refs)
            results.append((value.detach(), *torch.autograd.grad(value, [a, b])))
            assert ("weighted" in launches()) == (use == "1"), (use, launches())
        os.environ.pop("FORGETLESS_TRITON")
        assert not hlora_kernels_failed(), hlora_kernels_failed()
        for got, want in zip(*results):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), (n, out, inp, fan)


def check_near_the_anchor(device: str) -> None:
    """Near its anchor, dW - dW_ref is a difference of nearly equal products, where rounding shows most: the kernels'
    value and gradients (tf32x3 products) are as close to float64's as the float32 torch formula's, within a small
    factor (tf32x3's products are a few units of float32's rounding less exact)."""
    from forgetless.lora import weighted_distance

    g = torch.Generator().manual_seed(2)
    n, out, inp, r = 2, 96, 80, 16
    a, b = torch.randn(n, r, inp, generator=g, dtype=torch.float64), torch.randn(n, out, r, generator=g,
                                                                                  dtype=torch.float64)
    ref = (a + 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64),
           b + 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64))
    scale = torch.full((n, 1, 1), 2.0, dtype=torch.float64)
    weight = torch.rand(n, out, inp, generator=g, dtype=torch.float64)
    results = []
    for use, dtype in (("0", torch.float64), ("1", torch.float32), ("0", torch.float32)):
        os.environ["FORGETLESS_TRITON"] = use
        x, y = (t.to(device, dtype).requires_grad_() for t in (a, b))
        launches().clear()
        value = weighted_distance(x, y, scale.to(device, dtype), weight.to(device, dtype), None, False,
                                  ref_factors=(ref[0].to(device, dtype), ref[1].to(device, dtype), scale.to(device)))
        results.append([t.detach().double().cpu() for t in (value, *torch.autograd.grad(value, [x, y]))])
        assert ("weighted" in launches()) == (use == "1"), (use, dtype, launches())
    os.environ.pop("FORGETLESS_TRITON")
    assert not hlora_kernels_failed(), hlora_kernels_failed()
    exact, kernel, formula = results
    for want, got, plain in zip(exact, kernel, formula):
        err, plain_err = (float((t - want).abs().max() / want.abs().max()) for t in (got, plain))
        assert err <= 8 * max(plain_err, 1e-7), (err, plain_err)


def check_penalties(device: str) -> None:
    """HLoRA's and EWC's domain stages train to the same adapter with the kernels as without (to rounding)."""
    from forgetless.methods import resolve
    from forgetless.training.loop import TrainConfig, train_stage
    from tests.unit.tiny_model import make_lora_model, random_examples

    import forgetless.lora as lora

    config = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, precision="fp32", progress=False)
    real = lora.weighted_products
    for entry in ({"name": "hlora", "phi": 1e3}, {"name": "ewc", "lambda": 1e3, "samples": 8}):
        adapters, calls = [], []
        lora.weighted_products = lambda *a, **k: calls.append(1) or real(*a, **k)
        for use in ("1", "0"):
            os.environ["FORGETLESS_TRITON"] = use
            plugins = resolve(entry).plugins
            model = make_lora_model(0, targets=("q_proj", "v_proj", "up_proj")).to(device)
            general = random_examples(12, 8, seed=1)
            train_stage(model, general, config, plugins, stage="general")
            launches().clear()
            train_stage(model, random_examples(12, 8, seed=2), config, plugins, stage="domain",
                        general_examples=general)
            assert (launches().count("weighted") == 9) == (use == "1"), (entry["name"], use, launches())
            adapters.append({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad})
            if use == "1":
                assert len(calls) == 3 * 3, (entry["name"], len(calls))  # every step, 3 groups (q, v, up differ)
        os.environ.pop("FORGETLESS_TRITON")
        lora.weighted_products = real
        assert not hlora_kernels_failed(), hlora_kernels_failed()
        for name, want in adapters[1].items():
            assert torch.allclose(adapters[0][name], want, rtol=1e-4, atol=1e-6), (entry["name"], name)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (the CPU install does not need it)")
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("check", ["check_formula", "check_hlora", "check_weighted_distance", "check_near_the_anchor",
                                   "check_penalties"])
def test_the_kernel_gives_the_torch_formulas_numbers(where, check):
    if where == "cuda":
        globals()[check]("cuda")
        return
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"from tests.unit.test_kernels import {check}; {check}('cpu')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_without_triton_or_when_switched_off_the_torch_formula_runs(monkeypatch):
    """The CPU path (no interpreter) and ``FORGETLESS_TRITON=0`` take the torch formula: the same function."""
    from forgetless import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.triton_enabled("cpu")
    monkeypatch.setenv("FORGETLESS_TRITON", "0")
    assert not kernels.triton_enabled("cuda")
    out = torch.ones(1, 2, 3)
    kernels.lowrank_product_accumulate_(out, torch.ones(1, 2, 1), torch.ones(1, 1, 3), torch.full((1, 2, 1), -2.0),
                                        torch.ones(1, 1, 3), mode="add_then_clamp")
    assert torch.equal(out, torch.zeros(1, 2, 3))  # max(1 + 1 * -2, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        kernels.lowrank_product_accumulate_(out, torch.ones(1, 2, 1), torch.ones(1, 1, 3), torch.ones(1, 2, 1),
                                            torch.ones(1, 1, 3), mode="sum")


def test_a_kernel_that_cannot_compile_falls_back_to_the_formula_once_said(monkeypatch):
    """A Triton that cannot compile a kernel (another version, another GPU, a large rank's tiles) must not stop a run:
    one warning per kernel and block sizes, the torch formula's numbers, and the formula from then on for those."""
    import warnings

    from forgetless import kernels

    class Broken:
        launches = 0

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                Broken.launches += 1
                raise RuntimeError("cannot compile")
            return launch

    fake_triton = type("T", (), {"cdiv": staticmethod(lambda a, b: -(-a // b))})
    monkeypatch.setattr(kernels, "_triton", lambda: (fake_triton, None, {name: Broken() for name in
                                                                          ("accumulate", "projection", "left_product")}))
    monkeypatch.setattr(kernels, "_FAILED", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.triton_enabled("cpu")
    g = torch.Generator().manual_seed(0)
    l1, r1 = torch.randn(1, 5, 2, generator=g), torch.randn(1, 2, 7, generator=g)
    out = torch.randn(1, 5, 7, generator=g)
    want = kernels._torch_formula(out.clone(), l1, r1, l1, r1, "add", False)
    with pytest.warns(UserWarning, match="accumulate .*failed to compile or launch .*RuntimeError: cannot compile"):
        got = kernels.lowrank_product_accumulate_(out.clone(), l1, r1, l1, r1)
    assert torch.equal(got, want) and list(kernels._FAILED) == [("accumulate", 64, 64, 16, 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second call takes the formula without trying again
        assert torch.equal(kernels.lowrank_product_accumulate_(out.clone(), l1, r1, l1, r1), want)
    assert Broken.launches == 1
    weight, b = torch.rand(1, 5, 7, generator=g), torch.randn(1, 5, 3, generator=g)
    with pytest.warns(UserWarning, match="weighted"):  # another kernel: its own failure, its own warning
        got = kernels.weighted_products(l1, r1, weight, b)
    assert all(torch.equal(x, y) for x, y in zip(got, kernels._weighted_formula(l1, r1, weight, b, False)))
    assert len(kernels._FAILED) == 2 and Broken.launches == 2


def test_the_kernels_entry_points_check_every_shape_and_device():
    """A kernel trusts its arguments' shapes (a mismatch would read out of bounds, on a GPU an illegal access the
    fallback cannot catch), so each entry point checks every stack's dimensions and that all share one device,
    before choosing the kernel or the formula."""
    from forgetless import kernels

    z = torch.zeros
    with pytest.raises(ValueError, match="r1 is \\(1, 2, 7\\), expected \\(1, 4, \\*\\)"):  # inner sizes differ
        kernels.lowrank_product_accumulate_(z(1, 5, 7), z(1, 5, 4), z(1, 2, 7), z(1, 5, 4), z(1, 4, 7))
    with pytest.raises(ValueError, match="l2 is \\(2, 5, 4\\)"):  # another number of modules
        kernels.lowrank_product_accumulate_(z(1, 5, 7), z(1, 5, 4), z(1, 4, 7), z(2, 5, 4), z(2, 4, 7))
    with pytest.raises(ValueError, match="right is \\(1, 4, 6\\), expected \\(3, 4, \\*\\)"):  # no broadcasting
        kernels.weighted_products(z(3, 8, 4), z(1, 4, 6), z(3, 8, 6), None)
    with pytest.raises(ValueError, match="b is \\(3, 7, 2\\)"):
        kernels.weighted_products(z(3, 8, 4), z(3, 4, 6), z(3, 8, 6), z(3, 7, 2))
    with pytest.raises(ValueError, match="right is \\(4, 6\\)"):  # 2-D: not a stack
        kernels.weighted_products(z(3, 8, 4), z(4, 6), z(3, 8, 6), None)
    with pytest.raises(ValueError, match="several devices .*weight on meta"):
        kernels.weighted_products(z(3, 8, 4), z(3, 4, 6), z(3, 8, 6, device="meta"), None)
    projected, product = kernels.weighted_products(z(3, 8, 4), z(3, 4, 6), z(3, 6, 8), z(3, 8, 2), transposed=True)
    assert projected.shape == (3, 8, 4) and product.shape == (3, 2, 6)


def test_weighted_distance_under_autocast_is_the_distance_without_it():
    """weighted_distance computes in its factors' dtype whatever autocast is on around it (its products wrote
    float32 buffers, and under bf16 autocast the torch path raised a dtype error)."""
    from forgetless.lora import weighted_distance

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 12, generator=g).requires_grad_(), torch.randn(2, 10, 4, generator=g).requires_grad_()
    scale, weight = torch.full((2, 1, 1), 0.5), torch.rand(2, 10, 12, generator=g)
    ref = (torch.randn(2, 4, 12, generator=g), torch.randn(2, 10, 4, generator=g), scale)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            value = weighted_distance(a, b, scale, weight, None, False, ref_factors=ref)
        results.append((value, *torch.autograd.grad(value, [a, b])))
    for plain, autocast in zip(*results):
        assert autocast.dtype == torch.float32 and torch.equal(plain, autocast)
