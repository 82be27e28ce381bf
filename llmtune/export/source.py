"""What an export reads: a training run, an adapter directory, or a plain model directory.

A run directory (what ``llmtune train`` / `PeftLoraTrainer.train` writes) holds ``config.json`` (the options,
including the chat template and, for QLoRA, the quantizer) and ``adapter/`` (the PEFT adapter and tokenizer).
An adapter directory holds ``adapter_config.json``; its run is found by looking up for that ``config.json``
(``RUN/adapter`` or ``RUN/checkpoints/step-N/adapter``). A model directory holds a transformers ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError, LlmtuneError, MergeNotSupportedError


class ExportError(LlmtuneError):
    """An export that cannot be done as asked (unsupported model family, output inside the input, ...)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved export input."""

    path: Path                          #: what the user named
    base: str                           #: base model (directory or hub id)
    adapter_dir: Path | None = None     #: the PEFT adapter, if any
    run_dir: Path | None = None         #: the training run, if found
    adapter_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    template: str | None = None         #: the chat template the run trained with (llama3, chatml, alpaca, tokenizer)
    quantizer: dict[str, Any] | None = None  #: the run's quantizer (QLoRA): {"name", "backend", **options}
    precision: str | None = None        #: the precision the run trained in (the base is cast to it before quantizing)

    def inputs(self) -> list[Path]:
        """Local directories the export reads (an output must not overlap any of them)."""
        paths = [self.path, *(p for p in (self.adapter_dir, self.run_dir) if p is not None)]
        base = Path(self.base).expanduser()
        if base.exists():  # a model directory or a GGUF file
            paths.append(base)
        return paths


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _run_config(adapter_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """The run directory above ``adapter_dir`` (RUN/adapter, RUN/checkpoints/step-N/adapter) and its options."""
    for parent in list(adapter_dir.resolve().parents)[:3]:
        cfg = parent / "config.json"
        if cfg.is_file():
            data = _read_json(cfg)
            if isinstance(data.get("options"), dict):
                return parent, data["options"]
    return None, {}


def resolve_source(path: str | Path, *, base: str | Path | None = None, template: str | None = None) -> Source:
    """Resolve ``path`` (run, adapter or model directory); ``base``/``template`` override what the run recorded."""
    from llmtune.models.loading import gguf_path

    p = Path(path).expanduser()
    if gguf_path(p) is not None:  # a GGUF model: loaded (dequantized) like a model directory
        return Source(path=p, base=str(base or p), template=template)
    if not p.is_dir():
        raise ConfigError(f"{p}: no such directory (give a training run, an adapter or a model directory)")
    for d in (p, p / "adapter"):
        if (d / "bottleneck_config.json").is_file():  # llmtune's bottleneck adapters (not a PEFT adapter)
            raise MergeNotSupportedError(
                f"{d}: a bottleneck adapter cannot be exported as one model: W_up f(W_down x) is not linear in x, "
                "so no base weight can absorb it; serve base + adapter with llmtune.load_for_inference, or retrain "
                "with method='lora'")
    if (p / "adapter_config.json").is_file():
        adapter: Path | None = p
    elif (p / "adapter" / "adapter_config.json").is_file():
        adapter = p / "adapter"
    else:
        adapter = None
    if adapter is None:
        if not (p / "config.json").is_file() or "options" in _read_json(p / "config.json"):
            raise ConfigError(f"{p}: neither a run (no adapter/), an adapter (no adapter_config.json) nor a model "
                              "directory (no config.json)")
        return Source(path=p, base=str(base or p), template=template)
    adapter_config = _read_json(adapter / "adapter_config.json")
    run_dir, options = _run_config(adapter)
    recorded = adapter_config.get("base_model_name_or_path")
    chosen = str(base) if base is not None else (str(recorded) if recorded else None)
    if chosen is None:
        raise ConfigError(f"{adapter}/adapter_config.json does not record its base model; pass base= (--base)")
    quantizer = options.get("quantizer")
    precision = options.get("precision")
    if run_dir is not None and (run_dir / "result.json").is_file():
        precision = _read_json(run_dir / "result.json").get("precision", precision)
    return Source(path=p, base=chosen, adapter_dir=adapter, run_dir=run_dir, adapter_config=adapter_config,
                  template=template or options.get("template"),
                  quantizer=quantizer if isinstance(quantizer, dict) else None,
                  precision=str(precision) if precision else None)


def check_output(out: str | Path, source: Source) -> Path:
    """``out`` resolved; `ExportError` when it is, contains, or lies inside one of the source's directories."""
    target = Path(out).expanduser().resolve()
    for given in source.inputs():
        src = given.resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            raise ExportError(f"refusing to write the export to {target}: it overlaps the input {src}; "
                              "choose an output directory outside the run, adapter and base model")
    if target.is_file():
        raise ExportError(f"{target} is a file; --out must be a directory")
    return target
