"""`llmtune.core.atomic`, `llmtune.core.lock`, `llmtune.core.filecache`, `llmtune.core.signals` on their own:
an output appears whole or not at all (kill -9, a full disk, an exception), one writer per output across real
processes, a stale lock is taken over and said so, file hashes are computed once, SIGTERM exits like Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmtune.core import atomic, filecache
from llmtune.core.errors import DiskFullError, OutputLockedError
from llmtune.core.lock import LOCK_FILE, lock_output, lock_output_dir
from llmtune.core.manifest import verify_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, *, fsize: int | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter; ``fsize``: a file-size limit (RLIMIT_FSIZE) with SIGXFSZ ignored, so a write
    past it fails with EFBIG as on a full disk."""
    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)},
                          preexec_fn=limit if fsize is not None else None)


def make_output(path: Path, payload: bytes) -> None:
    with atomic.atomic_dir(path) as tmp:
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "info.json").write_text("{}")
        write_manifest(tmp)


# ---------------------------------------------------------------------------------------- atomic directories
def test_a_failed_write_leaves_the_previous_output_whole_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_output(out, b"old" * 100)
    with pytest.raises(RuntimeError, match="boom"), atomic.atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"new, half")
        raise RuntimeError("boom")
    verify_manifest(out)
    assert (out / "weights.bin").read_bytes() == b"old" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_finished_write_replaces_the_output_and_keeps_the_users_own_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_output(out, b"old")
    (out / "notes.txt").write_text("mine")
    make_output(out, b"new")
    assert (out / "weights.bin").read_bytes() == b"new" and not (out / "notes.txt").exists()
    (out / "notes.txt").write_text("mine")
    with atomic.atomic_dir(out, keep_others=True) as tmp:
        (tmp / "other.bin").write_bytes(b"x")
        write_manifest(tmp)
    # the previous output's files (in its manifest) are gone, the user's file is kept, nothing else is left
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_KILL_IN_THE_MIDDLE = """
    import os, signal
    from pathlib import Path
    from llmtune.core import atomic
    from llmtune.core.manifest import write_manifest
    out = Path({out!r})
    real = os.replace
    def replace_then_die(src, dst, *a, **k):
        real(src, dst, *a, **k)
        if {between!r} and str(dst).endswith(".old-out"):   # the old output renamed away, the new not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
    with atomic.atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"new" * 1000)
        write_manifest(tmp)
        if not {between!r}:
            with open(tmp / "weights.bin", "r+b") as fh:
                fh.truncate(10)             # a half-written file, then kill -9 before the rename
            os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("between", [False, True], ids=["while-writing", "between-the-renames"])
def test_kill_9_leaves_nothing_complete_looking_and_the_next_writer_recovers(tmp_path: Path, between: bool) -> None:
    out = tmp_path / "out"
    make_output(out, b"old" * 100)
    proc = run_python(_KILL_IN_THE_MIDDLE.format(out=str(out), between=between))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if between:   # the final name is absent (nothing looks complete); the old copy waits beside it, intact
        assert not out.exists() and (tmp_path / ".old-out").is_dir() and (tmp_path / ".tmp-out").is_dir()
    else:         # the old output is untouched; the broken new one is out of sight
        verify_manifest(out)
        assert (out / "weights.bin").read_bytes() == b"old" * 100
    # the next writer of that name finishes what the crash left (the complete new copy wins), then writes
    done = atomic.recover_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], done
    verify_manifest(out)
    assert (out / "weights.bin").read_bytes() == (b"new" * 1000 if between else b"old" * 100)


_WRITE_PAST_THE_LIMIT = """
    from pathlib import Path
    from llmtune.core import atomic
    from llmtune.core.errors import DiskFullError
    out = Path({out!r})
    try:
        with atomic.atomic_dir(out) as tmp:
            {write}
    except DiskFullError as exc:
        print("DISKFULL", exc)
