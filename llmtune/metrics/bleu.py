"""BLEU from scratch (NumPy n-gram statistics), equal to sacrebleu or, with ``definition="nltk"``, to NLTK.

Two definitions share one statistics engine:

* ``definition="sacrebleu"`` (default): tokenizers ``13a``/``intl``/``char``/``none``, smoothing ``exp``/
  ``floor``/``add-k``/``none``, ``lowercase``, ``effective_order``, ``max_ngram_order``; scores 0-100, equal to
  ``sacrebleu.metrics.BLEU(**options).corpus_score`` and, per example, ``.sentence_score``.
* ``definition="nltk"``: whitespace tokens, ``smoothing`` 0-7 (``SmoothingFunction().methodK``), ``weights``,
  ``auto_reweigh``; scores 0-1, equal to ``nltk.translate.bleu_score.corpus_bleu`` / ``sentence_bleu``.

The integer statistics (clipped n-gram matches, n-gram totals, lengths) are exact whatever the method; the
final scalars are computed with the same Python operations, in the same order, as the official libraries
(see docs/metrics-bleu.md), so results are bit-identical on the same Python.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from itertools import chain, pairwise
from typing import Any, ClassVar

import numpy as np

from llmtune.core.errors import InvalidOptionError
from llmtune.core.options import check_choice, check_type
from llmtune.core.results import LazyMapping
from llmtune.metrics._bleu_tokenizers import encode as _encode
from llmtune.metrics._heap import keep_freed_heap
from llmtune.metrics._wordkeys import heads
from llmtune.metrics.base import SignedCorpusMetric

#: sacrebleu version whose behaviour (and signature format) this module reproduces.
SACREBLEU_COMPAT = "2.6.0"
#: NLTK version whose ``bleu_score`` this module reproduces.
NLTK_COMPAT = "3.10.4"

DEFINITIONS = ("sacrebleu", "nltk")
TOKENIZERS = ("13a", "intl", "char", "none")
SMOOTH_METHODS = ("exp", "floor", "add-k", "none")
SMOOTH_DEFAULTS: dict[str, float | int | None] = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}
#: Largest n-gram order accepted (BLEU uses 4; the cost grows with the order, 1e8 would run for minutes).
MAX_NGRAM_ORDER = 100
_SACRE_ONLY = ("tokenize", "smooth_method", "smooth_value", "lowercase", "effective_order", "max_ngram_order")
_NLTK_ONLY = ("smoothing", "weights", "auto_reweigh")
_KEY_LIMIT = 1 << 62
#: tokens per block of `sacre_segment_stats`
BLOCK_TOKENS = 1 << 16


@dataclasses.dataclass(frozen=True)
class BleuOptions:
    """Options of every ``bleu`` backend; ``None`` means "the definition's default".

    sacrebleu definition: ``tokenize`` ('13a'), ``smooth_method`` ('exp'), ``smooth_value`` (floor 0.1,
    add-k 1), ``lowercase`` (False), ``effective_order`` (False), ``max_ngram_order`` (4).
    nltk definition: ``smoothing`` (0 = method0), ``weights`` ((0.25,)*4), ``auto_reweigh`` (False).
    Giving an option of the other definition is an error (it would be silently meaningless).
    """

    definition: str = "sacrebleu"
    tokenize: str | None = None
    smooth_method: str | None = None
    smooth_value: float | None = None
    lowercase: bool | None = None
    effective_order: bool | None = None
    max_ngram_order: int | None = None
    smoothing: int | None = None
    weights: tuple[float, ...] | None = None
    auto_reweigh: bool | None = None

    def __post_init__(self) -> None:
        check_choice("definition", self.definition, DEFINITIONS)
        other = _NLTK_ONLY if self.definition == "sacrebleu" else _SACRE_ONLY
        for field in other:
            if getattr(self, field) is not None:
                owner = "nltk" if self.definition == "sacrebleu" else "sacrebleu"
                raise InvalidOptionError(
                    f"option {field!r} applies only to definition={owner!r}, but definition={self.definition!r}"
                    f" (pass definition={owner!r}, or drop {field!r})"
                )
        if self.definition == "sacrebleu":
            self._check_sacrebleu()
        else:
            self._check_nltk()

    def _check_sacrebleu(self) -> None:
        if self.tokenize is not None:
            check_choice("tokenize", self.tokenize, TOKENIZERS)
        if self.smooth_method is not None:
            check_choice("smooth_method", self.smooth_method, SMOOTH_METHODS)
        for field in ("lowercase", "effective_order"):
            if getattr(self, field) is not None:
                check_type(field, getattr(self, field), bool)
        if self.max_ngram_order is not None:
            check_type("max_ngram_order", self.max_ngram_order, int)
            if not 1 <= self.max_ngram_order <= MAX_NGRAM_ORDER:
                raise InvalidOptionError(f"option max_ngram_order={self.max_ngram_order} must be >= 1 and <= "
                                         f"{MAX_NGRAM_ORDER} (BLEU uses 4)")
        if self.smooth_value is not None:
            check_type("smooth_value", self.smooth_value, (int, float))
            method = self.smooth_method or "exp"
            if SMOOTH_DEFAULTS[method] is None:
                raise InvalidOptionError(
                    f"option smooth_value={self.smooth_value!r} has no effect with smooth_method={method!r}: "
                    "it applies only to 'floor' and 'add-k'"
                )
            if not math.isfinite(self.smooth_value) or self.smooth_value < 0:
                raise InvalidOptionError(f"option smooth_value={self.smooth_value!r} must be a finite number >= 0")

    def _check_nltk(self) -> None:
        if self.smoothing is not None:
            check_type("smoothing", self.smoothing, int)
            check_choice("smoothing", self.smoothing, tuple(range(8)))
        if self.auto_reweigh is not None:
            check_type("auto_reweigh", self.auto_reweigh, bool)
        if self.weights is not None:
            if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence):
                raise InvalidOptionError(f"option weights={self.weights!r} must be a sequence of numbers")
            if not self.weights:
                raise InvalidOptionError("option weights=() must give at least one n-gram weight")
            if len(self.weights) > MAX_NGRAM_ORDER:
                raise InvalidOptionError(f"option weights has {len(self.weights)} entries (n-gram orders); at most "
                                         f"{MAX_NGRAM_ORDER}")
            for i, w in enumerate(self.weights):
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise InvalidOptionError(f"option weights[{i}]={w!r} must be a finite number >= 0 (a negative "
                                             "weight rewards missing n-grams)", field="weights")
            object.__setattr__(self, "weights", tuple(self.weights))

    # Resolved values -----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> str:
        """The sacrebleu tokenizer name in effect."""
        return self.tokenize or "13a"

    @property
    def smooth(self) -> str:
        """The sacrebleu smoothing method in effect."""
        return self.smooth_method or "exp"

    @property
    def smooth_val(self) -> float | int | None:
        """The smoothing value in effect (sacrebleu's default for the method when not given)."""
        return self.smooth_value if self.smooth_value is not None else SMOOTH_DEFAULTS[self.smooth]

    @property
    def order(self) -> int:
        """Maximum n-gram order: ``max_ngram_order`` (sacrebleu) or ``len(weights)`` (nltk)."""
        if self.definition == "nltk":
            return len(self.nltk_weights)
        return self.max_ngram_order if self.max_ngram_order is not None else 4

    @property
    def nltk_weights(self) -> tuple[float, ...]:
        """The NLTK weights in effect."""
        return self.weights if self.weights is not None else (0.25, 0.25, 0.25, 0.25)

    def sacrebleu_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sacrebleu.metrics.BLEU`` giving the same definition."""
        return {"tokenize": self.tokenizer, "smooth_method": self.smooth, "smooth_value": self.smooth_value,
                "lowercase": bool(self.lowercase), "effective_order": bool(self.effective_order),
                "max_ngram_order": self.order}


@dataclasses.dataclass(frozen=True)
class NltkBleuOptions(BleuOptions):
    """`BleuOptions` whose default definition is NLTK's (the ``nltk`` backend computes nothing else)."""

    definition: str = "nltk"


# ------------------------------------------------------------------------------------------------------------
# N-gram statistics
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SegmentStats:
    """Per-segment BLEU sufficient statistics (int64 arrays; ``correct``/``total`` have shape (S, N))."""

    hyp_len: np.ndarray
    ref_len: np.ndarray  # closest reference length, ties -> shorter (sacrebleu and NLTK agree)
    correct: np.ndarray
    total: np.ndarray
    n_refs: list[int]


def segment_stats(hyps: list[list[str]], refs: list[list[list[str]]], max_order: int) -> SegmentStats:
    """`segment_stats_ids` for token lists (hypotheses, then each segment's references)."""
    lines = hyps + [r for group in refs for r in group]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(chain.from_iterable(lines)))}
    ids = np.fromiter(map(vocab.__getitem__, chain.from_iterable(lines)), dtype=np.int64,
                      count=sum(map(len, lines)))
    lens = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
    return segment_stats_ids(ids, lens, [len(group) for group in refs], max_order)


