"""Preset Hugging Face configs of popular models, with their published parameter counts."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model's ``config.json`` fields that matter for memory, and its published parameter count."""

    config: dict[str, Any]
    published_params: int
    source: str


def _llama(v: int, h: int, f: int, n: int, a: int, kv: int, tie: bool = False, **kw: Any) -> dict[str, Any]:
    return dict(model_type="llama", vocab_size=v, hidden_size=h, intermediate_size=f, num_hidden_layers=n,
                num_attention_heads=a, num_key_value_heads=kv, tie_word_embeddings=tie, **kw)


def _with(cfg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {**cfg, **kw}


_HF = "Hugging Face model card, safetensors parameter count"

#: Short name -> preset. Parameter counts as published (model card or paper), checked by a unit test.
PRESETS: dict[str, Preset] = {
    "llama-3.2-1b": Preset(_llama(128256, 2048, 8192, 16, 32, 8, True), 1_235_814_400, _HF + " (1.24B)"),
    "llama-3.2-3b": Preset(_llama(128256, 3072, 8192, 28, 24, 8, True), 3_212_749_824, _HF + " (3.21B)"),
    "llama-3.1-8b": Preset(_llama(128256, 4096, 14336, 32, 32, 8), 8_030_261_248, _HF + " (8.03B)"),
    "llama-3.1-70b": Preset(_llama(128256, 8192, 28672, 80, 64, 8), 70_553_706_496, _HF + " (70.6B)"),
    "llama-3.1-405b": Preset(_llama(128256, 16384, 53248, 126, 128, 8), 405_853_388_800, _HF + " (406B)"),
    "llama-2-7b": Preset(_llama(32000, 4096, 11008, 32, 32, 32), 6_738_415_616, _HF + " (6.74B)"),
    "llama-2-13b": Preset(_llama(32000, 5120, 13824, 40, 40, 40), 13_015_864_320, _HF + " (13.0B)"),
    "llama-2-70b": Preset(_llama(32000, 8192, 28672, 80, 64, 8), 68_976_648_192, _HF + " (69.0B)"),
    "tinyllama-1.1b": Preset(_llama(32000, 2048, 5632, 22, 32, 4), 1_100_048_384, _HF + " (1.1B)"),
    "smollm2-135m": Preset(_llama(49152, 576, 1536, 30, 9, 3, True), 134_515_008, _HF + " (135M)"),
    "smollm2-1.7b": Preset(_llama(49152, 2048, 8192, 24, 32, 32, True), 1_711_376_384, _HF + " (1.71B)"),
    "mistral-7b": Preset(_with(_llama(32000, 4096, 14336, 32, 32, 8), model_type="mistral", sliding_window=None),
                         7_241_732_096, _HF + " (7.24B)"),
    "mixtral-8x7b": Preset(_with(_llama(32000, 4096, 14336, 32, 32, 8), model_type="mixtral", num_local_experts=8,
                                 num_experts_per_tok=2, sliding_window=None), 46_702_792_704, _HF + " (46.7B)"),
    "qwen2.5-0.5b": Preset(_with(_llama(151936, 896, 4864, 24, 14, 2, True), model_type="qwen2"),
                           494_032_768, _HF + " (494M)"),
    "qwen2.5-1.5b": Preset(_with(_llama(151936, 1536, 8960, 28, 12, 2, True), model_type="qwen2"),
                           1_543_714_304, _HF + " (1.54B)"),
    "qwen2.5-7b": Preset(_with(_llama(152064, 3584, 18944, 28, 28, 4), model_type="qwen2"),
                         7_615_616_512, _HF + " (7.62B)"),
    "qwen3-0.6b": Preset(_with(_llama(151936, 1024, 3072, 28, 16, 8, True), model_type="qwen3", head_dim=128),
                         596_049_920, "Qwen3 technical report / model card (0.6B, 0.44B non-embedding)"),
    "qwen3-8b": Preset(_with(_llama(151936, 4096, 12288, 36, 32, 8), model_type="qwen3", head_dim=128),
                       8_190_735_360, _HF + " (8.19B)"),
    "qwen3-30b-a3b": Preset(_with(_llama(151936, 2048, 6144, 48, 32, 4), model_type="qwen3_moe", head_dim=128,
                                  num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
                            30_532_122_624, _HF + " (30.5B total, 3.3B active)"),
    "gemma-2b": Preset(dict(model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                            num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256),
                       2_506_172_416, _HF + " (2.51B)"),
    "gemma-7b": Preset(dict(model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256),
                       8_537_680_896, _HF + " (8.54B)"),
    "gemma-2-2b": Preset(dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                              num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                              sliding_window=4096, final_logit_softcapping=30.0), 2_614_341_888, _HF + " (2.61B)"),
    "gemma-2-9b": Preset(dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                              num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                              sliding_window=4096, final_logit_softcapping=30.0), 9_241_705_984, _HF + " (9.24B)"),
    "gemma-3-1b": Preset(dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                              num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                              sliding_window=512, sliding_window_pattern=6), 999_885_952, _HF + " (1.00B)"),
    "phi-3-mini": Preset(dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
                         3_821_079_552, _HF + " (3.82B)"),
    "gpt2": Preset(dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
                   124_439_808, "GPT-2 small, model.num_parameters() (124M)"),
    "gpt2-medium": Preset(dict(model_type="gpt2", vocab_size=50257, n_embd=1024, n_layer=24, n_head=16,
                               n_positions=1024), 354_823_168, "GPT-2 medium (355M)"),
    "gpt2-large": Preset(dict(model_type="gpt2", vocab_size=50257, n_embd=1280, n_layer=36, n_head=20,
                              n_positions=1024), 774_030_080, "GPT-2 large (774M)"),
    "gpt2-xl": Preset(dict(model_type="gpt2", vocab_size=50257, n_embd=1600, n_layer=48, n_head=25,
                           n_positions=1024), 1_557_611_200, "GPT-2 XL (1.56B)"),
    "pythia-160m": Preset(dict(model_type="gpt_neox", vocab_size=50304, hidden_size=768, intermediate_size=3072,
                               num_hidden_layers=12, num_attention_heads=12), 162_322_944, "Pythia paper Table 1 / model card (162M)"),
    "pythia-1b": Preset(dict(model_type="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=8), 1_011_781_632, "Pythia paper Table 1 / model card (1.01B)"),
    "falcon-7b": Preset(dict(model_type="falcon", vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
                             num_attention_heads=71, multi_query=True, parallel_attn=True, bias=False),
                        6_921_720_704, _HF + " (6.92B)"),
}
