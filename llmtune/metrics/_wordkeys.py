"""Distinct words of a byte buffer as dense integer ids, with NumPy only (shared by ROUGE and BLEU).

A word (a run of bytes, at most `MAX_KEY_BYTES` long) is packed into little-endian uint64 columns, hashed,
and grouped with one ``np.sort`` of ``hash << bits | index``; each group is then checked to hold one distinct
word, so a hash collision only costs the exact (slower) path, never a wrong id. Longer words get an id from a
dict. `sort_with_order` is the same packed sort for any non-negative integer keys.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_KEY_BYTES", "heads", "key_columns", "sort_with_order", "word_ids", "word_types"]

_CHUNK = 8  # bytes of a word per uint64 key column
MAX_KEY_BYTES = 16  # longer words get an id from a dict instead of key columns
#: per key column k, per word length (capped at `MAX_KEY_BYTES`), the mask of the word's bytes in that column
_LOW_BYTES = np.array([[(1 << (8 * min(max(n - _CHUNK * k, 0), _CHUNK))) - 1 for n in range(MAX_KEY_BYTES + 1)]
                       for k in range(MAX_KEY_BYTES // _CHUNK)], dtype=np.uint64)
#: odd multipliers mixing the key columns into one hash (collisions are detected, then resolved exactly)
_WINDOW = np.dtype((np.void, _CHUNK))
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64)


def key_columns(data: bytes, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Each word as little-endian uint64 columns of its bytes (8 per column, zero-padded), shape (k, words); a
    word longer than `MAX_KEY_BYTES` becomes ``(0xFF << 56 | i, 0, ...)``, ``i`` its distinct index (no word
    byte is 0xFF)."""
    long_words = lens > MAX_KEY_BYTES
    n = len(starts)
    capped = np.minimum(lens, MAX_KEY_BYTES, out=np.empty(n, dtype=np.uint8), casting="unsafe")
    longest = int(lens.max(where=~long_words, initial=0))
    width = max(1, -(-longest // _CHUNK))
    raw = data + bytes(_CHUNK * width)
    cols = np.empty((width, n), dtype=np.uint64)
    mask = np.empty(n, dtype=np.uint64)
    at = np.ascontiguousarray(starts)  # np.take copies strided indices on every call
    for k in range(width):  # column k: the 8 bytes from each start + 8k, as one unaligned "void" read per word
        windows = np.ndarray(shape=(len(raw) - _CHUNK * (k + 1) + 1,), dtype=_WINDOW, buffer=raw,
                             offset=_CHUNK * k, strides=(1,))
        np.take(windows, at, out=cols[k].view(_WINDOW))
        cols[k] &= np.take(_LOW_BYTES[k], capped, out=mask)
    if long_words.any():
        where = np.flatnonzero(long_words)
        ids: dict[bytes, int] = {}
        text = [ids.setdefault(data[s:s + n], len(ids)) for s, n in zip(starts[where].tolist(), lens[where].tolist())]
        cols[:, where] = 0
        cols[0, where] = np.uint64(0xFF << 56) | np.asarray(text, dtype=np.uint64)
    return cols


def sort_with_order(keys: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted keys, order)`` of non-negative integer keys below ``2**key_bits``, like ``keys[argsort]``;
    when the key and its index fit in 64 bits together, one ``np.sort`` of ``key << bits | index`` (much faster
    than ``argsort``). Equal keys keep their index order."""
    n = len(keys)
    idx_bits = max(1, (n - 1).bit_length())
    if key_bits + idx_bits > 64:
        order = np.argsort(keys, kind="stable")
        return keys[order], order
    packed = keys.astype(np.uint64)  # a copy: the caller's keys stay as they are
    packed <<= np.uint64(idx_bits)
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    low = np.bitwise_and(packed, np.uint64((1 << idx_bits) - 1))
    packed >>= np.uint64(idx_bits)
    if keys.dtype == np.int64:  # the keys are below 2**63: the same bits
        return packed.view(np.int64), low.view(np.int64)
    return packed.astype(keys.dtype, copy=False), low.view(np.int64)


def heads(sorted_keys: np.ndarray) -> np.ndarray:
    """Bool per position of a sorted array: does a new value start here?"""
    head = np.empty(len(sorted_keys), dtype=bool)
    head[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=head[1:])
    return head


def word_types(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(type, first)``: a dense id per word (column of ``cols``, shape (k, words)) and one occurrence of each id.

    Words are grouped by a 64-bit hash (its top bits, with each word's index in the low bits, sorted once); every
    group is then checked to hold one distinct word, else the words are ranked exactly (``np.unique(axis=0)``).
    """
    n = cols.shape[1]
    h = np.multiply(cols[0], _MIX[0])
    tmp = np.empty_like(h)
    for k in range(1, len(cols)):
        h += np.multiply(cols[k], _MIX[k % len(_MIX)], out=tmp)
    idx_bits = max(1, (n - 1).bit_length())
    h >>= np.uint64(idx_bits)
    sorted_h, order = sort_with_order(h, 64 - idx_bits)
    del h, tmp
    head = heads(sorted_h)
    del sorted_h
    differs = np.zeros(max(n - 1, 0), dtype=bool)
    ordered = np.empty(n, dtype=np.uint64)
    for col in cols:
        np.take(col, order, out=ordered)
        differs |= ordered[1:] != ordered[:-1]
    del ordered
    if (differs & ~head[1:]).any():  # a hash collision: exact ranks
        _, types = np.unique(cols.T, axis=0, return_inverse=True)
        types = types.reshape(-1)
        first = np.empty(int(types.max(initial=-1)) + 1, dtype=np.int64)
        first[types] = np.arange(n)
        return types, first
    types = np.empty(n, dtype=np.int64)
    rank = np.cumsum(head)
    rank -= 1
    types[order] = rank
    return types, order[head]


def word_ids(data: bytes, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(type, first)`` of the words ``data[starts[i]:ends[i]]``: equal words get equal dense ids; ``first``
    holds one occurrence of each id (see `word_types`)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return word_types(key_columns(data, starts, ends - starts))
