"""sacrebleu's BLEU tokenizers (``13a``, ``intl``, ``char``, ``none``), re-implemented for whole corpora.

Each function takes a list of raw segments and returns one token list per segment, equal to
``sacrebleu_tokenizer(segment).split()``; `encode` returns token ids directly. The caller-facing `tokenize`
and `encode` apply sacrebleu's pre-processing first (``lower()`` if asked, then ``rstrip()``). Speed comes
from tokenizing each distinct word once: the 13a and intl rules look at one character of context and never
need a whitespace character that another match consumed, so a text's tokens are the concatenation of its
words' tokens (each word taken with the whitespace, or line edge, around it). `encode` finds the words of
the joined corpus with NumPy (`_byte_words`, `llmtune.metrics._wordkeys`), runs the rules on the distinct
words not memoised yet in one regex pass per rule (`_batch_13a`, `_batch_intl`), and builds the token ids
with array gathers: no Python object per word occurrence.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING

from llmtune.metrics import _unicode_tables as _ut

if TYPE_CHECKING:
    import numpy as np

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


_RULE1_TABLE = str.maketrans({ch: f" {ch} " for ch in _RULE1_CHARS})
_RULE1_SET = frozenset(_RULE1_CHARS) - {" "}
_NUMBER = re.compile(r"[0-9]+(?:[.,][0-9]+)*")  # ASCII digits with inner '.'/',': one token for 13a and intl


def expand_13a(word: str) -> tuple[str, ...]:
    """The 13a tokens of one whitespace-free word, as if it stood between spaces (see `tokenize_13a`)."""
    if word.isalnum():  # letters and digits are never split (isalnum is False for '', which never occurs)
        return (word,)
    if word[-1] in ".," and word[:-1].isalnum():  # "word." / "3,": rule 2 or rule 3 splits the mark off
        return (word[:-1], word[-1])
    text = f" {word.translate(_RULE1_TABLE)} "
    if "." in text or "," in text:
        text = _RULE2.sub(_r2, text)
        text = _RULE3.sub(_r3, text)
    if "-" in text:
        text = _RULE4.sub(_r2, text)
    return tuple(text.split())


def _joined_13a(lines: list[str]) -> str | None:
    """The corpus after 13a's language-independent step, segments joined by ``" \\0 "`` (None if a segment
    contains NUL). The four replacements cannot match across the separator, so one pass over the corpus
    equals one pass per segment."""
    text = " \0 ".join(lines)
    if text.count("\0") != len(lines) - 1:
        return None
    text = text.replace("<skipped>", "")
    if _HYPHEN_BREAK.search(text):  # a regex scan finds "-\n" faster than str.replace looking for it
        text = text.replace("-\n", "")
    text = text.replace("\n", " ")
    if _ENTITY.search(text):  # one scan instead of four when there is no entity
        text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return text


_HYPHEN_BREAK = re.compile("-\n")
_ENTITY = re.compile("&(?:quot|amp|lt|gt);")


def words_13a(lines: list[str]) -> list[list[str]]:
    """The whitespace-separated words of each segment after 13a's language-independent step."""
    text = _joined_13a(lines)
    if text is None:
        return [_pre_13a(line).split() for line in lines]
    return [seg.split() for seg in text.split("\0")]


def tokenize_13a(lines: list[str]) -> list[list[str]]:
    """13a tokens of each segment, computed once per distinct whitespace-separated word.

    Exact because every 13a rule looks at one character of context and whitespace is never contested:
    rule 1 is a per-character map; rules 2-4 may consume a whitespace only as the non-[.,]/non-digit side
    of a match, which no other match needs. So, after the language-independent step and the padding, the
    tokens of a segment are the concatenation over its words ``w`` of ``rules(' ' + w + ' ').split()``.
    """
    words_of = words_13a(lines)
    cache = {w: expand_13a(w) for w in set(chain.from_iterable(words_of))}
    get = cache.__getitem__
    return [list(chain.from_iterable(map(get, words))) for words in words_of]


# --- intl (mteval-v14.pl international tokenization, sacrebleu.tokenizers.tokenizer_intl) -------------------
def _char_class(ranges: tuple[tuple[int, int], ...], negate: bool = False) -> str:
    body = "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in ranges)
    return f"[{'^' if negate else ''}{body}]"


