"""The experiment runner: every (method, domain task, seed) of an :class:`~forgetless.config.Experiment`, resumable.

``forgetless run experiment.yaml`` reads the file (:mod:`forgetless.config`), tokenizes the data once
(:func:`load_data`) and runs each pending (method, task, seed) through :func:`run_one`, which calls
:func:`forgetless.pipeline.run_recipe`. ``forgetless train`` is the same :func:`run_one` on a one-run experiment
(:func:`train_one`), so both commands train bit-for-bit the same adapter for the same settings.

Each finished run is a JSON file in ``OUTPUT/runs/``, with the settings that made it (:func:`run_settings`) and
their digest; starting the experiment again skips the runs whose settings are unchanged, and refuses to reuse those
whose settings changed (``--rerun-changed`` redoes them, keeping the old record as ``RUN_ID.json.DIGEST``). Runs
that train the same general stage share it, cached per seed in ``OUTPUT/stages/`` (:func:`general_stage_key`).
Afterwards the result tables (:mod:`forgetless.reporting.tables`) and figures are written. With ``jobs`` > 1
(``forgetless run --jobs N``) worker processes train the runs side by side, a group of runs sharing a general stage
per task (:func:`job_groups`); the records are those one process writes. With a ``landscape:`` section, a run's
flatness is measured as soon as its record is written, and the landscape step at the end measures whatever is still
missing (runs recorded before the section was added, a measurement that failed), one run per task with ``jobs`` > 1.

Everything is checked before a model loads (:func:`validate`): the model's source and LoRA targets, a writable
output folder with free space (locked against a second ``forgetless run``), the finished records, the cached general
stages and every data file. A run that diverges (a non-finite loss, gradient norm or score) stops the experiment
with :class:`RunFailed` naming it; nothing of it is recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

# load_experiment and ConfigError live in forgetless.config; importing them from here still works
from forgetless.config import (BASE_DEFAULTS, ConfigError, Experiment, TaskSpec, TextSource,  # noqa: F401
                               load_experiment)
from forgetless.data import DataError, chat_template_on
from forgetless.methods import DOMAIN, GENERAL, Recipe, general_stage_entries, identity_entries, method_label, resolve
from forgetless.methods import wise_ft
from forgetless.pipeline import NonFiniteScore, RunData, RunSettings, is_cached_stage, read_stage_record, run_recipe
from forgetless.progress import plain_lines, say
from forgetless.training import checkpoint
from forgetless.training.config import NO_NUMBERS
from forgetless.training.loop import NonFiniteError

MIN_FREE_BYTES = 256 * 2**20  # an output folder with less free space is refused before any work
LOCK_FILE = ".forgetless.lock"


class RunFailed(RuntimeError):
    """A run that stopped: a non-finite loss, gradient norm or score, a full disk, the device's memory. The message
    names the run; nothing of it is recorded."""


def _named(rid: str, work: Callable[[], Any]) -> Any:
    """``work()`` (a run, or writing its record), with a full disk or an out-of-memory device turned into a
    :class:`RunFailed` naming run ``rid`` (a bare "[Errno 28] No space left on device" says neither which run nor
    what was kept)."""
    from forgetless.models import ModelNotFoundError

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5+
    try:
        return work()
    except ModelNotFoundError:  # says itself what to do; no run of this model can go on
        raise
    except (OSError, out_of_memory) as err:
        again = ("less memory (a smaller batch_size with grad_accum, gradient_checkpointing, a 4-bit base) is needed "
                 "before `forgetless run` again" if isinstance(err, out_of_memory) else "`forgetless run` again resumes")
        raise RunFailed(f"{rid}: {type(err).__name__}: {err}; nothing of this run is recorded, the finished runs' "
                        f"records are kept ({again}, from the run's last checkpoint if it wrote one)") from err


class Interrupted(KeyboardInterrupt):
    """SIGINT during an experiment; the message says what was kept."""


def _resolve_path(exp: Experiment, value: str) -> str:
    """Relative paths are read relative to the YAML file's folder when they exist there (and not in the current
    folder). A file name found in neither is a FileNotFoundError naming both."""
    from forgetless.data.io import looks_local

    if exp.source is not None and not Path(value).expanduser().is_absolute():
        candidate = exp.source.parent / value
        if candidate.exists() and not Path(value).exists():
            return str(candidate)
        if looks_local(value) and not Path(value).exists():
            raise FileNotFoundError(f"{value}: no such file (looked in the current folder, {Path.cwd()}, and beside "
                                    f"the YAML, {exp.source.parent.resolve()})")
    return value


def _texts(exp: Experiment, spec: TextSource) -> list[str]:
    """General text from ``{source, field?, split?, name?, limit?}`` (``max_blocks`` is used by packing)."""
    from forgetless.data import load_texts

    return load_texts(_resolve_path(exp, spec.source), field=spec.field, split=spec.split, name=spec.name,
                      limit=spec.limit)


def _load_items(exp: Experiment, source: str, schema: str | None, limit: int | None, split: str | None,
                config: str | None = None) -> list:
    """A task from a file or hub name (``config``: the hub dataset's configuration), or the demo's built-in task
    (``demo:facts/train``, ``demo:facts/test``)."""
    from forgetless.data import load_mc_task

    if source.startswith("demo:facts/"):
        from forgetless.data.demo import demo_task

        return demo_task(source.removeprefix("demo:facts/"))[:limit]
    return load_mc_task(_resolve_path(exp, source), schema=schema, split=split, name=config, limit=limit)


# flags of `forgetless train` for the keys of its one-run experiment, so that its errors name what the user typed
_CLI_KEYS = {"general.train": "--general", "general.heldout": "--heldout", "tasks[0].train": "--domain",
             "tasks[0].test": "--test", "lora": "--lora-*/--target-modules", "output": "--output",
             "chat_template": "--chat-template", "model": "--model", "general.block_size": "--block-size",
             "tasks[0].max_length": "--max-length", "quantization": "--quantization"}


def where(exp: Experiment, key: str) -> str:
    """The place of ``key`` for an error message: ``FILE: key`` of the YAML, or the flag of ``forgetless train``."""
    return f"{exp.source}: {key}" if exp.source is not None else _CLI_KEYS.get(key, key)


@contextlib.contextmanager
def data_errors(place: str) -> Iterator[None]:
    """Data problems (a missing, unreadable, empty, malformed or too short source) as DataErrors that also name
    ``place``, the key or flag that gave the source."""
    try:
        yield
    except (DataError, OSError, ValueError) as err:
        raise DataError(f"{place}: {err}") from err


def _data_errors(exp: Experiment, key: str) -> contextlib.AbstractContextManager[None]:
    return data_errors(where(exp, key))


@dataclass
class RawData:
    """An experiment's data as read from its files, before any tokenizer: reading it checks every file."""

    general: list[str] | None  # documents of the general text (stage nu), None: not given
    heldout: list[str] | None  # documents of the held-out general text
    tasks: dict[str, tuple[list, list | None]]  # task name -> (training rows of its train_kind, test items)
    # eval.suite's listed entries -> test items, or an lm-evaluation-harness task (forgetless.evaluation.lmeval)
    suite: dict[str, list] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # task name -> its training data's kind (auto resolved)


def read_data(exp: Experiment) -> RawData:
    """Read every data source of ``exp`` (no model needed): a missing, empty, non-UTF-8 or malformed file, a
    multiple-choice item with fewer than two choices, is a DataError naming the file, the line and the key."""
    from forgetless.data import load_train, resolve_kind
    from forgetless.data.io import training_split

    texts = {}
    for key in ("train", "heldout"):
        spec = getattr(exp.general, key)
        with _data_errors(exp, f"general.{key}"):
            texts[key] = _texts(exp, spec) if spec is not None else None
    tasks, kinds = {}, {}
    for i, task in enumerate(exp.tasks):
        test_items = None
        if task.test is not None:
            with _data_errors(exp, f"tasks[{i}].test"):
                test_items = _load_items(exp, task.test, task.schema, task.test_limit, task.test_split, task.config)
        with _data_errors(exp, f"tasks[{i}].train"):
            source = task.train if task.train.startswith("demo:") else _resolve_path(exp, task.train)
            split = training_split(source, task.train_split)  # train by default, for every kind
            kinds[task.name] = kind = resolve_kind(task.train_kind, source, split, name=task.config)
            if kind == "multiple_choice":
                train = _load_items(exp, task.train, task.schema, task.train_limit, split, task.config)
            else:
                train = load_train(kind, source, split=split, limit=task.train_limit, name=task.config)
        tasks[task.name] = (train, test_items)
    suite = {}
    for i, entry in enumerate(exp.eval.suite if isinstance(exp.eval.suite, list) else []):
        if isinstance(entry, str):
            continue  # auto: the tasks' test sets, read above
        if entry.lmeval is not None:  # an lm-evaluation-harness task: built (its data loaded) here, scored by it
            suite[entry.name] = _harness_task(exp, i, entry)
            continue
        with _data_errors(exp, f"eval.suite[{i}].test"):
            suite[entry.name] = _load_items(exp, entry.test, entry.schema, entry.limit, entry.split, entry.config)
    return RawData(general=texts["train"], heldout=texts["heldout"], tasks=tasks, suite=suite, kinds=kinds)


def _harness_task(exp: Experiment, i: int, entry: Any) -> Any:
    """``eval.suite[i]``'s lm-evaluation-harness task (:func:`forgetless.evaluation.lmeval.load_harness_task`): an
    unknown task or a missing extra is a ConfigError, data the harness cannot load a DataError, both naming the key."""
    from forgetless.evaluation.lmeval import HarnessTaskError, LMEvalUnavailable, load_harness_task

    place = where(exp, f"eval.suite[{i}].lmeval")
    try:
        return load_harness_task(entry.lmeval, name=entry.name, limit=entry.limit, metric=entry.metric,
                                 base_dir=exp.source.parent if exp.source is not None else None,
                                 num_fewshot=entry.num_fewshot)
    except (HarnessTaskError, LMEvalUnavailable) as err:
        raise ConfigError(f"{place}: {err}") from None
    except FileNotFoundError as err:  # the YAML, or a data file it names
        raise DataError(f"{place}: lm-evaluation-harness task {entry.lmeval!r}: {err}") from err
    except Exception as err:  # the harness's and datasets' own errors while loading the task's data
        raise DataError(f"{place}: lm-evaluation-harness task {entry.lmeval!r} could not be loaded: "
                        f"{type(err).__name__}: {err}") from err


@dataclass
class ExperimentData:
    """An experiment's data, tokenized once for all its runs."""

    general: list[dict]  # {input_ids, labels} blocks of general text (stage nu; replay's and EWC's general text)
    heldout: torch.Tensor | None  # [n, block] held-out general text for perplexity; None: not evaluated
    tasks: dict[str, tuple[list[dict], list | None]]  # task name -> (training examples, test items or None)
    suite: dict[str, list] = field(default_factory=dict)  # eval.suite's listed entries -> test items


def load_data(exp: Experiment, raw: RawData | None = None) -> ExperimentData:
    """Tokenize the general text, the held-out text and every task's training data (``raw``: already read)."""
    from forgetless.data import chat_mc_items, lm_examples, pack_blocks, train_examples, use_chat_template
    from forgetless.models import load_tokenizer

    raw = raw or read_data(exp)
    tokenizer = load_tokenizer(exp.model)
    try:
        chat = use_chat_template(exp.chat_template, exp.model, tokenizer)
    except ValueError as err:
        raise ConfigError(f"{where(exp, 'chat_template')}: {err}") from None

    def prompts(items: Any) -> Any:  # multiple-choice prompts as the model is to see them (not a harness task's)
        return chat_mc_items(items, tokenizer) if chat and isinstance(items, list) else items

    def blocks(key: str, texts: list[str], spec: TextSource) -> torch.Tensor:
        with _data_errors(exp, f"general.{key}"):
            return pack_blocks(texts, tokenizer, exp.general.block_size, max_blocks=spec.max_blocks)

    general = lm_examples(blocks("train", raw.general, exp.general.train)) if raw.general is not None else []
    heldout = blocks("heldout", raw.heldout, exp.general.heldout) if raw.heldout is not None else None
    tasks = {}
    for i, task in enumerate(exp.tasks):
        train, test_items = raw.tasks[task.name]
        kind = raw.kinds.get(task.name, task.train_kind)
        with _data_errors(exp, f"tasks[{i}].train"):
            train = prompts(train) if kind == "multiple_choice" else train
            tasks[task.name] = (train_examples(kind, train, tokenizer, task.max_length), prompts(test_items))
    # a harness task gets the harness's own apply_chat_template (forgetless.evaluation.lmeval)
    suite = {name: items.with_chat_template(chat) if hasattr(items, "with_chat_template") else prompts(items)
             for name, items in raw.suite.items()}
    return ExperimentData(general=general, heldout=heldout, tasks=tasks, suite=suite)


def run_suite(exp: Experiment, task: str, data: ExperimentData) -> dict[str, list]:
    """The general suite a run on ``task`` is scored on (:meth:`~forgetless.config.EvalSettings.suite_names`): the
    other tasks' test sets (``auto``) and the listed entries, each cut to ``eval.suite_limit`` items."""
    items = {name: test for name, (_, test) in data.tasks.items() if test is not None} | data.suite
    names = exp.eval.suite_names(task, [t.name for t in exp.tasks])
    return {name: items[name][:exp.eval.suite_limit] for name in names if name in items}


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


_NO_NUMBERS = NO_NUMBERS  # TrainConfig fields that change no number: not in a run's identity or a stage's key
# The fields whose repr the general-stage key hashed when its format was fixed (issue #11); a field added since enters
# the key only when set to other than its default, so the caches of unchanged experiments stay valid.
_KEYED_FIELDS = {
    "TrainConfig": ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "scheduler",
                    "warmup_ratio", "max_grad_norm", "precision", "seed", "progress", "on_nonfinite"),
    "LoraSettings": ("r", "alpha", "dropout", "target_modules", "use_rslora"),
}


