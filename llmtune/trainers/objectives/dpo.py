"""Objective ``dpo`` on the shared recipe: DPO / IPO / SimPO / ORPO over preference groups.

A training "example" is one `llmtune.trainers.rlhf.pairs.Group` (a prompt, its answers, the pairs its
ranking implies); `scored_tokens` is its number of pairs, so the loop's sum / count is the mean loss per pair.
The reference of DPO/IPO is the same PEFT model with the adapter switched off (methods lora / dora), or,
with ``reference="precomputed"``, log-probs computed once from the starting model before the first step (the
only way for method ``full``: no second copy of the model either way). Validation groups always carry
precomputed reference log-probs, so the "before" evaluation scores the base model itself.

    trainer = llmtune.get_trainer("dpo", method="lora", beta=0.1, loss_type="dpo", max_steps=100)
    trainer.train(model, "prefs.jsonl", tokenizer=tok, output_dir="out")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.trainers.objectives.base import EvalData, Objective, TrainData
from llmtune.trainers.options import TrainOptions


@dataclasses.dataclass(frozen=True)
class DpoTrainOptions(TrainOptions):
    """`TrainOptions` plus the preference loss (``loss_type``, ``beta``, ``label_smoothing``, ``simpo_gamma``)
    and where DPO/IPO take the reference from (``reference``: ``"adapter_off"`` or ``"precomputed"``)."""

    lr: float = 5e-4
    loss_type: str = "dpo"          #: "dpo", "ipo", "simpo" or "orpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: str = "adapter_off"  #: "adapter_off" (a no-grad pass per step) or "precomputed" (once, at setup)
    ranking_loss: str = "pairwise"  #: "pairwise" (mean over pairs) or "listwise" (Plackett-Luce, mean over stages)

    def __post_init__(self) -> None:
        super().__post_init__()
        from llmtune.core.options import check_choice
        from llmtune.trainers.rlhf.dpo import REFERENCES
        from llmtune.trainers.rlhf.listwise import check_ranking_loss
        from llmtune.trainers.rlhf.losses import NEEDS_REFERENCE, check_preference_options

        check_preference_options(self.loss_type, self.beta, self.label_smoothing)
        check_ranking_loss(self.ranking_loss, loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        check_choice("reference", self.reference, REFERENCES)
        if self.method == "full" and self.loss_type in NEEDS_REFERENCE and self.reference != "precomputed":
            raise InvalidOptionError(f"option reference={self.reference!r}: method 'full' has no adapter to switch "
                                     f"off for the {self.loss_type} reference; use reference='precomputed' (log-probs "
                                     "of the starting model, computed once; no second copy)", field="reference")


class GroupData(TrainData):
    """Preference groups in a fresh seeded permutation each epoch."""

    def __init__(self, groups: Sequence[Any], seed: int) -> None:
        self.groups, self.seed, self.num_examples = list(groups), seed, len(groups)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for g in self.groups:
            h.update(json.dumps([g.prompt_ids, g.response_ids, g.pairs]).encode())
        return h.hexdigest()[:16]

    def step_examples(self, step: int, global_batch: int) -> list[Any]:
        import torch

        per_epoch = max(1, len(self.groups) // global_batch)
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return [self.groups[i] for i in order[k * global_batch:(k + 1) * global_batch].tolist()]


def _groups(data: Any, tokenizer: Any, options: Any, what: str) -> list[Any]:
    """Preference groups from a file or dicts, validated by `llmtune.data.preference` (file:line:field errors)."""
    import os

    from llmtune.data.preference import load_preference_records
    from llmtune.data.sources import DataSpec
    from llmtune.trainers.rlhf.pairs import preference_groups

    if isinstance(data, DataSpec):
        records = load_preference_records(data, source=what)
    elif isinstance(data, (str, os.PathLike)):
        records = load_preference_records(str(data))
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        records = load_preference_records(list(data), source=what)
    else:
        raise ConfigError(f"{what} must be a path to .jsonl/.json/.csv or a list of preference records, "
                          f"not {type(data).__name__}")
    groups = preference_groups(records, tokenizer, template=options.template, max_length=options.max_length)
    if not groups:
        raise ConfigError(f"{what}: no preference records")
    return groups


#: the run file holding the reference log-probs computed at the start (`Dpo.setup`)
REFERENCE_FILE = "reference_logps.json"


def _write_references(path: Any, fingerprint: str, sets: Mapping[str, Sequence[Any]]) -> None:
    from llmtune.trainers._checkpoint import write_json_atomic

    write_json_atomic(path, {"fingerprint": fingerprint, **{k: [list(g.reference_logps) for g in v]
                                                            for k, v in sets.items()}})


def _read_references(path: Any, fingerprint: str) -> dict[str, list[list[float]]] | None:
    """The saved reference log-probs of this run's data; None when there are none for these data."""
    from llmtune.core.errors import DamagedFileError

    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        sets = {k: [[float(x) for x in row] for row in body[k]] for k in ("train", "eval")}
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedFileError(f"{path}: not the reference log-probs this run wrote ({exc}); delete it to "
                               "recompute them from the starting model") from exc
    return sets if body.get("fingerprint") == fingerprint else None


