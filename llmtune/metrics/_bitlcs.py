"""Bit-parallel LCS for many sequence pairs at once, vectorised with NumPy ``uint64`` (short sequences).

For each pair ``(a, b)`` with ``len(a) <= 63``, the Allison-Dix / Hyyro recurrence runs over the tokens of
``b`` with one 64-bit word per pair, all pairs in lock-step:

    U = V & M[b_j];  V = (V + U) | (V - U)        (V starts as len(a) ones)

after which ``LCS = len(a) - popcount(V)``. Column ``V_j`` also encodes rouge-score's LCS table column ``j``
(``t[i][j] = t[i-1][j] + 1`` exactly when bit ``i-1`` of ``V_j`` is 0), so rouge-score's back-tracking
(diagonal on equal tokens, else left when ``t[i][j-1] > t[i-1][j]``, else up) can be replayed in lock-step
too: at column ``j`` the walk moves to the highest row ``i' <= i`` that is a match or has a 0 bit.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 63  # V + U must not overflow 64 bits
_CELLS_PER_CHUNK = 1 << 21  # bound on pairs x columns held at once (16 MB of uint64 columns)
_ONE = np.uint64(1)

if hasattr(np, "bitwise_count"):  # NumPy >= 2.0

    def popcount(x: np.ndarray) -> np.ndarray:
        """Number of set bits of each ``uint64``."""
        return np.bitwise_count(x).astype(np.int64)

else:  # pragma: no cover - NumPy 1.x
    _BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)

    def popcount(x: np.ndarray) -> np.ndarray:
        """Number of set bits of each ``uint64``."""
        b = np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(-1, 8)
        return _BYTE_BITS[b].sum(axis=1)


def bit_length(x: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of each nonzero ``uint64`` below 2**63 (float exponent, corrected for rounding up)."""
    e = np.frexp(x.astype(np.float64))[1].astype(np.int64)
    rounded_up = (x >> (e - 1).astype(np.uint64)) == 0
    return e - rounded_up


def lcs_batch(
    tokens: np.ndarray,
    a_start: np.ndarray,
    a_len: np.ndarray,
    b_start: np.ndarray,
    b_len: np.ndarray,
    vocab_size: int,
    backtrack: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LCS of ``tokens[a_start:a_start+a_len]`` and ``tokens[b_start:b_start+b_len]`` for every pair.

    Needs ``1 <= a_len <= 63`` and ``b_len >= 1``; sequences with the same ``a_start`` must be the same.
    Returns ``(lcs, pair, position)``: the LCS lengths, and with ``backtrack`` the positions in ``a`` (0-based)
    of the LCS that rouge-score's ``_backtrack_norec`` picks, as parallel arrays (pair index, position).
    """
    n_pairs = len(a_start)
    lcs = np.zeros(n_pairs, dtype=np.int64)
    found_pair: list[np.ndarray] = []
    found_pos: list[np.ndarray] = []
    if n_pairs == 0:
        return lcs, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # Position masks of every token of every distinct `a`, keyed by (a_start, token).
    starts, first = np.unique(a_start, return_index=True)
    lens = a_len[first]
    owner = np.repeat(starts, lens)
    offset = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    keys = owner * vocab_size + tokens[owner + offset]
    bits = np.left_shift(_ONE, offset.astype(np.uint64))
    order = np.argsort(keys, kind="stable")
    keys, bits = keys[order], bits[order]
    head = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    table_keys = keys[head]
    table_masks = np.bitwise_or.reduceat(bits, head)

    # Pairs in order of b length, in chunks, so that short pairs do not pay for the longest b.
    by_len = np.argsort(b_len, kind="stable")
    sorted_len = b_len[by_len]
    pos = 0
    while pos < n_pairs:
        end = min(n_pairs, pos + max(1, _CELLS_PER_CHUNK // int(sorted_len[pos])))
        while end - pos > 1 and (end - pos) * int(sorted_len[end - 1]) > _CELLS_PER_CHUNK:
            end = pos + max(1, _CELLS_PER_CHUNK // int(sorted_len[end - 1]))
        _run_chunk(tokens, by_len[pos:end], a_start, a_len, b_start, b_len, vocab_size, table_keys, table_masks,
                   backtrack, lcs, found_pair, found_pos)
        pos = end
    if backtrack and found_pair:
        return lcs, np.concatenate(found_pair), np.concatenate(found_pos)
    return lcs, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)


def _run_chunk(
    tokens: np.ndarray, chunk: np.ndarray, a_start: np.ndarray, a_len: np.ndarray, b_start: np.ndarray,
    b_len: np.ndarray, vocab_size: int, table_keys: np.ndarray, table_masks: np.ndarray, backtrack: bool,
    lcs: np.ndarray, found_pair: list[np.ndarray], found_pos: list[np.ndarray],
) -> None:
    """Forward pass (and back-tracking) for one chunk of pairs; writes ``lcs`` and appends found positions."""
    n = len(chunk)
    blen = b_len[chunk]  # ascending: the pairs still running at column j are a suffix
    width = int(blen.max())
    # mask of b's j-th token in a, for the valid cells only
    row = np.repeat(np.arange(n), blen)
    col = np.arange(len(row)) - np.repeat(np.cumsum(blen) - blen, blen)
    query = a_start[chunk][row] * vocab_size + tokens[b_start[chunk][row] + col]
    slot = np.minimum(np.searchsorted(table_keys, query), len(table_keys) - 1)
    masks = np.zeros((n, width), dtype=np.uint64)
    masks[row, col] = np.where(table_keys[slot] == query, table_masks[slot], np.uint64(0))

    m = a_len[chunk]
    full = np.left_shift(_ONE, m.astype(np.uint64)) - _ONE
    v = full.copy()
    history = np.empty((n, width + 1), dtype=np.uint64) if backtrack else None
    if history is not None:
        history[:, 0] = v
    first_running = np.searchsorted(blen, np.arange(width), side="right")
    for j in range(width):
        k = int(first_running[j])
        vk = v[k:]
        u = vk & masks[k:, j]
        vk[:] = ((vk + u) | (vk - u)) & full[k:]
        if history is not None:
            history[k:, j + 1] = vk
    lcs[chunk] = m - popcount(v)
    if history is None:
        return

    # Replay rouge-score's back-tracking for every pair with a nonzero LCS, one column per step.
    rows = np.flatnonzero(v != full)
    i = m[rows].astype(np.int64)
    j = blen[rows].astype(np.int64)
    while len(rows):
        bits = history[rows, j]
        match = masks[rows, j - 1]
        below = np.left_shift(_ONE, i.astype(np.uint64)) - _ONE
        stop = (~bits | match) & below
        go = stop != 0
        rows, i, j, stop, match = rows[go], i[go], j[go], stop[go], match[go]
        i = bit_length(stop)
        hit = ((match >> (i - 1).astype(np.uint64)) & _ONE).astype(bool)
        if hit.any():
            found_pair.append(chunk[rows[hit]])
            found_pos.append(i[hit] - 1)
        i = i - hit
        j = j - 1
        keep = (i > 0) & (j > 0)
        rows, i, j = rows[keep], i[keep], j[keep]