_Rules = list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]
_INTL_RULES: dict[bool, _Rules] = {}
_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")


def _intl_rules(astral: bool) -> _Rules:
    """The three intl rules; with ``astral=False`` their classes keep only the BMP ranges, which ``re`` matches
    from a bitmap instead of scanning the astral ranges for every character (the same matches on BMP text)."""
    rules = _INTL_RULES.get(astral)
    if rules is None:
        def cls(ranges: tuple[tuple[int, int], ...], negate: bool = False) -> str:
            kept = ranges if astral else tuple((a, min(b, 0xFFFF)) for a, b in ranges if a <= 0xFFFF)
            return _char_class(kept, negate)

        p, s, not_n = cls(_ut.PUNCTUATION), cls(_ut.SYMBOL), cls(_ut.NUMBER, negate=True)
        rules = _INTL_RULES[astral] = [
            (re.compile(f"({not_n})({p})"), _r2),  # \P{N}\p{P} -> '\1 \2 '
            (re.compile(f"({p})({not_n})"), _r3),  # \p{P}\P{N} -> ' \1 \2'
            (re.compile(f"({s})"), lambda m: f" {m[1]} "),  # \p{S} -> ' \1 '
        ]
    return rules


_PUNCT_OR_SYMBOL: frozenset[str] = frozenset()


def _punct_or_symbol() -> frozenset[str]:
    """The BMP characters of \\p{P} and \\p{S} (followed by whitespace, the intl rules split one off after a
    letter or a digit)."""
    global _PUNCT_OR_SYMBOL
    if not _PUNCT_OR_SYMBOL:
        _PUNCT_OR_SYMBOL = frozenset(chr(c) for a, b in (*_ut.PUNCTUATION, *_ut.SYMBOL) if a <= 0xFFFF
                                     for c in range(a, min(b, 0xFFFF) + 1))
    return _PUNCT_OR_SYMBOL


def _post_intl(text: str) -> str:
    for pattern, repl in _intl_rules(not text.isascii() and _ASTRAL.search(text) is not None):
        text = pattern.sub(repl, text)
    return text


def _intl_word(word: str, left: bool, right: bool) -> tuple[str, ...]:
    """intl tokens of one whitespace-free word, with or without a whitespace character on each side."""
    if word.isalnum():  # no punctuation or symbol: no rule can match
        return (word,)
    return tuple(_post_intl(f"{' ' if left else ''}{word}{' ' if right else ''}").split())


class _MiddleWords(dict):  # type: ignore[type-arg]
    """word -> intl tokens for words with whitespace on both sides, computed on first lookup."""

    def __missing__(self, word: str) -> tuple[str, ...]:
        out = self[word] = _intl_word(word, True, True)
        return out


def tokenize_intl(lines: list[str]) -> list[list[str]]:
    """intl tokens (Unicode punctuation and symbols split off, except punctuation between digits).

    Computed once per distinct word and context. Exact for the same reason as 13a: whitespace (never P, S
    or N) can only be the non-punctuation side of a match, which no other match needs. Unlike 13a, intl
    does not pad the line, so the first and last words are tokenized with their actual context.
    """
    middle = _MiddleWords()
    get = middle.__getitem__
    edge: dict[tuple[str, bool, bool], tuple[str, ...]] = {}
    out: list[list[str]] = []
    for line in lines:
        words = line.split()
        if not words:
            out.append([])
            continue
        left = line[0].isspace()
        if len(words) == 1:
            key = (words[0], left, line[-1].isspace())
            first = edge.get(key) or edge.setdefault(key, _intl_word(*key))
            out.append(list(first))
            continue
        key = (words[0], left, True)
        toks = list(edge.get(key) or edge.setdefault(key, _intl_word(*key)))
        toks.extend(chain.from_iterable(map(get, words[1:-1])))
        key = (words[-1], True, line[-1].isspace())
        toks.extend(edge.get(key) or edge.setdefault(key, _intl_word(*key)))
        out.append(toks)
    return out


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


