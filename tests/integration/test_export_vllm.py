"""`check_vllm` flags each adapter kind vLLM refuses, on a tiny real PEFT adapter of that kind (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import llmtune  # noqa: E402
from llmtune.export import check_vllm  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}


def _save(tmp_path: Path, name: str, config: Any) -> Path:
    from llmtune.models.tiny import build_tiny_model

    model = build_tiny_model(64, seed=0, **SMALL)
    peft_model = peft.get_peft_model(model, config)
    out = tmp_path / name
    peft_model.save_pretrained(str(out))
    return out


def _lora(**kw: Any) -> Any:
    return peft.LoraConfig(task_type="CAUSAL_LM", r=kw.pop("r", 8), lora_alpha=16, target_modules=kw.pop(
        "target_modules", ["q_proj", "v_proj"]), **kw)


CASES = {
    "dora": (lambda: _lora(use_dora=True), "dora", "refused"),
    "modules_to_save": (lambda: _lora(modules_to_save=["lm_head"]), "modules_to_save", "refused"),
    "lm_head": (lambda: _lora(target_modules=["q_proj", "lm_head"]), "embedding", "refused"),
    "embed_tokens": (lambda: _lora(target_modules=["embed_tokens", "v_proj"]), "embedding", "refused"),
    "rank_1024": (lambda: _lora(r=1024), "rank", "refused"),
    "rank_32": (lambda: _lora(r=32), "rank", "flag"),
    "bias": (lambda: _lora(bias="lora_only"), "bias", "refused"),
    "prompt_tuning": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "peft_type",
                      "refused"),
    "ia3": (lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                   feedforward_modules=["down_proj"]), "peft_type", "refused"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_refused_kind_is_flagged_with_a_fix(tmp_path: Path, case: str) -> None:
    make, kind, severity = CASES[case]
    findings = check_vllm(_save(tmp_path, case, make()))
    assert [(f.kind, f.severity) for f in findings] == [(kind, severity)]
    assert findings[0].fix and findings[0].message


def test_rank_32_names_the_flag_to_pass(tmp_path: Path) -> None:
    (finding,) = check_vllm(_save(tmp_path, "r32", _lora(r=32)))
    assert "--max-lora-rank 32" in finding.fix


def test_a_plain_lora_adapter_passes(tmp_path: Path) -> None:
    assert check_vllm(_save(tmp_path, "ok", _lora(r=16, target_modules="all-linear"))) == []


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    findings = check_vllm(_save(tmp_path, "many", _lora(r=64, use_dora=True, modules_to_save=["lm_head"])))
    assert {f.kind for f in findings} == {"dora", "modules_to_save", "rank"}


def test_bottleneck_adapter_directory_is_refused(tmp_path: Path) -> None:
    # the files llmtune's bottleneck method writes (bottleneck_config.json + bottleneck_model.safetensors)
    from safetensors.torch import save_file

    out = tmp_path / "run" / "adapter"
    out.mkdir(parents=True)
    save_file({"adapters.0.down.weight": torch.zeros(4, 32)}, str(out / "bottleneck_model.safetensors"))
    (out / "bottleneck_config.json").write_text(json.dumps({"method": "bottleneck", "hidden_size": 32}))
    for path in (out, out.parent):
        (finding,) = check_vllm(path)
        assert (finding.kind, finding.severity) == ("bottleneck", "refused")


def test_trained_dora_run_is_flagged_and_cli_exits_1(tok: Any, tmp_path: Path, one_torch_thread: None) -> None:
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    train, _ = split_instructions()
    trainer = llmtune.get_trainer("lora", method="dora", rank=4, alpha=8, batch_size=4, max_steps=1, warmup=0,
                                  eval_examples=0, progress=False, max_length=96)
    trainer.train(build_tiny_model(tok, seed=0, **SMALL), train[:8], tokenizer=tok, output_dir=tmp_path / "run")
    assert [f.kind for f in check_vllm(tmp_path / "run")] == ["dora"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(llmtune.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "llmtune.cli.main", "export", str(tmp_path / "run"), "--check",
                           "vllm", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loads"] is False and report["vllm"][0]["kind"] == "dora"
