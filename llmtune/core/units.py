"""Byte units, defined once."""

from __future__ import annotations

__all__ = ["MiB"]

#: 2**20 bytes.
MiB = 2**20
