"""SHA-256 of large files, hashed once: cached by (resolved path, size, mtime_ns, inode) in the user cache.

A training run names its local base model by the hash of its weight files (so a resume onto changed weights is
refused); a 16 GB base is read once, later runs find its hash in the cache. A file changed in place gets a new
mtime (and usually size), so its cached hash is not used.

The cache is ``$LLMTUNE_CACHE_DIR/file-hashes.json``, else ``$XDG_CACHE_HOME/llmtune/``, else
``~/.cache/llmtune/``. A cache that cannot be read or written is ignored (the file is then hashed every time).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from llmtune.core.manifest import file_sha256

CACHE_ENV = "LLMTUNE_CACHE_DIR"
CACHE_FILE = "file-hashes.json"
#: Entries kept (the most recently written win); a few hundred models' shards.
MAX_ENTRIES = 4096


def cache_dir() -> Path:
    """Where llmtune keeps its cache: ``$LLMTUNE_CACHE_DIR``, ``$XDG_CACHE_HOME/llmtune`` or ``~/.cache/llmtune``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "llmtune"


def _key(path: Path) -> tuple[str, str]:
    st = path.stat()
    return str(path.resolve()), f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _load(cache: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def content_sha256(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file's contents; from the cache when the file is unchanged since it was hashed."""
    from llmtune.core.atomic import write_json_atomic

    file = Path(path)
    name, stamp = _key(file)
    cache = cache_dir() / CACHE_FILE
    entry = _load(cache).get(name)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(file)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        entries = _load(cache)  # re-read: another process may have added entries meanwhile
        entries.pop(name, None)
        entries[name] = {"stamp": stamp, "sha256": digest}
        write_json_atomic(cache, dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest
