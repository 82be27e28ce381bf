"""The 4-bit kernel guard, proven on any CPU by simulating bitsandbytes kernels (a faulty one and a sound one).

The faulty kernel reproduces bitsandbytes 0.50.2's AVX-512 CPU fault: every row restarts the block count, so
when a row is not a whole number of blocks each value past the first row is scaled by the wrong absmax; and
its inference forward fails for input widths that are not a multiple of 64. The sound kernel computes what
the format says. Either replaces bitsandbytes' own for the test, whatever this CPU's kernel does.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from cpu_paths import CALLS, FAULTY, row_restart_dequantize, simulate_4bit_kernel  # noqa: E402

import llmtune  # noqa: E402
from llmtune.quantizers import bnb_guard  # noqa: E402
from llmtune.quantizers.bnb_guard import reference_dequantize_4bit  # noqa: E402

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py


def _kernel(monkeypatch, faulty: bool) -> None:
    simulate_4bit_kernel(monkeypatch, faulty)


@pytest.fixture
def faulty_kernel(monkeypatch):
    _kernel(monkeypatch, faulty=True)
    yield
    bnb_guard.clear_cache()


@pytest.fixture
def sound_kernel(monkeypatch):
    _kernel(monkeypatch, faulty=False)
    yield
    bnb_guard.clear_cache()


def tiny_llama(intermediate: int = 96) -> transformers.LlamaForCausalLM:
    """hidden 64, MLP 96: down_proj rows (96 wide) are not whole blocks of 64; every other row is."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def reference_logits(model, tokens):
    """The model's logits with every 4-bit layer computed as F.linear(x, reference weight)."""
    ref = copy.deepcopy(model)
    for module in list(ref.modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            module.__class__ = bnb_guard.reference_linear4bit_class()
    with torch.no_grad():
        return ref(input_ids=tokens).logits


TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def test_the_simulated_fault_is_the_reported_one(faulty_kernel) -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    err = (bnb.functional.dequantize_4bit(packed, state) - w).abs().reshape(-1)
    blocks = state.absmax.repeat_interleave(64)
    assert float((err / blocks).max()) > 0.5  # absmax-scale errors, as seen on AVX-512 (a sound kernel: < 0.2)
    whole = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(whole, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state), reference_dequantize_4bit(packed, state))


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_faulty_kernel_layers_are_routed_and_compute_the_right_thing(faulty_kernel, name) -> None:
    model = llmtune.get_quantizer(name).quantize(tiny_llama())
    report = model.llmtune_kernel_check
    assert sorted(report["routed"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    bad = [v for v in report["verdicts"] if not v["ok"]]
    assert len(bad) == 1 and "of a block's absmax" in bad[0]["cause"] and "blocksize 32 divides in_features=96" in \
        bad[0]["cause"]
    routed = model.model.layers[0].mlp.down_proj
    assert isinstance(routed, bnb.nn.Linear4bit) and type(routed) is not bnb.nn.Linear4bit  # PEFT still sees it
    with torch.no_grad():
        got = model(input_ids=TOKENS).logits
    assert torch.equal(got, reference_logits(model, TOKENS))
    # without the guard the same model computes with the faulty kernel (in training mode: inference would crash)
    for layer in (model.model.layers[i].mlp.down_proj for i in range(2)):
        layer.__class__ = bnb.nn.Linear4bit
    model.train()
    with torch.no_grad():
        unguarded = model(input_ids=TOKENS).logits
    assert float((unguarded - got).abs().max()) > 1e-2


def test_inference_crash_is_caught_even_when_dequantization_is_right(monkeypatch, sound_kernel) -> None:
    FAULTY["on"] = True  # dequantize sound, inference forward failing for in_features % 64 (the nf4 crash)
    model = llmtune.get_quantizer("nf4", blocksize=32).quantize(tiny_llama())
    report = model.llmtune_kernel_check
    assert sorted(report["routed"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "inference forward raised RuntimeError" in next(v["cause"] for v in report["verdicts"] if not v["ok"])
    with torch.no_grad():
        model(input_ids=TOKENS)  # runs


def test_sound_kernel_routes_nothing_and_the_check_is_cached(sound_kernel) -> None:
    model = llmtune.get_quantizer("nf4").quantize(tiny_llama())
    assert model.llmtune_kernel_check["routed"] == []
    assert all(type(m) is bnb.nn.Linear4bit for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    kinds = len(model.llmtune_kernel_check["verdicts"])
    assert kinds == 4  # q/o (64x64), k/v (32x64), gate/up (96x64), down (64x96): 4 classes for 14 layers
    calls = CALLS["n"]
    again = llmtune.get_quantizer("nf4").quantize(tiny_llama())  # same shapes: no new check
    assert again.llmtune_kernel_check["routed"] == [] and CALLS["n"] == calls


def test_save_and_load_apply_the_guard(tmp_path, faulty_kernel) -> None:
    q = llmtune.get_quantizer("nf4")
    model = q.quantize(tiny_llama())
    with torch.no_grad():
        before = model(input_ids=TOKENS).logits
    saved = q.save(model, tmp_path / "q")
    bnb_guard.clear_cache()
    loaded = q.load(saved)
    assert sorted(loaded.llmtune_kernel_check["routed"]) == sorted(model.llmtune_kernel_check["routed"])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=TOKENS).logits, before)


def test_load_time_quantization_through_llmtune_loader_is_guarded(tmp_path, faulty_kernel, tok) -> None:
    from llmtune.models.loading import load_model_and_tokenizer

    tiny_llama().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    q = llmtune.get_quantizer("nf4")
    model, _ = load_model_and_tokenizer(tmp_path / "m", quantization_config=q.hf_quantization_config(),
                                        device_map="cpu", dtype="float32")
    assert sorted(model.llmtune_kernel_check["routed"]) == ["model.layers.0.mlp.down_proj",
                                                            "model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=TOKENS).logits, reference_logits(model, TOKENS))


def test_qlora_trains_through_a_routed_layer(faulty_kernel) -> None:
    peft = pytest.importorskip("peft")
    model = llmtune.get_quantizer("nf4").quantize(tiny_llama())
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["down_proj"]))
    wrapped = model.base_model.model.model.layers[0].mlp.down_proj
    assert type(wrapped.base_layer) is bnb_guard.reference_linear4bit_class()
    model.train()
    loss = model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == 2 and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_reference_dequantization_handles_double_quant_and_storage_dtypes() -> None:
    """Independent of any kernel: the library's reference equals the format's definition (see test_bnb_format)."""
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(2)) * 0.02
    for storage in (torch.uint8, torch.bfloat16):
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True,
                                                     quant_storage=storage)
        deq = reference_dequantize_4bit(packed, state)
        assert deq.shape == w.shape
        blocks = torch.nn.functional.pad(w.reshape(-1), (0, (-w.numel()) % 64)).reshape(-1, 64).abs().amax(1)
        bound = blocks.repeat_interleave(64)[: w.numel()] * (max(b - a for a, b in zip(bnb_guard.NF4_CODE, bnb_guard.NF4_CODE[1:])) / 2 + 0.01)
        assert bool(((deq - w).abs().reshape(-1) <= bound).all())


