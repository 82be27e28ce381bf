"""llmtune's own GGML packing (q8_0, q4_0, bf16) is byte-identical to the gguf package's reference quantizers."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llmtune.core.errors import InvalidOptionError  # noqa: E402
from llmtune.export import quants  # noqa: E402

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py

T = gguf.GGMLQuantizationType


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((48, 96)).astype(np.float32)
    edge = normal.copy()
    edge[0, :32] = 0.0                                  # an all-zero block (d = 0)
    edge[1, :32] = np.round(edge[1, :32] * 2) / 2       # halves: ties for the rounding
    edge[2, :32] = -np.abs(edge[2, :32])                # all negative: q4_0's signed max
    edge[3, 3] = edge[3, 7] = 5.0                       # two equal maxima
    edge[4, :] = 1e-30                                  # subnormal-ish scales
    big = (rng.standard_normal((4, 256)) * 1e4).astype(np.float32)
    return [normal, edge, big, rng.standard_normal((3, 2, 64)).astype(np.float32)]


@pytest.mark.parametrize("case", range(4))
def test_q8_0_equals_gguf_reference(case: int) -> None:
    x = _cases()[case]
    np.testing.assert_array_equal(quants.quantize_q8_0(x), gguf.quants.quantize(x, T.Q8_0))


@pytest.mark.parametrize("case", range(4))
def test_q4_0_equals_gguf_reference(case: int) -> None:
    x = _cases()[case]
    np.testing.assert_array_equal(quants.quantize_q4_0(x), gguf.quants.quantize(x, T.Q4_0))


@pytest.mark.parametrize("case", range(4))
def test_bf16_equals_gguf_reference_including_nan(case: int) -> None:
    x = _cases()[case].copy()
    x.reshape(-1)[5] = np.nan
    x.reshape(-1)[6] = np.inf
    ours = quants.to_bf16_bits(x)
    ref = gguf.quants.quantize(x, T.BF16)
    np.testing.assert_array_equal(ours.view(np.uint8).reshape(-1), ref.view(np.uint8).reshape(-1))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_dequantize_equals_gguf_and_error_is_bounded(kind: str) -> None:
    x = _cases()[0]
    packed = quants.quantize_q8_0(x) if kind == "q8_0" else quants.quantize_q4_0(x)
    ours = quants.dequantize(packed, kind)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(packed, T[kind.upper()]))
    scale = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    # q8_0: half a step (+ the float16 rounding of d); q4_0: a full step at the clipped end (+8 d stored as +7 d)
    bound = scale / 127 * 0.6 if kind == "q8_0" else scale / 8
    assert (np.abs(ours.reshape(-1, 32) - x.reshape(-1, 32)) <= bound * (1 + 1e-3)).all()


def test_rows_not_a_multiple_of_32_are_refused() -> None:
    with pytest.raises(InvalidOptionError, match="blocks of 32"):
        quants.quantize_q8_0(np.zeros((2, 40), dtype=np.float32), "blk.0.x")


def test_import_llmtune_export_is_light() -> None:
    import json
    import subprocess
    import sys

    code = ("import sys, json, llmtune; llmtune.export.check_vllm; "
            "print(json.dumps([m for m in ('torch', 'transformers', 'peft', 'gguf', 'numpy') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []
