"""Training checkpoints and output directories: atomic, verified on load, no code run from files, one run each.

Layout of an output directory::

    run.json                 the run's fingerprint (settings that decide the trajectory + data digest)
    checkpoints/step-000050/
        adapter/             the adapter as PEFT writes it (loadable on its own)
        optimizer.safetensors   optimizer state dict  (tensors + a JSON tree in the header; no pickle)
        scheduler.safetensors   LR scheduler state dict
        rng-<rank>.safetensors  torch / CUDA / python / numpy RNG states of each process
        state.json           step, run fingerprint, history so far, "before" evaluation
        manifest.json        size + SHA-256 of every file above (`llmtune.core.manifest`), written last
    adapter/                 the final adapter (with its own manifest.json)

The API a training loop uses (all paths are `pathlib.Path`):

* `claim_output_dir` (output_dir, fingerprint, overwrite=, resume=, allow_changes=) -> `RunDir`: cleans up
  what a crash left (half-renamed or half-deleted checkpoints), refuses a directory that holds another run
  unless ``overwrite`` (then moves that run's files away), and records the fingerprint in ``run.json``.
* `resolve_resume` (resume, output_dir) -> (checkpoint or None, [`CheckpointEvent`]): "auto" is the newest
  *intact* checkpoint; each damaged newer one is skipped with an event naming its damaged files.
* `check_resumable` (checkpoint, fingerprint, allow_changes=): a resume whose settings or data changed is
  an `OutputDirError` unless each changed field is allowed.
* Writing: `begin` (a hidden temporary directory), `save_state` / `save_rng` into it, then `commit`
  (state.json, manifest, fsync, rename into place), then `prune` (never the checkpoint just written).
* Reading: `verify`, `read_state`, `load_state`, `load_rng`: never unpickles; damage is a `DamagedFileError`.

Crash safety: a checkpoint is assembled in ``.tmp-step-N`` and renamed into place; a replaced or pruned one
is first renamed to ``.old-``/``.trash-`` and then deleted. A kill -9 at any point leaves every ``step-N``
either complete or absent, and the next `claim_output_dir` finishes or removes the leftovers. The mechanism
(temporary sibling, rename, recovery, out-of-space errors) is `llmtune.core.atomic`, shared with export, quantize
and merge; the training loop holds `llmtune.core.lock` on the output directory while it writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from llmtune.core.atomic import (
    fsync_dir,
    fsync_tree,
    publish,
    recover_leftovers,
    remove_dir,
    tmp_sibling,
    translating_disk_full,
    write_json_atomic,
)
from llmtune.core.errors import ConfigError, DamagedFileError, LlmtuneError, OutputDirError
from llmtune.core.manifest import MANIFEST, manifest_problems, write_manifest

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
RUN_FILE = "run.json"
#: What a complete checkpoint must hold besides the per-process RNG files (and one of `WEIGHTS`).
REQUIRED = ("optimizer.safetensors", "scheduler.safetensors", STATE_FILE, MANIFEST)
#: What the method trained: an adapter, or the whole model (``method="full"``); a checkpoint holds one.
WEIGHTS = ("adapter", "model")
#: Entries of an output directory that belong to a run (moved away by ``overwrite``); eval-*.jsonl too.
RUN_ENTRIES = (CHECKPOINTS, "adapter", "model", "log.jsonl", "config.json", "result.json", RUN_FILE,
               "tensorboard", "mlflow.db")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TREE_KEY = "llmtune_tree"


# ---------------------------------------------------------------------------------------- events, run identity
@dataclasses.dataclass(frozen=True)
class CheckpointEvent:
    """Something the loop should log (``log.jsonl``) and report: a skipped damaged checkpoint, a cleanup."""

    event: str            #: "checkpoint_skipped", "fell_back", "recovered", "overwrote"
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"event": self.event, "path": self.path, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What makes two runs the same run: the settings that decide the trajectory, and a digest of the data."""

    config: Mapping[str, Any]
    data: str

    @property
    def digest(self) -> str:
        blob = json.dumps({"config": dict(self.config), "data": self.data}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "config": json.loads(json.dumps(dict(self.config), default=str)),
                "data": self.data}

    @classmethod
    def from_dict(cls, obj: Any, where: Path) -> Fingerprint:
        if not (isinstance(obj, dict) and isinstance(obj.get("config"), dict) and isinstance(obj.get("data"), str)):
            raise DamagedFileError(f"{where}: no run fingerprint (config + data) in it")
        return cls(config=obj["config"], data=obj["data"])

    def changes(self, before: Fingerprint) -> dict[str, tuple[Any, Any]]:
        """``{field: (before, now)}`` for every setting that differs (``"data"`` for the data)."""
        now = json.loads(json.dumps(dict(self.config), default=str))
        old = dict(before.config)
        out = {k: (old.get(k), now.get(k)) for k in sorted(set(now) | set(old)) if old.get(k) != now.get(k)}
        if before.data != self.data:
            out["data"] = (before.data, self.data)
        return out


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


