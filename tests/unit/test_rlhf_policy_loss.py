"""GRPO's loss aggregations equal TRL 1.16's ``GRPOTrainer._compute_loss`` on the same batch (value and gradient).

TRL's method runs as it is, on a stand-in trainer whose per-token log-prob function returns the test's tensor:
the same per-token log-probs, old log-probs, reference log-probs, advantages and completion mask go to both.
"""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any

import pytest
import torch

from llmtune.core.errors import InvalidOptionError
from llmtune.trainers.rlhf.policy_loss import TOKEN_LOSSES, token_policy_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

B, T, MAX_LEN = 6, 7, 9


class _Accelerator:
    num_processes = 1

    @staticmethod
    def reduce(t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return t

    @staticmethod
    def gather(t: torch.Tensor) -> torch.Tensor:
        return t

    gather_for_metrics = gather


def _trl_loss(loss_type: str, logps: torch.Tensor, inputs: dict[str, Any], beta: float) -> torch.Tensor:
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    fake = types.SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=MAX_LEN,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, args=args,
        accelerator=_Accelerator(), model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    loss: torch.Tensor = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss


def _batch(seed: int, off_policy: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": torch.randn(B, generator=g, dtype=torch.float64),
              "ref_per_token_logps": logps.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
              "num_items_in_batch": mask.sum()}
    if off_policy:  # old policy != current: the ratios leave [0.8, 1.2] and the clipping decides
        inputs["old_per_token_logps"] = logps.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return logps, inputs


@pytest.mark.parametrize("loss_type", TOKEN_LOSSES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_equals_trl_grpo_loss_and_gradient(loss_type: str, beta: float, off_policy: bool) -> None:
    for seed in range(3):
        logps, inputs = _batch(seed, off_policy)
        theirs = _trl_loss(loss_type, logps, inputs, beta)
        (their_grad,) = torch.autograd.grad(theirs, logps)
        ours = token_policy_loss(logps, inputs["advantages"], inputs["completion_mask"], loss_type=loss_type,
                                 ref_logps=inputs["ref_per_token_logps"], beta=beta,
                                 old_logps=inputs.get("old_per_token_logps"), max_completion_length=MAX_LEN)
        (our_grad,) = torch.autograd.grad(ours, logps)
        assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12, abs=1e-15)
        assert torch.allclose(our_grad, their_grad, rtol=1e-12, atol=1e-15)


def test_the_aggregations_differ_on_unequal_lengths() -> None:
    logps, inputs = _batch(0, off_policy=False)
    values = {lt: float(token_policy_loss(logps, inputs["advantages"], inputs["completion_mask"], loss_type=lt,
                                          max_completion_length=MAX_LEN).detach()) for lt in TOKEN_LOSSES}
    assert values["dapo"] == values["bnpo"]  # one generation batch = one micro-batch
    assert len({round(values[k], 12) for k in ("grpo", "bnpo", "dr_grpo")}) == 3
    with pytest.raises(InvalidOptionError, match="dapo, grpo, bnpo, dr_grpo, sequence"):
        token_policy_loss(logps, inputs["advantages"], inputs["completion_mask"], loss_type="ppo")
