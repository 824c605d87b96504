"""The experiment schema (forgetless/config.py): every mistake is an error naming the file and the key path.

No model is loaded: the files name models and data that need not exist, since reading the YAML checks only the YAML.
"""

from pathlib import Path

import re

import pytest
import yaml

from forgetless.config import ConfigError, Experiment, TextSource, load_experiment

BASE = {
    "name": "tiny", "model": "no-model", "output": "out", "seeds": [0, 1],
    "general": {"train": {"source": "g.jsonl"}, "heldout": {"source": "h.txt"}, "block_size": 16},
    "tasks": [{"name": "t", "train": "train.jsonl", "test": "test.jsonl"}],
    "methods": ["base", "lora-mu"],
    "train": {"general": {"max_steps": 2}, "domain": {"max_steps": 2}},
    "eval": {"batch_size": 4},
}


def write(tmp_path: Path, snippet: str) -> Path:
    """``BASE`` with the top-level keys of the YAML ``snippet`` replaced, written to ``exp.yaml``."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(BASE | (yaml.safe_load(snippet) or {})))
    return path


ERRORS = [  # (YAML snippet, what the message says after "exp.yaml: ")
    # unknown keys, in every section
    ("nmae: x", "unknown key 'nmae'; known: ["),
    ("{nmae: x, modle: y}", "unknown keys 'modle', 'nmae'; known: ["),
    ("general: {train: {source: g.jsonl, limt: 3}, heldout: h.txt}",
     "general.train: unknown key 'limt'; known: ['field', 'limit', 'max_blocks', 'name', 'source', 'split']"),
    ("general: {train: g.jsonl, heldout: {source: h.txt, max_block: 3}}", "general.heldout: unknown key 'max_block'"),
    ("general: {train: g.jsonl, heldout: h.txt, blocksize: 64}", "general: unknown key 'blocksize'"),
    # a stage's own precision or seed would be replaced by the experiment's (run_recipe): refused, saying where
    ("train: {general: {max_steps: 2}, domain: {max_steps: 2, precision: fp32}}",
     "train: domain.precision: a stage has no precision of its own in an experiment; set precision: at the top of "
     "the experiment"),
    ("train: {general: {seed: 3}}", "train: general.seed: a stage has no seed of its own in an experiment; set seeds: "
     "at the top, one run per seed"),
    ("eval: {batchsize: 4}", "eval: unknown key 'batchsize'; known: ['batch_size', 'every', 'every_blocks', 'every_items', 'select', 'share_prefix', 'suite', 'suite_limit']"),
    ("train: {generall: {max_steps: 2}}", "train: unknown key 'generall'; known: ['domain', 'general']"),
    ("train: {general: {max_stepz: 2}}", "train.general: unknown key 'max_stepz'"),
    ("train: {domain: {learning_rate: 0.1}}", "train.domain: unknown key 'learning_rate'"),
    ("tasks: [{name: t, train: a, test: b, train_limt: 3}]", "tasks[0]: unknown key 'train_limt'"),
    ("lora: {rank: 4}", "lora: unknown key 'rank'"),
    ("landscape: {grids: 3}", "landscape: unknown key 'grids'"),
    # missing keys and sections
    ("general: {train: g.jsonl}", "general: needs 'train' and 'heldout'"),
    ("tasks: [{name: t, train: a}]", "tasks[0]: missing key 'test'"),
    ("tasks: [{train: a, test: b}]", "tasks[0]: missing key 'name'"),
    ("tasks: []", "tasks: must list at least one domain task"),
    ("tasks: [{name: t, train: a, test: b}, {name: t, train: c, test: d}]", "tasks: task names must be unique"),
    # types
    ("seeds: '12'", "seeds: expected a list, got a string '12'"),
    ("seeds: 3", "seeds: expected a list, got an integer 3"),
    ("seeds: [0.7]", "seeds[0]: expected an integer, got a number 0.7"),
    ("seeds: [0, 0]", "seeds: must list distinct seeds"),
    ("train: {general: {lr: abc}}", "train.general.lr: expected a number, got a string 'abc'"),
    ("train: {domain: {max_steps: 2.5}}", "train.domain.max_steps: expected an integer, got a number 2.5"),
    ("eval: {batch_size: true}", "eval.batch_size: expected an integer, got a boolean True"),
    ("lora: {target_modules: q_proj}", "lora.target_modules: expected a list, got a string 'q_proj'"),
    ("lora: [8]", "lora: expected a mapping, got a list [8]"),
    ("tasks: [{name: t, train: a, test: b, train_limit: many}]", "tasks[0].train_limit: expected an integer"),
    ("name: 2024", "name: expected a string, got an integer 2024"),
    # values the sections' own checks reject
    ("precision: fp16", "precision: must be one of ['auto', 'bf16', 'fp32']"),
    ("tasks: [{name: t, train: a, test: b, train_kind: chatml}]", "tasks[0]: train_kind must be"),
    ("landscape: {params: lora}", "landscape: params must be 'trainable' or 'all'"),
    ("landscape: {precision: fp16}", "landscape: precision must be one of ('auto', 'bf16', 'fp32')"),
    ("landscape: {span: .nan}", "landscape: span must be finite and > 0"),
    ("landscape: {rho: .inf}", "landscape: span must be finite and > 0 and rho finite and >= 0"),
    ("{quantization: 4bit, landscape: {all_weights_seeds: [0]}}",
     "landscape: params: all and all_weights_seeds move every weight, and a 4bit base's are packed integers"),
    ("{quantization: 8bit, landscape: {params: all}}", "landscape: params: all and all_weights_seeds move every"),
    ("train: {general: {lr: -1}}", "train.general: lr must be > 0"),
    ("eval: {batch_size: 0}", "eval: batch_size must be >= 1"),
    ("train: {general: {max_steps: -1}}", "train.general: max_steps must be >= 1"),
    ("train: {domain: {max_steps: 0}}", "train.domain: max_steps must be >= 1"),
    ("train: {domain: {scheduler: cosin}}", "train.domain: scheduler must be one of ["),
    ("train: {general: {precision: fp16}}", "train.general: precision must be one of ["),
    ("tasks: [{name: t, train: a, test: b, test_limit: -1}]", "tasks[0]: test_limit must be >= 1, got -1"),
    ("tasks: [{name: t, train: a, test: b, train_limit: 0}]", "tasks[0]: train_limit must be >= 1, got 0"),
    ("tasks: [{name: t, train: a, test: b, max_length: 0}]", "tasks[0]: max_length must be >= 1"),
    ("tasks: [{name: t, train: a, test: b, schema: sicq}]", "tasks[0]: schema must be one of ['arc', "),
    ("general: {train: {source: g.jsonl, limit: 0}, heldout: h.txt}", "general.train: limit must be >= 1, got 0"),
    ("general: {train: g.jsonl, heldout: {source: h.txt, max_blocks: -2}}", "general.heldout: max_blocks must be >= 1"),
    ("general: {train: g.jsonl, heldout: h.txt, block_size: 0}", "general: block_size must be >= 1, got 0"),
    ("seeds: [-1]", "seeds: must be integers in [0, 2**32), got [-1]"),
    ("lora: {dropout: 1.5}", "lora: dropout must be in [0, 1), got 1.5"),
    ("lora: {dropout: -0.1}", "lora: dropout must be in [0, 1)"),
    ("lora: {r: 0}", "lora: r (the LoRA rank) must be an integer >= 1, got 0"),
    ("lora: {alpha: 0}", "lora: alpha must be a finite number > 0"),
    ("lora: {target_modules: []}", "lora: target_modules must name at least one module"),
    ("lora: {target_modules: [q_proj, 'v proj']}", "lora: target_modules must be module names"),
    # names that become parts of file names
    ("tasks: [{name: ../../escaped, train: a, test: b}]", "tasks[0]: the task name '../../escaped' may hold only"),
    ("tasks: [{name: /abs/path, train: a, test: b}]", "tasks[0]: the task name '/abs/path' may hold only"),
    ("tasks: [{name: .., train: a, test: b}]", "tasks[0]: the task name '..' may hold only"),
    ("tasks: [{name: 'a;rm -rf x', train: a, test: b}]", "tasks[0]: the task name 'a;rm -rf x' may hold only"),
    ("tasks: [{name: '$(id)', train: a, test: b}]", "tasks[0]: the task name '$(id)' may hold only"),
    ("tasks: [{name: '', train: a, test: b}]", "tasks[0]: the task name '' may hold only"),
    # method entries
    ("methods: lora-mu", "methods: expected a list, got a string 'lora-mu'"),
    ("methods: []", "methods: must list at least one method"),
    ("methods: [lora-mu, lora-nu-mu, lora-mu]", "methods[2]: duplicate of methods[0] ('lora-mu')"),
    ("methods: [lora-mu, {name: lora-mu}]", "methods[1]: duplicate of methods[0] ('lora-mu')"),
    ("methods: [lora-mu, no-such-method]", "methods[1]: unknown method 'no-such-method'"),
    ("methods: [{name: hlora, phi: 1e5}, {name: hlora, phi: 1.0e+5}]",
     "methods[1]: 'hlora(phi=100000.0)' trains what methods[0] ('hlora(phi=1e5)') trains: the same method with the same "
     "option values, written differently; keep one"),
    ("methods: [hlora, {name: hlora, phi: 10}]", "methods[1]: 'hlora(phi=10)' trains what methods[0] ('hlora') trains"),
    ("methods: [{name: lora-mu, tasks: [c]}]", "methods[0]: 'tasks' must list task names from ['t']"),
    # option values (they raised a TypeError, or were taken: an unknown adapter, infinite weights)
    ("methods: [{hlora: [1]}]", "methods[0]: cannot read method entry {'hlora': [1]}: the options of 'hlora' must be a "
                                "mapping"),
    ("methods: [{name: sam, stages: 5}]", "methods[0]: SAM stages must be a stage or a list of them"),
    ("methods: [{name: wise-ft, adapter: defualt}]", "methods[0]: adapter: 'defualt': an experiment attaches LoRA as "
                                                     "'default'"),
    ("methods: [{name: hlora, adapter: 3}]", "methods[0]: adapter must be a string, got 3"),
    ("methods: [{name: wise-ft, alphas: [abc]}]", "methods[0]: alphas[0] must be a number, got 'abc'"),
    ("methods: [{name: wise-ft, alphas: [.nan]}]", "methods[0]: alphas[0] must be a number, not NaN (got nan)"),
    ("methods: [{name: wise-ft, alphas: [true]}]", "methods[0]: alphas[0] must be a number, got True"),
    ("methods: [{name: wise-ft, alphas: [.inf]}]", "methods[0]: alphas must be finite numbers, got inf"),
    ("methods: [{name: hlora, phi: .inf}]", "methods[0]: phi must be a finite number, got inf"),
    ("methods: [{name: ewc, lambda: .inf}]", "methods[0]: lambda must be a finite number, got inf"),
    ("methods: [{name: sam, rho: .inf}]", "methods[0]: rho must be a finite number, got inf"),
    ("train: {domain: {weight_decay: .inf}}", "train.domain: weight_decay must be >= 0 and finite, got inf"),
]


@pytest.mark.parametrize("snippet, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_schema_errors_name_file_and_key(tmp_path, snippet, message):
    path = write(tmp_path, snippet)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert f"{path}: {message}" in str(info.value)


def test_a_quantized_base_without_bitsandbytes_is_said_before_any_run(tmp_path, monkeypatch):
    """A dry run passed, and the run stopped at its first model load."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    from forgetless.experiment import check_model, plan_runs

    exp = load_experiment(write(tmp_path, "{quantization: 4bit}"))  # read: its tables can be rebuilt without it
    with pytest.raises(ConfigError, match=r"quantization: 4bit needs bitsandbytes: pip install 'forgetless\[qlora\]'"):
        check_model(exp, plan_runs(exp))  # what run and --dry-run check before any model loads, when runs are left
    check_model(exp, [])


