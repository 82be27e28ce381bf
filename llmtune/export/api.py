"""`export`: a run, adapter or model directory -> GGUF (llama.cpp), an Ollama model, or merged safetensors (HF).

Every export writes ``export.json`` (what was exported, from what, and which base the merged numbers match)
and, last, ``manifest.json`` (`llmtune.core.manifest`: size and SHA-256 of every file) into the output
directory. The output may not be, contain, or lie inside the run, the adapter or the base model directory.

The output is written atomically (`llmtune.core.atomic.atomic_dir`): into a hidden sibling ``.tmp-NAME``, renamed
into place at the end; with ``overwrite`` the previous export stays whole until that rename (files of the
directory that no export wrote are kept). A second export to the same output at the same time is refused
(`llmtune.core.lock`). A kill, a full disk or SIGTERM leaves nothing complete-looking under the final name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtune._version import __version__
from llmtune.core.atomic import atomic_dir
from llmtune.core.errors import InvalidOptionError
from llmtune.core.lock import lock_output
from llmtune.core.manifest import write_manifest
from llmtune.export.source import ExportError, Source, check_output, resolve_source

Progress = Callable[[str, int, int], None]
FORMATS = ("gguf", "ollama", "hf")
GGUF_DTYPES = ("f16", "bf16", "q8_0", "q4_0")
HF_DTYPES = ("f32", "f16", "bf16")
INFO = "export.json"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the directory, each file's sha256, and the contents of ``export.json``."""

    out_dir: Path
    format: str
    files: dict[str, str]
    info: dict[str, Any]
    notes: tuple[str, ...] = ()     #: what the caller may want to report (a stale lock taken over)


def _check_args(fmt: str, dtype: str, out: Path, overwrite: bool) -> None:
    if fmt not in FORMATS:
        raise InvalidOptionError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    allowed = HF_DTYPES if fmt == "hf" else GGUF_DTYPES
    if dtype not in allowed:
        raise InvalidOptionError(f"dtype={dtype!r} is not one of {', '.join(allowed)} for format {fmt!r}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new directory or pass overwrite=True (--overwrite)")


def _write_gguf(merged: Any, source: Source, out: Path, dtype: str, *, ollama: bool, pre_tokenizer: str | None,
                progress: Progress | None) -> dict[str, Any]:
    from llmtune.export.chat import END_OF_ANSWER, jinja_template, modelfile
    from llmtune.export.to_gguf import write_gguf

    template = source.template
    if ollama and template not in ("llama3", "chatml", "alpaca"):
        raise ExportError(f"an Ollama Modelfile needs the training template (llama3, chatml or alpaca); the run "
                          f"recorded {template!r}; pass template= (--template)")
    name = f"model-{dtype}.gguf"
    summary = write_gguf(merged.model, merged.tokenizer, out / name, dtype=dtype, name=source.path.name,
                         chat_template=jinja_template(template, merged.tokenizer),
                         eot_token=END_OF_ANSWER.get(template or ""), pre_tokenizer=pre_tokenizer, progress=progress)
    if ollama:
        assert template is not None
        text = modelfile(name, template, merged.tokenizer, bos_in_template=not summary["add_bos_token"])
        (out / "Modelfile").write_text(text)
    summary["tensors"] = len(summary["tensors"])
    return summary


def _write_hf(merged: Any, source: Source, out: Path, dtype: str, requantize: str | None,
              progress: Progress | None) -> dict[str, Any]:
    import torch

    from llmtune.export.chat import JINJA, stop_tokens

    model, tokenizer = merged.model, merged.tokenizer
    model = model.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype])
    if source.template in JINJA:
        tokenizer.chat_template = JINJA[source.template]
    vocab = tokenizer.get_vocab()
    stops = [int(vocab[t]) for t in stop_tokens(source.template, tokenizer) if t in vocab]
    if stops:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    if progress:
        progress("write safetensors", 0, 1)
    info: dict[str, Any] = {"requantized": None}
    if requantize:
        from llmtune.core.registry import get_quantizer

        quantizer = get_quantizer(requantize)
        quantizer.save(quantizer.quantize(model), out)
        info["requantized"] = quantizer.describe()
    else:
        model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if progress:
        progress("write safetensors", 1, 1)
    return info


def export(path: str | Path, out: str | Path, *, format: str = "gguf", dtype: str = "f16",
           base: str | Path | None = None, template: str | None = None, requantize: str | None = None,
           pre_tokenizer: str | None = None, overwrite: bool = False, trust_remote_code: bool = False,
           progress: Progress | None = None) -> ExportResult:
    """Export the run/adapter/model at ``path`` to directory ``out`` as ``format`` (gguf, ollama, hf).

    ``dtype``: f16, bf16, q8_0, q4_0 (gguf/ollama) or f32, f16, bf16 (hf). ``base``/``template`` override what
    the run recorded. ``requantize`` (hf only): a quantizer name (``nf4``, ``int8``...) applied to the merged
    model. ``progress(stage, done, total)`` is called as the export advances.
    """
    from llmtune.export.merge import merge

    source = resolve_source(path, base=base, template=template)
    target = check_output(out, source)
    _check_args(format, dtype, target, overwrite)
    if template is not None and template not in ("llama3", "llama3.1", "chatml", "alpaca", "tokenizer"):
        raise InvalidOptionError(f"template={template!r} is not one of llama3, llama3.1, chatml, alpaca, tokenizer")
    if requantize and format != "hf":
        raise InvalidOptionError(f"requantize={requantize!r} applies to format 'hf' only (GGUF has its own dtypes)")
    with lock_output(target) as lock:
        _check_args(format, dtype, target, overwrite)  # again, now that no other export can write there
        merged = merge(source, trust_remote_code=trust_remote_code, progress=progress)
        with atomic_dir(target, keep_others=True) as tmp:
            if format == "hf":
                details = _write_hf(merged, source, tmp, dtype, requantize, progress)
            else:
                details = _write_gguf(merged, source, tmp, dtype, ollama=format == "ollama",
                                      pre_tokenizer=pre_tokenizer, progress=progress)
            info = {"format": format, "dtype": dtype, "source": str(source.path.resolve()),
                    "adapter": str(source.adapter_dir.resolve()) if source.adapter_dir else None, "base": source.base,
                    "merged_into": merged.merged_into, "template": source.template, "quantizer": source.quantizer,
                    "llmtune_version": __version__, **details}
            (tmp / INFO).write_text(json.dumps(info, indent=1, default=str) + "\n")
            manifest = json.loads(write_manifest(tmp).read_text())  # the markers last, then the rename
    files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    if progress:
        progress("manifest", 1, 1)
    notes = (f"took over the stale lock of {lock.taken_over}",) if lock.taken_over else ()
    return ExportResult(out_dir=target, format=format, files=files, info=info, notes=notes)
