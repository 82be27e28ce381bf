"""GPTQ int32 packing: round trips, the v1 zero offset, and known words."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmtune.quantizers.gptq.packing import (  # noqa: E402
    pack_cols,
    pack_rows,
    pack_zeros,
    unpack_cols,
    unpack_rows,
    unpack_zeros,
)

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rows_and_cols_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96 + (16 if bits != 3 else 0), 40), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (codes.shape[0] * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits), codes.to(torch.int32))
    z = torch.randint(0, 2**bits, (3, 64), generator=g)
    assert pack_cols(z, bits).shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_cols(pack_cols(z, bits), bits), z.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_zeros_round_trip_including_zero_points_of_zero(bits: int, fmt: str) -> None:
    g = torch.Generator().manual_seed(10 + bits)
    z = torch.randint(0, 2**bits, (4, 64), generator=g)
    z[0] = 0  # asymmetric grids can have zero point 0: v1 stores -1 there
    z[1] = 2**bits - 1
    assert torch.equal(unpack_zeros(pack_zeros(z, bits, fmt), bits, fmt), z.to(torch.int32))


def test_known_words() -> None:
    # Eight 4-bit codes 0..7 in one word, code j at bits 4j..4j+3 (lowest first).
    codes = torch.arange(32).remainder(8).reshape(32, 1)
    assert int(pack_rows(codes, 4)[0, 0]) == 0x76543210
    # Symmetric 4-bit zero point 8, v1 stores 7 in every nibble; v2 stores 8.
    z = torch.full((1, 8), 8)
    assert int(pack_zeros(z, 4, "gptq")[0, 0]) == 0x77777777
    assert int(pack_zeros(z, 4, "gptq_v2")[0, 0]) == 0x88888888 - 2**32
    # 8-bit: value 255 in the top byte makes the int32 negative (two's complement storage).
    assert int(pack_rows(torch.tensor([[0], [0], [0], [255]] * 8), 8)[0, 0]) == -(2**24)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(30, 4, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(16, 4, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_rows(torch.full((32, 1), 16), 4)
    with pytest.raises(ValueError, match="bits=5"):
        pack_rows(torch.zeros(32, 1, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="checkpoint_format"):
        pack_zeros(torch.zeros(1, 8, dtype=torch.int64), 4, "v3")
