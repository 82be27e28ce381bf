"""The demo's bundled "human": correct words first, then the shorter answer; ties give no preference."""

from __future__ import annotations

import pytest

from llmtune.trainers.rlhf.kopitiam import all_pairs_win_rate, correctness, human_ranking, win_rate
from llmtune.trainers.rlhf.pairs import expected_pairs, ranking_pairs

REF = "Iced coffee with condensed milk, no sugar."


def test_correct_words_beat_any_wrong_answer_then_shorter_wins() -> None:
    answers = ["coffee iced with condensed milk no sugar",       # the right words in another order: 39 characters
               "Iced coffee.",                                     # short but wrong
               "Iced coffee with condensed milk, no sugar. Yes.",  # an extra word: wrong, and longer
               REF]                                                # right: 42 characters
    assert human_ranking(answers, REF) == [0, 2, 3, 1]


def test_ties_share_a_rank_and_make_no_pair() -> None:
    answers = ["Tea.", "Tea!", "Milo with ice.", REF]
    ranks = human_ranking(answers, REF)
    assert ranks[0] == ranks[1] and ranks[3] == 0
    assert len(ranking_pairs(ranks)) == expected_pairs(ranks) == 5


def test_win_rates() -> None:
    assert win_rate([REF, "Tea."], ["Tea.", "Tea."], [REF, REF]) == pytest.approx(0.75)  # a win and a tie
    # every new answer against every old one: REF beats both, "Tea." ties "Tea." and beats the longer wrong one
    assert all_pairs_win_rate([REF, "Tea."], ["Tea.", "Kopi with milk."], REF) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert correctness(REF, REF) == 1.0 and correctness("Tea.", REF) == 0.0
