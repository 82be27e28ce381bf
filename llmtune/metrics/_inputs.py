"""Input checks shared by every metric backend (and offered to plugin authors through `llmtune.metrics`).

Predictions: any iterable of strings (list, tuple, generator, NumPy array, pandas Series, ...); references:
one string or one iterable of strings per prediction. Mismatched lengths, ``None`` and non-strings are errors
naming the index (sacrebleu silently truncates). sacrebleu's other layout, a list of reference *streams*
(``refs[k][i]`` = k-th reference of prediction i), is accepted only through `references_from_streams`:
when there are as many streams as predictions the two layouts cannot be told apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from llmtune.core.errors import LlmtuneError

__all__ = ["InputError", "InputTypeError", "check_corpus", "normalize_inputs", "nrefs_field", "references_from_streams"]


class InputError(LlmtuneError, ValueError):
    """Predictions/references that a metric cannot score (mismatched lengths, empty corpus, empty groups)."""


class InputTypeError(LlmtuneError, TypeError):
    """A prediction or reference that is not a string (or not an iterable of strings)."""


def _is_iterable(obj: object) -> bool:
    return isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, Mapping))


def _as_list(obj: Any, what: str) -> list[Any]:
    if not _is_iterable(obj):
        raise InputTypeError(f"{what} must be an iterable (list, tuple, array, Series) of strings, "
                             f"not {type(obj).__name__}")
    values = getattr(obj, "values", None)  # a pandas Series iterates over its values, not its index
    return list(obj if values is None or callable(values) else values)


def normalize_inputs(predictions: Iterable[str], references: Iterable[Any]) -> tuple[list[str], list[list[str]]]:
    """Check and normalize to ``(predictions, references_per_prediction)``; strings are kept (``numpy.str_``
    becomes ``str``). The number of references may vary between predictions; none of them may be empty."""
    preds = _as_list(predictions, "predictions")
    refs_in = _as_list(references, "references")
    if len(preds) != len(refs_in):
        hint = ""
        if refs_in and all(_is_iterable(r) and len(list(r)) == len(preds) for r in refs_in):
            hint = (" (this looks like sacrebleu's list of reference streams: convert it with "
                    "llmtune.metrics.references_from_streams(refs))")
        raise InputError(f"{len(preds)} predictions but {len(refs_in)} references: give one reference (or one "
                         f"list of references) per prediction{hint}")
    if not all(type(p) is str for p in preds):  # the common case needs no per-item checks
        for i, p in enumerate(preds):
            if not isinstance(p, str):
                raise InputTypeError(f"predictions[{i}] is {type(p).__name__} ({p!r}), expected str")
        preds = [p if type(p) is str else str(p) for p in preds]
    if all(type(r) is str for r in refs_in):
        return preds, [[r] for r in refs_in]
    refs: list[list[str]] = []
    for i, r in enumerate(refs_in):
        if isinstance(r, str):
            refs.append([r if type(r) is str else str(r)])
            continue
        if not _is_iterable(r):
            raise InputTypeError(f"references[{i}] is {type(r).__name__} ({r!r}), expected str or a list of str")
        group = list(r)
        if not group:
            raise InputError(f"references[{i}] is an empty list: each prediction needs at least one reference")
        for j, s in enumerate(group):
            if not isinstance(s, str):
                raise InputTypeError(f"references[{i}][{j}] is {type(s).__name__} ({s!r}), expected str")
        refs.append([s if type(s) is str else str(s) for s in group])
    return preds, refs


def check_corpus(predictions: Iterable[str], references: Iterable[Any], metric: str,
                 ) -> tuple[list[str], list[list[str]]]:
    """`normalize_inputs`, plus: an empty corpus is an error (sacrebleu raises IndexError, NLTK divides by 0,
    a mean over nothing is NaN)."""
    preds, refs = normalize_inputs(predictions, references)
    if not preds:
        raise InputError(f"predictions is empty: {metric} needs at least one prediction/reference pair")
    return preds, refs


def references_from_streams(streams: Iterable[Iterable[str | None]]) -> list[list[str]]:
    """sacrebleu's layout (``streams[k][i]``: k-th reference of prediction i) to one list per prediction.

    Every stream must have one entry per prediction; ``None`` marks a missing reference (sacrebleu skips
    those too), so the number of references may vary. ``[[r1, r2, r3]]`` is one reference each.
    """
    cols = [_as_list(s, f"streams[{k}]") for k, s in enumerate(_as_list(streams, "streams"))]
    if not cols:
        raise InputError("streams is empty: give at least one reference stream")
    for k, col in enumerate(cols):
        if len(col) != len(cols[0]):
            raise InputError(f"streams[{k}] has {len(col)} references but streams[0] has {len(cols[0])}: every "
                             "stream needs one entry per prediction (None where a reference is missing)")
    out: list[list[str]] = []
    for i in range(len(cols[0])):
        group = [col[i] for col in cols if col[i] is not None]
        if not group:
            raise InputError(f"prediction {i} has no reference in any stream")
        out.append(group)
    return out


def nrefs_field(refs: list[list[str]]) -> str:
    """The ``nrefs`` part of a signature: the number of references per prediction, or ``var``."""
    counts = {len(g) for g in refs}
    return str(counts.pop()) if len(counts) == 1 else "var"
