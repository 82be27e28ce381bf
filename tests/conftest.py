"""Shared test configuration: Hypothesis profiles and the GPU marker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# "ci": fixed seed, bounded example count (what `nox -s tests` uses); "long": many random examples.
settings.register_profile(
    "ci", derandomize=True, max_examples=150, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=3000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one torch thread (two spin against each other on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok() -> Any:
    """The bundled tiny tokenizer (deterministic; tests must not mutate it)."""
    from llmtune.models.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def _llmtune_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """llmtune's user cache (content hashes of base models) in a temporary directory, for this process and the
    processes tests start, never in the user's home."""
    before = os.environ.get("LLMTUNE_CACHE_DIR")
    os.environ["LLMTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("llmtune-cache"))
    yield
    if before is None:
        os.environ.pop("LLMTUNE_CACHE_DIR", None)
    else:
        os.environ["LLMTUNE_CACHE_DIR"] = before
