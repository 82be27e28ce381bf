"""The YAML training configuration (``llmtune train CONFIG.yaml``): schema, validation with line numbers, run.

A config names the model, the data, and the trainer (and optionally the quantizer) with their options::

    model: ./models/my-llama          # local directory or hub id
    data: data/train.jsonl            # .jsonl / .json / .csv
    eval_data: data/heldout.jsonl     # optional: answered and scored (ROUGE/BLEU) before/after
    output_dir: runs/kopitiam
    trainer:
      name: lora                      # registry name (default "lora")
      backend: peft                   # default backend of that name when left out
      rank: 16
      lr: 2.0e-4
    quantizer: nf4                    # or {name: nf4, double_quant: true, ...} -> QLoRA

Every key is checked: an unknown key, a wrong type or a bad value is a `ConfigError` naming the file and line.
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError, InvalidOptionError, LlmtuneError, UnknownOptionError, did_you_mean

#: Top-level keys: name -> (required, description).
TOP_LEVEL: dict[str, tuple[bool, str]] = {
    "model": (True, "base model: a local directory or a hub id"),
    "tokenizer": (False, "tokenizer directory or hub id (default: the model's)"),
    "data": (True, "training data: .jsonl/.json/.csv, parquet/arrow file or folder, save_to_disk folder, hub id, "
                   "a source mapping (path, split, columns, ...) or a list of sources (a mixture, with weights)"),
    "eval_data": (False, "held-out data answered and scored with ROUGE/BLEU before, during and after training"),
    "val_size": (False, "carve a held-out set from data (a fraction in (0, 1) or a count) as eval_data, by the seed"),
    "dedup": (False, "drop exact repeats of a record within each data source (true/false)"),
    "output_dir": (False, "where the adapter, checkpoints and log.jsonl go (default: the trainer's output_dir)"),
    "resume": (False, "false, true/'auto' (newest checkpoint in output_dir), or a checkpoint path"),
    "trainer": (False, "the trainer: name, backend, and that backend's options"),
    "quantizer": (False, "quantize the base model (QLoRA): a name like nf4, or name/backend/options"),
    "loggers": (False, "extra training loggers the CLI attaches: a list of tensorboard, mlflow, wandb"),
    "eval_tasks": (False, "llmtune tasks run during training: names or {name, every, batch_size, task options}"),
}
LOGGERS = ("tensorboard", "mlflow", "wandb")
_PATH_KEYS = ("data", "eval_data", "output_dir")


@dataclasses.dataclass
class TrainConfig:
    """A validated training config: what `run` needs."""

    path: Path
    model: str
    data: Any                       # a path, or a `llmtune.data.sources.DataSpec`
    trainer: Any                    # a llmtune Trainer instance
    tokenizer: str | None = None
    eval_data: Any = None
    output_dir: str | None = None
    resume: bool | str = False
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)
    loggers: tuple[str, ...] = ()
    eval_tasks: list[Any] = dataclasses.field(default_factory=list)   # `TaskEvaluator` callbacks


def _marks(node: Any, prefix: tuple[str, ...], out: dict[tuple[str, ...], int], where: str) -> None:
    """Record the line of every mapping key (1-based), rejecting duplicate keys."""
    import yaml

    if isinstance(node, yaml.SequenceNode):  # list items by index: data[1].weight is ("data", "1", "weight")
        for i, item in enumerate(node.value):
            at_item = (*prefix, str(i))
            out[at_item] = item.start_mark.line + 1
            _marks(item, at_item, out, where)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{where}:{line}: duplicate key {'.'.join((*prefix, key))!r}")
        seen.add(key)
        path = (*prefix, key)
        out[path] = line
        _marks(value_node, path, out, where)


def load_config(path: str | Path) -> TrainConfig:
    """Parse and validate a YAML training config; every problem is a `ConfigError` with ``file:line``."""
    import yaml

    from llmtune.core.registry import REGISTRY, get_quantizer

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied (cannot read it)") from None
    where = str(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise ConfigError(f"{where}: the config is empty; it needs at least 'model' and 'data'")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}:1: the config must be a mapping of keys (model, data, trainer, ...), "
                          f"not a {type(data).__name__}")
    lines: dict[tuple[str, ...], int] = {}
    _marks(root, (), lines, where)

    def at(*key: str) -> str:
        for n in range(len(key), 0, -1):
            if key[:n] in lines:
                return f"{where}:{lines[key[:n]]}"
        return where

    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{at(str(key))}: unknown key {key!r}.{did_you_mean(str(key), TOP_LEVEL)} "
                              f"Valid top-level keys: {', '.join(TOP_LEVEL)}")
    for key, (required, _doc) in TOP_LEVEL.items():
        if required and key not in data:
            raise ConfigError(f"{where}: missing required key {key!r} ({TOP_LEVEL[key][1]})")
    for key in ("model", "tokenizer", "output_dir"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{at(key)}: {key!r} must be a string (a path or hub id), not {data[key]!r}")
    resume = data.get("resume", False)
    if not isinstance(resume, (bool, str)):
        raise ConfigError(f"{at('resume')}: 'resume' must be false, true, 'auto' or a checkpoint path, not {resume!r}")

    base = path.parent

    def resolve(value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else base / p)

    def local_or_hub(value: str) -> str:
        p = base / value
        return str(p) if not Path(value).is_absolute() and p.exists() else value

    # -- quantizer
    quantizer = None
    if data.get("quantizer") is not None:
        qspec = data["quantizer"]
        if isinstance(qspec, str):
            qspec = {"name": qspec}
        if not isinstance(qspec, dict):
            raise ConfigError(f"{at('quantizer')}: 'quantizer' must be a name (nf4) or a mapping with 'name'")
        quantizer = _build(REGISTRY, "quantizer", qspec, at, "quantizer", get_quantizer)
    # -- trainer
    tspec = data.get("trainer") or {}
    if not isinstance(tspec, dict):
        raise ConfigError(f"{at('trainer')}: 'trainer' must be a mapping (name, backend, options)")
    tspec = {"name": "lora", **tspec}
    if quantizer is not None:
        if "quantizer" in tspec:
            raise ConfigError(f"{at('trainer', 'quantizer')}: give the quantizer once, at the top level")
        tspec["quantizer"] = quantizer
    from llmtune.core.registry import get_trainer

    trainer = _build(REGISTRY, "trainer", tspec, at, "trainer", get_trainer)
    loggers = _loggers(data.get("loggers"), at("loggers"))
    eval_tasks = []
    if data.get("eval_tasks") is not None:
        from llmtune.trainers.callbacks_tasks import config_task_evaluators

        eval_tasks = config_task_evaluators(data["eval_tasks"], at("eval_tasks"))
    seed = getattr(trainer.options, "seed", 0)
    train_data, eval_data = _data_keys(data, at, base, seed)
    resume_value: bool | str = resume
    if isinstance(resume, str) and resume != "auto":
        resume_value = resolve(resume)
    return TrainConfig(
        path=path, model=local_or_hub(data["model"]), data=train_data, trainer=trainer,
        tokenizer=local_or_hub(data["tokenizer"]) if data.get("tokenizer") else None,
        eval_data=eval_data,
        output_dir=resolve(data["output_dir"]) if data.get("output_dir") else None,
        resume=resume_value, raw=data, loggers=loggers, eval_tasks=eval_tasks,
    )


def _source_path(value: str, base: Path) -> str:
    """A source path relative to the config's directory; a hub id (``owner/name``, not a local path) as is."""
    from llmtune.data.sources import Source

    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if (base / p).exists() or Source(value).kind != "hub":
        return str(base / p)
    return value


def _data_value(value: Any, key: str, at: Any, base: Path) -> Any:
    """``data``/``eval_data``: a path string, or the `Source`s of a source mapping or a list of them."""
    from llmtune.data.sources import Source

    if isinstance(value, str):
        return _source_path(value, base)
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{at(key)}: {key!r} must be a path, a hub id, a source mapping (path, split, ...) or a "
                          f"list of source mappings, not {value!r}")
    sources = []
    for n, item in enumerate(items):
        place = (key, str(n)) if isinstance(value, list) else (key,)
        try:
            src = Source.from_mapping(item)
        except InvalidOptionError as exc:
            raise ConfigError(f"{at(*place, exc.field or '')}: {key}: {exc}") from None
        files = src.data_files
        if isinstance(files, str):
            files = str(base / files)
        elif isinstance(files, tuple):
            files = tuple(str(base / f) for f in files)
        sources.append(dataclasses.replace(src, path=_source_path(src.path, base), data_files=files))
    return tuple(sources)


def _data_keys(data: dict[str, Any], at: Any, base: Path, seed: int) -> tuple[Any, Any]:
    """The training and evaluation data of a config: paths, or `DataSpec`s (sources, mixtures, ``val_size``)."""
    from llmtune.data.sources import DataSpec

    val_size, dedup = data.get("val_size"), data.get("dedup", False)
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, (int, float))
                                 or not (0 < val_size < 1 if isinstance(val_size, float) else val_size >= 1)):
        raise ConfigError(f"{at('val_size')}: 'val_size' must be a fraction in (0, 1) or a count >= 1, "
                          f"not {val_size!r}")
    if val_size is not None and data.get("eval_data") is not None:
        raise ConfigError(f"{at('val_size')}: give 'eval_data' or 'val_size' (which carves it from data), not both")
    if not isinstance(dedup, bool):
        raise ConfigError(f"{at('dedup')}: 'dedup' must be true or false, not {dedup!r}")
    train = _data_value(data["data"], "data", at, base)
    evaluation = _data_value(data["eval_data"], "eval_data", at, base) if data.get("eval_data") is not None else None
    if val_size is None and not dedup:
        return (DataSpec(train, seed=seed) if isinstance(train, tuple) else train,
                DataSpec(evaluation, seed=seed) if isinstance(evaluation, tuple) else evaluation)
    from llmtune.data.sources import Source

    spec = DataSpec(train if isinstance(train, tuple) else (Source(train),), seed=seed, val_size=val_size, dedup=dedup)
    if val_size is None:
        return spec, DataSpec(evaluation, seed=seed) if isinstance(evaluation, tuple) else evaluation
    return spec.train(), spec.heldout()


