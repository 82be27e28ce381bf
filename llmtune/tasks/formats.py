"""Readers for the benchmarks' published local layouts, and the prompt templates lm-evaluation-harness uses.

Every reader returns *docs* in the layout of the harness's Hugging Face dataset for that task (so the
``lm-eval`` backend can be handed the very same rows), whichever published layout the file is in:

==============  ==========================================================================================
format          accepted files
==============  ==========================================================================================
``mmlu``        the original CSV (``{subject}_test.csv``, no header: question, A, B, C, D, answer letter) or
                JSONL with ``question``, ``choices`` (4), ``answer`` (index or letter), optional ``subject``
``hellaswag``   the original ``hellaswag_{split}.jsonl`` (``activity_label``, ``ctx_a``, ``ctx_b``,
                ``endings``, ``label``)
``arc``         AI2's JSONL (``question: {stem, choices: [{text, label}]}``, ``answerKey``) or the flat
                layout (``question``, ``choices: {text, label}``, ``answerKey``)
``boolq``       Google's JSONL (``question``, ``passage``, ``answer``: bool) or SuperGLUE's (``label``: 0/1)
``truthfulqa``  the repository's ``mc_task.json`` (a list; ``mc1_targets: {answer: 0/1}``) or JSONL with
                ``mc1_targets: {choices, labels}``
``gsm8k``       the original JSONL (``question``, ``answer`` ending ``#### number``)
``squad``       the official SQuAD v1.1/v2.0 JSON (``data[].paragraphs[].qas[]``), flattened
``mc``          llmtune's own multiple-choice JSONL: ``question``, ``choices`` (list), ``label`` (index)
==============  ==========================================================================================

This module imports nothing heavy (no torch, no datasets).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError
from llmtune.core.paths import read_text_file

Doc = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice question as the harness scores it: context, choices, gold index."""

    id: str
    text: str  # the question part of the prompt (doc_to_text), without few-shot examples
    choices: list[str]
    gold: int
    target_delimiter: str = " "


# -- file reading -------------------------------------------------------------------------------------------
#: The file's text; a missing, unreadable or non-UTF-8 file is a `ConfigError` naming it.
_read_text = read_text_file


def _read_jsonl(path: Path) -> list[Doc]:
    out = []
    lines = _read_text(path).splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.args[0]})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(value).__name__}")
        value.setdefault("_line", lineno)
        out.append(value)
    return out


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.args[0]})") from None


def _need(doc: Doc, path: Path, *fields: str) -> None:
    for field in fields:
        if field not in doc:
            where = f"{path}:{doc.get('_line', '?')}"
            raise ConfigError(f"{where}: no field {field!r} (fields: {', '.join(k for k in doc if k != '_line')})")


def _where(doc: Doc, path: Path) -> str:
    return f"{path}:{doc.get('_line', '?')}"


# -- readers: published layouts -> harness (HF) layout ---------------------------------------------------------
_LETTERS = "ABCDEFGHIJ"


def read_mmlu(path: Path) -> list[Doc]:
    """MMLU: the original header-less CSV (subject from the file name) or JSONL."""
    if path.suffix.lower() == ".csv":
        subject = re.sub(r"_(test|dev|val)$", "", path.stem)
        docs: list[Doc] = []
        for lineno, row in enumerate(csv.reader(io.StringIO(_read_text(path), newline="")), start=1):
            if len(row) != 6 or row[5].strip() not in _LETTERS[:4]:
                raise ConfigError(f"{path}:{lineno}: expected question,A,B,C,D,answer-letter; got {len(row)} "
                                  f"columns")
            docs.append({"question": row[0], "subject": subject, "choices": row[1:5],
                         "answer": _LETTERS.index(row[5].strip()), "_line": lineno})
        return docs
    docs = _read_jsonl(path)
    for d in docs:
        _need(d, path, "question", "choices", "answer")
        if isinstance(d["answer"], str):
            if d["answer"] not in _LETTERS[: len(d["choices"])]:
                raise ConfigError(f"{_where(d, path)}: answer {d['answer']!r} is not a choice letter")
            d["answer"] = _LETTERS.index(d["answer"])
        d.setdefault("subject", re.sub(r"_(test|dev|val)$", "", path.stem))
    return docs


def read_hellaswag(path: Path) -> list[Doc]:
    docs = _read_jsonl(path)
    for d in docs:
        _need(d, path, "activity_label", "ctx_a", "ctx_b", "endings", "label")
    return docs


def read_arc(path: Path) -> list[Doc]:
    """ARC: AI2's nested JSONL or the flat (HF) layout, both to the flat layout."""
    docs: list[Doc] = []
    for d in _read_jsonl(path):
        _need(d, path, "question", "answerKey")
        q = d["question"]
        if isinstance(q, dict):  # AI2: {"stem": ..., "choices": [{"text", "label"}]}
            choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
            d = {"id": d.get("id", ""), "question": q["stem"], "choices": choices, "answerKey": d["answerKey"],
                 "_line": d["_line"]}
        else:
            _need(d, path, "choices")
        if d["answerKey"] not in d["choices"]["label"]:
            raise ConfigError(f"{_where(d, path)}: answerKey {d['answerKey']!r} is not among {d['choices']['label']}")
        docs.append(d)
    return docs


def read_boolq(path: Path) -> list[Doc]:
    docs: list[Doc] = []
    for d in _read_jsonl(path):
        _need(d, path, "question", "passage")
        if "label" not in d:
            _need(d, path, "answer")
            d["label"] = int(bool(d["answer"]))
        docs.append({"question": d["question"], "passage": d["passage"], "label": int(d["label"]),
                     "idx": d.get("idx", len(docs)), "_line": d["_line"]})
    return docs


