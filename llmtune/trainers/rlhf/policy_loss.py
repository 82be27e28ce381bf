"""The policy-gradient loss of online RL per token, aggregated as TRL 1.16's ``GRPOConfig.loss_type`` names it.

Per completion token t of sequence i (on-policy, one update per generation batch, so the old policy is the
current one detached and the clipped ratio equals 1 in value but not in gradient, exactly as in TRL):

    ratio_it = exp(logp_it - old_logp_it)
    loss_it  = -min(ratio_it * A_i, clip(ratio_it, 1 - eps_low, 1 + eps_high) * A_i) + beta * kl_it
    kl_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1          (k3 estimator; only when beta > 0)

and the aggregation over a batch of B sequences with completion masks m:

| loss_type | aggregation |
|---|---|
| ``grpo`` | mean over sequences of (sum_t m * loss / sum_t m): each sequence weighs the same (length bias) |
| ``bnpo`` | sum(m * loss) / sum(m) over the micro-batch |
| ``dr_grpo`` | sum(m * loss) / (B * max_completion_length): Dr. GRPO's constant normaliser |
| ``dapo`` | sum(m * loss) / tokens of the generation batch: TRL's default (token-level) |
| ``sequence`` | llmtune's REINFORCE form: -mean(A_i * sum_t logp_it), KL in the reward (not a TRL name) |

llmtune samples each micro-batch's completions itself, so ``dapo``'s generation batch is the micro-batch: equal to
TRL with one micro-batch per step on one process (``grad_accum=1``); with more, each micro-batch is normalised
by its own tokens (``bnpo``'s normaliser), where TRL divides by the whole generation batch's.
"""

from __future__ import annotations

import torch

from llmtune.core.errors import InvalidOptionError

#: TRL's names (``GRPOConfig.loss_type``) plus llmtune's sequence-level REINFORCE loss
TOKEN_LOSSES = ("dapo", "grpo", "bnpo", "dr_grpo")
POLICY_LOSSES = (*TOKEN_LOSSES, "sequence")


def check_policy_loss(loss_type: str) -> None:
    if loss_type not in POLICY_LOSSES:
        raise InvalidOptionError(f"loss_type must be one of {', '.join(POLICY_LOSSES)} (TRL's GRPOConfig.loss_type "
                                 f"names, and llmtune's 'sequence'), got {loss_type!r}", field="loss_type")


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(policy || reference) per token, as TRL: exp(ref - logp) - (ref - logp) - 1."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def token_policy_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo",
                      ref_logps: torch.Tensor | None = None, beta: float = 0.0,
                      old_logps: torch.Tensor | None = None, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                      max_completion_length: int | None = None) -> torch.Tensor:
    """The clipped-ratio policy loss of ``logps`` [B, T] (per completion token), ``advantages`` [B], ``mask`` [B, T].

    ``old_logps``: the sampling policy's log-probs (default: ``logps`` detached, on-policy); ``ref_logps`` and
    ``beta`` add TRL's per-token KL; ``max_completion_length`` is ``dr_grpo``'s normaliser.
    """
    check_policy_loss(loss_type)
    if loss_type not in TOKEN_LOSSES:
        raise InvalidOptionError(f"token_policy_loss aggregates per token ({', '.join(TOKEN_LOSSES)}); "
                                 f"{loss_type!r} is the sequence-level loss of online_step_loss", field="loss_type")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta:
        if ref_logps is None:
            raise InvalidOptionError("beta > 0 needs the reference's per-token log-probs (ref_logps)", field="kl_coef")
        loss = loss + beta * per_token_kl(logps, ref_logps.to(logps.dtype))
    if loss_type == "grpo":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise InvalidOptionError("loss_type 'dr_grpo' needs max_completion_length (max_new_tokens)",
                                     field="loss_type")
        return (loss * mask).sum() / (loss.size(0) * max_completion_length)
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)  # bnpo, and dapo over one generation batch


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token) of every next token: [B, L-1] from logits [B, L, V] (fp32 log-softmax)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


__all__ = ["POLICY_LOSSES", "TOKEN_LOSSES", "check_policy_loss", "per_token_kl", "token_logps", "token_policy_loss"]
