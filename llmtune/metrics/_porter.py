"""A Porter stemmer equal to NLTK's ``PorterStemmer()`` in its default ``NLTK_EXTENSIONS`` mode.

rouge-score stems with ``nltk.stem.porter.PorterStemmer().stem``; to give the same ROUGE numbers
without depending on NLTK we re-implement that exact variant: Porter's 1980 steps with Martin Porter's
later changes and NLTK's own extensions (an irregular-forms table, ``ies``/``ied`` on 4-letter words,
``y -> i`` only after a consonant, ``alli``/``fulli``/``logi`` in step 2, a 2-letter ``*o`` rule).

`stem` is memoised (a plain dict), since real text repeats words and stemming is the costliest part
of ROUGE tokenization.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["stem", "stem_uncached"]

_VOWELS = frozenset("aeiou")

#: NLTK_EXTENSIONS irregular forms, looked up before any step.
_IRREGULAR: dict[str, str] = {
    "skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
    "exceed": "exceed", "succeed": "succeed",
}


def _consonants(word: str) -> list[bool]:
    """Per position: is it a consonant? (``y`` is one at the start or after a vowel.)"""
    flags: list[bool] = []
    prev = False
    for i, ch in enumerate(word):
        if ch in _VOWELS:
            prev = False
        elif ch == "y":
            prev = True if i == 0 else not prev
        else:
            prev = True
        flags.append(prev)
    return flags


def _measure(word: str) -> int:
    """Porter's *m*: the number of vowel-to-consonant transitions, ``[C](VC){m}[V]``."""
    m = 0
    prev_vowel = False
    for cons in _consonants(word):
        if cons and prev_vowel:
            m += 1
        prev_vowel = not cons
    return m


def _has_vowel(word: str) -> bool:
    """Porter's ``*v*``."""
    return not all(_consonants(word))


def _is_consonant(word: str, i: int) -> bool:
    return _consonants(word)[i]


def _ends_double_consonant(word: str) -> bool:
    """Porter's ``*d``."""
    return len(word) >= 2 and word[-1] == word[-2] and _is_consonant(word, len(word) - 1)


def _ends_cvc(word: str) -> bool:
    """Porter's ``*o``, plus NLTK's rule that a 2-letter vowel-consonant word also counts."""
    if len(word) >= 3:
        flags = _consonants(word)
        if flags[-3] and not flags[-2] and flags[-1] and word[-1] not in "wxy":
            return True
    if len(word) == 2:
        flags = _consonants(word)
        return not flags[0] and flags[1]
    return False


def _m_gt0(stem: str) -> bool:
    return _measure(stem) > 0


def _m_gt1(stem: str) -> bool:
    return _measure(stem) > 1


_Rule = tuple[str, str, "Callable[[str], bool] | None"]


def _first_rule(word: str, rules: tuple[_Rule, ...]) -> str:
    """Apply the first rule whose suffix ``word`` ends with; if its condition fails, keep ``word``."""
    for suffix, replacement, condition in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            if condition is None or condition(stem):
                return stem + replacement
            return word
    return word


