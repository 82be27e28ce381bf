"""llmtune's own task backends (backend ``"llmtune"``): the harness's prompts and metrics, our batched scorer.

Kinds of scoring: `MultipleChoiceTask` (log-likelihood of each choice; acc, acc_norm), `Gsm8kTask`
(generate until a stop string, extract the answer, exact match), `SquadTask` (generate, SQuAD exact/F1),
`PerplexityTask` (rolling log-likelihood of raw text) and `GenerationTask` (generate, ROUGE/BLEU from
`llmtune.metrics`). Each subclass only names its data format, bundled made-up file and harness task.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.interfaces import Task
from llmtune.core.results import TaskResult
from llmtune.tasks import formats, metrics
from llmtune.tasks.formats import Doc, MCItem

BUNDLED = "llmtune.tasks"


def bundled_path(name: str) -> Path:
    """The path of a bundled made-up data file (``llmtune/tasks/bundled/NAME``)."""
    return Path(str(resources.files(BUNDLED).joinpath("bundled").joinpath(name)))


def _check_int(field: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidOptionError(f"option {field}={value!r} must be an int >= {minimum}", field=field)


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """``data``: the local file (None: the bundled made-up items); ``num_fewshot`` shots drawn with ``seed``
    from ``fewshot_data`` (None: the data file itself, the item excluded); ``limit``: the first N items."""

    data: str | None = None
    num_fewshot: int = 0
    fewshot_data: str | None = None
    seed: int = 1234
    limit: int | None = None

    def __post_init__(self) -> None:
        for field in ("data", "fewshot_data"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise InvalidOptionError(f"option {field}={value!r} must be a file path", field=field)
        _check_int("num_fewshot", self.num_fewshot, 0)
        _check_int("seed", self.seed, 0)
        if self.limit is not None:
            _check_int("limit", self.limit, 1)


class DataTask(Task):
    """A task over one local file in a known format (`llmtune.tasks.formats`)."""

    backend: ClassVar[str] = "llmtune"
    Options: ClassVar[type] = TaskOptions
    fmt: ClassVar[str] = ""
    bundled: ClassVar[str] = ""
    #: The lm-evaluation-harness task whose YAML config this task reproduces (None: none).
    harness_task: ClassVar[str | None] = None
    #: How shots are chosen: "random" (the harness's default sampler) or "first_n" (MMLU's).
    sampler: ClassVar[str] = "random"

    def data_path(self) -> Path:
        return Path(self.options.data) if self.options.data else bundled_path(self.bundled)

    def docs(self) -> list[Doc]:
        docs = formats.READERS[self.fmt](self.data_path())
        if not docs:
            raise ConfigError(f"{self.data_path()}: no items")
        return docs[: self.options.limit] if self.options.limit else docs

    def check_data(self) -> None:
        self.docs()
        if self.options.num_fewshot and self.options.fewshot_data:
            self.shot_pool()

    def shot_pool(self) -> tuple[list[Doc], bool]:
        """(docs shots are drawn from, whether that is the evaluated file itself)."""
        if self.options.fewshot_data:
            return formats.READERS[self.fmt](Path(self.options.fewshot_data)), False
        return formats.READERS[self.fmt](self.data_path()), True

    def shots(self, docs: Sequence[Doc]) -> list[list[Doc]]:
        """The few-shot examples of each doc, chosen like the harness's ``ContextSampler``.

        "random": one ``random.Random(seed)`` for the whole task; for each doc in order, sample
        ``num_fewshot`` (+1 when shots come from the evaluated file) and drop the doc itself. "first_n": the
        first ``num_fewshot`` docs of the pool.
        """
        k = self.options.num_fewshot
        if k == 0:
            return [[] for _ in docs]
        pool, same = self.shot_pool()
        if len(pool) < k + (1 if same else 0):
            raise ConfigError(f"{k}-shot needs at least {k + int(same)} items to draw from; the pool has {len(pool)}")
        if self.sampler == "first_n":
            return [[d for d in pool if not same or formats.clean(d) != formats.clean(doc)][:k] for doc in docs]
        rnd = random.Random(self.options.seed)
        out = []
        for doc in docs:
            drawn = rnd.sample(pool, k + 1 if same else k)
            out.append([d for d in drawn if formats.clean(d) != formats.clean(doc)][:k])
        return out

    def fewshot_contexts(self, docs: Sequence[Doc], text: Callable[[Doc], str],
                         answer: Callable[[Doc], str]) -> list[str]:
        """Each doc's prompt: its shots as ``text(shot) + " " + answer(shot)`` blocks, then ``text(doc)``."""
        return ["".join(text(s) + " " + answer(s) + "\n\n" for s in shots) + text(doc)
                for doc, shots in zip(docs, self.shots(docs))]

    def description(self, doc: Doc) -> str:
        return ""

    def result(self, metrics_per_item: dict[str, list[float]], per_item: list[dict[str, Any]],
               extra_metrics: dict[str, float] | None = None) -> TaskResult:
        values: dict[str, float] = {}
        errors: dict[str, float] = {}
        for key, vals in metrics_per_item.items():
            values[key], errors[key] = metrics.mean_and_stderr(vals)
        values.update(extra_metrics or {})
        config = {"task": self.name, "backend": self.backend, "data": str(self.data_path()),
                  "num_fewshot": self.options.num_fewshot, "seed": self.options.seed,
                  "fewshot_data": self.options.fewshot_data, "limit": self.options.limit}
        return TaskResult(self.name, self.backend, values, errors, len(per_item), per_item, config)


