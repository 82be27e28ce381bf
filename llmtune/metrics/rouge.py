"""ROUGE-N, ROUGE-L and ROUGE-Lsum from scratch, equal to rouge-score 0.1.2 and much faster.

Every per-example value equals ``rouge_score.rouge_scorer.RougeScorer(types, use_stemmer).score(ref, pred)``
(one reference) or ``.score_multi(refs, pred)`` (several) bit for bit:

* the same tokenizer (lower-case, every run of characters outside ``[a-z0-9]`` is a separator, the
  Porter stemmer only on tokens longer than 3 characters) and our own copy of NLTK's Porter stemmer;
* the same integer statistics (clipped n-gram overlap, LCS length, rougeLsum's union-LCS hit count
  with rouge-score's exact back-tracking tie-break), then ``P = k / len_pred``, ``R = k / len_ref``,
  ``F = 2 * P * R / (P + R)`` in the same float operation order.

Speed comes from tokenizing the whole corpus in one pass (words mapped to integer ids through a memoised
stemmer), n-gram overlaps counted for all pairs at once with NumPy sorts, and the bit-parallel LCS
(Allison-Dix / Hyyro) run for all pairs in lock-step on ``uint64`` words (`llmtune.metrics._bitlcs`),
including the replay of rouge-score's LCS back-tracking that rougeLsum needs; sequences longer than 63
tokens use the same algorithm on Python integers. Corpus scores are the means of the per-example values.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import Counter
from collections.abc import Sequence
from itertools import chain
from typing import ClassVar

import numpy as np

from llmtune._version import __version__
from llmtune.core.errors import InvalidOptionError, did_you_mean
from llmtune.core.options import check_type
from llmtune.metrics import _porter
from llmtune.metrics._bitlcs import MAX_BITS, lcs_batch, pack_lines, union_lcs
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


class _Encoder:
    """Maps words (ASCII bytes) to integer token ids after stemming, memoising every distinct word."""

    NEWLINE = -1  # id of a line break (rougeLsum's sentence separator)
    TEXT_END = -2  # id of the separator put between the texts of a corpus

    def __init__(self, use_stemmer: bool) -> None:
        self.use_stemmer = use_stemmer
        self.word_ids: dict[bytes, int] = {_NEWLINE_MARK: self.NEWLINE, _TEXT_MARK: self.TEXT_END}
        self.token_ids: dict[str, int] = {}

    def _add(self, words: list[bytes]) -> None:
        with _ENCODER_LOCK:  # ids are handed out by count: two threads must not hand out the same one
            word_ids, token_ids = self.word_ids, self.token_ids
            stem = _porter.stem
            for w in words:
                if w not in word_ids:
                    text = w.decode("ascii")
                    # A Porter stem of an [a-z0-9]{4,} word is never empty, so no token is dropped here.
                    tok = stem(text) if self.use_stemmer and len(text) > 3 else text
                    word_ids[w] = token_ids.setdefault(tok, len(token_ids))

    def ids(self, words: list[bytes]) -> list[int]:
        """The ids of split words (the line and text markers map to NEWLINE and TEXT_END)."""
        try:
            return list(map(self.word_ids.__getitem__, words))
        except KeyError:
            self._add(words)
            return list(map(self.word_ids.__getitem__, words))


_ENCODER_LOCK = threading.Lock()
_ENCODERS: dict[bool, _Encoder] = {}
_ENCODER_MAX_WORDS = 1 << 20  # a long-running process starts a fresh vocabulary past this many words


def _encoder(use_stemmer: bool) -> _Encoder:
    """The process-wide encoder (its word ids persist between calls: words are split and stemmed once)."""
    enc = _ENCODERS.get(use_stemmer)
    if enc is None or len(enc.word_ids) > _ENCODER_MAX_WORDS:
        with _ENCODER_LOCK:
            enc = _ENCODERS[use_stemmer] = _Encoder(use_stemmer)
    return enc


def clear_caches() -> None:
    """Forget every memoised word id and Porter stem (the first call after this pays for all of them)."""
    with _ENCODER_LOCK:
        _ENCODERS.clear()
    _porter._CACHE.clear()


_TEXT_SEP = "\x00"
_NEWLINE_MARK = b"\x01"
_TEXT_MARK = b"\x02"
#: After lower-casing and ASCII-encoding (every non-ASCII character becomes "?"), keep a-z and 0-9,
#: turn "\n" and the text separator into marker bytes, and everything else into a space.
_ASCII_TABLE = bytes(
    c if (48 <= c <= 57 or 97 <= c <= 122) else 1 if c == 10 else 2 if c == 0 else 32 for c in range(256)
)


def _split(text: str, lines: bool) -> list[bytes]:
    """rouge-score's tokenization of (lower-cased) ``text`` as ASCII words, with line/text marker words.

    Equal to ``re.findall("[a-z0-9]+", text.lower())`` (plus markers), several times faster: only ASCII
    letters and digits survive rouge-score's tokenizer, so non-ASCII characters may be replaced by "?".
    """
    data = text.lower().encode("ascii", "replace").translate(_ASCII_TABLE)
    if lines:
        data = data.replace(_NEWLINE_MARK, b" \x01 ")
    else:
        data = data.replace(_NEWLINE_MARK, b" ")
    return data.replace(_TEXT_MARK, b" \x02 ").split()


class _Corpus:
    """Every text of a corpus tokenized once, as one flat array of token ids with text and line segments.

    All texts are lower-cased and split with one regex call over their concatenation (separated by
    NUL, which is a non-alphanumeric separator for rouge-score too); this is equal to tokenizing each
    text alone because ``str.lower`` only looks at neighbours for the Greek final sigma (never ASCII).
    Lines (rougeLsum's sentences) without tokens are left out: they add nothing to rougeLsum.
    """

    def __init__(self, texts: list[str], enc: _Encoder, want_lines: bool) -> None:
        joined = _TEXT_SEP.join(texts)
        if joined.count(_TEXT_SEP) == len(texts) - 1:
            ids = enc.ids(_split(joined, want_lines))
        else:  # a text contains NUL itself: tokenize each text alone
            ids = []
            for k, text in enumerate(texts):
                if k:
                    ids.append(enc.TEXT_END)
                ids += enc.ids(_split(text.replace(_TEXT_SEP, " "), want_lines))
        arr = np.asarray(ids, dtype=np.int64)
        keep = arr >= 0
        n_texts = len(texts)
        #: all token ids without separators, the text of each, each text's length and start in `flat`
        self.flat = arr[keep]
        self.text_of = np.cumsum(arr == enc.TEXT_END)[keep]
        self.lengths = np.bincount(self.text_of, minlength=n_texts)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.vocab_size = max(len(enc.token_ids), 1)
        #: non-empty lines: start in `flat`, length, text; the lines of text t are first_line[t]:first_line[t+1]
        marks = np.flatnonzero(~keep)
        seg_start = np.r_[0, marks + 1]
        seg_len = np.r_[marks, len(arr)] - seg_start
        seg_text = np.r_[0, np.cumsum(arr[marks] == enc.TEXT_END)]
        nonempty = seg_len > 0
        self.line_start = (seg_start - np.arange(len(seg_start)))[nonempty]  # k separators precede segment k
        self.line_len = seg_len[nonempty]
        self.line_text = seg_text[nonempty]
        self.first_line = np.searchsorted(self.line_text, np.arange(n_texts + 1))
        self._flat_list: list[int] | None = None

    def _tokens(self) -> list[int]:
        if self._flat_list is None:
            self._flat_list = self.flat.tolist()
        return self._flat_list

    def ids(self, text: int) -> list[int]:
        """Token ids of one text, as a Python list."""
        start = int(self.starts[text])
        return self._tokens()[start:start + int(self.lengths[text])]

    def lines(self, text: int) -> list[list[int]]:
        """Token ids of each non-empty line of one text, as Python lists."""
        tokens = self._tokens()
        lo, hi = int(self.first_line[text]), int(self.first_line[text + 1])
        return [tokens[st:st + ln] for st, ln in zip(self.line_start[lo:hi].tolist(), self.line_len[lo:hi].tolist())]


# ---------------------------------------------------------------------------------------------------------------
# Integer statistics
# ---------------------------------------------------------------------------------------------------------------


_KEY_LIMIT = 1 << 62


def _ngram_hits(corpus: _Corpus, n: int, pred_text: np.ndarray, ref_text: np.ndarray) -> np.ndarray:
    """Per row, the clipped n-gram overlap ``sum_g min(count_pred(g), count_ref(g))``, for all rows at once.

    Each n-gram gets an integer code (re-ranked with ``np.unique`` whenever it could overflow int64),
    ``(text, code)`` occurrences are counted with one sort, and each row looks up its reference's
    n-grams in its prediction's counts with ``searchsorted``. Integer-exact.
    """
    flat, text_of = corpus.flat, corpus.text_of
    n_texts = len(corpus.lengths)
    code = flat
    for k in range(1, n):
        if len(code) <= 1:
            code = code[:0]
            break
        combined = code[:-1] * corpus.vocab_size + flat[k:]
        if (int(combined.max()) + 1) * max(corpus.vocab_size, n_texts + 1) < _KEY_LIMIT:
            code = combined  # still room to extend it and to prefix the text: no re-ranking needed
        else:
            _, code = np.unique(combined, return_inverse=True)
            code = code.reshape(-1)
    starts = np.arange(len(code))
    valid = text_of[starts] == text_of[starts + n - 1] if len(code) else np.zeros(0, dtype=bool)
    n_codes = int(code.max()) + 1 if len(code) else 1
    keys = text_of[starts[valid]] * n_codes + code[valid]
    ukeys, counts = np.unique(keys, return_counts=True)
    first = np.searchsorted(ukeys, np.arange(n_texts + 1) * n_codes)
    # expand every row into the distinct n-grams of its reference
    lo, hi = first[ref_text], first[ref_text + 1]
    sizes = hi - lo
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(len(ref_text), dtype=np.int64)
    row = np.repeat(np.arange(len(ref_text)), sizes)
    entry = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes) + np.repeat(lo, sizes)
    query = pred_text[row] * n_codes + ukeys[entry] % n_codes
    pos = np.minimum(np.searchsorted(ukeys, query), len(ukeys) - 1)
    pred_counts = np.where(ukeys[pos] == query, counts[pos], 0)
    overlap = np.minimum(pred_counts, counts[entry])
    return np.bincount(row, weights=overlap, minlength=len(ref_text)).astype(np.int64)


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


def _rouge_l_hits(corpus: _Corpus, pred_text: np.ndarray, ref_text: np.ndarray) -> np.ndarray:
    """LCS length of every (prediction, reference) row: vectorised where one side has <= 63 tokens."""
    lens_p, lens_r = corpus.lengths[pred_text], corpus.lengths[ref_text]
    out = np.zeros(len(pred_text), dtype=np.int64)
    both = (lens_p > 0) & (lens_r > 0)
    short_ref = both & (lens_r <= MAX_BITS)
    short_pred = both & ~short_ref & (lens_p <= MAX_BITS)
    for rows, a, b in ((short_ref, ref_text, pred_text), (short_pred, pred_text, ref_text)):
        idx = np.flatnonzero(rows)
        if len(idx):  # the LCS is symmetric: put the short side in the bit vector
            ta, tb = a[idx], b[idx]
            out[idx] = lcs_batch(corpus.flat, corpus.starts[ta], corpus.lengths[ta], corpus.starts[tb],
                                 corpus.lengths[tb], corpus.vocab_size)[0]
    for row in np.flatnonzero(both & ~short_ref & ~short_pred).tolist():
        out[row] = _lcs_length(corpus.ids(int(ref_text[row])), corpus.ids(int(pred_text[row])))
    return out


def _rouge_lsum_hits(corpus: _Corpus, pred_text: np.ndarray, ref_text: np.ndarray) -> np.ndarray:
    """rougeLsum hit count of every row (see `_summary_lcs_hits`), vectorised where every reference line
    has <= 63 tokens: one `lcs_batch` over all (reference line, prediction line) pairs, back-tracked, then
    hits = sum over tokens x of min(x's positions in the union LCSs, x's count in the prediction)."""
    n_rows = len(pred_text)
    out = np.zeros(n_rows, dtype=np.int64)
    first = corpus.first_line
    r0, n_r = first[ref_text], first[ref_text + 1] - first[ref_text]
    n_c = first[pred_text + 1] - first[pred_text]
    longest = np.zeros(len(first) - 1, dtype=np.int64)
    has_lines = np.flatnonzero(first[1:] > first[:-1])
    if len(has_lines):
        longest[has_lines] = np.maximum.reduceat(corpus.line_len, first[has_lines])
    fast = longest[ref_text] <= MAX_BITS
    rows = np.flatnonzero(fast & (n_r > 0) & (n_c > 0))
    if len(rows):
        out[rows] = _packed_lsum_hits(corpus, pred_text[rows], r0[rows], n_r[rows])
    for row in np.flatnonzero(~fast).tolist():
        out[row] = _summary_lcs_hits(corpus.lines(int(ref_text[row])), corpus.lines(int(pred_text[row])))
    return out


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
        want_lsum = "rougeLsum" in types
        corpus = _Corpus([*preds, *chain.from_iterable(refs)], _encoder(use_stemmer), want_lsum)
        # One row per (prediction, reference); texts are numbered predictions first, then references.
        group = np.repeat(np.arange(len(preds)), [len(g) for g in refs])
        pred_text = group
        ref_text = np.arange(len(preds), len(preds) + len(group))
        n_pred = corpus.lengths[pred_text]
        n_ref = corpus.lengths[ref_text]

        stats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for t in types:
            if t in ("rougeL", "rougeLsum"):
                continue
            n = int(t[5:])
            hits = _ngram_hits(corpus, n, pred_text, ref_text)
            stats[t] = (hits, np.maximum(n_pred - n + 1, 0), np.maximum(n_ref - n + 1, 0))
        if "rougeL" in types:
            stats["rougeL"] = (_rouge_l_hits(corpus, pred_text, ref_text), n_pred, n_ref)
        if want_lsum:
            stats["rougeLsum"] = (_rouge_lsum_hits(corpus, pred_text, ref_text), n_pred, n_ref)

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
