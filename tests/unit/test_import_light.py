"""`import llmtune` stays light: no torch, no transformers, no numpy, few modules, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy", "sacrebleu", "nltk", "rouge_score")


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_llmtune_imports_nothing_heavy() -> None:
    out = _fresh(f"import sys, json, llmtune; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert json.loads(out) == []


def test_import_llmtune_loads_few_modules() -> None:
    """A deterministic stand-in for "under ~0.3 s": wall time on a shared 2-core runner is noise, the number of
    modules an import drags in is not. The time itself is printed by benchmarks/import_time.py."""
    code = ("import sys; before = set(sys.modules); import llmtune; "
            "print(len(set(sys.modules) - before))")
    assert int(_fresh(code)) <= 45


def test_memory_and_metrics_never_import_torch() -> None:
    code = ("import sys, json, llmtune, llmtune.metrics, llmtune.memory; "
            "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))")
    assert json.loads(_fresh(code)) == []


def test_listing_the_registry_does_not_need_torch_for_metrics() -> None:
    code = ("import sys, json, llmtune; llmtune.list_backends('metric'); "
            "print(json.dumps('torch' in sys.modules))")
    assert json.loads(_fresh(code)) is False


def test_subpackages_are_reachable_as_attributes_lazily() -> None:
    code = ("import sys, json, llmtune; before = 'llmtune.memory' in sys.modules; "
            "gb = llmtune.memory.rule_of_thumb_serving_gb(70e9, 16); "
            "print(json.dumps([before, gb, 'torch' in sys.modules]))")
    assert json.loads(_fresh(code)) == [False, 168.0, False]
