"""The ``forgetless`` command: demo, run, train, eval, landscape, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgetless.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from forgetless.config import Experiment


def _cmd_demo(args: argparse.Namespace) -> int:
    from forgetless.config import load_experiment
    from forgetless.demo import demo_experiment
    from forgetless.experiment import run_experiment

    path = demo_experiment(Path(args.output), model=args.model)
    results = run_experiment(load_experiment(path), progress=not args.quiet)
    print()
    print((Path(args.output) / "results.md").read_text())
    base = next(r for r in results if r["method"] == "base")
    tuned = [r for r in results if r["method"] != "base"]
    for r in tuned:
        gain = 100 * (r["tasks"]["corvath"]["acc"] - base["tasks"]["corvath"]["acc"])
        loss = r["general_ppl"] - base["general_ppl"]
        print(f"{r['method']:>11}: domain accuracy {gain:+.1f} points over base, general PPL {loss:+.3f}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from forgetless.config import load_experiment
    from forgetless.experiment import run_experiment

    exp = load_experiment(args.experiment, output=args.output)
    run_experiment(exp, progress=not args.quiet)
    print((exp.output / "results.md").read_text())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from forgetless.reporting.report import build_report

    path = build_report(args.results, output=args.output, reference=args.reference or None, metric=args.metric,
                        rank_base=args.rank_base)
    print(path.read_text())
    print(f"report: {path} (figures beside it)")
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

    try:  # the settings' own checks (lr > 0, r >= 1, ...) become errors without a traceback
        stage = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr)
        task = TaskSpec(name="domain", train=args.domain, test=args.test, schema=args.schema,
                        train_limit=args.domain_limit, test_limit=args.test_limit, max_length=args.max_length,
                        train_kind=args.domain_kind)
        lora, evaluation = _lora_from(args), EvalSettings(batch_size=args.batch_size)
    except ValueError as err:
        raise ConfigError(f"train: {err}") from err
    general = GeneralData(
        train=TextSource(args.general, limit=args.general_limit, max_blocks=args.general_max_blocks) if args.general
        else None,
        heldout=TextSource(args.heldout, max_blocks=args.heldout_max_blocks) if args.heldout else None,
        block_size=args.block_size)
    methods, method_tasks = check_methods([_method_entry(args.method)], [task.name], "--method")
    return Experiment(name="train", output=Path(args.output), model=args.model, seeds=[args.seed], lora=lora,
                      general=general, tasks=[task], methods=methods, train=TrainStages(general=stage, domain=stage),
                      eval=evaluation, precision=args.precision, method_tasks=method_tasks)


def _cmd_train(args: argparse.Namespace) -> int:
    from forgetless.experiment import train_one

    train_one(_train_experiment(args), progress=not args.quiet)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from forgetless.data import load_mc_task, load_texts, pack_blocks
    from forgetless.evaluation import evaluate_mc, perplexity
    from forgetless.models import load_model

    model, tokenizer = load_model(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    report: dict = {"model": args.model, "adapter": args.adapter}
    if args.ppl:
        blocks = pack_blocks(load_texts(args.ppl, limit=args.limit), tokenizer, args.block_size,
                             max_blocks=args.max_blocks)
        res = perplexity(model, blocks, batch_size=args.batch_size, precision=args.precision)
        report["perplexity"] = {"source": args.ppl, "ppl": res.ppl, "ppl_base2": res.ppl_base2,
                                "mean_nll": res.mean_nll, "tokens": res.tokens}
    for spec in args.task or []:
        source, _, schema = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        items = load_mc_task(source, schema=schema or None, limit=args.limit)
        res = evaluate_mc(model, tokenizer, items, batch_size=args.batch_size, precision=args.precision)
        report.setdefault("tasks", {})[source] = {"acc": res.acc, "acc_norm": res.acc_norm, "n": res.n,
                                                  "acc_stderr": res.acc_stderr}
    print(json.dumps(report, indent=2))
    return 0


def _cmd_landscape(args: argparse.Namespace) -> int:
    from forgetless.data import lm_examples, load_mc_task, load_texts, mc_train_examples, pack_blocks
    from forgetless.landscape import (LandscapeSettings, compute_surface, measure_flatness, model_objective,
                                      save_surface, surface_metrics)
    from forgetless.models import load_model
    from forgetless.reporting.landscape_plots import plot_surface

    if bool(args.text) == bool(args.task):
        raise SystemExit("error: give the evaluation data: --text FILE (general text) or --task FILE[:schema]")
    if args.dims == 2 and args.grid < 3:
        raise SystemExit("error: a 2-D surface needs --grid >= 3")
    if args.params == "trainable" and not args.adapter:
        raise SystemExit("error: a model without --adapter has no trainable weights: pass --adapter or --params all")
    model, tokenizer = load_model(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)  # trainable: the LoRA weights
    if args.text:
        texts = load_texts(args.text, limit=args.limit)
        blocks = pack_blocks(texts, tokenizer, args.block_size, max_blocks=args.blocks)
        examples, data = lm_examples(blocks), {"text": args.text, "blocks": len(blocks), "block_size": args.block_size}
    else:
        source, _, schema = args.task.partition(":") if not Path(args.task).exists() else (args.task, "", "")
        items = load_mc_task(source, schema=schema or None, limit=args.limit)
        examples = mc_train_examples(items, tokenizer)[: args.blocks]  # loss on the correct answers' tokens
        data = {"task": source, "examples": len(examples)}
    out = Path(args.output)
    with model_objective(model, examples, args.params, args.batch_size, args.precision) as objective:
        loss = objective.value()
        surface = compute_surface(model, objective.value, dims=args.dims, params=args.params, steps=args.grid,
                                  span=(args.range[0], args.range[1]), filter_normalize=args.filter_normalize,
                                  seed=args.seed, progress=not args.quiet)
    surface.meta |= {"model": args.model, "adapter": args.adapter, "data": data, "precision": args.precision}
    report: dict = {"model": args.model, "adapter": args.adapter, "data": data, "loss": loss, **surface.meta}
    if args.dims == 2:
        report["surface_metrics"] = surface_metrics(surface.losses, surface.coords)
    if args.metrics:
        settings = LandscapeSettings(params=args.params, batch_size=args.batch_size, precision=args.precision, grid=0,
                                     seed=args.seed, hessian_iters=args.hessian_iters,
                                     trace_samples=args.trace_samples, rho=args.rho, ascent_steps=args.ascent_steps)
        metrics, _ = measure_flatness(model, examples, settings)
        report["metrics"] = {k: v for k, v in metrics.items() if k not in ("loss", "n_params")}
    files = {"grid": save_surface(surface, out / "surface.npz"), **plot_surface(surface, out)}
    report["files"] = {k: str(v) for k, v in files.items()}
    (out / "landscape.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetless", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="offline demo: SmolLM2 learns invented facts; base vs lora-mu vs lora-nu-mu")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="run an experiment YAML (methods x tasks x seeds); resumable")
    p.add_argument("experiment")
    p.add_argument("--output", help="results folder (default: the YAML's 'output')")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="Markdown report with figures from an experiment's results folder: main "
                                      "table, t-tests, cost, sweeps, Pareto front, ablation")
    p.add_argument("results", help="the experiment's output folder (with runs/*.json)")
    p.add_argument("--output", help="folder for report.md and its figures (default RESULTS/report)")
    p.add_argument("--reference", default="lora-nu-mu", help="method the t-tests compare against ('' for none)")
    p.add_argument("--metric", choices=["acc", "acc_norm"], default="acc", help="domain accuracy metric")
    p.add_argument("--rank-base", action="store_true", help="rank 'base' too when marking best and second")
    p.set_defaults(func=_cmd_report)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, hub id, model folder or .gguf file")
    common.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    common.add_argument("--batch-size", type=int, default=8)
    common.add_argument("--block-size", type=int, default=128)

    p = sub.add_parser(
        "train", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="one fine-tune (any method of an experiment); saves the adapter, evaluates if given test data",
        description="One (method, domain task, seed) run, trained exactly as `forgetless run` trains it (same code,\n"
                    "same adapter for the same settings). The adapter is saved to --output in PEFT's format. With\n"
                    "--heldout and/or --test the run is also evaluated (WiSE-FT's interpolations too) and its record,\n"
                    "the run JSON of an experiment, is written to OUTPUT/run.json.")
    p.add_argument("--method", default="lora-mu",
                   help="method names joined by '+' (lora-nu-mu, lora-mu+ewc, hlora+sam), or one YAML entry of an "
                        "experiment's 'methods:' list, with options: '{name: hlora, phi: 0.01}', "
                        "'[lora-mu, {name: ewc, lambda: 100}]'")
    p.add_argument("--general", help="general text (jsonl with 'text', .txt, or hub dataset): stage nu's data and the "
                                     "general text of methods that use it (replay, ewc)")
    p.add_argument("--general-limit", type=int, help="read at most this many general-text documents")
    p.add_argument("--general-max-blocks", type=int, help="keep at most this many blocks of general text")
    p.add_argument("--domain", required=True, help="task file or hub dataset for stage mu")
    p.add_argument("--domain-kind", choices=["multiple_choice", "instructions"], default="multiple_choice",
                   help="--domain holds multiple-choice items or Alpaca-style instructions")
    p.add_argument("--schema", help="sciq, piqa, medmcqa, arc, openbookqa, mmlu or generic (default: detected)")
    p.add_argument("--domain-limit", type=int)
    p.add_argument("--max-length", type=int, default=256, help="tokens per domain training example")
    p.add_argument("--heldout", help="held-out general text: evaluate the general perplexity after training")
    p.add_argument("--heldout-max-blocks", type=int)
    p.add_argument("--test", help="multiple-choice test set of the domain: evaluate the accuracy after training")
    p.add_argument("--test-limit", type=int)
    p.add_argument("--output", required=True, help="adapter folder (and OUTPUT/run.json when evaluated)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--rslora", action="store_true", help="rank-stabilized scaling alpha/sqrt(r)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", parents=[common], help="general perplexity and multiple-choice accuracy")
    p.add_argument("--adapter", help="a PEFT adapter folder to apply")
    p.add_argument("--ppl", help="held-out general text for perplexity")
    p.add_argument("--task", action="append", help="multiple-choice task: FILE or HUB_NAME[:schema]; repeatable")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-blocks", type=int)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("landscape", parents=[common],
                       help="loss surface L(theta + a d1 + b d2) around a model (+ adapter): grid, figures, "
                            "flatness metrics")
    p.add_argument("--adapter", help="a PEFT adapter folder to apply (its LoRA weights are the 'trainable' ones)")
    p.add_argument("--text", help="evaluation data: general text (jsonl with 'text', .txt, or hub dataset)")
    p.add_argument("--task", help="evaluation data: multiple-choice task FILE or HUB_NAME[:schema] (loss on the "
                                  "correct answers)")
    p.add_argument("--blocks", type=int, default=8, help="evaluation blocks of --block-size tokens (or task examples)")
    p.add_argument("--limit", type=int, help="read at most this many texts / task items")
    p.add_argument("--dims", type=int, choices=[1, 2], default=2, help="1-D curve or 2-D surface")
    p.add_argument("--grid", type=int, default=21, help="points per axis")
    p.add_argument("--range", type=float, nargs=2, default=[-1.0, 1.0], metavar=("LOW", "HIGH"),
                   help="coordinates a, b run over [LOW, HIGH] (default -1 1)")
    p.add_argument("--params", choices=["trainable", "all"], default="trainable",
                   help="perturb the trainable (LoRA) weights or all weights")
    p.add_argument("--filter-normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="rescale each row of a direction to the norm of the weights' row (Li et al. 2018)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--metrics", action="store_true",
                   help="also the Hessian's top eigenvalue and trace, and eps-sharpness")
    p.add_argument("--hessian-iters", type=int, default=20)
    p.add_argument("--trace-samples", type=int, default=10)
    p.add_argument("--rho", type=float, default=0.05, help="eps-sharpness radius (L2, over the selected weights)")
    p.add_argument("--ascent-steps", type=int, default=5)
    p.add_argument("--output", default="landscape", help="folder for surface.npz, the PNGs and landscape.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_landscape)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from forgetless.data import DataError
    from forgetless.config import ConfigError
    from forgetless.models import ModelNotFoundError

    try:
        return args.func(args)
    except (DataError, ConfigError, ModelNotFoundError, FileNotFoundError) as err:
        print(f"forgetless: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
