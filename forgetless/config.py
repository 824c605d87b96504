"""The experiment YAML as typed data: one dataclass per section, read and checked in one place.

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
    eval: {batch_size: 16, suite: auto}  # suite: every run also scored on the other tasks' test sets (forgetting)
    landscape: {blocks: 4, grid: 9}     # optional: flatness metrics per run vs forgetting (off when absent)

Sections and their dataclasses: ``general`` :class:`GeneralData` (``train``/``heldout`` :class:`TextSource`),
``tasks[i]`` :class:`TaskSpec`, ``train`` :class:`TrainStages` (``general``/``domain``
:class:`~forgetless.training.config.TrainConfig`), ``eval`` :class:`EvalSettings` (``suite[i]`` :class:`SuiteTask`,
``select`` :class:`SelectSettings`), ``lora``
:class:`~forgetless.models.LoraSettings`, ``landscape`` :class:`~forgetless.landscape.measure.LandscapeSettings`,
the whole file :class:`Experiment`. Top-level keys starting with ``x-`` are ignored: a place to define YAML anchors
(sizes, paths) that the rest refers to.

One reader (:func:`read_section`) turns every mapping into its dataclass from the type hints, so a typo anywhere is
caught, not silently ignored: ``exp.yaml: general.train: unknown key 'limt'; known: [...]``. Every error names the
file and the full key path. Values are type-checked; the only conversion is a numeric string to a float, because
YAML 1.1 reads ``1e-4`` (no dot) as a string. A string is never taken for a list (``seeds: "12"``), a float never
for an integer (``seeds: [0.7]``).

Method entries are checked by :func:`forgetless.methods.resolve`, which owns their options.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from forgetless.landscape.measure import LandscapeSettings
from forgetless.lora import DEFAULT_ADAPTER
from forgetless.methods import resolve
from forgetless.models import DEFAULT_MODEL, DTYPES, QUANTIZATIONS, LoraSettings
from forgetless.precision import PRECISIONS
from forgetless.training.config import TrainConfig

T = TypeVar("T")

# metadata of fields the loader fills in (not keys of the YAML file)
_NOT_IN_YAML = {"yaml": False}
# task names become parts of file names (runs/METHOD__TASK__seedN.json): no '/', no '..', nothing a shell expands
SAFE_NAME = re.compile(r"[A-Za-z0-9_.=,+-]+")


def check_name(name: str, what: str = "name") -> None:
    """ValueError unless ``name`` is letters, digits and ``-_.=,+`` only, not starting with a dot."""
    if not SAFE_NAME.fullmatch(name) or name.startswith("."):
        raise ValueError(f"{what} {name!r} may hold only letters, digits and '-_.=,+', and may not start with '.'")


def _at_least(owner: object, minimum: int, *names: str) -> None:
    """ValueError naming the first of ``names`` (optional integer fields of ``owner``) that is below ``minimum``."""
    for name in names:
        value = getattr(owner, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


class ConfigError(ValueError):
    """A problem in an experiment's configuration; the message names the file and the key."""


