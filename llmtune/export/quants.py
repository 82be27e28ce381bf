"""GGML block formats written by llmtune itself: ``q8_0`` and ``q4_0`` (32 weights per block), plus bf16/f16.

Layouts (ggml-common.h, ``block_q8_0`` / ``block_q4_0``), one block per 32 consecutive weights of a row:

* ``q8_0``: ``d`` (float16) then 32 int8 ``q``; ``d = max|x| / 127``, ``q = round(x / d)`` (halves away from zero);
  34 bytes per block, weight = ``d * q``.
* ``q4_0``: ``d`` (float16) then 16 bytes of nibbles; ``d = m / -8`` where ``m`` is the weight of largest
  magnitude (sign kept), ``q = min(15, trunc(x / d + 8.5))``; byte ``j`` holds weight ``j`` in its low nibble and
  weight ``j + 16`` in its high nibble; 18 bytes per block, weight = ``d * (q - 8)``.

Arithmetic is float32 in the order ggml's reference quantizer uses, so the bytes equal ``gguf.quants.quantize``
(the tests check this). NumPy only: no torch, no gguf needed here.
"""

from __future__ import annotations

import numpy as np

from llmtune.core.errors import InvalidOptionError

BLOCK = 32
#: Bytes per block of each block format.
BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}


def _blocks(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` (rows x columns, float) as float32 blocks of 32, one per row of the result."""
    if x.ndim < 1 or x.shape[-1] % BLOCK:
        raise InvalidOptionError(f"{what}: rows of {x.shape[-1] if x.ndim else 0} values cannot be cut into "
                                 f"blocks of {BLOCK}; keep this tensor in f16")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, BLOCK)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: to the nearest integer, halves away from zero."""
    return np.copysign(np.floor(np.abs(v) + np.float32(0.5)), v)


def quantize_q8_0(x: np.ndarray, what: str = "tensor") -> np.ndarray:
    """``x`` packed as q8_0: uint8 array of shape ``(*x.shape[:-1], x.shape[-1] // 32 * 34)``."""
    b = _blocks(x, what)
    d = (np.abs(b).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _round_half_away((b * inv).astype(np.float32)).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * BLOCK_BYTES["q8_0"])


def quantize_q4_0(x: np.ndarray, what: str = "tensor") -> np.ndarray:
    """``x`` packed as q4_0: uint8 array of shape ``(*x.shape[:-1], x.shape[-1] // 32 * 18)``."""
    b = _blocks(x, what)
    m = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    d = (m / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(np.trunc((b * inv).astype(np.float32) + np.float32(8.5)), 15).astype(np.uint8)
    packed = q[:, : BLOCK // 2] | (q[:, BLOCK // 2:] << np.uint8(4))
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * BLOCK_BYTES["q4_0"])


def dequantize(packed: np.ndarray, kind: str) -> np.ndarray:
    """The float32 weights a q8_0/q4_0 array stands for (shape: rows x columns)."""
    if kind not in BLOCK_BYTES:
        raise InvalidOptionError(f"kind={kind!r} is not one of {', '.join(BLOCK_BYTES)}")
    rows = packed.reshape(-1, BLOCK_BYTES[kind])
    d = rows[:, :2].copy().view(np.float16).astype(np.float32)
    if kind == "q8_0":
        q = rows[:, 2:].copy().view(np.int8).astype(np.float32)
    else:
        nib = rows[:, 2:]
        q = np.concatenate([nib & np.uint8(15), nib >> np.uint8(4)], axis=1).astype(np.float32) - 8
    cols = packed.shape[-1] // BLOCK_BYTES[kind] * BLOCK
    return (d * q).reshape(*packed.shape[:-1], cols)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept quiet (ggml's conversion)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = ((n.astype(np.uint64) + (np.uint64(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint64(16))
    quiet = (n >> np.uint32(16)) | np.uint32(64)
    return np.where(nan, quiet, rounded).astype(np.uint16)