def segment_stats_ids(ids: np.ndarray, lens: np.ndarray, n_refs: list[int], max_order: int) -> SegmentStats:
    """Clipped n-gram matches (max count over references), n-gram totals and lengths per segment.

    ``ids``: token ids of every line, flat (the S hypotheses, then the references of segment 0, 1, ...);
    ``lens``: tokens per line; ``n_refs``: references per segment. Counts come from `_order_matches`, one sort
    per order.
    """
    n_seg = len(n_refs)
    hyp_len = lens[:n_seg].copy()
    ref_lens = lens[n_seg:]
    # closest reference length, ties -> the shorter one
    diff = np.abs(ref_lens - np.repeat(hyp_len, n_refs))
    big = int(ref_lens.max(initial=0)) + 1
    keyed = diff * big + ref_lens
    first = np.zeros(n_seg, dtype=np.int64)
    np.cumsum(np.asarray(n_refs[:-1], dtype=np.int64), out=first[1:])
    ref_len = np.minimum.reduceat(keyed, first) % big if n_seg else np.zeros(0, dtype=np.int64)
    total = np.maximum(hyp_len[:, None] - np.arange(max_order, dtype=np.int64)[None, :], 0)
    # per line: its segment and side (0: hypothesis, k: k-th reference of its segment)
    seg_of_line = np.concatenate([np.arange(n_seg, dtype=np.int64),
                                  np.repeat(np.arange(n_seg, dtype=np.int64), n_refs)])
    side_of_line = np.concatenate([np.zeros(n_seg, dtype=np.int64), np.arange(len(ref_lens)) - np.repeat(first, n_refs) + 1])
    correct = _order_matches(ids, lens, seg_of_line, side_of_line, n_seg, max(n_refs, default=1) + 1, max_order)
    return SegmentStats(hyp_len, ref_len, correct, total, n_refs)


