"""The experiment runner: every (method, domain task, seed) of an :class:`~forgetless.config.Experiment`, resumable.

``forgetless run experiment.yaml`` reads the file (:mod:`forgetless.config`), tokenizes the data once
(:func:`load_data`) and runs each pending (method, task, seed) through :func:`run_one`, which calls
:func:`forgetless.pipeline.run_recipe`. ``forgetless train`` is the same :func:`run_one` on a one-run experiment
(:func:`train_one`), so both commands train bit-for-bit the same adapter for the same settings.

Each finished run is a JSON file in ``OUTPUT/runs/``; starting the experiment again skips them. Runs that train
the same general stage share it, cached per seed in ``OUTPUT/stages/`` (:func:`general_stage_key`). Afterwards the
result tables (:mod:`forgetless.reporting.tables`) and figures are written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

# load_experiment and ConfigError live in forgetless.config; importing them from here still works
from forgetless.config import ConfigError, Experiment, TaskSpec, TextSource, load_experiment  # noqa: F401
from forgetless.methods import GENERAL, Recipe, general_stage_entries, method_label, resolve
from forgetless.pipeline import RunData, RunSettings, run_recipe


def _resolve_path(exp: Experiment, value: str) -> str:
    """Relative paths are read relative to the YAML file's folder when they exist there."""
    if exp.source is not None and not Path(value).is_absolute():
        candidate = exp.source.parent / value
        if candidate.exists() and not Path(value).exists():
            return str(candidate)
    return value


def _texts(exp: Experiment, spec: TextSource) -> list[str]:
    """General text from ``{source, field?, split?, name?, limit?}`` (``max_blocks`` is used by packing)."""
    from forgetless.data import load_texts

    return load_texts(_resolve_path(exp, spec.source), field=spec.field, split=spec.split, name=spec.name,
                      limit=spec.limit)


def _load_items(exp: Experiment, source: str, schema: str | None, limit: int | None, split: str | None) -> list:
    """A task from a file or hub name, or the demo's built-in task (``demo:facts/train``, ``demo:facts/test``)."""
    from forgetless.data import load_mc_task

    if source.startswith("demo:facts/"):
        from forgetless.data.demo import demo_task

        return demo_task(source.removeprefix("demo:facts/"))[:limit]
    return load_mc_task(_resolve_path(exp, source), schema=schema, split=split, limit=limit)


@dataclass
class ExperimentData:
    """An experiment's data, tokenized once for all its runs."""

    general: list[dict]  # {input_ids, labels} blocks of general text (stage nu; replay's and EWC's general text)
    heldout: torch.Tensor | None  # [n, block] held-out general text for perplexity; None: not evaluated
    tasks: dict[str, tuple[list[dict], list | None]]  # task name -> (training examples, test items or None)


def load_data(exp: Experiment) -> ExperimentData:
    """Read and tokenize the general text, the held-out text and every task's training and test data."""
    from forgetless.data import instruction_examples, lm_examples, load_instructions, mc_train_examples, pack_blocks
    from forgetless.models import load_model

    _, tokenizer = load_model(exp.model)

    def blocks(spec: TextSource) -> torch.Tensor:
        return pack_blocks(_texts(exp, spec), tokenizer, exp.general.block_size, max_blocks=spec.max_blocks)

    general = lm_examples(blocks(exp.general.train)) if exp.general.train is not None else []
    heldout = blocks(exp.general.heldout) if exp.general.heldout is not None else None
    tasks = {}
    for task in exp.tasks:
        test_items = None
        if task.test is not None:
            test_items = _load_items(exp, task.test, task.schema, task.test_limit, task.test_split)
        if task.train_kind == "instructions":
            pairs = load_instructions(_resolve_path(exp, task.train), split=task.train_split or "train",
                                      limit=task.train_limit)
            train_examples = instruction_examples(pairs, tokenizer, max_length=task.max_length)
        else:
            train_items = _load_items(exp, task.train, task.schema, task.train_limit, task.train_split)
            train_examples = mc_train_examples(train_items, tokenizer, max_length=task.max_length)
        tasks[task.name] = (train_examples, test_items)
    return ExperimentData(general=general, heldout=heldout, tasks=tasks)


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def general_stage_key(exp: Experiment, recipe: Recipe, seed: int) -> str:
    """What a run's general stage depends on: runs with the same key share one cached general stage.

    The mapping hashed is the one used before the configuration became a schema, so existing caches are found.
    """
    data = exp.general.train.cache_key() if exp.general.train is not None else None
    return _digest({"model": exp.model, "lora": exp.lora, "data": data, "block": exp.general.block_size,
                    "train": exp.train.general, "seed": seed, "precision": exp.precision,
                    "plugins": general_stage_entries(recipe.entries), "lora_over": recipe.lora})