def _loggers(value: Any, where: str) -> tuple[str, ...]:
    """The ``loggers`` key: a name or a list of names from `LOGGERS`."""
    names = [value] if isinstance(value, str) else (value or [])
    if not isinstance(names, list) or any(x not in LOGGERS for x in names):
        raise ConfigError(f"{where}: 'loggers' must be a list of {', '.join(LOGGERS)}, not {value!r}")
    return tuple(names)


def _build(registry: Any, kind: str, spec: Mapping[str, Any], at: Any, section: str, factory: Any) -> Any:
    """Create a backend from ``{name, backend, **options}``, mapping every error to its line."""
    from llmtune.core.options import option_names

    name = spec.get("name")
    backend = spec.get("backend")
    if not isinstance(name, str):
        raise ConfigError(f"{at(section, 'name')}: {section}.name must be a string, not {name!r}")
    if backend is not None and not isinstance(backend, str):
        raise ConfigError(f"{at(section, 'backend')}: {section}.backend must be a string, not {backend!r}")
    try:
        cls = registry.get_class(kind, name, backend)
    except LlmtuneError as exc:
        raise ConfigError(f"{at(section, 'backend' if backend else 'name')}: {exc}") from None
    options = {k: v for k, v in spec.items() if k not in ("name", "backend")}
    valid = option_names(cls.Options)
    for key in options:
        if key not in valid:
            raise ConfigError(f"{at(section, key)}: unknown {section} option {key!r} for {cls.describe()}."
                              f"{did_you_mean(key, valid)} Valid options: {', '.join(valid)}")
    try:
        return factory(name, backend, **options)
    except (InvalidOptionError, UnknownOptionError) as exc:
        field = exc.field
        loc = at(section, field) if field else at(section)
        hint = ""
        value = options.get(field) if field else None
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            mantissa, _, exponent = value.lower().partition("e")
            fixed = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"
            hint = f" (YAML reads {value} as text; write {fixed})"
        raise ConfigError(f"{loc}: {exc}{hint}") from None


def run(config: TrainConfig, *, resume: bool | str | None = None, overwrite: bool = False,
        allow_changes: tuple[str, ...] = (), callbacks: Any = ()) -> Any:
    """Train as the config says, reporting through ``callbacks``; returns the trainer's `TrainResult`
    (``overwrite``/``allow_changes``: see train)."""
    tokenizer = None
    if config.tokenizer is not None:
        from llmtune.models.loading import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer)
    return config.trainer.train(
        config.model, config.data, eval_data=config.eval_data, tokenizer=tokenizer,
        output_dir=config.output_dir, resume=config.resume if resume is None else resume,
        callbacks=[*callbacks, *config.eval_tasks],
        **({"overwrite": True} if overwrite else {}), **({"allow_changes": allow_changes} if allow_changes else {}),
    )


def schema() -> dict[str, Any]:
    """The config schema as data (top-level keys, and the options of every registered trainer backend)."""
    from llmtune.core.options import option_names
    from llmtune.core.registry import REGISTRY

    trainers = {}
    for info in REGISTRY.list("trainer"):
        if info.available:
            cls = REGISTRY.get_class("trainer", info.name, info.backend)
            trainers[f"{info.name}/{info.backend}"] = option_names(cls.Options)
    return {"top_level": {k: {"required": r, "doc": d} for k, (r, d) in TOP_LEVEL.items()}, "trainers": trainers}