def _order_matches(ids: np.ndarray, lens: np.ndarray, seg_of_line: np.ndarray, side_of_line: np.ndarray, n_seg: int,
                   n_sides: int, max_order: int) -> np.ndarray:
    """``correct[s, n-1]``: the clipped matches of order n in segment s, ``sum_g min(count_hyp(g), max_ref
    count_ref(g))``.

    The n-gram at position i has the code ``code_n[i] = code_{n-1}[i] << b | id[i+n-1]`` (``b`` bits per token;
    ranked densely when it would overflow int64); every n-gram occurrence becomes the key ``(code, segment,
    side)`` (side 0: the hypothesis, k: the k-th reference), and one ``np.sort`` per order puts equal (n-gram,
    segment) pairs side by side, hypothesis first: the run lengths are the counts.
    """
    n_tok = ids.size
    correct = np.zeros((n_seg, max_order), dtype=np.int64)
    if n_tok == 0 or n_seg == 0:
        return correct
    line_of = np.repeat(np.arange(lens.size, dtype=np.int64), lens)
    room = np.repeat(np.cumsum(lens), lens) - np.arange(n_tok)  # tokens left in the line from each position
    side_bits, seg_bits = (n_sides - 1).bit_length(), max(n_seg - 1, 1).bit_length()
    low_bits = seg_bits + side_bits
    seg_side = (seg_of_line[line_of] << side_bits) | side_of_line[line_of]
    tok_bits = max(int(ids.max()), 1).bit_length()
    code, code_bits = ids, tok_bits
    for n in range(1, max_order + 1):
        if n > 1:
            if code_bits + tok_bits + low_bits > 62:
                _, inv = np.unique(code, return_inverse=True)
                code, code_bits = inv.reshape(-1), max(int(inv.max()), 1).bit_length()
            code = (code[:-1] << tok_bits) | ids[n - 1:]
            code_bits += tok_bits
            valid = np.flatnonzero(room[:code.size] >= n)
            if valid.size == 0:
                break
            keys = code[valid] << low_bits
            keys |= seg_side[valid]
        else:
            keys = (code << low_bits) | seg_side
        keys.sort()
        correct[:, n - 1] = _clipped_counts(keys, side_bits, (1 << seg_bits) - 1, n_seg, n_sides == 2)
    return correct


def _clipped_counts(keys: np.ndarray, side_bits: int, seg_mask: int, n_seg: int, single: bool) -> np.ndarray:
    """Per segment, ``sum_g min(hypothesis count, largest reference count)`` from sorted ``(code, segment, side)``
    keys (``single``: one reference per segment, so a group has at most a hypothesis run and a reference run)."""
    run = np.flatnonzero(heads(keys))
    run_count = np.diff(np.r_[run, keys.size])
    run_key = keys[run]
    group_key = run_key >> side_bits
    if single:  # runs i, i + 1 of one group: hypothesis, then reference
        pair = np.flatnonzero(group_key[1:] == group_key[:-1])
        matched = np.minimum(run_count[pair], run_count[pair + 1])
        return np.bincount(group_key[pair] & seg_mask, weights=matched, minlength=n_seg).astype(np.int64)
    first = np.flatnonzero(heads(group_key))
    is_ref = (run_key & ((1 << side_bits) - 1)) > 0
    hyp = np.where(is_ref[first], 0, run_count[first])
    best_ref = np.maximum.reduceat(np.where(is_ref, run_count, 0), first)
    return np.bincount(group_key[first] & seg_mask, weights=np.minimum(hyp, best_ref), minlength=n_seg
                       ).astype(np.int64)


# ------------------------------------------------------------------------------------------------------------
# sacrebleu's final formula
# ------------------------------------------------------------------------------------------------------------
def _my_log(num: float) -> float:
    return -9999999999 if num == 0.0 else math.log(num)


def sacrebleu_score(
    correct: list[int], total: list[int], sys_len: int, ref_len: int, options: BleuOptions
) -> tuple[float, list[float], float]:
    """``(score, precisions, bp)`` exactly as ``sacrebleu.metrics.BLEU.compute_bleu`` (2.1+) computes them."""
    method, value, max_order = options.smooth, options.smooth_val, options.order
    correct = list(correct)
    total = list(total)
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    if not any(correct):
        return 0.0, precisions, bp
    smooth_mteval = 1.0
    eff_order = max_order
    for n in range(1, max_order + 1):
        if method == "add-k" and n > 1:
            assert value is not None
            correct[n - 1] += value  # type: ignore[assignment]  # float when smooth_value is a float, as in sacrebleu
            total[n - 1] += value  # type: ignore[assignment]
        if total[n - 1] == 0:
            break
        if options.effective_order:
            eff_order = n
        if correct[n - 1] == 0:
            if method == "exp":
                smooth_mteval *= 2
                precisions[n - 1] = 100.0 / (smooth_mteval * total[n - 1])
            elif method == "floor":
                assert value is not None
                precisions[n - 1] = 100.0 * value / total[n - 1]
        else:
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1]
    # builtin sum over a list, as sacrebleu (naive on Python <= 3.11, compensated on >= 3.12: same as sacrebleu)
    score = bp * math.exp(sum([_my_log(p) for p in precisions[:eff_order]]) / eff_order)
    return score, precisions, bp


# ------------------------------------------------------------------------------------------------------------
# NLTK's final formula (nltk.translate.bleu_score.corpus_bleu and SmoothingFunction)
# ------------------------------------------------------------------------------------------------------------
class Method6Error(ValueError):
    """NLTK's smoothing method 6 needs a non-zero trigram precision (NLTK itself fails an assert)."""


def _modified_precision(refs: list[list[str]], hyp: list[str], n: int) -> tuple[int, int]:
    """NLTK ``modified_precision`` as (numerator, denominator) of one segment."""
    counts = Counter(zip(*[hyp[i:] for i in range(n)])) if len(hyp) >= n else Counter()
    max_counts: dict[tuple[str, ...], int] = {}
    for ref in refs:
        ref_counts = Counter(zip(*[ref[i:] for i in range(n)])) if len(ref) >= n else Counter()
        for g in counts:
            max_counts[g] = max(max_counts.get(g, 0), ref_counts[g])
    num = sum(min(c, max_counts[g]) for g, c in counts.items())
    return num, max(1, sum(counts.values()))


def nltk_score(
    num: list[int], den: list[int], hyp_len: int, ref_len: int, last_hyp: list[str], last_refs: list[list[str]],
    options: BleuOptions,
) -> float:
    """NLTK ``corpus_bleu`` from its corpus sums: ``num``/``den`` (den includes ``max(1, .)`` per segment).

    ``last_hyp``/``last_refs`` are the last segment's tokens: NLTK passes them to the smoothing function
    (methods 4-7 use them). Values are Fractions where NLTK has Fractions and floats where it has floats.
    """
    weights = options.nltk_weights
    if num[0] == 0:
        return 0.0
    bp: float = 1 if hyp_len > ref_len else (0 if hyp_len == 0 else math.exp(1 - ref_len / hyp_len))
    p_n: list[Any] = [Fraction(a, b) for a, b in zip(num, den)]
    method = options.smoothing or 0
    k_nltk, epsilon, alpha = 5, 0.1, 5
    if method == 0:
        p_n = [p if a != 0 else sys.float_info.min for p, a in zip(p_n, num)]
    elif method == 1:
        p_n = [(a + epsilon) / b if a == 0 else p for p, a, b in zip(p_n, num, den)]
    elif method == 2:
        p_n = [Fraction(a + 1, b + 1) if i != 0 else p for i, (p, a, b) in enumerate(zip(p_n, num, den))]
    elif method == 3:
        inc = 1
        for i, (a, b) in enumerate(zip(num, den)):
            if a == 0:
                p_n[i] = 1 / (2**inc * b)
                inc += 1
    if method in (4, 7):
        inc = 1
        for i, (a, b) in enumerate(zip(num, den)):
            if a == 0 and hyp_len > 1:
                numerator = 1 / (2**inc * k_nltk / math.log(hyp_len))
                p_n[i] = numerator / b
                inc += 1
    if method in (5, 7):
        a5, b5 = _modified_precision(last_refs, last_hyp, 5)
        plus1 = [*p_n, Fraction(a5, b5)]
        prev = p_n[0] + 1
        for i, p in enumerate(p_n):
            p_n[i] = (prev + p + plus1[i + 1]) / 3
            prev = p_n[i]
    if method == 6:
        if len(p_n) < 3 or not p_n[2]:
            raise Method6Error(
                "NLTK smoothing method 6 needs at least 3 weights and a non-zero trigram precision "
                "(NLTK raises AssertionError here)"
            )
        for i in range(2, len(p_n)):
            pi0 = 0 if p_n[i - 2] == 0 else p_n[i - 1] ** 2 / p_n[i - 2]
            length = max(0, len(last_hyp) - i)
            p_n[i] = (num[i] + alpha * pi0) / (length + alpha)
    if options.auto_reweigh and hyp_len < 4 and weights == (0.25, 0.25, 0.25, 0.25):
        weights = (1 / hyp_len,) * hyp_len
    s = (w_i * math.log(p_i) for w_i, p_i in zip(weights, p_n) if p_i > 0)
    return bp * math.exp(math.fsum(s))


# ------------------------------------------------------------------------------------------------------------
# Signature
# ------------------------------------------------------------------------------------------------------------
def bleu_signature(options: BleuOptions, n_refs: list[int] | str, impl: str, version: str | None = None) -> str:
    """sacrebleu-style signature: ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0|impl:...``.

    The sacrebleu part has sacrebleu's keys, order and formats; ``version`` is the sacrebleu version the
    numbers equal. The nltk definition uses ``nrefs|def:nltk|smooth:methodK|weights:...|version:<nltk>``.
    ``impl`` says which code computed the numbers (``llmtune-numpy-<version>`` or the official library);
    ``version`` overrides the reproduced library version (the official backends pass the installed one).
    """
    if isinstance(n_refs, str):
        nrefs = n_refs
    else:
        counts = set(n_refs)
        nrefs = str(counts.pop()) if len(counts) == 1 else "var"
    if options.definition == "nltk":
        weights = ",".join(repr(float(w)) for w in options.nltk_weights)
        parts = [f"nrefs:{nrefs}", "def:nltk", f"smooth:method{options.smoothing or 0}", f"weights:{weights}"]
        if options.auto_reweigh:
            parts.append("reweigh:yes")
        return "|".join([*parts, f"version:{version or NLTK_COMPAT}", f"impl:{impl}"])
    smooth = options.smooth
    if SMOOTH_DEFAULTS[smooth] is not None:
        smooth += f"[{options.smooth_val:.2f}]"
    parts = [f"nrefs:{nrefs}", f"case:{'lc' if options.lowercase else 'mixed'}",
             f"eff:{'yes' if options.effective_order else 'no'}", f"tok:{options.tokenizer}", f"smooth:{smooth}"]
    if options.order != 4:
        parts.append(f"ngram:{options.order}")
    return "|".join([*parts, f"version:{version or SACREBLEU_COMPAT}", f"impl:{impl}"])


def result_keys(options: BleuOptions) -> list[str]:
    """The corpus keys of a BLEU result for ``options``."""
    if options.definition == "nltk":
        return ["bleu"]
    return ["bleu", "bp", "sys_len", "ref_len", *[f"precision_{n}" for n in range(1, options.order + 1)]]


class BleuTemplate(SignedCorpusMetric):
    """What every ``bleu`` backend shares: the label, the options check and the signature layout."""

    name: ClassVar[str] = "bleu"
    label: ClassVar[str] = "BLEU"
    Options: ClassVar[type] = BleuOptions
    options: BleuOptions
    sign = staticmethod(bleu_signature)


class NumpyBleu(BleuTemplate):
    """BLEU from scratch: sacrebleu's definition (default) or NLTK's (``definition="nltk"``), exactly."""

    backend: ClassVar[str] = "numpy"

    def extract(self, preds: list[str], refs: list[list[str]]) -> tuple[dict[str, float], LazyMapping]:
        """Corpus BLEU, and sentence BLEU per prediction in ``per_example["bleu"]`` (lazy)."""
        opts = self.options
        keep_freed_heap()
        if opts.definition == "nltk":
            hyp_toks = [p.split() for p in preds]
            ref_toks = [[r.split() for r in group] for group in refs]
            st = segment_stats(hyp_toks, ref_toks, opts.order)
            return ({"bleu": _nltk_corpus(st, hyp_toks, ref_toks, opts)},
                    LazyMapping(["bleu"], lambda: {"bleu": _nltk_sentences(st, hyp_toks, ref_toks, opts)}))
        st = sacre_segment_stats(preds, refs, opts)
        return _sacre_corpus(st, opts), LazyMapping(["bleu"], lambda: {"bleu": _sacre_sentences(st, opts)})


def sacre_segment_stats(preds: list[str], refs: list[list[str]], opts: BleuOptions) -> SegmentStats:
    """`segment_stats_ids` of the sacrebleu definition: the corpus is tokenized at once, then counted in
    consecutive blocks of about `BLOCK_TOKENS` tokens (the statistics of a segment do not depend on the others,
    and small blocks keep every array small enough to stay in cache and be reused from block to block)."""
    n_refs = [len(g) for g in refs]
    ids, lens = _encode(preds + [r for g in refs for r in g], opts.tokenizer, bool(opts.lowercase))
    n_seg = len(preds)
    hyp_lens, ref_lens = lens[:n_seg], lens[n_seg:]
    ref_first = np.zeros(n_seg + 1, dtype=np.int64)
    np.cumsum(n_refs, out=ref_first[1:])
    hyp_end = np.cumsum(hyp_lens)
    ref_end = np.cumsum(ref_lens)
    seg_tokens = hyp_end + ref_end[ref_first[1:] - 1]
    cuts = np.searchsorted(seg_tokens, np.arange(BLOCK_TOKENS, int(seg_tokens[-1]) if n_seg else 0, BLOCK_TOKENS))
    bounds = [0, *sorted({int(c) + 1 for c in cuts if c + 1 < n_seg}), n_seg]
    if len(bounds) == 2:
        return segment_stats_ids(ids, lens, n_refs, opts.order)
    hyp_start = hyp_end - hyp_lens
    ref_start = np.r_[0, ref_end] + hyp_end[-1]
    parts = []
    for a, b in pairwise(bounds):
        ra, rb = int(ref_first[a]), int(ref_first[b])
        block_ids = np.concatenate([ids[hyp_start[a]:hyp_end[b - 1]], ids[ref_start[ra]:ref_start[rb]]])
        block_lens = np.concatenate([hyp_lens[a:b], ref_lens[ra:rb]])
        parts.append(segment_stats_ids(block_ids, block_lens, n_refs[a:b], opts.order))
    def joined(field: str) -> np.ndarray:
        return np.concatenate([getattr(p, field) for p in parts])

    return SegmentStats(joined("hyp_len"), joined("ref_len"), joined("correct"), joined("total"), n_refs)


def _sacre_corpus(st: SegmentStats, opts: BleuOptions) -> dict[str, float]:
    correct = [int(x) for x in st.correct.sum(axis=0)]
    total = [int(x) for x in st.total.sum(axis=0)]
    sys_len, ref_len = int(st.hyp_len.sum()), int(st.ref_len.sum())
    score, precisions, bp = sacrebleu_score(correct, total, sys_len, ref_len, opts)
    out: dict[str, float] = {"bleu": score, "bp": bp, "sys_len": sys_len, "ref_len": ref_len}
    out.update({f"precision_{n}": p for n, p in enumerate(precisions, start=1)})
    return out


def _sacre_sentences(st: SegmentStats, opts: BleuOptions) -> np.ndarray:
    if sys.version_info < (3, 12) and len(st.hyp_len):  # builtin sum of floats is a plain left-to-right sum
        return _sacre_sentences_vectorised(st, opts)
    correct, total = st.correct.tolist(), st.total.tolist()
    hyp_len, ref_len = st.hyp_len.tolist(), st.ref_len.tolist()
    return np.array([sacrebleu_score(c, t, h, r, opts)[0] for c, t, h, r in zip(correct, total, hyp_len, ref_len)],
                    dtype=np.float64)


def _nltk_corpus(st: SegmentStats, hyps: list[list[str]], refs: list[list[list[str]]], opts: BleuOptions) -> float:
    num = [int(x) for x in st.correct.sum(axis=0)]
    den = [int(x) for x in np.maximum(st.total, 1).sum(axis=0)]
    warn_method0(opts, num)
    try:
        return nltk_score(num, den, int(st.hyp_len.sum()), int(st.ref_len.sum()), hyps[-1], refs[-1], opts)
    except Method6Error as exc:
        warn_method6(str(exc))
        return math.nan


def warn_method6(reason: str) -> None:
    """NLTK's method 6 has no corpus value here: the score is NaN (per-example values stay readable)."""
    warnings.warn(f"corpus BLEU is NaN: {reason}; per_example['bleu'] has NLTK's value wherever NLTK defines one "
                  "(NaN elsewhere)", UserWarning, stacklevel=5)


def warn_method0(opts: BleuOptions, num: list[int]) -> None:
    """One UserWarning when NLTK's method0 replaces zero corpus precisions by ``sys.float_info.min``."""
    if not opts.smoothing and num and num[0] != 0:
        warn_zero_orders([n for n, a in enumerate(num, start=1) if a == 0])


