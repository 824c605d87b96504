"""One contract over every method of the registry, one table (as PEFT's ``tests/test_custom_models.py`` TEST_CASES).

For each method: it builds from its defaults; it composes with ``sam`` (two forward passes per micro-batch wherever
SAM is on, one elsewhere); its state survives ``save_state`` / a fresh plugin's ``load_state``; and a run whose
general stage comes from the experiment's cache trains the very same domain stage as a run that trained the general
stage in-process. The last check is what catches a method that carries state from one stage to the next without
saving it: its cached runs silently differ (see ``test_the_cache_check_catches_a_method_that_forgets_its_state``).

A new method must get a row in ``CASES``; ``test_the_table_covers_the_registry`` fails until it has one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

from forgetless.methods import DOMAIN, GENERAL, REGISTRY, Recipe, resolve
from forgetless.methods.ewc import FILENAME as EWC_FILE
from forgetless.methods.hlora import FILENAME as HLORA_FILE
from forgetless.methods.wise_ft import FILENAME as WISE_FT_FILE
from forgetless.models import LoraSettings, attach_lora
from forgetless.training.hooks import Method
from forgetless.training.loop import TrainConfig, train_stage
from tests.unit.tiny_model import make_tiny_model, random_examples

BOTH = (GENERAL, DOMAIN)


@dataclass(frozen=True)
class Case:
    name: str
    stages: tuple[str, ...]  # what resolve(name) runs
    plugin: bool  # whether the name builds a plugin
    state_files: tuple[str, ...] = ()  # what save_state writes after the general stage (empty: stateless)


CASES = [
    Case("base", (), plugin=False),
    Case("lora-mu", (DOMAIN,), plugin=False),
    Case("lora-nu-mu", BOTH, plugin=False),
    Case("rslora", BOTH, plugin=False),
    Case("hlora", BOTH, plugin=True, state_files=(HLORA_FILE,)),
    Case("hlora-no-layer", BOTH, plugin=True, state_files=(HLORA_FILE,)),
    Case("ewc", BOTH, plugin=True, state_files=(EWC_FILE,)),
    Case("sam", BOTH, plugin=True),
    Case("replay", BOTH, plugin=True),
    Case("wise-ft", BOTH, plugin=True, state_files=(WISE_FT_FILE,)),
]


def cases(keep: Callable[[Case], bool] = lambda case: True) -> list:
    return [pytest.param(case, id=case.name) for case in CASES if keep(case)]


GENERAL_DATA = random_examples(12, 10, seed=0)
DOMAIN_DATA = random_examples(12, 10, seed=1, prompt=3)


def config(steps: int, grad_accum: int = 1) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=4, grad_accum=grad_accum, lr=1e-2, precision="fp32", progress=False)


def model_for(recipe: Recipe) -> torch.nn.Module:
    torch.manual_seed(0)  # LoRA's A
    return attach_lora(make_tiny_model(), replace(LoraSettings(r=4, alpha=8, dropout=0.0), **recipe.lora))


class CallCounter(Method):
    """Counts the calls of the forward/backward it wraps, per stage: placed first in the list it wraps the loop's
    own (one call = one forward pass), placed last it wraps everything (one call = one micro-batch)."""

    def __init__(self):
        self.calls = {GENERAL: 0, DOMAIN: 0}
        self.windows: dict[str, list[int]] = {}

    def wrap_forward_backward(self, ctx, forward_backward):
        def counted(batch):
            self.calls[ctx.stage] += 1
            if ctx.micro == 0:  # the micro-batches of each optimizer step
                self.windows.setdefault(ctx.stage, []).append(ctx.grad_accum)
            return forward_backward(batch)

        return counted


def assert_same_history(got: list[dict], want: list[dict]) -> None:
    """The same steps with the same logged scalars (loss, method terms, lr), to float32 rounding."""
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys(), step
        assert g == pytest.approx(w, rel=1e-6, abs=1e-12), step


def _variant_weights(plugins, model) -> dict[str, torch.Tensor]:
    out = {}
    for plugin in plugins:
        for label, setup in plugin.evaluation_variants(model):
            with setup:
                out[label] = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    return out


# ------------------------------------------------------------------------------------------------------ table
def test_the_table_covers_the_registry():
    assert sorted(c.name for c in CASES) == sorted(REGISTRY)


@pytest.mark.parametrize("case", cases())
def test_builds_from_its_defaults(case):
    recipe = resolve(case.name)
    assert recipe.label == case.name and recipe.stages == case.stages
    assert len(recipe.plugins) == int(case.plugin)
    if case.plugin:
        plugin, = recipe.plugins
        assert isinstance(plugin, Method) and repr(plugin)
        assert resolve(case.name).plugins[0] is not plugin  # every run gets its own plugin, its own state


@pytest.mark.parametrize("case", cases(lambda c: c.plugin))
def test_is_refused_twice_in_one_composition(case):
    """[hlora, hlora] or [ewc, {name: ewc, lambda: 5}] resolved: each copy's penalty was added to the loss (doubled),
    SAM perturbed twice, and both wrote one state file; a composition now holds each plugin kind once."""
    kind = type(resolve(case.name).plugins[0]).__name__
    with pytest.raises(ValueError, match=f"{kind} twice in one composition"):
        resolve([case.name, case.name])
    twins = [other.name for other in CASES if other.plugin and other.name != case.name
             and type(resolve(other.name).plugins[0]).__name__ == kind]  # hlora and hlora-no-layer: both HLoRA
    for other in twins:
        with pytest.raises(ValueError, match=f"{kind} twice"):
            resolve([case.name, other])


# ------------------------------------------------------------------------------------------- composes with SAM
@pytest.mark.parametrize("case", cases(lambda c: c.name != "sam"))
def test_composes_with_sam(case):
    if not case.stages:
        with pytest.raises(ValueError, match="training stage"):  # nothing for SAM to act on
            resolve([case.name, "sam"])
        return
    recipe = resolve([case.name, "sam"])
    assert recipe.label == f"{case.name}+sam" and recipe.stages == case.stages
    assert [type(p).__name__ for p in recipe.plugins][-1] == "SAM"
    passes, micro_batches = CallCounter(), CallCounter()
    plugins = [passes, *recipe.plugins, micro_batches]
    model = model_for(recipe)
    results = {}
    for stage in recipe.stages:
        results[stage] = train_stage(model, GENERAL_DATA if stage == GENERAL else DOMAIN_DATA,
                                     config(2, grad_accum=2), plugins, stage=stage, general_examples=GENERAL_DATA)
    # 12 examples in batches of 4 are 3 micro-batches an epoch: a step of 2 accumulated, then the epoch's short one
    # (replay adds general examples: 4 micro-batches, two steps of 2)
    windows = micro_batches.windows[DOMAIN]
    assert windows == ([2, 2] if case.name == "replay" else [2, 1]) and micro_batches.calls[DOMAIN] == sum(windows)
    assert passes.calls[DOMAIN] == 2 * micro_batches.calls[DOMAIN]  # SAM: ascent pass + pass at w + eps
    assert all("sam_grad_norm" in row for row in results[DOMAIN].history)
    if GENERAL in recipe.stages:  # SAM is off on the general stage by default
        assert passes.calls[GENERAL] == micro_batches.calls[GENERAL] == 2 + 1
    assert all(torch.isfinite(torch.tensor(row["loss"])) for r in results.values() for row in r.history)


# ------------------------------------------------------------------------------------ state: save / load
@pytest.mark.parametrize("case", cases(lambda c: c.plugin and GENERAL in c.stages))
def test_saves_and_loads_its_state(case, tmp_path):
    recipe = resolve(case.name)
    plugin, = recipe.plugins
    model = model_for(recipe)
    train_stage(model, GENERAL_DATA, config(3), [plugin], stage=GENERAL)
    plugin.save_state(tmp_path / "state")
    written = sorted(p.name for p in (tmp_path / "state").iterdir()) if (tmp_path / "state").exists() else []
    assert written == sorted(case.state_files)

    fresh, = resolve(case.name).plugins
    fresh.load_state(tmp_path / "state")
    loaded_model = copy.deepcopy(model)
    kept = train_stage(model, DOMAIN_DATA, config(3), [plugin], stage=DOMAIN, general_examples=GENERAL_DATA)
    loaded = train_stage(loaded_model, DOMAIN_DATA, config(3), [fresh], stage=DOMAIN, general_examples=GENERAL_DATA)
    assert_same_history(loaded.history, kept.history)
    for (name, a), (_, b) in zip(model.named_parameters(), loaded_model.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), name
    kept_variants, loaded_variants = _variant_weights([plugin], model), _variant_weights([fresh], loaded_model)
    assert kept_variants.keys() == loaded_variants.keys()
    for label in kept_variants:
        assert torch.allclose(kept_variants[label], loaded_variants[label], rtol=1e-6, atol=1e-9), label
    fresh.save_state(tmp_path / "again")  # what was loaded can be saved again
    again = sorted(p.name for p in (tmp_path / "again").iterdir()) if (tmp_path / "again").exists() else []
    assert again == sorted(case.state_files)


# ------------------------------------------------------------------ the experiment's cache of general stages
def run_twice(make_recipe: Callable[[], Recipe], tmp_path) -> tuple:
    """The same run twice through ``run_recipe`` with one general-stage cache: trained, then loaded."""
    from forgetless.pipeline import RunData, RunSettings, run_recipe

    data = RunData(general_train=GENERAL_DATA, domain_train=DOMAIN_DATA,
                   heldout_blocks=torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(7)),
                   eval_tasks={})
    settings = RunSettings(model="tiny", lora=LoraSettings(r=4, alpha=8, dropout=0.0), general=config(3),
                           domain=config(3), seed=0, eval_batch_size=4, precision="fp32", progress=False)
    cache = tmp_path / "stages" / "general"
    trained = run_recipe(make_recipe(), data, settings, general_cache=lambda: cache)
    assert (cache / "adapter_model.safetensors").is_file()
    loaded = run_recipe(make_recipe(), data, settings, general_cache=lambda: cache)
    return trained, loaded


def assert_same_domain_stage(trained, loaded) -> None:
    assert not trained.stages[0].get("cached") and loaded.stages[0].get("cached")
    assert [s["stage"] for s in trained.stages] == [s["stage"] for s in loaded.stages] == [GENERAL, DOMAIN]
    assert_same_history(loaded.stages[1]["history"], trained.stages[1]["history"])
    assert loaded.general_ppl == pytest.approx(trained.general_ppl, rel=1e-6)
    assert loaded.variants.keys() == trained.variants.keys()
    for label in trained.variants:
        assert loaded.variants[label]["general_ppl"] == pytest.approx(trained.variants[label]["general_ppl"], rel=1e-6)


@pytest.mark.parametrize("case", cases(lambda c: GENERAL in c.stages))
def test_a_cached_general_stage_gives_the_same_domain_stage(case, tmp_path, tiny_load_model):
    trained, loaded = run_twice(lambda: resolve(case.name), tmp_path)
    assert_same_domain_stage(trained, loaded)


class Forgetful(Method):
    """Carries what it learnt on the general stage (how many steps it saw) into the domain stage's loss, and has
    no save_state / load_state: from a cached general stage it starts the domain stage without it."""

    name = "forgetful"

    def __init__(self):
        self.general_steps = 0

    def after_optimizer_step(self, ctx):
        if ctx.stage == GENERAL:
            self.general_steps += 1

    def extra_loss(self, ctx, batch):
        if ctx.stage != DOMAIN:
            return None
        return 0.1 * self.general_steps * sum(p.square().sum() for _, p in ctx.trainable_parameters())


def test_the_cache_check_catches_a_method_that_forgets_its_state(tmp_path, tiny_load_model):
    def recipe():
        return Recipe(label="forgetful", stages=BOTH, lora={}, plugins=[Forgetful()], entries=[{"name": "forgetful"}])

    trained, loaded = run_twice(recipe, tmp_path)
    with pytest.raises(AssertionError):
        assert_same_domain_stage(trained, loaded)


def test_a_fisher_computed_at_a_shared_cached_stage_is_kept_beside_it(tmp_path, tiny_load_model, monkeypatch):
    """ewc shares lora-nu-mu's cached general stage, which has no Fisher: the first ewc run computes it when its domain
    stage starts and keeps it in the stage's folder (one file per Fisher options); the next run with those options
    reads it (no recomputation) and trains the same domain stage; other Fisher options compute and keep their own."""
    from forgetless.methods import ewc
    from forgetless.pipeline import RunData, RunSettings, run_recipe

    data = RunData(general_train=GENERAL_DATA, domain_train=DOMAIN_DATA, heldout_blocks=None, eval_tasks={})
    settings = RunSettings(model="tiny", lora=LoraSettings(r=4, alpha=8, dropout=0.0), general=config(3),
                           domain=config(3), seed=0, eval_batch_size=4, precision="fp32", progress=False)
    cache = tmp_path / "stages" / "general"
    run_recipe(resolve("lora-nu-mu"), data, settings, general_cache=lambda: cache)
    assert not list(cache.glob("ewc_fisher*"))
    computed = []
    real = ewc.fisher_diagonal
    monkeypatch.setattr(ewc, "fisher_diagonal", lambda *a, **k: computed.append(1) or real(*a, **k))
    first = run_recipe(resolve({"name": "ewc", "lambda": 5.0}), data, settings, general_cache=lambda: cache)
    kept = list(cache.glob("ewc_fisher-*.safetensors"))
    assert len(computed) == 1 and len(kept) == 1 and not (cache / ewc.FILENAME).exists()
    again = run_recipe(resolve({"name": "ewc", "lambda": 5.0}), data, settings, general_cache=lambda: cache)
    assert len(computed) == 1  # read, not recomputed
    assert_same_history(again.stages[1]["history"], first.stages[1]["history"])
    assert again.stages[1]["extras"]["importance_cost"]["ewc"]["kept"]
    assert again.stages[1]["extras"]["importance_cost"]["ewc"]["seconds"] == pytest.approx(
        first.stages[1]["extras"]["importance_cost"]["ewc"]["seconds"])
    run_recipe(resolve({"name": "ewc", "lambda": 1.0}), data, settings, general_cache=lambda: cache)  # lambda: same
    assert len(computed) == 1
    run_recipe(resolve({"name": "ewc", "samples": 2}), data, settings, general_cache=lambda: cache)  # other Fisher
    assert len(computed) == 2 and len(list(cache.glob("ewc_fisher-*.safetensors"))) == 2


def _domain_stage_weights(plugins: list) -> torch.Tensor:
    """The LoRA weights after a plain general stage and then a domain stage with ``plugins``."""
    model = model_for(resolve("lora-nu-mu"))
    train_stage(model, GENERAL_DATA, config(2), [], stage=GENERAL)
    train_stage(model, DOMAIN_DATA, config(3), plugins, stage=DOMAIN, general_examples=GENERAL_DATA)
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def _leaves_domain_stage(case: Case) -> bool:
    return case.plugin and DOMAIN in case.stages and not any(p.shapes_domain_stage() for p in resolve(case.name).plugins)


@pytest.mark.parametrize("case", cases(_leaves_domain_stage))
def test_a_method_that_says_it_leaves_the_domain_stage_alone_does(case):
    """shapes_domain_stage() False lets an experiment hand the run another run's cached domain stage
    (experiment.domain_stage_name): the stage it trains must then be the plain one, bit for bit."""
    assert torch.equal(_domain_stage_weights(resolve(case.name).plugins), _domain_stage_weights([]))


def test_the_domain_stage_check_catches_a_method_that_shapes_it():
    """The control: sam's domain stage is not the plain one, so the check above would fail for a method that
    wrongly said it leaves the stage alone."""
    assert not torch.equal(_domain_stage_weights(resolve("sam").plugins), _domain_stage_weights([]))


def test_a_misspelt_method_option_names_the_nearest_one_and_the_names():
    """The error listed every option with its full help (about 1,900 characters for hlora): the answer was buried."""
    with pytest.raises(ValueError) as info:
        resolve([{"name": "hlora", "phy": 1}])
    message = str(info.value)
    assert message.startswith("method 'hlora' has no option 'phy'; did you mean 'phi'? (phi (default 10.0, domain "
                              "stage): weight of the regularizer")
    assert message.endswith("its options: phi, phi_scale, xi, xi_mode, nonnegative, temperature, norm_scale, "
                            "layer_wise, estimator, storage_dtype, offload, adapter, snap_reference (README.md "
                            "describes them)") and len(message) < 400
    with pytest.raises(ValueError, match=r"has no option 'zzz'; its options: phi, "):
        resolve([{"name": "hlora", "zzz": 1}])