_STEP1A: tuple[_Rule, ...] = (("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None))


def _step1a(word: str) -> str:
    if len(word) == 4 and word.endswith("ies"):
        return word[:-3] + "ie"
    return _first_rule(word, _STEP1A)


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        stem = word[:-3]
        return stem + "ee" if _measure(stem) > 0 else word
    if word.endswith("ed") and _has_vowel(word[:-2]):
        stem = word[:-2]
    elif word.endswith("ing") and _has_vowel(word[:-3]):
        stem = word[:-3]
    else:
        return word
    # What follows the removal of -ed / -ing: restore an -e or undouble a final consonant.
    for suffix, replacement in (("at", "ate"), ("bl", "ble"), ("iz", "ize")):
        if stem.endswith(suffix):
            return stem[:-2] + replacement
    if _ends_double_consonant(stem):
        return stem[:-1] if stem[-1] not in "lsz" else stem
    if stem.endswith("*d"):  # NLTK tests the literal suffix "*d" too (unreachable for [a-z0-9] words)
        return stem[:-2] + stem[-1]
    if _measure(stem) == 1 and _ends_cvc(stem):
        return stem + "e"
    return stem


def _step1c(word: str) -> str:
    if word.endswith("y"):
        stem = word[:-1]
        if len(stem) > 1 and _is_consonant(stem, len(stem) - 1):
            return stem + "i"
    return word


_STEP2: tuple[_Rule, ...] = (
    ("ational", "ate", _m_gt0), ("tional", "tion", _m_gt0), ("enci", "ence", _m_gt0),
    ("anci", "ance", _m_gt0), ("izer", "ize", _m_gt0), ("bli", "ble", _m_gt0), ("alli", "al", _m_gt0),
    ("entli", "ent", _m_gt0), ("eli", "e", _m_gt0), ("ousli", "ous", _m_gt0), ("ization", "ize", _m_gt0),
    ("ation", "ate", _m_gt0), ("ator", "ate", _m_gt0), ("alism", "al", _m_gt0), ("iveness", "ive", _m_gt0),
    ("fulness", "ful", _m_gt0), ("ousness", "ous", _m_gt0), ("aliti", "al", _m_gt0), ("iviti", "ive", _m_gt0),
    ("biliti", "ble", _m_gt0), ("fulli", "ful", _m_gt0),
    # "logi" -> "log" when the word minus "ogi" (i.e. the stem plus "l") has m > 0.
    ("logi", "log", lambda stem: _measure(stem + "l") > 0),
)


def _step2(word: str) -> str:
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        return _step2(word[:-4] + "al")
    return _first_rule(word, _STEP2)


_STEP3: tuple[_Rule, ...] = (
    ("icate", "ic", _m_gt0), ("ative", "", _m_gt0), ("alize", "al", _m_gt0), ("iciti", "ic", _m_gt0),
    ("ical", "ic", _m_gt0), ("ful", "", _m_gt0), ("ness", "", _m_gt0),
)

_STEP4: tuple[_Rule, ...] = (
    ("al", "", _m_gt1), ("ance", "", _m_gt1), ("ence", "", _m_gt1), ("er", "", _m_gt1), ("ic", "", _m_gt1),
    ("able", "", _m_gt1), ("ible", "", _m_gt1), ("ant", "", _m_gt1), ("ement", "", _m_gt1),
    ("ment", "", _m_gt1), ("ent", "", _m_gt1),
    ("ion", "", lambda stem: _measure(stem) > 1 and stem[-1] in "st"),
    ("ou", "", _m_gt1), ("ism", "", _m_gt1), ("ate", "", _m_gt1), ("iti", "", _m_gt1), ("ous", "", _m_gt1),
    ("ive", "", _m_gt1), ("ize", "", _m_gt1),
)


def _step5a(word: str) -> str:
    if word.endswith("e"):
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            return stem
    return word


def _step5b(word: str) -> str:
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        return word[:-1]
    return word


def stem_uncached(word: str) -> str:
    """Stem one word exactly as ``nltk.stem.porter.PorterStemmer().stem(word)`` does."""
    low = word.lower()
    if low in _IRREGULAR:
        return _IRREGULAR[low]
    if len(word) <= 2:  # NLTK measures the word as given, before lower-casing
        return low
    s = _step1a(low)
    s = _step1b(s)
    s = _step1c(s)
    s = _step2(s)
    s = _first_rule(s, _STEP3)
    s = _first_rule(s, _STEP4)
    s = _step5a(s)
    return _step5b(s)


_CACHE: dict[str, str] = {}
_CACHE_MAX = 1 << 20


def stem(word: str) -> str:
    """Memoised `stem_uncached` (the cache is dropped when it reaches about a million words)."""
    try:
        return _CACHE[word]
    except KeyError:
        pass
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    out = _CACHE[word] = stem_uncached(word)
    return out
