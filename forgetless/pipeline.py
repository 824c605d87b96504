"""One run, end to end: load model -> attach LoRA -> stage nu -> stage mu -> evaluate.

:func:`run_recipe` is the whole data flow of forgetless in one short function; the experiment runner
(:func:`forgetless.experiment.run_one`) calls it once per (method, domain task, seed), for ``forgetless run`` and
``forgetless train`` alike.

Nothing wrong is returned as a result: a non-finite training loss or gradient norm stops the stage
(:class:`~forgetless.training.loop.NonFiniteError`, unless ``on_nonfinite: skip_step``), a non-finite perplexity or
accuracy stops the run (:class:`NonFiniteScore`), and the adapter is saved only once every number is finite. A cached
general stage is loaded strictly (:func:`forgetless.models.load_adapter_weights`).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from forgetless.config import BASE_DEFAULTS
from forgetless.evaluation import evaluate_mc, perplexity
from forgetless.methods import DOMAIN, GENERAL, Recipe
from forgetless.models import (AdapterError, LoraSettings, attach_lora, is_quantized, load_adapter_weights, load_model,
                               save_adapter, weights_digest)
from forgetless.precision import default_device
from forgetless.training import checkpoint
from forgetless.training.hooks import Method
from forgetless.training.loop import StageResult, TrainConfig, train_stage
from forgetless.training.tracking import EvalEvery, best_within_drop


@dataclass
class RunData:
    """Everything a run trains and evaluates on, already tokenized."""

    general_train: list[dict]  # {input_ids, labels} blocks of general text (stage nu)
    domain_train: list[dict]  # {input_ids, labels} prompt+answer examples (stage mu)
    heldout_blocks: torch.Tensor | None  # [n, block] held-out general text for perplexity; None: no perplexity
    eval_tasks: dict[str, list]  # task name -> MCItems to score (may be empty)
    suite: dict[str, list] = field(default_factory=dict)  # general-suite task name -> MCItems (forgetting probes)


@dataclass
class RunSettings:
    model: str
    lora: LoraSettings
    general: TrainConfig
    domain: TrainConfig
    seed: int = 0
    eval_batch_size: int = 16
    precision: str = "auto"
    progress: bool = True
    dtype: str = "auto"  # the frozen base's dtype: auto = bf16 where the run computes in bf16 (models.resolve_dtype)
    quantization: str = "none"  # 4bit / 8bit base through bitsandbytes
    eval_every: int | None = None  # score fixed subsets every K domain steps (forgetting over training)
    every_items: int = 32  # items of each task in those subsets
    every_blocks: int = 4  # held-out blocks in them
    max_general_drop: float | None = None  # keep the best domain checkpoint within this general-suite drop
    share_prefix: bool = False  # multiple choice: each item one sequence, its context once (evaluate_mc)


@dataclass
class RunResult:
    method: str
    seed: int
    general_ppl: float | None  # None: no held-out text to evaluate on
    general_ppl_base2: float | None
    tasks: dict[str, dict[str, float]]  # task -> {acc, acc_norm, acc_stderr, acc_norm_stderr, n}
    stages: list[dict[str, Any]] = field(default_factory=list)  # per stage: steps, seconds, history
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. weight-interpolation points
    seconds: float = 0.0
    suite: dict[str, dict[str, float]] = field(default_factory=dict)  # general-suite task -> {acc, acc_norm, n, ...}
    selected: dict[str, Any] | None = None  # the checkpoint kept by eval.select: {step, scores, adapter, ...}
    computed: dict[str, Any] = field(default_factory=dict)  # how it ran: device, precision, base dtype (threads)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class NonFiniteScore(RuntimeError):
    """A perplexity or accuracy that is not a finite number: the model is broken (diverged); the run is not kept."""

    def __init__(self, what: str, value: Any) -> None:
        super().__init__(f"non-finite {what} ({value}) at evaluation: the model diverged; nothing was recorded")
        self.what, self.value = what, value


def check_finite(scores: dict[str, Any], where: str = "") -> None:
    """:class:`NonFiniteScore` for the first non-finite number of ``evaluate``'s scores (None: not evaluated)."""
    numbers = {"general PPL": scores["general_ppl"]}
    for kind in ("tasks", "suite"):
        for task, values in scores.get(kind, {}).items():
            numbers |= {f"{task} {k}": v for k, v in values.items() if k in ("acc", "acc_norm")}
    for what, value in numbers.items():
        if value is not None and not math.isfinite(value):
            raise NonFiniteScore(f"{what}{where}", value)


