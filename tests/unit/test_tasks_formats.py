"""Task readers (the benchmarks' published layouts), the harness's templates, the registry rows of kind task."""

from __future__ import annotations

import json
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
    with pytest.raises(ConfigError, match="answerKey 'E'"):
        formats.read_arc(_jsonl(tmp_path / "a.jsonl", [
            {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}]))


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
