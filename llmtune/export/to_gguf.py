"""Write a model's tensors, config and tokenizer as GGUF for llama.cpp / Ollama, through the ``gguf`` package.

Follows what llama.cpp's own converter (``convert_hf_to_gguf.py``) writes, family by family (`families`):

* tensor names from ``gguf``'s own HF-name map (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``,
  ``output``); a tied ``lm_head`` is left out (llama.cpp then reuses ``token_embd``);
* the family's tensor changes (``llama``: q/k rows permuted to llama.cpp's interleaved rope pairs; Gemma: norms
  ``+1``) and extra tensors (``rope_freqs`` for Llama 3.1's rope);
* 1-D tensors (norms, biases) stay float32; 2-D ones are f16, bf16, q8_0 or q4_0 (q8_0/q4_0: a row length
  that is not a multiple of 32 falls back to f16);
* the tokenizer: byte-level BPE as ``tokenizer.ggml.model = "gpt2"`` (tokens, types, merges, the pre-tokenizer
  name) or SentencePiece BPE as ``"llama"`` (tokens, types, scores), special-token ids, whether a BOS is added,
  and the chat template as ``tokenizer.chat_template``.

Tensors are streamed: the header is written from the shapes, then each tensor is loaded, converted and written.
`write_lora_gguf` writes an adapter alone, as llama.cpp's ``convert_lora_to_gguf.py`` does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmtune.core.errors import InvalidOptionError
from llmtune.export import quants
from llmtune.export.families import Family, family
from llmtune.export.source import ExportError, Source
from llmtune.export.tensors import Tensors

Progress = Callable[[str, int, int], None]
DTYPES = ("f16", "bf16", "q8_0", "q4_0")

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


def _pre_tokenizer(spec: dict[str, Any], tokenizer: Any) -> str:
    """llama.cpp's name for a BPE tokenizer's pre-tokenizer: the converter's own for a released tokenizer (found
    by the hash of its tokens for `pretokenizers.CHKTXT`), else ``gpt-2``, ``llama-bpe`` or ``qwen2`` from the
    pre-tokenizer's split pattern."""
    import hashlib

    from llmtune.export.pretokenizers import CHKTXT, HASHES

    known = HASHES.get(hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest())
    if known is not None:
        return known
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


def _spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _kind(spec: dict[str, Any]) -> str:
    """``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece BPE: byte fallback, "\u2581" for spaces)."""
    model = spec.get("model", {})
    if model.get("type") == "BPE" and spec.get("decoder", {}).get("type") == "ByteLevel":
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ExportError(f"the tokenizer's model is {model.get('type')!r} without byte-level decoding or byte fallback; "
                      "llmtune writes byte-level BPE (gpt2-style) and SentencePiece BPE (byte fallback: Llama 2, "
                      "Mistral, Gemma) tokenizers to GGUF; SentencePiece Unigram is not written yet")


