"""Training-data formats (chat messages, prompt/completion, raw text), their errors, and the chat template of
multiple-choice prompts, with the tiny byte-level tokenizer and a small Jinja chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from forgetless.config import ConfigError, load_experiment
from forgetless.data import (MCItem, DataError, chat_examples, chat_mc_items, chat_template_on, detect_kind,
                             load_train, prompt_completion_examples, resolve_kind, train_examples, use_chat_template)
from forgetless.data.chat import looks_instruct
from forgetless.lm import IGNORE_INDEX
from tests.unit.tiny_model import make_tiny_model
from tests.unit.tiny_tokenizer import make_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"

# ChatML-like, with the tiny tokenizer's own special tokens: <s> opens a turn, </s> (EOS) closes it.
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "Again, please?"},
        {"role": "assistant", "content": "Hello!"}]


@pytest.fixture
def tok():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages, generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


# ------------------------------------------------------------------------------------------------ chat
def test_chat_labels_are_exactly_the_assistant_turns(tok):
    (example,) = chat_examples([CHAT], tok)
    full = ids(tok, render(tok, CHAT))
    assert example["input_ids"] == full
    # by hand: assistant turn i spans from the end of the generation prompt of messages[:i] to the end of
    # messages[:i + 1], each counted in tokens of the rendered prefix
    expected = [IGNORE_INDEX] * len(full)
    for i in (2, 4):
        start = len(ids(tok, render(tok, CHAT[:i], generation=True)))
        end = len(ids(tok, render(tok, CHAT[: i + 1])))
        expected[start:end] = full[start:end]
    assert example["labels"] == expected
    labelled = [t for t, label in zip(full, example["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(labelled) == "Hello there!</s>\nHello!</s>\n"  # the replies and their end-of-turn marker


def test_a_token_straddling_the_template_and_the_reply_is_labelled(tok):
    """A reply starting with whitespace: a byte-level tokenizer merges the template's newline with the reply's first
    one into one token, which begins before the reply's span. It was unlabelled (the reply's first newline never
    trained); transformers' assistant mask marks the token holding the span's first character."""
    tok.add_tokens(["\n\n"])  # as SmolLM2's tokenizer merges "assistant\n" + "\nHello" into "\n\n" + "Hello"
    conv = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "\nHello there!"}]
    (example,) = chat_examples([conv], tok)
    pieces = [tok.decode([i]) for i in example["input_ids"]]
    first = next(t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert pieces[first] == "\n\n" and pieces[first - 1] == "t"  # the straddling token, the template's before it
    labelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(labelled) == "\n\nHello there!</s>\n"
    (plain,) = chat_examples([[conv[0], {"role": "assistant", "content": "Hello there!"}]], tok)  # no straddle:
    assert tok.decode([t for t, label in zip(plain["input_ids"], plain["labels"]) if label != IGNORE_INDEX]) == (
        "Hello there!</s>\n")  # the template's newline before the reply stays unlabelled


def test_chat_truncation_keeps_an_assistant_token(tok):
    long_user = {"role": "user", "content": "Plants make sugar from light. " * 8}
    messages = [long_user, {"role": "assistant", "content": "Hello there!"}]
    full = chat_examples([messages], tok)[0]
    (cut,) = chat_examples([messages], tok, max_length=16)
    assert len(full["input_ids"]) > 16 and len(cut["input_ids"]) == 16
    assert any(label != IGNORE_INDEX for label in cut["labels"])
    first = next(t for t, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    lo = min(first - 8, len(full["input_ids"]) - 16)  # at most half the budget before the reply, a full window
    assert cut == {"input_ids": full["input_ids"][lo: lo + 16], "labels": full["labels"][lo: lo + 16]}
    # a reply longer than the window: the window starts half the budget before it (with a short reply it started at
    # len - 16, whatever the half-budget rule said)
    messages = [long_user, {"role": "assistant", "content": "Sugar is made from light and water by plants. " * 4}]
    full = chat_examples([messages], tok)[0]
    (cut,) = chat_examples([messages], tok, max_length=16)
    first = next(t for t, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    assert first - 8 < len(full["input_ids"]) - 16  # the rule decides here
    assert cut == {"input_ids": full["input_ids"][first - 8: first + 8], "labels": full["labels"][first - 8: first + 8]}


def test_a_cut_chat_keeps_the_bos_of_a_tokenizer_that_adds_one(tok):
    """A conversation whose first reply starts beyond max_length lost the template's opening BOS (Llama's
    <|begin_of_text|>) when the window moved; it is kept where the tokenizer adds a BOS by default (not where <s>
    only opens turns, as SmolLM2's <|im_start|> does: the test above)."""
    from tokenizers import processors

    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    messages = [{"role": "user", "content": "Plants make sugar from light. " * 8},
                {"role": "assistant", "content": "Hello there!"}]
    full = chat_examples([messages], tok)[0]
    assert full["input_ids"][0] == 2
    (cut,) = chat_examples([messages], tok, max_length=16)
    first = next(t for t, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    lo = min(first - 7, len(full["input_ids"]) - 15)  # 15 after the BOS, at most half of them before the reply
    assert cut == {"input_ids": [2] + full["input_ids"][lo: lo + 15],
                   "labels": [IGNORE_INDEX] + full["labels"][lo: lo + 15]}


def test_chat_needs_a_chat_template():
    with pytest.raises(ValueError, match="needs the model's chat template"):
        chat_examples([CHAT], make_tiny_tokenizer())


# ------------------------------------------------------------------------------------------------ prompt/completion
def test_prompt_completion_masks_the_prompt(tok):
    prompt, completion = "Question: What is the answer?\nAnswer:", " the answer is B."
    (example,) = prompt_completion_examples([(prompt, completion)], tok)
    p, c = ids(tok, prompt), ids(tok, completion) + [tok.eos_token_id]
    assert example == {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}


def test_conversational_prompt_completion_masks_the_prompt_turns(tok):
    prompt, completion = CHAT[:4], CHAT[4:]
    (example,) = prompt_completion_examples([(prompt, completion)], tok)
    full = ids(tok, render(tok, CHAT))
    start = len(ids(tok, render(tok, prompt, generation=True)))
    assert example["input_ids"] == full
    assert example["labels"] == [IGNORE_INDEX] * start + full[start:]  # the earlier reply carries no loss here


# ------------------------------------------------------------------------------------------------ text
def test_text_packs_into_blocks_of_the_requested_size(tok, tmp_path):
    docs = [f"Plants make sugar from light, sentence {i}." for i in range(12)]
    path = tmp_path / "domain.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rows = load_train("text", str(path))
    examples = train_examples("text", rows, tok, max_length=24)
    stream = [t for d in docs for t in ids(tok, d) + [tok.eos_token_id]]
    assert len(examples) == len(stream) // 24
    for k, example in enumerate(examples):
        assert example["input_ids"] == stream[24 * k: 24 * (k + 1)] == example["labels"]


# ------------------------------------------------------------------------------------------------ files
ROWS = {
    "chat": [{"messages": CHAT}, {"messages": CHAT[1:3]}],
    "prompt_completion": [{"prompt": "Say hello.", "completion": " Hello!"},
                          {"prompt": "Question: What?\nAnswer:", "completion": " A"}],
    "conversational": [{"prompt": CHAT[:2], "completion": CHAT[2:3]}, {"prompt": CHAT[:4], "completion": CHAT[4:]}],
    "text": [{"text": f"Plants make sugar from light, sentence {i}."} for i in range(8)],
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("name", list(ROWS))
def test_jsonl_and_parquet_give_the_same_examples(name, tok, tmp_path):
    kind = "prompt_completion" if name == "conversational" else name
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS[name])
    parquet = write_parquet(tmp_path / "d.parquet", ROWS[name])
    assert resolve_kind("auto", jsonl) == resolve_kind("auto", parquet) == kind
    examples = [train_examples(kind, load_train(kind, source), tok, max_length=16) for source in (jsonl, parquet)]
    assert examples[0] == examples[1] and examples[0]


def test_a_parquet_dataset_folder_is_read_like_a_hub_dataset(tok, tmp_path):
    folder = tmp_path / "chat-set"
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", ROWS["chat"])
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS["chat"])
    assert resolve_kind("auto", str(folder), "train") == "chat"
    assert chat_examples(load_train("chat", str(folder), split="train"), tok) == \
        chat_examples(load_train("chat", jsonl), tok)


@pytest.mark.parametrize("record, kind", [
    ({"messages": []}, "chat"), ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"instruction": "a", "input": "", "output": "b"}, "instructions"), ({"text": "a"}, "text"),
    ({"text": "a", "url": "u", "timestamp": "t"}, "text"), ({"question": "q", "choices": ["a"], "answer": 0},
                                                              "multiple_choice"),
    ({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, "multiple_choice"),
])
def test_auto_detects_the_kind_from_the_fields(record, kind):
    assert detect_kind(record) == kind


