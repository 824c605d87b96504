"""Any lm-evaluation-harness task as a general probe (the optional extra ``forgetless[lmeval]``).

A suite entry ``{lmeval: hellaswag}`` (a task the harness registers) or ``{lmeval: tasks/my_task.yaml}`` (a task
YAML of the harness's format) is scored by the harness itself: the model being evaluated, in memory and PEFT-wrapped
as it is, goes through ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=...)`` and
``lm_eval.simple_evaluate``; generative tasks (``generate_until``: GSM8K, IFEval, ...) work as multiple-choice ones do.

The task's *main metric* becomes the suite score, the number forgetting tables compare (tuned - base):

* ``metric:`` of the entry when given (``acc_norm``, or ``exact_match,flexible-extract`` with the harness's filter);
* else the first metric of the task's ``metric_list`` under its first filter: ``acc`` for multiple-choice tasks
  (arc_easy, hellaswag, piqa, mmlu), ``exact_match,strict-match`` for gsm8k, ``prompt_level_strict_acc`` for ifeval.

A suite record holds it as ``acc`` (what the tables read by default), ``acc_norm`` (the harness's ``acc_norm`` where
the task has one, else the main metric again, so ``--metric acc_norm`` tables have every task), their stderrs, ``n``
(documents scored), ``metric`` (the name of the main metric) and ``metrics`` (every number the harness reported).

Relative ``dataset_kwargs.data_files`` paths of a task YAML are read relative to the YAML's folder when they exist
there (the harness itself reads them relative to the working directory). Tasks are built (their data loaded) once,
before any model loads; each evaluation then runs the harness on the model as it is. The harness reseeds Python's,
NumPy's and torch's generators; their states are restored afterwards, so scoring during training (``eval.every``)
changes nothing of the training.

Nothing here imports ``lm_eval`` before a harness task is used: forgetless runs without the extra.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

INSTALL_HINT = "pip install 'forgetless[lmeval]'"
PREFIX = "lmeval:"  # the string form of a suite entry: "lmeval:gsm8k"
TASK_FILE_SUFFIXES = (".yaml", ".yml")


class LMEvalUnavailable(ImportError):
    """lm-evaluation-harness is not installed; the message names the install command."""


class HarnessTaskError(ValueError):
    """A harness task that cannot be used: an unknown name, a YAML the harness cannot read, a tag of many tasks."""


def lmeval_available() -> bool:
    """True when ``lm_eval`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):
        return False


def missing_message(what: str = "scoring an lm-evaluation-harness task") -> str:
    return f"{what} needs the optional extra lmeval (lm-evaluation-harness): {INSTALL_HINT}"


def require_lmeval() -> Any:
    """The ``lm_eval`` package; :class:`LMEvalUnavailable` naming the install command when it is missing."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as err:
        raise LMEvalUnavailable(f"{missing_message()} ({err})") from None
    return lm_eval


def is_task_file(spec: str) -> bool:
    """A task YAML file (rather than a name the harness registers)."""
    return spec.endswith(TASK_FILE_SUFFIXES)


def default_name(spec: str) -> str:
    """The suite name of a harness entry without ``name:``: the task name, or the YAML file's stem."""
    return Path(spec).stem if is_task_file(spec) else spec


# ------------------------------------------------------------------------------------------------ task loading
_MANAGERS: dict[tuple[bool, str | None], Any] = {}


def _task_manager(defaults: bool, include: Path | None = None) -> Any:
    """A cached ``TaskManager`` of the harness's tasks (``defaults``: indexing its ~15k YAMLs takes seconds; a local
    task file needs none) and those of the folder ``include``."""
    key = (defaults, str(include) if include is not None else None)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[key] = TaskManager(include_defaults=defaults, include_path=key[1])
    return _MANAGERS[key]


def _local_data_files(value: Any, folder: Path) -> Any:
    """``data_files`` (a path, a list or a split mapping) with relative paths that exist in ``folder`` (and not in the
    working directory) made absolute."""
    if isinstance(value, str):
        if not Path(value).is_absolute() and not Path(value).exists() and (folder / value).exists():
            return str(folder / value)
        return value
    if isinstance(value, list):
        return [_local_data_files(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _local_data_files(v, folder) for k, v in value.items()}
    return value


def _file_config(path: Path) -> dict[str, Any]:
    """A task YAML read as the harness reads it (``include:``, ``!function``), data files relative to its folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path, resolve_func=True)
    if not isinstance(cfg.get("task"), str):
        raise HarnessTaskError(f"{path}: a task YAML needs a 'task:' name (or 'group:' and a 'task:' list)")
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        cfg["dataset_kwargs"] = dict(kwargs, data_files=_local_data_files(kwargs["data_files"], path.parent))
    return cfg


def _unknown(spec: str, manager: Any) -> HarnessTaskError:
    close = difflib.get_close_matches(spec, manager.all_tasks, n=5, cutoff=0.6)
    hint = f"; close: {', '.join(close)}" if close else ""
    return HarnessTaskError(f"unknown lm-evaluation-harness task {spec!r}{hint} (a task YAML file must end in "
                            f"{' or '.join(TASK_FILE_SUFFIXES)}; `lm-eval ls tasks` lists the names)")


def build_task(spec: str, base_dir: str | Path | None = None) -> Any:
    """The harness's Task (or Group) for ``spec``, its data loaded: a registered name or a task YAML file (relative
    to ``base_dir`` when it exists there). :class:`HarnessTaskError` for an unknown name or an unusable file;
    the data's own errors (a missing file, no network for a hub dataset) pass through."""
    require_lmeval()
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        if is_task_file(spec):
            path = Path(spec).expanduser()
            beside = Path(base_dir) / path if base_dir is not None else None
            if not path.is_absolute() and not path.exists() and beside is not None and beside.exists():
                path = beside
            if not path.is_file():
                raise FileNotFoundError(f"task YAML not found: {spec}")
            path = path.resolve()
            raw = load_yaml(path, resolve_func=False, recursive=False)
            if "group" in raw:
                # a group: its tasks are found in its folder and among the harness's (their data_files paths are
                # read from the working directory, as the harness reads them); loaded by its name, the folder being
                # indexed (lm-eval 0.4.13 takes a group file's task list for its name when given the path)
                manager, what = _task_manager(True, path.parent), str(raw["group"])
            else:
                manager, what = _task_manager(False), _file_config(path)
        else:
            manager, what = _task_manager(True), spec
            if spec not in manager.all_tasks:
                raise _unknown(spec, manager)
        loaded = manager._load_spec(what)  # one Task, a Group, or the Tasks of a tag
    except ModuleNotFoundError as err:  # a task's own helpers (ifeval: langdetect, immutabledict, nltk)
        raise HarnessTaskError(f"{spec!r} needs the Python package {err.name!r}, which lm-eval installs with its "
                               f"extra for the task (e.g. pip install 'lm-eval[ifeval]==0.4.13' for ifeval)") from None
    if isinstance(loaded, list):
        names = [t.task_name for t in loaded]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise HarnessTaskError(f"{spec!r} is a tag of {len(names)} tasks with no aggregate score ({shown}); list the "
                               f"tasks as separate suite entries")
    if not isinstance(loaded, (Task, Group)):
        raise HarnessTaskError(f"{spec!r}: the harness built a {type(loaded).__name__}, not a task or a group")
    return loaded


def _leaf_tasks(obj: Any) -> list[Any]:
    from lm_eval.api.group import Group

    return list(obj.get_all_tasks()) if isinstance(obj, Group) else [obj]


def _result_name(obj: Any) -> str:
    from lm_eval.api.group import Group

    return obj.name if isinstance(obj, Group) else obj.task_name


def _metric_keys(obj: Any) -> list[str]:
    """The ``metric,filter`` keys the harness reports for ``obj``, in the order of its ``metric_list`` (each under
    every filter of ``filter_list``, in order); for a group, those of its ``aggregate_metric_list``."""
    from lm_eval.api.group import Group

    if isinstance(obj, Group):
        return [f"{agg.metric},{flt}" for agg in obj.aggregate_metric_list or [] for flt in agg.filter_list or ["none"]]
    filters = [f["name"] for f in obj.config.filter_list or []] or ["none"]
    return [f"{metric},{flt}" for metric in obj.aggregation() for flt in filters]


# ------------------------------------------------------------------------------------------------ scoring
@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and CUDA) generator states restored afterwards: simple_evaluate seeds
    them all."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """The harness's INFO/WARNING lines (e.g. "Passed an already-initialized model") off unless ``progress``."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not progress:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quiet_hflm() -> type:
    """``HFLM`` with the progress bars of its requests off (``disable_tqdm``), for ``progress=False``."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def run_harness(model: nn.Module, tokenizer, tasks: list[Any], limit: int | None = None, batch_size: int = 16,
                precision: str = "auto", progress: bool = True, log_samples: bool = False,
                chat_template: bool = False, num_fewshot: int | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``model`` (a transformers causal LM, PEFT-wrapped or not, as it is in memory)
    on the harness Tasks/Groups ``tasks`` (:func:`build_task`), through ``HFLM(pretrained=model,
    tokenizer=tokenizer, batch_size=batch_size)``: the harness's whole results dict. The model runs under the same
    autocast as :func:`~forgetless.evaluation.evaluate_mc` for ``precision``; its train/eval mode, the tokenizer
    (HFLM may add a pad token: it gets a copy) and the random generators are left as they were. ``chat_template``:
    the harness's ``apply_chat_template`` (prompts through the tokenizer's chat template). ``num_fewshot``: the
    harness's ``--num_fewshot`` (examples drawn with its fixed few-shot seed; None: the task's own setting)."""
    require_lmeval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from forgetless.lm import eval_mode, model_device
    from forgetless.precision import autocast, resolve_precision

    model = _unwrap_parallel(model)
    device = model_device(model)
    resolved = resolve_precision(precision, device)
    tok = copy.deepcopy(tokenizer) if getattr(tokenizer, "pad_token_id", None) is None else tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with eval_mode(model), torch.no_grad(), _rng_kept(), _quiet(progress), autocast(resolved, device):
        with _no_retie(model):
            lm = (HFLM if progress else _quiet_hflm())(pretrained=model, tokenizer=tok, batch_size=batch_size,
                                                        device=str(device))
        results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=log_samples,
                                  bootstrap_iters=1000, apply_chat_template=chat_template, num_fewshot=num_fewshot,
                                  task_manager=_task_manager(False))  # built tasks: no need to index every YAML
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not the main process?)")
    return results


@contextlib.contextmanager
def _no_retie(model: torch.nn.Module):
    """``model.tie_weights()`` made a no-op while HFLM wraps the model (it calls it on a model given in memory): on
    a PEFT model of a base with tied embeddings whose head LoRA, ``modules_to_save`` or trainable tokens adapt, tying
    again fails (KeyError "attribute 'weight' already exists"). The model in memory is tied as it should be."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        model.__dict__.pop("tie_weights", None)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # "N/A" stderrs


def suite_scores(results: dict[str, Any], obj: Any, metric: str | None = None) -> dict[str, Any]:
    """The suite record of harness task ``obj`` from ``results`` (:func:`run_harness`): ``acc`` = the main metric
    (``metric``, or the task's first metric where higher is better, else its first), ``acc_norm`` = the harness's
    acc_norm (else the main metric), stderrs, ``n``, ``metric``, ``higher_is_better`` (the main metric's direction,
    as the harness reports it: a perplexity is not an accuracy, and the forgetting tables leave it out) and every
    number reported (``metrics``)."""
    name = _result_name(obj)
    row = results["results"].get(name)
    if row is None:
        raise HarnessTaskError(f"{name}: the harness reported no results for it")
    metrics = {k: _number(v) for k, v in row.items() if "," in k and "_stderr," not in k and _number(v) is not None}
    stderrs = {k.replace("_stderr,", ","): _number(v) for k, v in row.items() if "_stderr," in k}
    if not metrics:
        raise HarnessTaskError(f"{name}: the harness reported no metric (a group without an aggregate score?)")
    order = [k for k in _metric_keys(obj) if k in metrics] + [k for k in metrics if k not in _metric_keys(obj)]
    better = results.get("higher_is_better", {}).get(name, {})  # metric name -> whether higher is better
    if metric is None:  # the task's first metric where higher is better (lambada_openai: acc, not its perplexity)
        order = [k for k in order if better.get(k.split(",")[0], True)] + \
            [k for k in order if not better.get(k.split(",")[0], True)]
    main = resolve_metric(metric, order, name)
    norm = next((k for k in metrics if k.split(",")[0] == "acc_norm"), main)
    n = sum(int(results.get("n-samples", {}).get(t.task_name, {}).get("effective", 0)) for t in _leaf_tasks(obj))
    err, err_norm = stderrs.get(main), stderrs.get(norm)
    return {"acc": metrics[main], "acc_norm": metrics[norm], "acc_stderr": math.nan if err is None else err,
            "acc_norm_stderr": math.nan if err_norm is None else err_norm, "n": n, "metric": main, "metrics": metrics,
            "higher_is_better": bool(better.get(main.split(",")[0], True))}


def resolve_metric(metric: str | None, keys: list[str], name: str = "") -> str:
    """The ``metric,filter`` key of ``keys`` that ``metric`` names (``acc_norm``: its first filter; None: the first
    key)."""
    if metric is None:
        return keys[0]
    if metric in keys:
        return metric
    matches = [k for k in keys if k.split(",")[0] == metric]
    if not matches:
        raise HarnessTaskError(f"{name}: no metric {metric!r}; the task reports {', '.join(keys)}")
    return matches[0]


@dataclass
class HarnessTask:
    """A harness task in a run's general suite: scored by :meth:`score`, cut by slicing like a list of items
    (``task[:32]`` is the task limited to its first 32 documents, as ``eval.suite_limit`` and ``eval.every_items``
    cut the built-in tasks)."""

    name: str
    spec: str
    task: Any  # the harness's Task or Group, data loaded
    limit: int | None = None
    metric: str | None = None
    chat_template: bool = False  # the harness's apply_chat_template, as the experiment's chat_template setting
    num_fewshot: int | None = None  # the harness's --num_fewshot (None: the task's own)

    def __len__(self) -> int:
        docs = sum(len(t.eval_docs) for t in _leaf_tasks(self.task))
        return docs if self.limit is None else min(docs, self.limit * len(_leaf_tasks(self.task)))

    def __getitem__(self, key: slice) -> HarnessTask:
        if not isinstance(key, slice) or key.start not in (None, 0) or key.step not in (None, 1):
            raise TypeError("a harness task can only be cut to its first documents: task[:n]")
        if key.stop is None:
            return self
        return replace(self, limit=key.stop if self.limit is None else min(self.limit, key.stop))

    def score(self, model: nn.Module, tokenizer, batch_size: int = 16, precision: str = "auto",
              progress: bool = True) -> dict[str, Any]:
        """The suite record (:func:`suite_scores`) of ``model`` on this task, through the harness."""
        with _rng_kept():  # reading the results may draw numbers too
            results = run_harness(model, tokenizer, [self.task], limit=self.limit, batch_size=batch_size,
                                  precision=precision, progress=progress, chat_template=self.chat_template,
                                  num_fewshot=self.num_fewshot)
            return suite_scores(results, self.task, self.metric)

    def with_chat_template(self, on: bool = True) -> HarnessTask:
        """This task with prompts through the tokenizer's chat template (lm-eval's ``--apply_chat_template``)."""
        return replace(self, chat_template=on)


def load_harness_task(spec: str, name: str | None = None, limit: int | None = None, metric: str | None = None,
                      base_dir: str | Path | None = None, num_fewshot: int | None = None) -> HarnessTask:
    """:func:`build_task` as a :class:`HarnessTask`; ``metric`` is checked against what the task reports."""
    task = build_task(spec, base_dir)
    if metric is not None:
        resolve_metric(metric, _metric_keys(task), spec)
    return HarnessTask(name=name or default_name(spec), spec=spec, task=task, limit=limit, metric=metric,
                       num_fewshot=num_fewshot)
