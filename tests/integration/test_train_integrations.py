"""Tasks during training (`TaskEvaluator`, the config's ``eval_tasks``) and the vLLM check at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import llmtune  # noqa: E402
from llmtune.core.errors import ConfigError  # noqa: E402
from llmtune.trainers.callbacks import ConsoleReporter  # noqa: E402
from llmtune.trainers.callbacks_tasks import TaskEvaluator  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
FAST = {"rank": 4, "alpha": 8, "lr": 2e-2, "batch_size": 4, "warmup": 0, "progress": False, "max_length": 96,
        "max_steps": 4}
KOPITIAM = {"name": "kopitiam-mc", "limit": 8}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _base(tok: Any, where: Path) -> Any:
    from llmtune.models.tiny import build_tiny_model

    model = build_tiny_model(tok, seed=0, **SMALL)
    model.save_pretrained(str(where))
    tok.save_pretrained(str(where))
    return model


def _log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_tasks_during_training_equal_a_separate_evaluate_of_the_saved_adapter(tok: Any, tmp_path: Path) -> None:
    from llmtune.data import split_instructions

    train, _ = split_instructions()
    plain = llmtune.get_trainer("sft", **FAST).train(_base(tok, tmp_path / "base"), train[:24], tokenizer=tok,
                                                     output_dir=tmp_path / "plain")
    evaluator = TaskEvaluator([KOPITIAM], every=2, batch_size=4)
    result = llmtune.get_trainer("sft", **FAST).train(_base(tok, tmp_path / "base"), train[:24], tokenizer=tok,
                                                      output_dir=tmp_path / "run", callbacks=[evaluator])
    # scoring in eval mode with the RNG restored leaves training as it was (dropout 0.05 draws from the RNG)
    assert [h["loss"] for h in result.history] == [h["loss"] for h in plain.history]
    lines = [r for r in _log(tmp_path / "run") if r.get("event") == "tasks"]
    assert [(r["step"], r["final"]) for r in lines] == [(2, False), (4, True)]
    assert result.extra["tasks"] == lines
    assert json.loads((tmp_path / "run" / "result.json").read_text())["tasks"] == lines
    assert lines[0]["tasks"]["kopitiam-mc"]["n"] == 8
    separate = llmtune.evaluate(str(tmp_path / "base"), tasks=[llmtune.get_task("kopitiam-mc", limit=8)],
                                adapter=result.adapter_dir, batch_size=4)["kopitiam-mc"]
    final = lines[-1]["tasks"]["kopitiam-mc"]
    assert final["metrics"] == pytest.approx(separate.metrics, abs=1e-12)
    assert final["stderr"] == pytest.approx(separate.stderr, abs=1e-12)


def test_vllm_check_at_the_end_dora_finding_lora_none(tok: Any, tmp_path: Path) -> None:
    from llmtune.data import split_instructions

    train, _ = split_instructions()
    lines: list[str] = []
    dora = llmtune.get_trainer("sft", method="dora", **FAST).train(
        _base(tok, tmp_path / "base"), train[:16], tokenizer=tok, output_dir=tmp_path / "dora", max_steps=1,
        callbacks=[ConsoleReporter(lines.append)])
    kinds = [f["kind"] for f in dora.extra["vllm_check"]]
    assert kinds == ["dora"] and dora.extra["vllm_check"][0]["severity"] == "refused"
    logged = [r for r in _log(tmp_path / "dora") if r.get("event") == "vllm_check"]
    assert logged == [{"step": 1, "event": "vllm_check", "findings": dora.extra["vllm_check"]}]
    assert json.loads((tmp_path / "dora" / "result.json").read_text())["vllm_check"] == dora.extra["vllm_check"]
    assert len(lines) == 1 and lines[0].startswith("warning: vLLM will refuse this adapter (dora)")

    lora = llmtune.get_trainer("sft", **FAST).train(_base(tok, tmp_path / "base"), train[:16], tokenizer=tok,
                                                    output_dir=tmp_path / "lora", max_steps=1)
    assert lora.extra["vllm_check"] == []
    assert [r for r in _log(tmp_path / "lora") if "event" in r] == []     # one line per step, nothing else


def _config(tmp_path: Path, tasks: str, trainer: str = "") -> Path:
    from llmtune.data import split_instructions

    train, _ = split_instructions()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train[:16]))
    path = tmp_path / "c.yaml"
    path.write_text("model: base\ndata: train.jsonl\noutput_dir: run\ntrainer:\n  rank: 4\n  batch_size: 4\n"
                    f"  max_steps: 2\n  warmup: 0\n  progress: false\n{trainer}{tasks}")
    return path


def test_config_eval_tasks_validated_with_its_line(tmp_path: Path) -> None:
    from llmtune.trainers._config import load_config

    cfg = load_config(_config(tmp_path, "eval_tasks:\n  - {name: kopitiam-mc, every: 1, limit: 4, batch_size: 2}\n"))
    assert [(e.specs[0].task.name, e.specs[0].every, e.batch_size) for e in cfg.eval_tasks] == [("kopitiam-mc", 1, 2)]
    with pytest.raises(ConfigError, match=r"c\.yaml:10: eval_tasks\[0\].*kopitiam-mcq"):
        load_config(_config(tmp_path, "eval_tasks: [kopitiam-mcq]\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml:10: eval_tasks\[0\].*every"):
        load_config(_config(tmp_path, "eval_tasks: [{name: kopitiam-mc, every: -1}]\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml:10: 'eval_tasks' must be a list"):
        load_config(_config(tmp_path, "eval_tasks: 3\n"))
    # a bad row of a task's data is found when the config is read (and by --check), not after the training
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(ConfigError, match=r"mc\.jsonl:1: field 'label': 5 is not an index into 2 choices"):
        load_config(_config(tmp_path, f"eval_tasks: [{{name: multiple-choice, data: {tmp_path / 'mc.jsonl'}}}]\n"))


def test_cli_runs_config_tasks_and_prints_the_vllm_finding(tok: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmtune.cli.main import app

    _base(tok, tmp_path / "base")
    config = _config(tmp_path, "eval_tasks: [{name: kopitiam-mc, every: 1, limit: 4}]\n", "  method: dora\n")
    out = CliRunner().invoke(app, ["train", str(config)])
    assert out.exit_code == 0, out.output + repr(out.exception)
    assert "warning: vLLM will refuse this adapter (dora)" in out.output
    tasks = [r for r in _log(tmp_path / "run") if r.get("event") == "tasks"]
    assert [(r["step"], r["final"]) for r in tasks] == [(1, False), (2, True)]
    assert set(tasks[0]["tasks"]["kopitiam-mc"]["metrics"]) >= {"acc", "acc_norm"}
