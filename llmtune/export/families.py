"""llama.cpp's reading of each model family: GGUF architecture, hyper-parameters, and tensor changes.

Each entry follows the class llama.cpp's own ``convert_hf_to_gguf.py`` uses for that transformers
``model_type`` (``conversion/llama.py``, ``qwen.py``, ``gemma.py``, ``phi.py`` in the llama-cpp-python 0.3.36
sdist): the same keys from the same ``config.json`` fields, the same extra tensors (``rope_freqs`` for Llama 3.1's
``llama3`` rope, ``rope_factors_long/short`` for Phi-3's longrope), and the same tensor changes (q/k rows
permuted for ``llama``, ``+1`` on Gemma's RMSNorm weights, Gemma 3's embedding cut to the tokenizer's size).
``tests/integration/test_export_converter.py`` runs that converter on the same directories and compares.

Hyper-parameters are read from the raw ``config.json`` dict (what the converter reads), not a config object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llmtune.export.source import ExportError

Hparams = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` is written as GGUF."""

    arch: str                                   #: GGUF ``general.architecture``
    write_hparams: Callable[[Any, Hparams, int], None]
    permute: bool = False                       #: q/k rows from rotate-half to llama.cpp's interleaved pairs
    norm_shift: float = 0.0                     #: added to every ``*norm.weight`` (Gemma stores ``w - 1``)
    drop_lm_head: bool = False                  #: never write ``lm_head`` (Gemma 2: always tied)
    cut_embeddings: bool = False                #: Gemma 3: embedding rows cut to the tokenizer's size
    extra: Callable[[Hparams], Iterator[tuple[str, np.ndarray]]] | None = None


def first(hp: Hparams, *names: str) -> Any:
    """The first of ``names`` present in ``hp`` (the converter's ``find_hparam``), else None."""
    return next((hp[n] for n in names if n in hp), None)


def rope_parameters(hp: Hparams) -> dict[str, Any]:
    """The rope settings as the converter collects them (``rope_parameters`` or ``rope_scaling`` + ``rope_theta``)."""
    rope = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return rope
    theta = first(hp, "rope_theta")
    local = first(hp, "rope_local_base_freq")
    if local is not None:
        rope["sliding_attention"] = {"rope_theta": local}
    if "rope_theta" not in rope and theta is not None:
        rope["rope_theta"] = theta
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        if key not in rope and hp.get(key) is not None:
            rope[key] = hp[key]
    return rope


def _rope_kind(rope: dict[str, Any]) -> str:
    params = rope.get("full_attention", rope)
    return str(params.get("rope_type") or "default").lower()


def _rope_scaling(w: Any, rope: dict[str, Any]) -> None:
    import gguf

    params = rope.get("full_attention", rope)
    kind, factor = _rope_kind(rope), params.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if params.get(key) is not None:
                add(params[key])
        attn = params.get("attention_factor", params.get("attn_factor"))
        if attn is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind not in ("default", "llama3"):
        raise ExportError(f"config.json rope_type {kind!r} is not written to GGUF (llmtune writes default, linear, "
                          "yarn, llama3 and longrope); export --format hf and serve it with transformers or vLLM")


def base_hparams(w: Any, hp: Hparams, file_type: int) -> None:
    """What the converter's ``TextModel.set_gguf_parameters`` writes for a dense model."""
    w.add_block_count(int(hp["num_hidden_layers"]))
    for key, add in (("max_position_embeddings", w.add_context_length), ("hidden_size", w.add_embedding_length),
                     ("intermediate_size", w.add_feed_forward_length), ("num_attention_heads", w.add_head_count),
                     ("num_key_value_heads", w.add_head_count_kv)):
        if hp.get(key) is not None:
            add(hp[key])
    rope = rope_parameters(hp)
    _rope_scaling(w, rope)
    params = rope.get("full_attention", rope)
    if params.get("rope_theta") is not None:
        w.add_rope_freq_base(params["rope_theta"])
    local = rope.get("sliding_attention", {}).get("rope_theta")
    if local is not None:
        w.add_rope_freq_base_swa(local)
    if hp.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(file_type)


def head_dim(hp: Hparams) -> int:
    return int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def _llama_hparams(w: Any, hp: Hparams, file_type: int) -> None:
    base_hparams(w, hp, file_type)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(head_dim(hp))


def _gemma_attention_scale(hp: Hparams) -> None:
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B models), not by the
    config's ``query_pre_attn_scalar``: refuse a config where those differ (released Gemma 2/3 models agree)."""
    scalar = hp.get("query_pre_attn_scalar")
    allowed = (hp.get("head_dim"), hp["hidden_size"] // hp["num_attention_heads"])
    if scalar is not None and scalar not in allowed:
        raise ExportError(f"config.json query_pre_attn_scalar={scalar} is neither head_dim ({allowed[0]}) nor "
                          f"hidden_size/num_attention_heads ({allowed[1]}): llama.cpp would scale attention "
                          "differently from transformers; export --format hf instead")


def _gemma2_hparams(w: Any, hp: Hparams, file_type: int) -> None:
    _gemma_attention_scale(hp)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads", hp["num_attention_heads"]))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_file_type(file_type)
    w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
    w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])


