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
from llmtune.export.kquants import KQUANTS
from llmtune.export.source import ExportError, Source, check_output, resolve_source

Progress = Callable[[str, int, int], None]
FORMATS = ("gguf", "ollama", "hf", "gguf-lora")
GGUF_DTYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")   # k-quants: through llama.cpp
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
    allowed = HF_DTYPES if fmt == "hf" else GGUF_DTYPES[:4] if fmt == "gguf-lora" else GGUF_DTYPES
    if dtype not in allowed:
        raise InvalidOptionError(f"dtype={dtype!r} is not one of {', '.join(allowed)} for format {fmt!r}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new directory or pass overwrite=True (--overwrite)")


def _write_gguf(source: Source, out: Path, dtype: str, *, ollama: bool, pre_tokenizer: str | None,
                trust_remote_code: bool, progress: Progress | None) -> dict[str, Any]:
    from llmtune.export.chat import END_OF_ANSWER, jinja_template, modelfile
    from llmtune.export.to_gguf import write_gguf

    template = source.template
    if ollama and template not in ("llama3", "chatml", "alpaca"):
        raise ExportError(f"an Ollama Modelfile needs the training template (llama3, chatml or alpaca); the run "
                          f"recorded {template!r}; pass template= (--template)")
    tensors, tokenizer, merged_into, streamed = _gguf_tensors(source, trust_remote_code, progress)
    name = f"model-{dtype}.gguf"
    kquant = dtype in KQUANTS
    written = out / (f".model-f16-for-{dtype}.gguf" if kquant else name)
    summary = write_gguf(tensors, tokenizer, written, dtype="f16" if kquant else dtype, name=source.path.name,
                         chat_template=jinja_template(template, tokenizer),
                         eot_token=END_OF_ANSWER.get(template or ""), pre_tokenizer=pre_tokenizer, progress=progress)
    if kquant:
        from llmtune.export.kquants import quantize_gguf

        try:
            quantize_gguf(written, out / name, dtype)
        finally:
            written.unlink()
        summary.update(path=str(out / name), dtype=dtype, quantized_by="llama.cpp (llama_model_quantize)")
    if ollama:
        assert template is not None
        text = modelfile(name, template, tokenizer, bos_in_template=not summary["add_bos_token"])
        (out / "Modelfile").write_text(text)
    summary["tensors"] = len(summary["tensors"])
    summary["merged_into"] = merged_into
    summary["streamed"] = streamed
    return summary


def _gguf_tensors(source: Source, trust_remote_code: bool, progress: Progress | None) -> tuple[Any, Any, str, Any]:
    """(tensors, tokenizer, what the adapter was merged into, True or why the merge was done in memory)."""
    from llmtune.export.merge import load_tokenizer, merge
    from llmtune.export.tensors import ModelTensors, StreamedTensors, why_not_streamed

    why = why_not_streamed(source)
    if why is None:
        what = "no adapter (the model as given)" if source.adapter_dir is None else "full-precision base (W + BA)"
        return StreamedTensors(source), load_tokenizer(source, trust_remote_code), what, True
    merged = merge(source, trust_remote_code=trust_remote_code, progress=progress)
    config = Path(source.base).expanduser() / "config.json"   # the raw file, as llama.cpp's converter reads it
    hparams = json.loads(config.read_text()) if config.is_file() else merged.model.config.to_dict()
    return ModelTensors(merged.model, hparams), merged.tokenizer, merged.merged_into, why


def portable_tokenizer_config(directory: Path) -> None:
    """Make ``tokenizer_config.json`` loadable by transformers 4.x as well as 5.x.

    transformers 5 saves ``tokenizer_class: TokenizersBackend`` (4.x: "Tokenizer class TokenizersBackend does not
    exist") and its extra special tokens as a list (4.x expects ``additional_special_tokens``); both versions read
    ``PreTrainedTokenizerFast`` with ``additional_special_tokens`` from the same tokenizer.json.
    """
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


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
    if stops and getattr(model, "generation_config", None) is not None:  # a reward model does not generate
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
    portable_tokenizer_config(out)
    if progress:
        progress("write safetensors", 1, 1)
    return info


