"""Checks on paths made before any work starts: never write over an input, fail before loading a model; read
an input file with one clear error when it cannot be read."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from llmtune.core.errors import ConfigError


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(out: str | Path, inputs: Iterable[str | Path | None] = (), *, what: str = "--out") -> Path:
    """``out`` as a Path, or a `ConfigError` when writing a directory there would be unsafe or impossible.

    Refused: an output that is, or contains, one of ``inputs`` (writing there would overwrite the source:
    ``quantize M --out M``) or lies inside an input directory (``quantize M --out M/quantized``), a path
    that exists and is not a directory, and a location that cannot be written (read-only directory). Symbolic
    links are resolved first, so a link to the source is the source.
    """
    path = Path(out).expanduser()
    target = path.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).expanduser()
        if not source.exists():
            continue
        src = source.resolve()
        relation = ("is" if src == target else "contains" if _within(src, target) else
                    "lies inside" if src.is_dir() and _within(target, src) else None)
        if relation:
            harm = "add files to it" if relation == "lies inside" else "overwrite it"
            raise ConfigError(f"{what} {path} {relation} the input {source}: writing there would {harm}; "
                              "choose another output directory")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable (permission denied)")
    return path


def read_text_file(path: Path) -> str:
    """The file's UTF-8 text; a missing, unreadable or non-UTF-8 file is a `ConfigError` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied (cannot read it)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
