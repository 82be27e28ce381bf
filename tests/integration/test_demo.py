"""A shortened `llmtune demo` (fewer steps, few held-out drinks): it runs end to end and writes its summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from typer.testing import CliRunner

from llmtune.cli.main import app

KEYS = ("rougeL_before", "rougeL_after", "bleu_before", "bleu_after", "seconds", "adapter_dir")


def test_short_demo_writes_summary_adapter_and_base(tmp_path: Path) -> None:
    from llmtune.demo import run_demo

    lines: list[str] = []
    summary = run_demo(tmp_path, pretrain_steps=8, epochs=1, eval_examples=4, progress=False, echo=lines.append)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for key in KEYS:
        assert key in written, key
    for key in KEYS[:4]:
        assert isinstance(written[key], float)
    assert 0 <= written["rougeL_before"] <= 1 and 0 <= written["rougeL_after"] <= 1
    assert written["seconds"] > 0 and written["heldout_examples"] == 4
    adapter = Path(written["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").is_file()
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (Path(base) / "config.json").is_file()   # so `llmtune generate --adapter` works on it
    est = written["memory_estimate"]
    assert est["llmtune"]["peak_tensor_bytes"] > 0 and est["hf"]["peak_tensor_bytes"] > 0
    assert any("ROUGE-L" in line for line in lines) and any("memory" in line for line in lines)
    assert written["train_loss_last"] < written["train_loss_first"]
    for key in ("kopitiam_mc_acc_before", "kopitiam_mc_acc_after", "kopitiam_mc_acc_norm_before",
                "kopitiam_mc_acc_norm_after"):
        assert 0.0 <= written[key] <= 1.0, key
    assert any("kopitiam-mc" in line for line in lines)


def test_demo_command_is_registered() -> None:
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "--out" in result.output


def test_short_demo_second_act_rlhf(tmp_path: Path) -> None:
    from llmtune.demo import run_demo

    lines: list[str] = []
    settings = {"rm_steps": 4, "rl_steps": 2, "rl_prompts_per_step": 2, "samples": 2, "rank_samples": 2,
                "max_new_tokens": 6, "eval_samples": 2}
    summary = run_demo(tmp_path, pretrain_steps=8, epochs=1, eval_examples=4, progress=False, echo=lines.append,
                       rlhf=True, rlhf_settings=settings)
    written = json.loads((tmp_path / "summary.json").read_text())
    for key in ("rm_val_pairwise_accuracy", "rm_heldout_pairwise_accuracy", "heldout_reward_sft",
                "heldout_reward_rl", "win_rate_vs_sft", "greedy_reward_sft", "greedy_reward_rl",
                "greedy_win_rate_vs_sft", "heldout_exact_match_rl", "greedy_exact_match_rl"):
        assert isinstance(written[key], float), key
    assert 0.0 <= written["win_rate_vs_sft"] <= 1.0 and written["rlhf_seconds"] > 0
    assert (tmp_path / "rlhf" / "reward" / "model" / "config.json").is_file()
    assert (tmp_path / "rlhf" / "rloo" / "adapter" / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "rlhf" / "rloo" / "log.jsonl").read_text().splitlines()) == 2
    assert summary["seconds"] >= summary["rlhf_seconds"] and any("RLHF" in line for line in lines)
