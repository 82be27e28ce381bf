"""`llmtune.export` on tiny trained adapters (CPU): GGUF read back with gguf.GGUFReader, merged HF safetensors,
QLoRA merged into the dequantized base, Ollama Modelfile, manifest, refusals, the CLI — and, where
llama-cpp-python is installed (``nox -s llamacpp``), llama.cpp's greedy tokens against transformers'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

import llmtune  # noqa: E402
from llmtune.core.manifest import manifest_problems  # noqa: E402
from llmtune.export import ExportError, check_vllm, export  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A small Llama with grouped-query attention (4 query heads, 2 KV heads), so the q/k permutation is exercised.
SMALL = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
FAST = {"rank": 4, "alpha": 8, "lr": 2e-2, "batch_size": 4, "warmup": 0, "eval_examples": 0, "progress": False,
        "max_length": 96, "max_steps": 3, "template": "llama3", "dropout": 0.0}
PROMPT = [{"role": "user", "content": "What is Kopi O Kosong?"}]
REQUIRE_LLAMACPP = os.environ.get("LLMTUNE_REQUIRE_LLAMACPP") == "1"


def _make_run(root: Path, tok: Any, *, pretrain_steps: int = 0, **options: Any) -> Path:
    """A base model saved to ``root/base`` and a LoRA run in ``root/run`` (3 steps on kopitiam orders)."""
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model, pretrain

    model = build_tiny_model(tok, seed=0, **SMALL)
    if pretrain_steps:
        pretrain(model, tok, steps=pretrain_steps, seed=0)
    model.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    model.name_or_path = str(root / "base")
    train, _ = split_instructions()
    llmtune.get_trainer("lora", **{**FAST, **options}).train(model, train[:16], tokenizer=tok,
                                                             output_dir=root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def run(tok: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make_run(tmp_path_factory.mktemp("lora"), tok, pretrain_steps=100)
    finally:
        torch.set_num_threads(before)


def _reference_merged(run: Path) -> Any:
    """The merged model computed here with PEFT directly (base + adapter, merge_and_unload), float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(run.parent / "base"), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run / "adapter")).merge_and_unload().eval()


