"""Write a (merged) transformers model as GGUF for llama.cpp / Ollama, through the ``gguf`` package.

Follows what llama.cpp's own converter (``convert_hf_to_gguf.py``) writes, for the families it loads as
``llama`` (Llama, Mistral) and ``qwen2``:

* tensor names from ``gguf``'s own HF-name map (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``,
  ``output``); a tied ``lm_head`` is left out (llama.cpp then reuses ``token_embd``);
* for ``llama``, the rows of ``q_proj``/``k_proj`` are permuted from the HF rotary layout (halves) back to
  the interleaved pairs llama.cpp's rope expects (per head; ``k`` with the KV head count); ``qwen2`` uses
  the NeoX rope and is written as is (with its q/k/v biases);
* 1-D tensors (norms, biases) stay float32; 2-D ones are f16, bf16, q8_0 or q4_0 (q8_0/q4_0: a row length
  that is not a multiple of 32 falls back to f16);
* hyper-parameters under ``{arch}.*``; a byte-level BPE tokenizer as ``tokenizer.ggml.model = "gpt2"`` with its
  tokens, token types (normal / control / user-defined / unused), merges, special-token ids, whether a BOS is
  added, the pre-tokenizer name, and the chat template as ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmtune.core.errors import InvalidOptionError
from llmtune.export import quants
from llmtune.export.source import ExportError

Progress = Callable[[str, int, int], None]
DTYPES = ("f16", "bf16", "q8_0", "q4_0")
#: HF ``model_type`` -> (GGUF architecture, permute q/k rows for llama.cpp's rope).
FAMILIES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

#: Pre-tokenizer split patterns of the tokenizers llama.cpp knows by name (its ``tokenizer.ggml.pre``).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _ggml_types() -> dict[str, Any]:
    import gguf

    t = gguf.GGMLQuantizationType
    return {"f32": t.F32, "f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0, "q4_0": t.Q4_0}


def _file_type(dtype: str) -> int:
    import gguf

    f = gguf.LlamaFileType
    return int({"f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0, "q4_0": f.MOSTLY_Q4_0}[dtype])


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from HF's rotate-half layout to llama.cpp's interleaved pairs (per head)."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"cannot permute a q/k projection of {rows} rows over {n_head} heads")
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", None):
        raise ExportError(f"rope scaling {kind!r} is not written to GGUF by llmtune yet; export --format hf instead")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def family(config: Any) -> tuple[str, bool]:
    """(GGUF architecture, permute q/k) of a transformers config; `ExportError` for another family."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ExportError(f"model type {kind!r} cannot be written as GGUF yet (supported: {', '.join(FAMILIES)}); "
                          "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    return FAMILIES[kind]


def _hparams(writer: Any, config: Any, dtype: str) -> None:
    n_head = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(_config_value(config, "head_dim", default=hidden // n_head))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(_config_value(config, "num_key_value_heads", default=n_head)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(dtype))


def _pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json (``gpt-2``, ``llama-bpe``, ``qwen2``)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        patterns = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if _LLAMA3_SPLIT in patterns:
            return "llama-bpe"
        if _QWEN2_SPLIT in patterns:
            return "qwen2"
    raise ExportError("the tokenizer's pre-tokenizer is not one llmtune can name for llama.cpp (gpt-2, llama-bpe, "
                      "qwen2); pass pre_tokenizer= (--pre-tokenizer) with llama.cpp's name for it")


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges and special ids of a byte-level BPE (gpt2-style) fast tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ExportError("only byte-level BPE (gpt2-style) tokenizers are written to GGUF by llmtune; this one is "
                          f"{spec.get('model', {}).get('type')!r}; use llama.cpp's convert_hf_to_gguf.py on an hf export")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_tokenizer(spec),
            "add_bos": bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id}


def _tokenizer(writer: Any, tokenizer: Any, vocab_size: int, chat_template: str | None, eot: str | None,
               pre: str | None) -> dict[str, Any]:
    fields = tokenizer_fields(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    writer.add_add_bos_token(fields["add_bos"])
    vocab = tokenizer.get_vocab()
    if eot is not None and eot in vocab:
        writer.add_eot_token_id(int(vocab[eot]))
    if chat_template:
        writer.add_chat_template(chat_template)
    return fields


def _tensor_plan(model: Any, arch: str, permute: bool) -> Iterator[tuple[str, str, Any]]:
    """(GGUF name, HF name, torch tensor) in state-dict order, q/k permuted, tied lm_head left out."""
    import gguf

    config = model.config
    n_layers = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_kv = int(_config_value(config, "num_key_value_heads", default=n_head))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} of a {arch} model")
        t = tensor.detach().float().cpu()
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            t = _torch_permute(t, n_head)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            t = _torch_permute(t, n_kv)
        yield name, hf_name, t


def _torch_permute(t: Any, n_head: int) -> Any:
    import torch

    return torch.from_numpy(permute_rope(t.numpy(), n_head))


def tensor_type(shape: tuple[int, ...], dtype: str) -> str:
    """The GGUF type a tensor of ``shape`` gets in a ``dtype`` export."""
    if len(shape) < 2:
        return "f32"
    if dtype in ("q8_0", "q4_0") and shape[-1] % quants.BLOCK:
        return "f16"
    return dtype


def encode(t: np.ndarray, kind: str, name: str) -> np.ndarray:
    """A float32 array in GGUF type ``kind`` (the raw array `gguf.GGUFWriter.add_tensor` takes)."""
    if kind == "f32":
        return t.astype(np.float32)
    if kind == "f16":
        return t.astype(np.float16)
    if kind == "bf16":
        return quants.to_bf16_bits(t)
    if kind == "q8_0":
        return quants.quantize_q8_0(t, name)
    if kind == "q4_0":
        return quants.quantize_q4_0(t, name)
    raise InvalidOptionError(f"unknown tensor type {kind!r}")


def write_gguf(model: Any, tokenizer: Any, path: str | Path, *, dtype: str = "f16", name: str = "llmtune-export",
               chat_template: str | None = None, eot_token: str | None = None, pre_tokenizer: str | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Write ``model`` (a transformers causal LM) and ``tokenizer`` to the GGUF file ``path``; returns a summary."""
    import gguf

    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    arch, permute = family(model.config)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    _hparams(writer, model.config, dtype)
    fields = _tokenizer(writer, tokenizer, int(model.config.vocab_size), chat_template, eot_token, pre_tokenizer)
    types = _ggml_types()
    plan = list(_tensor_plan(model, arch, permute))
    written: dict[str, str] = {}
    for i, (gguf_name, _hf, t) in enumerate(plan):
        kind = tensor_type(tuple(t.shape), dtype)
        writer.add_tensor(gguf_name, encode(t.numpy(), kind, gguf_name), raw_dtype=types[kind])
        written[gguf_name] = kind
        if progress:
            progress("convert tensors", i + 1, len(plan))
    if progress:
        progress("write gguf", 0, 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    if progress:
        progress("write gguf", 1, 1)
    return {"path": str(path), "architecture": arch, "dtype": dtype, "tensors": written,
            "pre_tokenizer": pre_tokenizer or fields["pre"], "add_bos_token": fields["add_bos"],
            "vocab_size": int(model.config.vocab_size)}
