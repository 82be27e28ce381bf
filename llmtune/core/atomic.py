"""Atomic outputs: a directory or file is written under a hidden temporary sibling and renamed into place at the
end, so nothing under its final name is ever half-written. Every writer of llmtune uses this module (training
checkpoints and the final adapter, export, quantize, merge).

* `atomic_dir` (final) -> the temporary sibling ``.tmp-NAME`` to write into; on success it is flushed to disk and
  renamed to ``NAME`` (an existing ``NAME`` is first renamed to ``.old-NAME``, then deleted). On any failure
  (an exception, Ctrl-C, SIGTERM through `llmtune.core.signals`) the temporary directory is removed.
* `recover_leftovers` (directory): what a kill -9 left: a complete ``.tmp-X``/``.old-X`` (its manifest intact)
  whose ``X`` is missing is restored, everything else is removed.
* `write_json_atomic` (path, obj): one file, through a temporary sibling and ``os.replace``.
* `disk_full_error` / `translating_disk_full`: a write that ran out of space (``ENOSPC``/``EDQUOT``, a
  file-size limit ``EFBIG``, numpy's short write ``N requested and M written``, safetensors' ``os error 28``)
  becomes a one-line `DiskFullError` naming the path and saying "no space left on device".

No torch here (``llmtune.core`` stays light).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmtune.core.errors import DiskFullError

_LEFTOVER = re.compile(r"^\.(tmp|old|trash)-(.+)$")
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})
#: How a lost write shows when the errno is not kept: numpy's ``tofile`` and the Rust io errors of safetensors.
_ERRNO_ALTERNATIVES = "|".join(str(e) for e in sorted(_NO_SPACE_ERRNOS))
_NO_SPACE_TEXT = re.compile(rf"\d+ requested and \d+ written|\(os error ({_ERRNO_ALTERNATIVES})\)|"
                            r"No space left on device|File too large|Disk quota exceeded")


# ---------------------------------------------------------------------------------------- disk full
def disk_full_error(exc: BaseException, path: str | os.PathLike[str]) -> DiskFullError | None:
    """A `DiskFullError` naming ``path`` when ``exc`` (or what caused it) is an out-of-space write, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DiskFullError):
            return seen
        if (isinstance(seen, OSError) and seen.errno in _NO_SPACE_ERRNOS) or _NO_SPACE_TEXT.search(str(seen)):
            return DiskFullError(f"{path}: no space left on device (writing it failed: "
                                 f"{' '.join(str(seen).split())[:200]}); free some space and run again")
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def translating_disk_full(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an out-of-space failure inside the block as a `DiskFullError` naming ``path``."""
    try:
        yield
    except Exception as exc:
        full = disk_full_error(exc, path)
        if full is None or full is exc:
            raise
        raise full from None


# ---------------------------------------------------------------------------------------- flushing
def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (best effort: some filesystems cannot open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


# ---------------------------------------------------------------------------------------- one file
def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path`` (readers never see half)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with translating_disk_full(path):
            tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- directories
def tmp_sibling(final: Path) -> Path:
    """The hidden temporary sibling ``final`` is assembled in before the rename."""
    return final.parent / f".tmp-{final.name}"


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_dir(path: Path) -> None:
    """Delete a directory so that a crash never leaves it half-deleted under its own name (``.trash-`` first)."""
    trash = path.parent / f".trash-{path.name}"
    _rmtree(trash)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


def publish(tmp: Path, final: Path) -> Path:
    """Rename the finished ``tmp`` to ``final``; an existing ``final`` is renamed to ``.old-NAME`` first and then
    deleted (a kill between the two renames leaves ``.old-NAME``, which `recover_leftovers` restores)."""
    if final.exists() or final.is_symlink():
        old = final.parent / f".old-{final.name}"
        _rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        _rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def _carry_over(final: Path, tmp: Path) -> None:
    """Hard-link (or copy) into ``tmp`` the files of ``final`` that are not part of what was written there before
    (not listed in its manifest, not a marker) and that the new output does not write: files a user keeps there."""
    from llmtune.core.manifest import MANIFEST

    if not final.is_dir():
        return
    try:
        listed = set(json.loads((final / MANIFEST).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        listed = set()
    for entry in final.iterdir():
        if entry.name in listed or entry.name == MANIFEST or (tmp / entry.name).exists() or entry.is_symlink():
            continue
        if entry.is_dir():
            if not any(rel.startswith(entry.name + "/") for rel in listed):
                shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(tmp / entry.name))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, keep_others: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yields the temporary sibling to write into; renamed to ``final`` when the
    block ends without an error (after an fsync of every file), removed when it fails in any way.

    ``keep_others``: files already in ``final`` that the previous output did not write (not in its manifest)
    and the new one does not write are kept (hard-linked into the new directory before the swap). An
    out-of-space failure is a `DiskFullError` naming ``final``.
    """
    target = Path(final)
    if target.name in ("", ".", ".."):
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(target.parent, only=target.name)
    tmp = tmp_sibling(target)
    _rmtree(tmp)
    tmp.mkdir()
    try:
        with translating_disk_full(target):
            yield tmp
            if keep_others:
                _carry_over(target, tmp)
            fsync_tree(tmp)
    except BaseException:
        _rmtree(tmp)
        raise
    publish(tmp, target)


def recover_leftovers(directory: Path, *, only: str | None = None) -> list[tuple[str, str]]:
    """Finish or undo what a crash left in ``directory`` (``.tmp-X``, ``.old-X``, ``.trash-X``; with ``only``,
    for that one name X). A complete copy (manifest intact) whose ``X`` is missing is restored, a newer (tmp)
    before an older (old); every other leftover is removed. Returns ``(path, what was done)`` pairs."""
    from llmtune.core.manifest import manifest_problems

    done: list[tuple[str, str]] = []
    if not directory.is_dir():
        return done
    order = {"tmp": 0, "old": 1, "trash": 2}  # a finished new copy wins over the one it replaced
    leftovers = [(m, c) for c in directory.iterdir()
                 if (m := _LEFTOVER.match(c.name)) and c.is_dir() and (only is None or m.group(2) == only)]
    for m, child in sorted(leftovers, key=lambda mc: (order[mc[0].group(1)], mc[1].name)):
        kind, name = m.groups()
        final = directory / name
        if kind in ("tmp", "old") and not final.exists() and not manifest_problems(child):
            os.replace(child, final)
            done.append((str(final), f"restored from {child.name} after a crash"))
            continue
        shutil.rmtree(child, ignore_errors=True)
        done.append((str(child), f"removed an unfinished {kind} directory"))
    return done
