"""`llmtune backends` and `llmtune --version`, through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import llmtune
from llmtune.cli.main import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"llmtune {llmtune.__version__}"


def test_backends_table_lists_every_backend_with_reasons() -> None:
    result = runner.invoke(app, ["backends"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for word in ("rouge", "bleu", "nf4", "gptq", "auto-gptq", "lora", "unsloth", "why not"):
        assert word in result.output


def test_backends_json_matches_the_library() -> None:
    result = runner.invoke(app, ["backends", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    expected = [(r.kind, r.name, r.backend, r.available) for r in llmtune.list_backends()]
    assert [(r["kind"], r["name"], r["backend"], r["available"]) for r in rows] == expected
    assert all(r["available"] or r["reason"] for r in rows)


def test_errors_are_one_line_with_exit_code_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "llmtune.cli.main", "backends", "--kind", "metrik"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Did you mean 'metric'" in proc.stderr
    assert "Traceback" not in proc.stderr