def _default(f: Any) -> Any:
    return f.default if f.default_factory is MISSING else f.default_factory()


def _key_repr(section: Any) -> str:
    """The dataclass repr of ``section`` with the fields of :data:`_KEYED_FIELDS`, and later ones set to other than
    their default (``TrainConfig(epochs=1.0, ...)``, as ``str()`` gave it when the key was fixed)."""
    keyed = _KEYED_FIELDS[type(section).__name__]
    # a keyed field that changes no number (progress) is shown at its default: the key as every run had it, whatever
    # its value now (progress: false retrained a cached general stage)
    shown = [f"{f.name}={(getattr(section, f.name) if f.name not in _NO_NUMBERS else _default(f))!r}"
             for f in fields(section)
             if f.name in keyed or (f.name not in _NO_NUMBERS and getattr(section, f.name) != _default(f))]
    return f"{type(section).__name__}({', '.join(shown)})"


def general_stage_key(exp: Experiment, recipe: Recipe, seed: int) -> str:
    """What a run's general stage depends on: runs with the same key share one cached general stage.

    The mapping hashed is the one used before the configuration became a schema, so existing caches are found.
    """
    data = exp.general.train.cache_key() if exp.general.train is not None else None
    key = {"model": exp.model, "lora": _key_repr(exp.lora), "data": data, "block": exp.general.block_size,
           "train": _key_repr(exp.train.general), "seed": seed, "precision": exp.precision,
           "plugins": general_stage_entries(recipe.entries), "lora_over": recipe.lora}
    for name, default in BASE_DEFAULTS.items():  # keys added later: only off their default
        if getattr(exp, name) != default:
            key[name] = getattr(exp, name)
    return _digest(key)


def general_stage_name(exp: Experiment, recipe: Recipe, seed: int) -> str:
    """The folder of a run's cached general stage under ``output/stages``."""
    return f"{GENERAL}-{general_stage_key(exp, recipe, seed)}"


def domain_stage_name(exp: Experiment, recipe: Recipe, task: TaskSpec, seed: int) -> str | None:
    """The folder under ``output/stages`` of a run's domain stage when it can be cached, else None: when no method
    of the run shapes that stage (``wise-ft`` trains it as ``lora-nu-mu`` does) and there is no ``eval.select``.
    Keyed by the run's identity (:func:`run_settings`: model, data, LoRA, training, evaluation, seed) with its methods
    replaced by what its general stage is (:func:`general_stage_entries`). It is cached only when another run of the
    experiment has the same one (:func:`shared_domain_stage`)."""
    if (DOMAIN not in recipe.stages or exp.eval.select is not None
            or any(plugin.shapes_domain_stage() for plugin in recipe.plugins)):
        return None  # names without a plugin (lora-nu-mu, rslora) act through the stages and LoRA, both in the key
    settings = run_settings(exp, recipe, task, seed)
    if exp.eval.every is None:  # what the run is scored on, not what it trains (names as before session 33); with
        settings.pop(SUITE_KEY, None)  # eval.every the stage keeps suite scores taken while it trained: on those items
    settings["method"] = {"stages": list(recipe.stages),
                          "general": general_stage_entries(recipe.entries) if GENERAL in recipe.stages else None}
    return f"{DOMAIN}-{settings_digest(settings)}"


def shared_domain_stage(exp: Experiment, recipe: Recipe, task: TaskSpec, seed: int,
                        shared: set[str] | None = None) -> str | None:
    """:func:`domain_stage_name` of the run when another run of ``exp`` has the same (it is then cached, and the
    second takes it from there), else None: a domain stage no other run would take is not kept. ``shared``: the
    names :func:`shared_domain_stages` gave, when the caller has them."""
    name = domain_stage_name(exp, recipe, task, seed)
    return name if name is not None and name in (shared_domain_stages(exp) if shared is None else shared) else None


def shared_domain_stages(exp: Experiment) -> set[str]:
    """The domain-stage names (:func:`domain_stage_name`) that two or more runs of ``exp`` have."""
    names = [domain_stage_name(exp, job.recipe, job.task, job.seed) for job in plan_runs(exp)]
    return {name for name in names if name is not None and names.count(name) > 1}


