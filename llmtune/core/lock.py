"""One writer per output: an OS-level lock (``fcntl.flock``) on a lock file that records its owner's pid and host.

The kernel releases a ``flock`` when its process dies, however it dies (kill -9 included), so a lock is never
held by a dead process; a lock *file* left behind by one (it could not delete it) is taken over, and the
`OutputLock` says so in ``taken_over`` for the caller to report (the library prints nothing).

A second writer fails at once with `OutputLockedError` naming the output and the owner's pid and host. The
lock file is deleted on release; a writer that opened a file being deleted notices (the path no longer names
its file) and tries again, so two writers never both hold "the" lock.

Training takes ``OUT/.llmtune.lock`` (`lock_output_dir`); export, quantize and merge, which replace their whole
output directory, take ``PARENT/.NAME.lock`` beside it (`lock_output`). On systems without ``fcntl``
(Windows) the lock file is created exclusively (``O_EXCL``) instead, and a stale one must be deleted by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from llmtune.core.errors import OutputLockedError

LOCK_FILE = ".llmtune.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - windows
    fcntl = None  # type: ignore[assignment]


@dataclasses.dataclass
class OutputLock:
    """A held lock: release it with `release` (or use `lock_output` as a context manager)."""

    path: Path                      #: the lock file
    output: Path                    #: what it guards
    fd: int
    taken_over: str | None = None   #: "pid 123 on host h (no longer running)" when a stale lock file was taken over

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.path, self.fd):
                self.path.unlink()
        os.close(self.fd)
        self.fd = -1


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _owner(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {int(info['pid'])} on host {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process (its lock file holds no pid)"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace")


def _refuse(output: Path, owner: str, what: str) -> OutputLockedError:
    return OutputLockedError(f"{what} {output} is in use by another llmtune process ({owner}); wait for it to "
                             "finish, or choose another directory")


def acquire(lock_path: Path, output: Path, *, what: str = "output_dir") -> OutputLock:
    """Take the lock at ``lock_path`` for ``output`` or raise `OutputLockedError` at once (no waiting)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - windows
        return _acquire_excl(lock_path, output, what)
    for _attempt in range(20):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _read(fd)
            os.close(fd)
            raise _refuse(output, _owner(text), what) from None
        if not _same_file(lock_path, fd):  # its owner deleted it while we opened it: try the new one
            os.close(fd)
            continue
        before = _read(fd).strip()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        stale = f"{_owner(before)} (no longer running)" if before else None
        return OutputLock(lock_path, output, fd, stale)
    raise _refuse(output, "a process that keeps replacing its lock file", what)  # pragma: no cover


def _acquire_excl(lock_path: Path, output: Path, what: str) -> OutputLock:  # pragma: no cover - windows
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise _refuse(output, _owner(lock_path.read_text(errors="replace")) + f"; if it is gone, delete {lock_path}",
                      what) from None
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    return OutputLock(lock_path, output, fd)


def lock_output_dir(output_dir: Path, *, what: str = "output_dir") -> OutputLock:
    """Lock a directory that is written in place (a training run): ``OUT/.llmtune.lock``."""
    return acquire(output_dir / LOCK_FILE, output_dir, what=what)


@contextlib.contextmanager
def lock_output(output: Path, *, what: str = "--out") -> Iterator[OutputLock]:
    """Hold the lock of an output that is replaced as a whole (export, quantize, merge): ``PARENT/.NAME.lock``."""
    named = output.resolve() if output.name in ("", ".", "..") else output
    lock = acquire(named.parent / f".{named.name}.lock", output, what=what)
    try:
        yield lock
    finally:
        lock.release()
