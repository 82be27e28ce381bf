"""bitsandbytes quantizers on a CUDA GPU: quantize on the device, CPU/CUDA format parity, save/load across devices."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import llmtune  # noqa: E402

pytestmark = pytest.mark.gpu


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8"])
def test_quantize_on_cuda_stays_on_cuda_and_close_to_fp32(name) -> None:
    base = tiny_llama().to("cuda")
    tokens = torch.randint(0, 256, (2, 16), device="cuda")
    reference = logits(base, tokens)
    model = llmtune.get_quantizer(name).quantize(copy.deepcopy(base))
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.device.type == "cuda"
    record = model.llmtune_quantization
    assert record["quantized_on"] == "cuda"
    if name != "int8":
        expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        assert record["resolved"] == {"compute_dtype": expected}
        assert layer.compute_dtype == getattr(torch, expected)
    err = float((logits(model, tokens) - reference).norm() / reference.norm())
    assert err < (0.05 if name == "int8" else 0.3)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cpu_and_cuda_write_the_same_format(quant_type, double_quant) -> None:
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    cpu, cpu_state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                  compress_statistics=double_quant)
    gpu, gpu_state = bnb.functional.quantize_4bit(w.cuda(), blocksize=64, quant_type=quant_type,
                                                  compress_statistics=double_quant)
    same = (cpu.reshape(-1) == gpu.cpu().reshape(-1)).float().mean().item()
    assert same > 0.9999, f"only {same:.6f} of the packed bytes agree"
    a = bnb.functional.dequantize_4bit(cpu, cpu_state)
    b = bnb.functional.dequantize_4bit(gpu, gpu_state).cpu()
    assert float((a - b).abs().max()) <= 0.5 * float(w.abs().max())  # at most a rare one-step difference
    # CUDA-quantized bytes decode on CPU to what CUDA decodes them to
    gpu_state_cpu = copy.deepcopy(gpu_state)
    gpu_state_cpu.to("cpu")
    assert torch.allclose(bnb.functional.dequantize_4bit(gpu.cpu(), gpu_state_cpu), b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_save_on_cuda_load_on_cpu_and_back(tmp_path, name) -> None:
    q = llmtune.get_quantizer(name)
    model = q.quantize(tiny_llama().to("cuda"))
    tokens = torch.randint(0, 256, (2, 16))
    before = logits(model, tokens.cuda())
    saved = q.save(model, tmp_path / name)
    again = q.load(saved, device_map="cuda")
    assert torch.equal(logits(again, tokens.cuda()), before)
    on_cpu = q.load(saved, device_map="cpu")
    sd_gpu, sd_cpu = model.state_dict(), on_cpu.state_dict()
    for key in sd_gpu:
        assert torch.equal(sd_gpu[key].cpu(), sd_cpu[key]), key
    assert torch.allclose(logits(on_cpu, tokens), before.cpu(), rtol=0.05, atol=0.05)


def test_int8_fp16_weights_mode_runs_on_cuda() -> None:
    model = llmtune.get_quantizer("int8", has_fp16_weights=True).quantize(tiny_llama().to("cuda"))
    assert logits(model, torch.randint(0, 256, (1, 8), device="cuda")).isfinite().all()


def test_qlora_step_on_cuda() -> None:
    peft = pytest.importorskip("peft")
    model = llmtune.get_quantizer("nf4").quantize(tiny_llama().to("cuda"))
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    tokens = torch.randint(0, 256, (2, 16), device="cuda")
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