def run_id(label: str, task: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.+=," else "_" for c in label)
    return f"{safe}__{task}__seed{seed}"


# ------------------------------------------------------------------------------------------------ run identity
_NOT_SETTINGS = _NO_NUMBERS | {"seed", "precision"}  # of a section: no number changes, or set per run


def _non_default(value: Any) -> Any:
    """A settings section as data: a dataclass as the mapping of its fields that differ from their defaults (so a
    field added later, at its default, changes no digest), recursively; paths as strings."""
    if is_dataclass(value):
        out = {}
        for f in fields(value):
            if f.name in _NOT_SETTINGS or not f.metadata.get("yaml", True):
                continue
            if _default(f) is MISSING or getattr(value, f.name) != _default(f):
                out[f.name] = _non_default(getattr(value, f.name))
        return out
    if isinstance(value, dict):
        return {str(k): _non_default(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_non_default(v) for v in value]
    return str(value) if isinstance(value, Path) else value


# Experiment keys that are not one run's settings: its name and folder, and the lists a run takes one item of.
_NOT_RUN_SETTINGS = ("name", "output", "seeds", "tasks", "methods", "landscape")


_TASK_TRAINING = ("train", "train_limit", "train_split", "max_length", "train_kind")  # a task's training-side keys
_EVAL_TRAINING = ("every", "every_items", "every_blocks", "select")  # eval keys that act while a stage trains


def run_settings(exp: Experiment, recipe: Recipe, task: TaskSpec, seed: int, legacy: bool = False) -> dict[str, Any]:
    """Everything that changes the numbers of one run: the model, the data sources and limits, LoRA, the training
    and evaluation settings, the method's options and the seed (every key of the experiment but those of
    :data:`_NOT_RUN_SETTINGS`, set to other than its default, so a key added to the schema later is covered).
    ``base`` trains nothing: its identity has no LoRA, general training text, training settings, task training data
    or evaluation while training. A run without a general stage has no general-stage settings, nor the general
    training text unless a method of it reads that text (replay, EWC without a general stage).

    ``legacy``: the identity as runs recorded it before session 35, with the general-stage settings of runs without a
    general stage and the training data of ``base`` (such a record is taken as it is: :attr:`Job.digests`)."""
    settings = {k: v for k, v in _non_default(exp).items() if k not in _NOT_RUN_SETTINGS + ("chat_template",)}
    if chat_template_on(exp.chat_template, exp.model):  # off (as every run was before the setting): no key
        settings["chat_template"] = True
    settings |= {"model": exp.model, "precision": exp.precision, "seed": seed, "task": _non_default(task),
                 "method": _non_default(identity_entries(recipe.entries))}
    if any(entry.lmeval is not None for entry in exp.eval.suite_tasks):  # a harness task is defined by the harness's code
        from importlib.metadata import version

        settings["lm_eval"] = version("lm_eval")
    suite = _auto_suite(exp, task)
    if suite:
        settings[SUITE_KEY] = suite
    if recipe.stages:
        settings["lora"] = _non_default(replace(exp.lora, **recipe.lora))
        if not legacy and GENERAL not in recipe.stages:  # the general stage's settings never reach this run
            settings["train"] = {k: v for k, v in settings.get("train", {}).items() if k != GENERAL}
            if not any(plugin.needs_general_text(recipe.stages) for plugin in recipe.plugins):
                settings["general"] = {k: v for k, v in settings.get("general", {}).items() if k != "train"}
    else:
        settings = {k: v for k, v in settings.items() if k not in ("lora", "train")}
        settings["general"] = {k: v for k, v in settings.get("general", {}).items() if k != "train"}
        if not legacy:
            settings["task"] = {k: v for k, v in settings["task"].items() if k not in _TASK_TRAINING}
            settings["eval"] = {k: v for k, v in settings.get("eval", {}).items() if k not in _EVAL_TRAINING}
    if not legacy:  # a section left empty is no setting (as a section at its defaults has no key)
        settings = {k: v for k, v in settings.items() if v != {} or k not in ("train", "general", "eval")}
    return settings


# The other tasks' test sets a run is scored on (``eval.suite: auto``), by what defines their items: in a run's
# identity since session 33 (changing another task's test_limit reused runs scored on the old items). A record
# written before has no such key; it is taken as it was (:attr:`Job.digests`).
SUITE_KEY = "suite"
_SUITE_ITEMS = ("test", "test_split", "test_limit", "schema", "config")


def _auto_suite(exp: Experiment, task: TaskSpec) -> dict[str, Any]:
    """``{task name: what defines its test items}`` for the other tasks in ``task``'s suite (listed suite entries are
    in ``eval``, already part of the settings)."""
    others = {t.name: t for t in exp.tasks}
    names = [n for n in exp.eval.suite_names(task.name, list(others)) if n in others and n != task.name]
    return {n: {k: v for k, v in _non_default(others[n]).items() if k in _SUITE_ITEMS} for n in names}


def _canonical(value: Any) -> Any:
    """Numbers as floats (``1`` and ``1.0`` are one setting), recursively."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def settings_digest(settings: dict[str, Any]) -> str:
    return _digest(_canonical(settings))


def _flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):  # {} is a section at its defaults: no key of its own
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if _canonical(a.get(k)) != _canonical(b.get(k)))


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two runs' settings, for a message: ``train.domain.max_steps: 2 -> 50``."""
    a, b, keys = _flat(old), _flat(new), _changed_keys(old, new)
    shown = [f"{k}: {a.get(k, 'default')} -> {b.get(k, 'default')}" for k in keys[:3]]
    return ", ".join(shown) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "") or "other settings"


@dataclass
class Job:
    """One (method entry, task, seed) of an experiment, with its identity."""

    entry: Any
    task: TaskSpec
    seed: int
    recipe: Recipe
    rid: str
    settings: dict[str, Any]
    legacy: dict[str, Any] | None = None  # the identity as recorded before session 35, where it differs

    @property
    def digest(self) -> str:
        return settings_digest(self.settings)

    @property
    def digests(self) -> set[str]:
        """The digests a record of this run may carry, taken as it was: this one; where the run has an auto suite,
        the one of a record written before the suite was part of a run's identity (session 33); and those of a
        record written before session 35 with settings that never reach the run (:func:`run_settings`)."""
        found = set()
        for settings in (self.settings, self.legacy) if self.legacy is not None else (self.settings,):
            found |= {settings_digest(settings), settings_digest({k: v for k, v in settings.items() if k != SUITE_KEY})}
        return found


def plan_runs(exp: Experiment) -> list[Job]:
    """Every run of the experiment, seeds outermost, in the order of the file."""
    only = exp.method_tasks or [None] * len(exp.methods)
    jobs = []
    for seed in exp.seeds:
        for task in exp.tasks:
            for entry, tasks in zip(exp.methods, only):
                if tasks is None or task.name in tasks:
                    recipe = resolve(entry)
                    settings, legacy = (run_settings(exp, recipe, task, seed, legacy=old) for old in (False, True))
                    jobs.append(Job(entry, task, seed, recipe, run_id(recipe.label, task.name, seed), settings,
                                    legacy if legacy != settings else None))
    return jobs


def run_one(exp: Experiment, entry: Any, task: TaskSpec, seed: int, data: ExperimentData, adapter_dir: Path | None,
            stages_dir: Path | None, progress: bool = True, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Train and evaluate one (method entry, task, seed) of ``exp``; return its record (the run JSON), with the
    settings that made it and their digest.

    The adapter is saved to ``adapter_dir`` (when the method trains); ``stages_dir`` holds cached general stages
    shared between runs (None: no cache). What is evaluated is what ``data`` has: the held-out perplexity if it
    has held-out blocks, the task's accuracy if it has test items. A run that diverges is :class:`RunFailed`.
    """
    recipe = resolve(entry)
    rid = run_id(recipe.label, task.name, seed)
    train_examples, test_items = data.tasks[task.name]
    run_data = RunData(general_train=data.general, domain_train=train_examples, heldout_blocks=data.heldout,
                       eval_tasks={task.name: test_items} if test_items is not None else {},
                       suite=run_suite(exp, task.name, data))
    ev = exp.eval
    settings = RunSettings(model=exp.model, lora=exp.lora, general=exp.train.general, domain=exp.train.domain,
                           seed=seed, eval_batch_size=ev.batch_size, precision=exp.precision,
                           progress=progress and is_main_process(),  # evaluation's bars too: one, not one a process
                           dtype=exp.dtype, quantization=exp.quantization, eval_every=ev.every,
                           every_items=ev.every_items, every_blocks=ev.every_blocks,
                           max_general_drop=ev.select.max_general_drop if ev.select is not None else None,
                           share_prefix=ev.share_prefix)
    stage, domain = general_stage_name(exp, recipe, seed), shared_domain_stage(exp, recipe, task, seed)
    if domain and checkpoint_dir is not None and any((checkpoint_dir / DOMAIN).glob("step-*[0-9]")):
        domain = None  # this run trained the stage and was stopped before its record: it goes on from its checkpoint
    try:
        result = run_recipe(recipe, run_data, settings, adapter_dir=adapter_dir if recipe.stages else None,
                            general_cache=(lambda: stages_dir / stage) if stages_dir is not None else None,
                            checkpoint_dir=checkpoint_dir,
                            domain_cache=(lambda: stages_dir / domain) if stages_dir and domain else None)
    except (NonFiniteError, NonFiniteScore) as err:
        raise RunFailed(f"{rid}: {err}") from err
    identity = run_settings(exp, recipe, task, seed)
    record = result.to_json() | {"task": task.name, "run_id": rid, "model": exp.model, "settings": identity,
                                 "settings_digest": settings_digest(identity)}
    if GENERAL in recipe.stages and stages_dir is not None:
        record["general_stage"] = f"{stages_dir.name}/{stage}"
    if domain and stages_dir is not None:
        record["domain_stage"] = f"{stages_dir.name}/{domain}"
    return record


def _scores_line(record: dict[str, Any]) -> str:
    parts = []
    if record["general_ppl"] is not None:
        parts.append(f"general PPL {record['general_ppl']:.3f}")
    for name, scores in record["tasks"].items():
        parts.append(f"{name} acc {scores['acc']:.3f}  acc_norm {scores['acc_norm']:.3f}")
    if record.get("suite"):
        accs = [s["acc"] for s in record["suite"].values()]
        parts.append(f"suite acc {sum(accs) / len(accs):.3f} ({len(accs)} tasks)")
    return "  ".join(parts + [f"({record['seconds']:.0f} s)"])


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # a run counts as done only once its JSON is complete


def _drop_empty(folder: Path) -> None:
    """Remove ``folder`` and then its parent if empty (a finished run's checkpoint folder, whose stages removed
    their checkpoints); a folder with something left in it (``keep_checkpoints``) stays."""
    for path in (folder, folder.parent):
        try:
            path.rmdir()
        except OSError:
            return


def is_main_process() -> bool:
    return PartialState().is_main_process


# ------------------------------------------------------------------------------------------------ checks
def check_output(folder: Path, where_: str) -> None:
    """ConfigError unless ``folder`` can be created, written and has at least :data:`MIN_FREE_BYTES` free."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".forgetless-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{where_}: the output folder {folder} is not writable ({err.strerror or err})") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"{where_}: only {free / 2**20:.0f} MiB free in {folder}; at least "
                          f"{MIN_FREE_BYTES // 2**20} MiB are needed")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.forgetless.lock`` (an advisory ``flock``, which the kernel drops when its process dies, with
    the holder's pid inside for messages): a second ``forgetless run`` on the folder is a ConfigError naming the pid
    that holds it; the lock of a process that died is taken over."""
    import fcntl

    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{folder} is in use by another forgetless run (pid {holder}); wait for it to end or "
                              f"stop it, or write to another output folder") from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not _pid_alive(int(previous)):
            print(f"taking over the lock of {folder} from pid {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def folder_in_use(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock (:func:`output_lock`); the folder is left as it was."""
    import fcntl

    path = folder / LOCK_FILE
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if this call took it
    return False


def _check_cached_stage(cache: Path, recipe: Recipe | None) -> None:
    """AdapterError / ConfigError for a cached stage that could not be used (it is read only later, after the model
    has loaded): unreadable adapter, stage record or method-state files, or a state file missing. ``recipe`` None: a
    cached domain stage, which holds no method state."""
    from forgetless.models import check_adapter_files, check_safetensors

    if not is_cached_stage(cache):
        return  # not cached: the stage is trained
    check_adapter_files(cache)
    read_stage_record(cache)
    for path in sorted(cache.glob("*.safetensors")):
        check_safetensors(path, f"cached {'domain' if recipe is None else 'general'}-stage state")
    if recipe is None:
        return
    for plugin in resolve(recipe.entries).plugins:  # fresh plugins: load_state only remembers where the file is
        try:
            plugin.load_state(cache)
        except FileNotFoundError as err:
            raise ConfigError(f"{cache}: {err}; delete the folder to recompute the general stage") from None


def check_model(exp: Experiment, jobs: list[Job]) -> None:
    """The model's source and the LoRA targets of ``jobs`` (against the model's configuration, where it is on this
    machine), without loading the model or asking the hub: errors naming the key."""
    from forgetless.models import ModelNotFoundError, check_lora_targets, check_model_source

    try:
        check_model_source(exp.model)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"{where(exp, 'model')}: {err}") from None
    check_context(exp, jobs)
    if jobs and exp.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:  # before any run (a
        # folder whose runs are all recorded rebuilds its tables without it)
        raise ConfigError(f"{where(exp, 'quantization')}: {exp.quantization} needs bitsandbytes: pip install "
                          f"'forgetless[qlora]'")
    for lora in {json.dumps(j.recipe.lora, sort_keys=True): j.recipe.lora for j in jobs if j.recipe.stages}.values():
        try:
            check_lora_targets(exp.model, replace(exp.lora, **lora))
        except ValueError as err:
            raise ConfigError(f"{where(exp, 'lora')}: {err}") from None


def check_context(exp: Experiment, jobs: Sequence[Job] | None = None) -> None:
    """The general text's blocks (always ``block_size`` tokens) and the blocks of a task of packed text that ``jobs``
    train on (``train_kind: text``: always ``max_length`` tokens) within the model's context, where its
    configuration says it without loading it (a block of 100000 tokens on a 128-position model ran a minute before
    it was stopped; ``run --dry-run`` says it too). Other kinds' ``max_length`` only bounds their examples:
    :func:`check_example_lengths` checks those once tokenized."""
    from forgetless.models import context_length

    longest = context_length(exp.model)
    if longest is None:
        return
    trained = _trained_tasks(jobs)
    limits = [("general.block_size", exp.general.block_size)]
    limits += [(f"tasks[{i}].max_length", task.max_length) for i, task in enumerate(exp.tasks)
               if task.train_kind == "text" and (trained is None or task.name in trained)]
    for key, size in limits:
        if size > longest:
            raise ConfigError(f"{where(exp, key)}: {size} tokens is longer than the model's context ({longest} "
                              f"positions, its max_position_embeddings)")


def _trained_tasks(jobs: Sequence[Job] | None) -> set[str] | None:
    """The names of the tasks some of ``jobs`` train on (a domain stage); None for every task."""
    return None if jobs is None else {job.task.name for job in jobs if DOMAIN in job.recipe.stages}


def check_example_lengths(exp: Experiment, data: ExperimentData, jobs: Sequence[Job] | None = None) -> None:
    """ConfigError when a task that ``jobs`` train on (all tasks when None) has a training example longer than the
    model's context: positions the model never saw, or an index error in its position embedding. ``max_length`` may
    exceed the context as long as no example does (short items), and a task only scored (``methods: [base]``) is
    not checked. :func:`check_context` catches packed text before tokenizing; this sees every kind's examples."""
    from forgetless.models import context_length

    trained = _trained_tasks(jobs)
    context = context_length(exp.model)
    if context is None:
        return
    for i, task in enumerate(exp.tasks):
        if trained is not None and task.name not in trained:
            continue
        longest = max((len(e["input_ids"]) for e in data.tasks[task.name][0]), default=0)
        if longest > context:
            raise ConfigError(f"{where(exp, f'tasks[{i}].max_length')}: {task.max_length} lets this task's training "
                              f"examples reach {longest} tokens, longer than the model's context ({context} "
                              f"positions, its max_position_embeddings); set it to at most {context}")


def check_output_possible(folder: Path, where_: str) -> None:
    """What :func:`check_output` checks, without creating or writing anything (``run --dry-run``): the folder, or
    the nearest folder above it that exists, must be writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where_}: the output folder {folder} is not writable "
                          f"({existing} {'is not a folder' if not existing.is_dir() else 'is read-only'})")


def validate(exp: Experiment, jobs: list[Job], stages_dir: Path | None) -> RawData:
    """Check what the runs ``jobs`` need before any model loads: the model's source, the LoRA targets (against the
    model's configuration), the cached general and domain stages they would use, and every data file (read here,
    returned)."""
    check_model(exp, jobs)
    if stages_dir is not None:
        shared = shared_domain_stages(exp) if any(DOMAIN in job.recipe.stages for job in jobs) else set()
        for job in jobs:
            if GENERAL in job.recipe.stages:
                _check_cached_stage(stages_dir / general_stage_name(exp, job.recipe, job.seed), job.recipe)
            domain = shared_domain_stage(exp, job.recipe, job.task, job.seed, shared)
            if domain is not None:
                _check_cached_stage(stages_dir / domain, None)
    return read_data(exp)


def _inside(folder: Path, path: Path) -> Path:
    """``path``, which must lie inside ``folder`` (names are checked; this is the last guard)."""
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(f"{path}: outside the output folder {folder}; refusing to write there")
    return path


# ------------------------------------------------------------------------------------------------ the runner
def _sort_finished(exp: Experiment, jobs: list[Job]) -> tuple[list[Job], list[tuple[Job, dict]], int]:
    """(runs to do, finished runs whose record does not fit with that record, records without settings reused)."""
    from forgetless.reporting.tables import finite_record, read_record

    pending, stale, unrecorded = [], [], 0
    for job in jobs:
        path = exp.output / "runs" / f"{job.rid}.json"
        if not path.is_file():
            pending.append(job)
            continue
        record = read_record(path)
        digest = record.get("settings_digest")
        if not finite_record(record) or (digest is not None and digest not in job.digests):
            stale.append((job, record))
        unrecorded += digest is None and finite_record(record)
    return pending, stale, unrecorded


def _stale_reason(job: Job, record: dict[str, Any]) -> str:
    from forgetless.reporting.tables import finite_record

    if not finite_record(record):
        return "has a non-finite number (it diverged)"
    return _changes(record.get("settings") or {}, job)


def _changes(old: dict[str, Any], job: Job) -> str:
    """:func:`settings_changes` from a record's settings to the job's, as this version writes them or, for a record
    written before session 35, as that version did (whichever differs less: the record does not say which)."""
    forms = [n for n in (job.settings, job.legacy) if n is not None]
    return settings_changes(old, min(forms, key=lambda new: len(_changed_keys(old, new))))


def set_aside(path: Path, suffix: str) -> Path:
    """Rename ``path`` to ``NAME.SUFFIX`` (``NAME.SUFFIX.1``, ... when that is taken): kept, never overwritten."""
    target, n = path.with_name(f"{path.name}.{suffix}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{suffix}.{n}"), n + 1
    path.rename(target)
    return target


def _set_aside(out: Path, job: Job, record: dict[str, Any], log_dirs: Sequence[str | None] = ()) -> None:
    """Rename a stale run's record, adapter, surfaces, logs and checkpoints with its digest: kept beside the new ones,
    never overwritten. The set-aside record's surface paths are rewritten to the surfaces' new folder, so that it does
    not point at the files the new run writes. ``log_dirs``: the stages' ``logging_dir`` settings (the run's tracker
    files are in ``LOGGING_DIR/RUN_ID`` where one is set; the new run's would mix with them)."""
    suffix = record.get("settings_digest") or "old"
    adapters = out / "adapters"
    moved = {}
    logs = dict.fromkeys([out / "logs" / job.rid] + [Path(d) / job.rid for d in log_dirs if d])
    # its checkpoints too (kept with keep_checkpoints): the redone run went on from the old run's last one
    for path in (out / "runs" / f"{job.rid}.json", adapters / job.rid, adapters / f"{job.rid}.selected",
                 out / "landscape" / job.rid, *logs, out / "checkpoints" / job.rid):
        if path.exists():
            moved[path] = set_aside(path, suffix)
    kept, surfaces = moved.get(out / "runs" / f"{job.rid}.json"), moved.get(out / "landscape" / job.rid)
    if kept is not None and surfaces is not None:
        old, new = f"landscape/{job.rid}/", f"landscape/{surfaces.name}/"
        entry = record.get("landscape") or {}
        for part in (entry, entry.get("all_weights") or {}):
            if isinstance(part.get("surface"), str) and part["surface"].startswith(old):
                part["surface"] = new + part["surface"][len(old):]
        _write_json(kept, record)


