"""The Weights & Biases logger in offline mode (WANDB_MODE=offline): the run file wandb writes holds every step and
evaluation the run logged, the options as config, and the exit code. Nothing leaves the machine."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("wandb")

import llmtune  # noqa: E402
from llmtune.trainers.callbacks import WandbLogger  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
FAST = {"rank": 4, "alpha": 8, "lr": 2e-2, "batch_size": 4, "warmup": 0, "max_new_tokens": 4, "eval_examples": 2,
        "progress": False, "max_length": 96, "max_steps": 3}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` run file (wandb's LevelDB-style log: a 7-byte file header, then 32 KiB
    blocks of chunks, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def finished_records(path: Path) -> dict[str, list[Any]]:
    """The run file's records by kind, once wandb's writer process has flushed its exit record (``finish()``
    returns before the wandb-core process has written the file out)."""
    import time

    by_kind: dict[str, list[Any]] = {}
    for _ in range(600):
        by_kind = {}
        for r in wandb_records(path) if path.is_file() else ():
            by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)
        if "exit" in by_kind:
            return by_kind
        time.sleep(0.1)
    raise AssertionError(f"{path}: no exit record after 60 s; records: {sorted(by_kind)}")


def test_wandb_offline_receives_every_step_and_evaluation(tok: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))   # dir= wins: the files go under output_dir
    train, held = split_instructions()
    wb = WandbLogger(project="tiny", name="t1")
    result = llmtune.get_trainer("sft", **FAST).train(build_tiny_model(tok, seed=0, **SMALL), train[:24],
                                                      eval_data=held[:2], tokenizer=tok, output_dir=tmp_path,
                                                      callbacks=[wb])
    curve = [h["loss"] for h in result.history]
    assert wb.run_dir is not None and wb.run_dir.parent == tmp_path / "wandb"
    assert wb.run_dir.name.startswith("offline-run-")
    by_kind = finished_records(wb.run_dir / f"run-{wb.run_id}.wandb")
    run = by_kind["run"][0].run
    assert run.project == "tiny" and run.display_name == "t1"
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in run.config.update}
    assert config["method"] == "lora" and config["max_steps"] == 3
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in by_kind["history"]]
    steps = {row["_step"]: row for row in rows}
    assert [steps[s]["train/loss"] for s in (1, 2, 3)] == pytest.approx(curve, rel=1e-6)
    assert steps[0]["eval/loss"] == pytest.approx(result.eval["before"]["loss"])
    assert steps[3]["eval/loss"] == pytest.approx(result.eval["after"]["loss"])
    assert "eval/rougeL" in steps[3]
    assert by_kind["exit"][0].exit.exit_code == 0