@dataclass
class TextSource:
    """General text (``general.train``, ``general.heldout``): a ``.jsonl``/``.txt`` file or a hub dataset.

    A bare string is the source: ``train: data/c4.jsonl``.
    """

    SHORTHAND: ClassVar[str] = "source"  # the key a bare string fills

    source: str
    field: str = "text"  # the JSON field holding the text
    split: str = "train"  # hub datasets
    name: str | None = None  # hub dataset configuration, e.g. wikitext-2-raw-v1
    limit: int | None = None  # documents read
    max_blocks: int | None = None  # blocks kept after packing

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source must name a file or a hub dataset")
        _at_least(self, 1, "limit", "max_blocks")

    def cache_key(self) -> dict[str, Any]:
        """The keys set to other than their defaults: what identifies this data in cache keys (the same mapping
        the YAML gave before the schema existed, so cached general stages and landscape measurements stay valid)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name == "source" or getattr(self, f.name) != f.default}


@dataclass
class GeneralData:
    """``general:``: the stage nu text, the held-out text for perplexity, and the block size both are packed in.

    An experiment needs both texts; ``forgetless train`` needs ``train`` only for a general stage (or a method
    that uses general text) and ``heldout`` only to evaluate.
    """

    train: TextSource | None = None
    heldout: TextSource | None = None
    block_size: int = 128

    def __post_init__(self) -> None:
        _at_least(self, 1, "block_size")


@dataclass
class TaskSpec:
    """``tasks[i]``: one domain task, trained on (stage mu) and evaluated on."""

    name: str
    train: str
    test: str | None = None  # required in an experiment; ``forgetless train`` evaluates only when given
    schema: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    train_split: str | None = None  # default: train where the source has splits (a hub id, a folder of split files)
    test_split: str | None = None
    config: str | None = None  # the hub dataset's configuration (allenai/ai2_arc: ARC-Easy), for train and test
    max_length: int = 256  # tokens per training example (train_kind text: the block size)
    # the training data's format (forgetless/data/formats.py): multiple_choice, instructions (Alpaca), chat
    # (messages), prompt_completion, text (packed blocks) or auto (from the first row's fields); tested on the MC task
    train_kind: str = "multiple_choice"

    def __post_init__(self) -> None:
        from forgetless.data import SCHEMAS, TRAIN_KINDS

        check_name(self.name, "the task name")
        if self.train_kind not in TRAIN_KINDS:
            raise ValueError(f"train_kind must be one of {list(TRAIN_KINDS)}, got {self.train_kind!r}")
        if self.schema is not None and self.schema not in SCHEMAS:
            raise ValueError(f"schema must be one of {sorted(SCHEMAS)} (or absent: detected), got {self.schema!r}")
        _at_least(self, 1, "train_limit", "test_limit", "max_length")


@dataclass
class TrainStages:
    """``train:``: the hyperparameters of each stage."""

    general: TrainConfig = field(default_factory=TrainConfig)
    domain: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # TrainConfig's precision and seed serve the library's train_stage; an experiment sets them once for every
        # stage (the top-level precision: and seeds:), so a stage's own value would be silently replaced
        for stage in ("general", "domain"):
            config = getattr(self, stage)
            for key, top in (("precision", "precision: at the top of the experiment"),
                             ("seed", "seeds: at the top, one run per seed")):
                if isinstance(config, TrainConfig) and getattr(config, key) != getattr(TrainConfig, key):
                    raise ValueError(f"{stage}.{key}: a stage has no {key} of its own in an experiment; set {top}")


@dataclass
class SuiteTask:
    """``eval.suite[i]``: a general task every run is also scored on (its forgetting probe): a multiple-choice test set
    scored by forgetless (``{name, test, schema?, limit?, split?}``), or an lm-evaluation-harness task scored by the
    harness itself (``{lmeval: hellaswag}``, ``{lmeval: tasks/my_task.yaml, limit: 100, metric: acc_norm}``, or the
    string ``lmeval:gsm8k``; the extra ``forgetless[lmeval]``, :mod:`forgetless.evaluation.lmeval`)."""

    name: str | None = None  # required for a test set; a harness task's default is its task name (or YAML stem)
    test: str | None = None
    schema: str | None = None
    limit: int | None = None
    split: str | None = None  # for hub datasets
    config: str | None = None  # the hub dataset's configuration (cais/mmlu: all, or a subject)
    lmeval: str | None = None  # a task name the harness registers, or a task YAML file
    metric: str | None = None  # harness tasks: the metric compared (acc_norm, exact_match,flexible-extract, ...)
    num_fewshot: int | None = None  # harness tasks: examples in each prompt (the harness's --num_fewshot)

    def __post_init__(self) -> None:
        from forgetless.data import SCHEMAS

        if self.lmeval is not None:
            from forgetless.evaluation.lmeval import default_name, lmeval_available, missing_message

            given = [k for k in ("test", "schema", "split", "config") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"an lmeval entry takes no {given} (the harness task has its own data and split)")
            if not self.lmeval:
                raise ValueError("lmeval: must name an lm-evaluation-harness task or a task YAML file")
            if not lmeval_available():
                raise ValueError(missing_message(f"the lm-evaluation-harness task {self.lmeval!r}"))
            self.name = self.name or default_name(self.lmeval)
        elif self.test is None:
            raise ValueError("missing key 'test' (a multiple-choice test set), or 'lmeval' (an lm-evaluation-harness "
                             "task)")
        elif self.metric is not None or self.num_fewshot is not None:
            raise ValueError("metric and num_fewshot apply to lmeval entries only (a test set is scored zero-shot by "
                             "acc and acc_norm)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.name is None:
            raise ValueError("missing key 'name'")
        check_name(self.name, "the suite task name")
        if self.schema is not None and self.schema not in SCHEMAS:
            raise ValueError(f"schema must be one of {sorted(SCHEMAS)} (or absent: detected), got {self.schema!r}")
        _at_least(self, 1, "limit")


@dataclass
class SelectSettings:
    """``eval.select``: keep the domain-stage checkpoint with the best domain score whose general drop (mean suite
    accuracy at step 0 of the domain stage minus at that step, on the ``eval.every`` subsets) is at most X."""

    max_general_drop: float

    def __post_init__(self) -> None:
        if not self.max_general_drop >= 0:
            raise ValueError(f"max_general_drop must be >= 0 (an accuracy drop, 0..1), got {self.max_general_drop}")


SUITE_AUTO = "auto"  # the experiment's other tasks' test sets
LMEVAL_PREFIX = "lmeval:"  # a suite entry "lmeval:TASK" is {lmeval: TASK}


def _harness_strings(suite: str | list[str | SuiteTask]) -> str | list[str | SuiteTask]:
    """``suite`` with its ``lmeval:TASK`` strings as :class:`SuiteTask` entries (a lone one as a list)."""
    def entry(i: int, value: str | SuiteTask) -> str | SuiteTask:
        if not isinstance(value, str) or not value.startswith(LMEVAL_PREFIX):
            return value
        try:
            return SuiteTask(lmeval=value.removeprefix(LMEVAL_PREFIX).strip())
        except ValueError as err:
            raise ValueError(f"suite[{i}]: {err}") from None

    if isinstance(suite, str):
        return [entry(0, suite)] if suite.startswith(LMEVAL_PREFIX) else suite
    return [entry(i, v) for i, v in enumerate(suite)]


@dataclass
class EvalSettings:
    """``eval:``: how the held-out perplexity and the multiple-choice accuracy are computed, the general suite every
    run is scored on, and the scores taken while the domain stage trains.

    ``suite``: ``auto`` (default) is the test sets of the experiment's tasks other than the run's domain; a list holds
    :class:`SuiteTask` entries and may hold ``auto`` too (``[auto, {name: arc, test: ...}, lmeval:hellaswag,
    {lmeval: gsm8k, limit: 100}]``); ``[]`` is off.
    ``suite_limit`` caps every suite task's items. ``every: K`` scores the domain accuracy, the suite accuracy and the
    held-out perplexity on fixed subsets (the first ``every_items`` items of each task, ``every_blocks`` blocks) every K
    optimizer steps of the domain stage; ``select`` keeps the best checkpoint of those (:class:`SelectSettings`).
    ``share_prefix``: score each multiple-choice item as one sequence, its context once
    (:func:`forgetless.evaluation.evaluate_mc`): 1.4-4x fewer tokens, equal to rounding; off by default because in
    bf16 the rounding differs from the one-row-per-choice scores of runs recorded before (a run's identity holds it).
    """

    batch_size: int = 16
    suite: str | list[str | SuiteTask] = SUITE_AUTO
    suite_limit: int | None = None
    every: int | None = None
    every_items: int = 32
    every_blocks: int = 4
    select: SelectSettings | None = None
    share_prefix: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        _at_least(self, 1, "suite_limit", "every", "every_items", "every_blocks")
        self.suite = _harness_strings(self.suite)
        entries = [self.suite] if isinstance(self.suite, str) else self.suite
        names = [e.name for e in entries if isinstance(e, SuiteTask)]
        if any(isinstance(e, str) and e != SUITE_AUTO for e in entries) or entries.count(SUITE_AUTO) > 1:
            raise ValueError(f"suite: must be '{SUITE_AUTO}' or a list of {{name, test, ...}} / {{lmeval: ...}} / "
                             f"'{LMEVAL_PREFIX}TASK' entries (with '{SUITE_AUTO}' at most once), got {self.suite!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"suite: task names must be unique, got {names}")
        if self.select is not None and self.every is None:
            raise ValueError("select: needs 'every' (the checkpoints it chooses from are those eval.every scores)")

    @property
    def suite_auto(self) -> bool:
        return self.suite == SUITE_AUTO or (isinstance(self.suite, list) and SUITE_AUTO in self.suite)

    @property
    def suite_tasks(self) -> list[SuiteTask]:
        """The suite's listed entries (without ``auto``)."""
        return [] if isinstance(self.suite, str) else [e for e in self.suite if isinstance(e, SuiteTask)]

    def suite_names(self, domain: str, tasks: list[str]) -> list[str]:
        """The suite of a run on ``domain`` in an experiment with ``tasks``: the other tasks (``auto``), then the
        listed entries."""
        auto = [t for t in tasks if t != domain] if self.suite_auto else []
        return auto + [e.name for e in self.suite_tasks]


# The keys of an experiment that say how its frozen base loads, with their defaults: added after run identities and
# general-stage keys were fixed, so those name them only when set off these defaults.
BASE_DEFAULTS = {"dtype": "auto", "quantization": "none"}


@dataclass
class Experiment:
    """The whole file: methods x domain tasks x seeds, and everything they share."""

    name: str
    output: Path
    model: str = DEFAULT_MODEL
    seeds: list[int] = field(default_factory=lambda: [0])
    lora: LoraSettings = field(default_factory=LoraSettings)
    general: GeneralData = field(default_factory=GeneralData)
    tasks: list[TaskSpec] = field(default_factory=list)
    # method entries as resolve() reads them: a name, {name: ..., option: ...} or a list of those that compose
    methods: list[Any] = field(default_factory=lambda: ["base", "lora-mu", "lora-nu-mu"])
    train: TrainStages = field(default_factory=TrainStages)
    eval: EvalSettings = field(default_factory=EvalSettings)
    precision: str = "auto"
    # the frozen base: dtype auto = bf16 where the run computes in bf16, else fp32; quantization 4bit/8bit (QLoRA)
    dtype: str = "auto"
    quantization: str = "none"
    landscape: LandscapeSettings | None = None  # off when the YAML has no 'landscape:' section
    # multiple-choice prompts (training and evaluation) through the tokenizer's chat template, as lm-eval's
    # --apply_chat_template: auto = when the model's name says it is instruction-tuned (docs/data_formats.md)
    chat_template: bool | str = "auto"
    source: Path | None = field(default=None, metadata=_NOT_IN_YAML)  # the YAML file, for relative paths
    # per entry of ``methods``: the task names it runs on (None: all); from a mapping entry's ``tasks:`` key
    method_tasks: list[list[str] | None] = field(default_factory=list, metadata=_NOT_IN_YAML)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: must list distinct seeds, got {self.seeds}")
        if any(not 0 <= s < 2**32 for s in self.seeds):
            raise ValueError(f"seeds: must be integers in [0, 2**32), got {self.seeds}")
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("tasks: must list at least one domain task")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: task names must be unique, got {names}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.quantization != "none" and self.landscape is not None and (
                self.landscape.params == "all" or self.landscape.all_weights_seeds):
            raise ValueError(f"landscape: params: all and all_weights_seeds move every weight, and a {self.quantization} "
                             f"base's are packed integers: keep params: trainable without all_weights_seeds")
        if self.chat_template not in ("auto", True, False):
            raise ValueError(f"chat_template: must be auto, true or false, got {self.chat_template!r}")
        clash = sorted(set(names) & {e.name for e in self.eval.suite_tasks})
        if clash:
            raise ValueError(f"eval.suite: {clash} are tasks of the experiment already (with 'auto' their test sets "
                             f"are in the suite of the other tasks' runs); give the entries other names")
        if self.eval.select is not None and any(not self.eval.suite_names(n, names) for n in names):
            raise ValueError("eval.select: needs a general suite for every task (eval.suite: 'auto' with two or more "
                             "tasks, or listed entries): the general drop is measured on it")


# ------------------------------------------------------------------------------------------------ loading
class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last value silently:
    ``seeds: [0]`` then ``seeds: [1]`` further down would run seed 1 only). Keys merged in with ``<<: *anchor`` may
    be given again: that is how an entry overrides part of an anchor."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"the key {key!r} is given twice (lines {first + 1} and {key_node.start_mark.line + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_experiment(path: str | Path, output: str | Path | None = None, overrides: Sequence[str] = ()) -> Experiment:
    """Read and validate an experiment YAML; every problem is a :class:`ConfigError` naming the file and key.

    ``output`` overrides the file's ``output:`` (default ``runs/<file stem>``); ``name`` defaults to the stem.
    ``overrides`` (``KEY.PATH=VALUE``, :func:`apply_overrides`) change the file's values before they are checked.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"experiment file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder: give the experiment's YAML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save "
                          f"the file as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the experiment must be a mapping")
    anchors = sorted(str(k) for k in raw if str(k).startswith("x-"))
    # x-...: YAML anchors only. Every use of an anchor (*alias) is one shared object in what PyYAML returns: copied
    # apart, so that an override changes the place it names and not every place that uses the same anchor
    raw = _unshared({k: v for k, v in raw.items() if not str(k).startswith("x-")})
    for text in overrides:
        head = re.split(r"[.\[=]", text, maxsplit=1)[0]  # the top-level key the override names
        if head in anchors:
            raise ConfigError(f"{path}: override {text!r}: {head} holds YAML anchors, read when the file is parsed; "
                              f"override the keys that use them instead")
    apply_overrides(raw, overrides, str(path))
    raw.setdefault("name", path.stem)
    raw["output"] = output or raw.get("output") or str(Path("runs") / path.stem)
    if "landscape" in raw and raw["landscape"] is None:
        raw["landscape"] = {}  # a bare 'landscape:' switches the section on with its defaults
    if raw.get("landscape") is False:  # 'landscape: false' (or the override landscape=false): off
        del raw["landscape"]
    try:
        exp = read_section(Experiment, raw, str(path), "")
    except ConfigError as err:
        raise _from_the_command_line(err, overrides) from None
    exp.source = path
    if exp.general.train is None or exp.general.heldout is None:
        raise ConfigError(f"{path}: general: needs 'train' and 'heldout' (each a source or a {{source: ...}} mapping)")
    for i, task in enumerate(exp.tasks):
        if task.test is None:
            raise ConfigError(f"{path}: tasks[{i}]: missing key 'test' (the task's test set)")
    exp.methods, exp.method_tasks = check_methods(exp.methods, [t.name for t in exp.tasks], str(path))
    return exp


def _from_the_command_line(err: ConfigError, overrides: Sequence[str]) -> ConfigError:
    """``err`` saying that the value it blames came from an override, not from the file it names (``exp.yaml:
    train.domain: unknown key 'lrr'`` sent the user searching the file for a typo made on the command line)."""
    message = str(err)
    head = message.partition("; known: ")[0]  # what it blames, not the list of valid keys
    for text in overrides:
        key = text.partition("=")[0]
        steps = key.split(".")
        for j, step in enumerate(steps):  # the error may name any key on the path (train: unknown key 'domian')
            parent, name = ".".join(steps[:j]), re.sub(r"\[-?\d+\]$", "", step)
            at = not parent or f"{parent}: " in head or f"{parent}[" in head
            if at and (repr(name) in head or f": {name} " in head) or f"{key}: " in head:
                return ConfigError(f"{message} (set on the command line: {text!r})")
    return err


def _unshared(node: Any) -> Any:
    """``node`` with every mapping and list its own (YAML aliases share one object); leaves are kept."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


_KEY_PATH = re.compile(r"[^.\[\]=\s]+(?:\.[^.\[\]=\s]+|\[-?\d+\])*")  # train.domain.lr, tasks[0].name
_KEY_STEP = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], file: str) -> None:
    """Set ``KEY.PATH=VALUE`` overrides (``train.domain.lr=1e-4``, ``seeds=[0,1]``, ``tasks[0].train_limit=50``) in
    the mapping read from ``file``, in place. VALUE is read as YAML; mappings missing on the path are created, so the
    schema then checks the result as it checks the file: an unknown key is an error naming its path."""
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or not _KEY_PATH.fullmatch(key):
            raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. train.domain.lr=1e-4 or seeds=[0,1]")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {text!r}: invalid YAML value: {err}") from err
        steps = [(name, int(index)) if index else (name, None) for name, index in _KEY_STEP.findall(key)]
        node: Any = raw
        where = ""
        for i, (name, index) in enumerate(steps):
            last = i == len(steps) - 1
            if index is not None:
                if not isinstance(node, list) or not -len(node) <= index < len(node):
                    raise _error(file, where, f"override {text!r}: no item [{index}] (the value is {_show(node)})")
                where += f"[{index}]"
                if last:
                    node[index] = parsed
                node = node[index]
                continue
            if not isinstance(node, dict):
                raise _error(file, where, f"override {text!r}: expected a mapping, got {_show(node)}")
            where = f"{where}.{name}" if where else name
            if last:
                node[name] = parsed
            elif node.get(name) is None:
                node[name] = {}
            elif isinstance(node[name], str) and where in _SHORTHAND_AT:  # `train: c4.jsonl` is {source: c4.jsonl}
                node[name] = {_SHORTHAND_AT[where]: node[name]}
            node = node[name]