"""


@pytest.mark.parametrize("write", [
    '(tmp / "a.bin").write_bytes(b"x" * 400_000)',
    'import numpy as np; np.zeros(100_000).tofile(str(tmp / "a.npy"))',
    'import torch; from safetensors.torch import save_file; save_file({"w": torch.zeros(100_000)}, str(tmp / "a.st"))',
], ids=["python", "numpy-tofile", "safetensors"])
def test_a_full_disk_is_one_typed_line_naming_the_path_and_nothing_is_left(tmp_path: Path, write: str) -> None:
    if "torch" in write:
        pytest.importorskip("torch")
    out = tmp_path / "out"
    proc = run_python(_WRITE_PAST_THE_LIMIT.format(out=str(out), write=write), fsize=100_000)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"DISKFULL {out}: no space left on device"), proc.stdout + proc.stderr
    assert "\n" not in line
    assert list(tmp_path.iterdir()) == []   # the temporary directory is removed: its space is free again


def test_disk_full_error_is_typed_and_only_for_lost_writes() -> None:
    import errno

    assert isinstance(atomic.disk_full_error(OSError(errno.ENOSPC, "No space left on device"), "/x"), DiskFullError)
    assert isinstance(atomic.disk_full_error(OSError("720896 requested and 575456 written"), "/x"), DiskFullError)
    assert atomic.disk_full_error(OSError(errno.EACCES, "Permission denied"), "/x") is None
    assert atomic.disk_full_error(ValueError("bad value"), "/x") is None
    err = atomic.disk_full_error(OSError(errno.EFBIG, "File too large"), "/data/out")
    assert err is not None and str(err).startswith("/data/out: no space left on device")


# ---------------------------------------------------------------------------------------- locks
_HOLD_LOCK = """
    import sys, time
    from pathlib import Path
    from llmtune.core.lock import lock_output_dir
    lock = lock_output_dir(Path({out!r}))
    print("LOCKED", flush=True)
    sys.stdin.readline()   # hold it until the test says so
    lock.release()
"""


def test_a_second_process_is_refused_at_once_naming_the_directory_and_the_owner(tmp_path: Path) -> None:
    out = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLD_LOCK.format(out=str(out)))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "LOCKED"
        with pytest.raises(OutputLockedError) as caught:
            lock_output_dir(out)
        message = str(caught.value)
        assert str(out) in message and f"pid {owner.pid}" in message and "\n" not in message
    finally:
        assert owner.stdin is not None
        owner.stdin.write("\n")
        owner.stdin.close()
        owner.wait(timeout=60)
    lock = lock_output_dir(out)   # the owner is gone (it released the lock): free
    assert lock.taken_over is None
    lock.release()
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_of_a_killed_process_is_taken_over_and_said_so(tmp_path: Path) -> None:
    out = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLD_LOCK.format(out=str(out)))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert owner.stdout is not None and owner.stdout.readline().strip() == "LOCKED"
    owner.kill()  # kill -9: the lock file stays, the kernel drops the lock
    owner.wait(timeout=60)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == owner.pid
    lock = lock_output_dir(out)
    try:
        assert lock.taken_over is not None and f"pid {owner.pid}" in lock.taken_over
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_replaced_output_is_locked_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with lock_output(out):
        assert (tmp_path / ".export.lock").is_file() and not out.exists()
        with pytest.raises(OutputLockedError, match=f"--out {out} is in use"), lock_output(out):
            pass
    assert not (tmp_path / ".export.lock").exists()


# ---------------------------------------------------------------------------------------- content hashes
def test_file_hashes_are_computed_once_and_again_when_the_file_changes(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv("LLMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []
    real = filecache.file_sha256
    monkeypatch.setattr(filecache, "file_sha256", lambda p: calls.append(p) or real(p))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    assert filecache.content_sha256(weights) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert filecache.content_sha256(weights) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(calls) == 1 and (tmp_path / "cache" / filecache.CACHE_FILE).is_file()
    weights.write_bytes(b"b" * 1000)  # same size, new contents
    assert filecache.content_sha256(weights) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 2


def test_the_cache_lives_where_the_user_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMTUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert filecache.cache_dir() == tmp_path / "xdg" / "llmtune"
    monkeypatch.setenv("LLMTUNE_CACHE_DIR", str(tmp_path / "mine"))
    assert filecache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("LLMTUNE_CACHE_DIR")
    assert filecache.cache_dir() == Path.home() / ".cache" / "llmtune"


def test_an_unwritable_cache_still_gives_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("LLMTUNE_CACHE_DIR", str(blocker / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    assert filecache.content_sha256(weights) == filecache.file_sha256(weights)


# ---------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_unwinds_like_ctrl_c_removing_the_temporary_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_python(f"""
        import os, signal, sys
        from pathlib import Path
        from llmtune.core import atomic
        from llmtune.core.signals import exit_code, sigterm_raises
        try:
            with sigterm_raises(), atomic.atomic_dir(Path({str(out)!r})) as tmp:
                (tmp / "half.bin").write_bytes(b"x")
                os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt as exc:
            sys.exit(exit_code(exc))
    """)
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []
