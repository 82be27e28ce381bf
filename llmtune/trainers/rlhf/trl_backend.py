"""Backend ``trl`` for objectives ``reward`` and ``dpo``: the same groups through TRL's trainers.

``train_reward(..., backend="trl")`` / ``train_dpo(..., backend="trl")`` land here. The groups are written out
as TRL's pairs (a ranking becomes its pairs, each answer encoded once per pair: TRL has no per-prompt batching),
and TRL's ``RewardTrainer`` / ``DPOTrainer`` run with the matching settings. The losses agree with llmtune's on
the same batch (tests/integration/test_rlhf_trl.py). What differs: TRL's own loop (``transformers.Trainer``),
its tokenization for DPO (it re-tokenizes the texts and appends the eos token), and its logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmtune.core.errors import InvalidOptionError, MissingDependencyError
from llmtune.trainers.rlhf.pairs import Group

#: llmtune loss_type -> TRL DPOConfig.loss_type
TRL_DPO_LOSSES = {"dpo": "sigmoid", "ipo": "ipo"}


def _trl() -> Any:
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError as exc:  # pragma: no cover - trl is in the test extra
        raise MissingDependencyError(f"backend 'trl' needs trl and datasets ({exc}); pip install 'llmtune[trl]'") from exc
    return trl


def reward_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """TRL RewardTrainer rows: ``chosen_ids`` / ``rejected_ids`` (prompt + answer) and ``margin`` per pair."""
    rows = []
    for g in groups:
        for n, (a, b) in enumerate(g.pairs):
            row: dict[str, Any] = {"chosen_ids": g.prompt_ids + g.response_ids[a],
                                   "rejected_ids": g.prompt_ids + g.response_ids[b]}
            if g.margins:
                row["margin"] = g.margins[n]
            rows.append(row)
    return rows


def dpo_rows(groups: Sequence[Group], tokenizer: Any) -> list[dict[str, Any]]:
    """TRL DPOTrainer rows (texts: ``prompt``, ``chosen``, ``rejected``), one per pair."""
    def text(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=False))

    return [{"prompt": text(g.prompt_ids), "chosen": text(g.response_ids[a]), "rejected": text(g.response_ids[b])}
            for g in groups for a, b in g.pairs]


def _common(options: Any, output_dir: str | Path) -> dict[str, Any]:
    return {"output_dir": str(output_dir), "max_steps": options.steps, "learning_rate": options.lr,
            "per_device_train_batch_size": options.batch_size, "report_to": "none", "seed": options.seed,
            "save_strategy": "no", "logging_steps": 1, "use_cpu": True, "dataloader_num_workers": 0,
            "lr_scheduler_type": "cosine", "warmup_steps": max(1, int(0.05 * options.steps)), "bf16": False}


def train_reward_trl(model: Any, tokenizer: Any, groups: Sequence[Group], options: Any,
                     output_dir: str | Path) -> Any:
    """TRL ``RewardTrainer`` on the pairs of ``groups``; returns the trainer (its ``.model`` is trained)."""
    trl = _trl()
    from datasets import Dataset

    peft_config = None
    if options.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="SEQ_CLS", r=options.rank, lora_alpha=options.alpha, lora_dropout=0.0,
                                 target_modules="all-linear")
    args = trl.RewardConfig(**_common(options, output_dir), center_rewards_coefficient=options.center_rewards_coefficient)
    rows = reward_rows(groups)
    if not options.use_margin:
        rows = [{k: v for k, v in r.items() if k != "margin"} for r in rows]
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return trainer


def train_dpo_trl(model: Any, tokenizer: Any, groups: Sequence[Group], options: Any, output_dir: str | Path) -> Any:
    """TRL ``DPOTrainer`` (reference = adapter off for a PEFT model) on the pairs of ``groups``."""
    trl = _trl()
    from datasets import Dataset

    if options.loss_type not in TRL_DPO_LOSSES:
        raise InvalidOptionError(f"backend 'trl' runs loss_type {', '.join(TRL_DPO_LOSSES)}; {options.loss_type!r} "
                                 "runs on the llmtune backend")
    args = trl.DPOConfig(**_common(options, output_dir), beta=options.beta,
                         loss_type=[TRL_DPO_LOSSES[options.loss_type]],
                         precompute_ref_log_probs=options.reference == "precomputed")
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(dpo_rows(groups, tokenizer)),
                             processing_class=tokenizer)
    trainer.train()
    return trainer


__all__ = ["TRL_DPO_LOSSES", "dpo_rows", "reward_rows", "train_dpo_trl", "train_reward_trl"]