def test_the_fast_fallback_is_used_only_when_it_is_right(monkeypatch, faulty_kernel) -> None:
    model = llmtune.get_quantizer("nf4").quantize(tiny_llama())
    bad = [v for v in model.llmtune_kernel_check["verdicts"] if not v["ok"]]
    assert [v["fallback"] for v in bad] == ["block-rows"]  # one block per row: the faulty kernel gets it right
    assert model.model.layers[0].mlp.down_proj.llmtune_fallback == "block-rows"

    def always_wrong(packed, quant_state, *args, **kwargs):
        return reference_dequantize_4bit(packed, quant_state) * 1.5

    bnb_guard.clear_cache()
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", always_wrong)
    model = llmtune.get_quantizer("nf4").quantize(tiny_llama())
    report = model.llmtune_kernel_check
    assert len(report["routed"]) == 14 and {v["fallback"] for v in report["verdicts"]} == {"reference"}
    with torch.no_grad():
        assert torch.equal(model(input_ids=TOKENS).logits, reference_logits(model, TOKENS))


def test_dora_on_a_routed_layer_uses_the_checked_weight(faulty_kernel) -> None:
    """PEFT's DoRA reads the base weight to initialise its magnitudes; on a routed layer it gets the right one."""
    peft = pytest.importorskip("peft")
    model = llmtune.get_quantizer("nf4").quantize(tiny_llama())
    layer = model.model.layers[0].mlp.down_proj
    want = reference_dequantize_4bit(layer.weight.data, layer.weight.quant_state).norm(p=2, dim=1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                                       target_modules=["down_proj"]))
    wrapped = model.base_model.model.model.layers[0].mlp.down_proj
    magnitude = wrapped.lora_magnitude_vector["default"].weight.detach()
    assert torch.allclose(magnitude, want, rtol=1e-5, atol=1e-7)
    faulty = row_restart_dequantize(layer.weight.data, layer.weight.quant_state).norm(p=2, dim=1)
    assert not torch.allclose(magnitude, faulty, rtol=1e-3)  # what PEFT would have used without the guard
