"""The losses of RLHF and DPO, as plain torch functions of per-sequence scores and log-probabilities.

* `bradley_terry_loss`: reward modelling, ``-log sigmoid(r_chosen - r_rejected - margin)`` (mean over pairs);
* `preference_loss`: ``dpo`` (sigmoid, with conservative label smoothing), ``ipo`` (length-normalised, as TRL),
  ``simpo`` (reference-free, length-normalised, target margin ``gamma``), ``orpo`` (odds ratio + NLL);
* `sequence_logps`: summed log-probs of the completion tokens of each row (and their count);
* `rloo_advantages` / `grpo_advantages`: leave-one-out / group-normalised advantages of K samples per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmtune.core.errors import InvalidOptionError

PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo")
#: losses that need reference log-probabilities
NEEDS_REFERENCE = ("dpo", "ipo")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Mean Bradley-Terry negative log-likelihood of ``chosen`` beating ``rejected`` (scores, one per pair)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(token) over each row's completion tokens, number of those tokens); logits predict next token."""
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


@dataclass
class PreferenceOutput:
    """Mean loss over the pairs, and per pair: the implicit rewards of chosen and rejected (for logging)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def check_preference_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    if loss_type not in PREFERENCE_LOSSES:
        raise InvalidOptionError(f"loss_type must be one of {', '.join(PREFERENCE_LOSSES)}, got {loss_type!r}")
    if not isinstance(beta, (int, float)) or beta <= 0:
        raise InvalidOptionError(f"beta must be a number > 0, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise InvalidOptionError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")


def _smoothed(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO: the preference label is flipped with probability ``label_smoothing``."""
    loss = -F.logsigmoid(logits) * (1 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-logits) * label_smoothing
    return loss


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None, *,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    loss_type: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5) -> PreferenceOutput:
    """The DPO-family loss of a batch of pairs from summed completion log-probs (and token counts).

    dpo: ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``; ipo: ``((pc-rc)/nc - (pr-rr)/nr - 1/(2 beta))^2``;
    simpo: ``-log sigmoid(beta * (pc/nc - pr/nr) - gamma)``; orpo: ``-mean logp_c/nc - beta * log sigmoid(log odds
    ratio)`` (``beta`` is ORPO's lambda). Label smoothing applies to dpo and simpo.
    """
    check_preference_options(loss_type, beta, label_smoothing)
    if loss_type in NEEDS_REFERENCE and (ref_chosen is None or ref_rejected is None):
        raise InvalidOptionError(f"loss_type {loss_type!r} needs reference log-probs (ref_chosen, ref_rejected)")
    if loss_type != "dpo" and (chosen_tokens is None or rejected_tokens is None):
        raise InvalidOptionError(f"loss_type {loss_type!r} needs chosen_tokens and rejected_tokens (lengths)")
    if loss_type in NEEDS_REFERENCE:
        assert ref_chosen is not None and ref_rejected is not None
        chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        if loss_type == "dpo":
            losses = _smoothed(beta * (chosen_ratio - rejected_ratio), label_smoothing)
        else:
            assert chosen_tokens is not None and rejected_tokens is not None
            delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        return PreferenceOutput(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    assert chosen_tokens is not None and rejected_tokens is not None
    mean_c = policy_chosen / chosen_tokens.clamp(min=1)
    mean_r = policy_rejected / rejected_tokens.clamp(min=1)
    if loss_type == "simpo":
        losses = _smoothed(beta * (mean_c - mean_r) - simpo_gamma, label_smoothing)
    else:  # orpo: log odds(y) = log p - log(1 - p) with p the mean per-token probability
        log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c).clamp(max=1 - 1e-6))
                                        - torch.log1p(-torch.exp(mean_r).clamp(max=1 - 1e-6)))
        losses = -mean_c - beta * F.logsigmoid(log_odds)
    return PreferenceOutput(losses.mean(), beta * mean_c.detach(), beta * mean_r.detach())


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of ``rewards`` [prompts, K]: r_i - mean of the other K-1 samples' rewards."""
    k = rewards.shape[-1]
    if k < 2:
        raise InvalidOptionError(f"leave-one-out advantages need K >= 2 samples per prompt, got {k}")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of ``rewards`` [prompts, K]: (r - group mean) / (group std + eps)."""
    if rewards.shape[-1] < 2:
        raise InvalidOptionError(f"group-relative advantages need K >= 2 samples per prompt, got {rewards.shape[-1]}")
    mean = rewards.mean(-1, keepdim=True)
    return (rewards - mean) / (rewards.std(-1, keepdim=True) + eps)


__all__ = ["NEEDS_REFERENCE", "PREFERENCE_LOSSES", "PreferenceOutput", "bradley_terry_loss", "grpo_advantages",
           "preference_loss", "rloo_advantages", "sequence_logps"]
