"""Metrics: from-scratch ROUGE, BLEU, chrF and TER, and adapters over the official libraries.

This module only *declares* the built-in backends; each is imported when first used. For plugin authors it
also offers (imported on first use, so ``import llmtune.metrics`` stays free of NumPy) the metric template
`CorpusMetric` and the input checks every built-in backend uses: `check_corpus`, `normalize_inputs`,
`nrefs_field`, `references_from_streams`, and their errors `InputError` / `InputTypeError`; and the paired
significance tests `compare` / `bootstrap_ci` (`llmtune.metrics.significance`).
"""

from __future__ import annotations

import importlib
from typing import Any

from llmtune.core.registry import declare

declare("metric", "rouge", "numpy", "llmtune.metrics.rouge:NumpyRouge", requires=("numpy",), default=True)
declare("metric", "rouge", "rouge-score", "llmtune.metrics.official:RougeScoreRouge",
        requires=("rouge_score", "nltk"), extra="metrics")
declare("metric", "bleu", "numpy", "llmtune.metrics.bleu:NumpyBleu", requires=("numpy",), default=True)
declare("metric", "bleu", "sacrebleu", "llmtune.metrics.official:SacreBleu", requires=("sacrebleu",), extra="metrics")
declare("metric", "bleu", "nltk", "llmtune.metrics.official:NltkBleu", requires=("nltk",), extra="metrics")
declare("metric", "chrf", "numpy", "llmtune.metrics.chrf:NumpyChrf", requires=("numpy",), default=True)
declare("metric", "chrf", "sacrebleu", "llmtune.metrics.official:SacreChrf", requires=("sacrebleu",), extra="metrics")
declare("metric", "ter", "numpy", "llmtune.metrics.ter:NumpyTer", requires=("numpy",), default=True)
declare("metric", "ter", "sacrebleu", "llmtune.metrics.official:SacreTer", requires=("sacrebleu",), extra="metrics")

_EXPORTS = {
    "CorpusMetric": "llmtune.metrics.base",
    "InputError": "llmtune.metrics._inputs",
    "InputTypeError": "llmtune.metrics._inputs",
    "check_corpus": "llmtune.metrics._inputs",
    "normalize_inputs": "llmtune.metrics._inputs",
    "nrefs_field": "llmtune.metrics._inputs",
    "references_from_streams": "llmtune.metrics._inputs",
    "compare": "llmtune.metrics.significance",
    "bootstrap_ci": "llmtune.metrics.significance",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmtune.metrics' has no attribute {name!r}")
