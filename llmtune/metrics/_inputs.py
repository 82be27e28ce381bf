"""Input checks shared by every metric backend: mismatched lengths, None or non-strings name the index."""

from __future__ import annotations

from collections.abc import Sequence


def _is_str_sequence(obj: object) -> bool:
    return isinstance(obj, Sequence) and not isinstance(obj, (str, bytes))


def normalize_inputs(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
) -> tuple[list[str], list[list[str]]]:
    """Check and normalize to ``(predictions, references_per_prediction)``.

    ``references`` is one string per prediction, or one sequence of strings (one or more references) per
    prediction; the number of references may vary. Unlike sacrebleu, which silently truncates, a length
    mismatch is an error.
    """
    if not _is_str_sequence(predictions):
        raise TypeError(f"predictions must be a sequence of strings, not {type(predictions).__name__}")
    if not _is_str_sequence(references):
        raise TypeError(f"references must be a sequence (of strings or of lists of strings), not {type(references).__name__}")
    preds = list(predictions)
    refs_in = list(references)
    if len(preds) != len(refs_in):
        raise ValueError(
            f"{len(preds)} predictions but {len(refs_in)} references: give one reference (or one list of "
            f"references) per prediction"
        )
    for i, p in enumerate(preds):
        if not isinstance(p, str):
            raise TypeError(f"predictions[{i}] is {type(p).__name__} ({p!r}), expected str")
    refs: list[list[str]] = []
    for i, r in enumerate(refs_in):
        if isinstance(r, str):
            refs.append([r])
            continue
        if not _is_str_sequence(r):
            raise TypeError(f"references[{i}] is {type(r).__name__} ({r!r}), expected str or a list of str")
        group = list(r)
        if not group:
            raise ValueError(f"references[{i}] is an empty list: each prediction needs at least one reference")
        for j, s in enumerate(group):
            if not isinstance(s, str):
                raise TypeError(f"references[{i}][{j}] is {type(s).__name__} ({s!r}), expected str")
        refs.append(group)
    return preds, refs


def check_corpus(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    metric: str,
) -> tuple[list[str], list[list[str]]]:
    """`normalize_inputs`, plus: an empty corpus is an error (sacrebleu raises IndexError, NLTK divides by 0,
    a mean over nothing is NaN)."""
    preds, refs = normalize_inputs(predictions, references)
    if not preds:
        raise ValueError(f"predictions is empty: {metric} needs at least one prediction/reference pair")
    return preds, refs