def test_unquoted_exponent_is_a_float(tmp_path):
    path = tmp_path / "exp.yaml"
    text = yaml.safe_dump({k: v for k, v in BASE.items() if k != "train"})
    path.write_text(text + "train:\n  general: {lr: 1e-4, max_steps: 2}\n  domain: {lr: 2.0e-4, epochs: 1}\n")
    assert yaml.safe_load(path.read_text())["train"]["general"]["lr"] == "1e-4"  # what YAML 1.1 reads
    exp = load_experiment(path)
    assert exp.train.general.lr == 0.0001 and isinstance(exp.train.general.lr, float)
    assert exp.train.domain.lr == 2e-4
    assert exp.train.domain.epochs == 1 and isinstance(exp.train.domain.epochs, int)  # kept: cache keys unchanged


def test_a_valid_file_reads_into_the_schema(tmp_path):
    path = write(tmp_path, "{general: {train: g.jsonl, heldout: {source: h.txt, max_blocks: 8}}, 'x-sizes': {n: 1},"
                           " methods: [base, {name: lora-mu, tasks: [t]}], landscape: {grid: 3}}")
    exp = load_experiment(path, output=tmp_path / "elsewhere")
    assert isinstance(exp, Experiment) and exp.source == path and exp.output == tmp_path / "elsewhere"
    assert exp.general.train == TextSource("g.jsonl") and exp.general.heldout.max_blocks == 8
    assert exp.general.heldout.cache_key() == {"source": "h.txt", "max_blocks": 8}
    assert exp.methods == ["base", {"name": "lora-mu"}] and exp.method_tasks == [None, ["t"]]
    assert exp.landscape.grid == 3 and exp.lora.r == 8 and exp.tasks[0].max_length == 256
    path.write_text(yaml.safe_dump({k: v for k, v in BASE.items() if k not in ("name", "output", "landscape")}))
    exp = load_experiment(path)
    assert exp.name == "exp" and exp.output == Path("runs") / "exp" and exp.landscape is None
    path.write_text(path.read_text() + "landscape:\n")
    assert load_experiment(path).landscape.grid == 9  # a bare section: on, with its defaults


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found: .*missing.yaml"):
        load_experiment(tmp_path / "missing.yaml")
    path = tmp_path / "exp.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: invalid YAML"):
        load_experiment(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: the experiment must be a mapping"):
        load_experiment(path)
    with pytest.raises(ConfigError, match=r"is a folder: give the experiment's YAML file"):
        load_experiment(tmp_path)


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently (a second `seeds:` further down would replace the first);
    here it is an error naming the key and both lines, in nested and flow mappings too. Keys merged from an anchor
    (`<<: *x`) may be given again: that is how an entry overrides part of one."""
    text = yaml.safe_dump(BASE, sort_keys=False)
    path = tmp_path / "exp.yaml"
    path.write_text(text + "seeds: [1]\n")
    line = len(text.splitlines()) + 1
    first = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("seeds:"))
    with pytest.raises(ConfigError, match=rf"the key 'seeds' is given twice \(lines {first} and {line}\)"):
        load_experiment(path)
    path.write_text(text.replace("methods:", "methods: [{name: ewc, lambda: 1, lambda: 2}]\nx-old:", 1))
    with pytest.raises(ConfigError, match=r"the key 'lambda' is given twice"):
        load_experiment(path)
    path.write_text(text.replace("methods:", "x-w: &w {name: ewc, lambda: 1}\nmethods: [{<<: *w, lambda: 5}]\nx-old:", 1))
    assert load_experiment(path).methods == [{"name": "ewc", "lambda": 5}]


@pytest.mark.parametrize("entry, option, expected", [
    ({"name": "hlora", "layer_wise": "false"}, "layer_wise", False),  # bool('false') is True: never taken as is
    ({"name": "sam", "adaptive": "False"}, "adaptive", False),
    ({"name": "sam", "adaptive": "true"}, "adaptive", True),
    ({"name": "ewc", "samples": "32"}, "samples", 32),
    ({"name": "sam", "every_k": 2.0}, "every_k", 2),
    ({"name": "hlora", "phi": "1e5"}, "phi", 1e5),
])
def test_method_options_given_as_strings_or_floats_are_read_as_their_type(entry, option, expected):
    from forgetless.methods import resolve

    value = getattr(resolve(entry).plugins[-1].options, option)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("entry, message", [
    ({"name": "hlora", "layer_wise": "no way"}, "layer_wise must be true or false, got 'no way'"),
    ({"name": "hlora", "phi": None}, "phi must be a number, got None"),
    ({"name": "sam", "rho": float("nan")}, "rho must be a number, not NaN (got nan)"),
    ({"name": "ewc", "samples": "all"}, "samples must be an integer, got 'all'"),
    ({"name": "sam", "every_k": 2.5}, "every_k must be an integer, got 2.5"),
])
def test_method_options_of_the_wrong_type_name_the_option(entry, message):
    from forgetless.methods import resolve

    with pytest.raises(ValueError, match=re.escape(message)):
        resolve(entry)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": "eight"}, "batch_size must be an integer"), ({"max_steps": 2.5}, "max_steps must be an integer"),
    ({"keep_checkpoints": "maybe"}, "keep_checkpoints must be true or false"), ({"lr": None}, "lr must be a number"),
    ({"epochs": float("inf")}, "epochs must be finite"), ({"seed": -1}, "seed must be in [0, 2**32)"),
])
def test_train_config_built_in_python_checks_its_types(kwargs, message):
    """The experiment schema checks a YAML's types; a TrainConfig built in Python gets the same checks (a string '8'
    is read as 8, 'false' as False; it raised a raw TypeError, or kept 'false', which counts as true)."""
    from forgetless.training.config import TrainConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**kwargs)
    read = TrainConfig(batch_size="8", grad_accum=2.0, keep_checkpoints="false", epochs=1)
    assert (read.batch_size, read.grad_accum, read.keep_checkpoints) == (8, 2, False)
    assert read.epochs == 1 and type(read.epochs) is int  # an int stays an int: it is in cache keys as written
