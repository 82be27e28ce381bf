"""The unsloth backend's GPU targets, at their shapes (Llama-3.2-1B architecture, batch 4 x 512, r=16, all linear, checkpointing).

* llmtune's ``unsloth`` backend keeps Unsloth's advantage over the plain PEFT recipe: >= 1.2x tokens/s and
  >= 40% less peak memory (``torch.cuda.max_memory_allocated``), for LoRA and QLoRA;
* llmtune's ``peft`` backend uses less peak memory than the plain recipe, at the same loss.

Measured by ``benchmarks/train_throughput.py`` (each recipe in its own process). Skipped without CUDA
(tests/gpu/conftest.py); the Unsloth claims are skipped, with the reason, where Unsloth is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAVE_UNSLOTH = importlib.util.find_spec("unsloth") is not None


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """{(recipe, method): case row} for llama3.2-1b at 4x512, plus ("comparison", method) rows."""
    out = tmp_path_factory.mktemp("bench") / "train.jsonl"
    recipes = "plain,peft,unsloth" if HAVE_UNSLOTH else "plain,peft"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--models", "llama3.2-1b",
         "--grid", "4x512", "--recipes", recipes, "--steps", "6", "--budget-s", "150", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    errors = [r for r in rows if "error" in r]
    assert not errors and proc.returncode == 0, (errors, proc.stderr[-3000:])
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") == "case":
            table[(r["recipe"], r["method"])] = r
        elif r.get("kind") == "comparison":
            table[("comparison", r["method"])] = r
    return table


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_peft_backend_uses_less_peak_memory_than_plain_recipe_at_same_loss(
    measured: dict[tuple[str, str], dict[str, Any]], method: str,
) -> None:
    plain, ours = measured[("plain", method)], measured[("peft", method)]
    assert ours["peak_MiB"] < plain["peak_MiB"], (ours, plain)
    # Same base weights, data and LoRA init (B = 0): the first loss is the same function; after 6 steps of
    # AdamW(1e-4) both have moved by about as much.
    assert abs(ours["loss_first"] - plain["loss_first"]) < 0.02, (ours, plain)
    assert abs(ours["loss_last"] - plain["loss_last"]) < 0.05, (ours, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_UNSLOTH, reason="unsloth is not installed (carry it with ../shared/tools/device-site.sh)")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_unsloth_backend_keeps_unsloths_advantage(measured: dict[tuple[str, str], dict[str, Any]], method: str) -> None:
    plain, ours = measured[("plain", method)], measured[("unsloth", method)]
    assert ours["tokens_per_s"] >= 1.2 * plain["tokens_per_s"], (ours, plain)
    assert ours["peak_MiB"] <= 0.6 * plain["peak_MiB"], (ours, plain)
    assert abs(ours["loss_first"] - plain["loss_first"]) < 0.05, (ours, plain)
