"""Pack and unpack integer codes in the standard GPTQ int32 layout (shared by AutoGPTQ, GPTQModel, transformers).

Layout, for ``bits`` in {2, 3, 4, 8}:

* ``qweight`` int32 ``[in * bits / 32, out]``: along the *input* dimension, every run of 32 codes is one
  little-endian bit stream of ``bits`` 32-bit words: code ``j`` of the run occupies stream bits
  ``[j*bits, (j+1)*bits)``, i.e. word ``j*bits // 32`` at shift ``j*bits % 32`` (3-bit codes straddle words).
* ``qzeros`` int32 ``[groups, out * bits / 32]``: the same packing along the *output* dimension.
* Zero points: checkpoint format ``"gptq"`` (v1, what transformers and GPTQModel read by default) stores
  ``zero - 1`` (the historical AutoGPTQ offset); ``"gptq_v2"`` stores the zero itself. For 2/4/8 bits the
  v1 words are the v2 words minus ``0b…0001 0001`` (a whole-word integer subtraction, exactly as
  GPTQModel's ``convert_gptq_v2_to_v1_format`` writes them and its loader adds back); for 3 bits each field
  is shifted modulo 8 (GPTQModel >= 7 does the same, because 3-bit fields straddle words).
"""

from __future__ import annotations

import torch

from llmtune.core.errors import InvalidOptionError
from llmtune.core.options import check_choice
from llmtune.quantizers.gptq import CHECKPOINT_FORMATS, SUPPORTED_BITS

__all__ = ["CHECKPOINT_FORMATS", "SUPPORTED_BITS", "pack_cols", "pack_rows", "pack_zeros", "unpack_cols", "unpack_rows",
           "unpack_zeros"]

_U32 = 1 << 32


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise InvalidOptionError(f"bits={bits!r} is not supported; GPTQ packing supports {SUPPORTED_BITS}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2**32) as int32 (two's complement), as the format stores them."""
    words = words % _U32
    return torch.where(words >= (1 << 31), words - _U32, words).to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    """int32 words as non-negative int64 values in [0, 2**32)."""
    return words.to(torch.int64) % _U32


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[n, m]`` (values in [0, 2**bits)) along dim 0 into int32 ``[n*bits/32, m]``."""
    _check_bits(bits)
    n, m = codes.shape
    if (n * bits) % 32:
        raise InvalidOptionError(f"cannot pack {n} {bits}-bit codes into whole int32 words: the packed dimension "
                         f"times bits ({n * bits}) must be a multiple of 32")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise InvalidOptionError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    chunks = -(-n // 32)
    if chunks * 32 != n:  # pad to whole runs of 32 codes; the padding words are dropped below
        c = torch.cat([c, c.new_zeros(chunks * 32 - n, m)])
    c = c.reshape(chunks, 32, m)
    out = torch.zeros(chunks, bits, m, dtype=torch.int64, device=codes.device)
    for j in range(32):
        offset = j * bits
        word, shift = divmod(offset, 32)
        out[:, word] |= (c[:, j] << shift) % _U32
        spill = shift + bits - 32
        if spill > 0:  # the code's high bits continue in the next word
            out[:, word + 1] |= c[:, j] >> (bits - spill)
    return _to_int32(out.reshape(chunks * bits, m)[: n * bits // 32])


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 ``[n*bits/32, m]`` to int32 codes ``[n, m]``."""
    _check_bits(bits)
    rows, m = packed.shape
    n = rows * 32 // bits
    w = _to_uint(packed)
    chunks = -(-rows // bits)
    if chunks * bits != rows:
        w = torch.cat([w, w.new_zeros(chunks * bits - rows, m)])
    w = w.reshape(chunks, bits, m)
    mask = (1 << bits) - 1
    out = torch.empty(chunks, 32, m, dtype=torch.int64, device=packed.device)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        value = w[:, word] >> shift
        spill = shift + bits - 32
        if spill > 0:
            value = value | (w[:, word + 1] << (bits - spill))
        out[:, j] = value & mask
    return out.reshape(chunks * 32, m)[:n].to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[g, n]`` along dim 1 into int32 ``[g, n*bits/32]`` (the ``qzeros`` layout)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_cols`."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def _ones_pattern(bits: int) -> int:
    """The int32 word with a 1 in the lowest bit of every field (2/4/8 bits)."""
    return sum(1 << (bits * j) for j in range(32 // bits))


def pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Zero points ``[groups, out]`` (integers in [0, 2**bits)) to ``qzeros`` in the given checkpoint format."""
    check_choice("checkpoint_format", checkpoint_format, CHECKPOINT_FORMATS)
    if checkpoint_format == "gptq_v2":
        return pack_cols(zeros, bits)
    if bits == 3:
        return pack_cols((zeros.to(torch.int64) - 1) % 8, bits)
    v2 = pack_cols(zeros, bits)
    return _to_int32(_to_uint(v2) - _ones_pattern(bits))


def unpack_zeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """``qzeros`` in the given checkpoint format back to integer zero points ``[groups, out]``."""
    check_choice("checkpoint_format", checkpoint_format, CHECKPOINT_FORMATS)
    if checkpoint_format == "gptq_v2":
        return unpack_cols(qzeros, bits)
    if bits == 3:
        return (unpack_cols(qzeros, bits) + 1) % 8
    return unpack_cols(_to_int32(_to_uint(qzeros) + _ones_pattern(bits)), bits)
