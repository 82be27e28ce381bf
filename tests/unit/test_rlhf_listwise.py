"""Plackett-Luce (listwise) ranking loss: the PL likelihood computed directly, K = 2 = Bradley-Terry / DPO,
a hand-computed K = 3 case, and ties treated as the pairwise loss treats them (no term between tied answers)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llmtune.core.errors import InvalidOptionError
from llmtune.trainers.rlhf.listwise import check_ranking_loss, plackett_luce_loss, stages
from llmtune.trainers.rlhf.losses import bradley_terry_loss, preference_loss
from llmtune.trainers.rlhf.pairs import ranking_pairs


def _pair_rows(rankings: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of every group's (better, worse) pairs, as `collate_groups` lays them out."""
    chosen, rejected, base = [], [], 0
    for ranking in rankings:
        for a, b in ranking_pairs(ranking):
            chosen.append(base + a)
            rejected.append(base + b)
        base += len(ranking)
    return torch.tensor(chosen), torch.tensor(rejected)


def _pl_neg_log_likelihood(scores: list[float], ranking: list[int]) -> float:
    """-log P(order) of a ranking without ties, by the definition: a product over positions of softmax choices."""
    order = sorted(range(len(ranking)), key=lambda i: ranking[i])
    prob = 1.0
    for pos, i in enumerate(order):
        rest = order[pos:]
        prob *= math.exp(scores[i]) / sum(math.exp(scores[j]) for j in rest)
    return -math.log(prob)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_equals_the_plackett_luce_likelihood_computed_directly(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    for _ in range(5):
        scores = torch.randn(2 * k, generator=g, dtype=torch.float64)
        rankings = [torch.randperm(k, generator=g).tolist() for _ in range(2)]
        chosen, rejected = _pair_rows(rankings)
        loss = plackett_luce_loss(scores, chosen, rejected)
        direct = sum(_pl_neg_log_likelihood(scores[i * k:(i + 1) * k].tolist(), r) for i, r in enumerate(rankings))
        assert sum(stages(ranking_pairs(r)) for r in rankings) == 2 * (k - 1)
        assert float(loss) * 2 * (k - 1) == pytest.approx(direct, rel=1e-12)  # mean over the K-1 stages per ranking


def test_k2_equals_bradley_terry_and_dpo() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, generator=g, dtype=torch.float64)
    chosen, rejected = _pair_rows([[0, 1], [1, 0], [0, 1], [1, 0]])
    pl = plackett_luce_loss(scores, chosen, rejected)
    assert float(pl) == pytest.approx(float(bradley_terry_loss(scores[chosen], scores[rejected])), rel=1e-12)
    policy, ref, beta = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g), 0.3
    dpo = preference_loss(policy[chosen], policy[rejected], ref[chosen].double(), ref[rejected].double(), beta=beta)
    listwise = plackett_luce_loss(beta * (policy - ref.double()), chosen, rejected)
    assert float(listwise) == pytest.approx(float(dpo.loss), rel=1e-12)


def test_hand_computed_k3() -> None:
    # scores 2, 1, 0 for answers ranked 0, 1, 2: P = e^2 / (e^2 + e + 1) * e / (e + 1)
    e = math.e
    hand = -(math.log(e ** 2 / (e ** 2 + e + 1)) + math.log(e / (e + 1)))  # 0.72087...
    assert hand == pytest.approx(0.720868, abs=1e-6)
    loss = plackett_luce_loss(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), *_pair_rows([[0, 1, 2]]))
    assert float(loss) == pytest.approx(hand / 2, rel=1e-12)
    # the same answers in another order in the record: the ranking, not the position, decides
    loss = plackett_luce_loss(torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64), *_pair_rows([[2, 0, 1]]))
    assert float(loss) == pytest.approx(hand / 2, rel=1e-12)


def test_ties_make_no_term_between_tied_answers() -> None:
    s = torch.tensor([0.3, -0.2, 1.1], dtype=torch.float64)
    # two tied for first: each is compared only with the worse answer (two stages), as the pairwise loss does
    tied_top = plackett_luce_loss(s, *_pair_rows([[0, 0, 1]]))
    assert float(tied_top) == pytest.approx(float(bradley_terry_loss(s[[0, 1]], s[[2, 2]])), rel=1e-12)
    # two tied for last: one stage, the winner against both: -log softmax(s)[0]
    tied_last = plackett_luce_loss(s, *_pair_rows([[0, 1, 1]]))
    assert float(tied_last) == pytest.approx(float(-torch.log_softmax(s, 0)[0]), rel=1e-12)
    assert stages(ranking_pairs([0, 1, 1])) == 1 and stages(ranking_pairs([0, 0, 1])) == 2
    # all tied: no pairs, no stages, a zero loss that still back-propagates
    x = s.clone().requires_grad_(True)
    none = plackett_luce_loss(x, *_pair_rows([[0, 0, 0]]))
    none.backward()
    assert float(none.detach()) == 0.0 and x.grad is not None and not x.grad.any()
    # a tie in the middle of four: the tied answers never share a denominator term as the chosen one
    k4 = torch.tensor([0.5, 0.1, -0.4, 0.9], dtype=torch.float64)
    mid = plackett_luce_loss(k4, *_pair_rows([[0, 1, 1, 2]]))
    lse = torch.logsumexp
    by_hand = [lse(k4, 0) - k4[0], lse(k4[[1, 3]], 0) - k4[1], lse(k4[[2, 3]], 0) - k4[2]]
    assert float(mid) == pytest.approx(float(sum(by_hand)) / 3, rel=1e-12)


def test_gradient_weighs_each_position_once() -> None:
    """Pairs count the top answer K-1 times; PL's gradient on the top answer is 1 - its softmax share."""
    s = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    plackett_luce_loss(s, *_pair_rows([[0, 1, 2, 3]])).backward()
    assert s.grad is not None
    assert float(s.grad[0]) * 3 == pytest.approx(-(1 - 1 / 4), rel=1e-12)


def test_options_that_do_not_combine_with_listwise() -> None:
    check_ranking_loss("listwise")
    for kwargs, match in [({"loss_type": "simpo"}, "loss_type 'simpo'"), ({"label_smoothing": 0.1}, "label smoothing"),
                          ({"use_margin": True}, "margin")]:
        with pytest.raises(InvalidOptionError, match=match):
            check_ranking_loss("listwise", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="pairwise, listwise"):
        check_ranking_loss("plackett")


def test_listwise_is_a_permutation_invariant_function_of_the_ranking() -> None:
    scores = torch.tensor([0.2, -1.0, 0.7], dtype=torch.float64)
    for perm in itertools.permutations(range(3)):
        ranking = [0, 1, 2]
        permuted_scores = scores[list(perm)]
        permuted_ranking = [ranking[p] for p in perm]
        a = plackett_luce_loss(scores, *_pair_rows([ranking]))
        b = plackett_luce_loss(permuted_scores, *_pair_rows([permuted_ranking]))
        assert float(a) == pytest.approx(float(b), rel=1e-12)
