"""``precision: auto``: bf16 autocast exactly where the hardware runs bf16 fast (a CUDA GPU that supports it, a CPU
with avx512_bf16 / amx_bf16), float32 elsewhere; and the training loop and evaluation follow that choice.

The hardware checks are monkeypatched both ways, so these tests mean the same on every machine.
"""

import pytest
import torch

from forgetless import precision
from forgetless.evaluation import perplexity
from forgetless.precision import autocast, resolve_precision
from forgetless.training.hooks import Method
from forgetless.training.loop import TrainConfig, train_stage
from tests.unit.tiny_model import make_lora_model, make_tiny_model, random_examples


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_is_bf16_exactly_when_the_cpu_has_native_bf16(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


def test_auto_on_cpu_follows_this_machine():
    assert resolve_precision("auto", "cpu") == ("bf16" if precision.cpu_supports_bf16() else "fp32")


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_cuda_is_bf16_exactly_when_the_gpu_supports_it(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", "cuda") == ("bf16" if supported else "fp32")
    assert resolve_precision("auto", torch.device("cuda", 0)) == ("bf16" if supported else "fp32")


def test_auto_on_cuda_ignores_emulated_bf16(monkeypatch):
    """A T4/V100 (sm 7.x): torch emulates bf16 there and counts it unless asked for native bf16 only; auto is fp32."""
    seen = []

    def emulating(including_emulation=True):
        seen.append(including_emulation)
        return including_emulation is not False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulating)
    assert resolve_precision("auto", "cuda") == "fp32"
    assert seen == [False]


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_cuda_with_a_torch_whose_check_has_no_emulation_argument(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert resolve_precision("auto", "cuda") == ("bf16" if supported else "fp32")


def test_explicit_choices_are_kept_and_others_rejected(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for device in ("cpu", "cuda"):
        assert resolve_precision("fp32", device) == "fp32"
        assert resolve_precision("bf16", device) == "bf16"
    assert resolve_precision("auto", "meta") == "fp32"  # a device we know nothing about: no autocast
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512_bf16 sse", True), ("fpu amx_bf16 amx_tile", True),
                                             ("fpu avx2 avx512f avx512bw", False), (None, False)])
def test_cpu_supports_bf16_reads_the_cpu_flags(monkeypatch, flags, expected):
    class FakePath:
        def __init__(self, path):
            assert str(path) == "/proc/cpuinfo"

        def read_text(self):
            if flags is None:
                raise OSError("no /proc here")  # e.g. macOS
            return f"processor\t: 0\nflags\t\t: {flags}\n"

    monkeypatch.setattr(precision, "Path", FakePath)
    assert precision.cpu_supports_bf16.__wrapped__() is expected


def test_autocast_runs_matmuls_in_bf16_only_for_bf16():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32


class _AutocastSeen(Method):
    """Records whether the loop's forward runs under CPU autocast, and in which dtype."""

    def __init__(self):
        self.seen = []

    def extra_loss(self, ctx, batch):  # called inside the loop's autocast region
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return None


@pytest.mark.parametrize("device", ["cpu"], indirect=True)  # the CPU's rule, on a GPU machine too
@pytest.mark.parametrize("native", [True, False])
def test_train_stage_auto_follows_the_cpu(monkeypatch, native, accelerator):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    seen = _AutocastSeen()
    train_stage(make_lora_model(), random_examples(4, 6), TrainConfig(max_steps=1, batch_size=4, progress=False),
                [seen], accelerator=accelerator)
    assert seen.seen == ([(True, torch.bfloat16)] if native else [(False, seen.seen[0][1])])
    seen.seen.clear()
    train_stage(make_lora_model(), random_examples(4, 6), TrainConfig(max_steps=1, batch_size=4, precision="fp32",
                                                                      progress=False), [seen],
                accelerator=accelerator)
    assert not seen.seen[0][0]  # fp32 asked: no autocast, whatever the CPU


@pytest.mark.parametrize("native", [True, False])
def test_perplexity_auto_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    model = make_tiny_model().eval()
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    perplexity(model, torch.randint(3, 64, (2, 6)), progress=False)
    assert seen[-1] is native  # the scoring pass (one batch); earlier calls may be HeadScorer's float32 probe
    seen.clear()
    perplexity(model, torch.randint(3, 64, (2, 6)), precision="fp32", progress=False)
    assert seen and not any(seen)


@pytest.mark.parametrize("run_precision, base_dtype", [("fp32", torch.float32), ("auto", torch.bfloat16)])
def test_a_run_loads_its_frozen_base_in_the_precision_it_computes_in(monkeypatch, tiny_model_dir, run_precision,
                                                                     base_dtype):
    """On hardware with bf16 a run on "auto" keeps its base in bf16; a run pinned to fp32 keeps it in float32."""
    import forgetless.pipeline as pipeline
    from forgetless.methods import resolve
    from forgetless.models import LoraSettings

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    real, loaded = pipeline.load_model, []

    def spy(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        loaded.append(model.get_input_embeddings().weight.dtype)
        return model, tokenizer

    monkeypatch.setattr(pipeline, "load_model", spy)
    data = pipeline.RunData(general_train=[], domain_train=[], eval_tasks={},
                            heldout_blocks=torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0)))
    settings = pipeline.RunSettings(model=str(tiny_model_dir), lora=LoraSettings(), general=TrainConfig(),
                                    domain=TrainConfig(), precision=run_precision, progress=False)
    pipeline.run_recipe(resolve("base"), data, settings)
    assert loaded == [base_dtype]
