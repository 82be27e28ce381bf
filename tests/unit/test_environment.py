"""In the full test environment (`nox -s tests` sets LLMTUNE_FULL_ENV=1), every optional library the CPU
suite uses must import: otherwise `pytest.importorskip` would turn a broken install into silent skips."""

from __future__ import annotations

import importlib
import os

import pytest

FULL_ENV_MODULES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers",
                    "rouge_score", "sacrebleu", "nltk", "matplotlib", "gguf", "tensorboard", "mlflow", "lm_eval")


@pytest.mark.skipif(os.environ.get("LLMTUNE_FULL_ENV") != "1", reason="only in the full environment (nox -s tests)")
@pytest.mark.parametrize("module", FULL_ENV_MODULES)
def test_optional_library_imports(module: str) -> None:
    importlib.import_module(module)


@pytest.mark.skipif(os.environ.get("LLMTUNE_FULL_ENV") != "1", reason="only in the full environment (nox -s tests)")
def test_every_cpu_backend_is_available() -> None:
    import llmtune

    expected_unavailable = {("quantizer", "gptq", "gptqmodel"), ("quantizer", "gptq", "auto-gptq"),
                            ("trainer", "lora", "unsloth"), ("trainer", "sft", "unsloth")}
    expected_unavailable.add(("task", "squad", "lm-eval"))  # the harness's squadv2 needs the hub (reason shown)
    rows = [r for r in llmtune.list_backends() if r.source == "builtin"]
    broken = [(r.kind, r.name, r.backend, r.reason) for r in rows
              if not r.available and (r.kind, r.name, r.backend) not in expected_unavailable]
    assert broken == []