def _hf_unpermute(w: Any, n_head: int) -> Any:
    """transformers' own q/k permutation (convert_llama_weights_to_hf.permute): interleaved -> rotate-half."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def test_gguf_f16_reads_back_with_expected_names_shapes_dtypes_weights_and_metadata(run: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    result = export(run, tmp_path / "out", format="gguf", dtype="f16", progress=lambda s, d, t: stages.append(s))
    path = tmp_path / "out" / "model-f16.gguf"
    assert {"convert tensors", "manifest"} <= set(stages)
    assert result.info["streamed"] is True   # LoRA folded in tensor by tensor; no model was loaded
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    merged = _reference_merged(run)
    sd = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    expected = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
    for i in range(SMALL["num_hidden_layers"]):
        for g, h in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                     ("ffn_norm", "post_attention_layernorm")):
            expected[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    assert set(tensors) == set(expected)
    heads = {"attn_q": SMALL["num_attention_heads"], "attn_k": SMALL["num_key_value_heads"]}
    for name, hf_name in expected.items():
        t, want = tensors[name], sd[hf_name]
        assert tuple(int(x) for x in t.shape[::-1]) == want.shape, name    # GGUF lists dims fastest first
        data = np.asarray(t.data).reshape(want.shape)
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(data, want)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if kind in heads:
            data = _hf_unpermute(data, heads[kind])
        np.testing.assert_array_equal(data, want.astype(np.float16), err_msg=name)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == len(tok) and all(tokens[i] == t for t, i in tok.get_vocab().items())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.convert_tokens_to_ids("<|eot_id|>")] == int(gguf.TokenType.CONTROL)
    assert types[300] == int(gguf.TokenType.NORMAL)
    assert len(_field(reader, "tokenizer.ggml.merges")) > 100
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|eot_id|>")
    template = _field(reader, "tokenizer.chat_template")
    from llmtune.data import render_prompt

    rendered = tok.apply_chat_template(PROMPT, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert rendered == render_prompt({"instruction": PROMPT[0]["content"], "output": "x"}, "llama3", tok)[0]
    assert result.info["merged_into"].startswith("full-precision base")
    assert manifest_problems(tmp_path / "out") == []


def test_merged_weights_include_the_adapter(run: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(run.parent / "base"), dtype=torch.float32)
    merged = _reference_merged(run)
    with torch.no_grad():
        diff = (merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight).abs().max()
    assert float(diff) > 1e-4


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "bf16"])
def test_gguf_quantized_tensors_equal_ggufs_reference_quantizers(run: Path, tmp_path: Path, dtype: str) -> None:
    export(run, tmp_path / dtype, format="gguf", dtype=dtype)
    reader = gguf.GGUFReader(str(tmp_path / dtype / f"model-{dtype}.gguf"))
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    merged = _reference_merged(run).state_dict()
    tensors = {t.name: t for t in reader.tensors}
    for name, hf_name in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                          ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                          ("output.weight", "lm_head.weight")):
        t = tensors[name]
        assert t.tensor_type == qtype, name
        want = gguf.quants.quantize(merged[hf_name].numpy(), qtype)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_hf_export_loads_in_transformers_with_the_training_template(run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.data import render_prompt

    result = export(run, tmp_path / "hf", format="hf", dtype="f32")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ref = _reference_merged(run)
    ids = torch.tensor([tok("What is Kopi O Kosong?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    prompt = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert prompt == render_prompt({"instruction": PROMPT[0]["content"], "output": "x"}, "llama3", tok)[0]
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|eot_id|>") in (eos if isinstance(eos, list) else [eos])
    assert set(result.files) >= {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                                 "export.json"}
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["format"] == "hf"
    # readable by transformers 4.x too: no TokenizersBackend class, special tokens under the 4.x key
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in config
    assert "<|eot_id|>" in config["additional_special_tokens"]


def test_qlora_merge_into_the_dequantized_base_matches_the_adapter_on_the_4bit_base(tok: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _make_run(tmp_path / "q", tok, quantizer=llmtune.get_quantizer("nf4"))
    result = export(run, tmp_path / "hf", format="hf", dtype="f32")
    assert result.info["merged_into"].startswith("dequantized nf4 base")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(run.parent / "base"), dtype=torch.float32)
    on_4bit = PeftModel.from_pretrained(llmtune.get_quantizer("nf4").quantize(base), str(run / "adapter")).eval()
    naive_base = AutoModelForCausalLM.from_pretrained(str(run.parent / "base"), dtype=torch.float32)
    naive = PeftModel.from_pretrained(naive_base, str(run / "adapter")).merge_and_unload().eval()
    ids = torch.tensor([tok("What is Kopi O Kosong? Black coffee, no sugar.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = on_4bit(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        naive_logits = naive(input_ids=ids).logits
    print(json.dumps({"qlora_max_abs_logit_diff": {"dequantized_base_merge": float((got - want).abs().max()),
                                                   "full_precision_base_merge": float((naive_logits - want).abs().max())}}))
    assert float((got - want).abs().max()) < 1e-3
    # merging into the original full-precision weights instead is visibly further from what was trained
    assert float((naive_logits - want).abs().max()) > 10 * float((got - want).abs().max())


def test_hf_export_can_requantize_through_the_quantizer_interface(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    result = export(run, tmp_path / "nf4", format="hf", dtype="f32", requantize="nf4")
    assert "nf4" in result.info["requantized"]
    model = llmtune.get_quantizer("nf4").load(tmp_path / "nf4")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ref = llmtune.get_quantizer("nf4").quantize(_reference_merged(run))
    ids = torch.tensor([[0, 3, 100, 200, 4]])
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_ollama_modelfile_has_the_training_template_and_stop_tokens(run: Path, tmp_path: Path) -> None:
    result = export(run, tmp_path / "ol", format="ollama", dtype="q8_0")
    text = (tmp_path / "ol" / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert 'PARAMETER stop "<|eot_id|>"' in text and 'PARAMETER stop "<|end_of_text|>"' in text
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text
    assert set(result.files) == {"Modelfile", "model-q8_0.gguf", "export.json"}
    assert set(json.loads((tmp_path / "ol" / "manifest.json").read_text())["files"]) == set(result.files)


def test_refuses_to_write_into_or_over_the_source(run: Path, tmp_path: Path) -> None:
    for bad in (run, run / "adapter" / "x", run.parent, run.parent / "base"):
        with pytest.raises(ExportError, match="overlaps the input"):
            export(run, bad, format="gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(run, tmp_path / "full", format="gguf")


def test_manifest_detects_a_changed_file(run: Path, tmp_path: Path) -> None:
    export(run, tmp_path / "m", format="gguf", dtype="q4_0")
    assert manifest_problems(tmp_path / "m") == []
    with open(tmp_path / "m" / "model-q4_0.gguf", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert manifest_problems(tmp_path / "m") == ["model-q4_0.gguf: checksum mismatch (contents altered)"]


def test_cli_export_and_vllm_check(run: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(llmtune.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "llmtune.cli.main", "export"]
    done = subprocess.run([*cli, str(run), "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "c"),
                           "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["format"] == "gguf" and len(summary["files"]["model-q8_0.gguf"]) == 64
    assert manifest_problems(tmp_path / "c") == []
    check = subprocess.run([*cli, str(run), "--check", "vllm"], capture_output=True, text=True, env=env, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "vLLM will load" in check.stdout
    bad = subprocess.run([*cli, str(run), "--format", "gguf", "--out", str(run / "x")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "overlaps the input" in bad.stderr


def test_the_run_passes_the_vllm_check(run: Path) -> None:
    assert check_vllm(run) == []


# ---------------------------------------------------------------------------------------------- llama.cpp
def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        if REQUIRE_LLAMACPP:
            pytest.fail(f"LLMTUNE_REQUIRE_LLAMACPP=1 but llama-cpp-python is not importable ({exc})")
        pytest.skip("llama-cpp-python is not installed (nox -s llamacpp builds it)")
    return llama_cpp


def _hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding (argmax of each full forward): no logits processors, no stop tokens."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def test_llamacpp_loads_the_gguf_and_greedy_tokens_match_transformers(run: Path, tmp_path: Path) -> None:
    llama_cpp = _llama_cpp()
    from transformers import AutoTokenizer

    from llmtune.export.chat import JINJA

    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    text = tok.apply_chat_template(PROMPT, chat_template=JINJA["llama3"], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    merged = _reference_merged(run)
    with torch.no_grad():  # the f16 model: weights rounded to f16, computed in f32 (as llama.cpp does)
        for p in merged.parameters():
            p.copy_(p.half().float())
    want = _hf_greedy(merged, ids, 16)
    agree = {}
    for dtype in ("f16", "q8_0", "q4_0"):   # q4_0: counted, not asserted
        export(run, tmp_path / dtype, format="gguf", dtype=dtype)
        llm = llama_cpp.Llama(model_path=str(tmp_path / dtype / f"model-{dtype}.gguf"), n_ctx=256, n_threads=1,
                              verbose=False, logits_all=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        got = _llama_greedy(llm, ids, 16)
        llm.reset()
        llm.eval(ids + want)  # teacher-forced: llama.cpp's argmax after each of transformers' tokens
        forced = np.asarray(llm.scores[len(ids) - 1: len(ids) + 15]).argmax(-1).tolist()
        agree[dtype] = {"free_running_prefix": next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 16),
                        "teacher_forced": sum(a == b for a, b in zip(forced, want))}
    print(json.dumps({"llamacpp_vs_transformers": agree, "tokens": want}))
    assert agree["f16"]["free_running_prefix"] == 16
    assert agree["q8_0"]["teacher_forced"] >= 12


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_dequantize_model_recovers_the_weights_within_the_quantization_step(tok: Any, method: str) -> None:
    pytest.importorskip("bitsandbytes")
    from llmtune.export.merge import dequantize_model
    from llmtune.models.tiny import build_tiny_model

    original = build_tiny_model(tok, seed=0, **SMALL)
    w = original.model.layers[0].mlp.up_proj.weight.detach().clone()
    quantized = llmtune.get_quantizer(method).quantize(build_tiny_model(tok, seed=0, **SMALL))
    assert dequantize_model(quantized) == 7 * SMALL["num_hidden_layers"]
    layer = quantized.model.layers[0].mlp.up_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    err = (layer.weight.detach() - w).abs()
    if method == "int8":   # row-wise absmax int8: half a step of max|row| / 127 (+ float16 rounding on the way)
        bound = w.abs().amax(dim=1, keepdim=True) / 127 * 0.55
    else:                  # nf4 blocks of 64: at most half the widest gap of the NF4 code (~0.16) times the absmax
        bound = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True).repeat_interleave(64).reshape(w.shape) * 0.17
    assert bool((err <= bound).all())
    assert not hasattr(quantized.config, "quantization_config")


# ---------------------------------------------------------------------------------------------- families
def _family_model(tok: Any, family: str, tied: bool, **overrides: Any) -> Any:
    """A random tiny model of ``family`` (weights spread wide enough that logits differ clearly between tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=len(tok), max_position_embeddings=256, rms_norm_eps=1e-5,
                                  initializer_range=0.2, tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  **{**SMALL, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("mistral", False), ("qwen2", True)])
