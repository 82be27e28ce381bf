"""sacrebleu's BLEU tokenizers (``13a``, ``intl``, ``char``, ``none``), re-implemented for whole corpora.

Each function takes a list of raw segments and returns one token list per segment, equal to
``sacrebleu_tokenizer(segment).split()``. The caller applies sacrebleu's pre-processing first
(``lower()`` if asked, then ``rstrip()``). Speed comes from processing the corpus as one string:
the rules are local (one character of context), and the separator is chosen so that no rule can
match across it, which makes the batched result identical to tokenising segment by segment.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import chain

from llmtune.metrics import _unicode_tables as _ut

# --- 13a (mteval-v13a.pl, sacrebleu.tokenizers.tokenizer_13a + tokenizer_re) -------------------------------
# Rule 1 of sacrebleu: r'([\{-\~\[-\` -\&\(-\+\:-\@\/])' -> r' \1 ' pads each of these ASCII characters with
# spaces. It is a per-character map, so it is applied with str.replace (space first: the spaces it inserts
# around the other characters must not be tripled again).
_RULE1 = re.compile(r"[\{-\~\[-\` -\&\(-\+\:-\@\/]")
_RULE1_CHARS = " " + "".join(chr(c) for c in range(33, 128) if _RULE1.match(chr(c)))
# Rules 2-4 exactly as sacrebleu writes them (their overlapping-match behaviour matters), with callables
# instead of template strings (same output, faster).
_RULE2 = re.compile(r"([^0-9])([\.,])")  # period and comma unless preceded by a digit
_RULE3 = re.compile(r"([\.,])([^0-9])")  # period and comma unless followed by a digit
_RULE4 = re.compile(r"([0-9])(-)")  # dash when preceded by a digit


def _r2(m: re.Match[str]) -> str:
    return f"{m[1]} {m[2]} "


def _r3(m: re.Match[str]) -> str:
    return f" {m[1]} {m[2]}"


def _pre_13a(line: str) -> str:
    """The language-independent part of 13a: <skipped>, hyphenated line breaks, newlines, 4 HTML entities."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return f" {line} "


def _post_13a(text: str) -> str:
    """sacrebleu's TokenizerRegexp rules on ``text`` (one or many ``\\n``-joined padded segments)."""
    for ch in _RULE1_CHARS:
        if ch in text:
            text = text.replace(ch, f" {ch} ")
    if "." in text or "," in text:
        text = _RULE2.sub(_r2, text)
        text = _RULE3.sub(_r3, text)
    if "-" in text:
        text = _RULE4.sub(_r2, text)
    return text


def tokenize_13a(lines: list[str]) -> list[list[str]]:
    """13a tokens of each segment, computed once per distinct whitespace-separated word.

    Exact because every 13a rule looks at one character of context and whitespace is never contested:
    rule 1 is a per-character map; rules 2-4 may consume a whitespace only as the non-[.,]/non-digit side
    of a match, which no other match needs. So, after the language-independent step and the padding, the
    tokens of a segment are the concatenation over its words ``w`` of ``rules(' ' + w + ' ').split()``.
    """
    words_of = [_pre_13a(line).split() for line in lines]
    cache: dict[str, tuple[str, ...]] = {}
    for w in set(chain.from_iterable(words_of)):
        # letters and digits are never split by 13a (isalnum is also False for '', so no surprise there)
        cache[w] = (w,) if w.isalnum() else tuple(_post_13a(f" {w} ").split())
    get = cache.__getitem__
    return [list(chain.from_iterable(map(get, words))) for words in words_of]


# --- intl (mteval-v14.pl international tokenization, sacrebleu.tokenizers.tokenizer_intl) -------------------
def _char_class(ranges: tuple[tuple[int, int], ...], negate: bool = False) -> str:
    body = "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in ranges)
    return f"[{'^' if negate else ''}{body}]"


_INTL_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] | None = None
#: A character of category N (not P, not S, not whitespace): no intl rule can match it or next to it, so it
#: separates segments safely (used only if it does not occur in the corpus).
_INTL_SEP = "\u2189"


def _intl_rules() -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    global _INTL_RULES
    if _INTL_RULES is None:
        p = _char_class(_ut.PUNCTUATION)
        s = _char_class(_ut.SYMBOL)
        not_n = _char_class(_ut.NUMBER, negate=True)
        _INTL_RULES = [
            (re.compile(f"({not_n})({p})"), _r2),  # \P{N}\p{P} -> '\1 \2 '
            (re.compile(f"({p})({not_n})"), _r3),  # \p{P}\P{N} -> ' \1 \2'
            (re.compile(f"({s})"), lambda m: f" {m[1]} "),  # \p{S} -> ' \1 '
        ]
    return _INTL_RULES


def _post_intl(text: str) -> str:
    for pattern, repl in _intl_rules():
        text = pattern.sub(repl, text)
    return text


def tokenize_intl(lines: list[str]) -> list[list[str]]:
    """intl tokens (Unicode punctuation and symbols split off, except punctuation between digits)."""
    if not lines:
        return []
    text = _INTL_SEP.join(lines)
    if text.count(_INTL_SEP) == len(lines) - 1:
        return [seg.split() for seg in _post_intl(text).split(_INTL_SEP)]
    return [_post_intl(line).split() for line in lines]


# --- char and none ----------------------------------------------------------------------------------------
def tokenize_char(lines: list[str]) -> list[list[str]]:
    """Every non-whitespace character is a token (sacrebleu: ``' '.join(line)``)."""
    return [" ".join(line).split() for line in lines]


def tokenize_none(lines: list[str]) -> list[list[str]]:
    """Whitespace tokens, no other processing."""
    return [line.split() for line in lines]


TOKENIZERS: dict[str, Callable[[list[str]], list[list[str]]]] = {
    "13a": tokenize_13a,
    "intl": tokenize_intl,
    "char": tokenize_char,
    "none": tokenize_none,
}


def tokenize(lines: list[str], name: str, lowercase: bool) -> list[list[str]]:
    """sacrebleu's ``_preprocess_segment`` then whitespace split: ``lower()`` (optional), ``rstrip()``, tokenize."""
    if lowercase:
        lines = [line.lower().rstrip() for line in lines]
    else:
        lines = [line.rstrip() for line in lines]
    return TOKENIZERS[name](lines)
