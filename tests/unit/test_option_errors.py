"""Option errors name their field as an attribute (``InvalidOptionError.field``), not only in the message."""

from __future__ import annotations

import pytest

import llmtune
from llmtune.core.errors import InvalidOptionError, LlmtuneError, UnknownOptionError
from llmtune.core.options import check_positive


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("gptq", {"bits": 5}, "bits"),
        ("gptq", {"group_size": 0}, "group_size"),
        ("gptq", {"damp_percent": 1.5}, "damp_percent"),
        ("gptq", {"block_size": 0}, "block_size"),
        ("gptq", {"act_order": True, "desc_act": False}, "desc_act"),
        ("rtn", {"skip_modules": "lm_head"}, "skip_modules"),
        ("rtn", {"checkpoint_format": "v3"}, "checkpoint_format"),
        ("nf4", {"blocksize": 48}, "blocksize"),
        ("nf4", {"skip_modules": [" lm_head"]}, "skip_modules"),
        ("int8", {"threshold": -1.0}, "threshold"),
    ],
)
def test_quantizer_option_errors_carry_the_field(name: str, options: dict, field: str) -> None:
    with pytest.raises(InvalidOptionError) as info:
        llmtune.get_quantizer(name, **options)
    assert info.value.field == field
    assert isinstance(info.value, LlmtuneError)
    assert name in str(info.value)  # build_options prefixes where, and keeps the field


def test_unknown_option_error_carries_the_key() -> None:
    with pytest.raises(UnknownOptionError) as info:
        llmtune.get_quantizer("rtn", group_sizee=32)
    assert info.value.field == "group_sizee" and "group_size" in str(info.value)


def test_rtn_takes_no_gptq_solver_options() -> None:
    with pytest.raises(UnknownOptionError, match="true_sequential"):
        llmtune.get_quantizer("rtn", true_sequential=True)
    assert llmtune.get_quantizer("rtn").options.true_sequential is False
    assert llmtune.get_quantizer("gptq").options.true_sequential is True


def test_check_positive() -> None:
    check_positive("lr", 1e-3, float)
    check_positive("warmup", 0, zero_ok=True)
    for value in (0, -1, float("inf"), float("nan")):
        with pytest.raises(InvalidOptionError) as info:
            check_positive("lr", value, (int, float))
        assert info.value.field == "lr"
    with pytest.raises(InvalidOptionError, match="must be int"):
        check_positive("rank", True)
