"""ROUGE-N, ROUGE-L and ROUGE-Lsum from scratch, equal to rouge-score 0.1.2 and much faster.

Every per-example value equals ``rouge_score.rouge_scorer.RougeScorer(types, use_stemmer).score(ref, pred)``
(one reference) or ``.score_multi(refs, pred)`` (several) bit for bit:

* the same tokenizer (lower-case, every run of characters outside ``[a-z0-9]`` is a separator, the
  Porter stemmer only on tokens longer than 3 characters) and our own copy of NLTK's Porter stemmer;
* the same integer statistics (clipped n-gram overlap, LCS length, rougeLsum's union-LCS hit count
  with rouge-score's exact back-tracking tie-break), then ``P = k / len_pred``, ``R = k / len_ref``,
  ``F = 2 * P * R / (P + R)`` in the same float operation order.

Speed comes from tokenizing each text once (words mapped to integer ids through a memoised stemmer),
bit-parallel LCS (Allison-Dix / Hyyro) on Python integers instead of an O(m*n) table, and vectorised
float arithmetic. Corpus scores are the means of the per-example values.
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
from llmtune.core.interfaces import Metric
from llmtune.core.options import check_type
from llmtune.core.results import MetricResult
from llmtune.metrics import _porter
from llmtune.metrics._bootstrap import bootstrap_intervals
from llmtune.metrics._inputs import normalize_inputs

__all__ = [
    "DEFAULT_ROUGE_TYPES", "MEASURES", "ROUGE_TYPES", "NumpyRouge", "RougeOptions", "rouge_signature", "tokenize",
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
    """

    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES
    use_stemmer: bool = False
    bootstrap: bool = False
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0

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


