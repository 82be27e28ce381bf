"""chrF and chrF++ from scratch, equal to ``sacrebleu.metrics.CHRF`` (2.x) with the same options.

Statistics per segment and order (character n-grams 1..``char_order``, then word n-grams 1..``word_order``):
``[hyp n-grams, ref n-grams, clipped matches]``, the hypothesis count reported as 0 when the reference has
no n-gram of that order (as sacrebleu does). With several references, a segment keeps the statistics of the
first reference with the highest sentence F-score. The corpus score is the F-score of the summed statistics;
``per_example["chrf"]`` is each segment's F-score (``CHRF.sentence_score``). The F-score is computed with the
same float operations in the same order as sacrebleu's ``_compute_f_score``, so values are bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from llmtune.core.errors import InvalidOptionError
from llmtune.core.options import check_type
from llmtune.core.results import LazyMapping
from llmtune.metrics.base import SignedCorpusMetric
from llmtune.metrics.bleu import SACREBLEU_COMPAT

__all__ = ["ChrfOptions", "ChrfTemplate", "NumpyChrf", "chrf_f_score", "chrf_signature", "chrf_statistics"]

#: Largest char_order / word_order / beta accepted (chrF uses 6 and 2; the cost grows with the order).
MAX_ORDER = 100
_PUNCTS = frozenset('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~')


@dataclasses.dataclass(frozen=True)
class ChrfOptions:
    """sacrebleu's CHRF options: ``char_order`` (6), ``word_order`` (0; 2 is chrF++), ``beta`` (2),
    ``lowercase``, ``whitespace`` (keep spaces inside character n-grams), ``eps_smoothing`` (chrF++.py/NLTK
    style epsilon smoothing instead of the effective order)."""

    char_order: int = 6
    word_order: int = 0
    beta: int = 2
    lowercase: bool = False
    whitespace: bool = False
    eps_smoothing: bool = False

    def __post_init__(self) -> None:
        for field in ("char_order", "word_order", "beta"):
            check_type(field, getattr(self, field), int)
            if not 0 <= getattr(self, field) <= MAX_ORDER:
                raise InvalidOptionError(f"option {field}={getattr(self, field)} must be >= 0 and <= {MAX_ORDER}")
        if self.char_order + self.word_order < 1:
            raise InvalidOptionError("options char_order=0 and word_order=0 leave no n-gram to score: give one >= 1")
        for field in ("lowercase", "whitespace", "eps_smoothing"):
            check_type(field, getattr(self, field), bool)

    def sacrebleu_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sacrebleu.metrics.CHRF``."""
        return dataclasses.asdict(self)


def _words(sent: str) -> list[str]:
    """chrF++'s word split: whitespace, then one punctuation mark split off the end (else the start)."""
    out: list[str] = []
    for w in sent.split():
        if len(w) == 1:
            out.append(w)
        elif w[-1] in _PUNCTS:
            out += [w[:-1], w[-1]]
        elif w[0] in _PUNCTS:
            out += [w[0], w[1:]]
        else:
            out.append(w)
    return out


def _ngrams(sent: str, opts: ChrfOptions) -> list[Counter[str]]:
    """Character n-gram counts of orders 1..char_order, then word n-gram counts of orders 1..word_order."""
    line = sent if opts.whitespace else "".join(sent.split())
    out = [Counter([line[i:i + n] for i in range(len(line) - n + 1)]) for n in range(1, opts.char_order + 1)]
    if opts.word_order:
        words = _words(sent)
        out += [Counter([" ".join(words[i:i + n]) for i in range(len(words) - n + 1)])
                for n in range(1, opts.word_order + 1)]
    return out


