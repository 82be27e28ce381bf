"""How many torch CPU threads a run uses (``num_threads="auto"``), chosen from measurements.

Measured (benchmarks/train_threads.py; docs/training.md has the numbers): on a CPU that other processes
keep busy, OpenMP threads beyond the idle cores spin against each other and a tiny-model step gets many times
slower, while on idle cores extra threads help little at these sizes. So "auto" = the cores this process may
use that are idle now (cores - 1-minute load average, rounded down, at least 1), at most torch's default.
A GPU run keeps torch's default (the CPU only feeds the GPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def choose_threads(option: int | str, *, cuda: bool) -> tuple[int, str]:
    """``(threads, why)`` for the option value ``option`` ("auto" or a count)."""
    import torch

    if option != "auto":
        return int(option), "num_threads option"
    default = torch.get_num_threads()
    if cuda:
        return default, "GPU run: torch's default"
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = 0.0
    idle = max(1, int(cores - load))
    n = min(default, idle)
    return n, f"auto: {cores} usable cores, load {load:.1f} -> {idle} idle; torch default {default}"


def resumed_threads(output_dir: Any, threads: int, why: str) -> tuple[int, str]:
    """For ``num_threads: auto`` on resume: the count the run used before (its ``config.json``), so the resumed
    steps reduce in the same order and compute the same bits; ``(threads, why)`` unchanged when none is recorded."""
    import json
    from pathlib import Path

    try:
        before = json.loads((Path(output_dir) / "config.json").read_text()).get("num_threads")
    except (OSError, ValueError, AttributeError):
        return threads, why
    if isinstance(before, int) and not isinstance(before, bool) and before >= 1:
        return before, f"auto on resume: the run's earlier count ({before}; {why} now)"
    return threads, why


@contextlib.contextmanager
def thread_scope(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