def test_families_write_every_tensor_under_its_llamacpp_name(tok: Any, tmp_path: Path, family: str,
                                                             tied: bool) -> None:
    model = _family_model(tok, family, tied)
    model.save_pretrained(str(tmp_path / "model"))
    tok.save_pretrained(str(tmp_path / "model"))
    result = export(tmp_path / "model", tmp_path / "out", format="gguf", dtype="f16")
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model-f16.gguf"))
    names = {t.name for t in reader.tensors}
    arch = "qwen2" if family == "qwen2" else "llama"
    assert _field(reader, "general.architecture") == arch
    assert ("output.weight" in names) is not tied
    biases = {n for n in names if n.endswith(".bias")}
    want_biases = {f"blk.{i}.attn_{x}.bias" for i in range(2) for x in "qkv"} if family == "qwen2" else set()
    assert biases == want_biases
    n_params = sum(1 for k in model.state_dict() if not (tied and k == "lm_head.weight"))
    assert len(names) == n_params
    assert result.info["merged_into"].startswith("no adapter")
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template   # no run: the tokenizer's own template


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
LLAMACPP_FAMILIES = [("llama", False, {}), ("mistral", False, {}), ("qwen2", True, {}),
                     ("llama", True, {"rope_parameters": LLAMA31_ROPE}), ("qwen3", False, {"head_dim": 32}),
                     ("gemma2", True, {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16}),
                     ("gemma3_text", True, {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16}),
                     ("phi3", False, {})]


