"""llmtune's GGUF export against llama.cpp's own ``convert_hf_to_gguf.py``, family by family.

For each family a tiny random model of the real architecture is trained with LoRA for a few steps, the run is
exported as GGUF (streamed: each LoRA pair folded into its weight as it is read) and as merged HF safetensors
(PEFT's ``merge_and_unload``), and llama.cpp's converter is run on the HF export. The two GGUFs must agree on
every metadata key llama.cpp reads, every tensor name, shape and type, and every f16 tensor bit for bit.

The converter comes from the llama-cpp-python sdist (``vendor/llama.cpp``): ``nox -s llamacpp`` downloads it and
sets ``LLMTUNE_LLAMACPP_CONVERTER``; without it these tests skip. Two things are changed in the converter run,
neither touching what is compared: it names BPE pre-tokenizers by hashing the output of the released tokenizers
it knows and refuses any other (a tokenizer trained for a test can never match), so it is told the name; and its
Gemma 2 and Phi-3 classes read only ``tokenizer.model`` (SentencePiece; Phi-3 unless ``tokenizer_class`` is
``GPT2Tokenizer``), so they read the byte-level BPE tokenizer the way its other classes do.
"""

from __future__ import annotations

import copy
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
from llmtune.export import export  # noqa: E402
from llmtune.export.api import portable_tokenizer_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERTER = os.environ.get("LLMTUNE_LLAMACPP_CONVERTER")
REQUIRE = os.environ.get("LLMTUNE_REQUIRE_LLAMACPP") == "1"
SMALL = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
FAST = {"rank": 4, "alpha": 8, "lr": 2e-2, "batch_size": 4, "warmup": 0, "eval_examples": 0, "progress": False,
        "max_length": 64, "max_steps": 2, "template": "chatml", "dropout": 0.0}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