def warn_zero_orders(orders: list[int]) -> None:
    """The warning of `warn_method0` for the given zero-match orders (none: no warning)."""
    if orders:
        warnings.warn(
            f"BLEU (nltk definition, smoothing=0): no matching {'/'.join(map(str, orders))}-grams in the corpus, "
            "so NLTK's method0 uses sys.float_info.min for those precisions and the score is tiny (near 0), not 0. "
            "Pass smoothing=1..7 for a usable sentence-level score.",
            UserWarning, stacklevel=4,
        )


def _nltk_sentences(st: SegmentStats, hyps: list[list[str]], refs: list[list[list[str]]],
                    opts: BleuOptions) -> np.ndarray:
    """Sentence BLEU per segment; NaN where NLTK's method 6 would fail its assert."""
    correct, total = st.correct.tolist(), np.maximum(st.total, 1).tolist()
    hyp_len, ref_len = st.hyp_len.tolist(), st.ref_len.tolist()
    out = np.empty(len(hyps), dtype=np.float64)
    for i in range(len(hyps)):
        try:
            out[i] = nltk_score(correct[i], total[i], hyp_len[i], ref_len[i], hyps[i], refs[i], opts)
        except Method6Error:
            out[i] = math.nan
    return out


__all__ = ["BleuOptions", "BleuTemplate", "Method6Error", "NltkBleuOptions", "NumpyBleu", "bleu_signature",
           "nltk_score", "result_keys", "sacrebleu_score", "segment_stats", "segment_stats_ids", "warn_method0", "warn_method6",
           "warn_zero_orders"]


def _sacre_sentences_vectorised(st: SegmentStats, opts: BleuOptions) -> np.ndarray:
    """`sacrebleu_score` of every segment at once, with the same float operations in the same order: the
    precisions with NumPy's IEEE arithmetic, ``math.log`` / ``math.exp`` per value (NumPy's may differ in the
    last bit), the log sum left to right (as Python <= 3.11's builtin ``sum``)."""
    method, value, max_order = opts.smooth, opts.smooth_val, opts.order
    n = len(st.hyp_len)
    hyp_len, ref_len = st.hyp_len.astype(np.float64), st.ref_len.astype(np.float64)
    short = st.hyp_len < st.ref_len
    bp = np.ones(n)
    ratio = 1 - ref_len[short & (st.hyp_len > 0)] / hyp_len[short & (st.hyp_len > 0)]
    bp[short & (st.hyp_len > 0)] = [math.exp(x) for x in ratio.tolist()]
    bp[short & (st.hyp_len == 0)] = 0.0
    correct: np.ndarray = st.correct[:, :max_order]
    total: np.ndarray = st.total[:, :max_order]
    if method == "add-k" and max_order > 1:
        assert value is not None
        correct = np.concatenate([correct[:, :1], correct[:, 1:] + value], axis=1)
        total = np.concatenate([total[:, :1], total[:, 1:] + value], axis=1)
    processed = np.cumprod(total != 0, axis=1).astype(bool)  # orders reached before the first empty one
    zero = processed & (correct == 0)
    prec = np.zeros((n, max_order))
    with np.errstate(divide="ignore", invalid="ignore"):
        hit = processed & ~zero
        prec[hit] = 100.0 * correct[hit] / total[hit]
        if method == "exp":
            smooth = np.cumprod(np.where(zero, 2.0, 1.0), axis=1)  # 1.0 doubled at each zero order so far
            prec[zero] = 100.0 / (smooth[zero] * total[zero])
        elif method == "floor":
            assert value is not None
            prec[zero] = 100.0 * value / total[zero]
    n_processed = processed.sum(axis=1)
    eff = np.where((n_processed > 0) & bool(opts.effective_order), n_processed, max_order)
    distinct, where = np.unique(prec, return_inverse=True)  # precisions repeat: one math.log per value
    logs = np.array([-9999999999 if p == 0.0 else math.log(p) for p in distinct.tolist()])[where.reshape(n, max_order)]
    acc = logs[:, 0].copy()
    for k in range(1, max_order):
        acc = np.where(k < eff, acc + logs[:, k], acc)
    out = [b * math.exp(x) for b, x in zip(bp.tolist(), (acc / eff).tolist(), strict=True)]
    scores = np.array(out, dtype=np.float64)
    scores[~st.correct[:, :max_order].any(axis=1)] = 0.0
    return scores