@dataclasses.dataclass
class RunDir:
    """An output directory claimed by one run (what `claim_output_dir` returns)."""

    path: Path
    fingerprint: Fingerprint
    previous: Fingerprint | None            #: what run.json said before (None: a fresh directory)
    events: list[CheckpointEvent] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------- paths, listing
def step_dir(output_dir: Path, step: int) -> Path:
    """The directory of the checkpoint taken after optimizer step ``step``."""
    return output_dir / CHECKPOINTS / f"step-{step:06d}"


def tmp_dir_for(final: Path) -> Path:
    """The temporary sibling a checkpoint is assembled in before the rename."""
    return tmp_sibling(final)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory under ``output_dir/checkpoints`` as ``(step, path)``, oldest first.

    Damaged ones are listed too (`latest_intact` skips them); temporary and half-deleted ones are not.
    """
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def problems(checkpoint: Path) -> list[str]:
    """What is wrong with a checkpoint directory, one line each (empty: intact)."""
    found = manifest_problems(checkpoint)
    for name in REQUIRED:
        if not (checkpoint / name).exists() and not any(p.split(":")[0].rstrip("/").endswith(name) for p in found):
            found.append(f"{name}: missing")
    if not any((checkpoint / w).exists() for w in WEIGHTS) and not any(
            p.split(":")[0].split("/")[0] in WEIGHTS for p in found):
        found.append(f"{WEIGHTS[0]}: missing")
    if not found:
        try:
            read_state(checkpoint)
        except DamagedFileError as exc:
            found.append(str(exc))
    return found


def verify(checkpoint: Path) -> None:
    """Raise `DamagedFileError` naming every damaged or missing file of ``checkpoint``."""
    found = problems(checkpoint)
    if found:
        raise DamagedFileError(f"checkpoint {checkpoint} is damaged: " + "; ".join(found))


def latest_intact(output_dir: Path) -> tuple[Path | None, list[CheckpointEvent]]:
    """The newest intact checkpoint (or None): one "checkpoint_skipped" event per damaged newer one, then a
    "fell_back" event naming the checkpoint used (no events when the newest is intact)."""
    skipped: list[CheckpointEvent] = []
    for _step, path in reversed(list_checkpoints(output_dir)):
        found = problems(path)
        if not found:
            if skipped:
                skipped.append(CheckpointEvent("fell_back", str(path), f"the newest intact checkpoint; "
                                               f"{len(skipped)} newer damaged one(s) skipped"))
            return path, skipped
        skipped.append(CheckpointEvent("checkpoint_skipped", str(path), "; ".join(found)))
    return None, skipped


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest intact checkpoint, or None."""
    return latest_intact(output_dir)[0]