def _logging_dirs(exp: Experiment) -> list[str | None]:
    return [exp.train.general.logging_dir, exp.train.domain.logging_dir]


def run_experiment(exp: Experiment, progress: bool = True, rerun_changed: bool = False,
                   jobs: int = 1) -> list[dict[str, Any]]:
    """Run every (method, task, seed) not already finished with the same settings; write tables; return all results.

    Finished runs whose settings changed are a ConfigError listing them, unless ``rerun_changed``: then they are
    redone, their old records kept as ``runs/RUN_ID.json.DIGEST``. The output folder is locked while this runs.
    ``jobs`` > 1: that many worker processes train the runs side by side (:func:`_run_parallel`)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and PartialState().num_processes > 1:
        raise ConfigError("--jobs runs several runs side by side in one process each; under `accelerate launch` "
                          "every run already uses all the processes: use one or the other")
    out = exp.output
    with _removed_if_untouched(out):
        check_output(out, where(exp, "output"))
        with output_lock(out) if is_main_process() else contextlib.nullcontext():
            return _run_locked(exp, progress, rerun_changed, workers=jobs)


@contextlib.contextmanager
def _removed_if_untouched(folder: Path) -> Iterator[None]:
    """A command that creates its output folder and then stops on an error before writing anything (a bad LoRA
    target, a data file that does not parse) removes the folder again: only what it made itself, only while that is
    nothing but an empty lock file and empty folders."""
    created = not folder.exists()
    try:
        yield
    except BaseException:
        if created and is_main_process() and folder.is_dir():
            made = [p for p in folder.rglob("*") if not p.is_dir()]
            if all(p.name == LOCK_FILE and p.stat().st_size == 0 for p in made):
                shutil.rmtree(folder, ignore_errors=True)
        raise


def job_groups(exp: Experiment, jobs: list[Job]) -> list[list[Job]]:
    """``jobs`` in groups that share a general stage (each group in plan order; a run without a general stage is a
    group of its own): one worker trains a group's stage once and reuses it for the rest. A stage already in the
    cache (``output/stages``) needs no training: its runs are groups of their own, so workers take them side by side
    (reading a cached stage together is safe; what a run adds beside it is written atomically). Runs that would share
    a domain stage not cached yet (``wise-ft`` and ``lora-nu-mu``) stay in one group too, so the second takes it from
    the cache instead of training it beside the first."""
    groups: dict[str, list[Job]] = {}
    shared = shared_domain_stages(exp)
    for job in jobs:
        stage = general_stage_name(exp, job.recipe, job.seed) if GENERAL in job.recipe.stages else None
        domain = shared_domain_stage(exp, job.recipe, job.task, job.seed, shared)
        if stage is not None and not is_cached_stage(exp.output / "stages" / stage):
            key = stage  # the same domain stage implies the same general stage: such runs are in here together
        elif domain is not None and not is_cached_stage(exp.output / "stages" / domain):
            key = domain
        else:
            key = f"run {job.rid}"
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def _train_job(exp: Experiment, job: Job, data: ExperimentData, progress: bool) -> dict[str, Any]:
    """:func:`run_one` of ``job`` with its folders in ``exp.output`` (stage cache, checkpoints, adapter)."""
    out = exp.output
    checkpoints = _inside(out, out / "checkpoints" / job.rid)
    earlier = _checkpoint_precision(out, job)  # an interrupted session's, kept: it computed the steps before
    if is_main_process():  # what its checkpoints, if it writes any, are written under
        checkpoints.mkdir(parents=True, exist_ok=True)
        _write_json(_checkpoint_settings(out, job.rid), {"settings_digest": job.digest, "settings": job.settings,
                                                         "computed": {"precision": earlier or _precision_here(exp)},
                                                         "keep_checkpoints": exp.train.domain.keep_checkpoints})
    record = run_one(exp, job.entry, job.task, job.seed, data, stages_dir=out / "stages", progress=progress,
                     checkpoint_dir=checkpoints,
                     adapter_dir=_inside(out, out / "adapters" / job.rid))
    resumed = any("resumed_from_step" in (stage.get("extras") or {}) for stage in record["stages"]
                  if not stage.get("cached"))
    now = record.get("computed", {}).get("precision")
    if resumed and earlier not in (None, now):  # trained partly on another machine: the record says both
        record["computed"]["precision"] = f"{earlier}, then {now}"
    return record


def _checkpoint_precision(out: Path, job: Job) -> str | None:
    """The precision an interrupted session of ``job`` computed in, from its checkpoint settings (None: none)."""
    saved = _saved_settings(out, job.rid)
    if saved is None or saved.get("settings_digest") not in job.digests:
        return None
    return (saved.get("computed") or {}).get("precision")


def _keep(exp: Experiment, rid: str, record: dict[str, Any]) -> str:
    """Write a finished run's record (it counts as done from then on), drop its emptied checkpoint folders; return its
    scores line."""
    out = exp.output
    _write_json(_inside(out, out / "runs" / f"{rid}.json"), record)
    _drop_checkpoints(exp, rid)
    return _scores_line(record)


def _drop_checkpoints(exp: Experiment, rid: str, left_behind: bool = False) -> None:
    """A recorded run's checkpoint folder: its domain stage's checkpoints, kept until the record was written
    (pipeline.run_recipe), and their settings, unless ``keep_checkpoints``; then the folder if that emptied it.
    ``left_behind``: a folder found by a later ``forgetless run``; kept when the run was trained with
    ``keep_checkpoints`` (its checkpoint settings say so), whatever the YAML says now."""
    out = exp.output
    kept = (_saved_settings(out, rid) or {}).get("keep_checkpoints") if left_behind else None
    if not (exp.train.domain.keep_checkpoints or kept):
        checkpoint.remove(out / "checkpoints" / rid / DOMAIN)
        _checkpoint_settings(out, rid).unlink(missing_ok=True)
    _drop_empty(out / "checkpoints" / rid)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(1, round(seconds / 60))} min"


def jobs_to_do(exp: Experiment, jobs: list[Job]) -> list[Job]:
    """The jobs ``forgetless run`` would train: not finished, or finished with other settings."""
    pending, stale, _ = _sort_finished(exp, jobs)
    return pending + [job for job, _ in stale]


def _checkpoint_settings(output: Path, rid: str) -> Path:
    """The settings an interrupted run's checkpoints were written under (its digest and settings, as a record has)."""
    return output / "checkpoints" / rid / "settings.json"


