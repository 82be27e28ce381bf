"""``skip_modules``: which modules a quantizer leaves in full precision. One meaning for every backend.

A pattern selects a module when it names the module **or one of its parents**, where a name is matched

- exactly, or as a dotted suffix: ``"down_proj"`` and ``"mlp.down_proj"`` both select
  ``model.layers.3.mlp.down_proj``; ``"proj"`` selects nothing (whole dotted parts only);
- as a glob when the pattern holds one of ``* ? [`` (``fnmatch``, case-sensitive, against the whole name):
  ``"model.layers.*.mlp.*"``.

Parents count, so ``"model.layers.0"`` (or ``"layers.0"``) skips every linear layer of block 0 and
``"mlp"`` every linear layer of every MLP. bitsandbytes (`llmtune.quantizers.bnb`) and GPTQ/RTN
(`llmtune.quantizers.gptq`) both call `skip_matches`; `hf_skip_regex` tells transformers the same thing.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from llmtune.core.errors import InvalidOptionError

__all__ = ["check_skip_modules", "hf_skip_regex", "is_skipped", "skip_matches"]

_GLOB_CHARS = frozenset("*?[")


def check_skip_modules(value: object) -> tuple[str, ...]:
    """Validate ``skip_modules`` (a list or tuple of module-name patterns) and return it as a tuple."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidOptionError(
            f"option skip_modules={value!r} must be a list of module-name patterns, e.g. ['lm_head']",
            field="skip_modules",
        )
    for i, pattern in enumerate(value):
        if not isinstance(pattern, str) or not pattern.strip() or pattern != pattern.strip():
            raise InvalidOptionError(
                f"option skip_modules[{i}]={pattern!r} must be a non-empty module name or glob without spaces",
                field="skip_modules",
            )
    return tuple(value)


def skip_matches(pattern: str, module_name: str) -> bool:
    """Whether ``pattern`` selects ``module_name`` (the module or one of its parents; see the module doc)."""
    parts = module_name.split(".")
    glob = not _GLOB_CHARS.isdisjoint(pattern)
    for end in range(1, len(parts) + 1):
        name = ".".join(parts[:end])
        if name == pattern or name.endswith("." + pattern):
            return True
        if glob and fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def is_skipped(module_name: str, patterns: Iterable[str]) -> bool:
    """Whether any of ``patterns`` selects ``module_name``."""
    return any(skip_matches(p, module_name) for p in patterns)


def hf_skip_regex(pattern: str) -> str:
    """The regular expression that makes transformers skip exactly the modules `skip_matches` skips.

    transformers treats each ``llm_int8_skip_modules`` entry as a regex matched at the start of the
    name, or as a raw suffix (so ``"proj"`` would also skip ``q_proj``); a full-match regex removes
    that difference.
    """
    if _GLOB_CHARS.isdisjoint(pattern):
        core = r"(?:.*\.)?" + re.escape(pattern)
    else:
        core = re.sub(r"\\[zZ]$", "", fnmatch.translate(pattern))
    return rf"(?:{core})(?:\..*)?\Z"
