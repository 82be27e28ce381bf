"""Calibration data for GPTQ from plain text, and the "quantize a model directory" flow the CLI runs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError


def text_calibration(
    tokenizer: Any,
    text: str,
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 1,
    seed: int = 0,
    source: str = "calibration text",
) -> list[Any]:
    """Tokenize ``text`` and cut ``n_samples`` random windows of ``seq_len`` tokens (the GPTQ paper's recipe).

    Returns a list of LongTensor ``[batch_size, seq_len]``. Text shorter than ``seq_len`` gives one sample of
    all its tokens.
    """
    import torch

    if n_samples < 1 or seq_len < 2 or batch_size < 1:
        raise ConfigError(f"{source}: n_samples ({n_samples}), seq_len ({seq_len}) and batch_size ({batch_size}) "
                          "must be positive (seq_len >= 2)")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise ConfigError(f"{source}: calibration text is empty (it tokenizes to {len(ids)} tokens)")
    rng = random.Random(seed)
    if len(ids) <= seq_len:
        windows = [ids]
    else:
        starts = [rng.randint(0, len(ids) - seq_len) for _ in range(n_samples)]
        windows = [ids[s:s + seq_len] for s in starts]
    tensor = torch.tensor(windows, dtype=torch.long)
    return [tensor[i:i + batch_size] for i in range(0, len(windows), batch_size)]


def read_calibration_text(path: Path) -> str:
    """The text of a calibration file, or a `ConfigError` naming the file and what is wrong with it."""
    if path.is_dir():
        raise ConfigError(f"calibration file {path} is a directory, not a text file")
    if not path.is_file():
        raise ConfigError(f"calibration file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"calibration file {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except PermissionError:
        raise ConfigError(f"calibration file {path}: permission denied (cannot read it)") from None


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
    **options: Any,
) -> dict[str, Any]:
    """Load a local HF model + tokenizer, quantize it with ``method``/``backend``, save model and tokenizer to ``out``."""
    import time

    import llmtune
    from llmtune.core.paths import check_output_dir

    src = Path(model_dir)
    if src.is_file():
        raise ConfigError(f"{src}: is a file, not a model directory")
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src}: not a model directory (no config.json)")
    check_output_dir(out, [src, calibration_file])
    quantizer = llmtune.get_quantizer(method, backend=backend, **options)
    text = read_calibration_text(Path(calibration_file)) if calibration_file is not None else None
    if text is None and method == "gptq":
        raise ConfigError("--calibration FILE is required for gptq: a text file in the model's domain "
                          "(it is tokenized and cut into fixed-length samples)")
    model, tokenizer = _load_local(src)
    calibration = None
    if text is not None:
        calibration = text_calibration(tokenizer, text, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                       source=str(calibration_file))
    start = time.perf_counter()
    qmodel = quantizer.quantize(model, calibration=calibration)
    seconds = time.perf_counter() - start
    dest = quantizer.save(qmodel, out)
    tokenizer.save_pretrained(str(dest))
    size = sum(f.stat().st_size for f in Path(dest).glob("*.safetensors"))
    return {"method": method, "backend": quantizer.backend, "out": str(dest), "seconds": round(seconds, 3),
            "safetensors_bytes": size,
            "calibration_samples": sum(int(b.shape[0]) for b in calibration) if calibration else 0}