def evaluate(model: torch.nn.Module, tokenizer, data: RunData, settings: RunSettings) -> dict[str, Any]:
    """General perplexity (given held-out text), multiple-choice accuracy on the domain tasks and on the general
    suite (the lm-eval-identical scorer, :func:`~forgetless.evaluation.evaluate_mc`) of ``model`` as it is now."""
    scores: dict[str, Any] = {"general_ppl": None, "general_ppl_base2": None, "tasks": {}, "suite": {}}
    if data.heldout_blocks is not None:
        ppl = perplexity(model, data.heldout_blocks, batch_size=settings.eval_batch_size,
                         precision=settings.precision, progress=settings.progress)
        scores |= {"general_ppl": ppl.ppl, "general_ppl_base2": ppl.ppl_base2}
    for kind in ("tasks", "suite"):
        for name, items in getattr(data, "eval_tasks" if kind == "tasks" else "suite").items():
            scores[kind][name] = _mc_scores(model, tokenizer, items, settings, settings.progress)
    return scores


def _mc_scores(model, tokenizer, items: list, settings: RunSettings, progress: bool) -> dict[str, float]:
    if hasattr(items, "score"):  # an lm-evaluation-harness task (forgetless.evaluation.lmeval.HarnessTask)
        return items.score(model, tokenizer, batch_size=settings.eval_batch_size, precision=settings.precision,
                           progress=progress)
    mc = evaluate_mc(model, tokenizer, items, batch_size=settings.eval_batch_size, precision=settings.precision,
                     progress=progress, share_prefix=settings.share_prefix)
    return {"acc": mc.acc, "acc_norm": mc.acc_norm, "acc_stderr": mc.acc_stderr,
            "acc_norm_stderr": mc.acc_norm_stderr, "n": mc.n}


def _tracker(tokenizer, data: RunData, settings: RunSettings) -> EvalEvery | None:
    """The ``eval.every`` plugin of the domain stage (None when off): per row the domain accuracy (``domain_acc``,
    mean over the run's tasks), each suite task's (``suite/TASK``), their mean (``general_acc``) and the held-out
    perplexity (``general_ppl``), on the first ``every_items`` items and ``every_blocks`` blocks. A suite task whose
    main score is lower-is-better (a harness task that reports a perplexity) is logged as ``suite_lower/TASK`` and
    kept out of ``general_acc``: averaged in, a rising perplexity read as general ability improving (and
    ``eval.select`` chose by it)."""
    if settings.eval_every is None:
        return None
    k = settings.every_items

    def scores(model: torch.nn.Module, tasks: dict[str, list]) -> dict[str, dict]:
        return {n: _mc_scores(model, tokenizer, items[:k], settings, False) for n, items in tasks.items()}

    def score(model: torch.nn.Module) -> dict[str, float]:
        row: dict[str, float] = {}
        domain, suite = scores(model, data.eval_tasks), scores(model, data.suite)
        higher = {n: s["acc"] for n, s in suite.items() if s.get("higher_is_better", True)}
        if domain:
            row["domain_acc"] = statistics.fmean(s["acc"] for s in domain.values())
        row |= {f"suite_lower/{n}": s["acc"] for n, s in suite.items() if n not in higher}
        if higher:
            row |= {f"suite/{n}": a for n, a in higher.items()} | {"general_acc": statistics.fmean(higher.values())}
        if data.heldout_blocks is not None:
            row["general_ppl"] = perplexity(model, data.heldout_blocks[:settings.every_blocks],
                                            batch_size=settings.eval_batch_size, precision=settings.precision,
                                            progress=False).ppl
        return row

    choose = None
    if settings.max_general_drop is not None:
        if not data.suite or not data.eval_tasks:
            raise ValueError("select: needs a general suite and a domain test set to choose a checkpoint by")
        choose = best_within_drop("domain_acc", "general_acc", settings.max_general_drop)
    return EvalEvery(settings.eval_every, score, stages=(DOMAIN,), choose=choose)