# the keys whose value may be a bare string standing for a mapping (TextSource's `train: data/c4.jsonl`), so that an
# override can set a key inside it (general.train.limit=50)
_SHORTHAND_AT = {f"general.{key}": TextSource.SHORTHAND for key in ("train", "heldout")}


def check_methods(entries: list[Any], task_names: list[str], file: str) -> tuple[list[Any], list[list[str] | None]]:
    """The method entries without their ``tasks:`` keys, and those keys; each entry resolved, none twice."""
    if not entries:
        raise ConfigError(f"{file}: methods: must list at least one method")
    methods, only = _split_method_tasks(entries, task_names, f"{file}: methods")
    seen: dict[str, int] = {}
    trains: dict[str, tuple[int, str]] = {}  # what an entry trains, once its options are read (1e5 is 1.0e+5)
    for i, entry in enumerate(methods):
        try:
            recipe = resolve(entry)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{file}: methods[{i}]: {err}") from err
        for plugin in recipe.plugins:  # an experiment attaches one LoRA adapter, PEFT's "default"
            adapter = getattr(getattr(plugin, "options", None), "adapter", DEFAULT_ADAPTER)
            if adapter != DEFAULT_ADAPTER:
                raise ConfigError(f"{file}: methods[{i}]: adapter: {adapter!r}: an experiment attaches LoRA as "
                                  f"{DEFAULT_ADAPTER!r} (the option is for library use with several adapters)")
        label = recipe.label
        if label in seen:
            raise ConfigError(f"{file}: methods[{i}]: duplicate of methods[{seen[label]}] ({label!r}); one entry "
                              f"can run on several tasks with 'tasks: [...]'")
        key = _what_it_trains(recipe)
        if key in trains:
            j, other = trains[key]
            raise ConfigError(f"{file}: methods[{i}]: {label!r} trains what methods[{j}] ({other!r}) trains: the same "
                              f"method with the same option values, written differently; keep one")
        seen[label], trains[key] = i, (i, label)
    return methods, only


