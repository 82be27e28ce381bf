"""`llmtune eval`: file formats, several references, options passthrough, backends, JSON and table output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import llmtune
from llmtune.cli.eval import load_pairs, parse_options
from llmtune.cli.main import app
from llmtune.core.errors import ConfigError, InvalidOptionError

runner = CliRunner()
PREDS = ["it is very cold outside.", "the cat sat on the mat"]
REFS1 = ["it is cold outside.", "the cat is on the mat"]
REFS2 = ["it is freezing outside.", "a cat sat on a mat"]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _json(args: list[str]) -> dict[str, object]:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output.strip().splitlines()[-1])


def test_rouge_text_files_equal_the_library(tmp_path: Path) -> None:
    p, r = _write(tmp_path / "p.txt", PREDS), _write(tmp_path / "r.txt", REFS1)
    out = _json(["eval", "--metric", "rouge", "--predictions", str(p), "--references", str(r)])
    want = llmtune.get_metric("rouge").compute(PREDS, REFS1)
    assert out["scores"] == want.scores and out["signature"] == want.signature
    assert out["metric"] == "rouge" and out["backend"] == "numpy" and out["n"] == 2


def test_lecture_rouge1_example(tmp_path: Path) -> None:
    p = _write(tmp_path / "p.txt", ["it is very cold outside."])
    r = _write(tmp_path / "r.txt", ["it is cold outside."])
    out = _json(["eval", "-m", "rouge", "-p", str(p), "-r", str(r), "-o", "rouge_types=rouge1"])
    scores = out["scores"]
    assert isinstance(scores, dict)
    assert (scores["rouge1_precision"], scores["rouge1_recall"]) == (0.8, 1.0)
    assert round(scores["rouge1_fmeasure"], 3) == 0.889


def test_bleu_several_reference_files_and_options(tmp_path: Path) -> None:
    p = _write(tmp_path / "p.txt", PREDS)
    r1, r2 = _write(tmp_path / "r1.txt", REFS1), _write(tmp_path / "r2.txt", REFS2)
    out = _json(["eval", "-m", "bleu", "-p", str(p), "--references", str(r1), str(r2),
                 "-o", "effective_order=true", "-o", "tokenize=intl", "--per-example"])
    want = llmtune.get_metric("bleu", effective_order=True, tokenize="intl").compute(
        PREDS, [[a, b] for a, b in zip(REFS1, REFS2)])
    assert out["scores"] == want.scores
    assert out["per_example"] == {"bleu": list(want.per_example["bleu"])}
    assert str(out["signature"]).startswith("nrefs:2|case:mixed|eff:yes|tok:intl|")


def test_backend_switch_gives_the_same_keys(tmp_path: Path) -> None:
    p, r = _write(tmp_path / "p.txt", PREDS), _write(tmp_path / "r.txt", REFS1)
    ours = _json(["eval", "-m", "bleu", "-p", str(p), "-r", str(r), "-o", "definition=nltk", "-o", "smoothing=1"])
    theirs = _json(["eval", "-m", "bleu", "-b", "nltk", "-p", str(p), "-r", str(r), "-o", "smoothing=1"])
    assert ours["scores"] == theirs["scores"]
    assert theirs["backend"] == "nltk"


def test_jsonl_with_field_lists_and_multiline_texts(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"summary": s}) for s in ["a b\nc d", "x y z"]) + "\n\n", encoding="utf-8")
    r = tmp_path / "r.jsonl"
    r.write_text(json.dumps({"summary": ["c d\na b", "a b"]}) + "\n" + json.dumps({"summary": "x y"}) + "\n",
                 encoding="utf-8")
    preds, refs = load_pairs(p, [r], field="summary")
    assert preds == ["a b\nc d", "x y z"] and refs == [["c d\na b", "a b"], ["x y"]]
    out = _json(["eval", "-m", "rouge", "-p", str(p), "-r", str(r), "--field", "summary"])
    assert out["scores"] == llmtune.get_metric("rouge").compute(preds, refs).scores


def test_table_output(tmp_path: Path) -> None:
    p, r = _write(tmp_path / "p.txt", PREDS), _write(tmp_path / "r.txt", REFS1)
    result = runner.invoke(app, ["eval", "-m", "bleu", "-p", str(p), "-r", str(r), "--per-example"])
    assert result.exit_code == 0, result.output
    assert "bleu (numpy) on 2" in result.output and "precision_4" in result.output
    assert "signature: nrefs:1|case:mixed" in result.output and "per example" in result.output


def test_crlf_and_trailing_newline(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_bytes(b"a b\r\nc d\r\n")
    r = tmp_path / "r.txt"
    r.write_bytes(b"a b\nc d")
    assert load_pairs(p, [r]) == (["a b", "c d"], [["a b"], ["c d"]])


@pytest.mark.parametrize(("setup", "match"), [
    (lambda d: (_write(d / "p.txt", PREDS), _write(d / "r.txt", REFS1[:1])), "has 2 examples but"),
    (lambda d: (_write(d / "p.txt", PREDS), d / "missing.txt"), "no such file"),
    (lambda d: (_write(d / "p.jsonl", ['{"text": "a"}', "{oops"]), _write(d / "r.txt", ["a", "b"])),
     r"p.jsonl:2: not valid JSON"),
    (lambda d: (_write(d / "p.jsonl", ['{"txt": "a"}']), _write(d / "r.txt", ["a"])), "no field 'text'"),
    (lambda d: (_write(d / "p.txt", ["a"]), _write(d / "r.jsonl", ["[1, 2]"])), "r.jsonl:1: expected a string"),
])
def test_bad_files_raise_config_errors_naming_file_and_line(tmp_path: Path, setup, match: str) -> None:  # type: ignore[no-untyped-def]
    p, r = setup(tmp_path)
    result = runner.invoke(app, ["eval", "-m", "bleu", "-p", str(p), "-r", str(r)])
    assert isinstance(result.exception, ConfigError)
    with pytest.raises(ConfigError, match=match):
        load_pairs(p, [r])


def test_option_parsing() -> None:
    assert parse_options(["tokenize=intl", "lowercase=true", "max_ngram_order=2", "weights=0.5,0.5",
                          "rouge_types=rouge1,rougeL", 'rouge_types2=["rouge2"]']) == {
        "tokenize": "intl", "lowercase": True, "max_ngram_order": 2, "weights": [0.5, 0.5],
        "rouge_types": ["rouge1", "rougeL"], "rouge_types2": ["rouge2"]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_options(["tokenize"])


def test_invalid_metric_option_is_reported(tmp_path: Path) -> None:
    p, r = _write(tmp_path / "p.txt", PREDS), _write(tmp_path / "r.txt", REFS1)
    result = runner.invoke(app, ["eval", "-m", "bleu", "-p", str(p), "-r", str(r), "-o", "smooth_method=expo"])
    assert isinstance(result.exception, InvalidOptionError)
    assert "Did you mean 'exp'" in str(result.exception)


@pytest.mark.parametrize(("extra", "message"), [
    (["--output", "out"], "--output is for task mode, not metric mode (--metric); drop it"),
    (["--model", "m", "--num-fewshot", "2"], "--model, --num-fewshot are for task mode"),
])
def test_a_flag_of_task_mode_is_refused_in_metric_mode(tmp_path: Path, extra: list[str], message: str) -> None:
    """``--output`` with ``--metric`` used to be ignored: exit 0 and nothing written."""
    p, r = _write(tmp_path / "p.txt", PREDS), _write(tmp_path / "r.txt", REFS1)
    result = runner.invoke(app, ["eval", "-m", "bleu", "-p", str(p), "-r", str(r), *extra])
    assert isinstance(result.exception, ConfigError) and message in str(result.exception)


def test_a_flag_of_metric_mode_is_refused_in_task_mode() -> None:
    result = runner.invoke(app, ["eval", "--task", "hellaswag", "--model", "m", "--metric", "bleu"])
    assert isinstance(result.exception, ConfigError)
    assert "--metric is for metric mode, not task mode (--task)" in str(result.exception)
