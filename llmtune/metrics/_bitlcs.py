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

import dataclasses

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
    order = np.argsort(keys)
    keys, bits = keys[order], bits[order]
    head = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    table_keys = keys[head]
    table_masks = np.bitwise_or.reduceat(bits, head)

    # Pairs in order of b length, in chunks, so that short pairs do not pay for the longest b.
    by_len = np.argsort(b_len)
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


# ---------------------------------------------------------------------------------------------------------------
# rougeLsum: union LCS of packed reference lines against every candidate line, forward and back in lock-step
# ---------------------------------------------------------------------------------------------------------------
_SWAPS = tuple((np.uint64(shift), np.uint64(mask)) for shift, mask in
               ((1, 0x5555555555555555), (2, 0x3333333333333333), (4, 0x0F0F0F0F0F0F0F0F)))


def reverse_bits(x: np.ndarray) -> np.ndarray:
    """Bit ``i`` of each ``uint64`` moved to bit ``63 - i``: reverse the bytes, then swap bits, pairs and nibbles."""
    y = np.asarray(x, dtype=np.uint64).byteswap()
    t = np.empty_like(y)
    for shift, mask in _SWAPS:
        np.right_shift(y, shift, out=t)
        t &= mask
        y &= mask
        y <<= shift
        y |= t
    return y


@dataclasses.dataclass
class PackedLines:
    """Reference lines packed into 64-bit words ("units"), each line a segment followed by one guard bit.

    ``unit_row``: the row (pair) of each unit; ``pos_unit``/``pos_bit``/``pos_tok``: per reference position,
    its unit, bit and token; ``full``: per unit, the bits of its segments; ``seg_lo``/``seg_top``: per unit,
    the lowest and highest bit of each segment, as bit sets.
    """

    unit_row: np.ndarray
    pos_unit: np.ndarray
    pos_bit: np.ndarray
    pos_tok: np.ndarray
    full: np.ndarray
    seg_lo: np.ndarray
    seg_top: np.ndarray


def pack_lines(line_row: np.ndarray, line_start: np.ndarray, line_len: np.ndarray, tokens: np.ndarray) -> PackedLines:
    """Pack lines (``1 <= len <= 63``, grouped by row, in order) greedily: a line goes into its row's current
    unit while ``sum(len + 1) <= 64``, else opens the next unit. Lines never straddle two units."""
    n_lines = len(line_len)
    n_rows = int(line_row[-1]) + 1 if n_lines else 0
    bits = line_len + 1
    row_bits = np.bincount(line_row, weights=bits, minlength=n_rows)
    first = np.searchsorted(line_row, np.arange(n_rows))
    # a row that fits one word: its lines side by side; the others greedily, line by line
    lo_of_line = np.cumsum(bits) - bits
    lo_of_line -= lo_of_line[first][line_row] if n_lines else 0
    within = np.zeros(n_lines, dtype=np.int64)
    for k in np.flatnonzero(row_bits[line_row] > 64).tolist() if (row_bits > 64).any() else []:
        if k == first[line_row[k]]:
            unit, used = 0, 0
        elif used + int(bits[k]) > 64:
            unit, used = unit + 1, 0
        within[k], lo_of_line[k] = unit, used
        used += int(bits[k])
    units_per_row = np.zeros(n_rows, dtype=np.int64)
    np.maximum.at(units_per_row, line_row, within + 1)
    unit_of_line = (np.cumsum(units_per_row) - units_per_row)[line_row] + within
    n_units = int(units_per_row.sum())
    unit_row = np.repeat(np.arange(n_rows), units_per_row)
    total = int(line_len.sum())
    offset = np.arange(total) - np.repeat(np.cumsum(line_len) - line_len, line_len)
    pos_unit = np.repeat(unit_of_line, line_len)
    pos_bit = (np.repeat(lo_of_line, line_len) + offset).astype(np.uint64)
    pos_tok = tokens[np.repeat(line_start, line_len) + offset]
    full = np.zeros(n_units, dtype=np.uint64)
    np.add.at(full, pos_unit, np.left_shift(_ONE, pos_bit))
    seg_lo = np.zeros(n_units, dtype=np.uint64)
    seg_top = np.zeros(n_units, dtype=np.uint64)
    np.add.at(seg_lo, unit_of_line, np.left_shift(_ONE, lo_of_line.astype(np.uint64)))
    np.add.at(seg_top, unit_of_line, np.left_shift(_ONE, (lo_of_line + line_len - 1).astype(np.uint64)))
    return PackedLines(unit_row, pos_unit, pos_bit, pos_tok, full, seg_lo, seg_top)


