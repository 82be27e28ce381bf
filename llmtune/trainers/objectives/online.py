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
    """`TrainOptions` plus online RL: ``reward_model`` (a saved reward model's directory) and/or ``reward_funcs``
    (reward functions with weights, `llmtune.rewards.combine`), ``samples`` (K answers per prompt), ``kl_coef``,
    ``temperature``, ``loss_type`` (`llmtune.trainers.rlhf.policy_loss`; None: ``sequence`` for rloo, ``dapo``
    for grpo), ``generator`` (``hf`` or ``vllm`` with engine options ``vllm``); answers are at most
    ``max_new_tokens`` long."""

    lr: float = 3e-4
    reward_model: str | None = None
    reward_model_weight: float = 1.0
    reward_funcs: tuple[Any, ...] = ()
    samples: int = 4
    kl_coef: float = 0.05
    temperature: float = 1.0
    loss_type: str | None = None
    generator: Any = "hf"
    vllm: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from llmtune.rewards import combine
        from llmtune.trainers.rlhf.generation import GENERATORS
        from llmtune.trainers.rlhf.online import OnlineOptions
        from llmtune.trainers.rlhf.policy_loss import check_policy_loss

        OnlineOptions(samples=self.samples, kl_coef=self.kl_coef, temperature=self.temperature,
                      max_new_tokens=self.max_new_tokens)
        if isinstance(self.reward_funcs, list):
            object.__setattr__(self, "reward_funcs", tuple(self.reward_funcs))
        combine(self.reward_funcs)  # every item names a known reward with valid options
        if self.loss_type is not None:
            check_policy_loss(self.loss_type)
        if isinstance(self.generator, str) and self.generator not in GENERATORS:
            raise InvalidOptionError(f"option generator={self.generator!r} is not one of {', '.join(GENERATORS)}",
                                     field="generator")
        if self.vllm is not None and not isinstance(self.vllm, dict):
            raise InvalidOptionError(f"option vllm must be a mapping of vLLM engine options, got {self.vllm!r}",
                                     field="vllm")
        if isinstance(self.reward_model_weight, bool) or not isinstance(self.reward_model_weight, (int, float)):
            raise InvalidOptionError(f"option reward_model_weight={self.reward_model_weight!r} must be a number",
                                     field="reward_model_weight")

    def to_dict(self) -> dict[str, Any]:
        """`TrainOptions.to_dict`, with Python reward functions and generator objects named, not serialised."""
        out = super().to_dict()
        out["reward_funcs"] = [item if isinstance(item, (str, dict)) else _describe(item) for item in self.reward_funcs]
        out["generator"] = self.generator if isinstance(self.generator, str) else _describe(self.generator)
        return out


def _describe(obj: Any) -> str:
    """``module.qualname`` of a Python object given as an option (a reward function, a generator)."""
    kind = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', type(obj).__name__)}"


#: what a ``reward_model`` without a trained score head is told
REWARD_MODEL_HINT = ("reward_model must be a trained reward model: train one with trainer: {name: reward} "
                     "(it saves OUTPUT_DIR/model, or an adapter to export with llmtune export --format hf)")


