"""The ``forgetless`` command: demo, run, train, eval, landscape, report, merge, export.

Every user error (a bad flag, file, key or value, a run that diverged, a folder in use) is one line
``forgetless: error: WHERE: WHAT`` and exit code 2, found before any model loads wherever it can be; ``--debug``
shows the traceback instead. Ctrl-C exits with 130 and one line saying what was kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from forgetless.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from forgetless.config import Experiment


def _cmd_demo(args: argparse.Namespace) -> int:
    from forgetless.config import load_experiment
    from forgetless.demo import demo_experiment
    from forgetless.experiment import run_experiment
    from forgetless.models import check_model_source

    check_model_source(args.model)  # a misspelt name: said now, before the text is sampled with it
    _demo_runs_of_another_model(Path(args.output), args.model, args.rerun_changed)
    path = demo_experiment(Path(args.output), model=args.model)
    results = run_experiment(load_experiment(path), progress=not args.quiet, rerun_changed=args.rerun_changed)
    print()
    print((Path(args.output) / "results.md").read_text())
    base = next(r for r in results if r["method"] == "base")
    tuned = [r for r in results if r["method"] != "base"]
    for r in tuned:
        gain = 100 * (r["tasks"]["corvath"]["acc"] - base["tasks"]["corvath"]["acc"])
        loss = r["general_ppl"] - base["general_ppl"]
        print(f"{r['method']:>11}: domain accuracy {gain:+.1f} points over base, general PPL {loss:+.3f}")
    return 0


def _demo_runs_of_another_model(output: Path, model: str, rerun_changed: bool) -> None:
    """ConfigError, before the demo samples its text or rewrites its files, when ``output`` holds the recorded runs of
    a demo with another model: they would be refused as changed after that work (said, with what to do, now)."""
    import yaml

    from forgetless.config import ConfigError

    try:
        before = yaml.safe_load((output / "experiment.yaml").read_text()).get("model")
    except (OSError, yaml.YAMLError, AttributeError):
        return
    if before != model and not rerun_changed and any((output / "runs").glob("*.json")):
        raise ConfigError(f"demo --output {output} holds the runs of a demo with --model {before}: give another "
                          f"--output, or --rerun-changed to redo them with {model} (the old records are kept aside)")


def _cmd_run(args: argparse.Namespace) -> int:
    from forgetless.config import load_experiment
    from forgetless.experiment import is_main_process, jobs_to_do, plan_runs, run_experiment

    exp = load_experiment(args.experiment, output=args.output, overrides=args.overrides)
    if args.dry_run:
        print(_plan_text(exp))
        return 0
    report_to = sorted(set(exp.train.general.report_to) | set(exp.train.domain.report_to))
    todo = {job.rid for job in jobs_to_do(exp, plan_runs(exp))} if report_to else set()
    try:
        run_experiment(exp, progress=not args.quiet, rerun_changed=args.rerun_changed, jobs=args.jobs)
    finally:  # also when a later run fails or Ctrl-C stops the session: the next session does not redo these
        if report_to and is_main_process():  # the scores of the runs recorded now, beside their training scalars
            _log_recorded_scores(exp, report_to, todo)
    print((exp.output / "results.md").read_text())
    return 0


def _log_recorded_scores(exp: Experiment, report_to: list[str], rids: set[str]) -> None:
    from forgetless.training.logging import log_scores

    logs = Path(exp.train.domain.logging_dir or exp.output / "logs")
    for rid in sorted(rids):
        path = exp.output / "runs" / f"{rid}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            steps = record["stages"][-1]["steps"] if record.get("stages") else 0
            log_scores(report_to, logs / rid, record, step=steps)


def _plan_text(exp: Experiment) -> str:
    """``run --dry-run``: the runs to do and done, the general stages cached or to train, the steps per stage (from
    the data files' sizes; no model is loaded, so the general text's and text tasks' blocks are not counted; a replay
    method's line includes its replayed examples)."""
    from forgetless.experiment import (_hours, _sort_finished, check_model, check_output_possible,
                                       general_stage_name, plan_runs, read_data, shared_domain_stage,
                                       shared_domain_stages, stale_checkpoints, time_to_do, where)
    from forgetless.methods import DOMAIN, GENERAL
    from forgetless.pipeline import is_cached_stage

    jobs = plan_runs(exp)
    pending, stale, _ = _sort_finished(exp, jobs)
    todo = pending + [job for job, _ in stale]
    check_output_possible(exp.output, where(exp, "output"))
    check_model(exp, todo)
    done = [job for job in jobs if all(job is not j for j in todo)]
    lines = [f"experiment {exp.name}: {len(jobs)} runs, {len(done)} already done, writing to {exp.output}"]
    interrupted = {id(job): why for job, why, _ in stale_checkpoints(exp, pending)}
    lines += [f"  changed  {job.rid} (interrupted under other settings: {interrupted[id(job)]}; started over with "
              f"--rerun-changed)" if id(job) in interrupted else f"  to do    {job.rid}{_resumes(exp.output, job.rid)}"
              for job in pending]
    lines += [f"  changed  {job.rid} (redone with --rerun-changed)" for job, _ in stale]
    lines += [f"  done     {job.rid}" for job in done]
    stages: dict[str, list[str]] = {}  # cached stage folder (general-KEY, domain-KEY) -> the runs that use it
    for job in todo:
        if GENERAL in job.recipe.stages:
            stages.setdefault(general_stage_name(exp, job.recipe, job.seed), []).append(job.rid)
    shared = shared_domain_stages(exp)
    for job in todo:
        if (name := shared_domain_stage(exp, job.recipe, job.task, job.seed, shared)) is not None:
            stages.setdefault(name, []).append(job.rid)
    for key, rids in stages.items():
        cached = is_cached_stage(exp.output / "stages" / key)
        lines.append(f"{key.split('-')[0]} stage {key}: {'cached' if cached else 'to train'}, used by "
                     f"{', '.join(rids)}")
    seconds, unknown = time_to_do(exp, todo)
    if unknown < len(todo):
        lines.append(f"run time to do (from the finished runs of the same methods here): about {_hours(seconds)} "
                     f"for {len(todo) - unknown} run(s)"
                     + (f", and {unknown} run(s) of methods not run yet" if unknown else "")
                     + " (with --jobs N, about 1/N of it, but no less than the longest chain of runs that share "
                       "a stage to train: one worker trains those one after another)")
    if exp.landscape is not None and done:  # recorded runs without their flatness (each run's is measured after it)
        from forgetless.landscape_runs import left_line as landscape_left

        lines.append("flatness of the recorded runs (the runs to do are measured as each finishes, in the time "
                     "above): "
                     + landscape_left(exp.output, exp.model, exp.landscape, exp.general.block_size,
                                      exp.general.heldout.cache_key(), jobs_hint=True, only={j.rid for j in jobs}))
    raw = read_data(exp)
    blocks = exp.general.train.max_blocks if exp.general.train is not None else None
    lines.append(f"steps per stage (estimated): {GENERAL}: {_steps(exp.train.general, blocks, 'blocks', bound=True)}")
    recipes = {job.recipe.label: job.recipe for job in jobs}
    for task in exp.tasks:
        rows = len(raw.tasks[task.name][0])
        if raw.kinds.get(task.name) == "text":  # documents packed into max_length blocks: counted once tokenized
            lines.append(f"  {DOMAIN} {task.name}: {_steps(exp.train.domain, None, 'blocks')}")
            continue
        lines.append(f"  {DOMAIN} {task.name}: {_steps(exp.train.domain, rows, 'examples')}")
        for label, recipe in recipes.items():  # a method that adds examples (replay's general ones) lengthens an epoch
            for plan in filter(None, (p.planned_examples(DOMAIN, rows) for p in recipe.plugins)):
                count, what = plan
                lines.append(f"    {label}: " + (_steps(exp.train.domain, count, what) if count is not None else
                                                  f"more steps: {what} (counted once tokenized)"))
    return "\n".join(lines)


def _resumes(output: Path, rid: str) -> str:
    """`` (resumes at the domain stage's step 40)`` when an interrupted run left a checkpoint, else ``""``."""
    from forgetless.experiment import resume_point

    point = resume_point(output, rid)
    return f" (resumes at the {point[0]} stage's step {point[1]})" if point else ""


def _steps(cfg: Any, examples: int | None, what: str, bound: bool = False) -> str:
    """Optimizer steps of a stage of ``examples`` training examples, as the loop counts them on one process."""
    import math

    if cfg.max_steps is not None:
        return f"{cfg.max_steps} (max_steps)"
    if examples is None:
        return f"{cfg.epochs:g} epoch(s) of the packed {what} (counted once tokenized)"
    from forgetless.training.loop import accumulation_windows

    per_epoch = len(accumulation_windows(math.ceil(examples / cfg.batch_size), cfg.grad_accum))
    steps = max(1, math.ceil(per_epoch * cfg.epochs))
    return f"{'at most ' if bound else ''}{steps} ({cfg.epochs:g} epoch(s) of {examples} {what})"


def _cmd_report(args: argparse.Namespace) -> int:
    from forgetless.reporting.report import build_report

    from forgetless.config import ConfigError
    from forgetless.experiment import check_output_possible

    references = [name.strip() for name in args.reference.split(",") if name.strip()]
    if args.output is not None:
        output = Path(args.output)
        if output.exists() and not output.is_dir():
            raise ConfigError(f"report: --output {output} is a file, not a folder")
        check_output_possible(output, "report: --output")
    path = build_report(args.results, output=args.output, reference=references, metric=args.metric,
                        rank_base=args.rank_base, test=args.test)
    print(path.read_text())
    print(f"report: {path} (figures beside it)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from forgetless.merge import merge_results

    summary = merge_results(args.into, args.sources)
    print("\n".join(summary.lines(Path(args.into))))
    print(f"next: `forgetless report {args.into}`; `forgetless run EXPERIMENT.yaml --output {args.into}` measures what "
          f"the landscape lacks and rewrites results.md")
    return 0


def _lora_from(args: argparse.Namespace):
    from forgetless.models import LoraSettings

    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        target_modules=args.target_modules.split(","), use_rslora=args.rslora)


def _method_entry(text: str) -> Any:
    """``--method``: names joined by '+' (``lora-mu+ewc``), or one entry of an experiment's ``methods:`` list in
    YAML, with options (``{name: hlora, phi: 0.01}``, ``[lora-mu, {name: ewc, lambda: 100}]``)."""
    import yaml

    from forgetless.config import ConfigError

    if text.lstrip().startswith(("{", "[")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--method: invalid YAML: {err}") from err
    names = text.split("+")
    return names[0] if len(names) == 1 else names


def _train_experiment(args: argparse.Namespace) -> Experiment:
    """The one-run experiment that ``forgetless train ARGS`` stands for: one method, one task, one seed, the same
    training settings for both stages."""
    from forgetless.config import (ConfigError, EvalSettings, Experiment, GeneralData, TaskSpec, TextSource,
                                   TrainStages, check_methods)
    from forgetless.training.config import TrainConfig

    methods, method_tasks = check_methods([_method_entry(args.method)], ["domain"], "--method")
    try:  # the settings' own checks (lr > 0, r >= 1, seed >= 0, ...) become errors without a traceback
        stage = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                            report_to=args.report_to or [], logging_dir=str(Path(args.output) / "logs"),
                            attn_implementation=args.attn_implementation, compile=args.compile, liger=args.liger,
                            padding_free=args.padding_free, group_by_length=args.group_by_length,
                            fused_lora=args.fused_lora, gradient_checkpointing=args.gradient_checkpointing)
        task = TaskSpec(name="domain", train=args.domain, test=args.test, schema=args.schema,
                        train_limit=args.domain_limit, test_limit=args.test_limit, max_length=args.max_length,
                        train_kind=args.domain_kind)
        general = GeneralData(
            train=TextSource(args.general, limit=args.general_limit, max_blocks=args.general_max_blocks)
            if args.general else None,
            heldout=TextSource(args.heldout, max_blocks=args.heldout_max_blocks) if args.heldout else None,
            block_size=args.block_size)
        return Experiment(name="train", output=Path(args.output), model=args.model, seeds=[args.seed],
                          lora=_lora_from(args), general=general, tasks=[task], methods=methods,
                          train=TrainStages(general=stage, domain=stage), eval=EvalSettings(batch_size=args.batch_size),
                          precision=args.precision or "auto", dtype=args.dtype, quantization=args.quantization,
                          method_tasks=method_tasks,
                          chat_template=_CHAT_FLAG[args.chat_template])
    except ValueError as err:
        raise ConfigError(f"train: {err}") from err


_CHAT_FLAG = {"auto": "auto", "true": True, "false": False}  # --chat-template as the YAML's chat_template


def _cmd_train(args: argparse.Namespace) -> int:
    from forgetless.experiment import is_main_process, train_one

    exp = _train_experiment(args)
    record = train_one(exp, progress=not args.quiet, overwrite=args.overwrite)
    if args.report_to and (record["general_ppl"] is not None or record["tasks"]) and is_main_process():
        from forgetless.training.logging import log_scores

        log_scores(args.report_to, exp.train.domain.logging_dir, record, step=record["stages"][-1]["steps"])
    return 0


def _its_run(adapter: Path) -> tuple[Path, dict] | None:
    """The record of the run that trained ``adapter`` (``OUTPUT/runs/RUN_ID.json`` beside ``OUTPUT/adapters/RUN_ID``,
    or ``run.json`` in a ``train`` folder) and its path; None when there is none or it cannot be read."""
    for path in (adapter.parent.parent / "runs" / f"{adapter.name}.json", adapter / "run.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        return (path, record) if isinstance(record, dict) else None
    return None


def _its_settings(adapter: str | Path | None) -> tuple[Path, dict, dict] | None:
    """(record path, record, its settings) of the run that trained ``adapter`` (:func:`_its_run`); None when there is
    no record or it keeps no settings (an older forgetless's)."""
    found = _its_run(Path(adapter)) if adapter else None
    if not found or not isinstance(found[1].get("settings"), dict):
        return None
    return found[0], found[1], found[1]["settings"]


def _their_chat(settings: dict) -> bool:
    return bool(settings.get("chat_template", False))  # in a run's settings only when on


def _base_as_its_run(args: argparse.Namespace) -> None:
    """``eval --adapter``'s (and ``landscape --adapter``'s) base loaded as the run that trained the adapter loaded it
    (its ``dtype`` and ``quantization``) unless the flags say otherwise: a QLoRA adapter scored on a float base gave
    other numbers. Read from the run's record, else from the adapter's own record (``forgetless_base.json``, which
    says it since session 33: a ``train`` folder without a test set or held-out text has no record)."""
    from forgetless.models import BASE_FILE, adapter_record

    if not args.adapter:
        where, settings = None, {}
    elif found := _its_settings(args.adapter):
        where, _, settings = found
    else:
        where, settings = Path(args.adapter) / BASE_FILE, adapter_record(args.adapter)
    from forgetless.config import BASE_DEFAULTS

    for key, default in BASE_DEFAULTS.items():
        if getattr(args, key) is None:
            theirs = settings.get(key, default)  # a run's settings keep only what is not the default
            setattr(args, key, theirs)
            if theirs != default:
                print(f"note: the base is loaded with {key} {theirs}, as the run that trained this adapter did "
                      f"({where}); --{key} {default} to change that", file=sys.stderr)


def _unlike_its_run(adapter: Path, chat: bool | None, block_size: int | None, precision: str = "auto") -> str:
    """A note when ``eval --adapter`` scores differently from the run that trained the adapter (:func:`_its_run`):
    another chat-template setting, block size or precision gives other numbers than the run's record ("" when
    alike or unknown)."""
    from forgetless.config import GeneralData
    from forgetless.precision import default_device, resolve_precision

    if not (found := _its_settings(adapter)):
        return ""
    path, record, settings = found
    theirs_chat = _their_chat(settings)
    theirs_block = (settings.get("general") or {}).get("block_size", GeneralData.block_size)  # default: not kept
    computed = record.get("computed") if isinstance(record.get("computed"), dict) else {}
    theirs_precision = computed.get("precision")  # how the run computed (auto resolved on its machine)
    flags = []
    if chat is not None and chat != theirs_chat:
        flags.append(f"--chat-template {'true' if theirs_chat else 'false'}")
    if block_size is not None and block_size != theirs_block:
        flags.append(f"--block-size {theirs_block}")
    if theirs_precision in ("bf16", "fp32") and theirs_precision != resolve_precision(precision, default_device()):
        flags.append(f"--precision {theirs_precision}")
    if flags:
        return (f"note: the run that trained this adapter ({path}) was scored with other settings; to reproduce "
                f"its scores, add {' '.join(flags)}")
    return ""


def _task_source(spec: str) -> tuple[str, str | None]:
    """``FILE`` or ``HUB_NAME[:schema]`` -> (source, schema or None)."""
    source, _, schema = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    return source, schema or None


def _task_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", help="--task: the split of a hub dataset or of a folder of split files (test.jsonl, "
                                   "...); default: the only one")
    p.add_argument("--config", help="--task: the hub dataset's configuration (allenai/ai2_arc: ARC-Easy)")


def _load_task(args: argparse.Namespace, spec: str) -> tuple[str, list]:
    """``--task SPEC`` read as (source, items), with ``--split``, ``--config`` and ``--limit``."""
    from forgetless.data import load_mc_task

    source, schema = _task_source(spec)
    return source, load_mc_task(source, schema=schema, split=args.split, name=args.config, limit=args.limit)


def _check_task_data_args(args: argparse.Namespace, command: str) -> None:
    from forgetless.config import ConfigError

    given = [flag for flag, value in (("--split", args.split), ("--config", args.config)) if value is not None]
    if given and not args.task:
        raise ConfigError(f"{command}: {' and '.join(given)} choose the data of --task, and no --task was given")


def _check_model_and_adapter(args: argparse.Namespace) -> None:
    """Before any model loads: the model's source and the adapter folder's files."""
    from forgetless.models import check_adapter_files, check_model_source

    check_model_source(args.model)
    if args.adapter:
        check_adapter_files(args.adapter)


def _chat_template_before_load(args: argparse.Namespace, has_items: bool) -> bool:
    """Whether ``--chat-template`` applies to the multiple-choice items (``eval --task``, ``landscape --task``); when it
    does, the tokenizer alone is checked for a template before any model loads."""
    from forgetless.config import ConfigError
    from forgetless.data import chat_template_on, use_chat_template
    from forgetless.models import load_tokenizer

    if args.chat_template is None:  # as the run that trained --adapter scored its items, else auto
        found = _its_settings(args.adapter)
        args.chat_template = "auto"
        if found:
            theirs = _their_chat(found[2])
            args.chat_template = "true" if theirs else "false"
            if has_items and theirs != chat_template_on("auto", args.model):
                print(f"note: multiple-choice prompts {'through' if theirs else 'without'} the chat template, as the "
                      f"run that trained this adapter scored them ({found[0]}); --chat-template "
                      f"{'false' if theirs else 'true'} to change that", file=sys.stderr)
    chat = has_items and chat_template_on(_CHAT_FLAG[args.chat_template], args.model)
    if chat:
        try:
            use_chat_template(_CHAT_FLAG[args.chat_template], args.model, load_tokenizer(args.model))
        except ValueError as err:
            raise ConfigError(f"--chat-template: {err}") from None
    return chat


def _cmd_eval(args: argparse.Namespace) -> int:
    from forgetless.config import ConfigError
    from forgetless.data import chat_mc_items, load_texts, pack_blocks
    from forgetless.evaluation import evaluate_mc, perplexity
    from forgetless.experiment import RunFailed, data_errors

    from forgetless.models import is_quantized, load_adapter, load_model
    from forgetless.pipeline import NonFiniteScore, check_finite
    from forgetless.precision import default_device

    if not args.ppl and not args.task and not args.lmeval:
        raise ConfigError("eval: nothing to evaluate: give --ppl FILE (general perplexity), --task "
                          "FILE[:schema] (multiple-choice accuracy) and/or --lmeval TASK (an lm-evaluation-harness "
                          "task)")
    _check_task_data_args(args, "eval")
    _check_model_and_adapter(args)
    texts = None
    if args.ppl:  # every file is read before the model loads
        from forgetless.models import context_length

        longest = context_length(args.model)
        if longest is not None and args.block_size > longest:
            raise ConfigError(f"eval: --block-size {args.block_size} is longer than the model's context ({longest} "
                              f"positions)")
        with data_errors("--ppl"):
            texts = load_texts(args.ppl)  # --limit counts task items; --max-blocks bounds the perplexity's text
    tasks = []
    for spec in args.task or []:
        with data_errors("--task"):
            tasks.append(_load_task(args, spec))
    harness = []
    for spec in args.lmeval or []:  # built (their data read) before the model loads, as the experiment does
        from forgetless.evaluation.lmeval import HarnessTaskError, LMEvalUnavailable, load_harness_task

        try:
            harness.append(load_harness_task(spec, limit=args.limit, num_fewshot=args.num_fewshot))
        except LMEvalUnavailable as err:
            raise ConfigError(f"--lmeval {spec}: {err}") from None
        except HarnessTaskError as err:
            raise ConfigError(f"--lmeval {spec}: {err}") from None
    chat = _chat_template_before_load(args, bool(tasks or harness))
    _base_as_its_run(args)
    if args.adapter:
        note = _unlike_its_run(Path(args.adapter), chat if tasks or harness else None,
                               args.block_size if texts is not None else None, args.precision)
        if note:
            print(note, file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype, precision=args.precision,
                                  quantization=args.quantization)
    if not is_quantized(model):  # a quantized base is placed by its loader
        model.to(default_device())  # evaluate on the GPU when there is one
    if args.adapter:
        model = load_adapter(model, args.adapter)
    if chat:  # multiple-choice prompts as lm-eval's --apply_chat_template builds them
        tasks = [(source, chat_mc_items(items, tokenizer)) for source, items in tasks]
    report: dict = {"model": args.model, "adapter": args.adapter, "chat_template": chat, "dtype": args.dtype,
                    "quantization": args.quantization}
    if texts is not None:
        with data_errors("--ppl"):
            blocks = pack_blocks(texts, tokenizer, args.block_size, max_blocks=args.max_blocks)
        res = perplexity(model, blocks, batch_size=args.batch_size, precision=args.precision)
        report["perplexity"] = {"source": args.ppl, "ppl": res.ppl, "ppl_base2": res.ppl_base2,
                                "mean_nll": res.mean_nll, "tokens": res.tokens}
        # each score on stderr as it is done: a later task's failure (memory, Ctrl-C) leaves the ones before it said
        print(f"perplexity of {args.ppl}: {res.ppl:.4g} over {res.tokens} tokens", file=sys.stderr)
    for source, items in tasks:
        res = evaluate_mc(model, tokenizer, items, batch_size=args.batch_size, precision=args.precision,
                          share_prefix=args.share_prefix)
        report.setdefault("tasks", {})[source] = {"acc": res.acc, "acc_norm": res.acc_norm, "n": res.n,
                                                  "acc_stderr": res.acc_stderr}
        print(f"{source}: acc {res.acc:.4f}, acc_norm {res.acc_norm:.4f} over {res.n} items", file=sys.stderr)
    for task in harness:
        scores = task.with_chat_template(chat).score(model, tokenizer, batch_size=args.batch_size,
                                                     precision=args.precision, progress=False)
        report.setdefault("lmeval", {})[task.spec] = {k: scores[k] for k in ("acc", "acc_stderr", "n", "metric")} | {
            "metrics": scores["metrics"]}
        print(f"{task.spec}: {scores['metric']} {scores['acc']:.4f} over {scores['n']} items", file=sys.stderr)
    try:  # a broken model (or adapter) gives no numbers, rather than NaN in the JSON
        check_finite({"general_ppl": report.get("perplexity", {}).get("ppl"),
                      "tasks": report.get("tasks", {}) | {k: {"acc": v["acc"]} for k, v in
                                                         report.get("lmeval", {}).items()}})
    except NonFiniteScore as err:
        raise RunFailed(f"eval: {args.adapter or args.model}: {err}") from err
    print(json.dumps(report, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from forgetless.config import ConfigError
    from forgetless.export import check_output, export_merged, export_wise_ft
    from forgetless.methods import wise_ft

    if args.wise_ft is not None and args.dtype is not None:
        raise ConfigError("export: --dtype sets the merged model's dtype; a --wise-ft adapter is written in float32: "
                          "leave --dtype out")
    if args.wise_ft is not None and args.theta_nu is None and args.adapter \
            and (Path(args.adapter) / wise_ft.FILENAME).is_file():
        args.theta_nu = args.adapter  # a wise-ft run's adapter folder keeps its own theta_nu
    if (args.wise_ft is None) != (args.theta_nu is None):
        raise ConfigError("export: --wise-ft ALPHA and --theta-nu FILE_OR_DIR go together (a WiSE-FT adapter; "
                          f"--theta-nu may be left out when the adapter folder holds {wise_ft.FILENAME}); "
                          "without them the merged model is written")
    _check_model_and_adapter(args)
    try:
        check_output(Path(args.output))
    except FileExistsError as e:
        raise ConfigError(f"export: --output: {e}") from None
    if args.wise_ft is None:
        out = export_merged(args.model, args.adapter, args.output, dtype=args.dtype or "base")
        print(f"merged model and tokenizer written to {out}")
    else:
        out = export_wise_ft(args.model, args.adapter, args.theta_nu, args.wise_ft, args.output)
        print(f"WiSE-FT adapter (alpha={args.wise_ft}) written to {out}")
    return 0


def _cmd_landscape(args: argparse.Namespace) -> int:
    from forgetless.config import BASE_DEFAULTS, ConfigError
    from forgetless.data import chat_mc_items, lm_examples, load_texts, mc_train_examples, pack_blocks
    from forgetless.experiment import data_errors
    from forgetless.landscape import (LandscapeSettings, compute_surface, measure_flatness, model_objective,
                                      save_surface, surface_metrics)

    from forgetless.models import is_quantized, load_adapter, load_model
    from forgetless.precision import default_device
    from forgetless.reporting.landscape_plots import plot_surface

    if bool(args.text) == bool(args.task):
        raise ConfigError("landscape: give the evaluation data: --text FILE (general text) or --task FILE[:schema]")
    _check_task_data_args(args, "landscape")
    if args.dims == 2 and args.grid < 3:
        raise ConfigError("landscape: --grid: a 2-D surface needs --grid >= 3")
    if args.grid < 2:
        raise ConfigError("landscape: --grid: a 1-D curve needs --grid >= 2")
    if args.params == "trainable" and not args.adapter:
        raise ConfigError("landscape: a model without --adapter has no trainable weights: pass --adapter or "
                          "--params all")
    low, high = args.range
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"landscape: --range LOW HIGH needs finite numbers with LOW < HIGH, got {low} {high}")
    settings = None
    if args.metrics:  # checked before any work (--rho, --ascent-steps, ...), not after the surface
        try:
            settings = LandscapeSettings(params=args.params, batch_size=args.batch_size, precision=args.precision,
                                         grid=0, seed=args.seed, hessian_iters=args.hessian_iters,
                                         hessian_method=args.hessian_method, trace_samples=args.trace_samples,
                                         rho=args.rho, ascent_steps=args.ascent_steps)
        except ValueError as err:
            raise ConfigError(f"landscape: {err}") from None
    _check_model_and_adapter(args)
    out = _landscape_output(Path(args.output), args.overwrite)
    flag = "--text" if args.text else "--task"
    with data_errors(flag):  # read before the model loads
        if args.text:
            texts = load_texts(args.text, limit=args.limit)
        else:
            source, items = _load_task(args, args.task)
    chat = _chat_template_before_load(args, bool(args.task))
    _base_as_its_run(args)
    if args.quantization != "none" and args.params == "all":
        raise ConfigError(f"--params all moves every weight, and a {args.quantization} base's are quantized: "
                          f"use --params trainable, or --quantization none")
    model, tokenizer = load_model(args.model, dtype=args.dtype, precision=args.precision,
                                  quantization=args.quantization)
    if not is_quantized(model):  # a quantized base is placed on the process's GPU as it loads
        model.to(default_device())  # evaluate on the GPU when there is one
    if args.adapter:
        model = load_adapter(model, args.adapter, trainable=True)  # trainable: the LoRA weights
    with data_errors(flag):
        if args.text:
            blocks = pack_blocks(texts, tokenizer, args.block_size, max_blocks=args.blocks)
            examples = lm_examples(blocks)
            data = {"text": args.text, "blocks": len(blocks), "block_size": args.block_size}
        else:
            if chat:  # the prompts the model is evaluated on (as eval --task and the experiments)
                items = chat_mc_items(items, tokenizer)
            examples = mc_train_examples(items, tokenizer)[: args.blocks]  # loss on the correct answers' tokens
            data = {"task": source, "examples": len(examples), "chat_template": chat}
    with model_objective(model, examples, args.params, args.batch_size, args.precision) as objective:
        loss = objective.value()
        surface = compute_surface(model, objective.value, dims=args.dims, params=args.params, steps=args.grid,
                                  span=(args.range[0], args.range[1]), filter_normalize=args.filter_normalize,
                                  seed=args.seed, progress=not args.quiet)
    surface.meta |= {"model": args.model, "adapter": args.adapter, "data": data, "precision": args.precision,
                     **{k: getattr(args, k) for k, default in BASE_DEFAULTS.items() if getattr(args, k) != default}}
    report: dict = {"model": args.model, "adapter": args.adapter, "data": data, "loss": loss, **surface.meta}
    if args.dims == 2:
        report["surface_metrics"] = surface_metrics(surface.losses, surface.coords)
    if settings is not None:
        metrics, _ = measure_flatness(model, examples, settings)
        report["metrics"] = {k: v for k, v in metrics.items() if k not in ("loss", "n_params")}
    # written into a folder beside it and moved in file by file, landscape.json last: an error while writing leaves
    # the folder as it was (a landscape.json always with its own surface and figures)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"  # a new name: nothing of the user's is removed
    tmp.mkdir(parents=True)
    try:
        files = {"grid": save_surface(surface, tmp / "surface.npz"), **plot_surface(surface, tmp)}
        report["files"] = {k: str(out / Path(v).name) for k, v in files.items()}
        (tmp / "landscape.json").write_text(json.dumps(report, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        _remove_earlier_measurement(out)
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "landscape.json"):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


def _remove_earlier_measurement(out: Path) -> None:
    """The files of an earlier ``landscape`` measurement in ``out`` (its landscape.json first, then the files it
    lists), so that a 1-D measurement over a 2-D one leaves no stale surface figure; other files stay."""
    try:
        earlier = json.loads((out / "landscape.json").read_text())
    except (OSError, ValueError):
        return
    (out / "landscape.json").unlink(missing_ok=True)
    files = earlier.get("files") if isinstance(earlier, dict) else None
    for path in (files.values() if isinstance(files, dict) else ()):
        if isinstance(path, str) and Path(path).parent == out:  # only its own files, in this folder
            Path(path).unlink(missing_ok=True)


def _landscape_output(out: Path, overwrite: bool) -> Path:
    """``landscape --output``, checked before any work: a new or empty folder where one can be made, or, with
    ``--overwrite``, one that holds an earlier measurement (its files are replaced)."""
    from forgetless.config import ConfigError
    from forgetless.experiment import check_output_possible

    out = out.resolve()  # `--output .` has a name and a parent (the files are written beside it, then moved in)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"landscape: --output {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = "an earlier measurement (landscape.json)" if (out / "landscape.json").exists() else "other files"
        raise ConfigError(f"landscape: --output {out} holds {held}: give a new or empty folder, or --overwrite to "
                          f"replace its files")
    check_output_possible(out, "landscape: --output")
    check_output_possible(out.parent, "landscape: --output's parent folder")  # where the files are written first
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with the command's error format (``forgetless: error: WHAT``, exit code 2) and no abbreviated flags
    (``--rerun`` is not taken for ``--rerun-changed``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False} | kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"forgetless: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message for an unparsable value
    return parse


_positive = _at_least(1)
_nonnegative = _at_least(0)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


_finite.__name__ = "number"


# --chat-template of `train`, `eval` and `landscape`: the experiment's chat_template (docs/data_formats.md)
_CHAT_ARG = dict(choices=["auto", "true", "false"], default="auto",
                 help="multiple-choice prompts through the tokenizer's chat template, as lm-eval's "
                      "--apply_chat_template (auto: when the model's name says it is instruction-tuned)")
_CHAT_ARG_ADAPTER = dict(_CHAT_ARG, default=None,  # eval and landscape
                         help=_CHAT_ARG["help"] + "; default: as the run that trained --adapter scored, else auto")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="forgetless", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the command too
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("demo", parents=[debug], help="offline demo: SmolLM2 learns invented facts; base vs lora-mu vs lora-nu-mu")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--rerun-changed", action="store_true",
                   help="redo the runs of --output whose settings changed (another --model, a newer forgetless)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", parents=[debug], help="run an experiment YAML (methods x tasks x seeds); resumable")
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE",
                   help="override the YAML's values (VALUE read as YAML), checked as the file is: "
                        "train.domain.lr=1e-4 seeds=[0,1] tasks[0].train_limit=100")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (runs to do and done, cached general stages, steps per stage) and stop; "
                        "no model is loaded")
    p.add_argument("--output", help="results folder (default: the YAML's 'output')")
    p.add_argument("--rerun-changed", action="store_true",
                   help="redo the runs whose settings changed, finished or interrupted (the old record, adapter, "
                        "checkpoints, surfaces and logs are kept beside, named with .DIGEST); without it such runs "
                        "are an error")
    p.add_argument("--jobs", type=_positive, default=1, metavar="N",
                   help="train N runs side by side, one worker process each (runs that share a stage to train stay "
                        "in one worker; torch threads are shared out; with several GPUs, one GPU per worker)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", parents=[debug], help="Markdown report with figures from an experiment's results folder: main "
                                      "table, t-tests, cost, sweeps, Pareto front, ablation")
    p.add_argument("results", help="the experiment's output folder (with runs/*.json)")
    p.add_argument("--output", help="folder for report.md and its figures (default RESULTS/report)")
    p.add_argument("--reference", default="lora-mu,lora-nu-mu",
                   help="methods the t-tests compare against, comma-separated ('' for none)")
    p.add_argument("--metric", choices=["acc", "acc_norm"], default="acc", help="domain accuracy metric")
    p.add_argument("--rank-base", action="store_true", help="rank 'base' too when marking best and second")
    p.add_argument("--test", choices=["paired", "welch"], default="paired",
                   help="significance test: paired by seed where both methods ran the same seeds (default), or "
                        "Welch's throughout (as the reports of docs/results were written)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("merge", parents=[debug],
                       help="gather the finished runs of results folders (an experiment run in parts) into one")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="results folders (each with runs/*.json)")
    p.add_argument("--into", required=True, metavar="DEST",
                   help="the folder to merge into (created if absent); a run it already has with another record "
                        "is an error, and nothing is copied")
    p.set_defaults(func=_cmd_merge)

    common = argparse.ArgumentParser(add_help=False, parents=[debug])
    common.add_argument("--model", default=None, help="embedded name, hub id, model folder or .gguf file (default: the "
                                                     f"base an --adapter's record names, else {DEFAULT_MODEL})")
    common.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"],
                        help="how the model computes: auto (bf16 where the hardware computes in it, else fp32), bf16 "
                             "or fp32; default auto, except landscape: fp32, as an experiment's landscape section "
                             "measures (near a minimum a bf16 gradient is mostly rounding)")
    common.add_argument("--batch-size", type=_positive, default=8,
                        help="examples per batch, for training and for evaluation (default 8)")
    common.add_argument("--block-size", type=_positive, default=128,
                        help="tokens per block of general text, for training and perplexity (default 128)")

    p = sub.add_parser(
        "train", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="one fine-tune (any method of an experiment); saves the adapter, evaluates if given test data",
        description="One (method, domain task, seed) run, trained exactly as `forgetless run` trains it (same code,\n"
                    "same adapter for the same settings). The adapter is saved to --output in PEFT's format. With\n"
                    "--heldout and/or --test the run is also evaluated (WiSE-FT's interpolations too) and its record,\n"
                    "the run JSON of an experiment, is written to OUTPUT/run.json. The training settings (--lr,\n"
                    "--max-steps, --epochs, --batch-size) apply to both stages of a method with a general stage;\n"
                    "an experiment YAML (forgetless run) sets them per stage.")
    p.add_argument("--method", default="lora-mu",
                   help="default lora-mu (the domain alone); method names joined by '+' (lora-nu-mu, lora-mu+ewc, "
                        "hlora+sam), or one YAML entry of an "
                        "experiment's 'methods:' list, with options: '{name: hlora, phi: 0.01}', "
                        "'[lora-mu, {name: ewc, lambda: 100}]'")
    p.add_argument("--general", help="general text (jsonl with 'text', .txt, or hub dataset): stage nu's data and the "
                                     "general text of methods that use it (replay, ewc)")
    p.add_argument("--general-limit", type=_positive, help="read at most this many general-text documents")
    p.add_argument("--general-max-blocks", type=_positive, help="keep at most this many blocks of general text")
    p.add_argument("--domain", required=True, help="task file or hub dataset for stage mu")
    p.add_argument("--domain-kind", default="auto",
                   choices=["multiple_choice", "instructions", "chat", "prompt_completion", "text", "auto"],
                   help="what --domain holds: multiple-choice items, Alpaca-style instructions, chat 'messages', "
                        "'prompt'/'completion' rows, raw 'text' (packed into --max-length blocks), or auto (default: "
                        "detected from the first row's fields); docs/data_formats.md")
    p.add_argument("--schema", help="sciq, piqa, medmcqa, arc, openbookqa, mmlu, boolq or generic (default: detected)")
    p.add_argument("--domain-limit", type=_positive, help="read at most this many training rows of --domain")
    p.add_argument("--max-length", type=_positive, default=256, help="tokens per domain training example")
    p.add_argument("--heldout", help="held-out general text: evaluate the general perplexity after training")
    p.add_argument("--heldout-max-blocks", type=_positive, help="perplexity over at most this many blocks")
    p.add_argument("--test", help="multiple-choice test set of the domain: evaluate the accuracy after training")
    p.add_argument("--test-limit", type=_positive,
                   help="score at most this many test items (the first ones: a small limit may be unrepresentative)")
    p.add_argument("--output", required=True, help="adapter folder (and OUTPUT/run.json when evaluated)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the adapter and record an earlier run left in --output (refused otherwise)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data per stage (default 1)")
    p.add_argument("--max-steps", type=_positive, help="optimizer steps per stage (instead of --epochs)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate, linear decay (default 2e-4)")
    p.add_argument("--seed", type=_nonnegative, default=0, help="default 0")
    p.add_argument("--lora-r", type=_positive, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scaling alpha/r (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="default 0.05")
    p.add_argument("--target-modules", default="q_proj,v_proj",
                   help="comma-separated module names to adapt (default q_proj,v_proj)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilized scaling alpha/sqrt(r)")
    p.add_argument("--report-to", action="append", choices=["tensorboard", "wandb", "mlflow"],
                   help="log the training scalars there too (OUTPUT/logs for tensorboard); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--chat-template", **_CHAT_ARG)
    # speed levers (docs/speed.md): the same numbers up to rounding, except --group-by-length (other batches)
    p.add_argument("--attn-implementation", choices=["sdpa", "eager", "flash_attention_2"],
                   help="attention of the model while training (default: as loaded, transformers' sdpa)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layers and the chunked loss (slow first steps)")
    # the frozen base (issue #12): as the YAML's dtype, quantization and train.*.gradient_checkpointing
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="the frozen base's weights (default auto: bf16 where the run computes in bf16, else fp32)")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none",
                   help="a 4-bit (NF4, QLoRA) or 8-bit base through bitsandbytes (pip install 'forgetless[qlora]')")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the layers' activations in the backward: less memory, about a third more time")
    p.add_argument("--liger", action="store_true", help="Liger's Triton kernels (pip install 'forgetless[liger]'; CUDA)")
    p.add_argument("--padding-free", action="store_true",
                   help="each batch as one row without padding, position ids restarting per example")
    p.add_argument("--group-by-length", action="store_true", help="batches of examples of similar length")
    p.add_argument("--fused-lora", action="store_true",
                   help="add each LoRA update inside one matmul (addmm): fewer passes over the layers' outputs")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", parents=[common], help="general perplexity and multiple-choice accuracy",
                       description="Score a model (and --adapter) as an experiment scores its runs: perplexity on "
                                   "held-out general text (--ppl), multiple-choice accuracy (--task) and "
                                   "lm-evaluation-harness tasks (--lmeval). Prints JSON; its ppl_base2 is 2 ** the "
                                   "mean NLL in nats, what the HLoRA paper's code reports as perplexity (for "
                                   "comparison with the paper only: not bits, not a perplexity).")
    p.add_argument("--adapter", help="a PEFT adapter folder to apply")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"],
                   help="the base's weights (default: as the run that trained --adapter loaded them, else auto)")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"],
                   help="a 4-bit or 8-bit base (default: as the run that trained --adapter had it, else none)")
    p.add_argument("--ppl", help="held-out general text for perplexity")
    p.add_argument("--task", action="append", help="multiple-choice task: FILE or HUB_NAME[:schema]; repeatable")
    _task_data_args(p)
    p.add_argument("--lmeval", action="append", metavar="TASK",
                   help="an lm-evaluation-harness task name or task YAML, scored by the harness on the model as "
                        "loaded (extra forgetless[lmeval]); repeatable; --limit applies per task")
    p.add_argument("--num-fewshot", type=_nonnegative, metavar="N",
                   help="--lmeval tasks: few-shot examples per prompt (the harness's --num_fewshot)")
    p.add_argument("--limit", type=_positive, help="score at most this many items of each task (the first ones)")
    p.add_argument("--max-blocks", type=_positive, help="perplexity over at most this many blocks of --ppl")
    p.add_argument("--chat-template", **_CHAT_ARG_ADAPTER)
    p.add_argument("--share-prefix", action="store_true",
                   help="--task: score each item as one sequence, its context once (1.4-4x fewer tokens; equal to "
                        "rounding, which in bf16 moves scores at noise level)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("landscape", parents=[common],
                       help="loss surface L(theta + a d1 + b d2) around a model (+ adapter): grid, figures, "
                            "flatness metrics")
    p.add_argument("--adapter", help="a PEFT adapter folder to apply (its LoRA weights are the 'trainable' ones)")
    p.add_argument("--text", help="evaluation data: general text (jsonl with 'text', .txt, or hub dataset)")
    p.add_argument("--task", help="evaluation data: multiple-choice task FILE or HUB_NAME[:schema] (loss on the "
                                  "correct answers)")
    _task_data_args(p)
    p.add_argument("--blocks", type=_positive, default=8, help="evaluation blocks of --block-size tokens (or task examples)")
    p.add_argument("--limit", type=_positive, help="read at most this many texts / task items")
    p.add_argument("--dims", type=int, choices=[1, 2], default=2, help="1-D curve or 2-D surface")
    p.add_argument("--grid", type=_positive, default=21, help="points per axis")
    p.add_argument("--range", type=float, nargs=2, default=[-1.0, 1.0], metavar=("LOW", "HIGH"),
                   help="coordinates a, b run over [LOW, HIGH] (default -1 1)")
    p.add_argument("--params", choices=["trainable", "all"], default="trainable",
                   help="perturb the trainable (LoRA) weights or all weights")
    p.add_argument("--filter-normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="rescale each row of a direction to the norm of the weights' row (Li et al. 2018)")
    p.add_argument("--seed", type=_nonnegative, default=0, help="seed of the random directions")
    p.add_argument("--metrics", action="store_true",
                   help="also the Hessian's top eigenvalue and trace, and eps-sharpness")
    p.add_argument("--hessian-iters", type=_positive, default=20,
                   help="with --metrics: Lanczos steps (or power iterations) for the top eigenvalue (fewer power "
                        "iterations did not converge on SmolLM2's LoRA weights)")
    p.add_argument("--hessian-method", choices=("power", "lanczos"), default="lanczos",
                   help="with --metrics: the top eigenvalue by Lanczos steps (default; they converge where the "
                        "spectrum clusters or both ends are large, as in SAM-trained models, and keep --hessian-iters "
                        "parameter-sized vectors) or by the (shifted) power iteration (two vectors)")
    p.add_argument("--trace-samples", type=_positive, default=24,
                   help="with --metrics: Hutchinson probes for the trace (single probes ranged -97..+186 around ~25 on "
                        "SmolLM2)")
    p.add_argument("--rho", type=float, default=0.05,
                   help="with --metrics: eps-sharpness radius (L2, over the selected weights)")
    p.add_argument("--ascent-steps", type=int, default=5,
                   help="with --metrics: projected gradient-ascent steps of eps-sharpness")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"],
                   help="the base's weights (default: as the run that trained --adapter loaded them, else auto, which "
                        "resolves with --precision: fp32)")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"],
                   help="a 4-bit or 8-bit base (default: as the run that trained --adapter had it, else none)")
    p.add_argument("--output", default="landscape", help="folder for surface.npz, the PNGs and landscape.json (new or "
                                                          "empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier measurement in --output")
    p.add_argument("--chat-template", **_CHAT_ARG_ADAPTER)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_landscape)

    p = sub.add_parser("export", parents=[debug],
                       help="a merged full model (base + adapter), or a PEFT adapter of a WiSE-FT point")
    p.add_argument("--model", default=None, help="the adapter's base: embedded name, hub id, folder or .gguf (default: "
                                                 f"the base the adapter's record names, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", required=True, help="the PEFT adapter folder (the domain stage's, theta_mu)")
    p.add_argument("--output", required=True, help="a new or empty folder")
    p.add_argument("--dtype", choices=["base", "bf16", "fp32"], default=None,
                   help="dtype of the merged model (default: the dtype the base is stored in; float32 for the "
                        "embedded GGUF models, which forgetless dequantizes: bf16 halves the files); not with "
                        "--wise-ft (that adapter is always float32)")
    p.add_argument("--wise-ft", type=_finite, metavar="ALPHA",
                   help="write the adapter of W + (1-ALPHA) dW_nu + ALPHA dW_mu (rank r_nu + r_mu) instead")
    p.add_argument("--theta-nu", help="with --wise-ft: wise_ft_theta_nu.safetensors, or a cached general stage's "
                                      "folder (with that file or with its adapter); default: the one a wise-ft "
                                      "run saved beside its adapter")
    p.set_defaults(func=_cmd_export)
    return parser


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as ``main`` reads it (SystemExit for --help or a bad flag, as argparse does)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a positional list at the first flag: `run x.yaml --output o seeds=[0]` leaves the override
    # unparsed. KEY=VALUE words after the flags are overrides too (in the order given); anything else is an error.
    if extra and getattr(args, "overrides", None) is not None and all("=" in w and not w.startswith("-")
                                                                        for w in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "precision", "given") is None:  # not given: the command's own default
        args.precision = "fp32" if args.func is _cmd_landscape else "auto"
    if getattr(args, "model", "given") is None:  # not given: the base an --adapter records, else the default
        args.model = _recorded_base(getattr(args, "adapter", None)) or DEFAULT_MODEL
    return args


def _recorded_base(adapter: str | None) -> str | None:
    """The base model an adapter folder's record names (forgetless_base.json, written by forgetless's runs), or None.
    Said on stderr when it is taken, since no --model was given."""
    from forgetless.models import BASE_FILE, adapter_record

    model = adapter_record(adapter).get("model") if adapter else None
    if isinstance(model, str) and model:
        print(f"forgetless: --model: {model}, the base {Path(adapter) / BASE_FILE} records", file=sys.stderr)
        return model
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_command_line(argv)
    except SystemExit as stop:  # --help (0) or a bad flag (2, already printed)
        return stop.code if isinstance(stop.code, int) else 2
    from forgetless.config import ConfigError
    from forgetless.data import DataError
    from forgetless.experiment import RunFailed
    from forgetless.landscape_runs import LandscapeFailed
    from forgetless.models import AdapterError, LeverUnavailable, ModelNotFoundError
    from forgetless.training.checkpoint import CheckpointMismatch

    terminated = []

    def terminate(signum, frame) -> None:  # `kill`, a scheduler's time limit: stopped as Ctrl-C stops a run
        terminated.append(signum)
        raise KeyboardInterrupt

    installed = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, terminate) if installed else None
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        kept = str(err) or "the work in progress was not recorded (records and adapters are written only once complete)"
        print(f"forgetless: {'terminated (SIGTERM)' if terminated else 'interrupted'}: {kept}", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except (DataError, ConfigError, AdapterError, ModelNotFoundError, LeverUnavailable, RunFailed, CheckpointMismatch,
            LandscapeFailed, OSError) as err:
        if args.debug:
            raise
        print(f"forgetless: error: {err}", file=sys.stderr)
        return 2
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