def resolve_resume(resume: bool | str | os.PathLike[str] | None,
                   output_dir: Path) -> tuple[Path | None, list[CheckpointEvent]]:
    """``resume`` (False; True/"auto": newest intact in output_dir; a checkpoint or a directory of them) -> path.

    A named checkpoint that is damaged is a `DamagedFileError`; with "auto" or a directory, damaged
    checkpoints are skipped (returned as events) for the newest intact one. No intact one at all is an error.
    """
    if resume is None or resume is False:
        return None, []
    if resume is True or resume == "auto":
        path, skipped = latest_intact(output_dir)
        if path is None and skipped:
            raise DamagedFileError(f"resume='auto': no intact checkpoint in {output_dir / CHECKPOINTS}: "
                                   + " | ".join(f"{e.path}: {e.reason}" for e in skipped))
        return path, skipped
    path = Path(resume)
    if _STEP_DIR.match(path.name) and path.is_dir():
        verify(path)
        return path, []
    base = path if (path / CHECKPOINTS).is_dir() else path.parent if path.name == CHECKPOINTS else None
    if base is not None and path.is_dir():
        found, skipped = latest_intact(base)
        if found is not None:
            return found, skipped
    raise ConfigError(f"resume={str(resume)!r}: not a checkpoint directory and no intact checkpoints under it. "
                      f"Pass a path like OUTPUT/{CHECKPOINTS}/step-000050, 'auto', or False.")


# ---------------------------------------------------------------------------------------- claiming a directory
def _remove(path: Path) -> None:
    """Delete a directory so that a crash never leaves it half-deleted under its own name."""
    remove_dir(path)


def _recover(directory: Path) -> list[CheckpointEvent]:
    """Finish or undo what a crash left in ``directory``: ``.tmp-X`` / ``.old-X`` / ``.trash-X``."""
    return [CheckpointEvent("recovered", path, what) for path, what in recover_leftovers(directory)]


def _read_run(output_dir: Path) -> Fingerprint | None:
    path = output_dir / RUN_FILE
    if not path.exists():
        return None
    try:
        return Fingerprint.from_dict(json.loads(path.read_text()), path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{path}: not valid JSON ({exc}); pass overwrite=True (CLI --overwrite) to "
                               "replace the run in this directory") from None


