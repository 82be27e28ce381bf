"""Training checkpoints written atomically, and everything exact resume needs (optimizer, scheduler, RNG, step).

Layout of ``OUTPUT/checkpoints/step-000050/``::

    adapter/                 the adapter as PEFT writes it (loadable on its own)
    optimizer.pt             optimizer state dict
    scheduler.pt             LR scheduler state dict
    rng-<rank>.pt            torch / CUDA / python / numpy RNG states of each process
    state.json               step, data fingerprint, history so far, "before" evaluation

A checkpoint is built in a hidden temporary sibling directory, every file is fsynced, then the directory is
renamed into place: a crash leaves either the old set of checkpoints or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from llmtune.core.errors import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(output_dir: Path, step: int) -> Path:
    """The directory of the checkpoint taken after optimizer step ``step``."""
    return output_dir / CHECKPOINTS / f"step-{step:06d}"


def tmp_dir_for(final: Path) -> Path:
    """The temporary sibling a checkpoint is assembled in before the rename."""
    return final.parent / f".tmp-{final.name}"


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin(final: Path) -> Path:
    """Create (fresh) the temporary directory for ``final`` and return it."""
    tmp = tmp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(final: Path) -> Path:
    """fsync the temporary directory and rename it to ``final`` (replacing an older one of the same name)."""
    tmp = tmp_dir_for(final)
    _fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def write_json(path: Path, obj: Any) -> None:
    """Write JSON (used inside a temporary checkpoint dir, so no extra atomicity needed)."""
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step can consume."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: Path, rank: int) -> None:
    """Write this process's RNG states as ``rng-<rank>.pt``."""
    torch.save(rng_state(), directory / f"rng-{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    """Restore this process's RNG states from a checkpoint."""
    path = directory / f"rng-{rank}.pt"
    if not path.exists():
        raise ConfigError(f"checkpoint {directory} has no RNG state for process {rank} ({path.name}); "
                          "was it written by a run with fewer processes?")
    set_rng_state(torch.load(path, weights_only=False))


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: bool | str | os.PathLike[str] | None, output_dir: Path) -> Path | None:
    """Turn ``resume`` (False, True/"auto" = newest in output_dir if any, or a checkpoint path) into a path."""
    if resume is None or resume is False:
        return None
    if resume is True or resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is not None:
            return newest
    raise ConfigError(f"resume={str(resume)!r}: not a checkpoint directory (no {STATE_FILE}) and no checkpoints "
                      f"under it. Pass a path like OUTPUT/{CHECKPOINTS}/step-000050, 'auto', or False.")


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    result: dict[str, Any] = json.loads((checkpoint / STATE_FILE).read_text())
    return result


def prune(output_dir: Path, keep: int) -> None:
    """Delete the oldest checkpoints so that at most ``keep`` remain (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    found = list_checkpoints(output_dir)
    for _step, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
