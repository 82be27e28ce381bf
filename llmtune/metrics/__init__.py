"""Metrics: from-scratch NumPy ROUGE and BLEU, and adapters over the official libraries.

This module only *declares* the built-in backends; each is imported when first used.
"""

from llmtune.core.registry import declare

declare("metric", "rouge", "numpy", "llmtune.metrics.rouge:NumpyRouge", requires=("numpy",), default=True)
declare("metric", "rouge", "rouge-score", "llmtune.metrics.official:RougeScoreRouge",
        requires=("rouge_score", "nltk"), extra="metrics")
declare("metric", "bleu", "numpy", "llmtune.metrics.bleu:NumpyBleu", requires=("numpy",), default=True)
declare("metric", "bleu", "sacrebleu", "llmtune.metrics.official:SacreBleu", requires=("sacrebleu",), extra="metrics")
declare("metric", "bleu", "nltk", "llmtune.metrics.official:NltkBleu", requires=("nltk",), extra="metrics")