def rouge_signature(options: RougeOptions, refs: str, impl: str) -> str:
    """A sacrebleu-style string saying how a ROUGE number was computed, e.g. ``rouge|types:rouge1|stem:no|...``.

    ``refs``: the number of references per prediction, or ``"var"``; ``impl``: e.g. ``"llmtune-numpy"``.
    """
    parts = [
        "rouge",
        f"types:{','.join(options.rouge_types)}",
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
    """Maps words to integer token ids (after stemming), memoising every distinct word."""

    NEWLINE = -1  # id of a line break (rougeLsum's sentence separator)
    TEXT_END = -2  # id of the separator put between the texts of a corpus

    def __init__(self, use_stemmer: bool) -> None:
        self.use_stemmer = use_stemmer
        self.word_ids: dict[str, int] = {"\n": self.NEWLINE, _TEXT_SEP: self.TEXT_END}
        self.token_ids: dict[str, int] = {}

    def _add(self, words: list[str]) -> None:
        word_ids, token_ids = self.word_ids, self.token_ids
        stem = _porter.stem
        for w in words:
            if w not in word_ids:
                # A Porter stem of an [a-z0-9]{4,} word is never empty, so no token is dropped here.
                tok = stem(w) if self.use_stemmer and len(w) > 3 else w
                word_ids[w] = token_ids.setdefault(tok, len(token_ids))

    def ids(self, words: list[str]) -> list[int]:
        """The ids of already-split words (``"\n"`` -> NEWLINE, the text separator -> TEXT_END)."""
        try:
            return list(map(self.word_ids.__getitem__, words))
        except KeyError:
            self._add(words)
            return list(map(self.word_ids.__getitem__, words))


_TEXT_SEP = "\x00"
_SPLIT_RE = re.compile(r"[a-z0-9]+|\x00")
_SPLIT_LINES_RE = re.compile(r"[a-z0-9]+|[\n\x00]")


class _Corpus:
    """Every text of a corpus tokenized once: token ids per text, per line (for rougeLsum), and flat.

    All texts are lower-cased and split with one regex call over their concatenation (separated by
    NUL, which is a non-alphanumeric separator for rouge-score too); this is equal to tokenizing each
    text alone because ``str.lower`` only looks at neighbours for the Greek final sigma (never ASCII).
    Lines without tokens are left out of ``lines``: they add nothing to rougeLsum.
    """

    def __init__(self, texts: list[str], enc: _Encoder, want_lines: bool) -> None:
        joined = _TEXT_SEP.join(texts)
        if joined.count(_TEXT_SEP) == len(texts) - 1:
            ids = enc.ids((_SPLIT_LINES_RE if want_lines else _SPLIT_RE).findall(joined.lower()))
        else:  # a text contains NUL itself: tokenize each text alone
            regex = _SPLIT_LINES_RE if want_lines else _WORD_RE
            ids = []
            for k, text in enumerate(texts):
                if k:
                    ids.append(enc.TEXT_END)
                ids += enc.ids(regex.findall(text.lower().replace(_TEXT_SEP, " ")))
        arr = np.asarray(ids, dtype=np.int64)
        ends = np.flatnonzero(arr == enc.TEXT_END)
        if want_lines:
            self.lines = _split_lines(ids, np.flatnonzero(arr < 0).tolist(), len(texts))
            self.ids = [ln[0] if len(ln) == 1 else list(chain.from_iterable(ln)) for ln in self.lines]
        else:
            bounds = [-1, *ends.tolist(), len(ids)]
            self.ids = [ids[bounds[k] + 1:bounds[k + 1]] for k in range(len(texts))]
            self.lines = []
        keep = arr >= 0
        #: all token ids without separators, the text each belongs to, and each text's length
        self.flat = arr[keep]
        self.text_of = np.cumsum(arr == enc.TEXT_END)[keep]
        self.lengths = np.bincount(self.text_of, minlength=len(texts))
        self.vocab_size = max(len(enc.token_ids), 1)


def _split_lines(ids: list[int], marks: list[int], n_texts: int) -> list[list[list[int]]]:
    """Cut ``ids`` at separator positions ``marks`` into per-text lists of non-empty lines."""
    out: list[list[list[int]]] = []
    lines: list[list[int]] = []
    prev = 0
    for m in marks:
        if m > prev:
            lines.append(ids[prev:m])
        if ids[m] == _Encoder.TEXT_END:
            out.append(lines)
            lines = []
        prev = m + 1
    if len(ids) > prev:
        lines.append(ids[prev:])
    out.append(lines)
    assert len(out) == n_texts
    return out


# ---------------------------------------------------------------------------------------------------------------
# Integer statistics
# ---------------------------------------------------------------------------------------------------------------


def _ngram_hits(corpus: _Corpus, n: int, pred_text: np.ndarray, ref_text: np.ndarray) -> np.ndarray:
    """Per row, the clipped n-gram overlap ``sum_g min(count_pred(g), count_ref(g))``, for all rows at once.

    Each n-gram gets an integer code (pairs of codes re-ranked with ``np.unique`` so nothing overflows),
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
        mt = get(tok)
        if mt:
            in_union = (union & mt).bit_count()
            hits += in_union if in_union < count else count
    return hits


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


class NumpyRouge(Metric):
    """ROUGE-N/L/Lsum equal to rouge-score (``score`` / ``score_multi``), with our tokenizer and Porter stemmer."""

    name: ClassVar[str] = "rouge"
    backend: ClassVar[str] = "numpy"
    Options: ClassVar[type] = RougeOptions
    options: RougeOptions

    def compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str] | Sequence[Sequence[str]],
    ) -> MetricResult:
        """Score each prediction against its reference(s); corpus values are means over predictions."""
        preds, refs = normalize_inputs(predictions, references)
        if not preds:
            raise ValueError("predictions is empty: ROUGE needs at least one prediction/reference pair")
        opts = self.options
        types = tuple(opts.rouge_types)
        per_example = self._per_example(preds, refs, types, opts.use_stemmer)
        scores = {key: float(np.mean(values)) for key, values in per_example.items()}
        if opts.bootstrap:
            scores.update(bootstrap_intervals(
                per_example, samples=opts.bootstrap_samples, confidence=float(opts.confidence), seed=opts.seed,
            ))
        counts = {len(g) for g in refs}
        nrefs = str(counts.pop()) if len(counts) == 1 else "var"
        return MetricResult(scores=scores, per_example=per_example,
                            signature=rouge_signature(opts, nrefs, "llmtune-numpy"))

    @staticmethod
    def _per_example(
        preds: list[str], refs: list[list[str]], types: tuple[str, ...], use_stemmer: bool,
    ) -> dict[str, np.ndarray]:
        want_lsum = "rougeLsum" in types
        corpus = _Corpus([*preds, *chain.from_iterable(refs)], _Encoder(use_stemmer), want_lsum)
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
        ids = corpus.ids
        pairs = list(zip(pred_text.tolist(), ref_text.tolist()))
        if "rougeL" in types:
            lcs = [_lcs_length(ids[r], ids[p]) for p, r in pairs]
            stats["rougeL"] = (np.asarray(lcs, dtype=np.int64), n_pred, n_ref)
        if want_lsum:
            lines = corpus.lines
            hits_lsum = [_summary_lcs_hits(lines[r], lines[p]) for p, r in pairs]
            stats["rougeLsum"] = (np.asarray(hits_lsum, dtype=np.int64), n_pred, n_ref)

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