def union_lcs(
    packed: PackedLines, cand_tokens: np.ndarray, cand_start: np.ndarray, cand_len: np.ndarray,
    line_first: np.ndarray, line_last: np.ndarray, vocab_size: int,
) -> np.ndarray:
    """Which reference positions are in rouge-score's union LCS (``_summary_level_lcs``), as a bool per position.

    Row ``r``'s candidate is ``cand_tokens[cand_start[r]:cand_start[r] + cand_len[r]]``; ``line_first`` /
    ``line_last`` (bool, parallel to ``cand_tokens``) mark its line starts and ends. For every candidate line
    and every reference line, the position set that rouge-score's ``lcs_ind`` back-tracking picks is OR-ed in.
    Each unit runs the Hyyro recurrence over the whole candidate (``V`` refilled at each line start), then the
    back-tracking of every segment at once, columns in reverse: in reversed bit order "the highest row below
    i that is a match or a 0 bit" is the lowest set bit of each segment, found for all segments with one
    subtraction (the guard bits stop the borrows).
    """
    n_units = len(packed.unit_row)
    in_union = np.zeros(len(packed.pos_tok), dtype=bool)
    if n_units == 0:
        return in_union
    table, table_base, lid, at = _local_masks(packed, cand_tokens, cand_start, cand_len, vocab_size)
    first_flag, last_flag = line_first[at], line_last[at]
    row_start = np.cumsum(cand_len) - cand_len
    row = packed.unit_row
    blen = cand_len[row]
    by_len = np.argsort(blen)
    union = np.zeros(n_units, dtype=np.uint64)
    pos = 0
    while pos < n_units:
        end = min(n_units, pos + max(1, _CELLS_PER_CHUNK // max(1, int(blen[by_len[pos]]))))
        while end - pos > 1 and (end - pos) * int(blen[by_len[end - 1]]) > _CELLS_PER_CHUNK:
            end = pos + max(1, _CELLS_PER_CHUNK // int(blen[by_len[end - 1]]))
        chunk = by_len[pos:end]
        union[chunk] = _union_chunk(packed, chunk, table, table_base, lid, row_start[row[chunk]], blen[chunk],
                                    first_flag, last_flag)
        pos = end
    bits = np.right_shift(union[packed.pos_unit], packed.pos_bit) & _ONE
    return bits.astype(bool)


def _local_masks(
    packed: PackedLines, cand_tokens: np.ndarray, cand_start: np.ndarray, cand_len: np.ndarray, vocab_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense match masks: per row, the distinct reference tokens get local ids ``0..K-1`` (``K`` = absent);
    unit ``u``'s mask of local id ``l`` is ``table[table_base[u] + l]``. Returns ``(table, table_base, lid,
    at)``: per row ``r`` and column ``j`` (flat index ``sum(cand_len[:r]) + j``) the candidate token's local id
    and its index in ``cand_tokens`` (a candidate text may serve several rows, with different local ids)."""
    pos_row = packed.unit_row[packed.pos_unit]
    n_rows = len(cand_start)
    c_row = np.repeat(np.arange(n_rows), cand_len)
    c_at = np.repeat(cand_start, cand_len) + np.arange(len(c_row)) - np.repeat(np.cumsum(cand_len) - cand_len, cand_len)
    n_ref = len(pos_row)
    # one sort of every (row, token) key, reference positions and candidate tokens together
    keys = np.concatenate([pos_row * vocab_size + packed.pos_tok, c_row * vocab_size + cand_tokens[c_at]])
    order = np.argsort(keys)
    sk = keys[order]
    head = np.empty(len(sk), dtype=bool)
    head[:1] = True
    np.not_equal(sk[1:], sk[:-1], out=head[1:])
    group = np.empty(len(sk), dtype=np.int64)
    group[order] = np.cumsum(head) - 1
    has_ref = np.zeros(int(group.max(initial=-1)) + 1, dtype=bool)
    has_ref[group[:n_ref]] = True
    rank = np.cumsum(has_ref) - 1  # global rank of each reference token group
    k_row = np.bincount(sk[head][has_ref] // vocab_size, minlength=n_rows)
    row_rank0 = np.cumsum(k_row) - k_row
    widths = k_row[packed.unit_row] + 1
    table_base = np.cumsum(widths) - widths
    pos_lid = rank[group[:n_ref]] - row_rank0[pos_row]
    table = np.zeros(int(widths.sum()), dtype=np.uint64)
    np.add.at(table, table_base[packed.pos_unit] + pos_lid, np.left_shift(_ONE, packed.pos_bit))
    c_group = group[n_ref:]
    lid = np.where(has_ref[c_group], rank[c_group] - row_rank0[c_row], k_row[c_row])
    return table, table_base, lid, c_at


def _union_chunk(
    packed: PackedLines, chunk: np.ndarray, table: np.ndarray, table_base: np.ndarray, lid: np.ndarray,
    start: np.ndarray, blen: np.ndarray, first_flag: np.ndarray, last_flag: np.ndarray,
) -> np.ndarray:
    """Union bit set (normal bit order) of each unit of ``chunk`` (sorted by candidate length ``blen``)."""
    lay = column_layout(blen, start)
    full = packed.full[chunk]
    masks = table[table_base[chunk][lay.rank] + lid[lay.cell]]
    refill = np.where(first_flag[lay.cell], full[lay.rank], np.uint64(0))
    end_fill = np.where(last_flag[lay.cell], reverse_bits(full)[lay.rank], np.uint64(0))
    return _union_core(lay, masks, refill, end_fill, full, packed.seg_lo[chunk], packed.seg_top[chunk])


@dataclasses.dataclass
class ColumnLayout:
    """The cells of rows sorted by length, column by column without padding: column ``j`` holds the rows
    ``running[j]:`` (those longer than ``j``), in order, at ``lo[j]:lo[j + 1]``; per cell, ``rank`` is its
    row's position in the sorted rows and ``cell`` its index in the caller's row-major cells."""

    running: np.ndarray
    lo: np.ndarray
    rank: np.ndarray
    cell: np.ndarray


def column_layout(sorted_len: np.ndarray, cell_start: np.ndarray) -> ColumnLayout:
    """`ColumnLayout` of rows with ascending lengths ``sorted_len`` whose cells start at ``cell_start``."""
    n = len(sorted_len)
    width = int(sorted_len[-1]) if n else 0
    running = np.searchsorted(sorted_len, np.arange(width), side="right")
    counts = n - running
    lo = np.zeros(width + 1, dtype=np.int64)
    np.cumsum(counts, out=lo[1:])
    col = np.repeat(np.arange(width), counts)
    rank = np.arange(int(lo[-1])) + np.repeat(running - lo[:-1], counts)
    return ColumnLayout(running, lo, rank, cell_start[rank] + col)


def _union_core(
    lay: ColumnLayout, masks: np.ndarray, refill: np.ndarray, end_fill: np.ndarray, full: np.ndarray,
    seg_lo: np.ndarray, seg_top: np.ndarray,
) -> np.ndarray:
    """The forward Hyyro pass (``V`` refilled where ``refill`` says, at candidate line starts) and the walk back
    (`_walk_back`) of units whose candidate cells (`ColumnLayout` order) have match masks ``masks``
    (``end_fill``: the reversed segment bits at candidate line ends)."""
    n = len(full)
    history = np.empty(len(masks), dtype=np.uint64)
    v = full.copy()
    u = np.empty(n, dtype=np.uint64)
    w = np.empty(n, dtype=np.uint64)
    lo, running = lay.lo.tolist(), lay.running.tolist()
    for j, k in enumerate(running):
        vk, uk, wk = v[k:], u[k:], w[k:]
        vk |= refill[lo[j]:lo[j + 1]]
        np.bitwise_and(vk, masks[lo[j]:lo[j + 1]], out=uk)
        np.add(vk, uk, out=wk)
        np.subtract(vk, uk, out=vk)
        vk |= wk
        vk &= full[k:]
        history[lo[j]:lo[j + 1]] = vk
    lowest = reverse_bits(seg_top)  # in reversed order each segment's top bit is its lowest
    guard = reverse_bits(seg_lo >> _ONE)  # the free bit above each segment (reversed order)
    union = _walk_back(lay, reverse_bits(history), reverse_bits(masks), end_fill, reverse_bits(full), lowest,
                       guard)
    return reverse_bits(union)


def lcs_cells(masks: np.ndarray, cell_start: np.ndarray, blen: np.ndarray, full: np.ndarray) -> np.ndarray:
    """LCS length per row from its candidate's match masks: row ``r``'s column ``j`` (``j < blen[r]``) is
    ``masks[cell_start[r] + j]``, the bit set of the reference positions holding that token; ``full``: the
    reference's positions (``len <= 63`` low bits). Hyyro's recurrence for all rows in lock-step."""
    by_len = np.argsort(blen, kind="stable")
    lay = column_layout(blen[by_len], cell_start[by_len])
    m = masks[lay.cell]
    f = full[by_len]
    v = f.copy()
    n = len(f)
    u = np.empty(n, dtype=np.uint64)
    w = np.empty(n, dtype=np.uint64)
    lo = lay.lo.tolist()
    for j, k in enumerate(lay.running.tolist()):
        vk, uk, wk = v[k:], u[k:], w[k:]
        np.bitwise_and(vk, m[lo[j]:lo[j + 1]], out=uk)
        np.add(vk, uk, out=wk)
        np.subtract(vk, uk, out=vk)
        vk |= wk
        vk &= f[k:]
    out = np.zeros(len(blen), dtype=np.int64)
    out[by_len] = popcount(f) - popcount(v)
    return out


def union_cells(
    masks: np.ndarray, line_first: np.ndarray, line_last: np.ndarray, cell_start: np.ndarray, blen: np.ndarray,
    full: np.ndarray, seg_lo: np.ndarray, seg_top: np.ndarray,
) -> np.ndarray:
    """rougeLsum's union bit set per row whose reference lines all fit one 64-bit unit (`PackedLines` layout:
    ``full``, ``seg_lo``, ``seg_top`` per row), from per-cell match masks as in `lcs_cells`; ``line_first`` /
    ``line_last`` (bool per cell) mark the candidate's line starts and ends. See `union_lcs`."""
    by_len = np.argsort(blen, kind="stable")
    lay = column_layout(blen[by_len], cell_start[by_len])
    f = full[by_len]
    refill = np.where(line_first[lay.cell], f[lay.rank], np.uint64(0))
    end_fill = np.where(line_last[lay.cell], reverse_bits(f)[lay.rank], np.uint64(0))
    out = np.zeros(len(blen), dtype=np.uint64)
    out[by_len] = _union_core(lay, masks[lay.cell], refill, end_fill, f, seg_lo[by_len], seg_top[by_len])
    return out


def _walk_back(
    lay: ColumnLayout, history: np.ndarray, masks: np.ndarray, end_fill: np.ndarray, seg: np.ndarray,
    lowest: np.ndarray, guard: np.ndarray,
) -> np.ndarray:
    """rouge-score's ``_backtrack_norec`` for every segment of every unit, all candidate lines, in reversed bits.

    ``alive`` holds, per segment, the rows still below the walk's row ``i`` (set to the whole segment at the
    end of each candidate line). At column ``j`` the walk stops at the highest such row that matches token
    ``j - 1`` or has a 0 bit in column ``j`` (the lowest set bit of ``stop``, per segment); a match is a hit
    and leaves the rows below it, a 0 bit (a move left) keeps that row too; no such row ends the walk.
    ``history``, ``masks``, ``end_fill``: per cell (`ColumnLayout` order) ``V`` after the column, the match
    mask and the line-end refill.
    """
    n = len(seg)
    alive = np.zeros(n, dtype=np.uint64)
    union = np.zeros(n, dtype=np.uint64)
    z_buf = np.empty(n, dtype=np.uint64)
    b_buf = np.empty(n, dtype=np.uint64)
    lo, running = lay.lo.tolist(), lay.running.tolist()
    for j in range(len(running) - 1, -1, -1):
        k, cells = running[j], slice(lo[j], lo[j + 1])
        a = alive[k:]
        a |= end_fill[cells]
        match = masks[cells]
        z, below = z_buf[k:], b_buf[k:]
        np.invert(history[cells], out=z)
        z |= match
        z &= a
        z |= guard[k:]
        np.subtract(z, lowest[k:], out=below)
        below ^= z  # per segment: its bottom bits up to and including the lowest set one
        z &= below
        z &= seg[k:]  # the walk's stop in each segment (0 where it ended)
        np.invert(below, out=below)
        np.bitwise_and(seg[k:], below, out=a)
        np.bitwise_and(z, match, out=below)
        union[k:] |= below
        z ^= below  # stops that are not matches: moves left, the row stays
        a |= z
    return union