class PromptData(TrainData):
    """Prompts (token ids) in a fresh seeded permutation each epoch; an example is ``(record index, prompt ids)``."""

    def __init__(self, prompts: Sequence[list[int]], seed: int) -> None:
        self.prompts, self.seed, self.num_examples = [list(p) for p in prompts], seed, len(prompts)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()[:16]

    def step_examples(self, step: int, global_batch: int) -> list[Any]:
        import torch

        per_epoch = max(1, len(self.prompts) // global_batch)
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return [(i, self.prompts[i]) for i in order[k * global_batch:(k + 1) * global_batch].tolist()]


def prompt_text(record: Mapping[str, Any], template: str, tokenizer: Any, where: str) -> str:
    """The rendered prompt of a record: its ``prompt`` (or GSM8K's ``question``), or any SFT record's prompt part."""
    from llmtune.data.preference import parse_prompt
    from llmtune.data.templates import render_prompt, render_segments

    key = "prompt" if "prompt" in record else "question" if "question" in record else None
    if key is not None:
        turns = [*parse_prompt({"prompt": record[key]}, where), {"role": "assistant", "content": "."}]  # dropped below
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
        if isinstance(record, Mapping) and ("prompt" in record or "question" in record):  # question: GSM8K's
            parse_prompt({"prompt": record.get("prompt", record.get("question"))}, records.where(i))
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

    #: the policy loss when the options leave ``loss_type`` out
    default_loss_type: ClassVar[str] = "sequence"

    def __init__(self) -> None:
        self._reward: tuple[str, Any] | None = None
        self._tokenizer: Any = None
        self._metrics: list[tuple[int, dict[str, float]]] = []
        self._fields: list[dict[str, Any]] = []
        self._funcs: Any = None
        self._generator: Any = None

    def check_data(self, data: Any, what: str) -> str:
        records = prompt_records(str(data), what)
        if what == "eval_data":
            self._references(records)
        with_prompt = sum("prompt" in r for r in records)
        return (f"{data}: {len(records)} prompts ({with_prompt} 'prompt' records, {len(records) - with_prompt} "
                "instruction / chat records: their prompt part)")

    def train_data(self, data: Any, tokenizer: Any, options: Any) -> PromptData:
        self._tokenizer = tokenizer
        prompts, records = _prompts(data, tokenizer, options, "data")
        self._fields = [{k: v for k, v in r.items() if k != "prompt"} for r in records]
        return PromptData(prompts, options.seed)

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

        width = max(len(p) for _, p in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, p) in enumerate(examples):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        return {"input_ids": ids, "attention_mask": mask,
                "record": torch.tensor([index for index, _ in examples], dtype=torch.long)}

    def scored_tokens(self, example: Any) -> int:
        return 1

    def reward_model(self, path: str | None, device: Any, tokenizer: Any) -> Any:
        """The reward model saved at ``path`` (loaded once, frozen, on the policy's device)."""
        if path is None:
            raise ConfigError(f"objective {self.name!r} needs reward_model=DIR (a reward model saved by "
                              f"RewardModel.save: transformers' AutoModelForSequenceClassification) and/or "
                              f"reward_funcs=[...] (reward functions, e.g. numeric_answer)")
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
        from llmtune.trainers.rlhf.online import OnlineOptions, online_step_loss

        o, tok = ctx.options, self._tokenizer
        if not hasattr(model, "disable_adapter"):
            raise InvalidOptionError(f"objective {self.name!r} takes its reference from the model with the adapter "
                                     f"off: use method 'lora' or 'dora' (got {o.method!r})")
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        opts = OnlineOptions(algorithm=self.algorithm, samples=o.samples, kl_coef=o.kl_coef,
                             temperature=o.temperature, max_new_tokens=o.max_new_tokens,
                             loss_type=o.loss_type or self.default_loss_type)
        generator = self.generator(o)
        generator.sync_weights(model)
        completions = generator.generate(model, prompts, k=o.samples, pad_id=tok.pad_token_id,
                                         stop_ids=stop_token_ids(o.template, tok), max_new_tokens=o.max_new_tokens,
                                         temperature=o.temperature)
        records = [int(i) for i in batch["record"].tolist()] if "record" in batch else [-1] * len(prompts)
        scores, reward_stats = self.rewards(o, prompts, completions, records, batch["input_ids"].device)
        loss, stats = online_step_loss(model, prompts, completions, torch.tensor(scores, dtype=torch.float), opts,
                                       tok.pad_token_id)
        if torch.is_grad_enabled():  # not the validation passes
            self._metrics.append((len(prompts), {**stats, **reward_stats}))
        return loss * len(prompts)

    def generator(self, options: Any) -> Any:
        """The run's `llmtune.trainers.rlhf.generation.Generator` (built once)."""
        if self._generator is None:
            from llmtune.trainers.rlhf.generation import make_generator

            engine = dict(options.vllm or {})
            self._generator = make_generator(options.generator, model_path=engine.pop("model", None), vllm=engine)
        return self._generator

    def rewards(self, options: Any, prompts: list[list[int]], completions: list[list[int]], records: list[int],
                device: Any) -> tuple[list[float], dict[str, float]]:
        """Each completion's total reward: the weighted reward functions plus ``reward_model_weight`` x the reward
        model's score; and the per-function statistics (``rewards/<name>/mean``, ``/std``) for log.jsonl."""
        from llmtune.rewards.combine import combine, reward_statistics

        k, tok = options.samples, self._tokenizer
        if options.reward_model is None and not options.reward_funcs:
            self.reward_model(None, device, tok)  # raises: the run needs one or the other
        totals = [0.0] * len(completions)
        parts: dict[str, list[float | None]] = {}
        if options.reward_funcs:
            if self._funcs is None:
                self._funcs = combine(options.reward_funcs)
            texts = [tok.decode(prompts[i // k], skip_special_tokens=False) for i in range(len(completions))]
            answers = [tok.decode(c, skip_special_tokens=True) for c in completions]
            rows = [self._fields[records[i // k]] if records[i // k] >= 0 else {} for i in range(len(completions))]
            keys = sorted({key for row in rows for key in row})
            totals, parts = self._funcs(texts, answers, {key: [row.get(key) for row in rows] for key in keys})
        if options.reward_model is not None:
            rm = self.reward_model(options.reward_model, device, tok)
            scores = rm.score_ids([prompts[i // k] + c for i, c in enumerate(completions)])
            parts["reward_model"] = list(scores)
            totals = [t + options.reward_model_weight * s for t, s in zip(totals, scores)]
        return totals, reward_statistics(parts) if options.reward_funcs else {}

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
    default_loss_type: ClassVar[str] = "dapo"  # TRL's GRPOConfig default
