"""The GGUF family table: unknown families are refused naming what is missing; Llama 3.1's rope_freqs agree with
transformers' own llama3 rope scaling."""

from __future__ import annotations

import pytest

from llmtune.export import ExportError
from llmtune.export.families import FAMILIES, family, llama3_rope_factors

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("model_type", "missing"), [("mixtral", "mixture-of-experts"), ("gemma3", "vision tower"),
                                                     ("falcon", "not mapped")])
def test_a_family_not_written_is_refused_naming_what_is_missing(model_type: str, missing: str) -> None:
    with pytest.raises(ExportError, match=missing) as info:
        family({"model_type": model_type})
    assert "--format hf" in str(info.value) and "gemma3_text" in str(info.value)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_written_family_is_a_transformers_model_type(model_type: str) -> None:
    from transformers import AutoConfig

    assert AutoConfig.for_model(model_type).model_type == model_type


@pytest.mark.parametrize("rope", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
     "rope_theta": 500000.0},                                                      # Llama 3.1 8B
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
     "rope_theta": 500000.0},                                                      # Llama 3.2 1B/3B
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
     "rope_theta": 10000.0},                                                       # the tests' toy setting
])
def test_llama3_rope_freqs_divide_transformers_frequencies_into_the_scaled_ones(rope: dict[str, float]) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters={"rope_type": "llama3", **rope})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = 2048 // 32
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    (name, factors), = llama3_rope_factors(config.to_dict())
    assert name == "rope_freqs.weight" and factors.shape == (dim // 2,)
    # llama.cpp divides each frequency by its factor: that must be transformers' scaled frequency
    torch.testing.assert_close(plain / torch.from_numpy(factors), scaled.float(), rtol=1e-5, atol=0)


def test_a_gemma_attention_scale_llama_cpp_would_not_use_is_refused() -> None:
    from llmtune.export.families import FAMILIES

    hp = {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
          "query_pre_attn_scalar": 256}
    with pytest.raises(ExportError, match="query_pre_attn_scalar=256"):
        FAMILIES["gemma2"].write_hparams(None, hp, 1)