def run_id(label: str, task: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.+=," else "_" for c in label)
    return f"{safe}__{task}__seed{seed}"


def run_one(exp: Experiment, entry: Any, task: TaskSpec, seed: int, data: ExperimentData, adapter_dir: Path | None,
            stages_dir: Path | None, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate one (method entry, task, seed) of ``exp``; return its record (the run JSON).

    The adapter is saved to ``adapter_dir`` (when the method trains); ``stages_dir`` holds cached general stages
    shared between runs (None: no cache). What is evaluated is what ``data`` has: the held-out perplexity if it
    has held-out blocks, the task's accuracy if it has test items.
    """
    recipe = resolve(entry)
    train_examples, test_items = data.tasks[task.name]
    run_data = RunData(general_train=data.general, domain_train=train_examples, heldout_blocks=data.heldout,
                       eval_tasks={task.name: test_items} if test_items is not None else {})
    settings = RunSettings(model=exp.model, lora=exp.lora, general=exp.train.general, domain=exp.train.domain,
                           seed=seed, eval_batch_size=exp.eval.batch_size, precision=exp.precision, progress=progress)
    stage = f"{GENERAL}-{general_stage_key(exp, recipe, seed)}"
    result = run_recipe(recipe, run_data, settings, adapter_dir=adapter_dir if recipe.stages else None,
                        general_cache=(lambda: stages_dir / stage) if stages_dir is not None else None)
    record = result.to_json() | {"task": task.name, "run_id": run_id(recipe.label, task.name, seed),
                                 "model": exp.model}
    if GENERAL in recipe.stages and stages_dir is not None:
        record["general_stage"] = f"{stages_dir.name}/{stage}"
    return record


def _scores_line(record: dict[str, Any]) -> str:
    parts = []
    if record["general_ppl"] is not None:
        parts.append(f"general PPL {record['general_ppl']:.3f}")
    for name, scores in record["tasks"].items():
        parts.append(f"{name} acc {scores['acc']:.3f}  acc_norm {scores['acc_norm']:.3f}")
    return "  ".join(parts + [f"({record['seconds']:.0f} s)"])


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # a run counts as done only once its JSON is complete


def is_main_process() -> bool:
    return PartialState().is_main_process


def run_experiment(exp: Experiment, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (method, task, seed) not already finished; write tables; return all results."""
    out = exp.output
    (out / "runs").mkdir(parents=True, exist_ok=True)
    only = exp.method_tasks or [None] * len(exp.methods)
    todo = [(entry, task, seed) for seed in exp.seeds for task in exp.tasks
            for entry, tasks in zip(exp.methods, only) if tasks is None or task.name in tasks]
    pending = [t for t in todo if not (out / "runs" / f"{run_id(method_label(t[0]), t[1].name, t[2])}.json").is_file()]
    print(f"experiment {exp.name}: {len(todo)} runs, {len(todo) - len(pending)} already done, writing to {out}")
    data = load_data(exp) if pending else None
    for number, (entry, task, seed) in enumerate(pending, 1):
        rid = run_id(method_label(entry), task.name, seed)
        print(f"[{number}/{len(pending)}] {rid}")
        record = run_one(exp, entry, task, seed, data, adapter_dir=out / "adapters" / rid, stages_dir=out / "stages",
                         progress=progress)
        if not is_main_process():
            continue  # under `accelerate launch`, every process trains; only one writes
        _write_json(out / "runs" / f"{rid}.json", record)
        print(f"    {_scores_line(record)}")
    if exp.landscape is not None and is_main_process():
        from forgetless.landscape_runs import measure_runs

        heldout = exp.general.heldout
        measure_runs(out, exp.model, exp.landscape, lambda: _texts(exp, heldout), exp.general.block_size,
                     data_key=heldout.cache_key(), progress=progress)
    from forgetless.reporting.tables import load_results

    results = load_results(out)
    if is_main_process():
        _write_report(exp, results)
    return results


def _write_report(exp: Experiment, results: list[dict[str, Any]]) -> None:
    """``results.md``/``results.csv`` with the sections of HLoRA and flatness, and the figures."""
    from forgetless.reporting.flatness import flatness_section
    from forgetless.reporting.hlora_plots import hlora_section
    from forgetless.reporting.plots import plot_tradeoff, plot_training_curves
    from forgetless.reporting.tables import write_tables

    out = exp.output
    methods = [method_label(m) for m in exp.methods]
    write_tables(results, out, methods=methods, tasks=[t.name for t in exp.tasks])
    plot_tradeoff(results, out / "tradeoff.png")
    plot_training_curves(results, out / "training_curves.png")
    sections = [hlora_section(results, out)]
    if exp.landscape is not None:
        sections.append(flatness_section(results, out, methods=methods))
    with open(out / "results.md", "a") as fh:
        fh.write("".join(s for s in sections if s))
    print(f"tables: {out / 'results.md'}, {out / 'results.csv'}; figures: tradeoff.png, training_curves.png")


def train_one(exp: Experiment, progress: bool = True) -> dict[str, Any]:
    """``forgetless train``: the single (method, task, seed) of ``exp`` through :func:`run_one`, as ``run`` does.

    The adapter is saved to ``exp.output``. When the experiment has held-out text or a test set, the run is
    evaluated (WiSE-FT's interpolations too) and its record written to ``exp.output / "run.json"``.
    """
    if len(exp.methods) != 1 or len(exp.tasks) != 1 or len(exp.seeds) != 1:
        raise ConfigError("train: needs exactly one method, one task and one seed")
    recipe = resolve(exp.methods[0])
    if not recipe.stages:
        raise ConfigError(f"train: method {recipe.label!r} trains nothing, so there is no adapter to save")
    if GENERAL in recipe.stages and exp.general.train is None:
        raise ConfigError(f"train: method {recipe.label!r} has a general stage: give the general text (--general)")
    record = run_one(exp, exp.methods[0], exp.tasks[0], exp.seeds[0], load_data(exp), adapter_dir=exp.output,
                     stages_dir=None, progress=progress)
    if is_main_process():
        print(f"adapter saved to {exp.output} (PEFT format)")
        if record["general_ppl"] is not None or record["tasks"]:
            _write_json(exp.output / "run.json", record)
            print(f"    {_scores_line(record)}; record: {exp.output / 'run.json'}")
    return record
