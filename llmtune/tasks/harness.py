"""Backend ``"lm-eval"``: the same tasks, run by lm-evaluation-harness (0.4.x) on the same model object.

How it runs offline on local files: our reader parses the local file (any layout `llmtune.tasks.formats`
accepts) into the rows of the harness's Hugging Face dataset, writes them to a temporary JSONL, and hands the
harness *its own* task config (``TaskManager`` YAML, prompts and metrics untouched) with only the data source
replaced: ``dataset_path: json`` + ``dataset_kwargs.data_files`` (the ``datasets`` JSON builder reads local
files without the hub). The model is wrapped as ``HFLM(pretrained=<nn.Module>, tokenizer=<tokenizer>)``.

What cannot run this way, and why:

* ``squad``: the harness's ``squadv2`` is a Python task class with the hub dataset hard-coded
  (``DATASET_PATH = "lighteval/squad_v2"``) and its metric calls ``evaluate.load("squad_v2")``, which downloads
  the metric script from the Hugging Face hub at run time. It would need a subclass overriding the dataset
  and a local copy of the ``squad_v2`` metric script.
* ``generation`` (ROUGE/BLEU on free prompts) and ``perplexity`` on arbitrary text have no single harness task
  with the same definition; they are llmtune-only.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from llmtune.core.errors import BackendUnavailableError, ConfigError
from llmtune.core.interfaces import Task
from llmtune.core.results import TaskResult
from llmtune.tasks import builtin, formats


class HarnessTask(Task):
    """Runs the harness's task of the same name; options and data exactly as the ``llmtune`` backend takes."""

    backend: ClassVar[str] = "lm-eval"
    #: llmtune's task of the same name: its options, reader and data file are used as they are.
    ours: ClassVar[type[builtin.DataTask]]

    def __init__(self, **options: Any) -> None:
        self._ours = self.ours(**options)
        self.options = self._ours.options

    def check_data(self) -> None:
        self._ours.check_data()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("lm_eval") is None:
            return "needs lm-eval: pip install 'llmtune[lm-eval]'"
        return None

    # -- the harness config ---------------------------------------------------------------------------------
    def harness_config(self, docs: list[formats.Doc], tmp: Path) -> dict[str, Any]:
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._yaml_loader import load_yaml

        name = self.ours.harness_task
        entry = TaskManager().task_index.get(name) if name else None
        if entry is None or entry.yaml_path is None:
            raise BackendUnavailableError(f"lm-eval has no YAML task {name!r} for {self.name!r}")
        cfg = copy.deepcopy(load_yaml(entry.yaml_path, resolve_func=True))
        if cfg.get("output_type") == "multiple_choice":
            # the harness computes acc_norm for every multiple-choice task; some configs only list acc
            names = [m.get("metric") for m in cfg.get("metric_list", [])]
            for metric in ("acc", "acc_norm"):
                if metric not in names:
                    cfg.setdefault("metric_list", []).append(
                        {"metric": metric, "aggregation": "mean", "higher_is_better": True})
        return self._local(cfg, docs, tmp)

    def _local(self, cfg: dict[str, Any], docs: list[formats.Doc], tmp: Path) -> dict[str, Any]:
        """``cfg`` with its data replaced by local JSONL files (the evaluated docs and the shot pool)."""
        test = tmp / "test.jsonl"
        _write(test, docs)
        files = {"test": str(test)}
        if self.options.num_fewshot and self.options.fewshot_data:
            shots = tmp / "shots.jsonl"
            _write(shots, self._ours.shot_pool()[0])
            files["train"] = str(shots)
        for key in ("tag", "group", "dataset_name", "validation_split", "training_split", "test_split",
                    "fewshot_split"):
            cfg.pop(key, None)
        cfg.update(task=f"llmtune_{self.name}", dataset_path="json", test_split="test",
                   dataset_kwargs={"data_files": files, "cache_dir": str(tmp / "hf-cache")},
                   fewshot_split="train" if "train" in files else "test", num_fewshot=self.options.num_fewshot)
        if "train" in files:
            cfg["training_split"] = "train"
        return cfg

    # -- running --------------------------------------------------------------------------------------------
    def evaluate(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> TaskResult:
        builtin._no_kwargs(self, kwargs)
        if tokenizer is None:
            raise ConfigError("the lm-eval backend needs the model's tokenizer: pass tokenizer=")
        # every item goes to the file (it is also the shot pool) and the harness applies ``limit`` itself
        docs = formats.READERS[self.ours.fmt](self._ours.data_path())
        with tempfile.TemporaryDirectory(prefix="llmtune-lm-eval-") as tmp:
            cfg = self.harness_config(docs, Path(tmp))
            out = run_harness(model, tokenizer, cfg, batch_size=batch_size, seed=self.options.seed,
                              limit=self.options.limit)
        return self._result(out, cfg["task"])

    def _result(self, out: dict[str, Any], task: str) -> TaskResult:
        raw = out["results"][task]
        values: dict[str, float] = {}
        errors: dict[str, float] = {}
        for key, value in raw.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metric.endswith("_stderr")
            metric = metric.removesuffix("_stderr")
            if filt not in ("none", ""):
                metric = f"{metric}_{filt}"
            (errors if stderr else values)[metric] = float(value) if value != "N/A" else math.nan
        per_item = _per_item(out.get("samples", {}).get(task, []))
        config = {**self._ours.result({}, []).config, "backend": self.backend,
                  "harness_task": self.ours.harness_task, "lm_eval_version": _version()}
        return TaskResult(self.name, self.backend, values, errors, len(per_item), per_item, config)


def _write(path: Path, docs: list[formats.Doc]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(formats.clean(d), ensure_ascii=False) + "\n")


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


def _per_item(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per doc from the harness's samples (it logs one sample per doc *and filter*)."""
    rows: dict[int, dict[str, Any]] = {}
    for sample in samples:
        row = rows.setdefault(sample["doc_id"], {"doc_id": sample["doc_id"]})
        filt = sample.get("filter", "none")
        suffix = "" if filt in ("none", "", None) else f"_{filt}"
        for key in ("acc", "acc_norm", "exact_match"):
            if key in sample:
                row[key + suffix] = float(sample[key])
        resps = sample.get("resps") or []
        if resps and isinstance(resps[0][0], (list, tuple)):  # loglikelihood: [[(ll, greedy)], ...]
            row["loglikelihoods"] = [float(r[0][0]) for r in resps]
            row["is_greedy"] = [bool(r[0][1]) for r in resps]
        elif resps:
            row["output"] = resps[0][0]
            row["filtered" + suffix] = sample.get("filtered_resps")
    return [rows[k] for k in sorted(rows)]


def run_harness(model: Any, tokenizer: Any, cfg: dict[str, Any], *, batch_size: int, seed: int,
                limit: int | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``HFLM(pretrained=model)`` and one task config; the raw output."""
    import datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    datasets.disable_progress_bars()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # bootstrap_iters > 0 so that the harness reports stderr (closed form for the mean metrics used here)
    out = lm_eval.simple_evaluate(model=lm, tasks=[cfg], log_samples=True, fewshot_random_seed=seed,
                                  num_fewshot=cfg.get("num_fewshot"), bootstrap_iters=100, verbosity="ERROR",
                                  limit=limit)
    if out is None:
        raise BackendUnavailableError("lm-eval returned no results (not the main process?)")
    return out


class MMLUHarness(HarnessTask):
    name: ClassVar[str] = "mmlu"
    ours: ClassVar[type[builtin.DataTask]] = builtin.MMLUTask

    def harness_config(self, docs: list[formats.Doc], tmp: Path) -> dict[str, Any]:
        subjects = sorted({str(d.get("subject", "")) for d in docs})
        if len(subjects) != 1:
            raise ConfigError(f"the lm-eval backend runs one MMLU subject per file; this file has {subjects}")
        cfg = super().harness_config(docs, tmp)
        cfg["description"] = formats.mmlu_description(subjects[0])
        return cfg


def _harness_for(ours: type[builtin.DataTask]) -> type[HarnessTask]:
    """The harness twin of a built-in task that needs nothing but its name (``FooTask`` -> ``FooHarness``)."""
    cls_name = ours.__name__.removesuffix("Task") + "Harness"
    return type(cls_name, (HarnessTask,), {"name": ours.name, "ours": ours, "__module__": __name__,
                                           "__qualname__": cls_name})


HellaSwagHarness, ArcEasyHarness, ArcChallengeHarness, BoolQHarness, TruthfulQAMC1Harness = (
    _harness_for(ours) for ours in (builtin.HellaSwagTask, builtin.ArcEasyTask, builtin.ArcChallengeTask,
                                    builtin.BoolQTask, builtin.TruthfulQAMC1Task))


class Gsm8kHarness(HarnessTask):
    name: ClassVar[str] = "gsm8k"
    ours: ClassVar[type[builtin.DataTask]] = builtin.Gsm8kTask

    def harness_config(self, docs: list[formats.Doc], tmp: Path) -> dict[str, Any]:
        cfg = super().harness_config(docs, tmp)
        gen = dict(cfg.get("generation_kwargs") or {})
        gen["max_gen_toks"] = self.options.max_new_tokens
        cfg["generation_kwargs"] = gen
        return cfg


class KopitiamMCHarness(HarnessTask):
    """Our made-up task as a harness config: ARC's prompt and metrics over ``question``/``choices``/``label``."""

    name: ClassVar[str] = "kopitiam-mc"
    ours: ClassVar[type[builtin.DataTask]] = builtin.KopitiamMCTask

    def harness_config(self, docs: list[formats.Doc], tmp: Path) -> dict[str, Any]:
        if self.options.template is not None:
            raise ConfigError("the lm-eval backend runs kopitiam-mc with its plain prompt only (template=None)")
        return self._plain_mc(docs, tmp)

    def _plain_mc(self, docs: list[formats.Doc], tmp: Path) -> dict[str, Any]:
        """ARC's "Question: ...\\nAnswer:" prompt and acc/acc_norm over ``question``/``choices``/``label``."""
        cfg = {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
               "doc_to_target": "{{label}}", "doc_to_choice": "{{choices}}",
               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
               "metadata": {"version": 1.0}}
        return self._local(cfg, docs, tmp)


class GenericMCHarness(KopitiamMCHarness):
    name: ClassVar[str] = "multiple-choice"
    ours: ClassVar[type[builtin.DataTask]] = builtin.GenericMCTask

    def harness_config(self, docs: list[formats.Doc], tmp: Path) -> dict[str, Any]:
        return self._plain_mc(docs, tmp)


class SquadHarness(HarnessTask):
    name: ClassVar[str] = "squad"
    ours: ClassVar[type[builtin.DataTask]] = builtin.SquadTask

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return ("lm-eval's squadv2 cannot run offline on a local file: it is a Python task class with the hub "
                "dataset hard-coded (DATASET_PATH='lighteval/squad_v2') and its metric calls "
                "evaluate.load('squad_v2'), which downloads the metric script from the Hugging Face hub; "
                "it would need a subclass overriding the dataset and a local copy of that metric script")

    def harness_config(self, docs: list[formats.Doc], tmp: Path) -> dict[str, Any]:
        raise BackendUnavailableError(str(self.unavailable_reason()))


HARNESS_TASKS: dict[str, type[HarnessTask]] = {cls.name: cls for cls in (
    MMLUHarness, HellaSwagHarness, ArcEasyHarness, ArcChallengeHarness, BoolQHarness, TruthfulQAMC1Harness,
    Gsm8kHarness, KopitiamMCHarness, GenericMCHarness, SquadHarness)}