def _gemma3_hparams(w: Any, hp: Hparams, file_type: int) -> None:
    _gemma_attention_scale(hp)
    base_hparams(w, hp, file_type)
    for key in ("context_length", "attention.head_count", "attention.layer_norm_rms_epsilon", "attention.key_length",
                "attention.value_length", "rope.freq_base", "attention.head_count_kv"):
        w.kv_data[0].pop(f"{w.arch}.{key}", None)   # written again below, with Gemma 3's defaults
    rope = rope_parameters(hp)
    w.add_context_length(hp.get("max_position_embeddings", 131072))
    w.add_head_count(hp.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_key_length(hp.get("head_dim", 256))
    w.add_value_length(hp.get("head_dim", 256))
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if hp.get("attn_logit_softcapping") is not None:
        raise ExportError("config.json attn_logit_softcapping is set; llama.cpp's gemma3 has no attention softcap")
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])
    w.add_head_count_kv(hp.get("num_key_value_heads", 4))


def _phi3_rope_dims(hp: Hparams, rope: dict[str, Any]) -> int:
    return int(rope.get("partial_rotary_factor", 1.0) * hp["hidden_size"]) // int(hp["num_attention_heads"])


def _phi3_hparams(w: Any, hp: Hparams, file_type: int) -> None:
    rope = rope_parameters(hp)
    w.add_context_length(first(hp, "n_positions", "max_position_embeddings"))
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(_phi3_rope_dims(hp, rope))
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_file_type(file_type)
    w.add_sliding_window(hp.get("sliding_window") or 0)
    long = rope.get("long_factor")
    if long:
        kind = _rope_kind(rope)
        scale = first(hp, "n_positions", "max_position_embeddings") / rope["original_max_position_embeddings"]
        orig = rope["original_max_position_embeddings"]
        if kind in ("su", "longrope"):
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        elif kind == "yarn":
            attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise ExportError(f"config.json rope_scaling type {kind!r} with long_factor is not written to GGUF")
        w.add_rope_scaling_attn_factors(attn)


def llama3_rope_factors(hp: Hparams) -> Iterator[tuple[str, np.ndarray]]:
    """``rope_freqs``: Llama 3.1's per-frequency scaling, computed exactly as llama.cpp's converter does."""
    rope = rope_parameters(hp)
    params = rope.get("full_attention", rope)
    if _rope_kind(rope) != "llama3":
        return
    import torch

    base = params.get("rope_theta", 10000.0)
    dim = head_dim(hp)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    yield "rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy()


def phi3_rope_factors(hp: Hparams) -> Iterator[tuple[str, np.ndarray]]:
    """``rope_factors_long`` / ``rope_factors_short`` of a longrope Phi-3 (none without them)."""
    rope = rope_parameters(hp)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return
    half = _phi3_rope_dims(hp, rope) / 2
    if short is None or len(long) != len(short) or len(long) != half:
        raise ExportError(f"config.json rope_scaling long_factor/short_factor must both have {half:g} values")
    yield "rope_factors_long.weight", np.asarray(long, dtype=np.float32)
    yield "rope_factors_short.weight", np.asarray(short, dtype=np.float32)


_LLAMA = Family("llama", _llama_hparams, permute=True, extra=llama3_rope_factors)
_QWEN2 = Family("qwen2", base_hparams)

#: transformers ``model_type`` -> how llama.cpp's converter writes it.
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _QWEN2,
    "qwen3": dataclasses.replace(_QWEN2, arch="qwen3"),
    "gemma2": Family("gemma2", _gemma2_hparams, norm_shift=1.0, drop_lm_head=True),
    "gemma3_text": Family("gemma3", _gemma3_hparams, norm_shift=1.0, cut_embeddings=True),
    "phi3": Family("phi3", _phi3_hparams, extra=phi3_rope_factors),
}

#: Families transformers has that are not written yet, and what is missing for each.
MISSING = {
    "gemma3": "Gemma3ForConditionalGeneration has a vision tower (an mmproj GGUF); export its text model "
              "(Gemma3ForCausalLM, model_type gemma3_text)",
    "mllama": "the vision tower of Llama 3.2 Vision (an mmproj GGUF) is not written",
    "qwen2_moe": "mixture-of-experts tensors (merged experts) are not written",
    "qwen3_moe": "mixture-of-experts tensors (merged experts) are not written",
    "mixtral": "mixture-of-experts tensors (merged experts) are not written",
    "gemma": "Gemma 1 is not mapped (its converter class differs from Gemma 2/3)",
    "phi": "Phi-1/2 (LayerNorm with biases, parallel attention) is not mapped",
}


def family(config: Any) -> Family:
    """The `Family` of a transformers config (object or ``config.json`` dict); `ExportError` for another one."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if kind in FAMILIES:
        return FAMILIES[kind]
    missing = MISSING.get(str(kind), "its tensor names and hyper-parameters are not mapped")
    raise ExportError(f"model_type {kind!r} cannot be written as GGUF yet: {missing}; written: "
                      f"{', '.join(FAMILIES)} (export --format hf to serve it with transformers or vLLM)")
