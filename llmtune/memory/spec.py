"""`ModelSpec`: the shapes of a decoder-only LLM that decide its GPU memory (stdlib only, no torch)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError, did_you_mean

#: Families the memory model knows, mapped from Hugging Face ``model_type`` values.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "mixtral": "mixtral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "falcon": "falcon",
}

_NORMS = ("rms", "rms_gemma", "layernorm")
_MLPS = ("gated", "plain")
_ACTS = ("silu", "gelu", "gelu_tanh", "gelu_new")


@dataclasses.dataclass(frozen=True)
class Linear:
    """One linear projection inside a decoder layer (``count`` > 1 for routed MoE experts)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1
    expert: bool = False

    @property
    def params(self) -> int:
        """Weights plus bias, times the number of copies."""
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer: everything the memory model needs, nothing else."""

    name: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    mlp: str = "gated"
    activation: str = "silu"
    norm: str = "rms"
    norms_per_layer: int = 2
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    parallel_residual: bool = False
    learned_positions: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    sliding_layers: int = 0
    dropout: float = 0.0
    approximate: bool = False

    def __post_init__(self) -> None:
        """Reject sizes that cannot describe a model, naming the field."""
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "norms_per_layer"):
            _positive(f, getattr(self, f), f"ModelSpec {self.name!r}")
        for f in ("learned_positions", "num_experts", "experts_per_token", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "sliding_layers"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"ModelSpec {self.name!r}: field {f!r} must be an integer >= 0, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"ModelSpec {self.name!r}: num_attention_heads={self.num_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_kv_heads}")
        if self.family not in set(FAMILIES.values()) and self.family != "generic":
            raise ConfigError(f"ModelSpec {self.name!r}: unknown family {self.family!r}."
                              f"{did_you_mean(self.family, FAMILIES.values())}")
        for f, choices in (("mlp", _MLPS), ("norm", _NORMS), ("activation", _ACTS)):
            if getattr(self, f) not in choices:
                raise ConfigError(f"ModelSpec {self.name!r}: field {f!r}={getattr(self, f)!r} is not one of {choices}")
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts):
            raise ConfigError(f"ModelSpec {self.name!r}: num_experts_per_tok={self.experts_per_token} must be "
                              f"in 1..{self.num_experts}")
        if self.num_experts and not self.moe_intermediate_size:
            raise ConfigError(f"ModelSpec {self.name!r}: field 'moe_intermediate_size' is required for MoE")
        if self.sliding_layers > self.num_layers:
            raise ConfigError(f"ModelSpec {self.name!r}: sliding_layers={self.sliding_layers} > num_layers")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelSpec {self.name!r}: field 'dropout' must be in [0, 1), got {self.dropout!r}")

    # ------------------------------------------------------------------ shapes
    @property
    def q_dim(self) -> int:
        """Width of the query projection (heads x head_dim; not always hidden_size)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one of the key/value projections (GQA: kv_heads x head_dim)."""
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts model."""
        return self.num_experts > 0

    def layer_linears(self) -> list[Linear]:
        """The linear projections of one decoder layer, under their Hugging Face module names."""
        h, f = self.hidden_size, self.intermediate_size
        out: list[Linear] = []
        if self.family == "gpt2":
            return [Linear("c_attn", h, 3 * h, True), Linear("c_proj", h, h, True),
                    Linear("c_fc", h, f, True), Linear("c_proj", f, h, True)]
        if self.family in ("gpt_neox", "falcon"):
            b = self.qkv_bias
            return [Linear("query_key_value", h, self.q_dim + 2 * self.kv_dim, b),
                    Linear("dense", self.q_dim, h, self.o_bias),
                    Linear("dense_h_to_4h", h, f, self.mlp_bias), Linear("dense_4h_to_h", f, h, self.mlp_bias)]
        if self.fused_qkv:
            out.append(Linear("qkv_proj", h, self.q_dim + 2 * self.kv_dim, self.qkv_bias))
        else:
            out += [Linear("q_proj", h, self.q_dim, self.qkv_bias), Linear("k_proj", h, self.kv_dim, self.qkv_bias),
                    Linear("v_proj", h, self.kv_dim, self.qkv_bias)]
        out.append(Linear("o_proj", self.q_dim, h, self.o_bias))
        if self.is_moe:
            e, fe = self.num_experts, self.moe_intermediate_size
            out += [Linear("gate", h, e), Linear("gate_proj", h, fe, count=e, expert=True),
                    Linear("up_proj", h, fe, count=e, expert=True), Linear("down_proj", fe, h, count=e, expert=True)]
            if self.shared_expert_intermediate_size:
                fs = self.shared_expert_intermediate_size
                out += [Linear("gate_proj", h, fs), Linear("up_proj", h, fs), Linear("down_proj", fs, h),
                        Linear("shared_expert_gate", h, 1)]
            return out
        if self.fused_gate_up:
            out += [Linear("gate_up_proj", h, 2 * f, self.mlp_bias), Linear("down_proj", f, h, self.mlp_bias)]
        else:
            out += [Linear("gate_proj", h, f, self.mlp_bias), Linear("up_proj", h, f, self.mlp_bias),
                    Linear("down_proj", f, h, self.mlp_bias)]
        return out

    def linear_module_names(self) -> list[str]:
        """Distinct linear module names of a layer (what LoRA ``target_modules`` match)."""
        return sorted({lin.name for lin in self.layer_linears()})

    # ------------------------------------------------------------------ parameter counts
    @property
    def norm_params(self) -> int:
        """Parameters of one normalisation layer over the hidden size."""
        return 2 * self.hidden_size if self.norm == "layernorm" else self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        """Parameters in the linear layers of one decoder layer (what 4/8-bit quantization replaces)."""
        return sum(lin.params for lin in self.layer_linears())

    @property
    def layer_other_params(self) -> int:
        """Norm (and q/k-norm) parameters of one decoder layer: kept in 16/32 bits by quantizers."""
        n = self.norms_per_layer * self.norm_params
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def embedding_params(self) -> int:
        """Token embedding (plus learned position embedding) parameters."""
        return self.vocab_size * self.hidden_size + self.learned_positions * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Output projection parameters (0 when tied to the embedding)."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Total parameters, counting tied embeddings once (what ``model.num_parameters()`` reports)."""
        return (self.embedding_params + self.lm_head_params + self.norm_params
                + self.num_layers * (self.layer_linear_params + self.layer_other_params))

    @property
    def quantizable_params(self) -> int:
        """Parameters in decoder-layer linears (bitsandbytes/GPTQ quantize these, not embeddings or lm_head)."""
        return self.num_layers * self.layer_linear_params

    @property
    def active_params(self) -> int:
        """Parameters used per token (MoE: only the routed experts count)."""
        if not self.is_moe:
            return self.num_params
        idle = sum(lin.params for lin in self.layer_linears() if lin.expert)
        idle = idle * (self.num_experts - self.experts_per_token) // self.num_experts
        return self.num_params - self.num_layers * idle

    def largest_linear(self) -> int:
        """Elements of the largest single linear weight (one expert for MoE; lm_head excluded)."""
        return max(lin.in_features * lin.out_features for lin in self.layer_linears())

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike[str], name: str | None = None) -> ModelSpec:
        """Build from a Hugging Face ``config.json`` given as a dict, a file path or a model directory."""
        source = "config"
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"no config.json at {str(path)!r}")
            source = str(path)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{source}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{source}: not a config.json (not UTF-8 text); give a model directory, "
                                  "its config.json or a preset name") from None
            if name is None:
                name = path.parent.name or "model"
        elif isinstance(config, Mapping):
            data = dict(config)
        else:
            raise ConfigError(f"from_hf_config takes a dict, a config.json path or a model directory, "
                              f"not {type(config).__name__}")
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a JSON object")
        return _parse(data, source, name or str(data.get("_name_or_path") or data.get("model_type") or "model"))

    @classmethod
    def from_preset(cls, name: str) -> ModelSpec:
        """A popular model by short name (``llmtune.memory.PRESETS`` lists them), e.g. ``"llama-3.1-8b"``."""
        from llmtune.memory.presets import PRESETS

        key = name.lower().strip()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}.{did_you_mean(key, PRESETS)} "
                              f"Known: {', '.join(sorted(PRESETS))}")
        return cls.from_hf_config(PRESETS[key].config, name=key)

    @classmethod
    def from_params(cls, num_params: float, vocab_size: int = 32000, name: str | None = None) -> ModelSpec:
        """A Llama-shaped stand-in with about ``num_params`` parameters (shapes guessed: estimates are rough)."""
        if isinstance(num_params, bool) or not isinstance(num_params, (int, float)) or not 0 < num_params <= 1e15:
            raise ConfigError(f"num_params must be a positive finite number (at most 1e15), got {num_params!r}")
        _positive("vocab_size", vocab_size, "from_params")
        # Llama proportions: head_dim 128, about 128 hidden units per layer, SwiGLU ffn ~ 2.7 h.
        h = max(128, round((num_params * 128 / 12.0) ** (1 / 3) / 128) * 128)
        per_layer = 4 * h * h + 3 * h * _ffn(h)
        layers = max(1, round((num_params - 2 * vocab_size * h) / per_layer))
        heads = max(1, h // 128)
        return cls(name=name or f"{num_params / 1e9:g}B-params", family="llama", vocab_size=vocab_size,
                   hidden_size=h, intermediate_size=_ffn(h), num_layers=layers, num_heads=heads,
                   num_kv_heads=heads, head_dim=h // heads, approximate=True)


def _ffn(h: int) -> int:
    """Llama's SwiGLU width: 8h/3 rounded up to a multiple of 256."""
    return math.ceil(8 * h / 3 / 256) * 256


def _positive(field: str, value: object, where: str) -> None:
    """Raise ConfigError unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: field {field!r} must be a positive integer, got {value!r}")


class _Cfg:
    """Reads fields of one config dict, raising ConfigError that names the missing or bad field."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data, self.source = data, source

    def get(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if k in self.data and self.data[k] is not None:
                return self.data[k]
        return default

    def req(self, *keys: str) -> int:
        v = self.get(*keys)
        if v is None:
            raise ConfigError(f"{self.source}: missing field {keys[0]!r}"
                              + (f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""))
        _positive(keys[0], v, self.source)
        return int(v)

    def opt_int(self, key: str, default: int) -> int:
        v = self.get(key, default=default)
        _positive(key, v, self.source)
        return int(v)


def _parse(data: dict[str, Any], source: str, name: str) -> ModelSpec:
    """Turn one Hugging Face config dict into a ModelSpec."""
    mt = data.get("model_type")
    if mt is None and isinstance(data.get("text_config"), dict):
        mt = data["text_config"].get("model_type")
    if mt is None:
        raise ConfigError(f"{source}: missing field 'model_type'")
    if mt not in FAMILIES:
        raise ConfigError(f"{source}: model_type {mt!r} is not supported by the memory model."
                          f"{did_you_mean(str(mt), FAMILIES)} Supported: {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[mt]
    tie_default = family in ("gemma", "gemma2", "gemma3", "gpt2", "falcon")
    if family == "gemma3" and isinstance(data.get("text_config"), dict):
        # Multimodal Gemma 3: the language model lives in text_config; tying is decided at the top.
        tie = data.get("tie_word_embeddings", data["text_config"].get("tie_word_embeddings", True))
        data = {**data["text_config"], "tie_word_embeddings": tie}
        source += ":text_config"
    c = _Cfg(data, source)
    tie = bool(c.get("tie_word_embeddings", default=tie_default))

    if family == "gpt2":
        h = c.req("n_embd", "hidden_size")
        heads = c.req("n_head", "num_attention_heads")
        drop = float(max(c.get("resid_pdrop", default=0.1), c.get("attn_pdrop", default=0.1)))
        return ModelSpec(name=name, family=family, vocab_size=c.req("vocab_size"), hidden_size=h,
                         intermediate_size=c.opt_int("n_inner", 4 * h), num_layers=c.req("n_layer", "num_hidden_layers"),
                         num_heads=heads, num_kv_heads=heads, head_dim=_div(h, heads, source),
                         tie_embeddings=tie, mlp="plain", activation="gelu_new", norm="layernorm",
                         qkv_bias=True, o_bias=True, mlp_bias=True, fused_qkv=True,
                         learned_positions=c.req("n_positions", "max_position_embeddings"), dropout=drop)

    h = c.req("hidden_size", "n_embd")
    heads = c.req("num_attention_heads", "n_head")
    layers = c.req("num_hidden_layers", "n_layer")
    vocab = c.req("vocab_size")

    if family == "gpt_neox":
        return ModelSpec(name=name, family=family, vocab_size=vocab, hidden_size=h,
                         intermediate_size=c.opt_int("intermediate_size", 4 * h), num_layers=layers, num_heads=heads,
                         num_kv_heads=heads, head_dim=_div(h, heads, source), tie_embeddings=tie, mlp="plain",
                         activation="gelu", norm="layernorm", qkv_bias=bool(c.get("attention_bias", default=True)),
                         o_bias=bool(c.get("attention_bias", default=True)), mlp_bias=True, fused_qkv=True,
                         parallel_residual=bool(c.get("use_parallel_residual", default=True)),
                         dropout=float(c.get("hidden_dropout", default=0.0)))
    if family == "falcon":
        new_arch = bool(c.get("new_decoder_architecture", default=False))
        if new_arch:
            kv = c.opt_int("num_kv_heads", heads)
        elif c.get("multi_query", default=True):
            kv = 1
        else:
            kv = heads
        bias = bool(c.get("bias", default=False))
        return ModelSpec(name=name, family=family, vocab_size=vocab, hidden_size=h,
                         intermediate_size=c.opt_int("ffn_hidden_size", 4 * h), num_layers=layers, num_heads=heads,
                         num_kv_heads=kv, head_dim=_div(h, heads, source), tie_embeddings=tie, mlp="plain",
                         activation="gelu", norm="layernorm",
                         norms_per_layer=2 if (new_arch and c.get("num_ln_in_parallel_attn", default=2) == 2)
                         or not c.get("parallel_attn", default=True) else 1,
                         qkv_bias=bias, o_bias=bias, mlp_bias=bias, fused_qkv=True,
                         parallel_residual=bool(c.get("parallel_attn", default=True)))

    kv = c.opt_int("num_key_value_heads", heads)
    head_dim = c.get("head_dim")
    head_dim = _div(h, heads, source) if head_dim is None else int(head_dim)
    _positive("head_dim", head_dim, source)
    common: dict[str, Any] = dict(name=name, family=family, vocab_size=vocab, hidden_size=h, num_layers=layers,
                                  num_heads=heads, num_kv_heads=kv, head_dim=head_dim, tie_embeddings=tie)
    sliding = c.get("sliding_window")
    if family in ("mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and sliding and (
            family in ("mistral", "mixtral") or c.get("use_sliding_window", default=False)):
        common.update(sliding_window=int(sliding), sliding_layers=layers)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        experts = c.req("num_local_experts" if family == "mixtral" else "num_experts")
        k = c.req("num_experts_per_tok")
        if family == "mixtral":
            moe_ffn, shared = c.req("intermediate_size"), 0
        else:
            moe_ffn = c.req("moe_intermediate_size")
            shared = int(c.get("shared_expert_intermediate_size", default=0) or 0)
        dense_ffn = int(c.get("intermediate_size", default=moe_ffn) or moe_ffn)
        return ModelSpec(**common, intermediate_size=dense_ffn, num_experts=experts, experts_per_token=k,
                         moe_intermediate_size=moe_ffn, shared_expert_intermediate_size=shared,
                         qkv_bias=family == "qwen2_moe", qk_norm=family == "qwen3_moe")
    ffn = c.req("intermediate_size")
    if family in ("llama", "mistral"):
        return ModelSpec(**common, intermediate_size=ffn, qkv_bias=bool(c.get("attention_bias", default=False)),
                         o_bias=bool(c.get("attention_bias", default=False)), mlp_bias=bool(c.get("mlp_bias", default=False)))
    if family == "qwen2":
        return ModelSpec(**common, intermediate_size=ffn, qkv_bias=True)
    if family == "qwen3":
        return ModelSpec(**common, intermediate_size=ffn, qk_norm=True,
                         qkv_bias=bool(c.get("attention_bias", default=False)),
                         o_bias=bool(c.get("attention_bias", default=False)))
    if family == "phi3":
        return ModelSpec(**common, intermediate_size=ffn, fused_qkv=True, fused_gate_up=True)
    # Gemma family: (1 + w) RMSNorm in fp32, GELU-tanh MLP, embeddings scaled by sqrt(h).
    gem: dict[str, Any] = dict(intermediate_size=ffn, norm="rms_gemma", activation="gelu_tanh")
    if family == "gemma2":
        window = c.get("sliding_window", default=4096)
        gem.update(norms_per_layer=4, final_logit_softcapping=c.get("final_logit_softcapping", default=30.0),
                   sliding_window=int(window) if window else None, sliding_layers=layers // 2 if window else 0)
    elif family == "gemma3":
        window = c.get("sliding_window", default=4096)
        pattern = int(c.get("sliding_window_pattern", default=6) or 6)
        types = c.get("layer_types")
        n_sliding = sum(1 for t in types if t == "sliding_attention") if isinstance(types, list) else \
            layers - layers // pattern
        gem.update(norms_per_layer=4, qk_norm=True, final_logit_softcapping=c.get("final_logit_softcapping"),
                   sliding_window=int(window) if window else None, sliding_layers=n_sliding if window else 0)
    return ModelSpec(**common, **gem)


def _div(h: int, heads: int, source: str) -> int:
    """hidden_size / num_attention_heads, or ConfigError naming both fields."""
    if h % heads:
        raise ConfigError(f"{source}: hidden_size={h} is not divisible by num_attention_heads={heads} "
                          "(give 'head_dim' explicitly)")
    return h // heads
