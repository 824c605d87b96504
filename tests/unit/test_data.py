"""Unit tests for forgetless.data: file reading, text packing, harness-exact MC prompts, instructions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgetless.data import (SCHEMAS, DataError, MCItem, detect_schema, encode_pair, instruction_examples,
                             lm_examples, load_instructions, load_mc_task, load_records, load_texts,
                             mc_train_examples, pack_blocks, prompt_completion_examples, read_records)
from tests.unit.tiny_tokenizer import make_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(tmp_path: Path, name: str, rows: list) -> str:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


# --- schema adapters: exact lm-evaluation-harness prompts -------------------------------------------------

def test_sciq_prompt_choices_answer():
    items = load_mc_task(str(FIXTURES / "sciq.jsonl"))
    assert items[0] == MCItem(
        context="Mesophiles grow best in moderate temperature, typically between 25°C and 40°C.\n"
                "Question: What type of organism is commonly used in preparation of foods such as cheese and "
                "yogurt?\nAnswer:",
        choices=("protozoa", "gymnosperms", "viruses", "mesophilic organisms"), answer=3)
    # Empty support: the template still emits its newline, as the harness does.
    assert items[1].context == "\nQuestion: What is the least dangerous radioactive decay?\nAnswer:"
    assert items[1].choices == ("beta decay", "gamma decay", "zeta decay", "alpha decay")
    assert items[1].answer == 3
    assert items[1].continuation(3) == " alpha decay"


def test_piqa():
    items = load_mc_task(str(FIXTURES / "piqa.jsonl"))
    assert items[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert items[0].choices[0].startswith("Provide the guinea pig with a cage full of a few inches of bedding "
                                          "made of ripped paper strips")
    assert len(items[0].choices) == 2 and items[0].answer == 0
    assert items[1] == MCItem("Question: Make outdoor pillow.\nAnswer:",
                              ("Blow into tin can and tie with rubber band.",
                               "Blow into trash bag and tie with rubber band."), 1)


def test_medmcqa():
    items = load_mc_task(str(FIXTURES / "medmcqa.jsonl"))
    assert items[0].context == (
        "Question: Which of the following is not true for myelinated nerve fibers:\nChoices:\n"
        "A. Impulse through myelinated fibers is slower than non-myelinated fibers\n"
        "B. Membrane currents are generated at nodes of Ranvier\n"
        "C. Saltatory conduction of impulses is seen\n"
        "D. Local anesthesia is effective only when the nerve is not covered by myelin sheath\n"
        "Answer:")
    assert items[0].choices == ("A", "B", "C", "D")  # harness doc_to_choice: letters
    assert [it.answer for it in items] == [0, 0]
    assert items[0].continuations == [" A", " B", " C", " D"]


def test_arc():
    items = load_mc_task(str(FIXTURES / "arc_easy.jsonl"))
    assert items[1] == MCItem(
        "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
        "system?\nAnswer:", ("safety goggles", "breathing mask", "rubber gloves", "lead apron"), 1)
    assert items[0].answer == 0


def test_arc_numeric_labels(tmp_path):
    # Some ARC rows use labels "1".."4"; the answer is the index of answerKey in choices.label.
    path = jsonl(tmp_path, "arc.jsonl", [{"id": "x", "question": "Q?", "answerKey": "3",
                                          "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}}])
    assert load_mc_task(path)[0] == MCItem("Question: Q?\nAnswer:", ("a", "b", "c"), 2)
    twice = jsonl(tmp_path, "twice.jsonl", [{"id": "x", "question": "Q?", "answerKey": "A",
                                             "choices": {"text": ["a", "b"], "label": ["A", "A"]}}])
    assert str(_error(twice)) == f"{twice}, line 1: field 'choices.label': label 'A' is given to more than one choice"


def test_openbookqa():
    items = load_mc_task(str(FIXTURES / "openbookqa.jsonl"))
    # doc_to_text is the bare question_stem: no "Question:" / "Answer:" framing.
    assert items[1] == MCItem("There is most likely going to be fog around:",
                              ("a marsh", "a tundra", "the plains", "a desert"), 0)
    assert items[0].answer == 1


def test_openbookqa_answer_key_lstrip(tmp_path):
    path = jsonl(tmp_path, "obqa.jsonl", [{"question_stem": "Predators eat", "answerKey": " C",
                                           "choices": {"text": ["lions", "humans", "bunnies", "grass"],
                                                       "label": ["A", "B", "C", "D"]}}])
    assert load_mc_task(path)[0].answer == 2


def test_mmlu_includes_subject_description():
    items = load_mc_task(str(FIXTURES / "mmlu.jsonl"))
    assert items[0].context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:")
    assert items[0].choices == ("A", "B", "C", "D") and items[0].answer == 1
    assert items[1].context == (
        "The following are multiple choice questions (with answers) about college medicine.\n\n"
        "Glucose is transported into the muscle cell:\nA. via protein transporters called GLUT4.\n"
        "B. only in the presence of insulin.\nC. via hexokinase.\nD. via monocarbylic acid transporters.\n"
        "Answer:")
    assert items[1].answer == 0


def test_mmlu_strips_question(tmp_path):
    path = jsonl(tmp_path, "m.jsonl", [{"question": "  Why?\n", "subject": "x", "choices": list("abcd"),
                                        "answer": 3}])
    assert load_mc_task(path)[0].context.endswith("about x.\n\nWhy?\nA. a\nB. b\nC. c\nD. d\nAnswer:")


def test_generic():
    items = load_mc_task(str(FIXTURES / "generic.jsonl"))
    assert items == [
        MCItem("Plants make sugar from light.\nQuestion: Which gas do plants absorb?\nAnswer:",
               ("oxygen", "carbon dioxide", "helium"), 1),
        MCItem("Question: 2 + 2 = ?\nAnswer:", ("3", "4"), 1),  # answer given as the choice string
        MCItem("Question: Is the sky green?\nAnswer:", ("yes", "no"), 1),  # empty context adds no line
    ]


@pytest.mark.parametrize("fixture, schema", [
    ("sciq", "sciq"), ("piqa", "piqa"), ("medmcqa", "medmcqa"), ("arc_easy", "arc"),
    ("openbookqa", "openbookqa"), ("mmlu", "mmlu"), ("generic", "generic"), ("boolq", "boolq")])
def test_detect_schema_and_explicit_schema(fixture, schema):
    path = str(FIXTURES / f"{fixture}.jsonl")
    assert detect_schema(read_records(path)[0]) == schema
    assert load_mc_task(path, schema=schema) == load_mc_task(path)
    assert set(SCHEMAS) == {"sciq", "piqa", "medmcqa", "arc", "openbookqa", "mmlu", "generic", "boolq"}


def test_detect_schema_unknown_lists_known(tmp_path):
    path = jsonl(tmp_path, "odd.jsonl", [{"prompt": "x", "target": "y"}])
    with pytest.raises(DataError, match=r"odd\.jsonl, line 1: .*known schemas: sciq.*generic"):
        load_mc_task(path)
    with pytest.raises(ValueError, match="unknown schema"):
        load_mc_task(str(FIXTURES / "piqa.jsonl"), schema="hellaswag")


def test_load_mc_task_limit_and_folder_split(tmp_path):
    assert len(load_mc_task(str(FIXTURES / "piqa.jsonl"), limit=1)) == 1
    folder = tmp_path / "piqa"
    folder.mkdir()
    (folder / "test.jsonl").write_text((FIXTURES / "piqa.jsonl").read_text())
    assert load_mc_task(str(folder), split="test") == load_mc_task(str(FIXTURES / "piqa.jsonl"))
    assert load_mc_task(str(folder)) == load_mc_task(str(folder), split="test")  # the only file
    with pytest.raises(FileNotFoundError, match=r"no train.jsonl, .json or .parquet in this folder"):
        load_mc_task(str(folder), split="train")


# --- malformed rows: messages name file, line and field ----------------------------------------------------

def _error(path: str, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_mc_task(path, **kwargs)
    return info.value


def test_missing_field(tmp_path):
    good = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}
    path = jsonl(tmp_path, "p.jsonl", [good, good, {"goal": "g", "sol1": "a", "label": 0}])
    err = _error(path, schema="piqa")
    assert str(err) == f"{path}, line 3: field 'sol2': missing"
    assert (err.line, err.field) == (3, "sol2")


def test_bad_answer_index(tmp_path):
    row = json.loads((FIXTURES / "medmcqa.jsonl").read_text().splitlines()[0])
    path = jsonl(tmp_path, "med.jsonl", [row, dict(row, cop=7)])
    assert str(_error(path)) == f"{path}, line 2: field 'cop': 7 is not a valid choice index (0-3)"


def test_a_one_based_medmcqa_file_is_named_as_such(tmp_path):
    """MedMCQA's original release counts cop from 1: its rows with cop 1-3 were read one answer off without a word,
    and a cop 4 said only "not a valid choice index". The error says what such a file is; a file of 50 items or
    more with no cop 0 gets a warning."""
    row = json.loads((FIXTURES / "medmcqa.jsonl").read_text().splitlines()[0])
    path = jsonl(tmp_path, "med.jsonl", [dict(row, cop=1 + i % 4) for i in range(8)])
    assert str(_error(path)) == (f"{path}, line 4: field 'cop': 4 is not a valid choice index (0-3); the Hugging Face "
                                 f"MedMCQA counts cop from 0 (opa), the original release from 1: subtract 1 from "
                                 f"every cop of such a file")
    path = jsonl(tmp_path, "med3.jsonl", [dict(row, cop=1 + i % 3) for i in range(50)])
    with pytest.warns(UserWarning, match="none of 50 MedMCQA items has cop 0: if the file counts cop from 1"):
        load_mc_task(path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 49 items, or one answered opa: no warning
        load_mc_task(jsonl(tmp_path, "few.jsonl", [dict(row, cop=1 + i % 3) for i in range(49)]))
        load_mc_task(jsonl(tmp_path, "zero.jsonl", [dict(row, cop=i % 3) for i in range(50)]))


def test_bad_answer_key(tmp_path):
    row = json.loads((FIXTURES / "arc_easy.jsonl").read_text().splitlines()[0])
    path = jsonl(tmp_path, "arc.jsonl", [dict(row, answerKey="E")])
    assert str(_error(path)) == (f"{path}, line 1: field 'answerKey': 'E' is not one of the choice labels "
                                 "['A', 'B', 'C', 'D']")


def test_wrong_type(tmp_path):
    path = jsonl(tmp_path, "g.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0},
                                       {"question": 5, "choices": ["a", "b"], "answer": 0}])
    assert str(_error(path)) == f"{path}, line 2: field 'question': expected a string, got int 5"
    path = jsonl(tmp_path, "g2.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": True}])
    assert "line 1: field 'answer': expected an integer, got bool" in str(_error(path))
    path = jsonl(tmp_path, "g3.jsonl", [{"question": "q", "choices": "ab", "answer": 0}])
    assert str(_error(path)) == f"{path}, line 1: field 'choices': expected a list of strings, got str"


def test_empty_choices_and_unknown_answer_string(tmp_path):
    path = jsonl(tmp_path, "e.jsonl", [{"question": "q", "choices": [], "answer": 0}])
    assert str(_error(path)) == f"{path}, line 1: field 'choices': empty choices"
    path = jsonl(tmp_path, "blank.jsonl", [{"question": "q", "choices": ["a", " "], "answer": 0}])
    assert str(_error(path)) == f"{path}, line 1: field 'choices': choice 1 is empty"
    path = jsonl(tmp_path, "s.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "c"}])
    assert str(_error(path)) == f"{path}, line 1: field 'answer': 'c' is neither an index nor one of the choices"
    # a digit string that is one choice's text and another's index: which one is meant cannot be told
    path = jsonl(tmp_path, "d.jsonl", [{"question": "2+2-3?", "choices": ["4", "3", "2", "1"], "answer": "1"}])
    assert str(_error(path)) == (f"{path}, line 1: field 'answer': '1' is both choice 3's text and the index of choice "
                                 f"1 ('3'): give the index as a number")
    items = load_mc_task(jsonl(tmp_path, "ok.jsonl", [{"question": "q", "choices": ["4", "3"], "answer": "4"},
                                                      {"question": "q", "choices": ["0", "1"], "answer": "1"}]))
    assert [item.answer for item in items] == [0, 1]  # no other reading: the text, or its own index


def test_one_choice_items_and_empty_sources_are_errors(tmp_path):
    path = jsonl(tmp_path, "one.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0},
                                         {"question": "q", "choices": ["a"], "answer": 0}])
    assert str(_error(path)) == f"{path}, line 2: field 'choices': needs at least two choices, got 1"
    empty = write(tmp_path, "empty.jsonl", "\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no multiple-choice items \(the file is empty"):
        load_mc_task(empty)
    with pytest.raises(DataError, match=r"empty\.jsonl: no text"):
        load_texts(empty)
    with pytest.raises(DataError, match=r"blank\.txt: no text"):
        load_texts(write(tmp_path, "blank.txt", "\n \n\n"))
    with pytest.raises(DataError, match=r"empty\.jsonl: no instructions"):
        load_instructions(empty)
    with pytest.raises(DataError, match=r"unknown schema 'sicq'; known: \["):
        load_mc_task(str(FIXTURES / "sciq.jsonl"), schema="sicq")


def test_non_utf8_file_names_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    for read in (read_records, load_texts):
        with pytest.raises(DataError) as info:
            read(str(path))
        assert str(info.value) == (f"{path}, line 2: not UTF-8 text (byte 0xe9 at column 14); "
                                   "convert the file to UTF-8")
    txt = tmp_path / "latin1.txt"
    txt.write_bytes(b"\xff")
    with pytest.raises(DataError, match=r"latin1\.txt, line 1: not UTF-8 text \(byte 0xff at column 1\)"):
        load_texts(str(txt))
    bom = tmp_path / "bom.jsonl"  # after a byte-order mark, the same place
    bom.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bom\.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        read_records(str(bom))


def test_a_byte_order_mark_and_an_upper_case_ending_are_read(tmp_path):
    """Windows editors write a UTF-8 byte-order mark; it was refused as invalid JSON, with Python's advice to decode
    with utf-8-sig. ``UP.JSONL`` and ``.TXT`` are the same formats as their lower-case endings."""
    rows = b'{"question": "q", "choices": ["a", "b"], "answer": 1}\n'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + rows)
    (tmp_path / "UP.JSONL").write_bytes(rows)
    for name in ("bom.jsonl", "UP.JSONL"):
        (item,) = load_mc_task(str(tmp_path / name))
        assert item.choices == ("a", "b") and item.answer == 1
    (tmp_path / "notes.TXT").write_bytes(b"\xef\xbb\xbfFirst paragraph.\n\nSecond one.\n")
    assert load_texts(str(tmp_path / "notes.TXT")) == ["First paragraph.", "Second one."]


def test_invalid_json_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n\n{"goal": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: invalid JSON \(") as info:
        load_mc_task(path)
    assert info.value.line == 3


def test_an_index_of_other_digits_than_ascii_is_an_error_naming_the_row(tmp_path):
    """str.isdigit() takes "²", which int() refuses with a bare ValueError naming no file."""
    path = write(tmp_path, "sup.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b", "label": "1"}\n'
                                        '{"goal": "g", "sol1": "a", "sol2": "b", "label": "\u00b2"}\n')
    with pytest.raises(DataError, match=r"sup\.jsonl, line 2: field 'label': expected an integer"):
        load_mc_task(path)
    generic = write(tmp_path, "gen.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": "\u00b2"}\n')
    with pytest.raises(DataError, match=r"gen\.jsonl, line 1: field 'answer': .* neither an index nor one of"):
        load_mc_task(generic)


def test_boolq_rows_are_the_harness_prompt_with_no_and_yes(tmp_path):
    """BoolQ (../shared/data's google/boolq schema: answer a JSON boolean; SuperGLUE's: label 0/1): the harness's
    super_glue/boolq prompt, choices ["no", "yes"], target the answer; detected from its fields."""
    path = write(tmp_path, "b.jsonl", '{"question": "is it wet", "passage": "Rain falls.", "answer": true}\n'
                                      '{"question": "is it dry", "passage": "Rain falls.", "label": 0, "idx": 3}\n')
    first, second = load_mc_task(path)
    assert first.context == "Rain falls.\nQuestion: is it wet?\nAnswer:" and first.choices == ("no", "yes")
    assert (first.answer, second.answer) == (1, 0) and first.continuation(1) == " yes"
    bad = write(tmp_path, "bad.jsonl", '{"question": "q", "passage": "p", "answer": "true"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: field 'answer': expected true or false, got str"):
        load_mc_task(bad)
    # a generic row that carries a passage stays generic
    generic = write(tmp_path, "g.jsonl", '{"question": "q", "passage": "p", "choices": ["a", "b"], "answer": 1}\n')
    assert load_mc_task(generic)[0].choices == ("a", "b")


def test_non_object_line(tmp_path):
    path = write(tmp_path, "list.jsonl", "[1, 2]\n")
    with pytest.raises(DataError, match=r"list\.jsonl, line 1: expected a JSON object, got list"):
        read_records(path)


def test_a_repeated_field_is_an_error_naming_the_file_row_and_field(tmp_path):
    """json keeps the last of two equal keys: a row with "label" twice would silently train on one of them."""
    lines = write(tmp_path, "dup.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n'
                                         '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0, "label": 1}\n')
    with pytest.raises(DataError, match=r"dup\.jsonl, line 2: field 'label': appears twice") as info:
        load_mc_task(lines)
    assert info.value.line == 2 and info.value.field == "label"
    listed = write(tmp_path, "dup.json", '[\n  {"a": 1},\n  {"a": 2,\n   "meta": {"k": 1, "k": 2}}\n]\n')
    with pytest.raises(DataError, match=r"dup\.json, line 3: field 'k': appears twice"):
        read_records(listed)
    # equal values under different keys, and the same key in two rows, are fine
    assert read_records(write(tmp_path, "ok.jsonl", '{"a": 1, "b": 1}\n{"a": 1, "b": 1}\n')) == [{"a": 1, "b": 1}] * 2


# --- reading records ----------------------------------------------------------------------------------------

def test_read_jsonl_counts_blank_lines(tmp_path):
    path = write(tmp_path, "r.jsonl", '{"a": 1}\n\n   \n{"a": 2}\n')
    records = read_records(path)
    assert records == [{"a": 1}, {"a": 2}]
    assert [r.line for r in records] == [1, 4] and records[0].origin == path


def test_read_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = write(tmp_path, "u.jsonl", '{"a": "x\u2028y\x85zw"}\r\n{"a": 2}\n')
    records = read_records(path)
    assert records == [{"a": "x\u2028y\x85zw"}, {"a": 2}] and records[1].line == 2


def test_read_json_list_tracks_lines(tmp_path):
    path = write(tmp_path, "r.json", '[\n  {"a": 1},\n\n  {"a": 2,\n   "b": 3}\n]\n')
    records = read_records(path)
    assert records == [{"a": 1}, {"a": 2, "b": 3}] and [r.line for r in records] == [2, 4]
    bad = write(tmp_path, "bad.json", '[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(DataError, match=r"bad\.json, line 3: invalid JSON"):
        read_records(bad)
    # A .json file holding JSON lines is accepted, as datasets' json loader does.
    assert read_records(write(tmp_path, "lines.json", '{"a": 1}\n{"a": 2}\n')) == [{"a": 1}, {"a": 2}]


def test_a_json_array_is_read_in_one_pass_over_its_newlines(tmp_path):
    """Each element's line was found by counting newlines from the file's start again (quadratic: Alpaca's indented
    52k-row array took minutes). The newlines scanned in all are now at most the file's length, and lines still
    match an independent count."""
    from forgetless.data import io

    rows = [{"instruction": f"q{i}", "output": "a\nb" * (i % 3)} for i in range(300)]
    text = json.dumps(rows, indent=4)
    scanned = []

    class Counting(str):
        def count(self, sub, start=0, end=None):
            end = len(self) if end is None else end
            scanned.append(max(0, end - start))
            return str.count(self, sub, start, end)

    records = io._read_json_array(Counting(text), "a.json")
    assert [dict(r) for r in records] == rows
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "    {"]  # indent=4: each row opens alone
    assert [r.line for r in records] == starts
    assert sum(scanned) <= len(text)


def test_a_json_file_holding_one_object_over_several_lines_says_so(tmp_path):
    """A pretty-printed {"data": [...]} export was read as JSON lines and reported as "line 1: invalid JSON", though
    the file is valid JSON; the error now says what the file is and where its records are."""
    path = write(tmp_path, "export.json", json.dumps({"version": 1, "data": [{"a": 1}, {"a": 2}]}, indent=2))
    with pytest.raises(DataError, match=r"export\.json: one JSON object over several lines; expected a list of records "
                                        r".*its key 'data' holds a list of 2 records"):
        read_records(path)
    no_list = write(tmp_path, "obj.json", json.dumps({"a": 1, "b": 2}, indent=2))
    with pytest.raises(DataError, match=r"obj\.json: one JSON object over several lines.*JSON lines\)$"):
        read_records(no_list)
    broken = write(tmp_path, "broken.json", '{"a": 1}\n{"a": }\n')  # JSON lines with a bad row: as before
    with pytest.raises(DataError, match=r"broken\.json, line 2: invalid JSON"):
        read_records(broken)


def test_load_instructions_passes_the_hub_configuration_on(monkeypatch):
    """``load_train("instructions", ..., name=...)`` dropped the hub configuration (the other kinds pass it)."""
    from forgetless.data import formats, instructions
    from forgetless.data.io import Record

    seen = {}

    def records(source, split="train", name=None):
        seen["name"] = name
        return iter([Record({"instruction": "Say hi.", "output": "Hi."}, source, 1)])

    monkeypatch.setattr(instructions, "iter_records", records)
    assert formats.load_train("instructions", "org/alpaca", name="cleaned") == [
        (instructions.alpaca_prompt("Say hi."), "Hi.")]
    assert seen["name"] == "cleaned"


def test_missing_local_path_does_not_try_the_hub(monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise AssertionError("must not reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    for source in ("data/nope.jsonl", "./nope.json", "corpus/nope.txt"):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_records(source)
    with pytest.raises(FileNotFoundError):
        load_texts("corpus/nope.txt")


def test_hub_source_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}, {"goal": "h", "sol1": "a", "sol2": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("ybisk/piqa", split="validation", name="plain")
    assert calls == [("ybisk/piqa", "plain", "validation")]
    assert records[1].origin == "ybisk/piqa[validation]" and records[1].line == 2
    with pytest.raises(DataError, match=r"^ybisk/piqa\[validation\], line 2: field 'label': missing$"):
        load_mc_task("ybisk/piqa", split="validation")


# --- plain text and packing -------------------------------------------------------------------------------

def test_load_texts_jsonl_txt_and_errors(tmp_path):
    path = jsonl(tmp_path, "t.jsonl", [{"text": "one"}, {"text": ""}, {"text": "  "}, {"text": "two"}])
    assert load_texts(path) == ["one", "two"]
    assert load_texts(path, limit=1) == ["one"]
    body = jsonl(tmp_path, "b.jsonl", [{"body": "x"}])
    assert load_texts(body, field="body") == ["x"]
    with pytest.raises(DataError, match=r"b\.jsonl, line 1: field 'text': missing"):
        load_texts(body)
    typed = jsonl(tmp_path, "n.jsonl", [{"text": "a"}, {"text": 3}])
    with pytest.raises(DataError, match=r"n\.jsonl, line 2: field 'text': expected a string, got int"):
        load_texts(typed)
    txt = write(tmp_path, "c.txt", "First doc\nstill first.\n\n\nSecond doc.\n  \nThird.\n")
    assert load_texts(txt) == ["First doc\nstill first.", "Second doc.", "Third."]


def test_pack_blocks_contents_and_counts(tok):
    texts = ["Answer: A", "hello world", "Question: What"]
    stream = []
    for t in texts:
        stream += ids(tok, t) + [tok.eos_token_id]  # EOS after every document
    blocks = pack_blocks(texts, tok, block_size=4)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: len(stream) // 4 * 4]  # remainder dropped
    assert pack_blocks(texts, tok, block_size=4, max_blocks=2).tolist() == blocks[:2].tolist()
    assert pack_blocks(texts, tok, block_size=len(stream)).shape == (1, len(stream))
    with pytest.raises(ValueError, match="not enough text"):
        pack_blocks(texts, tok, block_size=len(stream) + 1)
    with pytest.raises(ValueError):
        pack_blocks([], tok, block_size=4)


def test_lm_examples_labels_equal_inputs():
    examples = lm_examples(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    assert examples == [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                        {"input_ids": [8, 9, 10], "labels": [8, 9, 10]}]


# --- encode_pair and MC training examples --------------------------------------------------------------------

def test_encode_pair_moves_trailing_whitespace(tok):
    ctx, cont = encode_pair(tok, "Answer: ", "A")
    # The space travels to the continuation, so "A" is scored as the word-initial token " A".
    assert ctx == ids(tok, "Answer:") and cont == ids(tok, " A")
    assert ctx + cont == ids(tok, "Answer: A")
    ctx, cont = encode_pair(tok, "Answer:", " A")
    assert (ctx, cont) == (ids(tok, "Answer:"), ids(tok, " A"))


def test_encode_pair_continuation_is_tail_of_whole(tok):
    context, continuation = "Question: What is the answer?\nAnswer:", " the answer"
    ctx, cont = encode_pair(tok, context, continuation)
    whole = ids(tok, context + continuation)
    assert ctx == ids(tok, context) and ctx + cont == whole and cont == whole[len(ctx):]


def test_encode_pair_empty_context_uses_prefix_token(tok):
    # HFLM.prefix_token_id: BOS when the tokenizer has one, else EOS.
    assert encode_pair(tok, "", " A") == ([tok.bos_token_id], ids(tok, " A"))
    # a continuation that starts with the prefix token gives it as the context (HFLM.loglikelihood)
    assert encode_pair(tok, "", "<s> A") == ([tok.bos_token_id], ids(tok, " A"))
    # whitespace only: the same path, the whitespace on the continuation (it used to leave an empty context, scored
    # from no position)
    assert encode_pair(tok, "  ", "A") == ([tok.bos_token_id], ids(tok, "  A"))


def _bos_adding():
    """A tiny tokenizer made to add a BOS by default, as Llama's and Gemma's tokenizers do."""
    from tokenizers import processors

    tok = make_tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    assert tok("Answer:")["input_ids"][0] == 2 and tok("Answer:", add_special_tokens=False)["input_ids"][0] != 2
    return tok


def test_encode_pair_adds_the_bos_a_tokenizer_adds_by_default_once():
    """lm-eval 0.4.13's HFLM.tok_encode takes the tokenizer's default (a BOS for Llama and Gemma tokenizers), and
    none when the text already starts with it (a chat template wrote it); encode_pair did neither, so a Gemma model
    was scored and trained without its BOS."""
    bos = _bos_adding()
    ctx, cont = encode_pair(bos, "Question: What is the answer?\nAnswer:", " the answer")
    assert ctx == [2] + ids(bos, "Question: What is the answer?\nAnswer:") and cont == ids(bos, " the answer")
    ctx, cont = encode_pair(bos, "<s>Answer:", " A")  # rendered by a template that writes the BOS: not twice
    assert ctx == ids(bos, "<s>Answer:") and ctx.count(2) == 1 and cont == ids(bos, " A")
    assert encode_pair(bos, "", " A") == ([2], ids(bos, " A"))  # the empty context: no BOS in the continuation
    item = MCItem("Question: What is the answer?\nAnswer:", ("yes", "no"), 1)
    (example,) = mc_train_examples([item], bos)
    assert example["input_ids"][0] == 2 and example["input_ids"].count(2) == 1


def test_a_cut_multiple_choice_example_keeps_its_bos():
    """A context cut from the left lost the BOS a Llama or Gemma tokenizer put first (instruction examples kept it)."""
    bos = _bos_adding()
    item = MCItem("Plants make sugar from light and absorb carbon dioxide.\nQuestion: What is the answer?\nAnswer:",
                  ("yes", "no"), 1)
    context, answer = encode_pair(bos, item.context, item.continuation(1))
    (cut,) = mc_train_examples([item], bos, max_length=12)
    keep = 12 - 1 - len(answer)
    assert cut["input_ids"] == [2] + context[-keep:] + answer and cut["labels"] == [-100] * (1 + keep) + answer
    (only,) = mc_train_examples([item], bos, max_length=len(answer) + 1)  # room for the BOS alone
    assert only["input_ids"] == [2] + answer
    tok = make_tiny_tokenizer()  # no default BOS: the tail as before
    context, answer = encode_pair(tok, item.context, item.continuation(1))
    assert mc_train_examples([item], tok, max_length=12)[0]["input_ids"] == context[-(12 - len(answer)):] + answer


def test_instructions_prompt_completions_and_blocks_start_with_the_bos_a_tokenizer_adds_by_default():
    """Instruction and string prompt/completion examples were encoded without special tokens and text blocks without
    a BOS, so a Llama or Gemma model trained (and its perplexity was measured) on sequences without the BOS it always
    saw; TRL tokenizes a prompt with the tokenizer's default. SmolLM2's tokenizer adds none: nothing changes there."""
    bos = _bos_adding()
    prompt, response = "### Instruction:\nSay hello.\n\n### Response:\n", "Hello there!"
    p, r = ids(bos, prompt), ids(bos, response) + [bos.eos_token_id]
    (ex,) = instruction_examples([(prompt, response)], bos)
    assert ex["input_ids"] == [2] + p + r and ex["labels"] == [-100] * (1 + len(p)) + r
    (ex,) = prompt_completion_examples([(prompt, response)], bos)
    assert ex["input_ids"] == [2] + p + r
    (ex,) = instruction_examples([("<s>" + prompt, response)], bos)  # the user wrote the BOS: not twice
    assert ex["input_ids"].count(2) == 1 and ex["input_ids"][0] == 2
    (short,) = instruction_examples([(prompt, response)], bos, max_length=len(r) + 4)  # cut: the BOS stays
    assert short["input_ids"] == [2] + p[-3:] + r and short["labels"] == [-100] * 4 + r
    (short,) = instruction_examples([("<s>" + prompt, response)], bos, max_length=len(r) + 4)  # the user's too
    assert short["input_ids"] == [2] + p[-3:] + r
    texts = ["Answer: A", "hello world", "Question: What"]
    stream = []
    for t in texts:
        stream += ids(bos, t) + [bos.eos_token_id]
    blocks = pack_blocks(texts, bos, block_size=4)
    assert blocks.shape == (len(stream) // 3, 4) and blocks[:, 0].tolist() == [2] * blocks.shape[0]
    assert blocks[:, 1:].flatten().tolist() == stream[: len(stream) // 3 * 3]  # 3 tokens of the stream per block
    assert pack_blocks(texts, bos, block_size=4, max_blocks=2).tolist() == blocks[:2].tolist()
    with pytest.raises(ValueError, match="at least 2"):
        pack_blocks(texts, bos, block_size=1)
    tok = make_tiny_tokenizer()  # a tokenizer without a default BOS (SmolLM2's kind): as before
    assert instruction_examples([(prompt, response)], tok)[0]["input_ids"] == ids(tok, prompt) + ids(tok, response) + [
        tok.eos_token_id]
    assert 2 not in pack_blocks(texts, tok, block_size=4)[:, 0].tolist()


def test_mc_train_examples_masks_prompt(tok):
    items = load_mc_task(str(FIXTURES / "generic.jsonl"))
    examples = mc_train_examples(items, tok)
    for item, ex in zip(items, examples, strict=True):
        ctx, cont = encode_pair(tok, item.context, " " + item.choices[item.answer])
        assert ex["input_ids"] == ctx + cont
        assert ex["input_ids"] == ids(tok, item.context + " " + item.choices[item.answer])
        assert ex["labels"] == [-100] * len(ctx) + cont
        assert [t for t in ex["labels"] if t != -100] == ids(tok, " " + item.choices[item.answer])


def test_mc_train_examples_left_truncates_context(tok):
    item = MCItem("Question: What is the answer?\nAnswer:", ("yes", "carbon dioxide"), 1)
    full = mc_train_examples([item], tok)[0]
    cont = [t for t in full["labels"] if t != -100]
    short = mc_train_examples([item], tok, max_length=len(cont) + 2)[0]
    assert short["input_ids"] == full["input_ids"][-(len(cont) + 2):]
    assert short["labels"] == [-100, -100] + cont
    assert mc_train_examples([item], tok, max_length=len(cont) + 1)[0]["labels"] == [-100] + cont
    # an answer of max_length tokens would leave no question, and its first token no loss (labels shift by one)
    for short in (len(cont), len(cont) - 1):
        with pytest.raises(ValueError, match="leaves no room for the question"):
            mc_train_examples([item], tok, max_length=short)


# --- instructions -------------------------------------------------------------------------------------------

def test_load_instructions_templates():
    pairs = load_instructions(str(FIXTURES / "alpaca.jsonl"))
    assert pairs[0][0] == ("Below is an instruction that describes a task. Write a response that appropriately "
                           "completes the request.\n\n### Instruction:\nDescribe a process of making crepes.\n\n"
                           "### Response:\n")
    assert pairs[0][1].startswith("Making crepes is an easy and delicious process!")
    assert pairs[1][0] == ("Below is an instruction that describes a task, paired with an input that provides "
                           "further context. Write a response that appropriately completes the request.\n\n"
                           "### Instruction:\nGiven the parameters of a triangle, find out its perimeter.\n\n"
                           "### Input:\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8\n\n### Response:\n")
    assert len(load_instructions(str(FIXTURES / "alpaca.jsonl"), limit=1)) == 1


def test_load_instructions_errors(tmp_path):
    path = jsonl(tmp_path, "a.jsonl", [{"instruction": "Say hi.", "output": "hi"},  # input is optional
                                       {"instruction": "Say hi.", "input": ""}])
    with pytest.raises(DataError, match=r"a\.jsonl, line 2: field 'output': missing"):
        load_instructions(path)
    path = jsonl(tmp_path, "b.jsonl", [{"instruction": ["x"], "output": "hi"}])
    with pytest.raises(DataError, match=r"b\.jsonl, line 1: field 'instruction': expected a string, got list"):
        load_instructions(path)


def test_instruction_examples_mask_prompt_and_append_eos(tok):
    pairs = [("### Instruction:\nSay hello.\n\n### Response:\n", "Hello there!")]
    ex = instruction_examples(pairs, tok)[0]
    prompt, response = ids(tok, pairs[0][0]), ids(tok, pairs[0][1]) + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + response
    assert ex["labels"] == [-100] * len(prompt) + response
    short = instruction_examples(pairs, tok, max_length=len(response) + 3)[0]
    assert len(short["input_ids"]) == len(response) + 3
    assert short["input_ids"] == prompt[-3:] + response and short["labels"] == [-100] * 3 + response


def test_instruction_examples_long_response_keeps_prompt_tail(tok):
    prompt_text, response_text = "### Instruction:\nSay hello.\n\n### Response:\n", "Plants make sugar from light " * 3
    prompt = ids(tok, prompt_text)
    response = ids(tok, response_text) + [tok.eos_token_id]
    ex = instruction_examples([(prompt_text, response_text)], tok, max_length=10)[0]
    # Half the budget stays with the prompt's tail ("### Response:" marker); the response is cut at the right.
    assert ex["input_ids"] == prompt[-5:] + response[:5]
    assert ex["labels"] == [-100] * 5 + response[:5]


def test_a_folder_of_several_files_given_as_one_source_says_to_name_the_file(tmp_path):
    """A folder such as ../shared/data/piqa (train.jsonl, test.jsonl) where one file is meant: the error lists the
    files and asks for one (it said "no file for split None"); with a split, it names the files it looked for."""
    from forgetless.data.io import resolve_local

    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"is a folder of 2 data files \(test.jsonl, train.jsonl\): name the file"):
        resolve_local(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no validation.jsonl, .json or .parquet in this folder"):
        resolve_local(str(tmp_path), split="validation")
    assert resolve_local(str(tmp_path), split="test") == tmp_path / "test.jsonl"