def test_auto_reads_the_fixtures_as_their_kinds():
    assert resolve_kind("auto", str(FIXTURES / "alpaca.jsonl")) == "instructions"
    assert resolve_kind("auto", str(FIXTURES / "piqa.jsonl")) == "multiple_choice"
    assert resolve_kind("auto", "demo:facts/train") == "multiple_choice"


# ------------------------------------------------------------------------------------------------ bad rows
BAD = [
    ("chat", {"messages": "hello"}, "messages", "expected a list of {role, content} messages, got str"),
    ("chat", {"text": "hello"}, "messages", "missing"),
    ("chat", {"messages": []}, "messages", "empty list of messages"),
    ("chat", {"messages": ["hi"]}, "messages[0]", "expected a {role, content} object, got str"),
    ("chat", {"messages": [{"content": "hi"}]}, "messages[0].role", "missing"),
    ("chat", {"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ("chat", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "expected a string, got int"),
    ("chat", {"messages": [{"role": "human", "content": "hi"}]}, "messages[0].role", "unknown role 'human'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ("chat", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role",
     "opens with the assistant's turn"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "messages[1].content", "empty assistant turn"),
    ("prompt_completion", {"prompt": "hi"}, "completion", "missing"),
    ("prompt_completion", {"prompt": "hi", "completion": "  "}, "completion", "empty"),
    ("prompt_completion", {"prompt": "hi", "completion": 3}, "completion", "expected a string like the prompt"),
    ("prompt_completion", {"prompt": 3, "completion": "x"}, "prompt", "expected a string or a list of messages"),
    ("prompt_completion", {"prompt": [{"role": "user", "content": "hi"}], "completion": "x"}, "completion",
     "expected a list of messages like the prompt"),
    ("prompt_completion", {"prompt": [{"role": "user", "content": "hi"}],
                           "completion": [{"role": "user", "content": "x"}]}, "completion[0].role",
     "the completion is the assistant's reply"),
    ("text", {"text": 3}, "text", "expected a string, got int"),
    ("text", {"body": "x"}, "text", "missing"),
]


@pytest.mark.parametrize("kind, row, field, problem", BAD, ids=[f"{b[0]}:{b[2]}:{b[3][:24]}" for b in BAD])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_row_error_names_file_line_and_field(kind, row, field, problem, fmt, tmp_path):
    good = ROWS[kind][0]
    rows, line = [good, good, row], 3  # the bad row is line (row) 3
    path = tmp_path / f"bad.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        try:
            write_parquet(path, rows)
        except Exception:  # noqa: BLE001 - pyarrow refuses mixed types in one column: the bad row in a file alone
            rows, line = [row], 1
            write_parquet(path, rows)
        # (the columns are the first row's: a key only the bad row has is dropped, and a missing one is null)
    with pytest.raises(DataError) as err:
        load_train(kind, str(path))
    assert str(err.value).startswith(f"{path}, line {line}: field '{field}': ")
    assert problem in str(err.value)
    assert (err.value.origin, err.value.line, err.value.field) == (str(path), line, field)


def test_an_empty_source_says_so(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no conversations"):
        load_train("chat", str(path))


# ------------------------------------------------------------------------------------------------ MC prompts
def loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context) from the model's logits (lm-eval moves the context's trailing
    whitespace onto the continuation)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = ids(tokenizer, context)
    whole = ids(tokenizer, context + continuation)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def test_chat_template_mc_scoring_equals_the_hand_built_templated_context(tok):
    from forgetless.evaluation import evaluate_mc

    model = make_tiny_model(vocab_size=len(tok)).eval()
    items = [MCItem("Question: Which gas do plants absorb?\nAnswer:", ("oxygen", "carbon dioxide"), 1),
             MCItem("Question: What is the answer?\nAnswer:", ("A", "B", "C"), 0)]
    chat = chat_mc_items(items, tok)
    for item, templated in zip(items, chat):
        # lm-eval --apply_chat_template: one user turn + the generation prompt; target delimiter ""
        assert templated.context == f"<s>user\n{item.context}</s>\n<s>assistant\n"
        assert templated.continuations == list(item.choices)
    result = evaluate_mc(model, tok, chat, batch_size=2, precision="fp32", progress=False)
    for item, lls in zip(items, result.loglikelihoods):
        hand = [loglik(model, tok, f"<s>user\n{item.context}</s>\n<s>assistant\n", c) for c in item.choices]
        assert lls == pytest.approx(hand, rel=1e-5)
    plain = evaluate_mc(model, tok, items, batch_size=2, precision="fp32", progress=False)
    assert all(abs(a - b) > 1e-3 for p, c in zip(plain.loglikelihoods, result.loglikelihoods) for a, b in zip(p, c))


def test_a_task_description_is_the_system_turn(tok):
    from forgetless.data import load_mc_task

    (item,) = load_mc_task(str(FIXTURES / "mmlu.jsonl"), limit=1)
    (chat,) = chat_mc_items([item], tok)
    assert item.description and item.context.startswith(item.description)
    body = item.context[len(item.description):]
    assert chat.context == f"<s>system\n{item.description}</s>\n<s>user\n{body}</s>\n<s>assistant\n"


# ------------------------------------------------------------------------------------------------ the setting
@pytest.mark.parametrize("model, instruct", [
    ("smollm2-135m", True),  # embedded: SmolLM2-135M-Instruct.Q4_1.gguf
    ("gemma3-270m", False), ("meta-llama/Llama-3.2-3B", False), ("Qwen/Qwen2.5-0.5B-Instruct", True),
    ("google/gemma-2-2b-it", True), ("meta-llama/Llama-2-7b-chat-hf", True), ("models/SmolLM2-135M", False),
    ("/tmp/test_chat_instruct0/tiny-model", False), ("/x/italian-base", False),
])
def test_auto_follows_the_models_own_name(model, instruct):
    assert looks_instruct(model) is instruct
    assert chat_template_on("auto", model) is instruct
    assert chat_template_on(True, model) is True and chat_template_on(False, model) is False


def test_on_without_a_template_is_an_error(tok):
    assert use_chat_template("auto", "Qwen/Qwen2.5-0.5B-Instruct", tok) is True
    with pytest.raises(ValueError, match="its tokenizer has no chat template; set chat_template: false"):
        use_chat_template("auto", "Qwen/Qwen2.5-0.5B-Instruct", make_tiny_tokenizer())
    with pytest.raises(ValueError, match="chat_template is true"):
        use_chat_template(True, "base", make_tiny_tokenizer())
    assert use_chat_template("auto", "base", make_tiny_tokenizer()) is False


# ------------------------------------------------------------------------------------------------ experiments
def experiment_yaml(tmp_path: Path, model: str, **over) -> Path:
    text = write_jsonl(tmp_path / "general.jsonl",
                       [{"text": f"Plants make sugar from light, sentence {i}."} for i in range(40)])
    exp = {"name": "chat", "model": model, "output": str(tmp_path / "out"), "seeds": [0],
           "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
           "general": {"train": text, "heldout": {"source": text, "limit": 10}, "block_size": 16},
           "tasks": [{"name": "gen", "train": str(FIXTURES / "generic.jsonl"),
                      "test": str(FIXTURES / "generic.jsonl")}],
           "methods": ["base", "lora-mu"], "precision": "fp32",
           "train": {"general": {"max_steps": 2, "batch_size": 4}, "domain": {"max_steps": 2, "batch_size": 2}},
           "eval": {"batch_size": 4}} | over
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_the_setting_enters_a_runs_settings_only_when_on(tmp_path):
    from forgetless.experiment import plan_runs

    def digests(model, **over):
        return [j.digest for j in plan_runs(load_experiment(experiment_yaml(tmp_path, model, **over)))]

    base = digests("org/some-base-model")
    assert digests("org/some-base-model", chat_template=False) == base == digests("org/some-base-model",
                                                                                 chat_template="auto")
    assert digests("org/some-base-model", chat_template=True) != base
    # the embedded SmolLM2 is instruction-tuned: auto is on, so its runs' settings say so (an older record, made
    # without the template, is not silently reused); chat_template: false keeps the digests it had
    (job, _) = plan_runs(load_experiment(experiment_yaml(tmp_path, "smollm2-135m")))
    assert job.settings["chat_template"] is True
    (job, _) = plan_runs(load_experiment(experiment_yaml(tmp_path, "smollm2-135m", chat_template=False)))
    assert "chat_template" not in job.settings


@pytest.mark.parametrize("over, message", [
    ({"chat_template": "yes please"}, "exp.yaml: chat_template: must be auto, true or false"),
    ({"tasks": [{"name": "t", "train": "x.jsonl", "test": "x.jsonl", "train_kind": "chatt"}]},
     "exp.yaml: tasks[0]: train_kind must be one of ['multiple_choice', 'instructions', 'chat', 'prompt_completion', "
     "'text', 'auto'], got 'chatt'"),
])
def test_bad_values_are_config_errors(tmp_path, over, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(experiment_yaml(tmp_path, "m", **over))
    assert message in str(err.value)


@pytest.fixture
def chat_model_dir(tmp_path, tok):
    folder = tmp_path / "tiny-model"
    make_tiny_model(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)  # with its chat template
    return folder


def test_an_experiment_trains_on_chat_data_and_scores_with_the_template(tmp_path, chat_model_dir, monkeypatch):
    import forgetless.experiment as experiment

    rows = [{"messages": [{"role": "user", "content": f"Which gas do plants absorb? ({i})"},
                          {"role": "assistant", "content": "carbon dioxide"}]} for i in range(6)]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    task = {"name": "gen", "train": train, "test": str(FIXTURES / "generic.jsonl"), "train_kind": "auto"}
    exp = load_experiment(experiment_yaml(tmp_path, str(chat_model_dir), tasks=[task], chat_template=True))

    seen = {}
    real_load_data = experiment.load_data

    def spy(exp_, raw=None):
        seen["data"] = real_load_data(exp_, raw)
        return seen["data"]

    monkeypatch.setattr(experiment, "load_data", spy)
    results = experiment.run_experiment(exp, progress=False)
    examples, test_items = seen["data"].tasks["gen"]
    assert len(examples) == 6 and all(it.context.startswith("<s>user\n") for it in test_items)
    tok = make_tiny_tokenizer()
    for example in examples:  # the loss is on the reply and its end-of-turn marker only
        labelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
        assert tok.decode(labelled) == "carbon dioxide</s>\n"
    by_method = {r["method"]: r for r in results}
    assert set(by_method) == {"base", "lora-mu"}
    assert by_method["lora-mu"]["stages"][-1]["steps"] == 2
    assert 0 <= by_method["lora-mu"]["tasks"]["gen"]["acc"] <= 1
    assert by_method["base"]["settings"]["chat_template"] is True


@pytest.mark.parametrize("rows", [ROWS["text"] * 3, ROWS["prompt_completion"] * 2], ids=["text", "prompt_completion"])
def test_forgetless_train_reads_the_kind_of_its_domain(rows, tmp_path, tiny_model_dir, capsys):
    from forgetless.cli import main

    domain = write_jsonl(tmp_path / "domain.jsonl", rows)
    output = tmp_path / "adapter"
    code = main(["train", "--model", str(tiny_model_dir), "--precision", "fp32", "--method", "lora-mu", "--domain",
                 domain, "--domain-kind", "auto", "--max-length", "8", "--test", str(FIXTURES / "generic.jsonl"),
                 "--batch-size", "2", "--max-steps", "2", "--lora-r", "2", "--lora-dropout", "0", "--quiet",
                 "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((output / "run.json").read_text())
    assert record["stages"][-1]["steps"] == 2 and "gen" not in record["tasks"] and record["tasks"]["domain"]["n"] == 3
    assert "chat_template" not in record["settings"]  # a model named tiny-model: auto is off
    assert (output / "adapter_model.safetensors").is_file()


NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n"
             "{% endif %}")


def test_a_template_without_a_system_role(tok, tmp_path):
    from forgetless.data import load_mc_task

    tok.chat_template = NO_SYSTEM
    with pytest.raises(ValueError, match=r"refused a conversation with roles \['system', 'user', 'assistant'"):
        chat_examples([CHAT], tok)
    # read from a file, the error names the row
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:3]}, {"messages": CHAT}])
    with pytest.raises(DataError, match=f"^{path}, line 2: field 'messages': the model's chat template refused"):
        chat_examples(load_train("chat", path), tok)
    # multiple-choice prompts: the description is dropped, as HFLM.apply_chat_template drops system turns then
    (item,) = load_mc_task(str(FIXTURES / "mmlu.jsonl"), limit=1)
    (chat,) = chat_mc_items([item], tok)
    assert chat.context == f"<s>user\n{item.context[len(item.description):]}</s>\n<s>assistant\n"
    # a template that refuses the item's own turn: the error names the item's file and row
    tok.chat_template = "{{ raise_exception('too long') }}"
    with pytest.raises(DataError, match=r"mmlu\.jsonl, line 1: field 'context': the model's chat template refused"):
        chat_mc_items([item], tok)