def _run_entries(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return [p for p in sorted(output_dir.iterdir())
            if p.name in RUN_ENTRIES or (p.name.startswith("eval-") and p.name.endswith(".jsonl"))]


def _clear(output_dir: Path) -> list[CheckpointEvent]:
    """Move another run's files out of ``output_dir`` (one rename each, then delete); others' files stay."""
    entries = _run_entries(output_dir)
    trash = output_dir / ".trash-overwritten"
    if trash.exists():
        shutil.rmtree(trash)
    trash.mkdir()
    for p in entries:
        os.replace(p, trash / p.name)
    fsync_dir(output_dir)
    shutil.rmtree(trash)
    return [CheckpointEvent("overwrote", str(output_dir), "removed " + ", ".join(p.name for p in entries))]


def claim_output_dir(output_dir: Path, fingerprint: Fingerprint, *, overwrite: bool = False,
                     resume: bool = False, allow_changes: Iterable[str] = ()) -> RunDir:
    """Make ``output_dir`` this run's: recover crash leftovers, refuse another run's directory, write run.json.

    Another run (run.json with a different fingerprint, or llmtune files without run.json) is an
    `OutputDirError` unless ``overwrite`` (its files are then removed; files that are not a run's are kept).
    With ``resume``, a fingerprint that differs only in fields listed in ``allow_changes`` is accepted.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    events = _recover(output_dir / CHECKPOINTS) + _recover(output_dir)
    # a run that stopped before writing anything (e.g. on bad inputs) leaves only run.json: nothing to protect
    entries = [p for p in _run_entries(output_dir) if p.name != RUN_FILE]
    previous = None
    if entries:
        try:
            previous = _read_run(output_dir)
        except DamagedFileError:
            if not overwrite:
                raise
    if previous is None and entries:
        if not overwrite:
            raise OutputDirError(f"output_dir {output_dir} holds files of a run llmtune cannot identify (no "
                                 f"{RUN_FILE}); use a new directory, or pass overwrite=True (CLI --overwrite)")
        events += _clear(output_dir)
    elif previous is not None and previous.digest != fingerprint.digest:
        changes = fingerprint.changes(previous)
        if overwrite:
            events += _clear(output_dir)
        elif not resume:
            raise OutputDirError(f"output_dir {output_dir} holds another run ({_describe(changes)}); use a new "
                                 "directory, pass overwrite=True (CLI --overwrite) to replace it, or resume it")
        elif set(changes) - set(allow_changes):
            raise _resume_error(output_dir, changes, set(allow_changes))
    write_json_atomic(output_dir / RUN_FILE, fingerprint.to_dict())
    return RunDir(output_dir, fingerprint, previous, events)


#: Settings that shape the trained weights or the optimizer's state: a checkpoint's tensors do not load under
#: other values, so no resume may change them (``allow_changes`` refuses them). ``model`` is not among them: a
#: base re-saved in another format, or a run.json written before content hashing, resumes with
#: ``--allow-change model`` (docs/checkpoints.md); the content check refuses it otherwise.
FIXED_ON_RESUME = ("trainer", "method", "rank", "targets", "num_virtual_tokens", "init", "bottleneck_size",
                   "bottleneck_sites", "bottleneck_placement", "quantizer", "optimizer")


def check_allow_changes(allow_changes: Iterable[str], options: Any, free: Iterable[str] = ()) -> tuple[str, ...]:
    """``allow_changes`` as a tuple, once each names a setting of ``options`` (a trainer's options dataclass) or
    ``data`` that a resume can change; an `InvalidOptionError` naming it and the allowed ones otherwise. Names in
    ``free`` (settings that are not part of the run's identity) need no allowing and are accepted."""
    from llmtune.core.errors import InvalidOptionError, did_you_mean

    names = tuple(allow_changes)
    known = {f.name for f in dataclasses.fields(options)} | {"trainer", "model", "data"}
    allowed = sorted(known - set(FIXED_ON_RESUME) - set(free))
    for name in names:
        flag = f"allow_changes {name!r} (CLI --allow-change {name})"
        if not isinstance(name, str) or name not in known:
            raise InvalidOptionError(f"{flag} is not a setting of this run.{did_you_mean(str(name), known)} A resume "
                                     f"may change: {', '.join(allowed)}", field="allow_changes")
        if name in FIXED_ON_RESUME:
            raise InvalidOptionError(f"{flag}: {name} shapes the trained weights or the optimizer state, so a "
                                     "checkpoint cannot continue under another value; restore it, or start a new run "
                                     f"(another output_dir, or --overwrite). A resume may change: {', '.join(allowed)}",
                                     field="allow_changes")
    return names


def _resume_error(where: Path, changes: Mapping[str, tuple[Any, Any]], allowed: set[str]) -> OutputDirError:
    bad = {k: v for k, v in changes.items() if k not in allowed}
    base = "; the base model's config.json or weight contents differ from the run's" if "model" in bad else ""
    fixed = [k for k in bad if k in FIXED_ON_RESUME]
    if fixed:
        return OutputDirError(f"cannot resume {where}: the run changed ({_describe(bad)}{base}); {', '.join(fixed)} "
                              "cannot change on resume (the checkpoint's weights or optimizer state have another "
                              "shape): restore the settings, or start a new run (another output_dir, or --overwrite)")
    return OutputDirError(f"cannot resume {where}: the run changed ({_describe(bad)}{base}); restore the settings, or "
                          f"allow it with allow_changes={sorted(bad)!r} (CLI: "
                          + " ".join(f"--allow-change {k}" for k in bad) + ")")


def check_resumable(checkpoint: Path, fingerprint: Fingerprint, allow_changes: Iterable[str] = ()) -> dict[str, Any]:
    """The checkpoint's state, after checking it was written by this run (up to ``allow_changes``)."""
    state = read_state(checkpoint)
    before = Fingerprint.from_dict(state.get("run"), checkpoint / STATE_FILE)
    changes = fingerprint.changes(before)
    allowed = set(allow_changes)
    if set(changes) - allowed:
        raise _resume_error(checkpoint, changes, allowed)
    return state


# ---------------------------------------------------------------------------------------- writing
def begin(final: Path) -> Path:
    """Create (fresh) the temporary directory for ``final`` and return it."""
    tmp = tmp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(final: Path, state: Mapping[str, Any] | None = None) -> Path:
    """Write ``state.json`` (if given) and the manifest, fsync, and rename the temporary directory to ``final``."""
    tmp = tmp_dir_for(final)
    with translating_disk_full(final):
        if state is not None:
            write_json(tmp / STATE_FILE, json.loads(json.dumps(state, default=str)))
        write_manifest(tmp)
        fsync_tree(tmp)
    return publish(tmp, final)


def abort(final: Path) -> None:
    """Remove the temporary directory of a checkpoint whose writing failed (frees the space at once)."""
    shutil.rmtree(tmp_dir_for(final), ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON (used inside a temporary checkpoint dir, so no extra atomicity needed)."""
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def prune(output_dir: Path, keep: int, *, current: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``keep`` remain (``keep <= 0`` keeps all); returns them.

    ``current`` (the checkpoint just written) is never deleted, even when older runs' steps are higher.
    """
    if keep <= 0:
        return []
    others = [p for _step, p in list_checkpoints(output_dir) if current is None or p != current]
    victims = others[:max(len(others) - (keep - (current is not None)), 0)]
    for path in victims:
        _remove(path)
    return victims


# ---------------------------------------------------------------------------------------- state without pickle
def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """A JSON tree for ``obj``; tensors go to ``tensors`` and are referenced by key."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, where) for v in obj]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, Mapping):
        pairs = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise LlmtuneError(f"{where}: cannot store a state key of type {type(k).__name__} ({k!r})")
            pairs.append([k, _encode(v, tensors, where)])
        return {"__map__": pairs}
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        return {"__ndarray__": str(obj.dtype), "shape": list(getattr(obj, "shape", ())), "data": obj.tolist()}
    raise LlmtuneError(f"{where}: cannot store a value of type {type(obj).__name__} in a checkpoint")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], where: Path) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if isinstance(node, dict) and len(node) == 1 and "__tuple__" in node:
        return tuple(_decode(v, tensors, where) for v in node["__tuple__"])
    if isinstance(node, dict) and len(node) == 1 and "__map__" in node:
        return {k: _decode(v, tensors, where) for k, v in node["__map__"]}
    if isinstance(node, dict) and set(node) == {"__tensor__"} and node["__tensor__"] in tensors:
        return tensors[node["__tensor__"]]
    if isinstance(node, dict) and set(node) == {"__ndarray__", "shape", "data"}:
        import numpy as np

        return np.asarray(node["data"], dtype=np.dtype(node["__ndarray__"])).reshape(node["shape"])
    raise DamagedFileError(f"{where}: unexpected entry {str(node)[:60]!r} in its state tree")


def save_state(directory: Path, name: str, state: Any) -> Path:
    """Write ``state`` (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) as ``name.safetensors``.

    The tensors are the file's tensors; the structure is a JSON tree in its header. Nothing is pickled.
    """
    from safetensors.torch import save_file

    path = directory / f"{name}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, str(path))
    save_file(tensors, str(path), metadata={_TREE_KEY: json.dumps(tree)})
    return path


def load_state(directory: Path, name: str) -> Any:
    """Read what `save_state` wrote (tensors on the CPU); never executes anything from the file."""
    from safetensors import SafetensorError, safe_open

    path = directory / f"{name}.safetensors"
    if not path.is_file():
        raise DamagedFileError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tree = json.loads((fh.metadata() or {})[_TREE_KEY])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise DamagedFileError(f"{path}: not a readable llmtune state file ({exc})") from None
    return _decode(tree, tensors, path)


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
    """Write this process's RNG states as ``rng-<rank>.safetensors``."""
    save_state(directory, f"rng-{rank}", rng_state())


def load_rng(directory: Path, rank: int) -> None:
    """Restore this process's RNG states from a checkpoint."""
    if not (directory / f"rng-{rank}.safetensors").exists():
        raise ConfigError(f"checkpoint {directory} has no RNG state for process {rank} (rng-{rank}.safetensors); "
                          "was it written by a run with fewer processes?")
    state = load_state(directory, f"rng-{rank}")
    try:
        set_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DamagedFileError(f"{directory / f'rng-{rank}.safetensors'}: not a usable RNG state ({exc})") from None


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint; unreadable or malformed is a `DamagedFileError` naming it."""
    path = checkpoint / STATE_FILE
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedFileError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(result, dict) or not isinstance(result.get("step"), int):
        raise DamagedFileError(f"{path}: no integer 'step' in it")
    return result
