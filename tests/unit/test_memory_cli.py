"""`llmtune memory`: table, JSON, fits, solvers, plot, config paths and errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmtune.cli.main import app
from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.memory import PRESETS, ModelSpec, estimate_training, max_batch_size

runner = CliRunner()


def test_table_shows_terms_phases_and_gpus():
    r = runner.invoke(app, ["memory", "llama-3.1-8b", "--method", "lora", "--batch", "4", "--seq", "2048"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for word in ("weights", "optimizer_states", "activations_checkpoints", "cuda_context", "peak tensors",
                 "loss_backward", "T4", "H200", "A100-40GB"):
        assert word in r.output


def test_json_matches_library_and_solves_for_gpu():
    r = runner.invoke(app, ["memory", "qwen2.5-1.5b", "--method", "qlora", "--batch", "2", "--seq", "1024",
                            "--recipe", "hf", "--json", "--max-batch", "--gpu", "L4"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    spec = ModelSpec.from_preset("qwen2.5-1.5b")
    e = estimate_training(spec, "qlora", batch_size=2, seq_len=1024, recipe="hf")
    assert out["peak_tensor_bytes"] == e.peak_tensor_bytes and out["breakdown"] == e.breakdown
    assert out["max_batch"] == max_batch_size(spec, "L4", seq_len=1024, method="qlora", recipe="hf")
    assert set(out["fits"]) >= {"T4", "L4", "RTX4090", "A100-40GB", "A100-80GB", "H100-80GB", "H200"}


def test_serving_multi_gpu_and_config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama-3.1-70b"].config))
    r = runner.invoke(app, ["memory", str(tmp_path), "--serve", "--bits", "4", "--batch", "8", "--seq", "4096",
                            "--json", "--max-seq", "--gpu", "A100-80GB"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["mode"] == "serving" and out["breakdown"]["kv_cache"] == 8 * 4096 * 320 * 1024
    assert out["max_seq"] > 0
    r = runner.invoke(app, ["memory", "llama-3.1-70b", "--method", "full", "--gpus", "8", "--sharding", "fsdp",
                            "--json"])
    assert r.exit_code == 0 and "gathered_layers" in json.loads(r.output)["breakdown"]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "m.png"
    r = runner.invoke(app, ["memory", "gpt2", "--method", "full", "--plot", str(png)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_what_is_wrong():
    r = runner.invoke(app, ["memory", "lama-3.1-8b"])
    assert isinstance(r.exception, ConfigError) and "unknown preset" in str(r.exception)
    r = runner.invoke(app, ["memory", "gpt2", "--method", "prefix"])
    assert isinstance(r.exception, InvalidOptionError) and "method" in str(r.exception)
    r = runner.invoke(app, ["memory", "gpt2", "--max-batch", "--gpu", "V100"])
    assert isinstance(r.exception, InvalidOptionError) and "V100" in str(r.exception)


def test_mechanisms_from_the_command_line():
    r = runner.invoke(app, ["memory", "llama-3.2-1b", "--method", "bottleneck", "--bottleneck", "32", "--objective",
                            "dpo", "--packing", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    e = estimate_training(ModelSpec.from_preset("llama-3.2-1b"), "bottleneck", bottleneck_size=32, objective="dpo",
                          packing=True, batch_size=1, seq_len=2048)
    assert out["peak_tensor_bytes"] == e.peak_tensor_bytes and "reference_forward" in out["phases"]