def read_truthfulqa(path: Path) -> list[Doc]:
    """TruthfulQA MC: the repository's mc_task.json (answer -> 0/1 maps) or JSONL with {choices, labels}."""
    if path.suffix.lower() == ".json":
        raw = _read_json(path)
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: expected a JSON list of questions (mc_task.json)")
        rows = [dict(r, _line=i + 1) for i, r in enumerate(raw)]
    else:
        rows = _read_jsonl(path)
    docs: list[Doc] = []
    for d in rows:
        _need(d, path, "question", "mc1_targets")
        out = {"question": d["question"], "_line": d["_line"]}
        for key in ("mc1_targets", "mc2_targets"):
            t = d.get(key)
            if isinstance(t, dict) and "choices" not in t:
                t = {"choices": list(t), "labels": [int(v) for v in t.values()]}
            if t is not None:
                out[key] = t
        if 1 not in out["mc1_targets"]["labels"]:
            raise ConfigError(f"{_where(d, path)}: mc1_targets has no correct answer")
        docs.append(out)
    return docs


def read_gsm8k(path: Path) -> list[Doc]:
    docs = _read_jsonl(path)
    for d in docs:
        _need(d, path, "question", "answer")
    return docs


def read_squad(path: Path) -> list[Doc]:
    """The official SQuAD JSON, one doc per question (``answers: {text, answer_start}``; empty = unanswerable)."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or "data" not in raw:
        raise ConfigError(f"{path}: not a SQuAD file (expected an object with 'data')")
    docs: list[Doc] = []
    for article in raw["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                docs.append({"id": str(qa["id"]), "title": article.get("title", ""), "context": paragraph["context"],
                             "question": qa["question"],
                             "answers": {"text": [a["text"] for a in answers],
                                         "answer_start": [a["answer_start"] for a in answers]}})
    return docs


def read_mc(path: Path) -> list[Doc]:
    docs = _read_jsonl(path)
    for d in docs:
        _need(d, path, "question", "choices", "label")
        if not (isinstance(d["label"], int) and 0 <= d["label"] < len(d["choices"])):
            raise ConfigError(f"{_where(d, path)}: label {d['label']!r} is not an index into its choices")
    return docs


def read_texts(path: Path) -> list[Doc]:
    """Raw text for perplexity: a ``.jsonl`` file (one ``text`` per line) or any other file as one document."""
    if path.suffix.lower() == ".jsonl":
        docs = _read_jsonl(path)
        for d in docs:
            _need(d, path, "text")
        return docs
    return [{"text": _read_text(path)}]


def read_generation(path: Path) -> list[Doc]:
    docs = _read_jsonl(path)
    for d in docs:
        _need(d, path, "prompt", "reference")
    return docs


READERS: dict[str, Callable[[Path], list[Doc]]] = {
    "mmlu": read_mmlu, "hellaswag": read_hellaswag, "arc": read_arc, "boolq": read_boolq,
    "truthfulqa": read_truthfulqa, "gsm8k": read_gsm8k, "squad": read_squad, "mc": read_mc,
    "text": read_texts, "generation": read_generation,
}


# -- the harness's templates (doc_to_text / doc_to_choice / doc_to_target), in Python ---------------------------
def hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py: ``preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _mc_mmlu(d: Doc, i: int) -> MCItem:
    c = d["choices"]
    text = f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return MCItem(str(i), text, ["A", "B", "C", "D"], int(d["answer"]))


def _mc_hellaswag(d: Doc, i: int) -> MCItem:
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    query = hellaswag_preprocess(d["activity_label"] + ": " + ctx)
    return MCItem(str(d.get("ind", i)), query, [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"]))


def _mc_arc(d: Doc, i: int) -> MCItem:
    return MCItem(str(d.get("id") or i), f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]),
                  d["choices"]["label"].index(d["answerKey"]))


def _mc_boolq(d: Doc, i: int) -> MCItem:
    return MCItem(str(d.get("idx", i)), f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"],
                  int(d["label"]))


def _mc_truthfulqa(d: Doc, i: int) -> MCItem:
    t = d["mc1_targets"]
    return MCItem(str(i), TRUTHFULQA_PROMPT + "\n\nQ: " + d["question"] + "\nA:", list(t["choices"]),
                  t["labels"].index(1))


def _mc_plain(d: Doc, i: int) -> MCItem:
    return MCItem(str(d.get("id", i)), f"Question: {d['question']}\nAnswer:", list(d["choices"]), int(d["label"]))


#: doc -> MCItem, per multiple-choice format (the harness's doc_to_text / doc_to_choice / doc_to_target).
MC_TEMPLATES: dict[str, Callable[[Doc, int], MCItem]] = {
    "mmlu": _mc_mmlu, "hellaswag": _mc_hellaswag, "arc": _mc_arc, "boolq": _mc_boolq,
    "truthfulqa": _mc_truthfulqa, "mc": _mc_plain,
}


def gsm8k_text(d: Doc) -> str:
    return f"Question: {d['question']}\nAnswer:"


def squad_text(d: Doc) -> str:
    """lm_eval/tasks/squadv2/task.py: ``doc_to_text``."""
    return f"Title: {d['title']}\n\nBackground: {d['context']}\n\nQuestion: {d['question']}\n\nAnswer:"


def clean(doc: Doc) -> Doc:
    """The doc without llmtune's bookkeeping fields (what is written for the harness)."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}