def _saved_settings(output: Path, rid: str) -> dict[str, Any] | None:
    """What :func:`_train_job` wrote beside run ``rid``'s checkpoints (its settings, their digest, how it computed);
    None when there is none or it does not parse."""
    try:
        saved = json.loads(_checkpoint_settings(output, rid).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def stale_checkpoints(exp: Experiment, jobs: list[Job]) -> list[tuple[Job, str, str]]:
    """The interrupted runs among ``jobs`` whose checkpoint was written under other settings: (job, what differs,
    the old settings' digest). Going on from one would train neither the old run nor the new one. A checkpoint from
    before the settings were kept beside it is left to the stage's own check
    (:func:`forgetless.training.checkpoint.load`)."""
    found = []
    for job in jobs:
        if resume_point(exp.output, job.rid) is None:
            continue
        saved = _saved_settings(exp.output, job.rid)
        if saved is None:
            continue
        if saved.get("settings_digest") not in job.digests:
            found.append((job, _changes(saved.get("settings") or {}, job),
                          saved.get("settings_digest") or "old"))
    return found


def _listed(reasons: list[tuple[str, str]]) -> str:
    """``RUN_ID: why`` lines for an error message, the first ten and how many more."""
    lines = "".join(f"\n  {rid}: {why}" for rid, why in reasons[:10])
    return lines + (f"\n  ... and {len(reasons) - 10} more" if len(reasons) > 10 else "")


def resume_point(output: Path, rid: str) -> tuple[str, int] | None:
    """(stage, optimizer steps done) of an interrupted run's newest complete checkpoint, else None."""
    for stage in (DOMAIN, GENERAL):  # the later stage's checkpoint is the one it resumes from
        found = checkpoint.latest(output / "checkpoints" / rid / stage)
        if found is not None:
            return stage, int(found.name.removeprefix("step-"))
    return None


def _seconds_by_method(output: Path) -> dict[str, dict[str, float]]:
    """Per method label, from its finished runs in ``output``: the mean wall seconds of a run (``"run"``), of each
    stage it trained (``"general"``, ``"domain"``) and of one optimizer step of it (``"general/step"``, ...); no
    records: empty."""
    seconds: dict[str, dict[str, list[float]]] = {}
    for path in sorted((output / "runs").glob("*.json")) if (output / "runs").is_dir() else []:
        try:  # the record's times first, then added: a record missing one adds nothing (no empty list)
            record = json.loads(path.read_text())
            times = {"run": float(record["seconds"])}
            for stage in record.get("stages") or []:
                if not stage.get("cached") and stage.get("steps"):
                    times[stage["stage"]] = float(stage["seconds"])
                    times[f"{stage['stage']}/step"] = float(stage["seconds"]) / int(stage["steps"])
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError):
            continue  # a corrupt record is reported where it is read for real
        mine = seconds.setdefault(record["method"], {})
        for key, value in times.items():
            mine.setdefault(key, []).append(value)
    return {method: {k: sum(v) / len(v) for k, v in parts.items()} for method, parts in seconds.items()}


