"""Task scoring rules: SQuAD exact/F1 against the official script's definitions, GSM8K extraction and exact match
against lm-evaluation-harness's own filter and metric, acc/acc_norm, standard errors, rolling windows."""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np
import pytest

from llmtune.tasks import metrics


# -- SQuAD: the official evaluate-v2.0.py definitions, written out as the script states them -------------------
def _official_normalize(s: str) -> str:
    def remove_articles(text: str) -> str:
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_tokens(s: str) -> list[str]:
    return _official_normalize(s).split() if s else []


def _official_exact(a_gold: str, a_pred: str) -> int:
    return int(_official_normalize(a_gold) == _official_normalize(a_pred))


def _official_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = _official_tokens(a_gold), _official_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def _official_scores(golds: list[str], pred: str) -> tuple[float, float]:
    # get_raw_scores: gold answers whose normalised text is empty are dropped; none left means [""]
    golds = [a for a in golds if _official_normalize(a)] or [""]
    return max(_official_exact(a, pred) for a in golds), max(_official_f1(a, pred) for a in golds)


ADVERSARIAL = [
    (["The Eiffel Tower"], "eiffel tower"),
    (["the cat"], "a cat!!"),
    (["An apple a day"], "apple day"),
    (["theatre"], "the atre"),              # "the" inside a word is not an article
    (["Anaheim"], "an aheim"),
    (["  New   York\tCity \n"], "new york city"),
    (["U.S.A."], "USA"),
    (["rock-'n'-roll"], "rock n roll"),     # punctuation is deleted, not replaced by a space
    (["it's"], "its"),
    (["The the the"], ""),                  # normalises to nothing: no gold left -> "" vs ""
    ([], ""),                               # unanswerable, abstained
    ([], "something"),                      # unanswerable, answered
    (["a"], "a"),
    (["1,000"], "1000"),
    (["Denver Broncos", "The Denver Broncos", "Broncos"], "the broncos of denver"),
    (["cat cat dog"], "cat dog dog"),       # Counter intersection, not sets
    (["café"], "CAFÉ"),
    (["Zürich —  Switzerland"], "zürich switzerland"),  # em dash is not in string.punctuation
    (["x"], "y"),
    (["foo bar"], "foo bar baz qux"),
]


@pytest.mark.parametrize(("golds", "pred"), ADVERSARIAL)
def test_squad_matches_the_official_definitions(golds: list[str], pred: str) -> None:
    exact, f1 = _official_scores(golds, pred)
    got = metrics.squad_scores(golds, pred)
    assert got["exact"] == exact
    assert got["f1"] == pytest.approx(f1, abs=1e-12)


def test_squad_hand_checked_values() -> None:
    assert metrics.normalize_answer("The  Quick, brown FOX.") == "quick brown fox"
    assert metrics.squad_scores(["the cat sat"], "cat sat down") == {"exact": 0.0, "f1": pytest.approx(0.8)}
    assert metrics.squad_scores([], "")["f1"] == 1.0
    assert metrics.squad_scores([], "anything")["exact"] == 0.0
    assert metrics.squad_scores(["—"], "—")["exact"] == 1.0  # not punctuation: kept, and equal


# -- GSM8K: the harness's regex filters and exact_match, run here ----------------------------------------------
GSM_OUTPUTS = [
    "She sells 3 + 4 = 7 cups.\n#### 7",
    "The total is $1,200.",
    "So the answer is 42. Question: next",
    "#### -3.5 and then #### 9",
    "no number at all",
    "It costs 12 dollars, then 13.",
    "#### 1,000",
]


def _harness_filter(pattern: str, group_select: int, text: str) -> str:
    from lm_eval.filters.extraction import RegexFilter

    f = RegexFilter(regex_pattern=pattern, group_select=group_select)
    return next(iter(f.apply([[text]], [{}])))[0]


@pytest.mark.parametrize("text", GSM_OUTPUTS)
def test_gsm8k_extraction_matches_the_harness_filters(text: str) -> None:
    pytest.importorskip("lm_eval")
    assert metrics.extract_strict(text) == _harness_filter(r"#### (\-?[0-9\.\,]+)", 0, text)
    assert metrics.extract_flexible(text) == _harness_filter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1, text)


@pytest.mark.parametrize("pred", ["7", "1,000", "1000", "$1,200", "42.", "[invalid]", "-3.5"])
@pytest.mark.parametrize("ref", ["step one\n#### 7", "#### 1,000", "so\n#### 1200", "#### 42", "#### -3.5"])
def test_gsm8k_exact_match_matches_the_harness_metric(pred: str, ref: str) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate

    theirs = exact_match_hf_evaluate([pred], [ref], regexes_to_ignore=list(metrics.GSM8K_IGNORE), ignore_case=True,
                                     ignore_punctuation=False)["exact_match"]
    assert metrics.harness_exact_match(pred, ref) == theirs


# -- multiple choice, standard errors, perplexity bookkeeping --------------------------------------------------
def test_acc_norm_divides_by_characters_and_ties_go_first() -> None:
    s = metrics.mc_scores([-4.0, -6.0], ["ab", "abcdef"], gold=1)
    assert (s["pred"], s["pred_norm"], s["acc"], s["acc_norm"]) == (0, 1, 0.0, 1.0)
    assert metrics.mc_scores([-1.0, -1.0], ["x", "y"], gold=1)["pred"] == 0


def test_stderr_is_the_harness_mean_stderr() -> None:
    from lm_eval.api.metrics import mean_stderr

    values = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    mean, se = metrics.mean_and_stderr(values)
    assert mean == pytest.approx(np.mean(values))
    assert se == pytest.approx(mean_stderr(values), rel=1e-12)
    assert math.isnan(metrics.mean_and_stderr([1.0])[1])


def test_perplexity_bookkeeping() -> None:
    texts = ["a b  c", "d\ne"]
    out = metrics.perplexity_metrics([-6.0, -4.0], [3, 2], texts)
    assert out["token_perplexity"] == pytest.approx(math.exp(10 / 5))
    assert out["word_perplexity"] == pytest.approx(math.exp(10 / 5))  # 3 + 2 words
    assert out["byte_perplexity"] == pytest.approx(math.exp(10 / 9))
    assert out["bits_per_byte"] == pytest.approx(10 / 9 / math.log(2))


@pytest.mark.parametrize(("n", "max_len"), [(1, 4), (4, 4), (5, 4), (13, 4), (9, 3), (30, 7)])
def test_rolling_windows_equal_the_harness(n: int, max_len: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llmtune.tasks.scoring import rolling_windows

    tokens = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_len, 1)]
    ours = rolling_windows(tokens, 7, max_len)
    assert [(list(c), list(x)) for c, x in ours] == [(list(c), list(x)) for c, x in theirs]
    assert [t for _, x in ours for t in x] == tokens
