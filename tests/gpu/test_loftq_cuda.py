"""LoftQ initialisation through llmtune's LoRA options (PEFT runs it on CUDA only)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from llmtune.trainers.methods import peft_methods as pm  # noqa: E402

DIMS = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False}


def tiny(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**DIMS)).eval()


def logits(model: Any, tokens: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_loftq_initialisation_compensates_the_quantization_error() -> None:
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    base = tiny()
    opts = pm.LoraVariantOptions(rank=8, init="loftq", loftq_bits=4, loftq_iter=2, dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), opts.peft_config())
    ref = logits(base, tokens)
    with_adapter = (logits(model, tokens) - ref).norm().item()
    with model.disable_adapter():
        quantized_only = (logits(model, tokens) - ref).norm().item()
    assert with_adapter < quantized_only  # Q + sBA is closer to W than Q alone