def _time_left(took: dict[str, dict[str, float]], output: Path, job: Job) -> float | None:
    """Estimated wall seconds of a run still to do: its method's mean, less the steps an interrupted run's checkpoint
    has done (at that stage's mean time per step, and the whole general stage when it resumes in the domain one)."""
    known = took.get(job.recipe.label)
    if known is None:
        return None
    left = known["run"]
    point = resume_point(output, job.rid)
    if point is not None:
        stage, done = point
        left -= done * known.get(f"{stage}/step", 0.0)
        if stage == DOMAIN:
            left -= known.get(GENERAL, 0.0)
    return max(left, 0.0)


def time_to_do(exp: Experiment, todo: list[Job]) -> tuple[float, int]:
    """(estimated wall seconds of the runs ``todo`` whose method has a finished run here, how many runs have none).
    With a ``landscape:`` section a run's estimate includes its flatness, measured right after it (once a
    measurement of that kind is recorded)."""
    known = [t for t in _job_seconds(exp, todo) if t is not None]
    return sum(known), len(todo) - len(known)


def _job_seconds(exp: Experiment, todo: list[Job]) -> list[float | None]:
    """Each run's estimated seconds (:func:`time_to_do`), None for a method with no finished run here."""
    took = _seconds_by_method(exp.output)
    flatness = _landscape_estimate(exp)
    out: list[float | None] = []
    for job in todo:
        left = _time_left(took, exp.output, job)
        out.append(None if left is None else left + flatness(bool(job.recipe.stages), job.seed))
    return out


def wall_seconds(exp: Experiment, todo: list[Job], workers: int, seconds: list[float | None] | None = None) -> float:
    """The wall time of the timed runs of ``todo`` on ``workers`` workers: their sum shared out, but no less than the
    largest group's (:func:`job_groups`: runs sharing a stage to train run one after another in one worker).
    ``seconds``: each run's estimate (:func:`_job_seconds`) where the caller has it already."""
    times = dict(zip(map(id, todo), _job_seconds(exp, todo) if seconds is None else seconds))
    total = sum(t for t in times.values() if t is not None)
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        return total
    largest = max(sum(times[id(job)] or 0.0 for job in group) for group in job_groups(exp, todo))
    return max(total / workers, largest)


def _landscape_estimate(exp: Experiment) -> Callable[[bool, int], float]:
    if exp.landscape is None or not (exp.output / "runs").is_dir():
        return lambda trains, seed: 0.0
    from forgetless.landscape_runs import seconds_per_run

    try:
        return seconds_per_run(exp.output, exp.model, exp.landscape, exp.general.block_size,
                               exp.general.heldout.cache_key())
    except ConfigError:  # a corrupt record: no estimate here; it is reported where records are read for real
        return lambda trains, seed: 0.0


def left_line(exp: Experiment, workers: int = 1) -> str:
    """``"K/N runs recorded; about T left"``: the experiment's progress, the time left estimated as ``forgetless run
    --dry-run`` does (:func:`time_to_do`), over ``workers`` (:func:`wall_seconds`: shared out, but no less than the
    longest chain of runs that share a stage); runs of methods with no finished run yet are counted,
    not timed."""
    jobs = plan_runs(exp)
    todo = jobs_to_do(exp, jobs)
    line = f"{len(jobs) - len(todo)}/{len(jobs)} runs recorded"
    seconds = _job_seconds(exp, todo)  # the finished runs' records, read once
    unknown = seconds.count(None)
    if unknown < len(todo):
        line += f"; about {_hours(wall_seconds(exp, todo, workers, seconds))} left"
        if unknown:
            line += f" besides {unknown} run(s) of methods not timed yet"
    elif todo:
        line += "; the time left is estimated once a run of each method has finished"
    return line


def _precision_here(exp: Experiment) -> str:
    from forgetless.precision import default_device, resolve_precision

    return resolve_precision(exp.precision, default_device())


def computed_elsewhere(exp: Experiment) -> str:
    """A warning ("" when there is none) when finished runs, cached general stages or checkpoints of ``exp`` were
    computed in another precision than this machine gives ``exp.precision``: ``auto`` is bf16 on a CPU with native
    bf16 (and on a GPU with it) and fp32 on an AVX2-only CPU, so an experiment resumed on another machine would set
    side by side runs computed differently, or go on from a stage computed differently. Only this experiment's runs
    and stages count (not records set aside); this machine's precision is looked up only when one of them says how it
    computed (on a GPU that opens a CUDA context in this process)."""
    out = exp.output
    jobs = plan_runs(exp)
    rids = {job.rid for job in jobs}
    stages = {general_stage_name(exp, job.recipe, job.seed) for job in jobs if GENERAL in job.recipe.stages}
    stages |= shared_domain_stages(exp)
    found: list[tuple[str, str]] = []  # (precision, what)
    for kind, paths, name, ours in (("run", out.glob("runs/*.json"), lambda p: p.stem, rids),
                                    ("general stage", out.glob("stages/*/stage.json"), lambda p: p.parent.name, stages),
                                    ("checkpoint", out.glob("checkpoints/*/settings.json"), lambda p: p.parent.name,
                                     rids)):
        for path in sorted(paths):
            if name(path) not in ours:
                continue
            try:
                computed = json.loads(path.read_text()).get("computed") or {}
            except (OSError, ValueError, AttributeError):
                continue  # an unreadable record is reported where records are read
            if computed.get("precision") is not None:
                found.append((str(computed["precision"]), f"{kind} {name(path)}"))
    if not found:
        return ""
    here = _precision_here(exp)
    other: dict[str, list[str]] = {}
    for precision, what in found:
        if precision != here:
            other.setdefault(precision, []).append(what)
    if not other:
        return ""
    said = "; ".join(f"{len(names)} in {p} ({names[0]}{' and more' if len(names) > 1 else ''})"
                     for p, names in other.items())
    return (f"    warning: finished runs, cached general stages or checkpoints here were computed in another precision "
            f"than this machine gives precision {exp.precision!r} ({here}): {said}. The runs left will not be "
            f"computed alike; pin `precision:` to theirs to keep them alike (bf16 on a CPU without native bf16 is "
            f"slower)")


def planned_ids(exp: Experiment) -> set[str]:
    """The run ids ``exp`` plans: the landscape step measures and counts their records only (a folder may hold
    records of seeds, methods or a base model the file no longer names, as the tables leave them out)."""
    return {job.rid for job in plan_runs(exp)}


def _measure_landscape(exp: Experiment, progress: bool, only: set[str] | None = None) -> None:
    """The landscape step (:func:`forgetless.landscape_runs.measure_runs`) on ``exp``'s runs, or on ``only``."""
    from forgetless.landscape_runs import measure_runs

    heldout = exp.general.heldout
    measure_runs(exp.output, exp.model, exp.landscape, lambda: _texts(exp, heldout), exp.general.block_size,
                 data_key=heldout.cache_key(), progress=progress, only=only, planned=planned_ids(exp))


def _landscape_now(exp: Experiment, rid: str, progress: bool) -> None:
    """The flatness of run ``rid``, measured as soon as its record is written (while its adapter is surely there):
    an experiment stopped later has it in the record already. A measurement that fails is left to the landscape step
    at the end, which measures what is missing and raises what fails again; the runs go on. Not under
    ``accelerate launch`` with several processes: the main one measures, so the landscape step does it at the end."""
    from forgetless.landscape_runs import LandscapeFailed

    if exp.landscape is None:
        return
    try:
        _measure_landscape(exp, progress, only={rid})
    except Exception as error:  # noqa: BLE001 - the landscape step retries it and raises
        problems = error.problems if isinstance(error, LandscapeFailed) else [f"{type(error).__name__}: {error}"]
        for problem in problems:
            say(f"    landscape not measured now: {problem}; the landscape step at the end tries again")


_WORKER: dict[str, Any] = {}  # a worker process's state: its torch threads and device, the experiment's data


