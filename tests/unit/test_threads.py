"""`num_threads: auto` on resume keeps the count the run used before (same reduction order, same bits)."""

from __future__ import annotations

import json
from pathlib import Path

from llmtune.trainers._threads import resumed_threads


def test_resume_reuses_the_recorded_count(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_threads": 3}))
    threads, why = resumed_threads(tmp_path, 1, "auto: load 1.0")
    assert threads == 3 and "earlier count (3" in why


def test_without_a_usable_record_the_choice_stands(tmp_path: Path) -> None:
    assert resumed_threads(tmp_path, 2, "x") == (2, "x")                      # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert resumed_threads(tmp_path, 2, "x") == (2, "x")                      # damaged
    for bad in (0, True, "4", None):
        (tmp_path / "config.json").write_text(json.dumps({"num_threads": bad}))
        assert resumed_threads(tmp_path, 2, "x") == (2, "x")
