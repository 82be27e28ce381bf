"""Shared test configuration: Hypothesis profiles, the GPU marker and the forced CPU kernel paths."""

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


def pytest_configure(config: pytest.Config) -> None:
    """Apply the process-wide forced kernel paths of ``LLMTUNE_CPU_PATHS`` (tests/cpu_paths.py)."""
    import cpu_paths

    if "no-avx512bf16" in cpu_paths.FORCED:
        cpu_paths.disable_avx512bf16()


@pytest.fixture(autouse=True)
def _forced_4bit_kernel(request: pytest.FixtureRequest) -> Iterator[None]:
    """With ``LLMTUNE_CPU_PATHS=faulty-4bit``, tests marked ``bnb_4bit`` run on the simulated faulty kernel."""
    import cpu_paths

    if "faulty-4bit" not in cpu_paths.FORCED or request.node.get_closest_marker("bnb_4bit") is None:
        yield
        return
    from llmtune.quantizers import bnb_guard

    with pytest.MonkeyPatch.context() as mp:
        cpu_paths.simulate_4bit_kernel(mp, faulty=True)
        yield
    bnb_guard.clear_cache()


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
