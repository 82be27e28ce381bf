"""Online RL with reward functions: a YAML ``grpo`` run with two reward functions and a reward model (tiny models),
per-function statistics in log.jsonl, the generator seam, and config errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft")
from typer.testing import CliRunner

from llmtune.cli.main import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (4, 1), (6, 2), (1, 1)]]


def _base(tok: Any, path: Path, seed: int = 0) -> None:
    from llmtune.models.tiny import build_tiny_model

    build_tiny_model(tok, seed=seed, **SMALL).save_pretrained(str(path))
    tok.save_pretrained(str(path))


def test_grpo_yaml_with_two_reward_functions_and_a_reward_model(tok: Any, tmp_path: Path) -> None:
    from llmtune.models.tiny import build_tiny_model
    from llmtune.trainers.rlhf.reward import RewardModel, reward_model_from_causal_lm

    _base(tok, tmp_path / "base")
    RewardModel(reward_model_from_causal_lm(build_tiny_model(tok, seed=1, **SMALL), tok), tok).save(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    config = tmp_path / "grpo.yaml"
    config.write_text(f"""model: base
data: prompts.jsonl
output_dir: runs/grpo
trainer:
  name: grpo
  method: lora
  rank: 4
  alpha: 8
  max_steps: 2
  batch_size: 2
  samples: 3
  max_new_tokens: 6
  warmup: 0
  progress: false
  loss_type: dr_grpo
  reward_model: {tmp_path / "rm"}
  reward_model_weight: 0.5
  reward_funcs:
    - name: numeric_answer
      extract: last
      weight: 1.0
    - name: length
      unit: chars
      weight: -0.01
""")
    runner = CliRunner()
    checked = runner.invoke(app, ["train", str(config), "--check"])
    assert checked.exit_code == 0, checked.output + repr(checked.exception)
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = [json.loads(x) for x in (tmp_path / "runs" / "grpo" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "kl" in x]
    assert len(steps) == 2
    for key in ("rewards/numeric_answer/mean", "rewards/numeric_answer/std", "rewards/length/mean",
                "rewards/length/std", "rewards/reward_model/mean", "rewards/reward_model/std"):
        assert key in steps[0], key
    first = steps[0]  # the total is the weighted sum of the parts' means
    want = (first["rewards/numeric_answer/mean"] - 0.01 * first["rewards/length/mean"]
            + 0.5 * first["rewards/reward_model/mean"])
    assert first["reward"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert first["rewards/length/mean"] > 0


def test_reward_funcs_errors_name_the_file_line_and_the_item(tok: Any, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: m\ndata: d.jsonl\ntrainer:\n  name: grpo\n  reward_funcs:\n    - numeric\n")
    from llmtune.core.errors import ConfigError
    from llmtune.trainers._config import load_config

    with pytest.raises(ConfigError, match=r"bad\.yaml:5: .*reward_funcs\[0\].*Did you mean 'numeric_answer'"):
        load_config(config)


def test_online_rl_with_only_reward_functions_and_a_custom_generator(tok: Any, tmp_path: Path) -> None:
    """No reward model: Python reward functions alone; the samples come from a Generator object (the seam)."""
    import llmtune
    from llmtune.models.tiny import build_tiny_model
    from llmtune.trainers.rlhf.generation import Generator, HFGenerator, make_generator

    calls: list[int] = []

    class Counting(HFGenerator):
        def sync_weights(self, model: Any) -> None:
            calls.append(1)

    seen: list[Any] = []

    def answer_field(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        seen.append(fields)
        return [float(len(c) % 2) for c in completions]

    assert isinstance(Counting(), Generator)
    trainer = llmtune.get_trainer("rloo", method="lora", rank=4, alpha=8, max_steps=2, batch_size=2, samples=2,
                                  max_new_tokens=4, warmup=0, progress=False, reward_funcs=[answer_field],
                                  generator=Counting(), loss_type="grpo")
    trainer.train(build_tiny_model(tok, seed=0, **SMALL), PROMPTS, tokenizer=tok, output_dir=tmp_path / "run")
    assert len(calls) == 2 and seen and seen[0]["answer"][0] in {"5", "8", "2"}
    assert len(seen[0]["answer"]) == 4  # one value per completion: 2 prompts x K=2
    with pytest.raises(llmtune.MissingDependencyError, match="pip install vllm"):
        make_generator("vllm", model_path="base")
    with pytest.raises(llmtune.InvalidOptionError, match="generator"):
        llmtune.get_trainer("grpo", generator="sglang")
