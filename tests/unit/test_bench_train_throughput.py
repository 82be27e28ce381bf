"""benchmarks/train_throughput.py's driver: grid parsing and the comparison lines the GPU claims are read from."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the driver half imports no torch
    return module


def test_parse_grid(bench: ModuleType) -> None:
    assert bench._parse_grid("4x512,1X2048") == [(4, 512), (1, 2048)]
    with pytest.raises(SystemExit, match="BATCHxSEQ"):
        bench._parse_grid("4by512")


def _case(recipe: str, tps: float, peak: float, loss: float, device: str = "cuda") -> dict[str, object]:
    return {"kind": "case", "recipe": recipe, "model": "m", "method": "lora", "batch": 4, "seq": 512,
            "device": device, "tokens_per_s": tps, "peak_MiB": peak, "loss_last": loss}


def test_compare_gives_the_ratios_of_the_issue_claims(bench: ModuleType) -> None:
    rows = [_case("plain", 9085.3, 6202.3, 12.1322), _case("peft", 9500.0, 4464.0, 12.1320),
            _case("unsloth", 10951.9, 2883.7, 12.1318),
            {"kind": "case", "recipe": "unsloth-plain", "model": "m", "method": "lora", "batch": 4, "seq": 512,
             "device": "cuda", "error": "boom"}]
    (line,) = bench._compare(rows)
    assert line["kind"] == "comparison" and (line["batch"], line["seq"]) == (4, 512)
    assert line["unsloth_speedup"] == pytest.approx(1.205, abs=1e-3)
    assert line["unsloth_peak_ratio"] == pytest.approx(0.465, abs=1e-3)
    assert line["peft_peak_ratio"] == pytest.approx(0.72, abs=1e-3)
    assert line["peft_loss_diff"] == pytest.approx(-0.0002, abs=1e-6)
    assert not any(k.startswith("unsloth_plain") for k in line)  # an errored case is not compared


def test_compare_has_no_memory_ratio_on_cpu(bench: ModuleType) -> None:
    rows = [_case("plain", 10.0, 400.0, 6.0, "cpu"), _case("unsloth", 20.0, 900.0, 6.0, "cpu")]
    (line,) = bench._compare(rows)
    assert line["unsloth_speedup"] == 2.0 and "unsloth_peak_ratio" not in line
