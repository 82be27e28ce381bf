"""The YAML training config: every mistake is a ConfigError naming file and line; a good config builds a trainer."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from llmtune.core.errors import ConfigError
from llmtune.trainers._config import TOP_LEVEL, load_config, schema


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


GOOD = """
model: ./base
data: data/train.jsonl
eval_data: data/held.jsonl
output_dir: runs/x
resume: auto
trainer:
  name: lora
  backend: peft
  rank: 8
  alpha: 16
  targets: [q_proj, v_proj]
  lr: 1.0e-3
  max_steps: 5
"""


def test_a_good_config_builds_the_trainer_and_resolves_paths(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.trainer.name == "lora" and cfg.trainer.backend == "peft"
    assert cfg.trainer.options.rank == 8 and cfg.trainer.options.targets == ("q_proj", "v_proj")
    assert cfg.trainer.options.lr == 1e-3 and cfg.trainer.options.max_steps == 5
    assert cfg.model == str(tmp_path / "base")            # an existing local dir, relative to the config
    assert cfg.data == str(tmp_path / "data/train.jsonl")
    assert cfg.eval_data == str(tmp_path / "data/held.jsonl")
    assert cfg.output_dir == str(tmp_path / "runs/x")
    assert cfg.resume == "auto"


def test_hub_ids_are_left_alone_and_trainer_defaults_to_lora(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "model: meta-llama/Llama-3.2-1B\ndata: d.jsonl\n"))
    assert cfg.model == "meta-llama/Llama-3.2-1B"
    assert cfg.trainer.name == "lora" and cfg.trainer.backend == "peft"


@pytest.mark.parametrize(
    ("text", "line", "pattern"),
    [
        ("model: m\ndata: d.jsonl\nepochs: 3\n", 3, r"unknown key 'epochs'"),
        ("model: m\ndata: d.jsonl\ndatta: x\n", 3, r"Did you mean 'data'"),
        ("model: m\ndata: d.jsonl\ntrainer:\n  rank: 8\n  rnak: 4\n", 5, r"unknown trainer option 'rnak'.*Did you mean 'rank'"),
        ("model: m\ndata: d.jsonl\ntrainer:\n  rank: 0\n", 4, r"rank"),
        ("model: m\ndata: d.jsonl\ntrainer:\n  lr: 1e-3\n", 4, r"lr.*write 1.0e-3"),  # YAML 1.1: 1e-3 is text
        ("model: m\ndata: d.jsonl\ntrainer:\n  scheduler: cosin\n", 4, r"Did you mean 'cosine'"),
        ("model: m\ndata: d.jsonl\ntrainer:\n  backend: nope\n", 4, r"nope"),
        ("model: m\ndata: d.jsonl\ntrainer:\n  name: lora\n  name: lora\n", 5, r"duplicate key 'trainer.name'"),
        ("model: m\ndata: [a, b]\n", 2, r"'data' must be a path, a hub id, a source mapping"),
        ("model: m\ndata: d.jsonl\nresume: 3\n", 3, r"'resume' must be"),
        ("model: m\ndata: d.jsonl\nquantizer:\n  name: nf4\n  double_qant: true\n", 5, r"double_qant"),
        ("model: m\ndata: d.jsonl\nquantizer: nf5\n", 3, r"nf5"),
        ("model: m\ndata: d.jsonl\ntrainer: [1]\n", 3, r"'trainer' must be a mapping"),
        ("model: m\ndata: d.jsonl\n  bad: indent\n", 3, r"not valid YAML"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, pattern: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert f"{path}:{line}:" in str(info.value)


def test_missing_required_keys_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(write(tmp_path, "model: m\n"))
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, "# nothing\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_quantizer_makes_qlora(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = load_config(write(tmp_path, "model: m\ndata: d.jsonl\nquantizer:\n  name: nf4\n  double_quant: false\n"))
    q = cfg.trainer.options.quantizer
    assert q is not None and q.name == "nf4" and q.options.double_quant is False
    with pytest.raises(ConfigError, match="once"):
        load_config(write(tmp_path, "model: m\ndata: d.jsonl\nquantizer: nf4\ntrainer:\n  quantizer: nf4\n"))


def test_schema_lists_keys_and_trainer_options() -> None:
    s = schema()
    assert set(s["top_level"]) == set(TOP_LEVEL)
    assert "rank" in s["trainers"]["lora/peft"] and "loss_chunk_tokens" in s["trainers"]["lora/peft"]


def test_new_methods_and_data_options_from_yaml(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    text = GOOD.replace("  rank: 8\n", "  method: bottleneck\n  bottleneck_size: 16\n  bottleneck_placement: parallel\n"
                        "  bottleneck_sites: [attn, mlp]\n  template: llama3.1\n  train_on: last_turn\n"
                        "  system_prompt: Be brief.\n")
    opts = load_config(write(tmp_path, text)).trainer.options
    assert opts.method == "bottleneck" and opts.bottleneck_sites == ("attn", "mlp")
    assert opts.method_options().placement == "parallel" and opts.method_options().size == 16
    assert (opts.template, opts.train_on, opts.system_prompt) == ("llama3.1", "last_turn", "Be brief.")
    lora = load_config(write(tmp_path, GOOD.replace("  rank: 8\n", "  rank: 8\n  rslora: true\n  loraplus_ratio: 16\n"
                                                   "  init: pissa\n"))).trainer.options
    assert lora.method_options().scaling == 16 / 8 ** 0.5 and lora.loraplus_ratio == 16
    with pytest.raises(ConfigError, match=r"train\.yaml:\d+.*bottleneck_placement"):
        load_config(write(tmp_path, text.replace("placement: parallel", "placement: sideways")))
