"""Experiments: methods x domain tasks x seeds, from one YAML file, resumable.

Example (``forgetless run experiment.yaml``)::

    name: piqa-medmcqa
    model: smollm2-135m                 # embedded name, hub id, model folder or .gguf file
    output: runs/piqa-medmcqa
    seeds: [0, 1, 2]
    lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}
    general:                            # stage nu data, and held-out text for perplexity
      train: {source: ../shared/data/general_text/c4.jsonl, limit: 200}
      heldout: {source: ../shared/data/wikitext2/test.jsonl, max_blocks: 32}
      block_size: 128
    tasks:                              # each is a domain stage; each is also evaluated
      - {name: piqa, train: ../shared/data/piqa/train.jsonl, test: ../shared/data/piqa/test.jsonl,
         train_limit: 400, test_limit: 200}
    methods: [base, lora-mu, lora-nu-mu]
    train:
      general: {max_steps: 50, batch_size: 8, lr: 2.0e-4}
      domain: {epochs: 1, batch_size: 8, lr: 2.0e-4}
    eval: {batch_size: 16}
    landscape: {blocks: 4, grid: 9}     # optional: flatness metrics per run vs forgetting (off when absent)

Each finished run is a JSON file in ``OUTPUT/runs/``; starting the experiment again skips them. Top-level keys
starting with ``x-`` are ignored: a place to define YAML anchors (sizes, paths) that the rest refers to.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from forgetless.methods import GENERAL, general_stage_entries, method_label, resolve
from forgetless.models import DEFAULT_MODEL, LoraSettings
from forgetless.training.loop import TrainConfig


class ConfigError(ValueError):
    pass


@dataclass
class TaskSpec:
    name: str
    train: str
    test: str
    schema: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    train_split: str | None = None  # for hub datasets (local files need none)
    test_split: str | None = None
    max_length: int = 256
    train_kind: str = "multiple_choice"  # or "instructions": train on Alpaca-style data, test on the MC task

    def __post_init__(self) -> None:
        if self.train_kind not in ("multiple_choice", "instructions"):
            raise ValueError(f"train_kind must be 'multiple_choice' or 'instructions', got {self.train_kind!r}")


@dataclass
class Experiment:
    name: str
    output: Path
    model: str = DEFAULT_MODEL
    seeds: list[int] = field(default_factory=lambda: [0])
    lora: LoraSettings = field(default_factory=LoraSettings)
    general_train: dict[str, Any] = field(default_factory=dict)  # {source, field?, limit?, max_blocks?}
    general_heldout: dict[str, Any] = field(default_factory=dict)
    block_size: int = 128
    tasks: list[TaskSpec] = field(default_factory=list)
    methods: list[Any] = field(default_factory=lambda: ["base", "lora-mu", "lora-nu-mu"])
    train_general: TrainConfig = field(default_factory=TrainConfig)
    train_domain: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = 16
    precision: str = "auto"
    source: Path | None = None  # the YAML file, for resolving relative paths
    landscape: Any = None  # forgetless.landscape.LandscapeSettings when the YAML has a 'landscape:' section
    # per entry of ``methods``: the task names it runs on (None: all); from a mapping entry's ``tasks:`` key
    method_tasks: list[list[str] | None] = field(default_factory=list)


def _dataclass_from(cls, values: Any, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def load_experiment(path: str | Path, output: str | Path | None = None) -> Experiment:
    """Read and validate an experiment YAML; every problem names the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"experiment file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the experiment must be a mapping")
    allowed = {"name", "model", "output", "seeds", "lora", "general", "tasks", "methods", "train", "eval", "precision",
               "landscape"}
    unknown = sorted(k for k in set(raw) - allowed if not str(k).startswith("x-"))  # x-...: YAML anchors only
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(allowed)}")
    general = raw.get("general") or {}
    if "train" not in general or "heldout" not in general:
        raise ConfigError(f"{path}: 'general' needs 'train' and 'heldout' (each a {{source: ...}} mapping)")
    tasks = raw.get("tasks") or []
    if not tasks:
        raise ConfigError(f"{path}: 'tasks' must list at least one domain task")
    train = raw.get("train") or {}
    exp = Experiment(
        name=str(raw.get("name", path.stem)),
        output=Path(output or raw.get("output") or Path("runs") / path.stem),
        model=str(raw.get("model", DEFAULT_MODEL)),
        seeds=[int(s) for s in raw.get("seeds", [0])],
        lora=_dataclass_from(LoraSettings, raw.get("lora"), f"{path}: lora"),
        general_train=_source(general["train"], f"{path}: general.train"),
        general_heldout=_source(general["heldout"], f"{path}: general.heldout"),
        block_size=int(general.get("block_size", 128)),
        tasks=[_dataclass_from(TaskSpec, t, f"{path}: tasks[{i}]") for i, t in enumerate(tasks)],
        methods=list(raw.get("methods", ["base", "lora-mu", "lora-nu-mu"])),
        train_general=_dataclass_from(TrainConfig, train.get("general"), f"{path}: train.general"),
        train_domain=_dataclass_from(TrainConfig, train.get("domain"), f"{path}: train.domain"),
        eval_batch_size=int((raw.get("eval") or {}).get("batch_size", 16)),
        precision=str(raw.get("precision", "auto")),
        source=path,
    )
    if "landscape" in raw:
        from forgetless.landscape.measure import LandscapeSettings

        exp.landscape = _dataclass_from(LandscapeSettings, raw["landscape"], f"{path}: landscape")
    names = [t.name for t in exp.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: task names must be unique, got {names}")
    exp.methods, exp.method_tasks = _split_method_tasks(exp.methods, names, f"{path}: methods")
    for entry in exp.methods:
        try:
            resolve(entry)
        except ValueError as err:
            raise ConfigError(f"{path}: methods: {err}") from err
    return exp


def _split_method_tasks(entries: list[Any], names: list[str], where: str) -> tuple[list[Any], list[list[str] | None]]:
    """Take the ``tasks:`` key (which tasks an entry runs on: e.g. a weight sweep on one task only) out of mapping
    entries, ``{name: hlora, phi: 1e5, tasks: [piqa]}``; it is not a method option and not part of the label."""
    methods, only = [], []
    for i, entry in enumerate(entries):
        chosen = None
        if isinstance(entry, dict) and "tasks" in entry:
            entry = dict(entry)
            chosen = entry.pop("tasks")
            if isinstance(chosen, str):
                chosen = [chosen]
            if not isinstance(chosen, list) or not chosen or any(t not in names for t in chosen):
                raise ConfigError(f"{where}[{i}]: 'tasks' must list task names from {names}, got {chosen!r}")
            chosen = [str(t) for t in chosen]
        methods.append(entry)
        only.append(chosen)
    return methods, only


def _source(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"source": value}
    if isinstance(value, dict) and "source" in value:
        return dict(value)
    raise ConfigError(f"{where}: expected a path/hub name or a mapping with 'source'")


def _resolve_path(exp: Experiment, value: str) -> str:
    """Relative paths are read relative to the YAML file's folder when they exist there."""
    if exp.source is not None and not Path(value).is_absolute():
        candidate = exp.source.parent / value
        if candidate.exists() and not Path(value).exists():
            return str(candidate)
    return value


def _texts(exp: Experiment, spec: dict[str, Any]) -> list[str]:
    """General text from ``{source, field?, split?, name?, limit?}`` (``max_blocks`` is used by packing)."""
    from forgetless.data import load_texts

    return load_texts(_resolve_path(exp, spec["source"]), field=spec.get("field", "text"),
                      split=spec.get("split", "train"), name=spec.get("name"), limit=spec.get("limit"))


def _load_items(exp: Experiment, source: str, schema: str | None, limit: int | None, split: str | None) -> list:
    """A task from a file or hub name, or the demo's built-in task (``demo:facts/train``, ``demo:facts/test``)."""
    from forgetless.data import load_mc_task

    if source.startswith("demo:facts/"):
        from forgetless.data.demo import demo_task

        return demo_task(source.removeprefix("demo:facts/"))[:limit]
    return load_mc_task(_resolve_path(exp, source), schema=schema, split=split, limit=limit)


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_id(label: str, task: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.+=," else "_" for c in label)
    return f"{safe}__{task}__seed{seed}"


def run_experiment(exp: Experiment, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (method, task, seed) not already finished; write tables; return all results."""
    from transformers import AutoTokenizer  # noqa: F401  (import early: fail fast on a broken install)

    from forgetless.data import instruction_examples, lm_examples, load_instructions, mc_train_examples, pack_blocks
    from forgetless.models import load_model
    from forgetless.pipeline import RunData, RunSettings, run_recipe

    out = exp.output
    (out / "runs").mkdir(parents=True, exist_ok=True)
    only = exp.method_tasks or [None] * len(exp.methods)
    todo = [(entry, task, seed) for seed in exp.seeds for task in exp.tasks
            for entry, tasks in zip(exp.methods, only) if tasks is None or task.name in tasks]
    pending = [t for t in todo if not (out / "runs" / f"{run_id(method_label(t[0]), t[1].name, t[2])}.json").is_file()]
    print(f"experiment {exp.name}: {len(todo)} runs, {len(todo) - len(pending)} already done, writing to {out}")
    if pending:
        _, tokenizer = load_model(exp.model)
        g = exp.general_train
        general_texts = _texts(exp, g)
        general_blocks = pack_blocks(general_texts, tokenizer, exp.block_size, max_blocks=g.get("max_blocks"))
        h = exp.general_heldout
        heldout_texts = _texts(exp, h)
        heldout = pack_blocks(heldout_texts, tokenizer, exp.block_size, max_blocks=h.get("max_blocks"))
        task_data = {}
        for task in exp.tasks:
            test_items = _load_items(exp, task.test, task.schema, task.test_limit, task.test_split)
            if task.train_kind == "instructions":
                pairs = load_instructions(_resolve_path(exp, task.train), split=task.train_split or "train",
                                          limit=task.train_limit)
                train_examples = instruction_examples(pairs, tokenizer, max_length=task.max_length)
            else:
                train_items = _load_items(exp, task.train, task.schema, task.train_limit, task.train_split)
                train_examples = mc_train_examples(train_items, tokenizer, max_length=task.max_length)
            task_data[task.name] = (train_examples, test_items)
        general_examples = lm_examples(general_blocks)
    for number, (entry, task, seed) in enumerate(pending, 1):
        recipe = resolve(entry)
        rid = run_id(recipe.label, task.name, seed)
        print(f"[{number}/{len(pending)}] {rid}")
        data = RunData(general_train=general_examples, domain_train=task_data[task.name][0],
                       heldout_blocks=heldout, eval_tasks={task.name: task_data[task.name][1]})
        settings = RunSettings(model=exp.model, lora=exp.lora, general=exp.train_general, domain=exp.train_domain,
                               seed=seed, eval_batch_size=exp.eval_batch_size, precision=exp.precision,
                               progress=progress)
        general_key = _digest({"model": exp.model, "lora": exp.lora, "data": exp.general_train, "block": exp.block_size,
                               "train": exp.train_general, "seed": seed, "precision": exp.precision,
                               "plugins": general_stage_entries(recipe.entries), "lora_over": recipe.lora})
        result = run_recipe(recipe, data, settings, adapter_dir=out / "adapters" / rid if recipe.stages else None,
                            general_cache=lambda: out / "stages" / f"{GENERAL}-{general_key}")
        record = result.to_json() | {"task": task.name, "run_id": rid, "model": exp.model}
        if GENERAL in recipe.stages:
            record["general_stage"] = f"stages/{GENERAL}-{general_key}"
        if not is_main_process():
            continue  # under `accelerate launch`, every process trains; only one writes
        path = out / "runs" / f"{rid}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)  # a run counts as done only once its JSON is complete
        print(f"    general PPL {result.general_ppl:.3f}  {task.name} acc {result.tasks[task.name]['acc']:.3f}"
              f"  acc_norm {result.tasks[task.name]['acc_norm']:.3f}  ({result.seconds:.0f} s)")
    if exp.landscape is not None and is_main_process():
        from forgetless.landscape.measure import measure_runs

        measure_runs(out, exp.model, exp.landscape, lambda: _texts(exp, exp.general_heldout), exp.block_size,
                     data_key=exp.general_heldout, progress=progress)
    results = load_results(out)
    if is_main_process():
        from forgetless.reporting.plots import plot_tradeoff, plot_training_curves

        write_tables(results, out, methods=[method_label(m) for m in exp.methods],
                     tasks=[t.name for t in exp.tasks])
        plot_tradeoff(results, out / "tradeoff.png")
        plot_training_curves(results, out / "training_curves.png")
        from forgetless.reporting.hlora_plots import hlora_section

        section = hlora_section(results, out)
        if section:
            with open(out / "results.md", "a") as fh:
                fh.write(section)
        if exp.landscape is not None:
            from forgetless.reporting.flatness import flatness_section

            section = flatness_section(results, out, methods=[method_label(m) for m in exp.methods])
            if section:
                with open(out / "results.md", "a") as fh:
                    fh.write(section)
        print(f"tables: {out / 'results.md'}, {out / 'results.csv'}; figures: tradeoff.png, training_curves.png")
    return results


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def load_results(folder: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted((Path(folder) / "runs").glob("*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: corrupt result file ({err}); delete it to rerun that run") from err
    return results


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_table(results: list[dict[str, Any]], methods: list[str] | None = None,
                  tasks: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows: methods; per task: general PPL after tuning on it, acc and acc_norm (mean ± std over seeds).

    A run's evaluation variants (e.g. WiSE-FT's interpolations) get rows of their own, ``method @ variant``,
    right after their method's row.
    """
    methods = methods or list(dict.fromkeys(r["method"] for r in results))
    results, methods = _with_variants(results, methods)
    tasks = tasks or list(dict.fromkeys(r["task"] for r in results))
    header = ["method"]
    for task in tasks:
        header += [f"{task} general PPL ↓", f"{task} acc ↑", f"{task} acc_norm ↑"]
    header.append("seeds")
    rows = []
    for method in methods:
        row = [method]
        seeds = set()
        for task in tasks:
            runs = [r for r in results if r["method"] == method and r["task"] == task]
            seeds |= {r["seed"] for r in runs}
            row += [_cell([r["general_ppl"] for r in runs], 3),
                    _cell([100 * r["tasks"][task]["acc"] for r in runs], 1),
                    _cell([100 * r["tasks"][task]["acc_norm"] for r in runs], 1)]
        row.append(str(len(seeds)))
        rows.append(row)
    return header, rows


def _with_variants(results: list[dict[str, Any]], methods: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    extra, order = [], []
    for method in methods:
        order.append(method)
        for r in results:
            if r["method"] != method:
                continue
            for label, scores in (r.get("variants") or {}).items():
                name = f"{method} @ {label}"
                extra.append({"method": name, "task": r["task"], "seed": r["seed"],
                              "general_ppl": scores["general_ppl"], "tasks": scores["tasks"]})
                if name not in order:
                    order.append(name)
    return results + extra, order


def write_tables(results: list[dict[str, Any]], folder: Path, methods: list[str] | None = None,
                 tasks: list[str] | None = None) -> str:
    """Write ``results.md`` and ``results.csv``; return the Markdown table."""
    import csv

    header, rows = summary_table(results, methods, tasks)
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    note = ("\nGeneral PPL: e-based token perplexity on the held-out general text (lower is better). "
            "acc / acc_norm: multiple-choice accuracy in %, computed as lm-evaluation-harness does.\n")
    (folder / "results.md").write_text(md + note)
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([h.replace(" ↓", "").replace(" ↑", "") for h in header])
        writer.writerows(rows)
    return md
