"""bitsandbytes quantizers: options (defaults, validation), skip-list matching, BitsAndBytesConfig fields."""

from __future__ import annotations

import pytest

import llmtune
from llmtune.core.errors import InvalidOptionError, UnknownOptionError

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from llmtune.quantizers.bnb import (
    FP4Quantizer,
    INT8Quantizer,
    NF4Quantizer,
    hf_skip_regex,
    skip_matches,
)

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py


def test_registry_resolves_the_three_names_to_bnb() -> None:
    assert type(llmtune.get_quantizer("nf4")) is NF4Quantizer
    assert type(llmtune.get_quantizer("fp4", backend="bnb")) is FP4Quantizer
    assert type(llmtune.get_quantizer("int8")) is INT8Quantizer
    for cls in (NF4Quantizer, FP4Quantizer, INT8Quantizer):
        assert cls.backend == "bnb" and cls.trainable is True


def test_defaults_are_the_documented_ones() -> None:
    o = llmtune.get_quantizer("nf4").options
    assert (o.compute_dtype, o.double_quant, o.blocksize, o.quant_storage, o.skip_modules) == (
        "auto", True, 64, "uint8", ("lm_head",)
    )
    i = llmtune.get_quantizer("int8").options
    assert (i.threshold, i.has_fp16_weights, i.skip_modules) == (6.0, False, ("lm_head",))


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("nf4", {"compute_dtype": "float64"}, "compute_dtype"),
        ("nf4", {"compute_dtype": "bf16"}, "compute_dtype"),
        ("fp4", {"double_quant": "yes"}, "double_quant"),
        ("nf4", {"blocksize": 100}, "blocksize"),
        ("nf4", {"blocksize": 16}, "blocksize"),
        ("nf4", {"blocksize": 64.0}, "blocksize"),
        ("nf4", {"blocksize": True}, "blocksize"),
        ("fp4", {"quant_storage": "int4"}, "quant_storage"),
        ("nf4", {"skip_modules": "lm_head"}, "skip_modules"),
        ("nf4", {"skip_modules": ["lm_head", ""]}, "skip_modules[1]"),
        ("int8", {"skip_modules": [3]}, "skip_modules[0]"),
        ("int8", {"threshold": -1.0}, "threshold"),
        ("int8", {"threshold": float("nan")}, "threshold"),
        ("int8", {"threshold": "6"}, "threshold"),
        ("int8", {"has_fp16_weights": 0}, "has_fp16_weights"),
    ],
)
def test_bad_option_values_name_the_option(name: str, options: dict, field: str) -> None:
    with pytest.raises(InvalidOptionError) as info:
        llmtune.get_quantizer(name, **options)
    message = str(info.value)
    assert f"option {field}=" in message and f"quantizer {name!r} (backend 'bnb')" in message


def test_options_of_the_other_kind_are_unknown() -> None:
    with pytest.raises(UnknownOptionError, match="threshold"):
        llmtune.get_quantizer("nf4", threshold=6.0)
    with pytest.raises(UnknownOptionError, match="Did you mean 'blocksize'"):
        llmtune.get_quantizer("fp4", block_size=64)
    with pytest.raises(UnknownOptionError, match="blocksize"):
        llmtune.get_quantizer("int8", blocksize=64)


def test_skip_modules_list_becomes_a_tuple_and_every_blocksize_is_accepted() -> None:
    assert llmtune.get_quantizer("nf4", skip_modules=["lm_head", "mlp.*"]).options.skip_modules == ("lm_head", "mlp.*")
    assert llmtune.get_quantizer("nf4", skip_modules=[]).options.skip_modules == ()
    for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        assert llmtune.get_quantizer("nf4", blocksize=bs).options.blocksize == bs
    assert llmtune.get_quantizer("int8", threshold=0).options.threshold == 0.0


NAMES = [
    "lm_head", "model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.10.mlp.up_proj",
    "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj", "head",
]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("lm_head", {"lm_head"}),
        ("head", {"head"}),  # a suffix must start at a dot: "head" does not select lm_head
        ("proj", set()),
        ("down_proj", {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
        ("1.mlp.down_proj", {"model.layers.1.mlp.down_proj"}),
        ("model.layers.1", {"model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj",
                            "model.layers.1.self_attn.q_proj"}),
        ("*.self_attn.*", {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                           "model.layers.1.self_attn.q_proj"}),
        ("model.layers.1?.*", {"model.layers.10.mlp.up_proj"}),
        ("*_head", {"lm_head"}),
    ],
)
def test_skip_matching_and_its_transformers_regex_select_the_same_modules(pattern: str, expected: set) -> None:
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert {n for n in NAMES if skip_matches(pattern, n)} == expected
    # transformers' own matcher, fed our regex, skips exactly the same names
    assert {n for n in NAMES if not should_convert_module(n, [hf_skip_regex(pattern)])} == expected


def test_hf_config_sets_every_field_explicitly() -> None:
    import torch

    cfg = llmtune.get_quantizer("nf4", compute_dtype="float16", double_quant=False).hf_quantization_config()
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant is False
    assert cfg.bnb_4bit_compute_dtype == torch.float16 and cfg.bnb_4bit_quant_storage == torch.uint8
    assert cfg.llm_int8_skip_modules == [hf_skip_regex("lm_head")]
    fp4 = llmtune.get_quantizer("fp4", compute_dtype="bfloat16").hf_quantization_config()
    assert fp4.bnb_4bit_quant_type == "fp4" and fp4.bnb_4bit_use_double_quant is True
    assert fp4.bnb_4bit_compute_dtype == torch.bfloat16
    i8 = llmtune.get_quantizer("int8", threshold=4.0, skip_modules=[]).hf_quantization_config()
    assert i8.load_in_8bit and not i8.load_in_4bit
    assert (i8.llm_int8_threshold, i8.llm_int8_has_fp16_weight, i8.llm_int8_skip_modules) == (4.0, False, [])


def test_hf_config_refuses_a_blocksize_transformers_cannot_use() -> None:
    with pytest.raises(InvalidOptionError, match=r"blocksize=128.*always uses blocks of 64"):
        llmtune.get_quantizer("nf4", blocksize=128).hf_quantization_config()


def test_auto_compute_dtype_resolves_by_device() -> None:
    import torch

    from llmtune.quantizers.bnb import resolve_compute_dtype

    assert resolve_compute_dtype("auto", "cpu") == "float32"
    assert resolve_compute_dtype("float16", "cpu") == "float16"
    assert resolve_compute_dtype("bfloat16", "cuda") == "bfloat16"
    # for load-time quantization "auto" means: where from_pretrained puts the model by default
    expected = torch.float32
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert llmtune.get_quantizer("nf4").hf_quantization_config().bnb_4bit_compute_dtype == expected
