"""An example reward plugin: 1.0 when the completion contains a keyword (its option ``word``), else 0.0.

It imports only llmtune's public API (``llmtune.Reward``), as a third-party package would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import llmtune


@dataclasses.dataclass(frozen=True)
class KeywordOptions:
    word: str = "kopi"
    ignore_case: bool = True


class Keyword(llmtune.Reward):
    name: ClassVar[str] = "keyword"
    backend: ClassVar[str] = "example"
    Options: ClassVar[type] = KeywordOptions

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **fields: Sequence[Any]) -> list[float | None]:
        word = self.options.word.lower() if self.options.ignore_case else self.options.word
        return [float(word in (c.lower() if self.options.ignore_case else c)) for c in completions]