def chrf_f_score(stats: list[int], opts: ChrfOptions) -> float:
    """sacrebleu's ``CHRF._compute_f_score`` (0-100) from flat ``[hyp, ref, match] * order`` statistics."""
    eps = 1e-16
    score = 0.0
    effective_order = 0
    factor = opts.beta ** 2
    avg_prec, avg_rec = 0.0, 0.0
    for i in range(opts.char_order + opts.word_order):
        n_hyp, n_ref, n_match = stats[3 * i: 3 * i + 3]
        prec = n_match / n_hyp if n_hyp > 0 else eps
        rec = n_match / n_ref if n_ref > 0 else eps
        denom = factor * prec + rec
        score += ((1 + factor) * prec * rec / denom) if denom > 0 else eps
        if n_hyp > 0 and n_ref > 0:
            avg_prec += prec
            avg_rec += rec
            effective_order += 1
    if opts.eps_smoothing:
        return 100 * score / (opts.char_order + opts.word_order)
    if effective_order == 0:
        avg_prec = avg_rec = 0.0
    else:
        avg_prec /= effective_order
        avg_rec /= effective_order
    if avg_prec + avg_rec:
        score = (1 + factor) * avg_prec * avg_rec
        score /= (factor * avg_prec) + avg_rec
        return 100 * score
    return 0.0


def chrf_statistics(preds: list[str], refs: list[list[str]], opts: ChrfOptions) -> list[list[int]]:
    """Per segment, the best reference's flat ``[hyp, ref, match] * order`` statistics (integers)."""
    lower = opts.lowercase
    out: list[list[int]] = []
    for pred, group in zip(preds, refs, strict=True):
        hyp = _ngrams(pred.lower() if lower else pred, opts)
        best: list[int] = []
        best_f = -1.0
        for ref in group:
            stats: list[int] = []
            for h, r in zip(hyp, _ngrams(ref.lower() if lower else ref, opts), strict=True):
                match = sum(min(c, r[g]) for g, c in h.items() if g in r)
                stats += [sum(h.values()) if r else 0, sum(r.values()), match]
            f = chrf_f_score(stats, opts)
            if f > best_f:
                best_f, best = f, stats
        out.append(best)
    return out


def chrf_signature(opts: ChrfOptions, nrefs: str, impl: str, version: str | None = None) -> str:
    """sacrebleu's CHRF signature (``nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0``) + impl.

    Like sacrebleu's, it has no ``beta`` field (sacrebleu names it in the score, ``chrF2``)."""
    parts = [f"nrefs:{nrefs}", f"case:{'lc' if opts.lowercase else 'mixed'}",
             f"eff:{'no' if opts.eps_smoothing else 'yes'}", f"nc:{opts.char_order}", f"nw:{opts.word_order}",
             f"space:{'yes' if opts.whitespace else 'no'}"]
    return "|".join([*parts, f"version:{version or SACREBLEU_COMPAT}", f"impl:{impl}"])


class ChrfTemplate(SignedCorpusMetric):
    """What every ``chrf`` backend shares: options, label, the corpus-from-statistics aggregation, signature."""

    name: ClassVar[str] = "chrf"
    label: ClassVar[str] = "chrF"
    Options: ClassVar[type] = ChrfOptions
    options: ChrfOptions
    sign = staticmethod(chrf_signature)


class NumpyChrf(ChrfTemplate):
    """chrF / chrF++ from scratch, equal to sacrebleu's ``CHRF`` corpus and sentence scores."""

    backend: ClassVar[str] = "numpy"

    def extract(self, preds: list[str], refs: list[list[str]]) -> tuple[dict[str, float], LazyMapping]:
        """Segment statistics once; corpus = F of their sums, per example = F of each segment's."""
        opts = self.options
        seg = chrf_statistics(preds, refs, opts)
        totals = [int(x) for x in np.asarray(seg, dtype=np.int64).sum(axis=0)]
        per = LazyMapping(["chrf"], lambda: {"chrf": np.array([chrf_f_score(s, opts) for s in seg])})
        return {"chrf": chrf_f_score(totals, opts)}, per