def _write_format(source: Source, out: Path, format: str, dtype: str, *, requantize: str | None,
                  pre_tokenizer: str | None, trust_remote_code: bool, progress: Progress | None) -> dict[str, Any]:
    """Write ``format`` into ``out`` (the temporary sibling of the final directory); the details for export.json."""
    from llmtune.export.merge import merge

    if format == "gguf-lora":
        from llmtune.export.to_gguf import write_lora_gguf

        return {"merged_into": "not merged (the adapter alone, for the base GGUF)",
                **write_lora_gguf(source, out / f"adapter-{dtype}.gguf", dtype=dtype, name=source.path.name,
                                  progress=progress)}
    if format == "hf":
        merged = merge(source, trust_remote_code=trust_remote_code, progress=progress)
        return {"merged_into": merged.merged_into, **_write_hf(merged, source, out, dtype, requantize, progress)}
    return _write_gguf(source, out, dtype, ollama=format == "ollama", pre_tokenizer=pre_tokenizer,
                       trust_remote_code=trust_remote_code, progress=progress)


def export(path: str | Path, out: str | Path, *, format: str = "gguf", dtype: str = "f16",
           base: str | Path | None = None, template: str | None = None, requantize: str | None = None,
           pre_tokenizer: str | None = None, overwrite: bool = False, trust_remote_code: bool = False,
           progress: Progress | None = None) -> ExportResult:
    """Export the run/adapter/model at ``path`` to directory ``out`` as ``format`` (gguf, ollama, hf, gguf-lora).

    ``gguf-lora`` writes the adapter alone as a GGUF LoRA file (one base GGUF, many adapters in llama.cpp).

    ``dtype``: f16, bf16, q8_0, q4_0 (gguf/ollama) or f32, f16, bf16 (hf). ``base``/``template`` override what
    the run recorded. ``requantize`` (hf only): a quantizer name (``nf4``, ``int8``...) applied to the merged
    model. ``progress(stage, done, total)`` is called as the export advances.
    """
    from llmtune.export.merge import check_mergeable, model_head

    source = resolve_source(path, base=base, template=template)
    target = check_output(out, source)
    _check_args(format, dtype, target, overwrite)
    if format != "hf" and model_head(source) == "score":
        raise ExportError(f"{source.path} is a reward model (a score head, no language-model head): export it with "
                          f"format 'hf' (--format hf: an XForSequenceClassification); {format} holds language models")
    if template is not None and template not in ("llama3", "llama3.1", "chatml", "alpaca", "tokenizer"):
        raise InvalidOptionError(f"template={template!r} is not one of llama3, llama3.1, chatml, alpaca, tokenizer")
    if requantize and format != "hf":
        raise InvalidOptionError(f"requantize={requantize!r} applies to format 'hf' only (GGUF has its own dtypes)")
    if source.adapter_dir is not None:
        check_mergeable(source)
    if dtype in KQUANTS:
        from llmtune.export.kquants import llama_cpp_quantizer

        llama_cpp_quantizer(dtype)   # before any work: says what to install
    with lock_output(target) as lock:
        _check_args(format, dtype, target, overwrite)  # again, now that no other export can write there
        with atomic_dir(target, keep_others=True) as tmp:
            details = _write_format(source, tmp, format, dtype, requantize=requantize, pre_tokenizer=pre_tokenizer,
                                    trust_remote_code=trust_remote_code, progress=progress)
            info = {"format": format, "dtype": dtype, "source": str(source.path.resolve()),
                    "adapter": str(source.adapter_dir.resolve()) if source.adapter_dir else None, "base": source.base,
                    "template": source.template, "quantizer": source.quantizer, "llmtune_version": __version__,
                    **details}
            (tmp / INFO).write_text(json.dumps(info, indent=1, default=str) + "\n")
            manifest = json.loads(write_manifest(tmp).read_text())  # the markers last, then the rename
    files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    if progress:
        progress("manifest", 1, 1)
    notes = (f"took over the stale lock of {lock.taken_over}",) if lock.taken_over else ()
    return ExportResult(out_dir=target, format=format, files=files, info=info, notes=notes)
