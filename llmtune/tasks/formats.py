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
    _need_at(doc, _where(doc, path), *fields)


def _need_at(doc: Doc, where: str, *fields: str) -> None:
    for field in fields:
        if field not in doc:
            raise ConfigError(f"{where}: no field {field!r} (fields: {', '.join(k for k in doc if k != '_line')})")


def _where(doc: Doc, path: Path) -> str:
    return f"{path}:{doc.get('_line', '?')}"


# -- value checks: the one layer every reader goes through ----------------------------------------------------
# Each takes ``where`` ("FILE:LINE" or "FILE: data[0].paragraphs[1]") and the field's name, and raises a
# `ConfigError` "WHERE: field 'F': WHAT IS WRONG" so that no value is scored as something it is not.
def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: field {field!r}: {problem}")


def _text(where: str, field: str, value: Any, *, empty_ok: bool = True) -> str:
    """``value`` if it is a string (non-blank unless ``empty_ok``)."""
    if not isinstance(value, str):
        raise _bad(where, field, f"expected a string, got {_show(value)}")
    if not empty_ok and not value.strip():
        raise _bad(where, field, "is empty")
    return value


def _texts(where: str, field: str, value: Any, *, what: str = "choices", count: int | None = None) -> list[str]:
    """``value`` if it is a list of strings: at least two, or exactly ``count``."""
    if isinstance(value, str):
        raise _bad(where, field, f"expected a list of {what}, got one string {_show(value)}")
    if not isinstance(value, list):
        raise _bad(where, field, f"expected a list of {what} (strings), got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(where, field, f"item {i} is {_show(item)}, not a string")
    if count is not None and len(value) != count:
        raise _bad(where, field, f"has {len(value)} {what}; this format has exactly {count}")
    if len(value) < 2:
        raise _bad(where, field, f"has {len(value)} {what}; a question needs at least 2")
    return value


def _index(where: str, field: str, value: Any, n: int, what: str, *, digits_ok: bool = False) -> int:
    """``value`` as an index into ``n`` ``what``: an int (not a bool; a digit string with ``digits_ok``)."""
    index = value
    if digits_ok and isinstance(value, str) and value.strip().isdigit():
        index = int(value)
    if isinstance(index, bool) or not isinstance(index, int):
        raise _bad(where, field, f"expected an integer index, got {_show(value)}")
    if not 0 <= index < n:
        raise _bad(where, field, f"{_show(value)} is not an index into {n} {what}")
    return index


def _boolean(where: str, field: str, value: Any) -> bool:
    """``value`` if it is a JSON boolean (the string "false" is an error, not ``bool("false")``)."""
    if isinstance(value, bool):
        return value
    hint = f" (write the JSON boolean {value.strip().lower()}, without quotes)" \
        if isinstance(value, str) and value.strip().lower() in ("true", "false") else ""
    raise _bad(where, field, f"expected true or false, got {_show(value)}{hint}")


def _object(where: str, field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, field, f"expected an object, got {_show(value)}")
    return value


def _list(where: str, field: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(where, field, f"expected a list, got {_show(value)}")
    return value


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
        where = _where(d, path)
        _need(d, path, "question", "choices", "answer")
        _text(where, "question", d["question"])
        _texts(where, "choices", d["choices"], count=4)
        if isinstance(d["answer"], str):
            if d["answer"] not in _LETTERS[:4]:
                raise _bad(where, "answer", f"{_show(d['answer'])} is not a choice letter (A, B, C or D)")
            d["answer"] = _LETTERS.index(d["answer"])
        else:
            _index(where, "answer", d["answer"], 4, "choices")
        d.setdefault("subject", re.sub(r"_(test|dev|val)$", "", path.stem))
        _text(where, "subject", d["subject"])
    return docs


def read_hellaswag(path: Path) -> list[Doc]:
    """HellaSwag: rowanz's JSONL (``label`` an int) or the HF rows (``label`` a digit string)."""
    docs = _read_jsonl(path)
    for d in docs:
        where = _where(d, path)
        _need(d, path, "activity_label", "ctx_a", "ctx_b", "endings", "label")
        for field in ("activity_label", "ctx_a", "ctx_b"):
            _text(where, field, d[field])
        endings = _texts(where, "endings", d["endings"], what="endings")
        d["label"] = _index(where, "label", d["label"], len(endings), "endings", digits_ok=True)
    return docs


def read_arc(path: Path) -> list[Doc]:
    """ARC: AI2's nested JSONL or the flat (HF) layout, both to the flat layout."""
    docs: list[Doc] = []
    for d in _read_jsonl(path):
        where = _where(d, path)
        _need(d, path, "question", "answerKey")
        q = d["question"]
        if isinstance(q, dict):  # AI2: {"stem": ..., "choices": [{"text", "label"}]}
            _need_at(q, f"{where}: field 'question'", "stem", "choices")
            listed = _list(where, "question.choices", q["choices"])
            for i, c in enumerate(listed):
                _need_at(_object(where, f"question.choices[{i}]", c), f"{where}: question.choices[{i}]", "text", "label")
            choices = {"text": [c["text"] for c in listed], "label": [c["label"] for c in listed]}
            d = {"id": d.get("id", ""), "question": q["stem"], "choices": choices, "answerKey": d["answerKey"],
                 "_line": d["_line"]}
        else:
            _need(d, path, "choices")
            _need_at(_object(where, "choices", d["choices"]), f"{where}: field 'choices'", "text", "label")
        _text(where, "question", d["question"])
        texts = _texts(where, "choices.text", d["choices"]["text"])
        labels = _texts(where, "choices.label", d["choices"]["label"], what="labels", count=len(texts))
        if d["answerKey"] not in labels:
            raise _bad(where, "answerKey", f"{_show(d['answerKey'])} is not among the choice labels {labels}")
        docs.append(d)
    return docs


def read_boolq(path: Path) -> list[Doc]:
    """BoolQ: Google's JSONL (``answer`` a JSON boolean) or SuperGLUE's (``label`` 0 = no, 1 = yes)."""
    docs: list[Doc] = []
    for d in _read_jsonl(path):
        where = _where(d, path)
        _need(d, path, "question", "passage")
        _text(where, "question", d["question"])
        _text(where, "passage", d["passage"])
        if "label" in d:
            label = _index(where, "label", d["label"], 2, "answers (0 = no, 1 = yes)")
        else:
            _need(d, path, "answer")
            label = int(_boolean(where, "answer", d["answer"]))
        docs.append({"question": d["question"], "passage": d["passage"], "label": label,
                     "idx": d.get("idx", len(docs)), "_line": d["_line"]})
    return docs


def _targets(where: str, field: str, t: Any, *, single: bool) -> dict[str, Any]:
    """TruthfulQA's ``{choices, labels}`` (or the repository's ``{answer: 0/1}`` map), checked: labels 0/1, one per
    choice; ``single`` (mc1): exactly one correct answer. An empty map (mc2 in some copies) stays empty."""
    _object(where, field, t)
    if "choices" not in t:
        for answer, v in t.items():
            if isinstance(v, bool) or v not in (0, 1):
                raise _bad(where, field, f"answer {_show(answer)} is marked {_show(v)}, not 0 or 1")
        t = {"choices": list(t), "labels": [int(v) for v in t.values()]}
        if not t["choices"] and not single:
            return t
    _need_at(t, f"{where}: field {field!r}", "choices", "labels")
    choices = _texts(where, f"{field}.choices", t["choices"])
    labels = _list(where, f"{field}.labels", t["labels"])
    if len(labels) != len(choices) or any(isinstance(v, bool) or v not in (0, 1) for v in labels):
        raise _bad(where, f"{field}.labels", f"expected one 0 or 1 per choice ({len(choices)}), got {_show(labels)}")
    correct = labels.count(1)
    if correct == 0 or (single and correct > 1):
        raise _bad(where, field, f"has {correct} correct answers; {'exactly' if single else 'at least'} one needed")
    return t


def read_truthfulqa(path: Path) -> list[Doc]:
    """TruthfulQA MC: the repository's mc_task.json (answer -> 0/1 maps) or JSONL with {choices, labels}."""
    if path.suffix.lower() == ".json":
        raw = _read_json(path)
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: expected a JSON list of questions (mc_task.json)")
        for i, r in enumerate(raw):
            if not isinstance(r, dict):
                raise ConfigError(f"{path}: item {i}: expected an object, got {_show(r)}")
        rows = [dict(r, _line=i + 1) for i, r in enumerate(raw)]
    else:
        rows = _read_jsonl(path)
    docs: list[Doc] = []
    for d in rows:
        where = _where(d, path)
        _need(d, path, "question", "mc1_targets")
        out = {"question": _text(where, "question", d["question"]), "_line": d["_line"]}
        for key in ("mc1_targets", "mc2_targets"):
            if d.get(key) is not None:
                out[key] = _targets(where, key, d[key], single=key == "mc1_targets")
        docs.append(out)
    return docs


def read_gsm8k(path: Path) -> list[Doc]:
    docs = _read_jsonl(path)
    for d in docs:
        where = _where(d, path)
        _need(d, path, "question", "answer")
        _text(where, "question", d["question"])
        if "####" not in _text(where, "answer", d["answer"]):
            raise _bad(where, "answer", "has no final '#### number' (GSM8K answers end with it)")
    return docs


def read_squad(path: Path) -> list[Doc]:
    """The official SQuAD JSON, one doc per question (``answers: {text, answer_start}``; empty = unanswerable)."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or "data" not in raw:
        raise ConfigError(f"{path}: not a SQuAD file (expected an object with 'data')")
    docs: list[Doc] = []
    for i, article in enumerate(_list(f"{path}", "data", raw["data"])):
        at = f"{path}: data[{i}]"
        _need_at(_object(at, "data", article), at, "paragraphs")
        for j, paragraph in enumerate(_list(at, "paragraphs", article["paragraphs"])):
            pat = f"{at}.paragraphs[{j}]"
            _need_at(_object(pat, "paragraphs", paragraph), pat, "context", "qas")
            context = _text(pat, "context", paragraph["context"])
            for k, qa in enumerate(_list(pat, "qas", paragraph["qas"])):
                docs.append(_squad_doc(f"{pat}.qas[{k}]", _object(pat, "qas", qa), article, context))
    return docs


def _squad_doc(where: str, qa: Doc, article: Doc, context: str) -> Doc:
    _need_at(qa, where, "id", "question")
    impossible = _boolean(where, "is_impossible", qa["is_impossible"]) if "is_impossible" in qa else False
    if not impossible:
        _need_at(qa, where, "answers")
    answers = [] if impossible else _list(where, "answers", qa["answers"])
    for n, a in enumerate(answers):
        _need_at(_object(where, f"answers[{n}]", a), f"{where}.answers[{n}]", "text", "answer_start")
        _text(where, f"answers[{n}].text", a["text"])
        _index(where, f"answers[{n}].answer_start", a["answer_start"], len(context) + 1, "characters of the context")
    return {"id": str(qa["id"]), "title": str(article.get("title", "")), "context": context,
            "question": _text(where, "question", qa["question"]),
            "answers": {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]}}


def read_mc(path: Path) -> list[Doc]:
    docs = _read_jsonl(path)
    for d in docs:
        where = _where(d, path)
        _need(d, path, "question", "choices", "label")
        _text(where, "question", d["question"])
        choices = _texts(where, "choices", d["choices"])
        _index(where, "label", d["label"], len(choices), "choices")
    return docs


def read_texts(path: Path) -> list[Doc]:
    """Raw text for perplexity: a ``.jsonl`` file (one ``text`` per line) or any other file as one document.
    Every document must hold some text (an empty one has no tokens, words or bytes to divide by)."""
    if path.suffix.lower() == ".jsonl":
        docs = _read_jsonl(path)
        for d in docs:
            _need(d, path, "text")
            _text(_where(d, path), "text", d["text"], empty_ok=False)
        return docs
    text = _read_text(path)
    if not text.strip():
        raise ConfigError(f"{path}: empty: there is no text to score")
    return [{"text": text}]


def read_generation(path: Path) -> list[Doc]:
    docs = _read_jsonl(path)
    for d in docs:
        where = _where(d, path)
        _need(d, path, "prompt", "reference")
        _text(where, "prompt", d["prompt"], empty_ok=False)
        _text(where, "reference", d["reference"])
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