def as_scorer(model: Any, tokenizer: Any, batch_size: int, progress: Callable[[int, int], None] | None) -> Any:
    """``model`` if it already is a `Scorer`, else a `CausalLMScorer` over ``model`` and ``tokenizer``."""
    from llmtune.tasks.scoring import CausalLMScorer, Scorer

    if isinstance(model, Scorer):
        return model
    if tokenizer is None:
        raise ConfigError("evaluating an nn.Module needs its tokenizer: pass tokenizer=")
    return CausalLMScorer(model, tokenizer, batch_size=batch_size, progress=progress)


class MultipleChoiceTask(DataTask):
    """Log-likelihood of ``target_delimiter + choice`` after the prompt; acc and acc_norm as the harness."""

    def item(self, doc: Doc, index: int) -> MCItem:
        return formats.MC_TEMPLATES[self.fmt](doc, index)

    def context(self, doc: Doc, item: MCItem, shots: Sequence[Doc]) -> str:
        parts = []
        for j, shot in enumerate(shots):
            s = self.item(shot, j)
            parts.append(s.text + s.target_delimiter + s.choices[s.gold])
        fewshot = "".join(p + "\n\n" for p in parts)
        return self.description(doc) + fewshot + item.text

    def evaluate(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> TaskResult:
        _no_kwargs(self, kwargs)
        scorer = as_scorer(model, tokenizer, batch_size, progress)
        docs = self.docs()
        items = [self.item(d, i) for i, d in enumerate(docs)]
        contexts = [self.context(d, it, shots) for d, it, shots in zip(docs, items, self.shots(docs))]
        requests = [(ctx, it.target_delimiter + c) for ctx, it in zip(contexts, items) for c in it.choices]
        scores = scorer.loglikelihood(requests)
        per_item, acc, acc_norm = [], [], []
        pos = 0
        for i, (it, ctx) in enumerate(zip(items, contexts)):
            got = scores[pos:pos + len(it.choices)]
            pos += len(it.choices)
            lls = [ll for ll, _ in got]
            s = metrics.mc_scores(lls, it.choices, it.gold)
            acc.append(float(s["acc"]))
            acc_norm.append(float(s["acc_norm"]))
            per_item.append({"doc_id": i, "id": it.id, "gold": it.gold, **s, "loglikelihoods": lls,
                             "is_greedy": [g for _, g in got], "context": ctx})
        return self.result({"acc": acc, "acc_norm": acc_norm}, per_item)


def _no_kwargs(task: Task, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise InvalidOptionError(f"{task.describe()}.evaluate() does not take {', '.join(sorted(kwargs))}")


class MMLUTask(MultipleChoiceTask):
    name: ClassVar[str] = "mmlu"
    fmt: ClassVar[str] = "mmlu"
    bundled: ClassVar[str] = "mmlu_kopitiam_lore_test.csv"
    harness_task: ClassVar[str | None] = "mmlu_anatomy"
    sampler: ClassVar[str] = "first_n"

    def description(self, doc: Doc) -> str:
        return formats.mmlu_description(str(doc.get("subject", "")))


def _mc_task(cls_name: str, name: str, fmt: str, bundled: str,
             base: type[MultipleChoiceTask] = MultipleChoiceTask) -> type[MultipleChoiceTask]:
    """A multiple-choice task that is only a name, a file format and a bundled sample; lm-eval has it under
    the same name."""
    attrs = {"name": name, "fmt": fmt, "bundled": bundled, "harness_task": name, "__module__": __name__,
             "__qualname__": cls_name}
    return type(cls_name, (base,), attrs)


HellaSwagTask = _mc_task("HellaSwagTask", "hellaswag", "hellaswag", "hellaswag_made_up.jsonl")
ArcEasyTask = _mc_task("ArcEasyTask", "arc_easy", "arc", "arc_made_up.jsonl")
ArcChallengeTask = _mc_task("ArcChallengeTask", "arc_challenge", "arc", "arc_made_up.jsonl", base=ArcEasyTask)
BoolQTask = _mc_task("BoolQTask", "boolq", "boolq", "boolq_made_up.jsonl")
TruthfulQAMC1Task = _mc_task("TruthfulQAMC1Task", "truthfulqa_mc1", "truthfulqa", "truthfulqa_made_up.json")


@dataclasses.dataclass(frozen=True)
class KopitiamOptions(TaskOptions):
    """``template``: wrap each question in an llmtune chat template (e.g. "llama3", as the demo trains) and
    score the choices right after the assistant header (no space delimiter); None: "Question: ...\\nAnswer:"."""

    template: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.template is not None:
            from llmtune.core.options import check_choice
            from llmtune.data.templates import TEMPLATES

            check_choice("template", self.template, TEMPLATES)


class KopitiamMCTask(MultipleChoiceTask):
    """Made-up: which plain-English description is this kopitiam order? (4 choices, seeded distractors)."""

    name: ClassVar[str] = "kopitiam-mc"
    fmt: ClassVar[str] = "mc"
    bundled: ClassVar[str] = "kopitiam_mc.jsonl"
    Options: ClassVar[type] = KopitiamOptions
    _tokenizer: Any = None

    def item(self, doc: Doc, index: int) -> MCItem:
        plain = super().item(doc, index)
        if self.options.template is None:
            return plain
        from llmtune.data.templates import render_prompt

        record = {"instruction": f"What is {doc['question']}?", "input": "", "output": doc["choices"][doc["label"]]}
        prompt, _ = render_prompt(record, self.options.template, self._tokenizer)
        return dataclasses.replace(plain, text=prompt, target_delimiter="")

    def evaluate(self, model: Any, tokenizer: Any = None, **kwargs: Any) -> TaskResult:
        self._tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        return super().evaluate(model, tokenizer, **kwargs)


class GenericMCTask(MultipleChoiceTask):
    """Any multiple-choice data as llmtune JSONL (``question``, ``choices``, ``label``), prompted
    "Question: {question}\nAnswer:" with " {choice}" continuations: the harness's ARC/PIQA/SciQ-style prompt."""

    name: ClassVar[str] = "multiple-choice"
    fmt: ClassVar[str] = "mc"
    bundled: ClassVar[str] = "kopitiam_mc.jsonl"


@dataclasses.dataclass(frozen=True)
class GenOptions(TaskOptions):
    """Plus ``max_new_tokens``, the longest greedy answer."""

    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("max_new_tokens", self.max_new_tokens, 1)


class Gsm8kTask(DataTask):
    """The harness's ``gsm8k``: "Question: ...\\nAnswer:", greedy until "Question:", strict and flexible match."""

    name: ClassVar[str] = "gsm8k"
    fmt: ClassVar[str] = "gsm8k"
    bundled: ClassVar[str] = "gsm8k_made_up.jsonl"
    harness_task: ClassVar[str | None] = "gsm8k"
    Options: ClassVar[type] = GenOptions
    until: ClassVar[tuple[str, ...]] = ("Question:", "</s>", "<|im_end|>")

    def evaluate(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> TaskResult:
        _no_kwargs(self, kwargs)
        scorer = as_scorer(model, tokenizer, batch_size, progress)
        docs = self.docs()
        contexts = self.fewshot_contexts(docs, formats.gsm8k_text, lambda s: s["answer"])
        outputs = scorer.generate_until([(c, list(self.until), self.options.max_new_tokens) for c in contexts])
        strict, flexible, per_item = [], [], []
        for i, (doc, out) in enumerate(zip(docs, outputs)):
            s = metrics.harness_exact_match(metrics.extract_strict(out), doc["answer"])
            f = metrics.harness_exact_match(metrics.extract_flexible(out), doc["answer"])
            strict.append(s)
            flexible.append(f)
            per_item.append({"doc_id": i, "output": out, "strict": metrics.extract_strict(out),
                             "flexible": metrics.extract_flexible(out), "exact_match_strict": s,
                             "exact_match_flexible": f, "target": doc["answer"]})
        return self.result({"exact_match_strict": strict, "exact_match_flexible": flexible}, per_item)


class SquadTask(DataTask):
    """Extractive QA: the harness's squadv2 prompt, greedy until a newline, the official exact/F1 (0-100)."""

    name: ClassVar[str] = "squad"
    fmt: ClassVar[str] = "squad"
    bundled: ClassVar[str] = "squad_made_up.json"
    harness_task: ClassVar[str | None] = None
    Options: ClassVar[type] = GenOptions

    def evaluate(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> TaskResult:
        _no_kwargs(self, kwargs)
        scorer = as_scorer(model, tokenizer, batch_size, progress)
        docs = self.docs()
        contexts = self.fewshot_contexts(docs, formats.squad_text,
                                         lambda s: (s["answers"]["text"] or ["unanswerable"])[0])
        outputs = scorer.generate_until([(c, ["\n"], self.options.max_new_tokens) for c in contexts])
        exact, f1, per_item = [], [], []
        for i, (doc, out) in enumerate(zip(docs, outputs)):
            pred = out.strip()
            s = metrics.squad_scores(doc["answers"]["text"], pred)
            exact.append(100.0 * s["exact"])
            f1.append(100.0 * s["f1"])
            per_item.append({"doc_id": i, "id": doc["id"], "prediction": pred, "answers": doc["answers"]["text"],
                             "exact": exact[-1], "f1": f1[-1]})
        return self.result({"exact": exact, "f1": f1}, per_item)


class PerplexityTask(DataTask):
    """Rolling log-likelihood of raw text (windows of the model's length): token/word/byte perplexity, bpb."""

    name: ClassVar[str] = "perplexity"
    fmt: ClassVar[str] = "text"
    bundled: ClassVar[str] = "text_made_up.jsonl"

    def evaluate(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> TaskResult:
        _no_kwargs(self, kwargs)
        if self.options.num_fewshot:
            raise InvalidOptionError("perplexity takes no shots (num_fewshot must be 0)")
        scorer = as_scorer(model, tokenizer, batch_size, progress)
        texts = [str(d["text"]) for d in self.docs()]
        scored = scorer.loglikelihood_rolling(texts)
        lls = [ll for ll, _ in scored]
        tokens = [n for _, n in scored]
        per_item = [{"doc_id": i, "loglikelihood": ll, "tokens": n, "words": metrics.count_words(t),
                     "bytes": len(t.encode("utf-8"))} for i, (t, ll, n) in enumerate(zip(texts, lls, tokens))]
        result = self.result({}, per_item, metrics.perplexity_metrics(lls, tokens, texts))
        result.stderr.update({k: float("nan") for k in result.metrics})  # corpus ratios: no per-item mean
        return result


@dataclasses.dataclass(frozen=True)
class GenerationOptions(GenOptions):
    """Plus ``until``: stop strings (default: a newline; one string is one stop string)."""

    max_new_tokens: int = 64
    until: tuple[str, ...] = ("\n",)

    def __post_init__(self) -> None:
        super().__post_init__()
        stops = (self.until,) if isinstance(self.until, str) else self.until  # one string is one stop, as the harness
        if not isinstance(stops, (list, tuple)) or not stops or not all(isinstance(s, str) and s for s in stops):
            raise InvalidOptionError(f"option until={self.until!r} must be a stop string or a list of non-empty "
                                     "stop strings", field="until")
        object.__setattr__(self, "until", tuple(stops))


class GenerationTask(DataTask):
    """Greedy answers to ``prompt`` scored against ``reference`` with llmtune's ROUGE and BLEU."""

    name: ClassVar[str] = "generation"
    fmt: ClassVar[str] = "generation"
    bundled: ClassVar[str] = "generation_made_up.jsonl"
    Options: ClassVar[type] = GenerationOptions

    def evaluate(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> TaskResult:
        from llmtune.core.registry import get_metric

        _no_kwargs(self, kwargs)
        scorer = as_scorer(model, tokenizer, batch_size, progress)
        docs = self.docs()
        contexts = [str(d["prompt"]) for d in docs]
        outputs = [o.strip() for o in scorer.generate_until(
            [(c, list(self.options.until), self.options.max_new_tokens) for c in contexts])]
        refs = [str(d["reference"]) for d in docs]
        rouge = get_metric("rouge", rouge_types=("rouge1", "rougeL")).compute(outputs, refs)
        bleu = get_metric("bleu").compute(outputs, refs)
        per = {"rouge1": list(rouge.per_example["rouge1_fmeasure"]), "rougeL": list(rouge.per_example["rougeL_fmeasure"]),
               "bleu": list(bleu.per_example["bleu"])}
        per_item = [{"doc_id": i, "prediction": o, "reference": r, **{k: float(v[i]) for k, v in per.items()}}
                    for i, (o, r) in enumerate(zip(outputs, refs))]
        result = self.result({k: [float(x) for x in v] for k, v in per.items()}, per_item)
        result.metrics["bleu_corpus"] = float(bleu.scores["bleu"])
        return result


#: name -> class of every built-in task of backend "llmtune".
BUILTIN_TASKS: dict[str, type[DataTask]] = {cls.name: cls for cls in (
    MMLUTask, HellaSwagTask, ArcEasyTask, ArcChallengeTask, BoolQTask, TruthfulQAMC1Task, KopitiamMCTask,
    GenericMCTask, Gsm8kTask, SquadTask, PerplexityTask, GenerationTask)}
