"""Objective ``reward``: a scalar head on a causal LM, trained with the Bradley-Terry loss on ranked answers.

    rm = reward_model_from_causal_lm(model, tokenizer)           # XForSequenceClassification, num_labels=1
    result = train_reward(rm, tokenizer, groups, eval_groups=held_out, options=RewardOptions(steps=200))
    result.model.score(prompt_text, answer_text)                 # a float: higher = preferred
    result.model.save("rm/")                                     # AutoModelForSequenceClassification.from_pretrained("rm/")

The head reads the last non-pad token (transformers' sequence-classification pooling), so answers end with the
template's end-of-answer token. Training logs loss, accuracy and margin per step and the held-out pairwise
accuracy every ``eval_every`` steps.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.options import check_choice
from llmtune.trainers.rlhf import _loop
from llmtune.trainers.rlhf.listwise import check_backend, check_ranking_loss, plackett_luce_loss
from llmtune.trainers.rlhf.losses import bradley_terry_loss
from llmtune.trainers.rlhf.pairs import Group, collate_groups


@dataclasses.dataclass
class RewardOptions:
    """Options of objective ``reward``."""

    method: str = "lora"  # "lora" (LoRA on every linear layer + a trained head) or "full"
    rank: int = 16
    alpha: int = 32
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8  # groups (prompts) per step
    use_margin: bool = False  # subtract each pair's margin inside the sigmoid
    ranking_loss: str = "pairwise"  # "pairwise" (Bradley-Terry over the pairs) or "listwise" (Plackett-Luce)
    center_rewards_coefficient: float | None = None  # + c * mean((r_c + r_r)^2), as TRL's RewardConfig
    eval_every: int = 25
    eval_batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, ("lora", "full"))
        for name in ("rank", "alpha", "steps", "batch_size", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"RewardOptions.{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise InvalidOptionError(f"RewardOptions.lr must be > 0, got {self.lr!r}")
        check_ranking_loss(self.ranking_loss, use_margin=self.use_margin)


def reward_model_from_causal_lm(model: Any, tokenizer: Any, *, seed: int = 0) -> Any:
    """The same architecture with a 1-output score head instead of the LM head; the backbone's weights copied."""
    from transformers import AutoModelForSequenceClassification

    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; the reward head finds the last token by it")
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_config(config)
    prefix = rm.base_model_prefix
    rm.get_submodule(prefix).load_state_dict(model.get_submodule(prefix).state_dict())
    return rm.to(next(model.parameters()).device, dtype=next(model.parameters()).dtype)


def is_reward_model(model: Any) -> bool:
    """Whether ``model`` (or the model under its PEFT wrapper) is a 1-label ``XForSequenceClassification``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (type(base).__name__.endswith("ForSequenceClassification")
            and getattr(getattr(base, "config", None), "num_labels", None) == 1)


def as_reward_model(model: Any, tokenizer: Any, *, fresh_head: bool = False, seed: int = 0, hint: str = "") -> Any:
    """``model`` when it is a reward model; a causal LM becomes one with a fresh head only when ``fresh_head``."""
    if is_reward_model(model):
        return model
    if not fresh_head:
        raise ConfigError(f"the model is a {type(model).__name__}, not a 1-label sequence classifier"
                          f"{'; ' + hint if hint else ''}")
    return reward_model_from_causal_lm(model, tokenizer, seed=seed)


def row_rewards(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar reward per row of a `collate_groups` batch."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False)
    return out.logits.squeeze(-1).float()


def reward_loss(model: Any, batch: dict[str, torch.Tensor], *, use_margin: bool = False,
                center_rewards_coefficient: float | None = None, ranking_loss: str = "pairwise"
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss over every pair of the batch (each answer scored once), or with ``ranking_loss=
    "listwise"`` the Plackett-Luce loss over each ranking's stages; and the pairwise accuracy / margin."""
    rewards = row_rewards(model, batch)
    c, r = batch["chosen"].to(rewards.device), batch["rejected"].to(rewards.device)
    chosen, rejected = rewards[c], rewards[r]
    if ranking_loss == "listwise":
        check_ranking_loss(ranking_loss, use_margin=use_margin)
        loss = plackett_luce_loss(rewards, c, r)
    else:
        loss = bradley_terry_loss(chosen, rejected, batch["margin"].to(rewards.device) if use_margin else None)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    diff = (chosen - rejected).detach()
    stats = {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean()),
             "pairs": int(chosen.numel()), "sequences": int(rewards.numel())}
    return loss, stats