#: family -> (model_type, config overrides): the shapes people fine-tune, at toy size.
FAMILIES = {
    "llama": ("llama", {}),
    "llama3.2-tied": ("llama", {"tie_word_embeddings": True, "rope_parameters": LLAMA31_ROPE}),
    "mistral": ("mistral", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16}),
    "phi3": ("phi3", {}),
}
#: Written by llmtune, not by the converter for these tokenizers: what the HF tokenizer does (llama.cpp's default
#: for a missing add_bos_token is per vocabulary type) and the template's end-of-turn token.
OURS_ONLY = {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.eot_token_id"}
#: Names and provenance (from a model card), not read by llama.cpp when it runs the model.
NAMING = {"general.name", "general.basename", "general.size_label", "general.finetune", "general.version",
          "general.tags", "general.base_model.count", "general.base_model.0.name"}

_WRAPPER = """
import sys
pre = sys.argv[2]
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[1] + "/gguf-py")
from conversion import base, gemma, phi
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
gemma.Gemma2Model.set_vocab = lambda self: self._set_vocab_gpt2()
phi.Phi3MiniModel.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def _converter() -> Path:
    why = None
    if not CONVERTER:
        why = "LLMTUNE_LLAMACPP_CONVERTER is not set (nox -s llamacpp unpacks llama.cpp from the llama-cpp-python sdist)"
    elif not (Path(CONVERTER) / "convert_hf_to_gguf.py").is_file():
        why = f"LLMTUNE_LLAMACPP_CONVERTER={CONVERTER} holds no convert_hf_to_gguf.py"
    else:
        try:
            import sentencepiece  # noqa: F401  (the converter's llama class imports it first)
        except ImportError:
            why = "the converter needs the sentencepiece package"
    if why:
        if REQUIRE:
            pytest.fail(f"LLMTUNE_REQUIRE_LLAMACPP=1 but {why}")
        pytest.skip(why)
    return Path(str(CONVERTER))


def _run_family(root: Path, tok: Any, model_type: str, overrides: dict[str, Any]) -> Path:
    """A random tiny model of ``model_type`` saved to ``root/base``, then a LoRA run on it in ``root/run``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune.data import split_instructions

    if model_type == "qwen2":  # transformers 5 loads a qwen2 directory's tokenizer as Qwen2Tokenizer, which adds
        tok = copy.deepcopy(tok)  # <|endoftext|> to one without it: give it one, as Qwen's own tokenizers have
        tok.add_special_tokens({"unk_token": "<|endoftext|>"})
    # a padded vocabulary, as released models have; Gemma 3's converter cuts the embedding to the tokenizer's size
    vocab = len(tok) if model_type == "gemma3_text" else len(tok) + 8
    config = AutoConfig.for_model(model_type, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                                  initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **{**SMALL, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    portable_tokenizer_config(root / "base")
    model.name_or_path = str(root / "base")
    train, _ = split_instructions()
    llmtune.get_trainer("lora", **FAST).train(model, train[:8], tokenizer=tok, output_dir=root / "run")
    return root / "run"


def _convert(converter: Path, model_dir: Path, out: Path, pre: str) -> None:
    wrapper = out.parent / "convert.py"
    wrapper.write_text(_WRAPPER)
    _run([sys.executable, str(wrapper), str(converter), pre, str(model_dir), "--outfile", str(out), "--outtype", "f16"])


def _run(command: list[str], **env: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr[-3000:]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return kv, {t.name: t for t in reader.tensors}


def gguf_differences(ours: Path, theirs: Path) -> list[str]:
    """Every difference llama.cpp would see between two GGUF files (empty: the same model to llama.cpp)."""
    kv_a, t_a = _read(ours)
    kv_b, t_b = _read(theirs)
    diffs = []
    for key in sorted(set(kv_a) | set(kv_b)):
        if key in NAMING or (key in OURS_ONLY and key not in kv_b):
            continue
        a, b = kv_a.get(key, "<absent>"), kv_b.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}: ours {str(a)[:80]} converter {str(b)[:80]}")
    for name in sorted(set(t_a) | set(t_b)):
        if name not in t_a or name not in t_b:
            diffs.append(f"tensor {name} only in {'ours' if name in t_a else 'the converter'}")
            continue
        a, b = t_a[name], t_b[name]
        if a.tensor_type != b.tensor_type or list(a.shape) != list(b.shape):
            diffs.append(f"tensor {name}: ours {a.tensor_type.name}{list(a.shape)} "
                         f"converter {b.tensor_type.name}{list(b.shape)}")
        elif not np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)):
            diffs.append(f"tensor {name}: data differs")
    return diffs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_equals_llamacpp_converter(tok: Any, tmp_path: Path, name: str) -> None:
    converter = _converter()
    model_type, overrides = FAMILIES[name]
    run = _run_family(tmp_path, tok, model_type, overrides)
    result = export(run, tmp_path / "gguf", format="gguf", dtype="f16")
    assert result.info["streamed"] is True
    export(run, tmp_path / "hf", format="hf", dtype="f32")
    _convert(converter, tmp_path / "hf", tmp_path / "converter.gguf", result.info["pre_tokenizer"])
    diffs = gguf_differences(tmp_path / "gguf" / "model-f16.gguf", tmp_path / "converter.gguf")
    kv, tensors = _read(tmp_path / "gguf" / "model-f16.gguf")
    print(json.dumps({"family": name, "architecture": kv["general.architecture"], "tensors": len(tensors),
                      "keys": len(kv), "differences": diffs}))
    assert diffs == []
    if "rope_parameters" in overrides:
        assert "rope_freqs.weight" in tensors


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_lora_gguf_equals_convert_lora_to_gguf(tok: Any, tmp_path: Path, name: str) -> None:
    converter = _converter()
    model_type, overrides = FAMILIES[name]
    run = _run_family(tmp_path, tok, model_type, overrides)
    result = export(run, tmp_path / "lora", format="gguf-lora", dtype="f16")
    assert result.info["lora_tensors"] == 2 * 7 * SMALL["num_hidden_layers"]
    _run([sys.executable, str(converter / "convert_lora_to_gguf.py"), str(run / "adapter"), "--base",
          str(tmp_path / "base"), "--outfile", str(tmp_path / "converter.gguf"), "--outtype", "f16"],
         PYTHONPATH=os.pathsep.join([str(converter / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    diffs = gguf_differences(tmp_path / "lora" / "adapter-f16.gguf", tmp_path / "converter.gguf")
    print(json.dumps({"lora_family": name, "differences": diffs}))
    assert diffs == []
