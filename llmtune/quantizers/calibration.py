"""Calibration data from plain text: what GPTQ (or any quantizer that needs data) is calibrated on."""

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
