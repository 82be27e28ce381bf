"""Installed package versions, read from metadata (never by importing the package), and their comparison."""

from __future__ import annotations

import re

__all__ = ["installed_version", "release"]


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (e.g. ``"transformers"``), or None when not installed."""
    import importlib.metadata  # here: it is slow to import, and most callers never need it

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string, for comparing: ``"2.14.1+cpu"`` -> ``(2, 14, 1)``,
    ``"5.17.0.dev0"`` -> ``(5, 17, 0)``, ``"2026.10.9"`` -> ``(2026, 10, 9)``; ``()`` when it starts with none."""
    nums = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in nums.group(1).split(".")) if nums else ()