def _sp_scores(spec: dict[str, Any], vocab: dict[str, int]) -> dict[int, float]:
    """SentencePiece BPE scores: minus the rank of the merge that makes the token.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token scores highest, so scoring a
    token by its merge rank reproduces the BPE merge order (llama.cpp's converter, given only a tokenizer.json,
    scores every token -1000, which leaves that order to chance).
    """
    model = spec["model"]
    scores: dict[int, float] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = vocab.get(left + right)
        if token is not None and token not in scores:
            scores[token] = -float(rank)
    return scores


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (SentencePiece's add_dummy_prefix)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"prepend": "\\u2581"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges or scores, and special ids of a fast tokenizer, as llama.cpp reads them."""
    import gguf

    spec = _spec(tokenizer)
    kind = _kind(spec)
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    scores = _sp_scores(spec, vocab) if kind == "llama" else {}
    unk = tokenizer.unk_token_id if kind == "llama" else None
    tokens, types, token_scores = [], [], []
    for i in range(vocab_size):
        text = reverse.get(i, f"[PAD{i}]")
        if i not in reverse:
            kind_i = gguf.TokenType.UNUSED
        elif i in added:
            kind_i = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif i == unk:
            kind_i = gguf.TokenType.UNKNOWN
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind_i = gguf.TokenType.BYTE
        else:
            kind_i = gguf.TokenType.NORMAL
        tokens.append(text)
        types.append(int(kind_i))
        token_scores.append(scores.get(i, -1000.0 if i in added or i not in reverse else 0.0))
    probe = tokenizer("a")["input_ids"]
    fields = {"model": kind, "tokens": tokens, "types": types,
              "n_vocab_real": len(spec.get("model", {}).get("vocab", [])) + len(spec.get("added_tokens", [])),
              "add_bos": bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id}
    if kind == "gpt2":
        fields["merges"] = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        fields["pre"] = _pre_tokenizer(spec, tokenizer)
    else:
        fields["scores"] = token_scores
        fields["pre"] = "default"
        fields["space_prefix"] = _space_prefix(spec)
    return fields


def _tokenizer(writer: Any, tokenizer: Any, vocab_size: int, chat_template: str | None, eot: str | None,
               pre: str | None) -> dict[str, Any]:
    fields = tokenizer_fields(tokenizer, vocab_size)
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(pre or fields["pre"])
    writer.add_token_list(fields["tokens"])
    if fields["model"] == "llama":
        writer.add_token_scores(fields["scores"])
        writer.add_add_space_prefix(fields["space_prefix"])
    writer.add_token_types(fields["types"])
    if fields["model"] == "gpt2":
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




def _gguf_name(name_map: Any, hf_name: str, arch: str) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"no GGUF name for tensor {hf_name!r} of a {arch} model")
    return str(name)


def _plan(tensors: Tensors, fam: Family, n_vocab_real: int) -> list[tuple[str, str | None, tuple[int, ...]]]:
    """(GGUF name, HF name or None for a generated tensor, shape) for every tensor the GGUF holds."""
    import gguf

    hp = tensors.hparams
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch.upper()], int(hp["num_hidden_layers"]))
    tied = bool(hp.get("tie_word_embeddings", False)) or fam.drop_lm_head
    plan: list[tuple[str, str | None, tuple[int, ...]]] = []
    if fam.extra is not None:
        plan += [(name, None, tuple(t.shape)) for name, t in fam.extra(hp)]
    for hf_name, shape in tensors.shapes().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        if fam.cut_embeddings and hf_name.endswith("embed_tokens.weight"):
            shape = (min(shape[0], n_vocab_real), *shape[1:])
        plan.append((_gguf_name(name_map, hf_name, fam.arch), hf_name, shape))
    return plan


