"""Typed backend options: each backend declares a dataclass, unknown keys are errors.

A backend's ``Options`` is a (frozen) dataclass. ``build_options`` turns keyword arguments into
an instance, rejecting keys the dataclass does not declare (with the closest valid key), so a
typo such as ``use_stemer=True`` is an error instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from llmtune.core.errors import InvalidOptionError, UnknownOptionError, did_you_mean

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For backends that take no options."""


def option_names(options_cls: type) -> list[str]:
    """The keyword names an options dataclass accepts."""
    return [f.name for f in dataclasses.fields(options_cls) if f.init]


def build_options(options_cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Instantiate ``options_cls`` from ``values``; unknown keys raise `UnknownOptionError`.

    ``where`` names the backend in the message, e.g. ``"metric 'rouge' (backend 'numpy')"``.
    Value checks belong in the dataclass's ``__post_init__`` (raise `InvalidOptionError`).
    """
    valid = option_names(options_cls)
    for key in values:
        if key not in valid:
            known = ", ".join(valid) if valid else "no options"
            raise UnknownOptionError(
                f"{where} does not take option {key!r}.{did_you_mean(key, valid)} "
                f"It takes: {known}.",
                field=key,
            )
    try:
        return options_cls(**values)
    except InvalidOptionError as exc:
        raise InvalidOptionError(f"{where}: {exc}", field=exc.field) from None


def check_choice(field: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise `InvalidOptionError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        hint = did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
        raise InvalidOptionError(f"option {field}={value!r} is not one of {shown}.{hint}", field=field)


def check_type(field: str, value: object, types: type | tuple[type, ...]) -> None:
    """Raise `InvalidOptionError` unless ``value`` is an instance of ``types`` (bool is not an int)."""
    want = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in want:
        ok = False
    else:
        ok = isinstance(value, want)
    if not ok:
        names = " or ".join(t.__name__ for t in want)
        raise InvalidOptionError(f"option {field}={value!r} must be {names}, not {type(value).__name__}", field=field)


def check_positive(field: str, value: object, types: type | tuple[type, ...] = int, *, zero_ok: bool = False) -> None:
    """Raise `InvalidOptionError` unless ``value`` is of ``types`` (see `check_type`), finite and > 0
    (>= 0 with ``zero_ok``)."""
    check_type(field, value, types)
    assert isinstance(value, (int, float))
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise InvalidOptionError(f"option {field}={value!r} must be a finite number {'>= 0' if zero_ok else '> 0'}",
                                 field=field)