def _check_lengths(path: Any, saved: Mapping[str, list[list[float]]], sets: Mapping[str, Sequence[Any]]) -> None:
    from llmtune.core.errors import DamagedFileError

    for k, groups in sets.items():
        if len(saved[k]) != len(groups) or any(len(r) != len(g.response_ids) for r, g in zip(saved[k], groups)):
            raise DamagedFileError(f"{path}: its {k} reference log-probs do not match this run's {k} groups; delete "
                                   "it to recompute them from the starting model")


def _record(objective: Objective, batch: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
    """Keep a training micro-batch's statistics (weighted by its pairs) for the step's log line."""
    import torch

    if torch.is_grad_enabled():  # not the validation passes
        metrics = objective.__dict__.setdefault("_metrics", [])
        metrics.append((int(batch["chosen"].numel()), {k: float(v) for k, v in stats.items()
                                                       if k not in ("pairs", "sequences")}))


def _units(batch: Mapping[str, Any], ranking_loss: str) -> int:
    """The loss's units in a batch: its pairs, or (listwise) its Plackett-Luce stages (answers that beat another)."""
    chosen = batch["chosen"]
    return int(chosen.unique().numel()) if ranking_loss == "listwise" else int(chosen.numel())


class Dpo(Objective):
    """The DPO-family loss summed over the pairs (listwise: the Plackett-Luce stages) of a batch of groups."""

    name: ClassVar[str] = "dpo"
    Options: ClassVar[type] = DpoTrainOptions
    #: the run's ``ranking_loss`` (set with the data): what `scored_tokens` counts
    ranking_loss: str = "pairwise"

    def check_data(self, data: Any, what: str) -> str:
        """Every preference record parsed as training parses it; the rankings' sizes and pairs."""
        from llmtune.data.preference import load_preference_records
        from llmtune.trainers.rlhf.pairs import expected_pairs

        records = load_preference_records(str(data))
        sizes = [len(r.ranking) if hasattr(r, "ranking") else 2 for r in records]
        pairs = sum(expected_pairs(r.ranking) if hasattr(r, "ranking") else 1 for r in records)
        ranked = sum(hasattr(r, "ranking") for r in records)
        return (f"{data}: {len(records)} preference records ({ranked} ranked, {len(records) - ranked} pairwise), "
                f"{pairs} pairs; largest ranking {max(sizes)} answers")

    def train_data(self, data: Any, tokenizer: Any, options: Any) -> GroupData:
        self.ranking_loss = options.ranking_loss
        return GroupData(_groups(data, tokenizer, options, "data"), options.seed)

    def eval_data(self, data: Any, tokenizer: Any, options: Any) -> EvalData:
        self.ranking_loss = options.ranking_loss
        groups = _groups(data, tokenizer, options, "eval_data")
        n = options.eval_examples
        return EvalData(examples=groups if n == 0 else groups[:n])

    def setup(self, model: Any, state: Any) -> None:
        """Reference log-probs of the starting model, once: for the training groups with
        ``reference="precomputed"``, and always for the validation groups. They are written to
        ``output_dir/reference_logps.json`` and read back on resume, so a resumed run never takes its reference
        from a model that has trained since (an in-memory model trained in place, say)."""
        from llmtune.trainers.rlhf.dpo import with_reference_logps
        from llmtune.trainers.rlhf.losses import NEEDS_REFERENCE

        o = state.options
        if getattr(o, "loss_type", None) not in NEEDS_REFERENCE:
            return
        sets = {"train": state.data.groups if o.reference == "precomputed" else [],
                "eval": state.eval.examples if state.eval is not None else []}
        path = state.out / REFERENCE_FILE
        saved = _read_references(path, state.fingerprint) if state.resume_from is not None else None
        if saved is None:
            pad = state.tokenizer.pad_token_id
            with state.acc.autocast():
                sets = {k: with_reference_logps(model, v, pad, o.eval_batch_size) if v else v for k, v in sets.items()}
            if state.is_main_process:
                _write_references(path, state.fingerprint, sets)
        else:
            _check_lengths(path, saved, sets)
            sets = {k: [dataclasses.replace(g, reference_logps=tuple(r)) for g, r in zip(v, saved[k])]
                    for k, v in sets.items()}
        if sets["train"]:
            state.data.groups = sets["train"]
        if sets["eval"]:
            state.eval.examples = sets["eval"]

    def collate(self, examples: Sequence[Any], pad_id: int) -> dict[str, Any]:
        from llmtune.trainers.rlhf.pairs import collate_groups

        return collate_groups(examples, pad_id)

    def scored_tokens(self, example: Any) -> int:
        from llmtune.trainers.rlhf.listwise import stages

        return stages(example.pairs) if self.ranking_loss == "listwise" else len(example.pairs)

    def loss(self, backend: Any, model: Any, batch: Mapping[str, Any], ctx: Any) -> Any:
        from llmtune.trainers.rlhf.dpo import DpoOptions, dpo_loss

        o = ctx.options
        if o.loss_type in ("dpo", "ipo") and "reference_logps" not in batch and not hasattr(model, "disable_adapter"):
            raise InvalidOptionError(f"objective 'dpo' with loss_type {o.loss_type!r} and reference='adapter_off' "
                                     f"takes its reference from the model with the adapter off: use method 'lora' or "
                                     f"'dora', or reference='precomputed' (got method {o.method!r})", field="reference")
        out, stats = dpo_loss(model, dict(batch), DpoOptions(loss_type=o.loss_type, beta=o.beta,
                                                              label_smoothing=o.label_smoothing,
                                                              simpo_gamma=o.simpo_gamma,
                                                              ranking_loss=o.ranking_loss))
        _record(self, batch, stats)
        return out.loss * _units(batch, o.ranking_loss)

    def pop_metric_sums(self) -> tuple[float, dict[str, float]]:
        from llmtune.trainers.objectives.online import pop_weighted

        return pop_weighted(getattr(self, "_metrics", []))


#: what a reward trainer given a causal LM is told
ADD_SCORE_HEAD_HINT = ("objective 'reward' trains a 1-label sequence-classification model: give a reward model "
                       "(one trainer 'reward' saved), or set add_score_head: true under trainer: to train a fresh "
                       "score head on this model's backbone")


@dataclasses.dataclass(frozen=True)
class RewardTrainOptions(TrainOptions):
    """`TrainOptions` for objective ``reward`` (``use_margin``, ``center_rewards_coefficient``)."""

    #: LoRA / DoRA on a reward model train the score head too (PEFT's SEQ_CLS task: modules_to_save)
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    #: the model is a 1-label sequence classifier (`llmtune.models.loading.load_model_and_tokenizer`'s head)
    model_head: ClassVar[str] = "score"
    method: str = "full"
    lr: float = 1e-4
    use_margin: bool = False
    center_rewards_coefficient: float | None = None
    ranking_loss: str = "pairwise"  #: "pairwise" (Bradley-Terry, mean over pairs) or "listwise" (Plackett-Luce)
    #: start a fresh (seeded) score head on a causal LM's backbone; without it a causal LM is refused
    add_score_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        from llmtune.core.options import check_type
        from llmtune.trainers.rlhf.listwise import check_ranking_loss

        check_type("add_score_head", self.add_score_head, bool)
        check_ranking_loss(self.ranking_loss, use_margin=self.use_margin)


class Reward(Objective):
    """Bradley-Terry loss summed over the pairs of a batch of groups; the model is a 1-label
    ``XForSequenceClassification`` (`llmtune.trainers.rlhf.reward.reward_model_from_causal_lm`)."""

    name: ClassVar[str] = "reward"
    Options: ClassVar[type] = RewardTrainOptions
    check_data = Dpo.check_data
    ranking_loss: str = "pairwise"
    train_data = Dpo.train_data
    eval_data = Dpo.eval_data
    collate = Dpo.collate
    scored_tokens = Dpo.scored_tokens

    def loss(self, backend: Any, model: Any, batch: Mapping[str, Any], ctx: Any) -> Any:
        from llmtune.trainers.rlhf.reward import is_reward_model, reward_loss

        if not is_reward_model(model):
            raise InvalidOptionError("objective 'reward' trains a 1-label sequence-classification model: pass "
                                     "reward_model_from_causal_lm(model, tokenizer) as the model")
        loss, stats = reward_loss(model, dict(batch), use_margin=ctx.options.use_margin,
                                  center_rewards_coefficient=ctx.options.center_rewards_coefficient,
                                  ranking_loss=ctx.options.ranking_loss)
        _record(self, batch, stats)
        return loss * _units(batch, ctx.options.ranking_loss)

    pop_metric_sums = Dpo.pop_metric_sums
