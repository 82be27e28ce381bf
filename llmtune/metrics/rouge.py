"""ROUGE-N, ROUGE-L and ROUGE-Lsum from scratch, equal to rouge-score 0.1.2 and much faster.

Every per-example value equals ``rouge_score.rouge_scorer.RougeScorer(types, use_stemmer).score(ref, pred)``
(one reference) or ``.score_multi(refs, pred)`` (several) bit for bit:

* the same tokenizer (lower-case, every run of characters outside ``[a-z0-9]`` is a separator, the
  Porter stemmer only on tokens longer than 3 characters) and our own copy of NLTK's Porter stemmer;
* the same integer statistics (clipped n-gram overlap, LCS length, rougeLsum's union-LCS hit count
  with rouge-score's exact back-tracking tie-break), then ``P = k / len_pred``, ``R = k / len_ref``,
  ``F = 2 * P * R / (P + R)`` in the same float operation order.

Speed comes from never making one Python object per word: the corpus is lower-cased, class-mapped and split
in NumPy, words become integer ids through their bytes packed into uint64 keys and one sort
(`llmtune.metrics._wordkeys`), and the memoised Porter stemmer runs once per distinct word. One sort of
every row's ``(row, token, side)`` keys (`_join`) then gives the rouge1 overlaps and the match bit masks that
the bit-parallel LCS (Allison-Dix / Hyyro) needs for rougeL and rougeLsum, run for all rows in lock-step on
``uint64`` words (`llmtune.metrics._bitlcs`), including the replay of rouge-score's LCS back-tracking that
rougeLsum needs; rouge2+ overlaps come from one sort per order. Longer texts (over 63 tokens, reference
lines over one 64-bit word) take the packed multi-word path or Python integers. Corpus scores are the means
of the per-example values.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from itertools import chain
from typing import ClassVar

import numpy as np

from llmtune._version import __version__
from llmtune.core.errors import InvalidOptionError, did_you_mean
from llmtune.core.options import check_type
from llmtune.metrics import _porter
from llmtune.metrics._bitlcs import MAX_BITS, lcs_batch, lcs_cells, pack_lines, popcount, union_cells, union_lcs
from llmtune.metrics._heap import keep_freed_heap
from llmtune.metrics._wordkeys import heads, sort_with_order, word_ids
from llmtune.metrics.base import CorpusMetric

__all__ = [
    "DEFAULT_ROUGE_TYPES", "MEASURES", "ROUGE_TYPES", "NumpyRouge", "RougeOptions", "clear_caches", "rouge_signature",
    "tokenize",
]

#: Every ROUGE type rouge-score accepts (``rouge[0-9]$`` minus ``rouge0``, plus the two LCS variants).
ROUGE_TYPES: tuple[str, ...] = (*(f"rouge{n}" for n in range(1, 10)), "rougeL", "rougeLsum")
#: What Hugging Face ``evaluate`` computes by default, and what the lecture reports.
DEFAULT_ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
MEASURES: tuple[str, ...] = ("precision", "recall", "fmeasure")

_WORD_RE = re.compile(r"[a-z0-9]+")


def tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's default tokenizer: ``tokenize.tokenize(text, PorterStemmer() if use_stemmer else None)``."""
    words = _WORD_RE.findall(text.lower())
    if use_stemmer:
        stem = _porter.stem
        words = [stem(w) if len(w) > 3 else w for w in words]
    return words


@dataclasses.dataclass(frozen=True)
class RougeOptions:
    """Options of the ``rouge`` metric (shared by every backend so that one line switches implementation).

    ``rouge_types``: any of rouge1..rouge9, rougeL, rougeLsum (a list, tuple or one string; duplicates
    are dropped). ``use_stemmer``: NLTK's Porter stemmer on tokens longer than 3 characters.
    ``bootstrap``: also report seeded percentile intervals ``{key}_low``/``{key}_high`` of the mean
    (``bootstrap_samples`` resamples, ``confidence`` level, ``seed``); the headline stays the plain mean.
    ``n_jobs``: score contiguous chunks of the corpus in that many worker processes (identical results).
    """

    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES
    use_stemmer: bool = False
    bootstrap: bool = False
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    n_jobs: int = 1

    def __post_init__(self) -> None:
        types = self.rouge_types
        if isinstance(types, str):
            types = (types,)
        if not isinstance(types, (list, tuple)):
            raise InvalidOptionError(
                f"option rouge_types={types!r} must be a list of ROUGE types such as ['rouge1', 'rougeL'], "
                f"not {type(types).__name__}"
            )
        if not types:
            raise InvalidOptionError(f"option rouge_types is empty: give at least one of {', '.join(ROUGE_TYPES)}")
        seen: list[str] = []
        for t in types:
            if not isinstance(t, str) or t not in ROUGE_TYPES:
                hint = did_you_mean(t, ROUGE_TYPES) if isinstance(t, str) else ""
                raise InvalidOptionError(
                    f"option rouge_types contains {t!r}, which is not a ROUGE type.{hint} "
                    f"Valid: {', '.join(ROUGE_TYPES)}."
                )
            if t not in seen:
                seen.append(t)
        object.__setattr__(self, "rouge_types", tuple(seen))
        check_type("use_stemmer", self.use_stemmer, bool)
        check_type("bootstrap", self.bootstrap, bool)
        check_type("bootstrap_samples", self.bootstrap_samples, int)
        if self.bootstrap_samples < 1:
            raise InvalidOptionError(f"option bootstrap_samples={self.bootstrap_samples} must be >= 1")
        check_type("confidence", self.confidence, (float, int))
        if not 0.0 < self.confidence < 1.0:
            raise InvalidOptionError(f"option confidence={self.confidence} must be between 0 and 1 (e.g. 0.95)")
        check_type("seed", self.seed, int)
        check_type("n_jobs", self.n_jobs, int)
        if self.n_jobs < 1:
            raise InvalidOptionError(f"option n_jobs={self.n_jobs} must be >= 1 (worker processes; 1 = no workers)")


