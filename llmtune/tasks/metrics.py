"""The scoring rules of the tasks, as lm-evaluation-harness and the official scripts define them (no torch).

* multiple choice: ``acc`` = argmax of the choices' log-likelihoods is the gold one; ``acc_norm`` = the same
  after dividing each log-likelihood by the *character* length of its choice string (the harness's
  ``lls / completion_len``); ties go to the first choice (``np.argmax``);
* GSM8K: the harness's ``strict-match`` (``#### number``) and ``flexible-extract`` (last number) filters, then
  its ``exact_match`` with ``ignore_case``, and the regexes ``,``, ``\\$``, ``(?s).*#### ``, ``\\.$`` removed;
* SQuAD: the official evaluation script's ``normalize_answer`` (lower case, drop punctuation, drop the articles
  a/an/the, collapse whitespace), exact match and token F1, max over the gold answers (v2.0: an unanswerable
  question has the gold answer ``""``);
* perplexity: ``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte`` as the harness aggregates them
  (corpus log-likelihood over corpus words / bytes), plus token perplexity exp(-sum ll / tokens);
* every mean comes with its standard error (sample standard deviation with ddof=1, over sqrt(n)).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np


def mc_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float | int]:
    """acc, acc_norm and the two predictions for one item, as the harness's ``process_results`` does."""
    arr = np.asarray(lls, dtype=np.float64)
    completion_len = np.array([float(len(c)) for c in choices])
    pred = int(np.argmax(arr))
    pred_norm = int(np.argmax(arr / completion_len))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "pred_norm": pred_norm}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (``stdev(ddof=1) / sqrt(n)``, the harness's ``mean_stderr``)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    if arr.size == 1:
        return float(arr[0]), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


# -- GSM8K ----------------------------------------------------------------------------------------------------
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
#: What the harness's regex filter returns when nothing matches.
INVALID = "[invalid]"


def extract_strict(text: str) -> str:
    """``strict-match``: the first ``#### number``."""
    m = GSM8K_STRICT.findall(text)
    return m[0].strip() if m else INVALID


def extract_flexible(text: str) -> str:
    """``flexible-extract``: the last number-like match (``group_select: -1``)."""
    matches = GSM8K_FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    last = matches[-1]
    found = next((g for g in last if g), INVALID) if isinstance(last, tuple) else last
    return found.strip()


def harness_exact_match(prediction: str, reference: str, *, ignore: Sequence[str] = GSM8K_IGNORE,
                        ignore_case: bool = True) -> float:
    """The harness's ``exact_match`` (HF ``evaluate``'s definition): strip the regexes, then compare."""
    for pattern in ignore:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    return float(prediction == reference)


# -- SQuAD (the official evaluate-v2.0.py / evaluate-v1.1.py definitions) -----------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the official script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def squad_f1(gold: str, pred: str) -> float:
    gold_toks = normalize_answer(gold).split()
    pred_toks = normalize_answer(pred).split()
    if not gold_toks or not pred_toks:  # v2.0: no-answer is right only if both are empty
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_scores(golds: Sequence[str], pred: str) -> dict[str, float]:
    """exact and f1 (0-1) of one prediction: the max over gold answers; no gold answer means gold ``""``."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    return {"exact": max(squad_exact(g, pred) for g in golds), "f1": max(squad_f1(g, pred) for g in golds)}


# -- perplexity ------------------------------------------------------------------------------------------------
def count_words(text: str) -> int:
    """The harness's ``count_words``: runs of non-whitespace."""
    return len(re.split(r"\s+", text))


def perplexity_metrics(lls: Sequence[float], tokens: Sequence[int], texts: Sequence[str]) -> dict[str, float]:
    """Corpus-level perplexities from each document's summed log-likelihood and token count."""
    total = float(sum(lls))
    n_tokens = sum(tokens)
    n_words = sum(count_words(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "token_perplexity": math.exp(-total / n_tokens),
        "word_perplexity": math.exp(-total / n_words),
        "byte_perplexity": math.exp(-total / n_bytes),
        "bits_per_byte": -total / n_bytes / math.log(2),
    }