def _stage_summary(result: StageResult) -> dict[str, Any]:
    summary = {"stage": result.stage, "steps": result.steps, "seconds": round(result.seconds, 3),
               "history": result.history}
    extras = {k: v for k, v in result.extras.items() if _json_safe(v)}
    if extras:  # what methods left for the report (e.g. HLoRA's layer coefficients)
        summary["extras"] = extras
    return summary


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def run_recipe(
    recipe: Recipe,
    data: RunData,
    settings: RunSettings,
    adapter_dir: Path | None = None,
    general_cache: Callable[[], Path] | None = None,
    checkpoint_dir: Path | None = None,
    domain_cache: Callable[[], Path] | None = None,
) -> RunResult:
    """Train ``recipe`` and evaluate it (on what ``data`` has to evaluate on; nothing when it has neither held-out
    text nor test items). ``general_cache()`` names a folder where a finished general stage (adapter plus method
    states) is kept and reused by other runs with the same general stage; ``domain_cache()`` the same for the domain
    stage (adapter and stage record), for a recipe whose methods do not shape it
    (:meth:`~forgetless.training.hooks.Method.shapes_domain_stage`): the caller keys it by everything that stage's
    training and its ``eval.every`` scores depend on. The adapter is saved to ``adapter_dir``
    after the evaluation, when every number is finite. With ``save_every`` in a stage's settings, the stage
    checkpoints into ``checkpoint_dir/<stage>`` and an interrupted run started again resumes from there."""
    started = time.perf_counter()
    model, tokenizer = load_model(settings.model, dtype=settings.dtype, precision=settings.precision,
                                  quantization=settings.quantization)
    if not is_quantized(model):  # evaluation (the base run too) on the run's device; a quantized base is placed
        model.to(default_device())
    computed = computed_in(model, settings)  # the base's device and dtype: LoRA and training change neither
    stages: list[dict[str, Any]] = []
    plugins, tracker = list(recipe.plugins), None
    if recipe.stages:
        lora = replace(settings.lora, **recipe.lora)
        from accelerate.utils import set_seed

        set_seed(settings.seed)  # LoRA's A is drawn from the global RNG: seed it, whatever ran before in this process
        model = _attach(model, lora)
        if GENERAL in recipe.stages:
            cache = general_cache() if general_cache else None
            if cache is not None and is_cached_stage(cache):
                load_adapter_weights(model, cache)
                for plugin in recipe.plugins:
                    plugin.load_state(cache)
                stages.append(read_stage_record(cache) | {"cached": True})
            else:
                # its checkpoints stay until the stage is in the cache: a run stopped while it writes the cache
                # (an 8B model's importance takes a while) resumes from them, not from step 0
                held = cache is not None and checkpoint_dir is not None and not settings.general.keep_checkpoints
                cfg = replace(settings.general, seed=settings.seed, precision=settings.precision,
                              progress=settings.progress, keep_checkpoints=settings.general.keep_checkpoints or held)
                result = train_stage(model, data.general_train, cfg, recipe.plugins, stage=GENERAL,
                                     checkpoint_dir=checkpoint_dir / GENERAL if checkpoint_dir else None)
                stages.append(_stage_summary(result))
                if cache is not None and PartialState().is_main_process:  # with how it computed: another
                    # machine resolves auto otherwise, and forgetless run warns before reusing it there
                    _save_stage(model, recipe.plugins, stages[-1] | {"computed": computed}, cache, settings.model)
                    if held:
                        checkpoint.remove(checkpoint_dir / GENERAL)
        if DOMAIN in recipe.stages:
            # theta_nu, the adapter the domain stage starts from: recorded with the saved adapter, so that
            # forgetless export --wise-ft can refuse another run's general stage (no adapter saved: not needed)
            domain_start = None if adapter_dir is None else weights_digest(
                {n: p for n, p in model.named_parameters() if p.requires_grad})
            # the last stage keeps its checkpoints until the run is evaluated and recorded (the caller removes them):
            # a run stopped while it evaluates resumes from them instead of training its domain stage again
            cfg = replace(settings.domain, seed=settings.seed, precision=settings.precision, progress=settings.progress,
                          keep_checkpoints=settings.domain.keep_checkpoints or checkpoint_dir is not None)
            tracker = _tracker(tokenizer, data, settings)  # scores over training: a plugin like the methods, last
            plugins += [tracker] if tracker is not None else []
            cache = domain_cache() if domain_cache else None
            if cache is not None and (tracker is not None and tracker.choose is not None
                                      or any(p.shapes_domain_stage() for p in recipe.plugins)):
                raise ValueError("a domain stage is cached only for methods that do not shape it, without "
                                 "eval.select (its chosen checkpoint is not cached)")
            if cache is not None and is_cached_stage(cache):
                for plugin in plugins:
                    plugin.on_stage_skipped(DOMAIN, model)
                load_adapter_weights(model, cache)
                stages.append(read_stage_record(cache) | {"cached": True})  # its eval.every rows in its extras
            else:
                stages.append(_stage_summary(train_stage(
                    model, data.domain_train, cfg, plugins, stage=DOMAIN, general_examples=data.general_train,
                    checkpoint_dir=checkpoint_dir / DOMAIN if checkpoint_dir else None)))
                if cache is not None and PartialState().is_main_process:
                    _save_stage(model, [], stages[-1] | {"computed": computed}, cache, settings.model)
            if cache is not None:  # every process finds what the main one cached (this general stage, this domain
                PartialState().wait_for_everyone()  # stage) from the next run on: no training collective follows
    saving = recipe.stages and adapter_dir is not None and PartialState().is_main_process
    start = {"domain_start": domain_start} if DOMAIN in recipe.stages and domain_start else {}
    # how the base was loaded, where not the default: eval and landscape load it so for this adapter
    start |= {k: getattr(settings, k) for k, default in BASE_DEFAULTS.items() if getattr(settings, k) != default}

    def keep(folder: Path) -> None:  # adapter_config.json + adapter_model.safetensors, and what goes beside them
        save_adapter(model, folder, settings.model, **start)
        _save_beside_adapter(recipe.plugins, folder)

    try:
        scores = evaluate(model, tokenizer, data, settings)
        check_finite(scores)
        variants = {}
        if data.heldout_blocks is not None or data.eval_tasks:  # else there is nothing to evaluate variants on
            for plugin in plugins:  # the methods', and the checkpoint eval.select kept
                for label, setup in plugin.evaluation_variants(model):
                    with setup:
                        variants[label] = evaluate(model, tokenizer, data, settings)
                    check_finite(variants[label], f" of {label}")
    except NonFiniteScore:
        raise  # a diverged model: no adapter
    except BaseException as err:
        # an error or Ctrl-C while scoring: a run without checkpoints (forgetless train) would lose what it trained;
        # the adapter is saved as it is, without scores (an experiment's run resumes from its domain checkpoints)
        if saving and checkpoint_dir is None:
            keep(adapter_dir)
            print(f"note: evaluation stopped ({type(err).__name__}); the trained adapter is saved to {adapter_dir} "
                  f"without scores (forgetless eval --adapter {adapter_dir} scores it)", file=sys.stderr)
        raise
    selected = None
    if tracker is not None and tracker.best_state is not None:
        row = next(r for r in tracker.history if r["step"] == tracker.best_step)
        selected = {"step": tracker.best_step, "max_general_drop": settings.max_general_drop, "scores": row}
    if saving:
        keep(adapter_dir)
        if selected is not None:
            folder = adapter_dir.with_name(adapter_dir.name + ".selected")
            with tracker.selected(model):
                keep(folder)
            selected["adapter"] = folder.name
    return RunResult(method=recipe.label, seed=settings.seed, general_ppl=scores["general_ppl"],
                     general_ppl_base2=scores["general_ppl_base2"], tasks=scores["tasks"], stages=stages,
                     variants=variants, seconds=time.perf_counter() - started + _before_resume(stages),
                     suite=scores["suite"],
                     selected=selected, computed=computed)


