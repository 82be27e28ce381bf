"""`llmtune eval --task`: runs `llmtune.evaluate` on a saved model (and adapter), JSON/table output, per-item files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import llmtune  # noqa: E402


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    from llmtune.models.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny")
    build_tiny_model(tok, seed=1).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmtune.cli.main", "eval", *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(Path(llmtune.__file__).parent.parent)}, timeout=600)


def test_task_mode_equals_the_library_and_writes_per_item(saved_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}", "choices": ["a b", "c", "d e f"], "label": i % 3}) + "\n"
                            for i in range(6)))
    out = _cli("--task", "kopitiam-mc", "--data", str(data), "--model", str(saved_model), "--json",
               "--output", str(tmp_path / "out"), "--option", "limit=5")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    want = llmtune.evaluate(str(saved_model), ["kopitiam-mc"],
                            task_options={"kopitiam-mc": {"data": str(data), "limit": 5}})["kopitiam-mc"]
    assert payload["n"] == 5 and payload["metrics"] == pytest.approx(want.metrics)
    assert len((tmp_path / "out" / "kopitiam-mc.jsonl").read_text().splitlines()) == 5
    table = _cli("--task", "boolq", "--model", str(saved_model), "--option", "limit=3")
    assert table.returncode == 0 and "acc_norm" in table.stdout


def test_task_mode_errors_are_one_line(saved_model: Path, tmp_path: Path) -> None:
    out = _cli("--task", "helaswag", "--model", str(saved_model))
    assert out.returncode == 2 and "Did you mean 'hellaswag'" in out.stderr
    out = _cli("--task", "arc_easy", "--model", str(saved_model), "--data", str(tmp_path / "none.jsonl"))
    assert out.returncode == 2 and "no such file" in out.stderr
    out = _cli("--task", "arc_easy")
    assert out.returncode == 2 and "--model" in out.stderr
