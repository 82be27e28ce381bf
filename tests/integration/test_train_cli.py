"""`llmtune train CONFIG.yaml`, `llmtune generate`, `llmtune merge` on a tiny model saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from typer.testing import CliRunner  # noqa: E402

from llmtune.cli.main import app  # noqa: E402
from llmtune.core.errors import ConfigError  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_generate_merge_from_a_yaml_config(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer
    from llmtune.trainers._inference import load_for_inference

    tok = train_tiny_tokenizer()
    build_tiny_model(tok, seed=0, **SMALL).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    train, held = split_instructions()
    (tmp_path / "data").mkdir()
    for name, rows in (("train.jsonl", train[:24]), ("held.jsonl", held[:3])):
        (tmp_path / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "train.yaml"
    config.write_text(
        "model: base\ndata: data/train.jsonl\neval_data: data/held.jsonl\noutput_dir: runs/cli\n"
        "trainer:\n  rank: 4\n  alpha: 8\n  lr: 2.0e-2\n  batch_size: 4\n  max_steps: 4\n  warmup: 0\n"
        "  max_new_tokens: 4\n  progress: false\n  save_every: 2\n")
    runner = CliRunner()

    checked = runner.invoke(app, ["train", str(config), "--check"])
    assert checked.exit_code == 0 and "valid config" in checked.output

    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    adapter = tmp_path / "runs" / "cli" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert "held-out evaluation" in result.output
    log = (tmp_path / "runs" / "cli" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4
    # the adapter records its base, so generate needs only the adapter
    gen = runner.invoke(app, ["generate", "What is Kopi O?", "--adapter", str(adapter), "--max-new-tokens", "5",
                              "--json"])
    assert gen.exit_code == 0, gen.output + repr(gen.exception)
    answer = json.loads(gen.output[gen.output.index('{"prompt"'):].splitlines()[0])  # stderr is mixed in
    assert answer["prompt"] == "What is Kopi O?" and isinstance(answer["answer"], str)
    # merge: the merged safetensors model gives the outputs of base + adapter
    merged_dir = tmp_path / "merged"
    merged = runner.invoke(app, ["merge", "--adapter", str(adapter), "--out", str(merged_dir)])
    assert merged.exit_code == 0, merged.output + repr(merged.exception)
    assert list(merged_dir.glob("*.safetensors")) and not list(merged_dir.glob("adapter_*"))
    peft_model, tok2 = load_for_inference(None, adapter)
    folded = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    ids = torch.tensor([tok2("What is Teh C?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(folded(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
    # resume from the last checkpoint: nothing left to train, the same adapter comes out
    again = runner.invoke(app, ["train", str(config), "--resume", "auto"])
    assert again.exit_code == 0, again.output + repr(again.exception)


def test_bad_config_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: m\ndata: d.jsonl\ntrainer:\n  rank: 4\n  lora_rank: 8\n")
    result = CliRunner().invoke(app, ["train", str(config)])
    assert isinstance(result.exception, ConfigError)
    assert f"{config}:5:" in str(result.exception) and "lora_rank" in str(result.exception)