def _prepared(tensors: Tensors, fam: Family, hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor as the GGUF stores it: q/k permuted (llama), Gemma's norms shifted, embedding cut."""
    hp = tensors.hparams
    t = tensors.load(hf_name)
    if fam.permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        t = permute_rope(t, int(hp["num_attention_heads"]))
    elif fam.permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        t = permute_rope(t, int(hp.get("num_key_value_heads") or hp["num_attention_heads"]))
    if fam.norm_shift and hf_name.endswith("norm.weight"):
        t = t + np.float32(fam.norm_shift)
    return t[: shape[0]] if t.shape[0] != shape[0] else t


def write_gguf(tensors: Tensors, tokenizer: Any, path: str | Path, *, dtype: str = "f16",
               name: str = "llmtune-export", chat_template: str | None = None, eot_token: str | None = None,
               pre_tokenizer: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Write ``tensors`` (a model's HF-named tensors and config) and ``tokenizer`` as the GGUF file ``path``.

    Streams: every tensor's size is known from its shape, so the header goes first and each tensor is loaded,
    converted and written in turn (one tensor in memory at a time). Returns a summary.
    """
    import gguf

    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    hp = tensors.hparams
    fam = family(hp)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), fam.arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    fam.write_hparams(writer, hp, _file_type(dtype))
    vocab_size = int(hp["vocab_size"])
    fields = _tokenizer(writer, tokenizer, vocab_size, chat_template, eot_token, pre_tokenizer)
    plan = _plan(tensors, fam, fields["n_vocab_real"])
    types = _ggml_types()
    written: dict[str, str] = {}
    for gguf_name, _hf, shape in plan:
        kind = tensor_type(shape, dtype)
        block, size = gguf.GGML_QUANT_SIZES[types[kind]]
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), int(np.prod(shape)) // block * size,
                               raw_dtype=types[kind])
        written[gguf_name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    extra = dict(fam.extra(hp)) if fam.extra is not None else {}
    for i, (gguf_name, hf_name, shape) in enumerate(plan):
        t = extra[gguf_name] if hf_name is None else _prepared(tensors, fam, hf_name, shape)
        writer.write_tensor_data(encode(t, written[gguf_name], gguf_name))
        if progress:
            progress("convert tensors", i + 1, len(plan))
    writer.close()
    return {"path": str(path), "architecture": fam.arch, "dtype": dtype, "tensors": written,
            "tokenizer": fields["model"], "pre_tokenizer": pre_tokenizer or fields["pre"],
            "add_bos_token": fields["add_bos"], "vocab_size": vocab_size}


def write_lora_gguf(source: Source, path: str | Path, *, dtype: str = "f16", name: str = "llmtune-adapter",
                    progress: Progress | None = None) -> dict[str, Any]:
    """The LoRA adapter of ``source`` as a GGUF LoRA file (what llama.cpp's ``convert_lora_to_gguf.py`` writes).

    ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted weight
    ``NAME.lora_a`` (A, rank x in) and ``NAME.lora_b`` (B, out x rank; for ``llama`` its rows permuted like the
    weight's). llama.cpp scales by ``alpha / rank``, so an rsLoRA adapter is written with the alpha that gives
    its ``alpha / sqrt(rank)``. Served with the base GGUF: ``llama-server -m base.gguf --lora adapter.gguf``.
    """
    import gguf
    from safetensors import safe_open

    from llmtune.export.tensors import lora_scaling, why_not_streamed

    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if source.adapter_dir is None:
        raise ExportError(f"{source.path}: no adapter to write as a GGUF LoRA (give a run or an adapter directory)")
    why = why_not_streamed(dataclasses.replace(source, quantizer=None))
    if why is not None:
        raise ExportError(f"{source.adapter_dir}: cannot be written as a GGUF LoRA: {why}; export the merged model "
                          "(--format gguf) instead")
    hp = json.loads((Path(source.base).expanduser() / "config.json").read_text())
    fam = family(hp)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch.upper()], int(hp["num_hidden_layers"]))
    writer = gguf.GGUFWriter(str(path), fam.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    types = _ggml_types()
    alpha = None
    with safe_open(str(source.adapter_dir / "adapter_model.safetensors"), framework="numpy") as f:
        keys = [k for k in f.keys() if k.endswith(".lora_A.weight")]
        for i, key in enumerate(keys):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a = f.get_tensor(key).astype(np.float32)
            b = f.get_tensor(key.replace(".lora_A.", ".lora_B.")).astype(np.float32)
            rank = int(a.shape[0])
            alpha = alpha if alpha is not None else lora_scaling(source.adapter_config, rank) * rank
            if fam.permute and module.endswith(("q_proj", "k_proj")):
                heads = hp["num_attention_heads"] if module.endswith("q_proj") else (
                    hp.get("num_key_value_heads") or hp["num_attention_heads"])
                b = permute_rope(b, int(heads))
            target = _gguf_name(name_map, f"{module}.weight", fam.arch)
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                kind = tensor_type(t.shape, dtype)
                writer.add_tensor(target + suffix, encode(t, kind, target + suffix), raw_dtype=types[kind])
            if progress:
                progress("convert adapter", i + 1, len(keys))
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha if alpha is not None else 0.0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"path": str(path), "architecture": fam.arch, "dtype": dtype, "lora_tensors": 2 * len(keys),
            "lora_alpha": alpha}