class RewardModel:
    """A trained reward model: `score` texts, `pairwise_accuracy` on groups, `save` for transformers."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def score_ids(self, rows: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
        """Rewards of already-tokenized rows (prompt + answer)."""
        was = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        out: list[float] = []
        try:
            for start in range(0, len(rows), batch_size):
                chunk = [list(r) for r in rows[start:start + batch_size]]
                width = max(len(r) for r in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, r in enumerate(chunk):
                    ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
                out.extend(row_rewards(self.model, {"input_ids": ids, "attention_mask": mask}).tolist())
        finally:
            self.model.train(was)
        return out

    def score(self, prompt: str, response: str) -> float:
        """The reward of ``response`` (rendered answer text, with its end token) after ``prompt`` (rendered)."""
        ids = self.tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        return self.score_ids([ids])[0]

    @torch.no_grad()
    def pairwise_accuracy(self, groups: Sequence[Group], batch_size: int = 16) -> float:
        """Fraction of the groups' (better, worse) pairs the model scores in the right order."""
        right = total = 0
        was = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(groups), batch_size):
                batch = collate_groups(groups[start:start + batch_size], self.tokenizer.pad_token_id)
                r = row_rewards(self.model, batch).cpu()
                right += int((r[batch["chosen"]] > r[batch["rejected"]]).sum())
                total += int(batch["chosen"].numel())
        finally:
            self.model.train(was)
        return right / total if total else float("nan")

    def save(self, directory: str | Path) -> Path:
        """Save merged weights + tokenizer: ``AutoModelForSequenceClassification.from_pretrained(directory)``."""
        directory = Path(directory)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        return directory


def _prepare(model: Any, options: RewardOptions) -> Any:
    if options.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig

    from llmtune.trainers.rlhf.dpo import quiet_peft

    config = LoraConfig(task_type="SEQ_CLS", r=options.rank, lora_alpha=options.alpha, lora_dropout=0.0,
                        target_modules="all-linear")
    return quiet_peft(model, config)


@dataclasses.dataclass
class RewardResult:
    model: RewardModel
    history: list[dict[str, Any]]
    eval_accuracy: float | None


def train_reward(model: Any, tokenizer: Any, groups: Sequence[Group], *, eval_groups: Sequence[Group] = (),
                 options: RewardOptions | None = None, log_path: str | Path | None = None,
                 callback: _loop.LogFn | None = None, backend: str = "llmtune",
                 output_dir: str | Path | None = None) -> RewardResult:
    """Train a sequence-classification model (`reward_model_from_causal_lm`) on ranked/paired groups.

    ``backend``: ``"llmtune"`` (this loop: each answer scored once per group) or ``"trl"`` (TRL's
    ``RewardTrainer`` on the expanded pairs, writing under ``output_dir``).
    """
    options = options or RewardOptions()
    check_choice("backend", backend, ("llmtune", "trl"))
    check_backend(options.ranking_loss, backend)
    if backend == "trl":
        return _train_reward_trl(model, tokenizer, groups, eval_groups, options, output_dir)
    torch.manual_seed(options.seed)
    model = _prepare(model, options)
    model.train()
    log = _loop.Logger(log_path, callback)
    opt, sched = _loop.optimizer_for(model, options.lr, options.steps)
    rm = RewardModel(model, tokenizer)
    batches = _loop.seeded_batches(list(groups), options.batch_size, options.seed)
    accuracy = None
    for step in range(options.steps):
        batch = collate_groups(next(batches), tokenizer.pad_token_id)
        loss, stats = reward_loss(model, batch, use_margin=options.use_margin,
                                  center_rewards_coefficient=options.center_rewards_coefficient,
                                  ranking_loss=options.ranking_loss)
        grad_norm = _loop.step(model, opt, sched, loss, f"reward step {step}")
        log({"objective": "reward", "step": step + 1, "loss": float(loss.detach()), "grad_norm": grad_norm,
             "lr": sched.get_last_lr()[0], **stats})
        if eval_groups and ((step + 1) % options.eval_every == 0 or step + 1 == options.steps):
            accuracy = rm.pairwise_accuracy(eval_groups, options.eval_batch_size)
            log({"objective": "reward", "step": step + 1, "eval_pairwise_accuracy": accuracy})
    model.eval()
    return RewardResult(rm, log.rows, accuracy)


def _train_reward_trl(model: Any, tokenizer: Any, groups: Sequence[Group], eval_groups: Sequence[Group],
                      options: RewardOptions, output_dir: str | Path | None) -> RewardResult:
    import tempfile

    from llmtune.trainers.rlhf.trl_backend import train_reward_trl

    with tempfile.TemporaryDirectory() as tmp:
        trainer = train_reward_trl(model, tokenizer, groups, options, output_dir or tmp)
    rm = RewardModel(trainer.model, tokenizer)
    accuracy = rm.pairwise_accuracy(eval_groups, options.eval_batch_size) if eval_groups else None
    return RewardResult(rm, list(trainer.state.log_history), accuracy)


__all__ = ["RewardModel", "RewardOptions", "RewardResult", "as_reward_model", "is_reward_model", "reward_loss",
           "reward_model_from_causal_lm", "row_rewards", "train_reward"]
