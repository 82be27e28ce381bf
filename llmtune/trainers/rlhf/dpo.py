"""Objective ``dpo``: DPO, IPO, SimPO and ORPO on preference groups, with no second copy of the model.

The reference policy of DPO/IPO is the same base with the adapter switched off (``reference="adapter_off"``,
one forward without grad inside PEFT's ``disable_adapter()``), or log-probs computed once before training
(``reference="precomputed"``, the only choice for full fine-tuning without a copy). SimPO and ORPO need none.

    policy = add_policy_adapter(model, rank=16)                  # LoRA, B = 0: policy == reference at step 0
    result = train_dpo(policy, tokenizer, groups, options=DpoOptions(beta=0.1, steps=100), log_path="log.jsonl")

Each log row has loss, chosen/rejected log-probs, chosen/rejected rewards (beta * log-ratio), margin, accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.options import check_choice
from llmtune.trainers.rlhf import _loop
from llmtune.trainers.rlhf.listwise import check_backend, check_ranking_loss, plackett_luce_loss
from llmtune.trainers.rlhf.losses import (
    NEEDS_REFERENCE,
    PreferenceOutput,
    check_preference_options,
    preference_loss,
    sequence_logps,
)
from llmtune.trainers.rlhf.pairs import Group, collate_groups

REFERENCES = ("adapter_off", "precomputed")


@dataclasses.dataclass
class DpoOptions:
    """Options of objective ``dpo``."""

    loss_type: str = "dpo"  # dpo | ipo | simpo | orpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: str = "adapter_off"
    ranking_loss: str = "pairwise"  # "pairwise" (one term per pair) or "listwise" (Plackett-Luce, loss_type dpo)
    lr: float = 5e-4
    steps: int = 100
    batch_size: int = 8  # groups per step
    seed: int = 0

    def __post_init__(self) -> None:
        check_preference_options(self.loss_type, self.beta, self.label_smoothing)
        check_choice("reference", self.reference, REFERENCES)
        check_ranking_loss(self.ranking_loss, loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"DpoOptions.{name} must be an int >= 1, got {value!r}")


def add_policy_adapter(model: Any, *, rank: int = 16, alpha: int = 32, target_modules: Any = "all-linear") -> Any:
    """A PEFT LoRA adapter on ``model`` (B initialised to zero, so the policy starts equal to the reference)."""
    from peft import LoraConfig

    return quiet_peft(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                        target_modules=target_modules))


def quiet_peft(model: Any, config: Any) -> Any:
    """``get_peft_model`` without the FutureWarning PEFT triggers by reading transformers' deprecated attribute."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


@contextlib.contextmanager
def adapter_off(model: Any) -> Iterator[None]:
    """The reference policy: ``model`` with its adapter disabled (PEFT), no grad."""
    if not hasattr(model, "disable_adapter"):
        raise ConfigError("reference='adapter_off' needs a PEFT model (an adapter to switch off); for full "
                          "fine-tuning use reference='precomputed'")
    with torch.no_grad(), model.disable_adapter():
        yield


def row_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-prob, completion token count) of every row of a `collate_groups` batch."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    return sequence_logps(logits, ids, batch["completion_mask"].to(device))


def reference_logps(model: Any, groups: Sequence[Group], pad_id: int, batch_size: int = 16) -> list[list[float]]:
    """Reference log-probs of every answer of every group, once (adapter off when there is one)."""
    out: list[list[float]] = []
    ctx = adapter_off(model) if hasattr(model, "disable_adapter") else torch.no_grad()
    was = model.training
    model.eval()
    try:
        with ctx:
            for start in range(0, len(groups), batch_size):
                chunk = groups[start:start + batch_size]
                logps = row_logps(model, collate_groups(chunk, pad_id))[0].tolist()
                for g in chunk:
                    out.append(logps[:len(g.response_ids)])
                    logps = logps[len(g.response_ids):]
    finally:
        model.train(was)
    return out


def with_reference_logps(model: Any, groups: Sequence[Group], pad_id: int, batch_size: int = 16) -> list[Group]:
    """``groups`` carrying their answers' reference log-probs (`reference_logps` of ``model`` as it is now)."""
    refs = reference_logps(model, groups, pad_id, batch_size)
    return [dataclasses.replace(g, reference_logps=tuple(r)) for g, r in zip(groups, refs)]