def rouge_signature(options: RougeOptions, refs: str, impl: str) -> str:
    """A sacrebleu-style string saying how a ROUGE number was computed, e.g. ``rouge|types:rouge1|stem:no|...``.

    ``refs``: the number of references per prediction, or ``"var"``; ``impl``: e.g. ``"llmtune-numpy"``.
    """
    types = sorted(options.rouge_types, key=ROUGE_TYPES.index)  # canonical: the order given does not matter
    parts = [
        "rouge",
        f"types:{','.join(types)}",
        f"stem:{'yes' if options.use_stemmer else 'no'}",
        "tok:rouge-score-default",
        "lsum-split:newline",
        f"refs:{refs}",
        "multi:best-f",
        "agg:mean",
    ]
    if options.bootstrap:
        parts.append(f"ci:{options.confidence:g},n:{options.bootstrap_samples},seed:{options.seed}")
    parts += [f"impl:{impl}", f"version:{__version__}"]
    return "|".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Tokens as integer ids
# ---------------------------------------------------------------------------------------------------------------

_TEXT_SEP = "\x00"
_LINE_MARK = 1  # byte of a line break after `_CLASS_TABLE` (rougeLsum's sentence separator)
_TEXT_MARK = 2  # byte of the separator put between the texts of a corpus
#: After lower-casing and ASCII-encoding (every non-ASCII character becomes "?"), keep a-z and 0-9,
#: turn "\n" and the text separator into marker bytes, and everything else into a space.
_CLASS_TABLE = bytes(
    c if (48 <= c <= 57 or 97 <= c <= 122) else _LINE_MARK if c == 10 else _TEXT_MARK if c == 0 else 32
    for c in range(256)
)
def _word_bounds(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of the ``[a-z0-9]+`` runs in the class-mapped bytes ``buf``."""
    edge = np.zeros(len(buf) + 2, dtype=np.int8)
    edge[1:-1] = buf >= 48
    runs = np.flatnonzero(edge[1:] != edge[:-1])
    return runs[0::2], runs[1::2]


def _token_ids(data: bytes, starts: np.ndarray, ends: np.ndarray, use_stemmer: bool) -> tuple[np.ndarray, int]:
    """``(ids, vocab_size)``: the token id of every word, equal ids for equal tokens (after stemming)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64), 1
    types, first = word_ids(data, starts, ends)
    if not use_stemmer:
        return types, len(first)
    stem = _porter.stem
    # A Porter stem of an [a-z0-9]{4,} word is never empty, and a word of digits is its own stem.
    words = [data[s:e].decode("ascii") for s, e in zip(starts[first].tolist(), ends[first].tolist())]
    stems = [stem(w) if len(w) > 3 and not w.isdigit() else w for w in words]
    ids: dict[str, int] = {}
    type_tok = np.fromiter((ids.setdefault(s, len(ids)) for s in stems), dtype=np.int64, count=len(stems))
    return type_tok[types], len(ids)


def _segment_sizes(starts: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Number of words (by start offset, sorted) between consecutive separator offsets ``marks``."""
    return np.diff(np.r_[0, np.searchsorted(starts, marks), len(starts)])


def clear_caches() -> None:
    """Forget every memoised Porter stem (the first call after this pays for all of them)."""
    _porter._CACHE.clear()


class _Corpus:
    """Every text of a corpus tokenized once, as one flat array of token ids with text and line segments.

    All texts are lower-cased, class-mapped (`_CLASS_TABLE`) and split in one pass over their concatenation
    (separated by NUL, which is a non-alphanumeric separator for rouge-score too; a text containing NUL has
    it replaced by a space first); this is equal to tokenizing each text alone because ``str.lower`` only
    looks at neighbours for the Greek final sigma (never ASCII). Words become integer ids through their
    bytes packed into uint64 columns (`_key_columns`), one ``np.unique``, and the stemmer once per distinct
    word. Lines (rougeLsum's sentences) without tokens are left out: they add nothing to rougeLsum.
    """

    def __init__(self, texts: list[str], use_stemmer: bool, want_lines: bool) -> None:
        data = _TEXT_SEP.join(texts).lower().encode("ascii", "replace").translate(_CLASS_TABLE)
        buf = np.frombuffer(data, dtype=np.uint8)
        marks = np.flatnonzero(buf <= _TEXT_MARK)  # line breaks and text separators
        is_text = buf[marks] == _TEXT_MARK
        if int(np.count_nonzero(is_text)) != len(texts) - 1:  # a text contains NUL itself
            data = _TEXT_SEP.join(text.replace(_TEXT_SEP, " ") for text in texts).lower().encode(
                "ascii", "replace").translate(_CLASS_TABLE)
            buf = np.frombuffer(data, dtype=np.uint8)
            marks = np.flatnonzero(buf <= _TEXT_MARK)
            is_text = buf[marks] == _TEXT_MARK
        starts, ends = _word_bounds(buf)
        n_texts = len(texts)
        #: all token ids, the text of each, each text's length and start in `flat`
        self.flat, self.vocab_size = _token_ids(data, starts, ends, use_stemmer)
        self.lengths = _segment_sizes(starts, marks[is_text])
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.text_of = np.repeat(np.arange(n_texts), self.lengths)
        #: non-empty lines: start in `flat`, length, text; the lines of text t are first_line[t]:first_line[t+1]
        if want_lines:
            sizes = _segment_sizes(starts, marks)
            nonempty = sizes > 0
            self.line_start = (np.cumsum(sizes) - sizes)[nonempty]
            self.line_len = sizes[nonempty]
            self.line_text = np.r_[0, np.cumsum(is_text)][nonempty]
        else:
            self.line_start = self.line_len = self.line_text = np.zeros(0, dtype=np.int64)
        self.first_line = np.searchsorted(self.line_text, np.arange(n_texts + 1))

    def ids(self, text: int) -> list[int]:
        """Token ids of one text, as a Python list."""
        start = int(self.starts[text])
        return self.flat[start:start + int(self.lengths[text])].tolist()

    def lines(self, text: int) -> list[list[int]]:
        """Token ids of each non-empty line of one text, as Python lists."""
        lo, hi = int(self.first_line[text]), int(self.first_line[text + 1])
        if lo == hi:
            return []
        start, end = int(self.line_start[lo]), int(self.line_start[hi - 1] + self.line_len[hi - 1])
        tokens = self.flat[start:end].tolist()
        return [tokens[st - start:st - start + ln]
                for st, ln in zip(self.line_start[lo:hi].tolist(), self.line_len[lo:hi].tolist())]


# ---------------------------------------------------------------------------------------------------------------
# Integer statistics
# ---------------------------------------------------------------------------------------------------------------


_KEY_LIMIT = 1 << 62
_U32_KEYS = 1 << 32  # rouge2 keys below this are sorted as uint32 (half the bytes of int64)
_ONE = np.uint64(1)
_FEW_ROWS = 32  # below this many short rows outside the batched paths, score them one by one
_FEW_TOKENS = 4096  # ... holding fewer tokens than this in all


def _ngram_codes(corpus: _Corpus, n: int) -> tuple[np.ndarray, int]:
    """``(code, n_codes)``: per start position ``p`` of `_Corpus.flat`, an integer below ``n_codes`` naming the
    n-gram ``flat[p:p + n]`` (ranked densely whenever the next extension could overflow int64)."""
    flat, vocab = corpus.flat, corpus.vocab_size
    code, n_codes = flat, vocab
    for k in range(1, n):
        if len(code) <= 1:
            return code[:0], 1
        if n_codes * vocab >= _KEY_LIMIT:
            _, code = np.unique(code, return_inverse=True)
            code, n_codes = code.reshape(-1), len(code)
        code = code[:-1] * vocab + flat[k:]
        n_codes *= vocab
    return code, n_codes


def _expand(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(owner, index)``: ``index`` runs over ``starts[i]:starts[i] + sizes[i]`` for every ``i`` (``owner``)."""
    total = int(sizes.sum())
    owner = np.repeat(np.arange(len(sizes)), sizes)
    index = np.arange(total) + np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
    return owner, index


def _positions(corpus: _Corpus, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, at, off)`` of every token of the texts ``texts[row]``: its index in `_Corpus.flat` and its offset
    in its text, rows in order (a slice of the corpus when ``texts`` are consecutive, as with one reference)."""
    if len(texts) and texts[-1] - texts[0] == len(texts) - 1 and (np.diff(texts) == 1).all():
        t0 = int(texts[0])
        lo, hi = int(corpus.starts[t0]), int(corpus.starts[texts[-1]] + corpus.lengths[texts[-1]])
        text = corpus.text_of[lo:hi]
        at = np.arange(lo, hi)
        return text - t0, at, at - corpus.starts[text]
    row, at = _expand(corpus.starts[texts], corpus.lengths[texts])
    return row, at, at - corpus.starts[texts][row]


def _ngram_hits(corpus: _Corpus, n: int, pred_text: np.ndarray, ref_text: np.ndarray) -> np.ndarray:
    """Per row, the clipped n-gram overlap ``sum_g min(count_pred(g), count_ref(g))``, for all rows at once.

    Every n-gram occurrence of a row's prediction and reference becomes the key ``(row, code, side)``; one sort
    puts each row's equal n-grams side by side (prediction first), and the two run lengths give the overlap.
    Integer-exact.
    """
    code, n_codes = _ngram_codes(corpus, n)
    n_rows = len(pred_text)
    if n_codes * 2 * n_rows >= _KEY_LIMIT:
        _, code = np.unique(code, return_inverse=True)
        code, n_codes = code.reshape(-1), max(len(code), 1)
    keys = []
    for side, texts in enumerate((pred_text, ref_text)):
        row, at, off = _positions(corpus, texts)
        if n > 1:
            keep = off + n <= corpus.lengths[texts][row]
            row, at = row[keep], at[keep]
        keys.append(row * (2 * n_codes) + code[at] * 2 + side)
    sk = np.concatenate(keys)
    sk.sort()
    if len(sk) == 0:
        return np.zeros(n_rows, dtype=np.int64)
    first = np.flatnonzero(heads(sk))
    count = np.diff(np.r_[first, len(sk)])
    key = sk[first]
    both = np.flatnonzero((key[1:] >> 1) == (key[:-1] >> 1))  # (row, code) seen on both sides: runs i, i + 1
    overlap = np.minimum(count[both], count[both + 1])
    return np.bincount(key[both] // (2 * n_codes), weights=overlap, minlength=n_rows).astype(np.int64)


def _masks(seq: list[int]) -> dict[int, int]:
    """Per token id, the bit set of its positions in ``seq`` (bit i = position i)."""
    masks: dict[int, int] = {}
    get = masks.get
    bit = 1
    for tok in seq:
        masks[tok] = get(tok, 0) | bit
        bit <<= 1
    return masks


def _lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004) over the longer sequence."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks = _masks(a)
    get = masks.get
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        mt = get(tok)
        if mt:
            u = v & mt
            v = (v + u) | (v - u)  # carries above bit len(a) never reach the low bits
    return len(a) - (v & full).bit_count()


def _summary_lcs_hits(ref_lines: list[list[int]], cand_lines: list[list[int]]) -> int:
    """rougeLsum's hit count, exactly as rouge-score's ``_summary_level_lcs`` (lines without tokens dropped).

    rouge-score takes, for each reference line ``r``, the union over candidate lines ``c`` of the
    indices of the LCS that its table back-tracking picks (``lcs_ind(r, c)``), then counts each token
    at most as often as it is still unused in both texts, reference lines in order.

    We lay all reference lines side by side in one Python int, one guard bit between lines (carries
    stop there), and run the bit-parallel LCS (Hyyro) once per candidate line for all reference lines
    at once. Column ``V_j`` (after ``j`` candidate tokens) has bit ``i-1`` of a line's segment set
    exactly when ``t[i][j] = t[i-1][j]`` in rouge-score's table, which is all its back-tracking needs:
    on equal tokens it goes diagonally, else left when ``t[i][j-1] > t[i-1][j]`` (iff that bit is 0),
    else up; a run of up-moves jumps to the highest row below that is a match or has a 0 bit.
    """
    if not ref_lines or not cand_lines:
        return 0
    if len(ref_lines) == 1 and len(cand_lines) == 1:  # the union is one LCS, and every LCS token is a hit
        return _lcs_length(ref_lines[0], cand_lines[0])
    masks: dict[int, int] = {}
    get = masks.get
    starts: list[int] = []
    full = 0
    pos = 0
    for line in ref_lines:
        starts.append(pos)
        bit = 1 << pos
        for tok in line:
            masks[tok] = get(tok, 0) | bit
            bit <<= 1
        full |= bit - (1 << pos)
        pos += len(line) + 1  # one guard bit
    union = 0  # bit set of reference positions in some line's union LCS (lines occupy disjoint bits)
    for cand in cand_lines:
        col_masks = [get(tok, 0) for tok in cand]
        v = full
        cols = [v]
        for mt in col_masks:
            if mt:
                u = v & mt
                v = ((v + u) | (v - u)) & full
            cols.append(v)
        if v == full:  # nothing in common with any reference line
            continue
        for k, line in enumerate(ref_lines):
            lo = 1 << starts[k]
            i = starts[k] + len(line)
            segment = (1 << i) - lo
            if v & segment == segment:
                continue
            # Walk only the columns whose token occurs in this line: across a run of other columns the
            # line's bits do not change, and the walk moves once to the highest 0 bit below i, then stays.
            j = len(cand)
            for col in [c for c in range(j, 0, -1) if col_masks[c - 1] & segment]:
                bits = cols[col]
                if col < j:
                    stop = ~bits & ((1 << i) - lo)
                    if not stop:
                        break
                    i = stop.bit_length()
                match = col_masks[col - 1]
                stop = (~bits | match) & ((1 << i) - lo)
                if not stop:
                    break
                i = stop.bit_length()
                if (match >> (i - 1)) & 1:
                    i -= 1
                    union |= 1 << i
                j = col - 1
    # rouge-score walks the union tokens line by line, counting a hit while the token is unused in both
    # texts. A token x occurs at most count_ref(x) times in the unions, so that greedy count is simply
    # min(occurrences of x in the unions, count_cand(x)), whatever the order.
    hits = 0
    for tok, count in Counter(chain.from_iterable(cand_lines)).items():
        positions = get(tok)
        if positions:
            in_union = (union & positions).bit_count()
            hits += in_union if in_union < count else count
    return hits


@dataclasses.dataclass
class _Join:
    """Every row's reference tokens (side a) and prediction tokens (side b) grouped by ``(row, token)``, one sort.

    ``a_row``/``a_off``/``a_at``: per reference token its row, offset in its text and index in `_Corpus.flat`
    (rows in order, tokens in order); ``b_row``/``b_at`` the same for the prediction tokens; ``group``: per entry (a
    entries, then b entries) its ``(row, token)`` group; ``group_row``, ``count_a``,
    ``count_b``: per group its row and number of entries on each side.
    """

    a_row: np.ndarray
    a_off: np.ndarray
    a_at: np.ndarray
    b_row: np.ndarray
    b_at: np.ndarray
    group: np.ndarray
    group_row: np.ndarray
    count_a: np.ndarray
    count_b: np.ndarray

    def group_bits(self, a_bits: np.ndarray) -> np.ndarray:
        """Per group, the OR (bits are distinct within a group: the sum) of its reference entries' ``a_bits``."""
        out = np.zeros(len(self.count_a), dtype=np.uint64)
        np.add.at(out, self.group[:len(self.a_row)], a_bits)
        return out

    def b_masks(self, a_bits: np.ndarray) -> np.ndarray:
        """Per prediction token, the OR of ``a_bits`` over its row's reference tokens equal to it."""
        return self.group_bits(a_bits)[self.group[len(self.a_row):]]


def _join(corpus: _Corpus, pred_text: np.ndarray, ref_text: np.ndarray) -> _Join:
    """`_Join` of the rows ``(pred_text[r], ref_text[r])``."""
    vocab = corpus.vocab_size
    a_row, a_at, a_off = _positions(corpus, ref_text)
    b_row, b_at, _ = _positions(corpus, pred_text)
    stride = 2 * vocab
    keys = np.concatenate([a_row * stride + corpus.flat[a_at] * 2, b_row * stride + corpus.flat[b_at] * 2 + 1])
    sorted_keys, order = sort_with_order(keys, (len(pred_text) * stride).bit_length())
    head = heads(sorted_keys >> 1)
    first = np.flatnonzero(head)
    group = np.empty(len(keys), dtype=np.int64)
    group[order] = np.cumsum(head) - 1
    n_a, n_groups = len(a_at), len(first)
    count_a = np.bincount(group[:n_a], minlength=n_groups)
    return _Join(a_row, a_off, a_at, b_row, b_at, group,
                 sorted_keys[first] // stride, count_a, np.bincount(group[n_a:], minlength=n_groups))


def _unigram_hits(join: _Join, n_rows: int) -> np.ndarray:
    """rouge1's clipped overlap per row, from the join's per-group counts."""
    overlap = np.minimum(join.count_a, join.count_b)
    return np.bincount(join.group_row, weights=overlap, minlength=n_rows).astype(np.int64)


def _bigram_hits(corpus: _Corpus, join: _Join, n_rows: int) -> np.ndarray | None:
    """rouge2's clipped overlap per row from the join: a bigram is its first token's ``(row, token)`` group and
    its second token, so one sort of ``(group, next token, side)`` keys (uint32 where they fit) gives the
    counts. None when the keys would not fit 63 bits."""
    vocab, n_groups, n_a = corpus.vocab_size, len(join.count_a), len(join.a_at)
    bound = 2 * n_groups * vocab
    if bound >= _KEY_LIMIT:
        return None
    dtype = np.uint32 if bound < _U32_KEYS else np.int64
    parts = []
    for side, row, at, grp in ((0, join.a_row, join.a_at, join.group[:n_a]),
                               (1, join.b_row, join.b_at, join.group[n_a:])):
        keep = np.flatnonzero(row[1:] == row[:-1])  # entry i + 1 is the next token of entry i's text
        key = grp[keep].astype(dtype)
        key *= dtype(vocab)
        key += corpus.flat[at[keep + 1]].astype(dtype, copy=False)
        key *= dtype(2)
        key += dtype(side)
        parts.append(key)
    sk = np.concatenate(parts)
    if len(sk) == 0:
        return np.zeros(n_rows, dtype=np.int64)
    sk.sort()
    first = np.flatnonzero(heads(sk))
    count = np.diff(np.r_[first, len(sk)])
    key = sk[first] >> dtype(1)
    both = np.flatnonzero(key[1:] == key[:-1])  # (group, next token) on both sides: runs i, i + 1
    overlap = np.minimum(count[both], count[both + 1])
    return np.bincount(join.group_row[key[both] // dtype(vocab)], weights=overlap, minlength=n_rows
                       ).astype(np.int64)


def _row_starts(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths) - lengths


def _rouge_l_hits(corpus: _Corpus, pred_text: np.ndarray, ref_text: np.ndarray, join: _Join) -> np.ndarray:
    """LCS length of every (prediction, reference) row: vectorised where one side has <= 63 tokens (rows with a
    short reference straight from the join's match masks), in Python integers where both are longer."""
    lens_p, lens_r = corpus.lengths[pred_text], corpus.lengths[ref_text]
    out = np.zeros(len(pred_text), dtype=np.int64)
    both = (lens_p > 0) & (lens_r > 0)
    short_ref = both & (lens_r <= MAX_BITS)
    rows = np.flatnonzero(short_ref)
    if len(rows):
        a_bits = np.left_shift(_ONE, np.minimum(join.a_off, MAX_BITS).astype(np.uint64))
        full = np.left_shift(_ONE, np.minimum(lens_r, MAX_BITS).astype(np.uint64)) - _ONE
        out[rows] = lcs_cells(join.b_masks(a_bits), _row_starts(lens_p)[rows], lens_p[rows], full[rows])
    short_pred = both & ~short_ref & (lens_p <= MAX_BITS)
    idx = np.flatnonzero(short_pred)
    if len(idx) < _FEW_ROWS:  # a handful of rows: Python integers cost less than the batch's set-up
        short_pred[idx] = False
    elif len(idx):  # the LCS is symmetric: put the short side in the bit vector
        tp, tr = pred_text[idx], ref_text[idx]
        out[idx] = lcs_batch(corpus.flat, corpus.starts[tp], corpus.lengths[tp], corpus.starts[tr],
                             corpus.lengths[tr], corpus.vocab_size)[0]
    for row in np.flatnonzero(both & ~short_ref & ~short_pred).tolist():
        out[row] = _lcs_length(corpus.ids(int(ref_text[row])), corpus.ids(int(pred_text[row])))
    return out


def _rouge_lsum_hits(corpus: _Corpus, pred_text: np.ndarray, ref_text: np.ndarray, join: _Join) -> np.ndarray:
    """rougeLsum hit count of every row (see `_summary_lcs_hits`): rows whose reference lines fit one 64-bit
    unit straight from the join (`_one_unit_lsum_hits`), rows whose reference lines have <= 63 tokens each
    through `_packed_lsum_hits`, the others in Python integers."""
    n_rows = len(pred_text)
    out = np.zeros(n_rows, dtype=np.int64)
    first = corpus.first_line
    r0, n_r = first[ref_text], first[ref_text + 1] - first[ref_text]
    n_c = first[pred_text + 1] - first[pred_text]
    one_unit = (n_r > 0) & (n_c > 0) & (corpus.lengths[ref_text] + n_r <= MAX_BITS + 1)
    if one_unit.any():
        out[one_unit] = _one_unit_lsum_hits(corpus, pred_text, ref_text, join, one_unit)[one_unit]
    longest = np.zeros(len(first) - 1, dtype=np.int64)
    has_lines = np.flatnonzero(first[1:] > first[:-1])
    if len(has_lines):
        longest[has_lines] = np.maximum.reduceat(corpus.line_len, first[has_lines])
    fast = longest[ref_text] <= MAX_BITS
    rows = np.flatnonzero(fast & (n_r > 0) & (n_c > 0) & ~one_unit)
    tokens = int(corpus.lengths[ref_text[rows]].sum() + corpus.lengths[pred_text[rows]].sum())
    if len(rows) < _FEW_ROWS and tokens < _FEW_TOKENS:  # a few short rows: Python costs less than the set-up
        fast[rows] = False
    else:
        out[rows] = _packed_lsum_hits(corpus, pred_text[rows], r0[rows], n_r[rows])
    for row in np.flatnonzero(~fast & ~one_unit).tolist():
        out[row] = _summary_lcs_hits(corpus.lines(int(ref_text[row])), corpus.lines(int(pred_text[row])))
    return out


def _one_unit_lsum_hits(corpus: _Corpus, pred_text: np.ndarray, ref_text: np.ndarray, join: _Join,
                        rows: np.ndarray) -> np.ndarray:
    """rougeLsum hits of the ``rows`` (a bool mask) whose reference lines, each followed by a guard bit, fit in
    64 bits: each reference token's bit is its offset plus its line's index (`PackedLines` layout), the
    candidate's match masks come from the join, and hits = sum over tokens of min(union bits, count in the
    prediction), per group. Other rows get 0."""
    line_of = np.repeat(np.arange(len(corpus.line_len)), corpus.line_len)  # lines partition `flat`
    ref_first_line = corpus.first_line[ref_text]
    in_rows = rows[join.a_row]
    bit = join.a_off + line_of[join.a_at] - ref_first_line[join.a_row]
    a_bits = np.where(in_rows, np.left_shift(_ONE, np.minimum(bit, MAX_BITS).astype(np.uint64)), np.uint64(0))
    idx = np.flatnonzero(rows)
    line_row, line = _expand(ref_first_line[idx], corpus.first_line[ref_text[idx] + 1] - ref_first_line[idx])
    lo = (corpus.line_start[line] - corpus.starts[ref_text[idx]][line_row]
          + line - ref_first_line[idx][line_row]).astype(np.uint64)
    top = lo + (corpus.line_len[line] - 1).astype(np.uint64)
    row_first = np.flatnonzero(np.r_[True, line_row[1:] != line_row[:-1]])
    seg_lo = np.add.reduceat(np.left_shift(_ONE, lo), row_first)
    seg_top = np.add.reduceat(np.left_shift(_ONE, top), row_first)
    full = np.add.reduceat(np.left_shift(_ONE, top + _ONE) - np.left_shift(_ONE, lo), row_first)
    starts_flag = np.zeros(len(corpus.flat), dtype=bool)
    starts_flag[corpus.line_start] = True
    ends_flag = np.zeros(len(corpus.flat), dtype=bool)
    ends_flag[corpus.line_start + corpus.line_len - 1] = True
    lens_p = corpus.lengths[pred_text]
    union = np.zeros(len(pred_text), dtype=np.uint64)
    union[idx] = union_cells(join.b_masks(a_bits), starts_flag[join.b_at], ends_flag[join.b_at],
                             _row_starts(lens_p)[idx], lens_p[idx], full, seg_lo, seg_top)
    in_union = popcount(union[join.group_row] & join.group_bits(a_bits))
    return np.bincount(join.group_row, weights=np.minimum(in_union, join.count_b), minlength=len(pred_text)
                       ).astype(np.int64)


def _packed_lsum_hits(corpus: _Corpus, pred_text: np.ndarray, ref_first: np.ndarray, ref_n: np.ndarray) -> np.ndarray:
    """rougeLsum hits of rows whose reference lines all have <= 63 tokens: the lines packed into 64-bit
    units (`_bitlcs.union_lcs`), then hits = sum over tokens x of min(x's union positions, x's count in the
    prediction)."""
    n_rows = len(pred_text)
    line_row = np.repeat(np.arange(n_rows), ref_n)
    line = np.repeat(ref_first, ref_n) + np.arange(len(line_row)) - np.repeat(np.cumsum(ref_n) - ref_n, ref_n)
    packed = pack_lines(line_row, corpus.line_start[line], corpus.line_len[line], corpus.flat)
    first_flag = np.zeros(len(corpus.flat), dtype=bool)
    last_flag = np.zeros(len(corpus.flat), dtype=bool)
    first_flag[corpus.line_start] = True
    last_flag[corpus.line_start + corpus.line_len - 1] = True
    in_union = union_lcs(packed, corpus.flat, corpus.starts[pred_text], corpus.lengths[pred_text], first_flag,
                         last_flag, corpus.vocab_size)
    vocab = corpus.vocab_size
    row = packed.unit_row[packed.pos_unit[in_union]]
    keys, count_union = np.unique(row * vocab + packed.pos_tok[in_union], return_counts=True)
    key_row = keys // vocab
    pred_keys, pred_counts = _text_token_counts(corpus, _unique(pred_text))
    query = pred_text[key_row] * vocab + keys % vocab
    slot = np.minimum(np.searchsorted(pred_keys, query), max(len(pred_keys) - 1, 0))
    in_pred = np.where(pred_keys[slot] == query, pred_counts[slot], 0) if len(pred_keys) else 0 * query
    return np.bincount(key_row, weights=np.minimum(count_union, in_pred), minlength=n_rows).astype(np.int64)


def _unique(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values (``np.unique`` without extra outputs takes a much slower hash path in NumPy 2.x)."""
    s = np.sort(x)
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


def _text_token_counts(corpus: _Corpus, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys ``text * vocab + token`` with their counts, over the given texts."""
    lens = corpus.lengths[texts]
    owner = np.repeat(texts, lens)
    where = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(corpus.starts[texts], lens)
    return np.unique(owner * corpus.vocab_size + corpus.flat[where], return_counts=True)


# ---------------------------------------------------------------------------------------------------------------
# The metric
# ---------------------------------------------------------------------------------------------------------------


def _prf(hits: np.ndarray, n_pred: np.ndarray, n_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P, R, F as rouge-score computes them (``max(., 1)`` only changes 0/0 into 0.0, as its early exits do)."""
    precision = hits / np.maximum(n_pred, 1)
    recall = hits / np.maximum(n_ref, 1)
    denom = precision + recall
    fmeasure = np.zeros_like(precision)
    np.divide(2 * precision * recall, denom, out=fmeasure, where=denom > 0)
    return precision, recall, fmeasure


class RougeTemplate(CorpusMetric):
    """What every ``rouge`` backend shares: options, label, chunking, per-example means, the signature."""

    name: ClassVar[str] = "rouge"
    label: ClassVar[str] = "ROUGE"
    chunkable: ClassVar[bool] = True
    Options: ClassVar[type] = RougeOptions
    options: RougeOptions

    def implementation(self) -> str:
        """The ``impl`` field of the signature."""
        return "llmtune-numpy"

    def signature(self, nrefs: str) -> str:
        """`rouge_signature` with this backend's implementation."""
        return rouge_signature(self.options, nrefs, self.implementation())


class NumpyRouge(RougeTemplate):
    """ROUGE-N/L/Lsum equal to rouge-score (``score`` / ``score_multi``), with our tokenizer and Porter stemmer."""

    backend: ClassVar[str] = "numpy"

    def extract(self, preds: list[str], refs: list[list[str]]) -> dict[str, np.ndarray]:
        """Per-example P/R/F of every type (corpus values are their means)."""
        return self._per_example(preds, refs, tuple(self.options.rouge_types), self.options.use_stemmer)

    @staticmethod
    def _per_example(
        preds: list[str], refs: list[list[str]], types: tuple[str, ...], use_stemmer: bool,
    ) -> dict[str, np.ndarray]:
        keep_freed_heap()
        want_lsum = "rougeLsum" in types
        corpus = _Corpus([*preds, *chain.from_iterable(refs)], use_stemmer, want_lsum)
        # One row per (prediction, reference); texts are numbered predictions first, then references.
        group = np.repeat(np.arange(len(preds)), [len(g) for g in refs])
        pred_text = group
        ref_text = np.arange(len(preds), len(preds) + len(group))
        n_pred = corpus.lengths[pred_text]
        n_ref = corpus.lengths[ref_text]

        join = _join(corpus, pred_text, ref_text)
        stats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for t in types:
            if t in ("rougeL", "rougeLsum"):
                continue
            n = int(t[5:])
            hits = _unigram_hits(join, len(pred_text)) if n == 1 else None
            if n == 2:
                hits = _bigram_hits(corpus, join, len(pred_text))
            if hits is None:
                hits = _ngram_hits(corpus, n, pred_text, ref_text)
            stats[t] = (hits, np.maximum(n_pred - n + 1, 0), np.maximum(n_ref - n + 1, 0))
        if "rougeL" in types:
            stats["rougeL"] = (_rouge_l_hits(corpus, pred_text, ref_text, join), n_pred, n_ref)
        if want_lsum:
            stats["rougeLsum"] = (_rouge_lsum_hits(corpus, pred_text, ref_text, join), n_pred, n_ref)

        out: dict[str, np.ndarray] = {}
        multi = len(group) != len(preds)
        for t in types:
            p, r, f = _prf(*stats[t])
            if multi:
                chosen = _best_rows(f, group, len(preds))
                p, r, f = p[chosen], r[chosen], f[chosen]
            out[f"{t}_precision"] = p
            out[f"{t}_recall"] = r
            out[f"{t}_fmeasure"] = f
        return out


def _best_rows(fmeasure: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group, the first row with the largest F (``np.argmax`` as in ``score_multi``)."""
    best = np.full(n_groups, -np.inf)
    np.maximum.at(best, group, fmeasure)
    candidates = np.flatnonzero(fmeasure == best[group])
    _, first = np.unique(group[candidates], return_index=True)
    return candidates[first]
