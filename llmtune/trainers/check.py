"""`check_config`: everything about a training config that can be checked without training (``--check``).

The model (a local directory's ``config.json``, or a memory preset for a hub id; for ``reward`` its score head),
the tokenizer files, the training and evaluation data (read and validated record by record as the objective reads
them: `llmtune.trainers.objectives.base.Objective.check_data`), the ``reward_model`` of rloo / grpo, the template,
the options (already checked when the config was loaded: ``lr`` finite, ...), the support matrix, and the memory
estimate of *that* config with a fit verdict per GPU (`llmtune.trainers._memory_gate.estimate_for_config`).
No torch, no model weights, nothing printed: the CLI renders the `ConfigCheck`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError, LlmtuneError


@dataclasses.dataclass
class Check:
    """One check: ``name`` (model, data, ...), passed or not, and what was seen (or what is wrong)."""

    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class ConfigCheck:
    """The outcome of `check_config`: the checks, the memory estimate and one verdict row per GPU."""

    checks: list[Check]
    estimate: Any = None                 #: `llmtune.memory.TrainingEstimate`, None when it could not be made
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    gpu: str | None = None               #: the GPU the verdict is for (None: every known GPU, informative)

    @property
    def ok(self) -> bool:
        """Every check passed and, when a GPU was named, the config fits it."""
        fits = all(r["fits"] for r in self.rows) if self.gpu is not None else True
        return all(c.ok for c in self.checks) and fits


def _attempt(checks: list[Check], name: str, fn: Any) -> Any:
    """Run ``fn`` (returns (detail, value)); record a passed check or the one-line error."""
    try:
        detail, value = fn()
    except LlmtuneError as exc:
        checks.append(Check(name, False, str(exc)))
        return None
    except (OSError, ValueError) as exc:
        checks.append(Check(name, False, f"{type(exc).__name__}: {exc}"))
        return None
    checks.append(Check(name, True, detail))
    return value


def _check_model(model: str) -> tuple[str, dict[str, Any] | None]:
    from llmtune.core.errors import ConfigError
    from llmtune.models.loading import gguf_path, model_config

    path = Path(model)
    gguf = gguf_path(path)
    if gguf is not None:
        data = model_config(gguf)
        return f"{model}: {data.get('model_type')}, GGUF file {gguf.name} ({gguf.stat().st_size} bytes)", data
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"model {model}: directory has no config.json")
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model {cfg}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise ConfigError(f"model {cfg}: no 'model_type' (not a transformers config)")
        weights = sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.bin"))
        what = f"{len(weights)} weight file(s)" if weights else "config.json only (no weights: estimate only)"
        return f"{model}: {data['model_type']}, {what}", data
    if path.is_absolute() or model.startswith((".", "~")):
        raise ConfigError(f"model {model}: no such directory")
    return f"{model}: a hub id (not checked offline; it is downloaded when training starts)", None


def _check_tokenizer(directory: str | None, template: str) -> tuple[str, None]:
    """The tokenizer files exist; template 'tokenizer' needs a chat_template."""
    from llmtune.core.errors import ConfigError
    from llmtune.models.loading import gguf_path

    if directory is not None and gguf_path(directory) is not None:
        return f"template {template!r} (the tokenizer and chat template inside the GGUF file)", None
    if directory is None or not Path(directory).is_dir():
        return f"template {template!r} (tokenizer not checked: not a local directory)", None
    d = Path(directory)
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    present = [n for n in names if (d / n).is_file()]
    if not present:
        raise ConfigError(f"tokenizer {d}: none of {', '.join(names)} found")
    chat = False
    if (d / "tokenizer_config.json").is_file():
        try:
            tc = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"tokenizer {d / 'tokenizer_config.json'}: not valid JSON ({exc.msg})") from None
        chat = bool(tc.get("chat_template")) or (d / "chat_template.jinja").is_file()
    if template == "tokenizer" and not chat:
        raise ConfigError(f"template 'tokenizer' needs a chat_template; tokenizer {d} has none "
                          "(choose 'llama3', 'chatml' or 'alpaca')")
    return f"{d}: {', '.join(present)}; template {template!r}", None


#: rows of a streamed source that ``--check`` reads (a streamed source is not read in full before training)
STREAM_CHECK_ROWS = 100


def _check_sources(spec: Any, what: str, objective: str) -> tuple[str, None]:
    """Each source of a `DataSpec`: its first rows read and validated (missing columns named), its records
    counted (a streamed or hub source: only the rows read), and, for a mixture, what each gives one epoch."""
    from collections import Counter
    from itertools import islice

    from llmtune.data.formats import detect_format
    from llmtune.data.preference import parse_preference
    from llmtune.data.sources import iter_source, mixture_counts

    parts, sizes = [], []
    for src in spec.sources:
        if src.kind == "hub":   # a hub source is peeked at, never downloaded in full by a check
            src = dataclasses.replace(src, streaming=True)
        rows = iter_source(src, what)
        if src.streaming:
            rows = islice(rows, STREAM_CHECK_ROWS)
        formats: Counter[str] = Counter()
        n = 0
        for where, record in rows:
            n += 1
            if objective == "pretrain":
                field = src.text_field or "text"
                if not isinstance(record.get(field), str):
                    raise ConfigError(f"{where}: no string field {field!r} (name the text column with text_field)")
            elif objective == "sft":
                formats[detect_format(record, where)] += 1
            elif objective in ("dpo", "reward"):
                formats[type(parse_preference(record, where)).__name__] += 1
        if n == 0:
            raise ConfigError(f"{what}: {src.name}: no records")
        sizes.append(n)
        kinds = f" ({', '.join(f'{c} {k}' for k, c in formats.items())})" if formats else ""
        parts.append(f"{src.name}: {'first ' if src.streaming else ''}{n} records{kinds}")
    if len(spec.sources) > 1 and objective != "pretrain" and not spec.streaming and \
            all(s.kind != "hub" for s in spec.sources):
        counts = mixture_counts(sizes, spec.sources)
        parts.append("mixture per epoch: " + ", ".join(f"{s.name} {c}" for s, c in zip(spec.sources, counts)))
    if spec.val_size is not None:
        parts.append(f"val_size {spec.val_size} ({'held out' if spec.part == 'val' else 'carved from data'})")
    return "; ".join(parts), None


def _check_records(path: Any, what: str, objective: str) -> tuple[str, None]:
    """Parse ``path`` as the objective reads it (sft: every record validated, its format named)."""
    from collections import Counter

    from llmtune.data.sources import as_spec

    spec = as_spec(path)
    if spec is not None:
        return _check_sources(spec, what, objective)
    if objective == "pretrain":
        from llmtune.data import text_sources

        sources = text_sources(path, what)
        size = sum(s.path.stat().st_size for s in sources if s.path is not None)
        return f"{path}: {len(sources)} text source(s), {size:,} bytes", None
    if objective != "sft":   # another objective (dpo, reward, rloo, grpo, a plugin's): read as it reads its data
        from llmtune.trainers.objectives import get_objective

        return get_objective(objective).check_data(path, what), None
    from llmtune.data import load_records
    from llmtune.data.formats import detect_format

    records = load_records(path)
    formats = Counter(detect_format(r, records.where(i)) for i, r in enumerate(records))
    kinds = ", ".join(f"{n} {k}" for k, n in formats.items())
    return f"{path}: {len(records)} records ({kinds})", None


def _check_reward_model(path: str | None, objective: str) -> tuple[str, None]:
    """``reward_model`` of rloo / grpo: a saved 1-label sequence classifier whose weights hold its score head."""
    from llmtune.core.errors import ConfigError
    from llmtune.trainers.objectives.online import REWARD_MODEL_HINT

    if path is None:
        raise ConfigError(f"objective {objective!r} needs reward_model: DIR under trainer: (a reward model: "
                          "train one with trainer: {name: reward})")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"reward_model {path}: no such model directory (no config.json)")
    return _check_score_head(path, "reward_model", REWARD_MODEL_HINT)


def _check_score_head(path: str, what: str, hint: str) -> tuple[str, None]:
    """The model directory ``path`` is a 1-label ``XForSequenceClassification`` whose safetensors hold the head."""
    from llmtune.core.errors import ConfigError
    from llmtune.models.loading import safetensors_names

    d = Path(path)
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    archs = [str(a) for a in config.get("architectures") or []]
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"{what} {path}: a {', '.join(archs) or config.get('model_type')} has no score head; {hint}")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise ConfigError(f"{what} {path}: {archs[0]} with {labels} labels; a reward model has one output")
    names = [n for f in sorted(d.glob("*.safetensors")) for n in safetensors_names(f)]
    roots = {n.split(".")[0] for n in names}
    backbone = max(roots, key=lambda r: sum(n.startswith(r + ".") for n in names)) if roots else ""
    if names and not roots - {backbone, "lm_head"}:
        raise ConfigError(f"{what} {path}: its weights hold no score head (only {backbone}.*): transformers "
                          f"would initialise it at random; {hint}")
    return f"{path}: {archs[0]}, 1 label, score head in its weights", None


def _check_support(trainer: Any) -> tuple[str, None]:
    from llmtune.trainers.matrix import check_supported

    opts = trainer.options
    check_supported(trainer, opts)
    q = f" on a {opts.quantizer.name} base" if opts.quantizer is not None else ""
    return f"{trainer.describe()}: method {opts.method!r}{q} is supported", None


def _check_fsdp(processes: int) -> tuple[str, None]:
    from llmtune.core.errors import ConfigError

    if processes < 2:
        raise ConfigError("distributed='fsdp' shards over 2 or more processes; check with --processes N "
                          "(the number you launch)")
    return f"fsdp over {processes} processes (weights, gradients, optimizer states sharded)", None


def check_config(config: Any, gpu: str | int | None = None, *, processes: int = 1,
                 spec: Any = None) -> ConfigCheck:
    """Check a `TrainConfig` (or a YAML path) without training; see the module doc.

    ``gpu``: the GPU to judge the fit on (a name from ``llmtune.memory.GPUS`` or bytes); the result's ``ok``
    is False when the config does not fit it. ``processes``: data-parallel processes (batch per process).
    """
    from llmtune.trainers._config import load_config
    from llmtune.trainers._memory_gate import estimate_for_config

    if isinstance(config, (str, Path)):
        config = load_config(config)
    trainer, opts = config.trainer, config.trainer.options
    objective = getattr(type(trainer), "objective", "sft")
    checks = [Check("options", True, f"{len(dataclasses.fields(opts))} options valid (lr={opts.lr:g}, "
                                     f"batch_size={opts.batch_size}, max_length={opts.max_length})")]
    _attempt(checks, "support", lambda: _check_support(trainer))
    if getattr(opts, "distributed", "ddp") == "fsdp":
        _attempt(checks, "distributed", lambda: _check_fsdp(processes))
    if _attempt(checks, "model", lambda: _check_model(config.model)) and objective == "reward" \
            and not getattr(opts, "add_score_head", False):
        from llmtune.trainers.objectives.dpo import ADD_SCORE_HEAD_HINT

        _attempt(checks, "score_head", lambda: _check_score_head(config.model, "model", ADD_SCORE_HEAD_HINT))
    tokenizer_dir = config.tokenizer or config.model
    _attempt(checks, "tokenizer", lambda: _check_tokenizer(tokenizer_dir, opts.template))
    _attempt(checks, "data", lambda: _check_records(config.data, "data", objective))
    if objective in ("rloo", "grpo") and (opts.reward_model is not None or not getattr(opts, "reward_funcs", None)):
        _attempt(checks, "reward_model", lambda: _check_reward_model(opts.reward_model, objective))
    if config.eval_data is not None:
        _attempt(checks, "eval_data", lambda: _check_records(config.eval_data, "eval_data", objective))
    result = ConfigCheck(checks, gpu=None if gpu is None else str(gpu))

    def memory() -> tuple[str, Any]:
        est, rows = estimate_for_config(config, gpu, spec=spec, processes=processes)
        return f"{est.device_bytes / 2**30:.2f} GiB per device ({processes} process(es))", (est, rows)

    got = _attempt(checks, "memory", memory)
    if got is not None:
        result.estimate, result.rows = got
    return result
