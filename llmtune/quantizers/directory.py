"""Quantize a local model directory with any registered quantizer and save it: the flow ``llmtune quantize`` runs.

Backend-agnostic: the quantizer is looked up in the registry by name/backend; text calibration
(`llmtune.quantizers.calibration`) is cut only when a calibration file is given. The output is locked against a
second writer (`llmtune.core.lock`) and written atomically (`llmtune.core.atomic`): a kill, a full disk or SIGTERM
leaves nothing complete-looking under its name, and an existing output stays whole until the final rename.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llmtune.core.atomic import atomic_dir
from llmtune.core.errors import ConfigError
from llmtune.core.interfaces import ProgressFn
from llmtune.core.lock import lock_output
from llmtune.core.paths import check_output_dir
from llmtune.core.registry import get_quantizer
from llmtune.quantizers.calibration import read_calibration_text, text_calibration

__all__ = ["quantize_directory"]

#: Methods that cannot run without calibration data.
NEEDS_CALIBRATION = ("gptq",)


def _load_local(src: Path) -> tuple[Any, Any]:
    """Model (eval mode, its own dtype) and tokenizer of a local directory, unchanged; custom code is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype="auto",
                                                     trust_remote_code=False)
    except (OSError, ValueError) as err:
        text = " ".join(str(err).split())
        if "trust_remote_code" in text:
            raise ConfigError(f"{src} contains custom code (auto_map in config.json); llmtune quantize does not "
                              "run code from model directories") from err
        raise ConfigError(f"{src}: cannot load the model: {text[:300]}") from err
    model.eval()
    return model, tokenizer


def quantize_directory(
    model_dir: str | Path,
    out: str | Path,
    *,
    method: str = "gptq",
    backend: str | None = None,
    calibration_file: str | Path | None = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    progress: ProgressFn | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Load a local HF model + tokenizer, quantize it with ``method``/``backend``, save model and tokenizer to ``out``.

    ``options`` go to the quantizer; ``progress`` (`ProgressFn`) hears of each quantized step (a decoder block
    for gptq/rtn). Returns a summary: method, backend, out, seconds, safetensors_bytes, calibration_samples.
    """
    from llmtune.models.loading import gguf_path

    src = Path(model_dir)
    gguf = gguf_path(src)
    if gguf is not None:
        src = gguf
    elif src.is_file():
        raise ConfigError(f"{src}: is a file, not a model directory")
    elif not (src / "config.json").is_file():
        raise ConfigError(f"{src}: not a model directory (no config.json)")
    target = check_output_dir(out, [src, calibration_file])
    quantizer = get_quantizer(method, backend=backend, **options)
    text = read_calibration_text(Path(calibration_file)) if calibration_file is not None else None
    if text is None and method in NEEDS_CALIBRATION:
        raise ConfigError(f"--calibration FILE is required for {method}: a text file in the model's domain "
                          "(it is tokenized and cut into fixed-length samples)")
    with lock_output(target) as lock:  # one writer per output, taken before the model loads
        if gguf is not None:
            from llmtune.models.loading import load_gguf

            model, tokenizer = load_gguf(gguf)
        else:
            model, tokenizer = _load_local(src)
        calibration = None
        if text is not None:
            calibration = text_calibration(tokenizer, text, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                           source=str(calibration_file))
        start = time.perf_counter()
        qmodel = quantizer.quantize(model, calibration=calibration, **({"progress": progress} if progress else {}))
        seconds = time.perf_counter() - start
        with atomic_dir(target, keep_others=True) as tmp:  # renamed into place only when complete
            dest = Path(quantizer.save(qmodel, tmp))
            tokenizer.save_pretrained(str(dest))
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    summary = {"method": method, "backend": quantizer.backend, "out": str(target), "seconds": round(seconds, 3),
               "safetensors_bytes": size,
               "calibration_samples": sum(int(b.shape[0]) for b in calibration) if calibration else 0}
    if lock.taken_over:
        summary["note"] = f"took over the stale lock of {lock.taken_over}"
    return summary
