"""The built-in reward functions (backend ``llmtune``): exact match, numeric final answer, regex format, length.

Pure Python (no torch). Each is a `llmtune.core.interfaces.Reward` with a frozen options dataclass; the record
field a reward compares against is named by its ``field`` option and arrives as a keyword argument with one
value per completion.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.interfaces import Reward
from llmtune.core.options import check_choice


def _field(fields: dict[str, Sequence[Any]], name: str, n: int, who: str) -> Sequence[Any]:
    """The record field ``name``, one value per completion; a clear error when the records lack it."""
    if name not in fields:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"reward {who!r} compares against the record field {name!r}, which the training records "
                          f"do not have (their fields: {known}); add it or set the reward's option field=")
    values = fields[name]
    if len(values) != n:
        raise ConfigError(f"reward {who!r}: {len(values)} values of field {name!r} for {n} completions")
    return values


@dataclasses.dataclass(frozen=True)
class ExactMatchOptions:
    field: str = "answer"
    ignore_case: bool = False


class ExactMatch(Reward):
    """1.0 when the stripped completion equals the stripped reference ``field`` (optionally ignoring case)."""

    name: ClassVar[str] = "exact_match"
    backend: ClassVar[str] = "llmtune"
    Options: ClassVar[type] = ExactMatchOptions

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **fields: Sequence[Any]) -> list[float | None]:
        refs = _field(fields, self.options.field, len(completions), self.name)
        fold = str.lower if self.options.ignore_case else str
        return [None if ref is None else float(fold(c.strip()) == fold(str(ref).strip()))
                for c, ref in zip(completions, refs)]


@dataclasses.dataclass(frozen=True)
class NumericAnswerOptions:
    field: str = "answer"
    extract: str = "####"  #: "####" (GSM8K's strict "#### number") or "last" (the last number in the text)
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        check_choice("extract", self.extract, ("####", "last"))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """A number written as GSM8K writes them (``1,234``, ``$5``, ``3.``), or None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def final_answer(text: str, extract: str = "####") -> float | None:
    """The final numeric answer of ``text``: after GSM8K's ``####`` (the harness's strict-match), or the last number."""
    from llmtune.tasks.metrics import INVALID, extract_strict

    if extract == "####":
        found = extract_strict(text)
        return None if found == INVALID else parse_number(found)
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


class NumericAnswer(Reward):
    """1.0 when the completion's final number equals the reference's (a number, or a GSM8K answer ``... #### 42``)."""

    name: ClassVar[str] = "numeric_answer"
    backend: ClassVar[str] = "llmtune"
    Options: ClassVar[type] = NumericAnswerOptions

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **fields: Sequence[Any]) -> list[float | None]:
        refs = _field(fields, self.options.field, len(completions), self.name)
        out: list[float | None] = []
        for c, ref in zip(completions, refs):
            want = self.reference(ref)
            got = final_answer(c, self.options.extract)
            out.append(None if want is None else float(got is not None and abs(got - want) <= self.options.tolerance))
        return out

    @staticmethod
    def reference(ref: Any) -> float | None:
        if isinstance(ref, (int, float)) and not isinstance(ref, bool):
            return float(ref)
        if ref is None:
            return None
        text = str(ref)
        return final_answer(text, "####") if "####" in text else parse_number(text)


@dataclasses.dataclass(frozen=True)
class FormatOptions:
    pattern: str = ""
    mode: str = "search"  #: "search" (found anywhere) or "fullmatch" (the whole stripped completion)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("search", "fullmatch"))
        if not self.pattern:
            raise InvalidOptionError("reward 'format' needs option pattern= (a regular expression)", field="pattern")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise InvalidOptionError(f"option pattern={self.pattern!r} is not a regular expression: {exc}",
                                     field="pattern") from None


class FormatMatch(Reward):
    """1.0 when the completion matches the regular expression ``pattern`` (``re.DOTALL``), else 0.0."""

    name: ClassVar[str] = "format"
    backend: ClassVar[str] = "llmtune"
    Options: ClassVar[type] = FormatOptions

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **fields: Sequence[Any]) -> list[float | None]:
        rx = re.compile(self.options.pattern, re.DOTALL)
        match = rx.search if self.options.mode == "search" else (lambda s: rx.fullmatch(s.strip()))
        return [float(match(c) is not None) for c in completions]


@dataclasses.dataclass(frozen=True)
class LengthOptions:
    unit: str = "chars"  #: "chars" or "words" (whitespace-separated)
    target: int | None = None  #: None: the length itself; else -abs(length - target) / target

    def __post_init__(self) -> None:
        check_choice("unit", self.unit, ("chars", "words"))
        if self.target is not None and (not isinstance(self.target, int) or isinstance(self.target, bool)
                                        or self.target < 1):
            raise InvalidOptionError(f"option target={self.target!r} must be an int >= 1 or null", field="target")


class Length(Reward):
    """The completion's length (give it a negative weight for a length penalty), or its distance to ``target``."""

    name: ClassVar[str] = "length"
    backend: ClassVar[str] = "llmtune"
    Options: ClassVar[type] = LengthOptions

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **fields: Sequence[Any]) -> list[float | None]:
        sizes = [len(c) if self.options.unit == "chars" else len(c.split()) for c in completions]
        target = self.options.target
        return [float(n) if target is None else -abs(n - target) / target for n in sizes]


__all__ = ["ExactMatch", "FormatMatch", "Length", "NumericAnswer", "final_answer", "parse_number"]
