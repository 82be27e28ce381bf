"""Listwise (Plackett-Luce) losses over ranked answers, next to the pairwise (Bradley-Terry) ones.

A ranking of K answers under the Plackett-Luce model has likelihood

    P(order) = prod over positions i of  exp(s_i) / sum over answers j still unplaced at i of exp(s_j)

so each position is weighed once, where the K(K-1)/2 pairs count the top answer K-1 times. Ties are treated as
in the pairwise case, where tied answers make no pair: the *stage* of answer i compares it with itself and the
answers ranked strictly worse than it (its pairs), so tied answers never sit in each other's denominator, and
an answer with nothing strictly worse (the last place, or a tie for it) adds no stage. Without ties this is
exactly the PL likelihood; with K = 2 it is the Bradley-Terry / DPO loss ``-log sigmoid(s_better - s_worse)``.

The stages come from the batch's (better, worse) row pairs alone (`llmtune.trainers.rlhf.pairs.collate_groups`),
and the loss is the mean over stages (a ranking of K distinct ranks has K - 1; a pair has 1), the way the
pairwise loss is the mean over pairs.

    loss = plackett_luce_loss(scores, batch["chosen"], batch["rejected"])   # scores: one per row
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmtune.core.errors import InvalidOptionError

#: values of the ``ranking_loss`` option of objectives ``reward`` and ``dpo``
RANKING_LOSSES = ("pairwise", "listwise")


def check_ranking_loss(ranking_loss: str, *, loss_type: str = "dpo", label_smoothing: float = 0.0,
                       use_margin: bool = False) -> None:
    """Raise `InvalidOptionError` when ``ranking_loss`` is unknown or cannot combine with the other options."""
    if ranking_loss not in RANKING_LOSSES:
        raise InvalidOptionError(f"ranking_loss must be one of {', '.join(RANKING_LOSSES)}, got {ranking_loss!r}",
                                 field="ranking_loss")
    if ranking_loss == "pairwise":
        return
    if loss_type != "dpo":
        raise InvalidOptionError(f"ranking_loss='listwise' is the Plackett-Luce form of loss_type 'dpo' (implicit "
                                 f"rewards beta * log-ratio); got loss_type {loss_type!r}: use ranking_loss="
                                 "'pairwise' with it", field="ranking_loss")
    if label_smoothing:
        raise InvalidOptionError("ranking_loss='listwise' has no label smoothing (it flips pairs, not rankings); "
                                 "set label_smoothing=0 or use ranking_loss='pairwise'", field="ranking_loss")
    if use_margin:
        raise InvalidOptionError("ranking_loss='listwise' takes no per-pair margin; set use_margin=false or use "
                                 "ranking_loss='pairwise'", field="ranking_loss")


def check_backend(ranking_loss: str, backend: str) -> None:
    """TRL's trainers take pairs only: ``ranking_loss="listwise"`` runs on backend ``llmtune``."""
    if ranking_loss == "listwise" and backend != "llmtune":
        raise InvalidOptionError(f"backend {backend!r} trains on pairs only; ranking_loss='listwise' runs on backend "
                                 "'llmtune'", field="ranking_loss")


def stages(pairs: Sequence[tuple[int, int]]) -> int:
    """How many Plackett-Luce stages a group's (better, worse) pairs make: answers that beat at least one other."""
    return len({a for a, _ in pairs})


def plackett_luce_terms(scores: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """One negative log-probability per stage: ``logsumexp(s_i, s_worse...) - s_i`` for every answer ``i`` that is
    the better side of a pair (``chosen`` / ``rejected``: row indices of each pair into ``scores``)."""
    leaders, stage_of_pair = torch.unique(chosen, return_inverse=True)
    mask = torch.zeros((leaders.numel(), scores.numel()), dtype=torch.bool, device=scores.device)
    mask[torch.arange(leaders.numel(), device=scores.device), leaders] = True
    mask[stage_of_pair, rejected] = True
    log_z = torch.logsumexp(scores.unsqueeze(0).masked_fill(~mask, float("-inf")), dim=-1)
    return log_z - scores[leaders]


def plackett_luce_loss(scores: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean over stages of the Plackett-Luce negative log-likelihood (ties as in the pairwise loss: no stage term
    between tied answers). ``scores``: one per row; ``chosen``/``rejected``: each pair's rows."""
    if chosen.numel() == 0:
        return scores.sum() * 0.0
    return plackett_luce_terms(scores, chosen.to(scores.device), rejected.to(scores.device)).mean()


__all__ = ["RANKING_LOSSES", "check_backend", "check_ranking_loss", "plackett_luce_loss", "plackett_luce_terms", "stages"]