def _what_it_trains(recipe: Any) -> str:
    """A method entry once resolved: its stages, LoRA overrides and each plugin's class and option values (typed),
    so that entries written differently for the same values (``phi: 1e5`` and ``phi: 1.0e+5``) compare equal."""
    from forgetless.training.hooks import options_of

    plugins = [[type(p).__name__, options_of(p)] for p in recipe.plugins]
    return json.dumps([list(recipe.stages), recipe.lora, plugins], sort_keys=True, default=str)


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


# ------------------------------------------------------------------------------------------------ the reader
def read_section(cls: type[T], value: Any, file: str, where: str) -> T:
    """``value`` (a mapping read from ``file`` at key path ``where``) as a ``cls``, recursively, from its type hints.

    Unknown and missing keys, values of the wrong type and the dataclass's own checks (``__post_init__``) are
    :class:`ConfigError` naming ``file`` and the key path. A missing or null section is the dataclass's defaults.
    """
    if value is None:
        value = {}
    if isinstance(value, str) and hasattr(cls, "SHORTHAND"):
        value = {cls.SHORTHAND: value}
    if not isinstance(value, Mapping):
        raise _error(file, where, f"expected a mapping, got {_show(value)}")
    keys = [f for f in fields(cls) if f.metadata.get("yaml", True)]
    known = sorted(f.name for f in keys)
    unknown = [k for k in value if k not in known]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise _error(file, where, f"unknown key{'s' if len(unknown) > 1 else ''} {names}; known: {known}")
    for f in keys:
        if f.name not in value and f.default is MISSING and f.default_factory is MISSING:
            raise _error(file, where, f"missing key {f.name!r}")
    hints = get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], file, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # the dataclass's own checks
        raise _error(file, where, str(err)) from err