def _before_resume(stages: list[dict[str, Any]]) -> float:
    """The seconds that stages resumed from a checkpoint spent in earlier sessions (not in this call's wall time)."""
    return sum(float((s.get("extras") or {}).get("seconds_before_resume") or 0.0) for s in stages
               if not s.get("cached"))  # None: a checkpoint of an older version, its time unknown (not counted)


def computed_in(model: torch.nn.Module, settings: RunSettings) -> dict[str, Any]:
    """How the run computed: its device, its precision and the frozen base's dtype as ``auto`` resolved them on this
    machine. Two machines resolve ``auto`` differently (bf16 on a CPU with native bf16, fp32 on an AVX2-only one), so
    a record says which it got; the report names runs computed differently (``tables.scoring_note``)."""
    from forgetless.precision import resolve_precision

    device = next(model.parameters()).device.type
    base = settings.quantization if is_quantized(model) else {
        torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(
        model.get_input_embeddings().weight.dtype, str(model.get_input_embeddings().weight.dtype))
    computed = {"device": device, "precision": resolve_precision(settings.precision, device), "base_dtype": base}
    if device == "cpu":  # bf16 reductions may split differently with another thread count (docs/results/regime)
        computed["threads"] = torch.get_num_threads()
    return computed


def is_cached_stage(folder: Path) -> bool:
    """Whether ``folder`` holds a cached stage (:func:`_save_stage` renames it into place whole)."""
    return (folder / "adapter_model.safetensors").is_file()


def _attach(model, lora: LoraSettings):
    """LoRA attached; target modules the model does not have are a configuration error, not a traceback."""
    from forgetless.config import ConfigError

    try:
        return attach_lora(model, lora)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules {lora.target_modules}: {err}") from err


def read_stage_record(cache: Path) -> dict[str, Any]:
    """The ``stage.json`` of a cached general stage; an unreadable one is an AdapterError naming it."""
    try:
        record = json.loads((cache / "stage.json").read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{cache / 'stage.json'}: unreadable cached stage record ({err}); delete {cache} to "
                           f"compute the stage again") from None
    if not isinstance(record, dict):
        raise AdapterError(f"{cache / 'stage.json'}: not a stage record; delete {cache} to compute it again")
    return record


def _save_beside_adapter(plugins: Sequence[Method], folder: Path) -> None:
    """The state of the methods that an adapter is used with (``saves_with_adapter``: wise-ft's theta_nu) into the
    adapter's folder."""
    for plugin in plugins:
        if plugin.saves_with_adapter:
            plugin.save_state(folder)


def _save_stage(model, plugins: list, summary: dict[str, Any], cache: Path, model_name: str) -> None:
    """A finished stage into the cache folder ``cache``: the adapter, ``plugins``' states and the stage record, written
    beside it and renamed into place whole."""
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_adapter(model, tmp, model_name)
    for plugin in plugins:
        plugin.save_state(tmp)
    (tmp / "stage.json").write_text(json.dumps(summary))
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    tmp.rename(cache)  # a half-written cache is never picked up

