"""bitsandbytes quantizers on a tiny Llama on CPU: layer swap, skip list, output error, save/load, HF, QLoRA."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import llmtune  # noqa: E402
from llmtune.core.errors import ConfigError, GPURequiredError, LlmtuneError  # noqa: E402
from llmtune.quantizers.bnb import RECORD_FILE  # noqa: E402
from llmtune.quantizers.bnb_guard import guard_4bit_model  # noqa: E402

pytestmark = [pytest.mark.cpu_kernels, pytest.mark.bnb_4bit]  # rerun under forced kernel paths: tests/cpu_paths.py

LINEARS = (*(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
           *(f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")))


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama (hidden 64) with fixed random weights, in eval mode."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    # from_config(dtype=...) keeps the rotary inv_freq buffer in fp32, as from_pretrained does (.to(dtype) would not)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@pytest.fixture(scope="module")
def base() -> transformers.LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe: packed 4-bit bytes stored as bf16 can read as NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(("name", "layer_cls"), [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantize_swaps_linears_in_place_and_keeps_lm_head(base, tokens, name, layer_cls) -> None:
    model = copy.deepcopy(base)
    out = llmtune.get_quantizer(name).quantize(model)
    assert out is model
    for i in range(2):
        for proj in LINEARS:
            assert type(model.get_submodule(f"model.layers.{i}.{proj}")).__name__ == layer_cls
    assert type(model.lm_head) is torch.nn.Linear
    record = model.llmtune_quantization
    if name != "int8":  # compute_dtype "auto" on CPU
        assert record["resolved"] == {"compute_dtype": "float32"} and record["quantized_on"] == "cpu"
        assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.float32
    assert record["name"] == name and record["backend"] == "bnb" and record["skipped_modules"] == ["lm_head"]
    assert len(record["quantized_modules"]) == 14
    # marked like a model transformers loaded with a BitsAndBytesConfig
    assert model.config.quantization_config.quantization_method() == ("llm_int8" if name == "int8" else name)
    assert getattr(model, "is_loaded_in_8bit" if name == "int8" else "is_loaded_in_4bit") is True
    assert logits(model, tokens).shape == (2, 16, 256)


def test_quantized_forward_stays_close_to_fp32(base, tokens) -> None:
    reference = logits(base, tokens)
    errors = {}
    for name, options in [("nf4", {"compute_dtype": "float32"}), ("nf4", {"compute_dtype": "bfloat16"}),
                          ("fp4", {"compute_dtype": "float32"}), ("int8", {})]:
        model = llmtune.get_quantizer(name, **options).quantize(copy.deepcopy(base))
        errors[(name, options.get("compute_dtype", "default"))] = rel_err(logits(model, tokens), reference)
    # bounds with headroom over what this model gives (nf4 ~0.10, fp4 ~0.14, int8 ~0.01)
    assert errors[("nf4", "float32")] < 0.15
    assert errors[("nf4", "bfloat16")] < 0.15
    assert errors[("fp4", "float32")] < 0.2
    assert errors[("int8", "default")] < 0.03
    # and the expected order: 8 bits beat 4, NormalFloat beats the float grid on normal weights
    assert errors[("int8", "default")] < errors[("nf4", "float32")] < errors[("fp4", "float32")]


def test_skip_list_by_suffix_and_glob(base) -> None:
    q = llmtune.get_quantizer("nf4", skip_modules=["lm_head", "down_proj", "model.layers.1.self_attn.*"])
    model = q.quantize(copy.deepcopy(base))
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            assert name == "lm_head" or name.endswith("down_proj") or name.startswith("model.layers.1.self_attn.")
    assert isinstance(model.model.layers[1].mlp.up_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert len(model.llmtune_quantization["skipped_modules"]) == 1 + 2 + 4
    # an empty skip list quantizes lm_head too
    everything = llmtune.get_quantizer("int8", skip_modules=[]).quantize(copy.deepcopy(base))
    assert isinstance(everything.lm_head, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize(
    ("name", "options", "dtype"),
    [
        ("nf4", {}, torch.float32),
        ("nf4", {"compute_dtype": "float32", "double_quant": False, "blocksize": 128}, torch.float32),
        ("nf4", {"quant_storage": "bfloat16", "skip_modules": ["lm_head", "*.0.mlp.*"]}, torch.float32),
        ("nf4", {"compute_dtype": "bfloat16"}, torch.bfloat16),
        ("fp4", {"compute_dtype": "float16", "blocksize": 32}, torch.float32),
        ("int8", {}, torch.float32),
        ("int8", {"threshold": 0.0, "skip_modules": ["o_proj"]}, torch.float32),
    ],
)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, tokens, name, options, dtype) -> None:
    q = llmtune.get_quantizer(name, **options)
    model = q.quantize(tiny_llama(seed=3, dtype=dtype))
    before = logits(model, tokens)
    saved = q.save(model, tmp_path / "q")
    assert {"model.safetensors", "config.json", RECORD_FILE} <= {p.name for p in saved.iterdir()}
    record = json.loads((saved / RECORD_FILE).read_text())
    assert record["options"]["skip_modules"] == list(q.options.skip_modules)
    loaded = llmtune.get_quantizer(name).load(saved)  # default options: the saved settings win
    assert loaded.llmtune_quantization == model.llmtune_quantization
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert same_bits(ours[key], theirs[key]), key
    assert torch.equal(logits(loaded, tokens), before)


def test_nf4_safetensors_layout(tmp_path) -> None:
    from safetensors import safe_open

    q = llmtune.get_quantizer("nf4")
    saved = q.save(q.quantize(tiny_llama()), tmp_path / "q")
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.0.self_attn.q_proj.weight"
        assert {prefix, f"{prefix}.absmax", f"{prefix}.quant_map", f"{prefix}.nested_absmax",
                f"{prefix}.nested_quant_map", f"{prefix}.quant_state.bitsandbytes__nf4"} <= keys
        assert f.get_tensor(prefix).shape == (64 * 64 // 2, 1) and f.get_tensor(prefix).dtype == torch.uint8
        assert f.get_tensor(f"{prefix}.absmax").dtype == torch.uint8  # double-quantized: one byte per block
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    # compute_dtype="auto" on CPU is float32, and the resolved value is what gets saved
    assert (config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"], config["bnb_4bit_compute_dtype"]) == (
        "nf4", True, "float32"
    )
    assert json.loads((saved / RECORD_FILE).read_text())["resolved"] == {"compute_dtype": "float32"}


@pytest.mark.parametrize(("name", "options"), [("nf4", {}), ("fp4", {"double_quant": False}), ("int8", {}),
                                               ("nf4", {"skip_modules": ["lm_head", "up_proj"]})])
def test_load_time_quantization_with_hf_config_equals_quantize(tmp_path, base, tokens, name, options) -> None:
    base.save_pretrained(tmp_path / "fp32")
    q = llmtune.get_quantizer(name, **options)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", quantization_config=q.hf_quantization_config(), device_map="cpu", dtype=torch.float32
    )
    ours = q.quantize(copy.deepcopy(base))
    a, b = ours.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert same_bits(a[key], b[key]), key
    # llmtune's loader (llmtune.models.loading) puts a load-time-quantized model through the same kernel guard
    guard_4bit_model(loaded)
    assert torch.equal(logits(ours, tokens), logits(loaded, tokens))


def test_errors_say_what_is_wrong(tmp_path, base) -> None:
    nf4 = llmtune.get_quantizer("nf4")
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module"):
        nf4.quantize("not a model")
    with pytest.raises(LlmtuneError, match=r"no torch\.nn\.Linear layer left"):
        llmtune.get_quantizer("nf4", skip_modules=["model", "lm_head"]).quantize(copy.deepcopy(base))
    model = nf4.quantize(copy.deepcopy(base))
    with pytest.raises(LlmtuneError, match="already quantized"):
        nf4.quantize(model)
    with pytest.raises(LlmtuneError, match="call quantize"):
        nf4.save(copy.deepcopy(base), tmp_path / "plain")
    with pytest.raises(LlmtuneError, match=r"quantized with 'nf4'.*get_quantizer\('nf4'\)"):
        llmtune.get_quantizer("fp4").save(model, tmp_path / "x")
    saved = nf4.save(model, tmp_path / "nf4")
    with pytest.raises(LlmtuneError, match="quantized with 'nf4'"):
        llmtune.get_quantizer("int8").load(saved)
    with pytest.raises(ConfigError, match=re.escape(RECORD_FILE)):
        nf4.load(tmp_path)
    with pytest.raises(GPURequiredError, match=r"has_fp16_weights=True needs .* CUDA"):
        llmtune.get_quantizer("int8", has_fp16_weights=True).quantize(copy.deepcopy(base))


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_peft_lora_trains_on_quantized_layers(base, tokens, name) -> None:
    peft = pytest.importorskip("peft")
    q = llmtune.get_quantizer(name)
    assert q.trainable
    model = q.quantize(copy.deepcopy(base))
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj", "down_proj"]))
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.base_layer, bnb.nn.Linear4bit if name == "nf4" else bnb.nn.Linear8bitLt)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(n.split(".")[-2] in ("lora_A", "lora_B") or "lora_" in n for n in grads)
        assert all(g is not None for g in grads.values())
        assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # the quantized base weights did not move
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_saved_dir_loads_in_plain_transformers(tmp_path, tokens) -> None:
    q = llmtune.get_quantizer("fp4", compute_dtype="float32")
    model = q.quantize(tiny_llama(seed=5))
    saved = q.save(model, Path(tmp_path) / "fp4")
    plain = transformers.AutoModelForCausalLM.from_pretrained(saved, device_map="cpu")
    assert isinstance(plain.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(same_bits(ours[k], theirs[k]) for k in ours)
    # plain transformers runs whatever kernel bitsandbytes picks for this CPU; with llmtune's guard on top
    # (which llmtune's own loaders apply) the outputs are the quantized model's, bit for bit
    guard_4bit_model(plain)
    assert torch.equal(logits(plain, tokens), logits(model, tokens))