def encode(lines: list[str], name: str, lowercase: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the corpus (flat int64) and the number of tokens of each line, for `tokenize` semantics.

    Equal tokens get equal ids. For 13a the work is done once per distinct word: each word maps to the tuple
    of its token ids, so no per-line token lists are built.
    """
    import numpy as np

    if lowercase:
        lines = [line.lower().rstrip() for line in lines]
    else:
        lines = [line.rstrip() for line in lines]
    text = _joined_13a(lines) if name == "13a" and lines else None
    if text is not None:
        encoded = _encode_words(text, len(lines), "13a")
        if encoded is not None:
            return encoded
    if name == "intl" and lines:
        encoded = _encode_words(" \0 ".join(lines), len(lines), "intl", lines)
        if encoded is not None:
            return encoded
    if name == "char":
        return _encode_chars(lines)
    if name == "13a":
        words_of = words_13a(lines)
    elif name == "none":
        words_of = [line.split() for line in lines]
    else:
        words_of = TOKENIZERS[name](lines)
    words = list(chain.from_iterable(words_of))
    word_id = {w: i for i, w in enumerate(dict.fromkeys(words))}
    widx = np.fromiter(map(word_id.__getitem__, words), dtype=np.int64, count=len(words))
    n_words = np.fromiter(map(len, words_of), dtype=np.int64, count=len(words_of))
    if name != "13a":
        return widx, n_words
    token_id: dict[str, int] = {}
    word_tokens = [tuple([token_id.setdefault(t, len(token_id)) for t in expand_13a(w)]) for w in word_id]
    word_len = np.fromiter(map(len, word_tokens), dtype=np.int64, count=len(word_tokens))[widx]
    n_tok = int(word_len.sum())
    ids = np.fromiter(chain.from_iterable(map(word_tokens.__getitem__, widx.tolist())), dtype=np.int64, count=n_tok)
    ends = np.cumsum(n_words)
    cum = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(word_len)])
    lens = cum[ends] - cum[ends - n_words]
    return ids, lens


_CACHE_LOCK = threading.Lock()
_CACHE_MAX_WORDS = 1 << 20  # a long-running process starts afresh past this many distinct words


# --- whole-corpus encoders: words found with NumPy, each distinct word tokenized once ------------------------
_WS_CLASS = bytes(0 if chr(c).isspace() else 2 if c == 0 else 1 for c in range(128)) + bytes([1]) * 128
_UNI_SPACE: re.Pattern[str] | None = None  # the non-ASCII characters str.split() splits on (all in the BMP)
_UNI_SPACE_TABLE: dict[int, int] = {}
_MEMO_13A: dict[str, tuple[str, ...]] = {}  # word -> its 13a tokens (between whitespace)
_MEMO_INTL: dict[str, tuple[str, ...]] = {}  # word -> its intl tokens between whitespace
_EDGE_MEMO: dict[tuple[str, bool, bool], tuple[str, ...]] = {}  # (word, left, right) -> intl tokens at a line edge


def clear_caches() -> None:
    """Forget every memoised word expansion (the next call tokenizes every distinct word again)."""
    with _CACHE_LOCK:
        _MEMO_13A.clear()
        _MEMO_INTL.clear()
        _EDGE_MEMO.clear()


def _byte_words(text: str) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """``(data, starts, ends, seps)``: ``text`` as UTF-8, the byte spans of its ``str.split()`` words (NUL is
    a separator, not part of a word) and the offsets of its NUL characters."""
    import numpy as np

    global _UNI_SPACE
    if not text.isascii():
        if _UNI_SPACE is None:
            spaces = [chr(c) for c in range(0x80, 0x3001) if chr(c).isspace()]
            _UNI_SPACE_TABLE.update({ord(c): 32 for c in spaces})
            _UNI_SPACE = re.compile(f"[{''.join(spaces)}]")
        if _UNI_SPACE.search(text):
            text = text.translate(_UNI_SPACE_TABLE)
    data = text.encode("utf-8", "surrogatepass")
    cls = np.frombuffer(data.translate(_WS_CLASS), dtype=np.uint8)
    edge = np.zeros(len(cls) + 2, dtype=np.int8)
    edge[1:-1] = cls == 1
    runs = np.flatnonzero(edge[1:] != edge[:-1])
    return data, runs[0::2], runs[1::2], np.flatnonzero(cls == 2)


def _expansions(name: str, words: list[str]) -> list[tuple[str, ...]]:
    """Tokens of each distinct word between whitespace (``13a``: `expand_13a`, ``intl``: `_intl_word`), memoised;
    the words not memoised yet go through the rules together (`_batch_13a`, `_batch_intl`)."""
    memo = _MEMO_13A if name == "13a" else _MEMO_INTL
    get = memo.get
    out: list[tuple[str, ...] | None] = [get(w) for w in words]
    missing = [i for i, toks in enumerate(out) if toks is None]
    if missing:
        todo = [words[i] for i in missing]
        done = _batch_13a(todo) if name == "13a" else _batch_intl(todo, True, True)
        with _CACHE_LOCK:
            if len(memo) > _CACHE_MAX_WORDS:
                memo.clear()
            for i, w, toks in zip(missing, todo, done):
                memo[w] = out[i] = toks
    return out  # type: ignore[return-value]


def _batch_13a(words: list[str]) -> list[tuple[str, ...]]:
    r"""`expand_13a` of many words in one pass of each rule over ``" w1 \n w2 \n ... "``: the "\n" (never a rule
    character) only ever neighbours spaces, so no match reaches it and each word sees the spaces it would alone."""
    out: list[tuple[str, ...] | None] = [None] * len(words)
    rest = []
    rule1, number = _RULE1_SET, _NUMBER.fullmatch
    for i, w in enumerate(words):
        if w.isalnum() or number(w):  # "3.14" / "1,000": a mark between digits is never split
            out[i] = (w,)
        elif w[:-1].isalnum() and (w[-1] in ".," or w[-1] in rule1):  # "word." / "3," / "word!" / "word?"
            out[i] = (w[:-1], w[-1])
        else:
            rest.append(i)
    if rest:
        joined = " \n ".join(words[i] for i in rest)
        text = f" {joined.translate(_RULE1_TABLE)} "
        if "." in text or "," in text:
            text = _RULE2.sub(_r2, text)
            text = _RULE3.sub(_r3, text)
        if "-" in text:
            text = _RULE4.sub(_r2, text)
        for i, part in zip(rest, text.split("\n")):
            out[i] = tuple(part.split())
    return out  # type: ignore[return-value]


def _batch_intl(words: list[str], left: bool, right: bool) -> list[tuple[str, ...]]:
    r"""`_intl_word` of many words with the same context, in one pass of each rule over the words joined by "\n".

    A whitespace side is a space; a line edge is the digit "0", which no rule can use (it is neither P nor S, and
    next to it \P{N} fails just as at the edge), then is taken off the first / last token. "\n" only neighbours
    spaces and those digits, so no match reaches it."""
    out: list[tuple[str, ...] | None] = [None] * len(words)
    rest = []
    split_off, number = _punct_or_symbol() if right else frozenset(), _NUMBER.fullmatch
    for i, w in enumerate(words):
        if w.isalnum() or number(w):  # "3.14" / "1,000": punctuation between digits is never split
            out[i] = (w,)
        elif w[-1] in split_off and w[:-1].isalnum():  # "word! ", "2019. ": rule 1, 2 or 3 splits it off
            out[i] = (w[:-1], w[-1])
        else:
            rest.append(i)
    if not rest:
        return out  # type: ignore[return-value]
    pre, post = " " if left else "0", " " if right else "0"
    text = _post_intl("\n".join(f"{pre}{words[i]}{post}" for i in rest))
    for i, part in zip(rest, text.split("\n")):
        toks = part.split()
        if not left:
            toks[0] = toks[0][1:]
        if not right:
            toks[-1] = toks[-1][:-1]
        out[i] = tuple(t for t in toks if t)
    return out  # type: ignore[return-value]


def _flatten(entry: np.ndarray, entry_tokens: list[tuple[str, ...]], per_line: np.ndarray,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (equal tokens, equal ids) of the words whose token tuples are ``entry_tokens[entry[i]]``, and
    the tokens per line (``per_line``: the words of each line, in order)."""
    import numpy as np

    token_id: dict[str, int] = {}
    table = np.fromiter((token_id.setdefault(t, len(token_id)) for toks in entry_tokens for t in toks),
                        dtype=np.int64, count=sum(map(len, entry_tokens)))
    n_of = np.fromiter(map(len, entry_tokens), dtype=np.int64, count=len(entry_tokens))
    count = n_of[entry]
    cum = np.zeros(len(count) + 1, dtype=np.int64)
    np.cumsum(count, out=cum[1:])
    start = (np.cumsum(n_of) - n_of)[entry]
    ids = table[np.arange(int(cum[-1])) + np.repeat(start - cum[:-1], count)]
    word_end = np.cumsum(per_line)
    return ids, cum[word_end] - cum[word_end - per_line]


def _edge_tokens(keys: list[tuple[str, bool, bool]]) -> list[tuple[str, ...]]:
    """`_intl_word` of each ``(word, left, right)``, memoised; the missing ones batched by context."""
    memo = _EDGE_MEMO
    out: list[tuple[str, ...] | None] = [memo.get(key) for key in keys]
    by_context: dict[tuple[bool, bool], list[int]] = {}
    for i, toks in enumerate(out):
        if toks is None:
            by_context.setdefault(keys[i][1:], []).append(i)
    for (left, right), idx in by_context.items():
        done = _batch_intl([keys[i][0] for i in idx], left, right)
        with _CACHE_LOCK:
            if len(memo) > _CACHE_MAX_WORDS:
                memo.clear()
            for i, toks in zip(idx, done):
                memo[keys[i]] = out[i] = toks
    return out  # type: ignore[return-value]


def _encode_words(text: str, n_lines: int, name: str, lines: list[str] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """`encode` of ``text`` (the lines joined by ``" \\0 "``; for 13a after `_joined_13a`) with NumPy words:
    None if the NUL count does not match. For intl (``lines`` given), the first and last word of a line are
    redone with their real context when they are not alphanumeric (intl does not pad lines)."""
    import numpy as np

    from llmtune.metrics._wordkeys import word_ids

    data, starts, ends, seps = _byte_words(text)
    if seps.size != n_lines - 1:
        return None
    types, first = word_ids(data, starts, ends)
    words = [data[s:e].decode("utf-8", "surrogatepass") for s, e in zip(starts[first].tolist(), ends[first].tolist())]
    entry_tokens = _expansions(name, words)
    per_line = np.diff(np.r_[0, np.searchsorted(starts, seps), len(starts)])
    if lines is not None and len(starts):
        types = _intl_edges(lines, words, types, per_line, entry_tokens)
    return _flatten(types, entry_tokens, per_line)


def _intl_edges(lines: list[str], words: list[str], types: np.ndarray, per_line: np.ndarray,
                entry_tokens: list[tuple[str, ...]]) -> np.ndarray:
    """Per word, its entry in ``entry_tokens`` (appended to): the word's own, or for a non-alphanumeric first /
    last word of a line, the tokens of ``(word, left, right)`` in its line's real context."""
    import numpy as np

    filled = np.flatnonzero(per_line)
    head = (np.cumsum(per_line) - per_line)[filled]
    tail = head + per_line[filled] - 1
    word_line = np.zeros(len(types), dtype=np.int64)
    word_line[head] = filled
    word_line[tail] = filled
    plain = np.fromiter((w.isalnum() for w in words), dtype=bool, count=len(words))
    edge = np.unique(np.r_[head, tail])
    edge = edge[~plain[types[edge]]]
    if edge.size == 0:
        return types
    entry = types.copy()
    is_head = np.isin(edge, head)
    is_tail = np.isin(edge, tail)
    keys = [(t, lines[line][0].isspace() if h else True, lines[line][-1].isspace() if tl else True)
            for line, t, h, tl in zip(word_line[edge].tolist(), types[edge].tolist(), is_head.tolist(),
                                      is_tail.tolist())]
    combos = {key: len(entry_tokens) + k for k, key in enumerate(dict.fromkeys(keys))}
    entry_tokens.extend(_edge_tokens([(words[t], left, right) for t, left, right in combos]))
    entry[edge] = [combos[key] for key in keys]
    return entry


_WHITESPACE: np.ndarray | None = None


def _encode_chars(lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`encode` for ``char``: every non-whitespace code point is a token whose id is the code point."""
    import numpy as np

    global _WHITESPACE
    if _WHITESPACE is None:  # str.split()'s whitespace; all of it lies in the BMP
        _WHITESPACE = np.array([c for c in range(0x10000) if chr(c).isspace()], dtype=np.int64)
    text = "".join(lines)
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    keep = ~np.isin(cps, _WHITESPACE)
    line_of = np.repeat(np.arange(len(lines), dtype=np.int64), np.fromiter(map(len, lines), np.int64, len(lines)))
    return cps[keep], np.bincount(line_of[keep], minlength=len(lines)).astype(np.int64)
