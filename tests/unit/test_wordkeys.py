"""`llmtune.metrics._wordkeys`: dense word ids from packed bytes, exact whatever the hash does."""

from __future__ import annotations

import numpy as np
import pytest

from llmtune.metrics import _wordkeys

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py


def _ids_by_python(words: list[bytes]) -> list[int]:
    first: dict[bytes, int] = {}
    return [first.setdefault(w, len(first)) for w in words]


def _same_partition(a: np.ndarray, b: list[int]) -> bool:
    """Equal words <=> equal ids, in both directions."""
    pairs = set(zip(a.tolist(), b))
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def _spans(words: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    data = b" ".join(words)
    lens = np.array([len(w) for w in words], dtype=np.int64)
    starts = np.cumsum(lens + 1) - lens - 1
    return data, starts, starts + lens


WORDS = [b"a", b"ab", b"abcdefgh", b"abcdefghi", b"abcdefgh" * 2, b"abcdefgh" * 2 + b"x", b"x" * 40, b"x" * 41,
         b"\xe6\x97\xa5\xe6\x9c\xac", b"a", b"x" * 40, b"abcdefghi", b"ab", b"x" * 17]


def test_word_ids_group_equal_words_of_any_length() -> None:
    """Words up to 16 bytes go through packed keys, longer ones through a dict: the same partition either way."""
    data, starts, ends = _spans(WORDS)
    types, first = _wordkeys.word_ids(data, starts, ends)
    assert _same_partition(types, _ids_by_python(WORDS))
    assert [WORDS[i] for i in first.tolist()] == [WORDS[types.tolist().index(t)] for t in range(len(first))]


def test_hash_collisions_fall_back_to_exact_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every word hashing to 0 the groups are checked, found mixed, and ranked exactly instead."""
    monkeypatch.setattr(_wordkeys, "_MIX", np.zeros(4, dtype=np.uint64))
    data, starts, ends = _spans(WORDS)
    types, first = _wordkeys.word_ids(data, starts, ends)
    assert _same_partition(types, _ids_by_python(WORDS))
    assert sorted(types[first].tolist()) == list(range(len(first)))


def test_sort_with_order_equals_a_stable_argsort() -> None:
    rng = np.random.default_rng(0)
    for high, n in ((7, 1000), (1 << 40, 500), (1 << 62, 300)):  # the last one cannot pack its index
        keys = rng.integers(0, high, n)
        got_keys, order = _wordkeys.sort_with_order(keys, int(high - 1).bit_length())
        want = np.argsort(keys, kind="stable")
        assert order.tolist() == want.tolist()
        assert got_keys.tolist() == keys[want].tolist()


def test_key_columns_are_the_zero_padded_bytes_also_from_strided_starts() -> None:
    """Each column holds 8 bytes of the word, little-endian, zero past its end; starts may be a strided view."""
    data, starts, ends = _spans(WORDS)
    spaced = np.repeat(starts, 2)[::2]  # a strided view, as `_word_bounds` returns
    cols = _wordkeys.key_columns(data, spaced, ends - starts)
    for i, w in enumerate(WORDS):
        if len(w) <= _wordkeys.MAX_KEY_BYTES:
            padded = w + bytes(8 * len(cols) - len(w))
            assert [int(c) for c in cols[:, i]] == [int.from_bytes(padded[8 * k:8 * k + 8], "little")
                                                    for k in range(len(cols))], w
        else:
            assert int(cols[0, i]) >> 56 == 0xFF and not cols[1:, i].any(), w
