"""TER (translation edit rate, Snover et al. 2006) from scratch, equal to ``sacrebleu.metrics.TER`` (2.x).

Same options (``normalized``, ``no_punct``, ``asian_support``, ``case_sensitive``), same Tercom tokenizer,
same signature. Per segment and reference: the number of edits is the number of block shifts plus the word
edit distance after them. The shift search is sacrebleu's greedy Tercom variant, reproduced decision by
decision: candidate blocks of <= 10 matching words at most 50 positions apart, only where both the
hypothesis and the reference are wrong, ranked by (edit-distance gain, block length, earliest start,
earliest target); at most 1,000 candidates evaluated per segment. The edit distance is the beam-limited
Levenshtein DP (25 cells each side of the length-ratio diagonal; last row complete) whose alignment drives
the shift targets; its ties are broken in sacrebleu's order (match/substitution, deletion, insertion).

Our implementation maps words to integer ids, caches the DP cost rows of hypothesis prefixes in a trie (a
row depends only on the prefix, so the cache never changes a value) and recovers the alignment from the
cost matrix instead of storing operations in every cell.

References are tokenized twice, as sacrebleu does (`_ref_words`). With several references a segment keeps the fewest edits and the *average* reference length. The corpus
TER is 100 * (summed edits) / (summed reference lengths) (100 when the references are empty and the
hypotheses are not, 0 when both are); ``per_example["ter"]`` is sacrebleu's ``sentence_score``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from llmtune.core.options import check_type
from llmtune.core.results import LazyMapping
from llmtune.metrics.base import SignedCorpusMetric
from llmtune.metrics.bleu import SACREBLEU_COMPAT

__all__ = ["NumpyTer", "TerOptions", "TerTemplate", "ter_edits", "ter_score", "ter_signature", "ter_statistics",
           "ter_tokenize"]

_MAX_SHIFT_SIZE = 10
_MAX_SHIFT_DIST = 50
_BEAM_WIDTH = 25
_MAX_CANDIDATES = 1000
_MAX_CACHED_ROWS = 10000
_INF = 10 ** 16


@dataclasses.dataclass(frozen=True)
class TerOptions:
    """sacrebleu's TER options: ``normalized`` (Tercom normalization: XML entities, punctuation split; with
    ``asian_support`` CJK split to characters), ``no_punct`` (remove punctuation), ``asian_support``,
    ``case_sensitive`` (False: lowercase first)."""

    normalized: bool = False
    no_punct: bool = False
    asian_support: bool = False
    case_sensitive: bool = False

    def __post_init__(self) -> None:
        for field in ("normalized", "no_punct", "asian_support", "case_sensitive"):
            check_type(field, getattr(self, field), bool)

    def sacrebleu_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sacrebleu.metrics.TER``."""
        return dataclasses.asdict(self)


# --- the Tercom tokenizer (Normalizer.java as sacrebleu has it) -------------------------------------------
_ASIAN_PUNCT = "([\u3001\u3002\u3008-\u3011\u3014-\u301f\uff61-\uff65\u30fb])"
_FULL_WIDTH_PUNCT = "([\uff0e\uff0c\uff1f\uff1a\uff1b\uff01\uff02\uff08\uff09])"
_WESTERN = [(re.compile(a), b) for a, b in [
    (r"\n-", ""), (r"\n", " "), (r"&quot;", '"'), (r"&amp;", "&"), (r"&lt;", "<"), (r"&gt;", ">")]]
_WESTERN_TOK = [(re.compile(a), b) for a, b in [
    (r"([{-~[-` -&(-+:-@/])", r" \1 "), (r"'s ", r" 's "), (r"'s$", r" 's"),
    (r"([^0-9])([\.,])", r"\1 \2 "), (r"([\.,])([^0-9])", r" \1 \2"), (r"([0-9])(-)", r"\1 \2 ")]]
_ASIAN = [(re.compile(a), b) for a, b in [
    ("([\u4e00-\u9fff\u3400-\u4dbf])", r" \1 "), ("([\u31c0-\u31ef\u2e80-\u2eff])", r" \1 "),
    ("([\u3300-\u33ff\uf900-\ufaff\ufe30-\ufe4f])", r" \1 "), ("([\u3200-\u3f22])", r" \1 "),
    ("(^|^[\u3040-\u309f])([\u3040-\u309f]+)(?=$|^[\u3040-\u309f])", r"\1 \2 "),
    ("(^|^[\u30a0-\u30ff])([\u30a0-\u30ff]+)(?=$|^[\u30a0-\u30ff])", r"\1 \2 "),
    ("(^|^[\u31f0-\u31ff])([\u31f0-\u31ff]+)(?=$|^[\u31f0-\u31ff])", r"\1 \2 "),
    (_ASIAN_PUNCT, r" \1 "), (_FULL_WIDTH_PUNCT, r" \1 ")]]
_PUNCT = re.compile(r"[\.,\?:;!\"\(\)]")
_ASIAN_PUNCT_RE = [re.compile(_ASIAN_PUNCT), re.compile(_FULL_WIDTH_PUNCT)]


def _subs(sent: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in rules:
        sent = pattern.sub(repl, sent)
    return sent


@lru_cache(maxsize=2 ** 16)
def ter_tokenize(sent: str, opts: TerOptions) -> tuple[str, ...]:
    """The words TER scores: sacrebleu's ``TercomTokenizer`` on the right-stripped segment, then split."""
    sent = sent.rstrip()
    if not sent:
        return ()
    if not opts.case_sensitive:
        sent = sent.lower()
    if opts.normalized:
        sent = _subs(f" {_subs(sent, _WESTERN)} ", _WESTERN_TOK)
        if opts.asian_support:
            sent = _subs(sent, _ASIAN)
    if opts.no_punct:
        sent = _PUNCT.sub("", sent)
        if opts.asian_support:
            for pattern in _ASIAN_PUNCT_RE:
                sent = pattern.sub("", sent)
    return tuple(sent.split())


def _ref_words(ref: str, opts: TerOptions) -> tuple[str, ...]:
    """A reference's words as sacrebleu has them: it runs the tokenizer on references twice (once when it
    caches them, once when it extracts their words), which is not idempotent with ``normalized``
    (``"it's."`` -> ``"it's ."`` -> ``"it 's ."``)."""
    return ter_tokenize(" ".join(ter_tokenize(ref, opts)), opts)


# --- beam edit distance with a prefix-row cache ------------------------------------------------------------
class _BeamDistance:
    """Word edit distance of same-length hypotheses to one reference (ids), sacrebleu's beam-limited DP.

    Row ``i`` of the DP depends only on the hypothesis prefix of ``i`` words (and on the lengths, fixed here:
    shifts keep the length), so rows are cached in a trie keyed by words."""

    def __init__(self, ref: list[int], n_hyp: int) -> None:
        self.ref = ref
        n_ref = len(ref)
        self.first = list(range(n_ref + 1))
        ratio = n_ref / n_hyp if n_hyp else 1
        beam = math.ceil(ratio / 2 + _BEAM_WIDTH) if _BEAM_WIDTH < ratio / 2 else _BEAM_WIDTH
        self.windows: list[tuple[int, int]] = []
        for i in range(1, n_hyp + 1):
            diag = math.floor(i * ratio)
            self.windows.append((max(0, diag - beam), n_ref + 1 if i == n_hyp else min(n_ref + 1, diag + beam)))
        self.trie: dict[int, tuple[dict[Any, Any], list[int]]] = {}
        self.cached = 0

    def rows(self, hyp: list[int]) -> list[list[int]]:
        """The DP rows 0..len(hyp) (cells outside the beam hold the "infinite" cost)."""
        node = self.trie
        rows = [self.first]
        for w in hyp:
            hit = node.get(w)
            if hit is None:
                break
            node, row = hit
            rows.append(row)
        ref = self.ref
        prev = rows[-1]
        for i in range(len(rows) - 1, len(hyp)):
            w = hyp[i]
            lo, hi = self.windows[i]
            row = [_INF] * (len(ref) + 1)
            if lo == 0:
                row[0] = prev[0] + 1
                lo = 1
            left = row[lo - 1]
            for j in range(lo, hi):
                cost = prev[j - 1] if ref[j - 1] == w else prev[j - 1] + 1
                if prev[j] + 1 < cost:
                    cost = prev[j] + 1
                if left + 1 < cost:
                    cost = left + 1
                if cost > _INF:
                    cost = _INF
                row[j] = left = cost
            rows.append(row)
            if self.cached < _MAX_CACHED_ROWS:
                child: dict[Any, Any] = {}
                node[w] = (child, row)
                node = child
                self.cached += 1
            prev = row
        return rows


def _alignment(rows: list[list[int]], hyp: list[int], ref: list[int]) -> tuple[list[int], list[int], list[int]]:
    """``(align, ref_err, hyp_err)`` of the DP path sacrebleu traces back (ties: match/sub, deletion of a
    hypothesis word, insertion of a reference word): ``align[r]`` = the hypothesis position reference word
    ``r`` is aligned to (or the last one before it), and 0/1 error flags per reference / hypothesis word."""
    i, j = len(hyp), len(ref)
    ops: list[int] = []  # 0 match, 1 substitution, 2 hypothesis word only, 3 reference word only
    while i > 0 or j > 0:
        if i == 0:
            op = 3
        elif j == 0:
            op = 2
        else:
            cost = rows[i][j]
            sub = hyp[i - 1] != ref[j - 1]
            if rows[i - 1][j - 1] + sub == cost:
                op = int(sub)
            elif rows[i - 1][j] + 1 == cost:
                op = 2
            else:
                op = 3
        ops.append(op)
        if op < 2:
            i, j = i - 1, j - 1
        elif op == 2:
            i -= 1
        else:
            j -= 1
    align: list[int] = []
    ref_err: list[int] = []
    hyp_err: list[int] = []
    pos_h = -1
    for op in reversed(ops):
        if op < 3:
            pos_h += 1
            hyp_err.append(1 if op else 0)
        if op != 2:
            align.append(pos_h)
            ref_err.append(1 if op else 0)
    return align, ref_err, hyp_err


def _perform_shift(words: list[int], start: int, length: int, target: int) -> list[int]:
    """Move ``words[start:start+length]`` to ``target`` (sacrebleu's three cases, slicing clamps included)."""
    block = words[start:start + length]
    if target < start:
        return words[:target] + block + words[target:start] + words[start + length:]
    if target > start + length:
        return words[:start] + words[start + length:target] + block + words[target:]
    return words[:start] + words[start + length:length + target] + block + words[length + target:]


def _cumsum(flags: list[int]) -> list[int]:
    out = [0]
    for f in flags:
        out.append(out[-1] + f)
    return out


def _best_shift(hyp: list[int], ref: list[int], ref_pos: dict[int, list[int]], dist: _BeamDistance,
                checked: int) -> tuple[int, list[int], int, int]:
    """sacrebleu's ``_shift``: ``(gain, shifted hypothesis, candidates checked so far, current distance)``."""
    rows = dist.rows(hyp)
    pre = rows[-1][-1]
    align, ref_err, hyp_err = _alignment(rows, hyp, ref)
    h_cum, r_cum = _cumsum(hyp_err), _cumsum(ref_err)
    n_h, n_r = len(hyp), len(ref)
    best: tuple[int, int, int, int] | None = None
    best_words = hyp
    for start_h in range(n_h):
        for start_r in ref_pos.get(hyp[start_h], ()):
            if abs(start_r - start_h) > _MAX_SHIFT_DIST:
                continue
            length = 0
            while (length < _MAX_SHIFT_SIZE and start_h + length < n_h and start_r + length < n_r
                   and hyp[start_h + length] == ref[start_r + length]):
                length += 1
                if h_cum[start_h + length] == h_cum[start_h] or r_cum[start_r + length] == r_cum[start_r]:
                    continue  # the hypothesis block is right, or the reference there is matched already
                if start_h <= align[start_r] < start_h + length:
                    continue  # the target lies inside the block
                prev_idx = -1
                for offset in range(-1, length):
                    idx = 0 if start_r + offset == -1 else align[start_r + offset] + 1
                    if idx == prev_idx:
                        continue
                    prev_idx = idx
                    shifted = _perform_shift(hyp, start_h, length, idx)
                    key = (pre - dist.rows(shifted)[-1][-1], length, -start_h, -idx)
                    checked += 1
                    if best is None or key > best:
                        best, best_words = key, shifted
                if checked >= _MAX_CANDIDATES:
                    return (best[0] if best else 0), best_words, checked, pre
    return (best[0] if best else 0), best_words, checked, pre


def ter_edits(hyp: tuple[str, ...] | list[str], ref: tuple[str, ...] | list[str]) -> int:
    """Edits (shifts + word edit distance) turning the hypothesis words into the reference words."""
    if not ref:
        return len(hyp)
    vocab: dict[str, int] = {}
    ref_ids = [vocab.setdefault(w, len(vocab)) for w in ref]
    hyp_ids = [vocab.setdefault(w, len(vocab)) for w in hyp]
    ref_pos: dict[int, list[int]] = {}
    for r, w in enumerate(ref_ids):
        ref_pos.setdefault(w, []).append(r)
    dist = _BeamDistance(ref_ids, len(hyp_ids))
    shifts = checked = 0
    while True:
        gain, shifted, checked, current = _best_shift(hyp_ids, ref_ids, ref_pos, dist, checked)
        if checked >= _MAX_CANDIDATES or gain <= 0:
            return shifts + current
        shifts += 1
        hyp_ids = shifted


def ter_statistics(preds: list[str], refs: list[list[str]], opts: TerOptions) -> list[tuple[int, float]]:
    """Per segment ``(fewest edits over its references, average reference length)``."""
    out: list[tuple[int, float]] = []
    for pred, group in zip(preds, refs, strict=True):
        hyp = ter_tokenize(pred, opts)
        best = _INF
        total = 0
        for ref in group:
            words = _ref_words(ref, opts)
            best = min(best, ter_edits(hyp, words))
            total += len(words)
        out.append((best, total / len(group)))
    return out


def ter_score(edits: float, ref_length: float) -> float:
    """sacrebleu's TER (0-100+) from summed edits and reference lengths."""
    if ref_length > 0:
        return 100 * (edits / ref_length)
    return 100.0 if edits > 0 else 0.0


def ter_signature(opts: TerOptions, nrefs: str, impl: str, version: str | None = None) -> str:
    """sacrebleu's TER signature (``nrefs:1|case:lc|tok:tercom|norm:no|punct:yes|asian:no|version:2.6.0``) +
    impl."""
    yes_no = {True: "yes", False: "no"}
    parts = [f"nrefs:{nrefs}", f"case:{'mixed' if opts.case_sensitive else 'lc'}", "tok:tercom",
             f"norm:{yes_no[opts.normalized]}", f"punct:{yes_no[not opts.no_punct]}",
             f"asian:{yes_no[opts.asian_support]}"]
    return "|".join([*parts, f"version:{version or SACREBLEU_COMPAT}", f"impl:{impl}"])


def _corpus_ter(seg: list[tuple[int, float]]) -> float:
    """Corpus TER of segment statistics summed in order, as sacrebleu's ``sum_of_lists`` sums them."""
    if len(seg) == 1:
        return ter_score(*seg[0])
    edits, length = 0, 0.0
    for e, n in seg:
        edits += e
        length += n
    return ter_score(edits, length)


class TerTemplate(SignedCorpusMetric):
    """What every ``ter`` backend shares: options, label, the aggregation, the signature."""

    name: ClassVar[str] = "ter"
    label: ClassVar[str] = "TER"
    Options: ClassVar[type] = TerOptions
    options: TerOptions
    sign = staticmethod(ter_signature)


class NumpyTer(TerTemplate):
    """TER from scratch, equal to sacrebleu's ``TER`` corpus and sentence scores."""

    backend: ClassVar[str] = "numpy"
    chunkable: ClassVar[bool] = False

    def extract(self, preds: list[str], refs: list[list[str]]) -> tuple[dict[str, float], LazyMapping]:
        """Segment statistics once; corpus = TER of their sums, per example = each segment's TER."""
        seg = ter_statistics(preds, refs, self.options)
        per = LazyMapping(["ter"], lambda: {"ter": np.array([ter_score(e, n) for e, n in seg])})
        return {"ter": _corpus_ter(seg)}, per