def dpo_loss(model: Any, batch: dict[str, torch.Tensor], options: DpoOptions,
             ref_rows: torch.Tensor | None = None) -> tuple[PreferenceOutput, dict[str, float]]:
    """The loss of one batch; the reference log-prob per row is ``ref_rows``, else the batch's
    ``reference_logps`` (groups from `with_reference_logps`), else a pass with the adapter off."""
    logps, tokens = row_logps(model, batch)
    ref = None
    ref_rows = batch.get("reference_logps") if ref_rows is None else ref_rows
    if options.loss_type in NEEDS_REFERENCE:
        if ref_rows is None:
            with adapter_off(model):
                ref = row_logps(model, batch)[0]
        else:
            ref = ref_rows.to(logps.device, logps.dtype)
    c, r = batch["chosen"].to(logps.device), batch["rejected"].to(logps.device)
    out = preference_loss(logps[c], logps[r], None if ref is None else ref[c], None if ref is None else ref[r],
                          chosen_tokens=tokens[c], rejected_tokens=tokens[r], loss_type=options.loss_type,
                          beta=options.beta, label_smoothing=options.label_smoothing,
                          simpo_gamma=options.simpo_gamma)
    if options.ranking_loss == "listwise":
        assert ref is not None  # check_ranking_loss: listwise is loss_type dpo, which has a reference
        out.loss = plackett_luce_loss(options.beta * (logps - ref), c, r)
    lp = logps.detach()
    stats = {"logps_chosen": float(lp[c].mean()), "logps_rejected": float(lp[r].mean()),
             "rewards_chosen": float(out.chosen_rewards.mean()), "rewards_rejected": float(out.rejected_rewards.mean()),
             "reward_margin": float(out.margins.mean()), "accuracy": float(out.accuracy), "pairs": int(c.numel())}
    return out, stats


@dataclasses.dataclass
class DpoResult:
    model: Any
    history: list[dict[str, Any]]


def train_dpo(model: Any, tokenizer: Any, groups: Sequence[Group], *, options: DpoOptions | None = None,
              log_path: str | Path | None = None, callback: _loop.LogFn | None = None,
              backend: str = "llmtune", output_dir: str | Path | None = None) -> DpoResult:
    """Optimise ``model`` (a PEFT model, or a plain one with ``reference="precomputed"``) on the groups.

    ``backend``: ``"llmtune"`` (this loop) or ``"trl"`` (TRL's ``DPOTrainer``, dpo/ipo, under ``output_dir``).
    """
    options = options or DpoOptions()
    check_choice("backend", backend, ("llmtune", "trl"))
    check_backend(options.ranking_loss, backend)
    if backend == "trl":
        return _train_dpo_trl(model, tokenizer, groups, options, output_dir)
    torch.manual_seed(options.seed)
    pad = tokenizer.pad_token_id
    if options.loss_type in NEEDS_REFERENCE and options.reference == "precomputed":
        groups = with_reference_logps(model, list(groups), pad)
    elif options.loss_type in NEEDS_REFERENCE and not hasattr(model, "disable_adapter"):
        raise ConfigError("reference='adapter_off' needs a PEFT model; for full fine-tuning use "
                          "reference='precomputed' (no second copy of the model either way)")
    log = _loop.Logger(log_path, callback)
    opt, sched = _loop.optimizer_for(model, options.lr, options.steps)
    batches = _loop.seeded_batches(list(groups), options.batch_size, options.seed)
    model.train()
    for step in range(options.steps):
        batch = collate_groups(next(batches), pad)
        out, stats = dpo_loss(model, batch, options)
        grad_norm = _loop.step(model, opt, sched, out.loss, f"dpo step {step}")
        log({"objective": "dpo", "loss_type": options.loss_type, "step": step + 1, "loss": float(out.loss.detach()),
             "grad_norm": grad_norm, "lr": sched.get_last_lr()[0], **stats})
    model.eval()
    return DpoResult(model, log.rows)


def _train_dpo_trl(model: Any, tokenizer: Any, groups: Sequence[Group], options: DpoOptions,
                   output_dir: str | Path | None) -> DpoResult:
    import tempfile

    from llmtune.trainers.rlhf.trl_backend import train_dpo_trl

    if options.label_smoothing:
        raise InvalidOptionError("backend 'trl': TRL's sigmoid DPO loss has no label smoothing; use backend "
                                 "'llmtune' or label_smoothing=0")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train_dpo_trl(model, tokenizer, groups, options, output_dir or tmp)
    return DpoResult(trainer.model, list(trainer.state.log_history))


__all__ = ["REFERENCES", "DpoOptions", "DpoResult", "add_policy_adapter", "adapter_off", "dpo_loss",
           "reference_logps", "row_logps", "train_dpo", "with_reference_logps"]