def test_eval_of_an_adapter_scores_with_the_chat_template_setting_of_its_run(tmp_path, chat_model_dir, capsys):
    """``eval --adapter`` took ``--chat-template auto`` whatever the run had used, and only noted the difference: a
    SmolLM2 adapter trained by a YAML run (``chat_template: false``) scored 0.20 against its record's 0.467. The run's
    setting is now the default (as dtype and quantization are); a flag still overrides it."""
    from forgetless.cli import main

    out = tmp_path / "adapter"
    test = str(FIXTURES / "generic.jsonl")
    assert main(["train", "--model", str(chat_model_dir), "--precision", "fp32", "--domain", test, "--test", test,
                 "--chat-template", "true", "--batch-size", "2", "--max-steps", "2", "--lora-r", "2",
                 "--lora-dropout", "0", "--quiet", "--output", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["chat_template"] is True
    capsys.readouterr()
    evaluate = ["eval", "--model", str(chat_model_dir), "--precision", "fp32", "--adapter", str(out), "--task", test]
    assert main(evaluate) == 0
    captured = capsys.readouterr()
    scored = json.loads(captured.out[captured.out.index("{"):])
    assert "note: multiple-choice prompts through the chat template, as the run that trained this adapter" in \
        captured.err and "reproduce its scores" not in captured.err
    assert scored["chat_template"] is True
    (task,) = scored["tasks"].values()
    assert task["acc"] == pytest.approx(record["tasks"]["domain"]["acc"])
    assert main(evaluate + ["--chat-template", "false"]) == 0  # the flag wins, and the difference is noted
    captured = capsys.readouterr()
    assert json.loads(captured.out[captured.out.index("{"):])["chat_template"] is False
    assert "to reproduce its scores, add --chat-template true" in captured.err


def test_a_task_reads_the_train_split_of_a_folder_and_passes_its_hub_configuration_on(tmp_path, monkeypatch):
    """The docs say train_split defaults to train for every kind; a multiple-choice task read a folder of split files
    (../shared/data/piqa) with no split and failed ("a folder of 2 data files: name the file"), and a task or suite
    entry could not name a hub configuration (allenai/ai2_arc needs ARC-Easy or ARC-Challenge)."""
    from forgetless.data import load_mc_task, multiple_choice
    from forgetless.experiment import read_data

    folder = tmp_path / "piqa"
    folder.mkdir()
    rows = [json.loads(line) for line in (FIXTURES / "piqa.jsonl").read_text().splitlines()]
    (folder / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = tmp_path / "g.jsonl"
    text.write_text(json.dumps({"text": "Plants make sugar from light."}) + "\n")

    def experiment(suite=None, **task):
        spec = {"name": "t", "model": "m", "output": str(tmp_path / "out"), "methods": ["lora-mu"],
                "general": {"train": str(text), "heldout": str(text)}, "tasks": [{"name": "piqa"} | task]}
        if suite:
            spec["eval"] = {"suite": suite}
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump(spec))
        return load_experiment(path)

    for kind in ("multiple_choice", "auto"):
        raw = read_data(experiment(train=str(folder), test=str(folder), test_split="test", train_kind=kind))
        train, test = raw.tasks["piqa"]
        assert [item.context for item in train] == [item.context for item in load_mc_task(str(folder / "train.jsonl"))]
        assert len(train) == 1 and len(test) == len(rows) == 2
    seen = []
    real = multiple_choice.load_records

    def records(source, split=None, name=None, limit=None):
        seen.append((source, split, name))
        return real(str(FIXTURES / "arc_easy.jsonl"), limit=limit)

    monkeypatch.setattr(multiple_choice, "load_records", records)
    arc_c = {"name": "arc_c", "test": "allenai/ai2_arc", "split": "test", "config": "ARC-Challenge"}
    read_data(experiment(train="allenai/ai2_arc", test="allenai/ai2_arc", test_split="test", config="ARC-Easy",
                         suite=[arc_c]))
    assert seen == [("allenai/ai2_arc", "test", "ARC-Easy"), ("allenai/ai2_arc", "train", "ARC-Easy"),
                    ("allenai/ai2_arc", "test", "ARC-Challenge")]