def _coerce(value: Any, hint: Any, file: str, where: str) -> Any:
    """``value`` checked against the type ``hint`` (converted only where that is safe)."""
    if hint is Any:
        return value
    if get_origin(hint) in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        for option in options[:-1]:
            try:
                return _coerce(value, option, file, where)
            except ConfigError:
                continue
        return _coerce(value, options[-1], file, where)
    if is_dataclass(hint):
        return read_section(hint, value, file, where)
    if get_origin(hint) is list:
        if not isinstance(value, list):
            raise _error(file, where, f"expected a list, got {_show(value)}")
        (item,) = get_args(hint) or (Any,)
        return [_coerce(v, item, file, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if hint is Path and isinstance(value, str):
        return Path(value)
    # an int stays an int in a float field: it computes the same, and keeps cache keys as they were
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(hint, (hint,))
    if isinstance(value, accepted) and (hint is bool or not isinstance(value, bool)):
        return value
    raise _error(file, where, f"expected {_NAMES.get(hint, getattr(hint, '__name__', str(hint)))}, got {_show(value)}")


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


def _show(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}
    text = repr(value)
    return f"{kinds.get(type(value), type(value).__name__)} {text[:60] + '...' if len(text) > 60 else text}"


def _error(file: str, where: str, message: str) -> ConfigError:
    return ConfigError(f"{file}: {where}: {message}" if where else f"{file}: {message}")
