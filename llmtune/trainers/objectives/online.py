"""Objectives ``rloo`` and ``grpo`` on the shared recipe: the reward model trains the LLM (online RL).

A training "example" is one prompt (token ids). Each step samples ``samples`` answers per prompt from the
policy (one batched ``generate`` with the KV cache), scores them with the reward model saved at
``reward_model`` (`llmtune.trainers.rlhf.reward.RewardModel.save`), subtracts ``kl_coef`` x the sequence KL
to the reference (the same PEFT model with the adapter off: methods lora / dora) and takes the policy-gradient
step of `llmtune.trainers.rlhf.online.online_step_loss`. `scored_tokens` is 1 per prompt, so the loop's
sum / count is the mean loss per prompt. The step's mean reward, KL and answer length go to ``log.jsonl``.

    trainer = llmtune.get_trainer("rloo", method="lora", reward_model="rm/", samples=4, kl_coef=0.1)
    trainer.train(sft_model, "prompts.jsonl", tokenizer=tok, output_dir="out")
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
class OnlineTrainOptions(TrainOptions):
    """`TrainOptions` plus online RL: ``reward_model`` (a saved reward model's directory), ``samples`` (K
    answers per prompt), ``kl_coef``, ``temperature``; answers are at most ``max_new_tokens`` long."""

    lr: float = 3e-4
    reward_model: str | None = None
    samples: int = 4
    kl_coef: float = 0.05
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        from llmtune.trainers.rlhf.online import OnlineOptions

        OnlineOptions(samples=self.samples, kl_coef=self.kl_coef, temperature=self.temperature,
                      max_new_tokens=self.max_new_tokens)


#: what a ``reward_model`` without a trained score head is told
REWARD_MODEL_HINT = ("reward_model must be a trained reward model: train one with trainer: {name: reward} "
                     "(it saves OUTPUT_DIR/model, or an adapter to export with llmtune export --format hf)")


class PromptData(TrainData):
    """Prompts (token ids) in a fresh seeded permutation each epoch."""

    def __init__(self, prompts: Sequence[list[int]], seed: int) -> None:
        self.prompts, self.seed, self.num_examples = [list(p) for p in prompts], seed, len(prompts)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()[:16]

    def step_examples(self, step: int, global_batch: int) -> list[Any]:
        import torch

        per_epoch = max(1, len(self.prompts) // global_batch)
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return [self.prompts[i] for i in order[k * global_batch:(k + 1) * global_batch].tolist()]


def prompt_text(record: Mapping[str, Any], template: str, tokenizer: Any, where: str) -> str:
    """The rendered prompt of a record: a preference record's ``prompt``, or any SFT record's prompt part."""
    from llmtune.data.preference import parse_prompt
    from llmtune.data.templates import render_prompt, render_segments

    if "prompt" in record:
        turns = [*parse_prompt(dict(record), where), {"role": "assistant", "content": "."}]  # dropped below
        segments = render_segments({"messages": turns}, template, tokenizer, where=where)
        return "".join(s.text for s in segments[:-1])
    return render_prompt(dict(record), template, tokenizer)[0]


def prompt_records(data: Any, what: str) -> Any:
    """The records online RL answers, validated as training reads them (no tokenizer needed): each has a
    ``prompt`` (a preference record's, with or without answers) or is an instruction / chat record (its prompt
    part); a plain text record has no prompt. Errors name file:line:field."""
    import os

    from llmtune.data.formats import detect_format
    from llmtune.data.preference import parse_prompt
    from llmtune.data.records import Records, read_records

    if isinstance(data, (str, os.PathLike)):
        records = read_records(os.fspath(data))
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        records = Records(list(data), source=what)
    else:
        raise ConfigError(f"{what} must be a path to .jsonl/.json/.csv or a list of records, not {type(data).__name__}")
    if not records:
        raise ConfigError(f"{records.source}: no prompts")
    for i, record in enumerate(records):
        if isinstance(record, Mapping) and "prompt" in record:
            parse_prompt(dict(record), records.where(i))
        elif detect_format(record, records.where(i)) == "text":
            raise ConfigError(f"{records.where(i)}: a plain text record has no prompt to answer; give 'prompt' "
                              "(or an instruction / chat record)")
    return records


def _prompts(data: Any, tokenizer: Any, options: Any, what: str) -> tuple[list[list[int]], list[dict[str, Any]]]:
    records = prompt_records(data, what)
    where = records.where
    prompts = [list(tokenizer(prompt_text(r, options.template, tokenizer, where(i)),
                              add_special_tokens=False)["input_ids"])[-options.max_length:]
               for i, r in enumerate(records)]
    if not prompts:
        raise ConfigError(f"{what}: no prompts")
    return prompts, records


class _Online(Objective):
    """K sampled answers per prompt, reward-model scores, leave-one-out / group advantages, KL to the reference."""

    algorithm: ClassVar[str] = "rloo"
    Options: ClassVar[type] = OnlineTrainOptions

    def __init__(self) -> None:
        self._reward: tuple[str, Any] | None = None
        self._tokenizer: Any = None
        self._metrics: list[tuple[int, dict[str, float]]] = []

    def check_data(self, data: Any, what: str) -> str:
        records = prompt_records(str(data), what)
        if what == "eval_data":
            self._references(records)
        with_prompt = sum("prompt" in r for r in records)
        return (f"{data}: {len(records)} prompts ({with_prompt} 'prompt' records, {len(records) - with_prompt} "
                "instruction / chat records: their prompt part)")

    def train_data(self, data: Any, tokenizer: Any, options: Any) -> PromptData:
        self._tokenizer = tokenizer
        return PromptData(_prompts(data, tokenizer, options, "data")[0], options.seed)

    def eval_data(self, data: Any, tokenizer: Any, options: Any) -> EvalData:
        """Greedy answers to held-out prompts, scored against their reference answers (``output``/``chosen``)."""
        prompts, records = _prompts(data, tokenizer, options, "eval_data")
        refs = self._references(records)
        n = options.eval_examples or len(prompts)
        return EvalData(prompts=prompts[:n], references=[str(x).strip() for x in refs[:n]])

    def setup(self, model: Any, state: Any) -> None:
        """The reward model loads (and is checked: a trained score head) before anything trains."""
        o = state.options
        if o.reward_model is not None or not getattr(o, "reward_funcs", None):  # reward functions may stand alone
            self.reward_model(o.reward_model, state.acc.device, state.tokenizer)

    def _references(self, records: Any) -> list[str]:
        """Each held-out record's reference answer (``output`` or ``chosen``), to score greedy answers against."""
        refs = [r.get("output", r.get("chosen")) for r in records]
        missing = [i for i, x in enumerate(refs) if not isinstance(x, str)]
        if missing:
            raise ConfigError(f"{records.where(missing[0])}: eval_data of objective {self.name!r}: every record needs a "
                              "reference answer ('output' or 'chosen') to score the greedy answers against")
        return [str(x) for x in refs]

    def collate(self, examples: Sequence[Any], pad_id: int) -> dict[str, Any]:
        import torch

        width = max(len(p) for p in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(examples):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        return {"input_ids": ids, "attention_mask": mask}

    def scored_tokens(self, example: Any) -> int:
        return 1

    def reward_model(self, path: str | None, device: Any, tokenizer: Any) -> Any:
        """The reward model saved at ``path`` (loaded once, frozen, on the policy's device)."""
        if path is None:
            raise ConfigError(f"objective {self.name!r} needs reward_model=DIR: a reward model saved by "
                              f"RewardModel.save (transformers' AutoModelForSequenceClassification)")
        if self._reward is None or self._reward[0] != path:
            from llmtune.models.loading import load_model_and_tokenizer
            from llmtune.trainers.rlhf.reward import RewardModel

            model = load_model_and_tokenizer(path, head="score", head_hint=REWARD_MODEL_HINT)[0].to(device).eval()
            model.requires_grad_(False)
            self._reward = (path, RewardModel(model, tokenizer))
        return self._reward[1]

    def loss(self, backend: Any, model: Any, batch: Mapping[str, Any], ctx: Any) -> Any:
        import torch

        from llmtune.data.templates import stop_token_ids
        from llmtune.trainers.rlhf.online import OnlineOptions, online_step_loss, sample

        o, tok = ctx.options, self._tokenizer
        if not hasattr(model, "disable_adapter"):
            raise InvalidOptionError(f"objective {self.name!r} takes its reference from the model with the adapter "
                                     f"off: use method 'lora' or 'dora' (got {o.method!r})")
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        opts = OnlineOptions(algorithm=self.algorithm, samples=o.samples, kl_coef=o.kl_coef,
                             temperature=o.temperature, max_new_tokens=o.max_new_tokens)
        completions = sample(model, prompts, k=o.samples, pad_id=tok.pad_token_id,
                             stop_ids=stop_token_ids(o.template, tok), max_new_tokens=o.max_new_tokens,
                             temperature=o.temperature)
        rows = [prompts[i // o.samples] + c for i, c in enumerate(completions)]
        rm = self.reward_model(o.reward_model, batch["input_ids"].device, tok)
        scores = torch.tensor(rm.score_ids(rows), dtype=torch.float)
        loss, stats = online_step_loss(model, prompts, completions, scores, opts, tok.pad_token_id)
        if torch.is_grad_enabled():  # not the validation passes
            self._metrics.append((len(prompts), stats))
        return loss * len(prompts)

    def pop_metric_sums(self) -> tuple[float, dict[str, float]]:
        return pop_weighted(self._metrics)


def pop_weighted(metrics: list[tuple[int, dict[str, float]]]) -> tuple[float, dict[str, float]]:
    """(total weight, weighted sum of each statistic) over this step's micro-batches; empties ``metrics``."""
    total = float(sum(n for n, _ in metrics))
    sums = {key: sum(n * float(s[key]) for n, s in metrics) for key in (metrics[0][1] if metrics else {})}
    metrics.clear()
    return total, sums


class Rloo(_Online):
    """RLOO: advantage = reward - mean reward of the other K-1 answers to the same prompt."""

    name: ClassVar[str] = "rloo"
    algorithm: ClassVar[str] = "rloo"


class Grpo(_Online):
    """GRPO: advantage = (reward - group mean) / group std over the K answers to the same prompt."""

    name: ClassVar[str] = "grpo"
    algorithm: ClassVar[str] = "grpo"