def worker_gpu(number: int, devices: int, visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of worker ``number``: one of the GPUs this process sees, taken from its own list
    when it has one (a scheduler's ``2,3`` stays on GPUs 2 and 3), else an index."""
    listed = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    listed = listed[:devices]  # as many as torch counts (a list with a bad entry is longer)
    return listed[number % len(listed)] if listed else str(number % devices)


def _worker_start(threads: int, devices: int, counter: Any, workers: int = 1) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers (_in_workers)
    if sys.platform.startswith("linux"):  # a parent killed outright (SIGKILL) takes its workers with it
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    with counter.get_lock():
        number = counter.value
        counter.value += 1
    if devices > 1:  # one GPU per worker (CUDA is not initialised yet in this fresh process)
        os.environ["CUDA_VISIBLE_DEVICES"] = worker_gpu(number, devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
    torch.set_num_threads(threads)
    _WORKER["number"], _WORKER["workers"] = number, workers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of several workers would garble one terminal


def _worker_run(exp: Experiment, rids: list[str], progress: bool = True, stale: frozenset[str] = frozenset()) -> None:
    """Run the jobs ``rids`` of ``exp`` in this worker process and write each record. A run of ``stale`` (finished
    under other settings, ``--rerun-changed``) has its record, adapter and surfaces set aside when it starts, after
    the data loaded: a data error leaves them in place."""
    key = json.dumps(_non_default(exp), sort_keys=True, default=str)  # tokenized once per worker and experiment
    if _WORKER.get("data_for") != key:
        _WORKER["data"], _WORKER["data_for"] = load_data(exp, read_data(exp)), key
    plan = {job.rid: job for job in plan_runs(exp)}
    check_example_lengths(exp, _WORKER["data"], [plan[rid] for rid in rids])
    for rid in rids:
        say(f"[worker {_WORKER.get('number', 0)}] {rid}")  # whole lines: the workers share one stdout
        recorded = exp.output / "runs" / f"{rid}.json"
        if rid in stale and recorded.is_file():
            _set_aside(exp.output, plan[rid], json.loads(recorded.read_text()), _logging_dirs(exp))
        with plain_lines(f"[{rid}] ") if progress else contextlib.nullcontext():  # lines, not bars, led by the run
            record = _named(rid, lambda: _train_job(exp, plan[rid], _WORKER["data"], progress))
        say(f"    {rid}: {_named(rid, lambda: _keep(exp, rid, record))}")
        with plain_lines(f"[{rid}] ") if progress else contextlib.nullcontext():
            _landscape_now(exp, rid, progress)
        say(f"    [{left_line(exp, _WORKER.get('workers', 1))}]")


def _run_parallel(exp: Experiment, todo: list[Job], workers: int, progress: bool = True,
                  stale: set[str] | None = None) -> None:
    """Train ``todo`` in ``workers`` fresh processes, each taking the next group of runs that share a general stage
    (:func:`job_groups`, largest first) when it is free; each writes its runs' records into ``exp.output`` (this
    process holds the folder's lock). Progress is plain lines led by the run id (bars would garble each other). A
    run that fails stops its worker's group; the other groups go on, then the first failure is raised (the others'
    are printed)."""
    groups = sorted(job_groups(exp, todo), key=len, reverse=True)
    workers = min(workers, len(groups))
    print(f"    {len(todo)} run(s) in {len(groups)} group(s) sharing a general stage, on {workers} worker processes "
          f"({_share_out(workers)[2]})")
    def left(i: int) -> str:  # the group's runs not recorded when the pool broke
        return ", ".join(job.rid for job in groups[i] if not (exp.output / "runs" / f"{job.rid}.json").is_file())

    stale = frozenset(stale or ())
    _in_workers(workers, [(_worker_run, (exp, [job.rid for job in group], progress, stale & {job.rid for job in group}))
                          for group in groups], names=left)


def _share_out(workers: int) -> tuple[int, int, str]:
    """(torch threads per worker, GPUs, how the workers share the machine)."""
    devices = torch.cuda.device_count()
    threads = max(1, torch.get_num_threads() // workers)
    return threads, devices, f"{devices} GPUs, one per worker" if devices > 1 else (
        "one GPU, shared" if devices == 1 else f"{threads} torch thread(s) each")


def _worker_landscape(exp: Experiment, rids: list[str], progress: bool, workers: int = 1) -> None:
    """Measure ``rids`` (runs with one adapter: the first is measured, the others copy it) in this worker."""
    from forgetless.landscape_runs import left_line as landscape_left

    with plain_lines(f"[{rids[0]}] ") if progress else contextlib.nullcontext():
        _measure_landscape(exp, progress, only=set(rids))
    left = landscape_left(exp.output, exp.model, exp.landscape, exp.general.block_size,
                          exp.general.heldout.cache_key(), workers, only=planned_ids(exp))
    print(f"    [{left}]")


def _landscape_parallel(exp: Experiment, workers: int, progress: bool) -> None:
    """The landscape step's runs measured by ``workers`` worker processes, one task per distinct adapter
    (:func:`landscape_groups`)."""
    from forgetless.landscape_runs import runs_to_measure

    rids = runs_to_measure(exp.output, exp.model, exp.landscape, exp.general.block_size,
                           data_key=exp.general.heldout.cache_key(), only=planned_ids(exp))
    groups = landscape_groups(exp.output, rids)
    if len(groups) < 2:
        return
    workers = min(workers, len(groups))
    print(f"landscape: measuring {len(rids)} run(s) on {workers} worker processes ({_share_out(workers)[2]})")
    _in_workers(workers, [(_worker_landscape, (exp, group, progress, workers)) for group in groups],
                names=lambda i: f"the flatness of {', '.join(groups[i])}")


def landscape_groups(output: Path, rids: list[str]) -> list[list[str]]:
    """``rids`` grouped by their adapter's hash (``adapter_sha256``; a run without one is a group of its own), in
    order: one worker measures a group's first run and copies it for the others, where two workers would measure
    the same model at once (WiSE-FT beside lora-nu-mu, neither recorded yet)."""
    from forgetless.landscape_runs import adapter_sha256

    groups: dict[str, list[str]] = {}
    for rid in rids:
        sha = adapter_sha256(output / "adapters" / rid)
        groups.setdefault(sha if sha is not None else f"run {rid}", []).append(rid)
    return list(groups.values())


def _in_workers(workers: int, tasks: list[tuple[Callable[..., Any], tuple]],
                names: Callable[[int], str] | None = None) -> None:
    """Run ``tasks`` (function, arguments) in ``workers`` fresh processes, each taking the next task when free; the
    torch threads are shared out, and with several GPUs each worker gets one. A failed task does not stop the others;
    the first failure is raised once all are done, the others printed. Ctrl-C stops every worker at once (they
    ignore SIGINT themselves, which would otherwise let each finish the tasks already queued to it). A worker that
    dies (the out-of-memory killer, a signal) takes the pool's other work with it: that is a :class:`RunFailed`
    naming the tasks (``names``) left unfinished."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads, devices, _ = _share_out(workers)
    context = multiprocessing.get_context("spawn")  # fresh processes: no forked torch / CUDA state
    counter = context.Value("i", 0)
    failures: list[BaseException] = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start,
                             initargs=(threads, devices, counter, workers)) as pool:
        futures = [pool.submit(function, *args) for function, args in tasks]
        try:
            pending = set(futures)
            while pending:  # a timeout: Ctrl-C must reach this thread even when the kernel hands the signal to
                # another one (the executor's threads), which leaves a wait without timeout blocked until a run ends
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                failures += [f.exception() for f in finished if f.exception() is not None]
        except KeyboardInterrupt:  # stop now: the runs in progress are lost (but for their checkpoints)
            _stop_workers(pool)
            raise
    broken = [i for i, f in enumerate(futures) if not f.cancelled() and isinstance(f.exception(), BrokenProcessPool)]
    failures = [f for f in failures if not isinstance(f, BrokenProcessPool)]
    if failures:  # the first is raised (the command's error line); the others are said, else no line named them
        for other in failures[1:]:
            print(f"forgetless: error (another worker): {other}", file=sys.stderr)
        raise failures[0]
    if broken:
        left = "; ".join(said for said in (names(i) if names else f"task {i}" for i in broken) if said)
        raise RunFailed(f"a worker process ended abruptly (killed: out of memory, or a signal), and the work of the "
                        f"others stopped with it; not finished: {left or 'nothing left'}. The finished runs' records "
                        f"are kept; `forgetless run` again resumes")


def _stop_workers(pool: Any, grace: float = 10.0) -> None:
    """End ``pool``'s worker processes now, whatever they are doing, without waiting on anything they could block.

    SIGTERM, then SIGKILL for a worker still alive after ``grace`` seconds; the queued tasks are cancelled and the
    call queue's feeder thread is not waited for (with its workers gone, a task still being written into the pipe
    would never be read). ``shutdown`` then only joins the executor's own thread."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(grace)
        if process.is_alive():
            process.kill()
            process.join(grace)
    call_queue = getattr(pool, "_call_queue", None)
    if call_queue is not None:
        call_queue.cancel_join_thread()
    pool.shutdown(wait=True, cancel_futures=True)


def _run_locked(exp: Experiment, progress: bool, rerun_changed: bool, workers: int = 1) -> list[dict[str, Any]]:
    out = exp.output
    (out / "runs").mkdir(parents=True, exist_ok=True)
    jobs = plan_runs(exp)
    pending, stale, unrecorded = _sort_finished(exp, jobs)
    if stale and not rerun_changed:
        listed = _listed([(job.rid, _stale_reason(job, record)) for job, record in stale])
        raise ConfigError(f"{where(exp, 'output')}: {len(stale)} finished run(s) in {out} do not fit the experiment "
                          f"now and are not reused:{listed}\nrun again with --rerun-changed to redo them (each "
                          f"old record is kept beside, as runs/RUN_ID.json.DIGEST), or write to another output folder")
    interrupted = stale_checkpoints(exp, pending)
    if interrupted and not rerun_changed:
        listed = _listed([(job.rid, why) for job, why, _ in interrupted])
        raise ConfigError(f"{where(exp, 'output')}: {len(interrupted)} interrupted run(s) in {out} were checkpointed "
                          f"under other settings, and going on from there would train neither:{listed}\nrun "
                          f"again with --rerun-changed to start them over (each old checkpoint folder is kept beside, "
                          f"as checkpoints/RUN_ID.DIGEST), or restore the settings")
    if interrupted and is_main_process():
        for job, _, old in interrupted:
            set_aside(out / "checkpoints" / job.rid, old)
        print(f"    starting over {len(interrupted)} interrupted run(s) whose settings changed; their checkpoints are "
              f"kept as checkpoints/RUN_ID.DIGEST")
    chosen = {id(job) for job in pending} | {id(job) for job, _ in stale}
    todo = [job for job in jobs if id(job) in chosen]
    if is_main_process():  # once, not once a process under accelerate launch
        print(f"experiment {exp.name}: {len(jobs)} runs, {len(jobs) - len(todo)} already done, writing to {out}")
        if unrecorded:
            print(f"    {unrecorded} of them were recorded without their settings (an older forgetless): reused as "
                  f"they are; delete a record to redo that run")
        if stale:
            print(f"    redoing {len(stale)} run(s) whose settings changed; old records kept as "
                  f"runs/RUN_ID.json.DIGEST")
        if todo and (elsewhere := computed_elsewhere(exp)):
            print(elsewhere)
    raw = validate(exp, todo, out / "stages") if todo else None
    if is_main_process():  # a run killed between its record and its checkpoints' removal left them behind (after
        for job in jobs:  # the checks: a run that stops on an error changes nothing)
            if id(job) not in chosen and (out / "checkpoints" / job.rid).is_dir():
                _drop_checkpoints(exp, job.rid, left_behind=True)
    PartialState().wait_for_everyone()  # every process sees the checkpoints as the main one left them
    current, failed, landscape_step = None, None, False
    parallel = workers > 1 and len(todo) > 1
    try:
        if parallel:  # each worker sets its stale runs aside once its data is tokenized (as below)
            _run_parallel(exp, todo, workers, progress, stale={job.rid for job, _ in stale})
        elif todo:
            data = load_data(exp, raw)
            check_example_lengths(exp, data, todo)
            for number, job in enumerate(todo, 1):
                current = job.rid
                if is_main_process():
                    print(f"[{number}/{len(todo)}] {job.rid}")
                    for stale_job, record in stale:
                        if stale_job is job:
                            _set_aside(out, job, record, _logging_dirs(exp))
                record = _named(job.rid, lambda: _train_job(exp, job, data, progress))
                current = None
                if is_main_process():  # under `accelerate launch`, every process trains; only one writes
                    print(f"    {_named(job.rid, lambda: _keep(exp, job.rid, record))}")
                    if PartialState().num_processes == 1:  # else the others would wait on it in the next run's
                        _landscape_now(exp, job.rid, progress)  # first collective, past a timeout on a large model
                    print(f"    [{left_line(exp)}]")
        if exp.landscape is not None and is_main_process():
            landscape_step = True
            failed = _landscape_step(exp, workers, progress)
    except KeyboardInterrupt:
        stopped = f"{current} was stopped and is not recorded; " if current else (
            "the landscape step was stopped (every run is recorded; the flatness measured so far is too); "
            if landscape_step else "the runs in progress were stopped and are not recorded; " if parallel else "")
        raise Interrupted(f"{stopped}the finished runs' records in {out / 'runs'} are kept; `forgetless run` again "
                          f"resumes") from None
    from forgetless.reporting.tables import load_results

    results, others = planned_records(load_results(out), jobs)
    if is_main_process():
        _write_report(exp, results, others)
    if failed is not None:  # the tables first: a run that cannot be measured does not keep them from the others
        raise failed
    return results


def _landscape_step(exp: Experiment, workers: int, progress: bool) -> Exception | None:
    """Measure the flatness the records still lack (with ``workers`` processes, then what is left with one, which
    names every run it cannot measure); return that failure rather than raise it."""
    from forgetless.landscape_runs import LandscapeFailed

    try:
        if workers > 1:
            try:
                _landscape_parallel(exp, workers, progress)
            except (LandscapeFailed, RunFailed):  # a failure, or a worker killed (out of memory with two at once)
                pass  # measured again below, with one worker, which names every run left
        _measure_landscape(exp, progress)  # what is left: everything, with one worker
    except LandscapeFailed as error:
        return error
    return None


def planned_records(records: list[dict[str, Any]], jobs: Sequence[Job]) -> tuple[list[dict[str, Any]],
                                                                                   list[dict[str, Any]]]:
    """(the records of ``jobs`` with their settings, the others). A folder's ``runs/`` may hold records the
    experiment no longer plans (a seed, method or task taken out of the YAML, records copied in from another
    folder): averaged in, they would mix other settings into the tables without a word. A record without settings
    (an older forgetless) counts as its job's, as the planner reuses it."""
    planned = {job.rid: job.digests for job in jobs}

    def mine(record: dict[str, Any]) -> bool:
        return record.get("run_id") in planned and (record.get("settings_digest") is None
                                                    or record["settings_digest"] in planned[record["run_id"]])

    return [r for r in records if mine(r)], [r for r in records if not mine(r)]


def _others_note(others: list[dict[str, Any]]) -> str:
    if not others:
        return ""
    names = ", ".join(str(r.get("run_id")) for r in others[:12]) + (", ..." if len(others) > 12 else "")
    return (f"\nNot in these tables: {len(others)} record(s) in runs/ that this experiment does not plan, or planned "
            f"with other settings (a seed, method or task no longer in the YAML, a record copied in): {names}. "
            f"`forgetless report` shows any set of records.\n")


def _write_report(exp: Experiment, results: list[dict[str, Any]], others: list[dict[str, Any]] = ()) -> None:
    """``results.md``/``results.csv`` with the sections of HLoRA and flatness, and the figures; ``others``: records
    in the folder left out of them (named in a note)."""
    from forgetless.reporting.flatness import flatness_section
    from forgetless.reporting.forgetting import forgetting_section
    from forgetless.reporting.hlora_plots import hlora_section
    from forgetless.reporting.plots import plot_tradeoff, plot_training_curves
    from forgetless.reporting.tables import finite_record, with_variant_records, write_tables

    out = exp.output
    methods = [method_label(m) for m in exp.methods]
    write_tables(results, out, methods=methods, tasks=[t.name for t in exp.tasks],  # notes the runs left out
                 note=_others_note(list(others)))
    results = [r for r in results if finite_record(r)]
    # the evaluation variants (WiSE-FT's interpolations) as the main table lists them, each after its method
    expanded, order = with_variant_records(results, methods)
    plot_tradeoff(expanded, out / "tradeoff.png")  # the interpolations are points of the trade-off too
    plot_training_curves(results, out / "training_curves.png")
    sections = [hlora_section(results, out), "\n" + forgetting_section(expanded, out, order)]
    if exp.landscape is not None:
        sections.append(flatness_section(results, out, methods=methods))
    with open(out / "results.md", "a") as fh:
        fh.write("".join(s for s in sections if s))
    print(f"tables: {out / 'results.md'}, {out / 'results.csv'}; figures: tradeoff.png, training_curves.png")


# What `forgetless train` writes into its output folder: an adapter (PEFT's files) and, when evaluated, its record.
TRAIN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "run.json",
                 wise_ft.FILENAME, "logs")  # logs: the trackers' (--report-to), OUTPUT/logs


def train_one(exp: Experiment, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """``forgetless train``: the single (method, task, seed) of ``exp`` through :func:`run_one`, as ``run`` does.

    The adapter is saved to ``exp.output``. When the experiment has held-out text or a test set, the run is
    evaluated (WiSE-FT's interpolations too) and its record written to ``exp.output / "run.json"``. A folder that
    already holds an adapter or a record is refused unless ``overwrite``; then the old record goes first, so a record
    never sits beside an adapter it does not describe.
    """
    if len(exp.methods) != 1 or len(exp.tasks) != 1 or len(exp.seeds) != 1:
        raise ConfigError("train: needs exactly one method, one task and one seed")
    recipe = resolve(exp.methods[0])
    if not recipe.stages:
        raise ConfigError(f"train: method {recipe.label!r} trains nothing, so there is no adapter to save")
    if GENERAL in recipe.stages and exp.general.train is None:
        raise ConfigError(f"train: method {recipe.label!r} has a general stage: give the general text (--general)")
    needs = [type(p).__name__ for p in recipe.plugins
             if getattr(p, "needs_general_text", lambda stages: False)(recipe.stages)]
    if needs and exp.general.train is None:
        raise ConfigError(f"train: method {recipe.label!r}: {', '.join(needs)} reads the general text in the domain "
                          f"stage too (a replay mix, a Fisher): give it (--general)")
    held = [name for name in TRAIN_OUTPUTS if (exp.output / name).exists()]
    if held and not overwrite:
        raise ConfigError(f"{where(exp, 'output')}: {exp.output} already holds {', '.join(held)} of an earlier run; "
                          f"give a new folder, or --overwrite to replace them")
    others = sorted(p.name for p in exp.output.iterdir() if not p.name.startswith(".forgetless-")) \
        if exp.output.is_dir() else []  # not another process's write probe (check_output)
    if not held and others:
        # a folder of the user's (PEFT's save_pretrained would rewrite a README.md there as its model card)
        raise ConfigError(f"{where(exp, 'output')}: {exp.output} holds files of its own ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}): give a new or empty folder for the adapter")
    (job,) = plan_runs(exp)
    with _removed_if_untouched(exp.output):
        check_output(exp.output, where(exp, "output"))
        raw = validate(exp, [job], stages_dir=None)
        data = load_data(exp, raw)
        check_example_lengths(exp, data)  # an example past the context: no folder left behind either
    if exp.general.train is not None and GENERAL not in recipe.stages and not needs and is_main_process():
        print(f"note: --general is not used: method {recipe.label!r} has no general stage and reads no general text "
              "(methods that use it: lora-nu-mu, hlora, ewc, replay)", file=sys.stderr)
    if held and is_main_process():  # what the new run may not write again (no test data, another method)
        for name in ("run.json", wise_ft.FILENAME):
            (exp.output / name).unlink(missing_ok=True)
        if (exp.output / "logs").is_dir():  # an earlier run's tracker files: TensorBoard would show both as one run
            shutil.rmtree(exp.output / "logs")
    record = run_one(exp, exp.methods[0], exp.tasks[0], exp.seeds[0], data, adapter_dir=exp.output,
                     stages_dir=None, progress=progress)
    if is_main_process():
        print(f"adapter saved to {exp.output} (PEFT format)")
        if record["general_ppl"] is not None or record["tasks"]:
            _write_json(exp.output / "run.json", record)
            print(f"    {_scores_line(record)}; record: {exp.output / 'run.json'}")
    return record
