"""Checksum manifests: ``manifest.json`` lists every file of a saved directory with its size and SHA-256.

Written last, just before a directory is published (a training checkpoint, a final adapter, a quantized
model); checked before it is read. A truncated, emptied, altered or missing file is then named instead of
surfacing as a raw ``SafetensorError`` / ``JSONDecodeError`` — or, worse, loading silently with flipped bytes.

No torch here (``llmtune.core`` stays light): only `hashlib` and the file system.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llmtune.core.errors import DamagedFileError

MANIFEST = "manifest.json"
FORMAT = "llmtune-manifest/1"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative, '/'-separated, sorted), the manifest itself excluded."""
    found = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            rel = Path(root, name).relative_to(directory).as_posix()
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def write_manifest(directory: str | os.PathLike[str]) -> Path:
    """Hash every file under ``directory`` into ``directory/manifest.json``; returns the manifest's path."""
    root = Path(directory)
    files = {rel: {"bytes": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)} for rel in _files(root)}
    path = root / MANIFEST
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedFileError(f"{path}: missing (the directory was not completely written)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{path}: not a readable manifest ({exc})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict):
        raise DamagedFileError(f"{path}: not an {FORMAT} manifest")
    return files


def manifest_problems(directory: str | os.PathLike[str]) -> list[str]:
    """What is wrong with ``directory`` against its manifest, one line per file (empty: intact).

    A missing or unreadable manifest is itself a problem. Files that the manifest does not list (e.g. a
    tokenizer saved next to a quantized model afterwards) are not checked.
    """
    root = Path(directory)
    try:
        files = _read_manifest(root)
    except DamagedFileError as exc:
        return [str(exc)]
    problems = []
    missing_dirs: set[str] = set()
    for rel, entry in sorted(files.items()):
        path = root / rel
        top = rel.split("/", 1)[0]
        if not path.is_file():
            if "/" in rel and not (root / top).exists():
                missing_dirs.add(top)
            else:
                problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        want = entry.get("bytes") if isinstance(entry, dict) else None
        if size != want:
            kind = "empty" if size == 0 else "truncated" if isinstance(want, int) and size < want else "wrong size"
            problems.append(f"{rel}: {kind} ({size} bytes, manifest says {want})")
        elif file_sha256(path) != entry.get("sha256"):
            problems.append(f"{rel}: checksum mismatch (contents altered)")
    problems[:0] = [f"{d}/: missing" for d in sorted(missing_dirs)]
    return problems


def verify_manifest(directory: str | os.PathLike[str], *, required: bool = True) -> None:
    """Raise `DamagedFileError` naming every damaged file of ``directory``.

    ``required=False``: a directory without a manifest (written by another tool) passes unchecked.
    """
    root = Path(directory)
    if not required and not (root / MANIFEST).exists():
        return
    problems = manifest_problems(root)
    if problems:
        raise DamagedFileError(f"{root} is damaged: " + "; ".join(problems)
                               + f" (if you changed a file on purpose, delete {root / MANIFEST})")
