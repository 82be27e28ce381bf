"""GPTQ and RTN on a tiny Llama on CPU: GPTQ beats RTN, save/load is exact, bad input is refused, CLI works."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import llmtune  # noqa: E402
from llmtune.core.errors import ConfigError, InvalidOptionError  # noqa: E402
from llmtune.quantizers.gptq import CalibrationError  # noqa: E402
from llmtune.quantizers.gptq.quant_linear import QuantLinear  # noqa: E402

VOCAB = 256


def _tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    fields.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


@pytest.fixture(scope="module")
def base():
    return _tiny_llama()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, VOCAB, (4, 32), generator=g) for _ in range(4)]
    held_out = torch.randint(0, VOCAB, (4, 32), generator=g)
    return calibration, held_out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel_err(out, ref) -> float:
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.fixture(scope="module")
def quantized(base, data):
    """RTN and GPTQ (plain; act-order + asymmetric) at 4 bits, group 32, with their held-out errors."""
    calibration, held_out = data
    ref = _logits(base, held_out)
    out = {}
    for key, name, opts in [("rtn", "rtn", {}), ("gptq", "gptq", {}),
                            ("rtn-asym", "rtn", {"sym": False}),
                            ("gptq-act-asym", "gptq", {"act_order": True, "sym": False})]:
        q = llmtune.get_quantizer(name, bits=4, group_size=32, quiet=True, **opts)
        model = q.quantize(copy.deepcopy(base), calibration=calibration if name == "gptq" else None)
        out[key] = (q, model, _rel_err(_logits(model, held_out), ref))
    return out


def test_gptq_output_error_is_lower_than_rtn(quantized) -> None:
    assert quantized["gptq"][2] < quantized["rtn"][2], (quantized["gptq"][2], quantized["rtn"][2])
    assert quantized["gptq-act-asym"][2] < quantized["rtn-asym"][2]


def test_all_block_linears_are_packed_and_lm_head_is_not(quantized) -> None:
    _, model, _ = quantized["gptq"]
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert isinstance(model.lm_head, torch.nn.Linear)
    qcfg = model.config.quantization_config
    assert qcfg["quant_method"] == "gptq" and qcfg["checkpoint_format"] == "gptq"


@pytest.mark.parametrize("key", ["rtn", "gptq", "gptq-act-asym"])
def test_save_load_round_trip_is_identical(quantized, data, tmp_path: Path, key: str) -> None:
    q, model, _ = quantized[key]
    _, held_out = data
    out = q.save(model, tmp_path / key)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "quantize_config.json"} <= files
    qc = json.loads((out / "quantize_config.json").read_text())
    fmt = "gptq_v2" if key == "gptq-act-asym" else "gptq"  # asymmetric grids default to v2 (true zeros)
    assert (qc["bits"], qc["group_size"], qc["checkpoint_format"], qc["quant_method"]) == (4, 32, fmt, "gptq")
    assert qc["desc_act"] is (key == "gptq-act-asym") and qc["sym"] is (key != "gptq-act-asym")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "backend" not in cfg  # groups divide every width: transformers picks its kernel freely
    assert cfg["bits"] == 4 and cfg["desc_act"] == qc["desc_act"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        assert qw.dtype == torch.int32 and tuple(qw.shape) == (128 * 4 // 32, 64)
        assert tuple(f.get_tensor("model.layers.0.mlp.down_proj.qzeros").shape) == (4, 64 * 4 // 32)
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.mlp.down_proj.g_idx").dtype == torch.int32
    loaded = q.load(out)
    assert torch.equal(_logits(loaded, held_out), _logits(model, held_out))


@pytest.mark.parametrize("name", ["gptq", "rtn"])
def test_group_size_not_dividing_the_width_gives_a_partial_last_group(base, data, tmp_path: Path, name: str) -> None:
    """group 48 on widths 64 and 128: ceil(in/48) groups (the last one partial), saved and loaded exactly."""
    calibration, held_out = data
    q = llmtune.get_quantizer(name, bits=4, group_size=48, quiet=True)
    model = q.quantize(copy.deepcopy(base), calibration=calibration[:2] if name == "gptq" else None)
    down = model.get_submodule("model.layers.0.mlp.down_proj")  # in_features 128: groups 48 + 48 + 32
    assert tuple(down.scales.shape) == (3, 64) and tuple(down.qzeros.shape) == (3, 64 * 4 // 32)
    assert torch.equal(down.g_idx.long(), torch.arange(128) // 48)
    assert _rel_err(_logits(model, held_out), _logits(base, held_out)) < 0.05
    out = q.save(model, tmp_path)
    assert json.loads((out / "quantize_config.json").read_text())["group_size"] == 48
    # transformers is pointed at GPTQModel's torch kernel (its CPU ATen int4 kernel refuses partial groups)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["backend"] == "gptq_torch"
    assert torch.equal(_logits(q.load(out), held_out), _logits(model, held_out))


def test_group_size_zero_is_a_clear_error(base) -> None:
    with pytest.raises(InvalidOptionError, match="group_size=0"):
        llmtune.get_quantizer("rtn", group_size=0, quiet=True).quantize(copy.deepcopy(base))


@pytest.mark.parametrize("calibration", [[], None, [torch.zeros(0, 8, dtype=torch.long)], [torch.randn(2, 8)]])
def test_bad_calibration_is_a_clear_error(base, calibration) -> None:
    q = llmtune.get_quantizer("gptq", quiet=True, group_size=32)
    with pytest.raises(CalibrationError, match="calibration"):
        q.quantize(copy.deepcopy(base), calibration=calibration)


def test_save_refuses_an_unquantized_model(base, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="quantize it"):
        llmtune.get_quantizer("gptq").save(base, tmp_path)
    with pytest.raises(ConfigError, match=r"config\.json"):
        llmtune.get_quantizer("gptq").load(tmp_path)


def test_cli_quantize_gptq(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmtune.cli.main import app
    from llmtune.models.tiny import build_tiny_model, bundled_corpus, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    src = tmp_path / "fp"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(bundled_corpus()[:20]))
    result = CliRunner().invoke(app, ["quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32",
                                      "--calibration", str(text), "--samples", "4", "--seq-len", "32",
                                      "--out", str(tmp_path / "q"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert summary["calibration_samples"] == 4 and summary["method"] == "gptq"
    assert (tmp_path / "q" / "quantize_config.json").is_file()
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    loaded = llmtune.get_quantizer("gptq").load(tmp_path / "q")
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    bad = CliRunner().invoke(app, ["quantize", str(src), "--method", "gptq", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "calibration" in str(bad.exception)


def test_dequantize_model_gives_plain_linears_with_the_same_outputs(quantized, data) -> None:
    from llmtune.quantizers.gptq.model import dequantize_model

    _, model, _ = quantized["gptq-act-asym"]
    _, held_out = data
    before = _logits(model, held_out)
    plain = dequantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    assert torch.allclose(_logits(plain, held_out), before, atol=1e-5)


def test_opt_family_works_too(tmp_path: Path) -> None:
    """The GPTQ paper's OPT models: other block path (model.decoder.layers), biases, out_proj/fc1/fc2."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64,
                                     word_embed_proj_dim=64)).eval()
    g = torch.Generator().manual_seed(2)
    calibration = [torch.randint(0, VOCAB, (4, 32), generator=g) for _ in range(2)]
    held_out = torch.randint(0, VOCAB, (2, 32), generator=g)
    ref = _logits(model, held_out)
    q = llmtune.get_quantizer("gptq", group_size=32, quiet=True)
    qmodel = q.quantize(copy.deepcopy(model), calibration=calibration)
    rmodel = llmtune.get_quantizer("rtn", group_size=32, quiet=True).quantize(copy.deepcopy(model))
    assert _rel_err(_logits(qmodel, held_out), ref) < _rel_err(_logits(rmodel, held_out), ref)
    assert qmodel.config.quantization_config["block_name_to_quantize"] == "model.decoder.layers"
    assert torch.equal(_logits(q.load(q.save(qmodel, tmp_path)), held_out), _logits(qmodel, held_out))


def test_skip_modules_inside_blocks_round_trip(base, data, tmp_path: Path) -> None:
    q = llmtune.get_quantizer("rtn", group_size=32, skip_modules=["lm_head", "down_proj"], quiet=True)
    model = q.quantize(copy.deepcopy(base))
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    listed = model.config.quantization_config["modules_in_block_to_quantize"]
    assert listed and "mlp.down_proj" not in listed[0] and "mlp.up_proj" in listed[0]
    loaded = q.load(q.save(model, tmp_path))
    assert torch.equal(_logits(loaded, data[1]), _logits(model, data[1]))
    with pytest.raises(InvalidOptionError, match="skip_modules"):
        llmtune.get_quantizer("gptq", skip_modules="lm_head")


@pytest.mark.parametrize("pattern", ["down_proj", "mlp.down_proj", "layers.1", "model.layers.0", "*.self_attn.*",
                                     "model.layers.?.mlp.up_proj", "mlp", "proj"])
def test_skip_modules_mean_the_same_for_gptq_as_for_bitsandbytes(base, pattern: str) -> None:
    """One matcher: what RTN/GPTQ leave in full precision is exactly what the bnb quantizers leave."""
    from llmtune.quantizers.bnb import skip_matches

    block_linears = {n for n, m in base.named_modules() if n.startswith("model.layers.")
                     and isinstance(m, torch.nn.Linear)}
    expected = {n for n in block_linears if skip_matches(pattern, n)}
    if expected == block_linears:
        pytest.skip("pattern skips every layer")  # not reached with the patterns above
    model = llmtune.get_quantizer("rtn", group_size=32, skip_modules=[pattern]).quantize(copy.deepcopy(base))
    kept = {n for n, m in model.named_modules() if n in block_linears and type(m) is torch.nn.Linear}
    assert kept == expected


def test_rtn_and_gptq_hf_config_agree_with_the_config_json_they_write(quantized) -> None:
    """hf_quantization_config() (used to load the checkpoint) says what config.json says, field for field."""
    for key in ("rtn", "gptq", "gptq-act-asym"):
        q, model, _ = quantized[key]
        written = model.config.quantization_config
        hf = q.hf_quantization_config().to_dict()
        for field in ("bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential"):
            assert hf[field] == written[field], (key, field, hf[field], written[field])
        assert hf["format"] == written["checkpoint_format"]
    assert quantized["rtn"][1].config.quantization_config["true_sequential"] is False
    assert quantized["gptq"][1].config.quantization_config["true_sequential"] is True


def test_progress_is_reported_through_the_callback_once_per_block(base, data, capsys) -> None:
    seen: list[tuple[str, int, int]] = []
    for name in ("rtn", "gptq"):
        seen.clear()
        q = llmtune.get_quantizer(name, group_size=32)
        q.quantize(copy.deepcopy(base), calibration=data[0] if name == "gptq" else None,
                   progress=lambda step, done, total: seen.append((step, done, total)))
        assert seen == [("model.layers.0", 1, 2), ("model.layers.1", 2, 2)]
    assert capsys.readouterr().out == ""  # the library prints nothing; the CLI renders the bar


def test_another_tools_damaged_checkpoint_is_a_one_line_llmtune_error(base, tmp_path: Path) -> None:
    """Without a manifest (another tool's checkpoint) damage is still named: file, field or module."""
    from safetensors.torch import load_file, save_file

    from llmtune.core.errors import DamagedFileError
    from llmtune.core.manifest import MANIFEST

    q = llmtune.get_quantizer("rtn", group_size=32)
    saved = q.save(q.quantize(copy.deepcopy(base)), tmp_path / "q")
    (saved / MANIFEST).unlink()
    weights = saved / "model.safetensors"
    good = weights.read_bytes()

    state = load_file(str(weights))
    state["model.layers.9.mlp.up_proj.qweight"] = state.pop("model.layers.0.mlp.up_proj.qweight")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model.layers.9.mlp.up_proj.qweight.*no module 'model.layers.9"):
        q.load(saved)

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(DamagedFileError, match=r"model\.safetensors: unreadable"):
        q.load(saved)

    weights.write_bytes(good)
    config = json.loads((saved / "config.json").read_text())
    del config["quantization_config"]["bits"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="bits/group_size"):
        q.load(saved)
