"""Fixtures shared by the test suite: devices and their tolerances, tiny random models, examples, stage contexts.

The builders themselves are plain functions in ``tests/unit/tiny_model.py`` (and the tokenizers in
``tiny_tokenizer.py`` / ``tiny_eval_helpers.py``), so that a script or a test that does not want a fixture can call
them; the fixtures below put them on the test's device.

``device`` runs a test once per device: ``cpu`` always, ``cuda`` where a GPU is present (skipped elsewhere). A test
that asks for ``lora_model``, ``tiny_model``, ``accelerator`` or ``tol`` is run on every device.

Usage::

    def test_something(lora_model, accelerator, examples, tol):
        model = lora_model(dtype=torch.float64)               # tiny Llama + LoRA on the test's device
        train_stage(model, examples, TrainConfig(precision="fp32", ...), accelerator=accelerator)
        assert x == pytest.approx(y, rel=tol(1e-6))         # 1e-6 on cpu; the device's floor elsewhere

Also: ``make_ctx`` (a StageContext to drive a method's hooks by hand), ``char_tokenizer``, ``tiny_model_dir`` (a
tiny model saved for ``load_model``), ``tiny_load_model`` (``pipeline.load_model`` patched to a tiny model).
Numbers are compared in float32: pass ``precision="fp32"`` (``auto`` picks bf16 on CPUs with native bf16).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from tests.unit.tiny_model import make_lora_model, make_tiny_model, random_examples

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------- parallel test workers
# `make test` runs the suite on pytest-xdist workers (TEST_WORKERS, 2 by default). Each worker then takes its share
# of the cores for torch's threads (two workers each running two threads on two cores oversubscribe them), and so
# do the processes a test starts. Tests that start processes of their own (two-process launches, experiment workers,
# the benchmark scripts) run one after another on one worker (group "processes"), so two of them never compete.
def _share_the_cores() -> None:
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:  # torch's own count of the cores it may use (what one process would have), shared out
        threads = max(1, torch.get_num_threads() // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


_share_the_cores()
PROCESS_MODULES = ("test_parallel_runs.py", "test_bench_gpu.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in PROCESS_MODULES or "two_processes" in item.name or "two_workers" in item.name:
            item.add_marker(pytest.mark.xdist_group("processes"))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]

# The smallest tolerance a comparison may use on each device, per dtype. On the CPU a test keeps its own bound; on
# CUDA cuBLAS orders its reductions differently (and may use TF32 for float32 matmuls where that is switched on), so
# a float32 result that matches a hand computation to 1e-6 on the CPU may be off by ~1e-4 there.
TOLERANCE_FLOOR: dict[str, dict[torch.dtype, float]] = {
    "cpu": {torch.float32: 0.0, torch.float64: 0.0},
    "cuda": {torch.float32: 1e-3, torch.float64: 1e-9},
}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def tol(device) -> Callable[..., float]:
    """``tol(bound, dtype=torch.float32)``: ``bound`` on the CPU, at least the device's floor elsewhere."""

    def bound(cpu_bound: float, dtype: torch.dtype = torch.float32) -> float:
        return max(cpu_bound, TOLERANCE_FLOOR[device.type][dtype])

    return bound


@pytest.fixture
def accelerator(device) -> Iterator:
    """An ``Accelerator`` on ``device``, for ``train_stage(..., accelerator=accelerator)``.

    ``train_stage`` alone picks CUDA whenever there is a GPU; this pins the test's device. accelerate keeps one
    process-wide state that refuses to change device, so it is reset before and after.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=device.type == "cpu")
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def tiny_model(device) -> Callable[..., torch.nn.Module]:
    """``tiny_model(seed=0, vocab_size=64)``: a tiny random Llama (2 layers, hidden 32) on ``device``."""

    def build(seed: int = 0, vocab_size: int = 64) -> torch.nn.Module:
        return make_tiny_model(seed, vocab_size).to(device)

    return build


@pytest.fixture
def lora_model(device) -> Callable[..., torch.nn.Module]:
    """``lora_model(seed=0, r=4, alpha=8, targets=("q_proj", "v_proj"), dtype=float32, use_rslora=False,
    b_std=None)``: the tiny Llama with LoRA (no dropout) on ``device``; see ``make_lora_model``."""

    def build(seed: int = 0, **kwargs) -> torch.nn.Module:
        return make_lora_model(seed, **kwargs).to(device)

    return build


@pytest.fixture
def examples() -> list[dict]:
    """8 random examples of 8 tokens (ids 3..63, every token with a loss); ``random_examples`` for other shapes."""
    return random_examples(8, 8)


@pytest.fixture
def make_ctx() -> Callable[..., object]:
    """``make_ctx(stage="domain", model=None, optimizer=None, lr=0.0, general_examples=None, seed=0, grad_accum=1,
    accelerator=None)``: a :class:`StageContext` as the loop builds it, for driving a method's hooks by hand.

    With a model and no optimizer, a plain SGD (no momentum) with learning rate ``lr`` over its trainable
    parameters stands in for one.
    """
    from forgetless.training.config import TrainConfig
    from forgetless.training.hooks import StageContext

    def build(stage: str = "domain", model: torch.nn.Module | None = None, optimizer=None, lr: float = 0.0,
              general_examples=None, seed: int = 0, grad_accum: int = 1, accelerator=None) -> StageContext:
        if optimizer is None and model is not None:
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        return StageContext(stage=stage, model=model, optimizer=optimizer, scheduler=None, accelerator=accelerator,
                            config=TrainConfig(seed=seed, precision="fp32", progress=False), grad_accum=grad_accum,
                            general_examples=general_examples)

    return build


@pytest.fixture
def char_tokenizer():
    """A character-level tokenizer of 49 ids, inside the tiny model's vocabulary of 64."""
    from tests.unit.tiny_eval_helpers import make_char_tokenizer

    return make_char_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama and the BPE tokenizer saved to a folder, as ``load_model`` reads a local model."""
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    folder = tmp_path / "tiny-model"
    make_tiny_model(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_load_model(monkeypatch) -> Callable[..., tuple]:
    """``forgetless.pipeline.load_model`` patched to return a fresh tiny model (BPE vocabulary, on the CPU as
    ``load_model`` loads) and the BPE tokenizer, whatever the name; returns that loader."""
    import forgetless.pipeline as pipeline
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    def load(name: str = "tiny", **options) -> tuple:
        tok = make_tiny_tokenizer()
        return make_tiny_model(vocab_size=len(tok)), tok

    monkeypatch.setattr(pipeline, "load_model", load)
    return load
