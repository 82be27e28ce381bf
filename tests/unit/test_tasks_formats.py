"""Task readers (the benchmarks' published layouts), the harness's templates, the registry rows of kind task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import llmtune
from llmtune.core.errors import ConfigError, InvalidOptionError, UnknownBackendError, UnknownOptionError
from llmtune.tasks import formats
from llmtune.tasks.builtin import BUILTIN_TASKS, bundled_path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_bundled_file_reads_and_has_a_few_dozen_items() -> None:
    for name, cls in BUILTIN_TASKS.items():
        docs = formats.READERS[cls.fmt](bundled_path(cls.bundled))
        assert len(docs) >= 24, name


def test_arc_nested_and_flat_layouts_give_the_same_doc(tmp_path: Path) -> None:
    nested = {"id": "q1", "question": {"stem": "Why?", "choices": [{"text": "x", "label": "A"},
                                                                   {"text": "y", "label": "B"}]}, "answerKey": "B"}
    flat = {"id": "q1", "question": "Why?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}
    a = formats.read_arc(_jsonl(tmp_path / "a.jsonl", [nested]))[0]
    b = formats.read_arc(_jsonl(tmp_path / "b.jsonl", [flat]))[0]
    assert formats.clean(a) == formats.clean(b)
    item = formats.MC_TEMPLATES["arc"](a, 0)
    assert (item.text, item.choices, item.gold) == ("Question: Why?\nAnswer:", ["x", "y"], 1)


def test_boolq_google_and_superglue_layouts(tmp_path: Path) -> None:
    docs = formats.read_boolq(_jsonl(tmp_path / "b.jsonl", [
        {"question": "is it", "passage": "P", "answer": True, "title": "t"},
        {"question": "is it", "passage": "P", "label": 0, "idx": 3}]))
    assert [d["label"] for d in docs] == [1, 0]
    item = formats.MC_TEMPLATES["boolq"](docs[0], 0)
    assert item.text == "P\nQuestion: is it?\nAnswer:" and item.choices == ["no", "yes"] and item.gold == 1


def test_mmlu_csv_subject_from_file_name_and_prompt(tmp_path: Path) -> None:
    path = tmp_path / "high_school_made_up_test.csv"
    path.write_text('"What, exactly?",w,x,y,z,C\n')
    doc = formats.read_mmlu(path)[0]
    assert doc["subject"] == "high_school_made_up" and doc["answer"] == 2
    item = formats.MC_TEMPLATES["mmlu"](doc, 0)
    assert item.text == "What, exactly?\nA. w\nB. x\nC. y\nD. z\nAnswer:" and item.choices == list("ABCD")
    assert formats.mmlu_description("high_school_made_up").endswith("about high school made up.\n\n")


def test_hellaswag_preprocessing_is_the_harness_one() -> None:
    from lm_eval.tasks.hellaswag.utils import preprocess

    for text in (" A [title] b  [step] c ", "x  y", "[header] Start. [substeps] go"):
        assert formats.hellaswag_preprocess(text) == preprocess(text)


def test_truthfulqa_mc_task_json_layout(tmp_path: Path) -> None:
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps([{"question": "Q?", "mc1_targets": {"right": 1, "wrong": 0}, "mc2_targets": {}}]))
    doc = formats.read_truthfulqa(path)[0]
    assert doc["mc1_targets"] == {"choices": ["right", "wrong"], "labels": [1, 0]}
    assert formats.MC_TEMPLATES["truthfulqa"](doc, 0).text.endswith("\n\nQ: Q?\nA:")


def test_squad_json_flattens_and_keeps_unanswerable() -> None:
    docs = formats.read_squad(bundled_path("squad_made_up.json"))
    assert any(not d["answers"]["text"] for d in docs) and all(d["context"] for d in docs)
    assert formats.squad_text(docs[0]).startswith("Title: ") and formats.squad_text(docs[0]).endswith("\n\nAnswer:")


def test_reader_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q"}])
    with pytest.raises(ConfigError, match=r"g\.jsonl:2: no field 'answer'"):
        formats.read_gsm8k(path)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1: not valid JSON"):
        formats.read_hellaswag(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="no such file"):
        formats.read_arc(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"a\.jsonl:1: field 'answerKey': \"E\" is not among the choice labels"):
        formats.read_arc(_jsonl(tmp_path / "a.jsonl", [
            {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}]))


def test_kopitiam_bundled_file_is_what_the_generator_writes() -> None:
    from llmtune.tasks.kopitiam import kopitiam_mc_items

    rows = [json.loads(line) for line in bundled_path("kopitiam_mc.jsonl").read_text().splitlines()]
    assert rows == kopitiam_mc_items()
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 for r in rows)


def test_tasks_are_a_registry_kind() -> None:
    rows = llmtune.list_backends(kind="task")
    names = {(r.name, r.backend) for r in rows}
    for name in BUILTIN_TASKS:
        assert (name, "llmtune") in names
    assert ("hellaswag", "lm-eval") in names and ("kopitiam-mc", "lm-eval") in names
    squad = next(r for r in rows if (r.name, r.backend) == ("squad", "lm-eval"))
    assert not squad.available and "evaluate.load('squad_v2')" in (squad.reason or "")
    assert llmtune.get_task("hellaswag").backend == "llmtune"
    assert isinstance(llmtune.get_task("boolq", backend="lm-eval"), llmtune.Task)


def test_task_errors_are_typed() -> None:
    with pytest.raises(UnknownBackendError, match="Did you mean 'hellaswag'"):
        llmtune.get_task("helaswag")
    with pytest.raises(UnknownOptionError, match="num_fewshot"):
        llmtune.get_task("arc_easy", num_fewshots=3)
    with pytest.raises(InvalidOptionError, match="num_fewshot"):
        llmtune.get_task("arc_easy", num_fewshot=-1)
    with pytest.raises(UnknownOptionError):
        llmtune.get_task("hellaswag", template="llama3")  # only kopitiam-mc takes a chat template


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        formats.read_mmlu(tmp_path)
    (tmp_path / "latin1.csv").write_bytes(b"caf\xe9,a,b,c,d,A\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        formats.read_mmlu(tmp_path / "latin1.csv")
    with pytest.raises(ConfigError, match="columns"):
        (tmp_path / "short_test.csv").write_text("q,a,b\n")
        formats.read_mmlu(tmp_path / "short_test.csv")


# -- values, not only presence: one row per bad value, the error names FILE:LINE, the field and what is wrong ----
_HS = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["w", "x", "y", "z"], "label": 0}
_MMLU = {"question": "q", "choices": ["w", "x", "y", "z"], "answer": 0}
_ARC = {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
_MC = {"question": "q", "choices": ["a", "b"], "label": 0}
_TQA = {"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 0]}}

BAD_VALUES = [
    ("hellaswag", {**_HS, "label": 9}, "field 'label': 9 is not an index into 4 endings"),
    ("hellaswag", {**_HS, "label": -1}, "field 'label': -1 is not an index into 4 endings"),
    ("hellaswag", {**_HS, "label": "9"}, "field 'label': \"9\" is not an index into 4 endings"),
    ("hellaswag", {**_HS, "label": True}, "field 'label': expected an integer index, got true"),
    ("hellaswag", {**_HS, "endings": "wxyz"}, "field 'endings': expected a list of endings, got one string"),
    ("hellaswag", {**_HS, "endings": ["w", 3]}, "field 'endings': item 1 is 3, not a string"),
    ("hellaswag", {**_HS, "ctx_a": None}, "field 'ctx_a': expected a string, got null"),
    ("mmlu", {**_MMLU, "answer": 9}, "field 'answer': 9 is not an index into 4 choices"),
    ("mmlu", {**_MMLU, "answer": -1}, "field 'answer': -1 is not an index into 4 choices"),
    ("mmlu", {**_MMLU, "answer": "E"}, "field 'answer': \"E\" is not a choice letter"),
    ("mmlu", {**_MMLU, "answer": 1.0}, "field 'answer': expected an integer index, got 1.0"),
    ("mmlu", {**_MMLU, "choices": ["w", "x", "y"]}, "field 'choices': has 3 choices; this format has exactly 4"),
    ("boolq", {"question": "q", "passage": "p", "answer": "false"},
     "field 'answer': expected true or false, got \"false\" (write the JSON boolean false, without quotes)"),
    ("boolq", {"question": "q", "passage": "p", "answer": 1}, "field 'answer': expected true or false, got 1"),
    ("boolq", {"question": "q", "passage": "p", "label": 2}, "field 'label': 2 is not an index into 2 answers"),
    ("arc", {**_ARC, "answerKey": "C"}, "field 'answerKey': \"C\" is not among the choice labels ['A', 'B']"),
    ("arc", {**_ARC, "choices": {"text": ["a", "b"], "label": ["A"]}},
     "field 'choices.label': has 1 labels; this format has exactly 2"),
    ("arc", {"question": {"stem": "q", "choices": [{"text": "a"}]}, "answerKey": "A"},
     "question.choices[0]: no field 'label'"),
    ("mc", {**_MC, "label": 2}, "field 'label': 2 is not an index into 2 choices"),
    ("mc", {**_MC, "choices": "ab"}, "field 'choices': expected a list of choices, got one string"),
    ("truthfulqa", {**_TQA, "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}},
     "field 'mc1_targets': has 2 correct answers; exactly one needed"),
    ("truthfulqa", {**_TQA, "mc1_targets": {"choices": ["a", "b"], "labels": [1]}},
     "field 'mc1_targets.labels': expected one 0 or 1 per choice (2), got [1]"),
    ("truthfulqa", {**_TQA, "mc1_targets": {"a": 1, "b": "0"}}, "answer \"b\" is marked \"0\", not 0 or 1"),
    ("gsm8k", {"question": "q", "answer": "42"}, "field 'answer': has no final '#### number'"),
    ("gsm8k", {"question": "q", "answer": 42}, "field 'answer': expected a string, got 42"),
    ("generation", {"prompt": "p", "reference": ["a", "b"]}, "field 'reference': expected a string"),
    ("text", {"text": "  "}, "field 'text': is empty"),
]


@pytest.mark.parametrize(("fmt", "row", "message"), BAD_VALUES, ids=[f"{f}-{m[:40]}" for f, _, m in BAD_VALUES])
def test_every_reader_checks_values_naming_file_line_and_field(tmp_path: Path, fmt: str, row: dict,
                                                               message: str) -> None:
    good = {"hellaswag": _HS, "mmlu": _MMLU, "arc": _ARC, "mc": _MC, "truthfulqa": _TQA,
            "boolq": {"question": "q", "passage": "p", "answer": True}, "gsm8k": {"question": "q", "answer": "#### 1"},
            "generation": {"prompt": "p", "reference": "r"}, "text": {"text": "t"}}[fmt]
    path = _jsonl(tmp_path / "d.jsonl", [good, row])
    with pytest.raises(ConfigError) as exc:
        formats.READERS[fmt](path)
    assert str(exc.value).startswith(f"{path}:2: "), exc.value
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_documented_value_forms_still_read(tmp_path: Path) -> None:
    """HF HellaSwag rows carry ``label`` as a digit string; MMLU JSONL answers are an index or a letter."""
    hs = formats.read_hellaswag(_jsonl(tmp_path / "h.jsonl", [{**_HS, "label": "3"}]))
    assert hs[0]["label"] == 3 and formats.MC_TEMPLATES["hellaswag"](hs[0], 0).gold == 3
    mm = formats.read_mmlu(_jsonl(tmp_path / "m.jsonl", [{**_MMLU, "answer": "D"}, {**_MMLU, "answer": 2}]))
    assert [d["answer"] for d in mm] == [3, 2]
    bq = formats.read_boolq(_jsonl(tmp_path / "b.jsonl", [{"question": "q", "passage": "p", "answer": False}]))
    assert bq[0]["label"] == 0


@pytest.mark.parametrize(("squad", "message"), [
    ({"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]}, "data[0].paragraphs[0]: no field 'qas'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q"}]}]}]},
     "data[0].paragraphs[0].qas[0]: no field 'answers'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", "is_impossible": "no"}]}]}]},
     "field 'is_impossible': expected true or false"),
    ({"data": [{"paragraphs": [{"context": "abc", "qas": [
        {"id": "1", "question": "q", "answers": [{"text": "b", "answer_start": 9}]}]}]}]},
     "field 'answers[0].answer_start': 9 is not an index into 4 characters of the context"),
    ({"data": {"paragraphs": []}}, "field 'data': expected a list"),
])
def test_squad_structure_errors_name_the_place(tmp_path: Path, squad: dict, message: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(squad))
    with pytest.raises(ConfigError, match=re.escape(message)):
        formats.read_squad(path)


def test_an_empty_text_file_has_nothing_to_score(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match=r"empty\.txt: empty: there is no text to score"):
        formats.read_texts(tmp_path / "empty.txt")


def test_task_options_for_a_task_not_given_is_an_error_with_the_closest_name(tmp_path: Path) -> None:
    """A misspelt key used to be ignored: the bundled made-up items were scored and labelled 'hellaswag'."""
    with pytest.raises(UnknownOptionError, match=r"task_options names 'hellaswg'.*Did you mean 'hellaswag'\?") as err:
        llmtune.evaluate("no-model-is-loaded", ["hellaswag"], task_options={"hellaswg": {"limit": 2}})
    assert err.value.field == "hellaswg"
    task = llmtune.get_task("boolq")
    with pytest.raises(UnknownOptionError, match=r"task_options names 'boolq'.*get_task"):
        llmtune.evaluate("no-model-is-loaded", [task], task_options={"boolq": {"limit": 2}})


def test_evaluate_checks_data_and_output_before_the_model_loads(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "hellaswag.jsonl", [_HS])
    with pytest.raises(ConfigError, match=r"output_dir .* contains the input .*hellaswag\.jsonl"):
        llmtune.evaluate("no-model-is-loaded", ["hellaswag"], task_options={"hellaswag": {"data": str(data)}},
                         output_dir=tmp_path)
    assert data.read_text() == json.dumps(_HS) + "\n"
    bad = _jsonl(tmp_path / "bad.jsonl", [{**_HS, "label": 4}])
    with pytest.raises(ConfigError, match="field 'label': 4 is not an index into 4 endings"):
        llmtune.evaluate("no-model-is-loaded", ["hellaswag"], task_options={"hellaswag": {"data": str(bad)}})


def test_task_option_values_are_checked() -> None:
    with pytest.raises(InvalidOptionError, match="option data=123 must be a file path") as err:
        llmtune.get_task("hellaswag", data=123)
    assert err.value.field == "data"
    with pytest.raises(InvalidOptionError, match=r"option until=\[1\] must be a stop string"):
        llmtune.get_task("generation", until=[1])
    # one string is one stop string (as the harness takes it), never one stop per character
    assert llmtune.get_task("generation", until="Question:").options.until == ("Question:",)
    with pytest.raises(InvalidOptionError, match=r"template='llama4' is not one of.*Did you mean 'llama3'"):
        llmtune.get_task("kopitiam-mc", template="llama4")  # was found only when the first item was rendered


@pytest.mark.parametrize("tasks", [123, [], None])
def test_evaluate_needs_tasks(tasks) -> None:
    from llmtune.core.errors import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match="tasks must be a task name, a Task, or a non-empty list"):
        llmtune.evaluate("no-model-is-loaded", tasks)
