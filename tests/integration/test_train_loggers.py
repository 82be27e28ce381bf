"""TensorBoard and MLflow logger callbacks write what the run logged: real event files, a real local store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

import llmtune  # noqa: E402
from llmtune.trainers.callbacks import MLflowLogger, TensorBoardLogger  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
FAST = {"rank": 4, "alpha": 8, "lr": 2e-2, "batch_size": 4, "warmup": 0, "max_new_tokens": 4, "eval_examples": 2,
        "progress": False, "max_length": 96, "max_steps": 3}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tensorboard_and_mlflow_receive_every_step_and_evaluation(tok: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    train, held = split_instructions()
    tb, ml = TensorBoardLogger(), MLflowLogger(experiment="tiny", run_name="t1")
    result = llmtune.get_trainer("sft", **FAST).train(build_tiny_model(tok, seed=0, **SMALL), train[:24],
                                                      eval_data=held[:2], tokenizer=tok, output_dir=tmp_path,
                                                      callbacks=[tb, ml])
    curve = [h["loss"] for h in result.history]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(curve, rel=1e-6)
    assert {"eval/rougeL", "eval/loss", "eval/perplexity"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 3]      # before and after

    client = MlflowClient(tracking_uri=ml.tracking_uri)
    assert ml.tracking_uri.startswith("sqlite:") and (tmp_path / "mlflow.db").is_file()
    run = client.get_run(ml.run_id)
    assert run.info.status == "FINISHED" and run.data.params["method"] == "lora"
    history = client.get_metric_history(ml.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3] and [m.value for m in history] == pytest.approx(curve)
    assert run.data.metrics["eval_loss"] == pytest.approx(result.eval["after"]["loss"])
