"""rsLoRA: the method name switches PEFT to rank-stabilized scaling alpha / sqrt(r)."""

import math
from dataclasses import replace

import pytest

from forgetless.lora import lora_modules
from forgetless.methods import resolve
from forgetless.models import LoraSettings, attach_lora
from tests.unit.tiny_model import make_tiny_model


@pytest.mark.parametrize("r,alpha", [(4, 8.0), (16, 16.0)])
def test_rslora_scaling_is_alpha_over_sqrt_r(r, alpha):
    settings = LoraSettings(r=r, alpha=alpha, dropout=0.0)
    recipe = resolve("rslora")
    assert recipe.lora == {"use_rslora": True} and recipe.stages == ("general", "domain") and not recipe.plugins
    model = attach_lora(make_tiny_model(), replace(settings, **recipe.lora))
    plain = attach_lora(make_tiny_model(), replace(settings, **resolve("lora-nu-mu").lora))
    for (_, m), (_, p) in zip(lora_modules(model), lora_modules(plain)):
        assert m.scaling["default"] == pytest.approx(alpha / math.sqrt(r))
        assert p.scaling["default"] == pytest.approx(alpha / r)


def test_rslora_composes():
    assert resolve(["lora-mu", "rslora"]).stages == ("domain",)
    recipe = resolve(["hlora", "rslora"])
    assert recipe.lora == {"use_rslora": True} and recipe.label == "hlora+rslora" and len(recipe.plugins) == 1
