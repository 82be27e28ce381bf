"""Online RL objectives ``rloo`` and ``grpo``: the step that uses the reward model to train the LLM.

Each step takes a batch of prompts, samples K answers per prompt from the policy (one batched ``generate``
with the KV cache), scores them with the reward model, subtracts ``kl_coef`` x the sequence KL estimate
``sum(log pi(y) - log pi_ref(y))`` (reference = the same model with the adapter off), turns the K rewards of
each prompt into advantages (leave-one-out for RLOO, group-normalised for GRPO) and takes the policy-gradient
step ``-mean(advantage * log pi(y))``.

    policy = add_policy_adapter(sft_model)                        # reference = sft_model (adapter off)
    result = train_online(policy, tokenizer, prompt_ids, reward_fn=rm.score_ids, options=OnlineOptions(steps=40))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llmtune.core.errors import InvalidOptionError
from llmtune.core.options import check_choice
from llmtune.trainers.rlhf import _loop
from llmtune.trainers.rlhf.dpo import adapter_off
from llmtune.trainers.rlhf.losses import grpo_advantages, rloo_advantages
from llmtune.trainers.rlhf.pairs import Group, collate_groups
from llmtune.trainers.rlhf.policy_loss import check_policy_loss, token_logps, token_policy_loss

RewardFn = Callable[[list[list[int]]], list[float]]


@dataclasses.dataclass
class OnlineOptions:
    """Options of objectives ``rloo`` / ``grpo``."""

    algorithm: str = "rloo"
    #: "sequence" (REINFORCE on the summed log-prob, KL in the reward) or TRL's token-level aggregations
    #: "dapo", "grpo", "bnpo", "dr_grpo" (clipped ratio, k3 KL per token x kl_coef): `policy_loss`
    loss_type: str = "sequence"
    samples: int = 4  # K answers per prompt
    kl_coef: float = 0.05
    temperature: float = 1.0
    max_new_tokens: int = 32
    lr: float = 5e-4
    steps: int = 40
    prompts_per_step: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("algorithm", self.algorithm, ("rloo", "grpo"))
        check_policy_loss(self.loss_type)
        if not isinstance(self.samples, int) or self.samples < 2:
            raise InvalidOptionError(f"OnlineOptions.samples must be an int >= 2 (K answers per prompt), "
                                     f"got {self.samples!r}")
        for name in ("max_new_tokens", "steps", "prompts_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"OnlineOptions.{name} must be an int >= 1, got {value!r}")
        if self.kl_coef < 0 or self.temperature <= 0:
            raise InvalidOptionError(f"OnlineOptions: kl_coef must be >= 0 and temperature > 0, got "
                                     f"{self.kl_coef!r}, {self.temperature!r}")


def _cut(tokens: list[int], stops: set[int], pad: int) -> list[int]:
    """Tokens up to and including the first stop token (padding removed)."""
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[:j + 1]
    return [t for t in tokens if t != pad] or [pad]


@torch.no_grad()
def sample(model: Any, prompts: Sequence[Sequence[int]], *, k: int, pad_id: int, stop_ids: Sequence[int],
           max_new_tokens: int, temperature: float = 1.0, do_sample: bool = True) -> list[list[int]]:
    """K completions per prompt (prompt-major order) from one left-padded ``generate`` call with the KV cache."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(list(p)), 1
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_k=0 if do_sample else None,
                             top_p=1.0 if do_sample else None, num_return_sequences=k if do_sample else 1,
                             max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad_id,
                             eos_token_id=list(stop_ids))
    finally:
        model.train(was)
    stops = set(stop_ids)
    return [_cut(row.tolist(), stops, pad_id) for row in out[:, width:]]


def online_step_loss(model: Any, prompts: Sequence[Sequence[int]], completions: Sequence[list[int]],
                     scores: torch.Tensor, options: OnlineOptions, pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient loss of K completions per prompt with leave-one-out / group advantages.

    ``loss_type="sequence"``: ``-mean(A * log pi(y))`` with the advantages of the KL-penalised rewards; TRL's
    token-level types: `policy_loss.token_policy_loss` on the rewards' advantages, KL per token x ``kl_coef``.
    """
    k = options.samples
    groups = [Group(list(p), [list(c) for c in completions[i * k:(i + 1) * k]], []) for i, p in enumerate(prompts)]
    batch = collate_groups(groups, pad_id)
    device = next(model.parameters()).device
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    mask = batch["completion_mask"].to(device)[:, 1:].float()
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    per_token = token_logps(logits, ids)
    with adapter_off(model):
        ref_token = token_logps(model(input_ids=ids, attention_mask=attn, use_cache=False).logits, ids)
    logps, tokens = (per_token * mask).sum(-1), mask.sum(-1)
    kl = ((per_token.detach() - ref_token) * mask).sum(-1)
    scores = scores.to(device).float()
    adv_fn = rloo_advantages if options.algorithm == "rloo" else grpo_advantages
    if options.loss_type == "sequence":
        advantages = adv_fn((scores - options.kl_coef * kl).view(len(prompts), k)).view(-1)
        loss = -(advantages.detach() * logps).mean()
    else:
        advantages = adv_fn(scores.view(len(prompts), k)).view(-1)
        loss = token_policy_loss(per_token, advantages.detach(), mask, loss_type=options.loss_type,
                                 ref_logps=ref_token, beta=options.kl_coef,
                                 max_completion_length=options.max_new_tokens)
    with_kl = scores - options.kl_coef * kl
    stats = {"reward": float(scores.mean()), "kl": float(kl.mean()), "reward_with_kl": float(with_kl.mean()),
             "advantage_std": float(advantages.std()), "completion_tokens": float(tokens.mean())}
    return loss, stats


@dataclasses.dataclass
class OnlineResult:
    model: Any
    history: list[dict[str, Any]]


def train_online(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, reward_fn: RewardFn,
                 stop_ids: Sequence[int], options: OnlineOptions | None = None,
                 log_path: str | Path | None = None, callback: _loop.LogFn | None = None) -> OnlineResult:
    """RLOO / GRPO on a PEFT policy: ``reward_fn`` maps rows (prompt + completion ids) to rewards."""
    options = options or OnlineOptions()
    torch.manual_seed(options.seed)
    pad = tokenizer.pad_token_id
    log = _loop.Logger(log_path, callback)
    opt, sched = _loop.optimizer_for(model, options.lr, options.steps)
    batches = _loop.seeded_batches(list(prompts), options.prompts_per_step, options.seed)
    for step in range(options.steps):
        chunk = next(batches)
        completions = sample(model, chunk, k=options.samples, pad_id=pad, stop_ids=stop_ids,
                             max_new_tokens=options.max_new_tokens, temperature=options.temperature)
        rows = [list(chunk[i // options.samples]) + c for i, c in enumerate(completions)]
        scores = torch.tensor(reward_fn(rows), dtype=torch.float)
        model.train()
        loss, stats = online_step_loss(model, chunk, completions, scores, options, pad)
        grad_norm = _loop.step(model, opt, sched, loss, f"{options.algorithm} step {step}")
        log({"objective": options.algorithm, "step": step + 1, "loss": float(loss.detach()), "grad_norm": grad_norm,
             "lr": sched.get_last_lr()[0], **stats})
    model.eval()
    return OnlineResult(model, log.rows)


__all__ = ["OnlineOptions", "OnlineResult", "online_step_loss", "sample", "train_online"]