@pytest.mark.parametrize(("family", "tied", "overrides"), LLAMACPP_FAMILIES,
                         ids=["llama", "mistral", "qwen2", "llama3.1-rope", "qwen3", "gemma2", "gemma3", "phi3"])
def test_llamacpp_logits_match_transformers_for_each_family(tok: Any, tmp_path: Path, family: str,
                                                            tied: bool, overrides: dict[str, Any]) -> None:
    llama_cpp = _llama_cpp()
    model = _family_model(tok, family, tied, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(str(tmp_path / "model"))
    tok.save_pretrained(str(tmp_path / "model"))
    export(tmp_path / "model", tmp_path / "out", format="gguf", dtype="f16")
    ids = tok("Kopi O Kosong is black coffee without sugar, and Teh C is tea with milk.",
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model-f16.gguf"), n_ctx=128, n_threads=1,
                          verbose=False, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    diff = float(np.abs(got - want).max())
    agree = int((got.argmax(-1) == want.argmax(-1)).sum())
    print(json.dumps({"family": family, **overrides, "positions": len(ids), "argmax_agree": agree,
                      "max_abs_logit_diff": diff,
                      "logit_std": float(want.std())}))
    assert diff < 0.05 * float(want.std())
    for pos in np.flatnonzero(got.argmax(-1) != want.argmax(-1)):   # only near-ties may flip
        row = want[pos]
        assert row.max() - row[got[pos].argmax()] <= 2 * diff, f"position {pos}"


# ---------------------------------------------------------------------------------------------- pre-tokenizers
TRICKY = "In 2024 I'd order 12345 kopi-o's,\n\n  then   TEH C!! We'll see... don't 7up"


def _bpe_tokenizer(pre: str) -> Any:
    """A byte-level BPE trained on the bundled corpus with the pre-tokenizer of gpt-2, llama-bpe (Llama 3) or qwen2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmtune.export.to_gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT
    from llmtune.models.tiny import BOS, EOS, PAD, SPECIAL_TOKENS, bundled_corpus

    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        split = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*bundled_corpus(), TRICKY.replace("2024", "1999")], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(SPECIAL_TOKENS[3:]))


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_pre_tokenizer_is_named_and_llamacpp_tokenizes_like_transformers(tmp_path: Path, pre: str) -> None:
    tok = _bpe_tokenizer(pre)
    model = _family_model(tok, "llama", False)
    model.save_pretrained(str(tmp_path / "model"))
    tok.save_pretrained(str(tmp_path / "model"))
    result = export(tmp_path / "model", tmp_path / "out", format="gguf", dtype="q8_0")
    assert result.info["pre_tokenizer"] == pre
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model-q8_0.gguf"))
    assert _field(reader, "tokenizer.ggml.pre") == pre
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model-q8_0.gguf"), n_ctx=128, verbose=False,
                          vocab_only=True)
    text = "<|start_header_id|>user<|end_header_id|>\n\n" + TRICKY + "<|eot_id|>"
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == want
    assert llm.detokenize(want, special=True).decode() == text


def test_prompt_tuning_run_cannot_be_merged_and_says_so(tok: Any, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "pt", tok, method="prompt_tuning", num_virtual_tokens=4)
    with pytest.raises(ExportError, match="PROMPT_TUNING adapter has no weights to merge"):
        export(run, tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()


def test_dora_run_exports_from_its_checkpoint_adapter(tok: Any, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "dora", tok, method="dora", save_every=2)
    adapter = run / "checkpoints" / "step-000002" / "adapter"
    result = export(adapter, tmp_path / "out", format="gguf", dtype="f16")
    assert result.info["template"] == "llama3"      # found in the run's config.json, three levels up
    assert result.info["adapter"] == str(adapter.resolve())
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "out" / "model-f16.gguf")).tensors}
    assert "blk.0.attn_q.weight" in names and not any("lora" in n or "magnitude" in n for n in names)


# ---------------------------------------------------------------------------------------------- k-quants, GGUF LoRA
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}   # k-quant blocks hold 256 weights: rows must be that long


def test_kquant_without_llama_cpp_names_the_requirement(run: Path, tmp_path: Path) -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        with pytest.raises(ExportError, match="pip install llama-cpp-python"):
            export(run, tmp_path / "k", format="gguf", dtype="q4_k_m")
        assert not (tmp_path / "k").exists()
        return
    pytest.skip("llama-cpp-python is installed: the k-quant tests below run instead")


@pytest.mark.parametrize(("dtype", "kind"), [("q4_k_m", "Q4_K"), ("q5_k_m", "Q5_K"), ("q6_k", "Q6_K")])
def test_llamacpp_kquants_of_a_merged_lora_dequantize_to_the_merged_weights(tok: Any, tmp_path: Path, dtype: str,
                                                                  kind: str) -> None:
    llama_cpp = _llama_cpp()
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    model = build_tiny_model(tok, seed=0, **WIDE)
    model.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    model.name_or_path = str(tmp_path / "base")
    llmtune.get_trainer("lora", **{**FAST, "max_steps": 2}).train(model, split_instructions()[0][:8], tokenizer=tok,
                                                                 output_dir=tmp_path / "run")
    result = export(tmp_path / "run", tmp_path / dtype, format="gguf", dtype=dtype)
    assert result.info["quantized_by"].startswith("llama.cpp")
    assert sorted(p.name for p in (tmp_path / dtype).iterdir()) == ["export.json", "manifest.json",
                                                                    f"model-{dtype}.gguf"]
    reader = gguf.GGUFReader(str(tmp_path / dtype / f"model-{dtype}.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    merged = _reference_merged(tmp_path / "run").state_dict()
    qtype = gguf.GGMLQuantizationType[kind]
    t = tensors["blk.0.ffn_up.weight"]
    assert t.tensor_type == qtype
    want = merged["model.layers.0.mlp.up_proj.weight"].numpy()
    got = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(want.shape)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    bits = {"Q4_K": 4, "Q5_K": 5, "Q6_K": 6}[kind]
    print(json.dumps({"dtype": dtype, "ffn_up_max_rel_error": rel,
                      "types": sorted({tensors[n].tensor_type.name for n in tensors})}))
    assert rel < 2.0 ** (1 - bits)      # within a step of the 2^bits-level grid over the block's range
    llm = llama_cpp.Llama(model_path=str(tmp_path / dtype / f"model-{dtype}.gguf"), n_ctx=64, n_threads=1,
                          verbose=False)
    assert len(llm.tokenize(b"Kopi O", add_bos=False)) > 0


def test_llamacpp_gguf_lora_on_the_base_computes_what_the_merged_gguf_computes(run: Path, tmp_path: Path) -> None:
    llama_cpp = _llama_cpp()
    export(run, tmp_path / "lora", format="gguf-lora", dtype="f16")
    export(run.parent / "base", tmp_path / "base", format="gguf", dtype="f16")
    export(run, tmp_path / "merged", format="gguf", dtype="f16")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    ids = tok("What is Kopi O Kosong? Black coffee, no sugar.", add_special_tokens=False)["input_ids"]
    scores = {}
    for name, kwargs in (("merged", {"model_path": str(tmp_path / "merged" / "model-f16.gguf")}),
                         ("base+lora", {"model_path": str(tmp_path / "base" / "model-f16.gguf"),
                                        "lora_path": str(tmp_path / "lora" / "adapter-f16.gguf")}),
                         ("base", {"model_path": str(tmp_path / "base" / "model-f16.gguf")})):
        llm = llama_cpp.Llama(n_ctx=64, n_threads=1, verbose=False, logits_all=True, **kwargs)
        llm.eval(ids)
        scores[name] = np.asarray(llm.scores[: len(ids)])
    lora_vs_merged = float(np.abs(scores["base+lora"] - scores["merged"]).max())
    base_vs_merged = float(np.abs(scores["base"] - scores["merged"]).max())
    print(json.dumps({"gguf_lora_vs_merged_max_abs_logit_diff": lora_vs_merged,
                      "base_without_lora_vs_merged": base_vs_merged}))
    assert lora_vs_merged < 0.1 * base_vs_merged


# ---------------------------------------------------------------------------------------------- SentencePiece
def _sentencepiece_bpe_tokenizer() -> Any:
    """A Llama-2-style SentencePiece BPE (tokenizer.json form): "\u2581" for spaces, byte fallback, <s> added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llmtune.models.tiny import bundled_corpus

    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(bundled_corpus(), trainer=trainers.BpeTrainer(vocab_size=700, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_tokenizer_is_written_as_llama_vocab_and_llamacpp_tokenizes_like_transformers(
        tmp_path: Path) -> None:
    tok = _sentencepiece_bpe_tokenizer()
    model = _family_model(tok, "llama", False)
    model.save_pretrained(str(tmp_path / "model"))
    tok.save_pretrained(str(tmp_path / "model"))
    result = export(tmp_path / "model", tmp_path / "out", format="gguf", dtype="f16")
    assert result.info["tokenizer"] == "llama" and result.info["add_bos_token"] is True
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model-f16.gguf"))
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[0] == types[1] == int(gguf.TokenType.CONTROL)   # special added tokens (<unk> too, as the converter)
    assert types[3 + 0x41] == int(gguf.TokenType.BYTE) and types[300] == int(gguf.TokenType.NORMAL)
    scores = _field(reader, "tokenizer.ggml.scores")
    assert len(scores) == len(tok) and len(set(scores[259:])) > 100   # merge ranks, not one constant
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model-f16.gguf"), n_ctx=128, verbose=False,
                          vocab_only=True)
    for text in (TRICKY, "Kopi-\u00f6 \u5496\u5561 with  two spaces", " leading space", "</s> inside"):
        want = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
        assert llm.detokenize(want).decode() == tok.decode(want, skip_special_tokens=True), text


def test_gguf_export_of_a_lora_run_streams_without_building_a_model(run: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the streamed export built a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    result = export(run, tmp_path / "s", format="gguf", dtype="q8_0")
    assert result.info["streamed"] is True and result.info["merged_into"] == "full-precision base (W + BA)"
