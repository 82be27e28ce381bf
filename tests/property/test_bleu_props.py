"""Property tests: our NumPy BLEU equals sacrebleu and NLTK on text built to break tokenizers.

Equality is asserted to 1e-12 relative (the implementation is bit-identical on the same Python; the
tolerance only allows for a different ``sum`` in another interpreter). Profiles: ``ci`` (fixed seed,
150 examples per test) and ``long`` (``HYPOTHESIS_PROFILE=long``), see tests/conftest.py.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

import llmtune

sacrebleu_metrics = pytest.importorskip("sacrebleu.metrics")
bleu_score = pytest.importorskip("nltk.translate.bleu_score")

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py
logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # its effective_order advice on every sentence

# --- strategies ------------------------------------------------------------------------------------------------
#: Tokens that trip tokenizers: scripts, combining marks, emoji (ZWJ sequences), Kelvin sign, dotted I, sharp s,
#: ligatures, full-width and Arabic-Indic digits, HTML entities (13a unescapes four), 13a's <skipped>, hyphenated
#: line breaks, decimal and thousands separators, apostrophes, dashes and quotes, zero-width and BOM characters.
ADVERSARIAL = [
    "a", "b", "the", "cat", "The", "CAT", "sat", "on", "mat", ".", ",", "!", "?", "-", "'", '"',
    "日本語", "テキスト", "中文", "한국어", "Ελληνικά", "ΣΑΣ", "русский", "עברית", "العربية", "हिन्दी", "ไทย",
    "e\u0301", "cafe\u0301", "café", "naïve", "\u212a", "K", "\u0130stanbul", "İ", "ı", "ß", "SS", "ﬁne", "x²",
    "１２３", "٣٤", "😀", "👩\u200d👩\u200d👧", "🇫🇷", "&amp;", "&quot;", "&lt;", "&gt;", "&amp;lt;", "&amp;quot;",
    "&apos;", "&#39;", "<skipped>", "x-\ny", "e-mail", "1,000-2,000", "3.14", "2019.", "U.S.A.", "don't", "isn't",
    "—", "“quoted”", "«", "»", "…", "\u200b", "\ufeff", "!!!", "(", ")", "[x]", "{y}", "$5", "50%", "#1", "@me",
    "a/b", "\\", "^_^", "~", "`", "|", "\u2189", "\u1b4e", "\u20c1",
]
SEPARATORS = [" ", " ", " ", "  ", "\n", "\t", "\xa0", "\u2028", "\u3000", "\x1c", "\r\n", "\u0085"]

any_char_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
token = st.one_of(st.sampled_from(ADVERSARIAL), st.sampled_from(ADVERSARIAL), any_char_text)


@st.composite
def sentence(draw: st.DrawFn, max_tokens: int = 14) -> str:
    """A sentence of adversarial tokens with varied whitespace; sometimes empty, blank or very long."""
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.sampled_from(["", " ", "\n\n", "\t \xa0", "..."]))
    if kind == 1:  # very long, repeated tokens
        tok = draw(st.sampled_from(["the", "a b", "日本", "x."]))
        return " ".join([tok] * draw(st.integers(50, 150)))
    toks = draw(st.lists(token, max_size=max_tokens))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(toks), max_size=len(toks)))
    return "".join(t + s for t, s in zip(toks, seps))


@st.composite
def related(draw: st.DrawFn, base: str) -> str:
    """A reference that shares n-grams with ``base``: tokens dropped, repeated, swapped, case-flipped."""
    words = base.split(" ")
    out = []
    for w in words:
        op = draw(st.integers(0, 9))
        if op == 0:
            continue
        if op == 1:
            out += [w, w]
        elif op == 2:
            out.append(w.upper())
        elif op == 3:
            out.append(draw(st.sampled_from(ADVERSARIAL)))
        else:
            out.append(w)
    if len(out) > 2 and draw(st.booleans()):
        i = draw(st.integers(0, len(out) - 2))
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


@st.composite
def corpus(draw: st.DrawFn, max_segments: int = 4) -> tuple[list[str], list[list[str]]]:
    """1..max_segments predictions, each with 1..3 references (the number varies between segments)."""
    n = draw(st.integers(1, max_segments))
    preds, refs = [], []
    for _ in range(n):
        pred = draw(sentence())
        group = []
        for _ in range(draw(st.integers(1, 3))):
            group.append(draw(related(pred)) if draw(st.integers(0, 3)) else draw(sentence()))
        preds.append(pred)
        refs.append(group)
    return preds, refs


@st.composite
def sacre_options(draw: st.DrawFn) -> dict[str, object]:
    opts: dict[str, object] = {
        "tokenize": draw(st.sampled_from(["13a", "intl", "char", "none"])),
        "smooth_method": draw(st.sampled_from(["exp", "floor", "add-k", "none"])),
        "lowercase": draw(st.booleans()),
        "effective_order": draw(st.booleans()),
        "max_ngram_order": draw(st.integers(1, 6)),
    }
    if opts["smooth_method"] in ("floor", "add-k") and draw(st.booleans()):
        opts["smooth_value"] = draw(st.sampled_from([0, 0.01, 0.5, 1, 2, 3.5]))
    return opts


weights_st = st.one_of(
    st.sampled_from([(0.25, 0.25, 0.25, 0.25), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.1, 0.3, 0.5, 0.1), (1.0,),
                     (0.2, 0.2, 0.2, 0.2, 0.2)]),
    st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=6).map(tuple),
)


# --- helpers ----------------------------------------------------------------------------------------------------
def close(a: float, b: float, rel: float = 1e-12) -> bool:
    """Equal to ``rel`` relative (exactly equal for zeros and infinities; NaN equals NaN)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


def sacre_reference(opts: dict[str, object], preds: list[str], refs: list[list[str]]) -> tuple[list[float], list[float]]:
    width = max(len(g) for g in refs)
    streams = [[g[k] if k < len(g) else None for g in refs] for k in range(width)]
    res = sacrebleu_metrics.BLEU(**opts).corpus_score(preds, streams)
    corpus_vals = [res.score, res.bp, res.sys_len, res.ref_len, *res.precisions]
    metric = sacrebleu_metrics.BLEU(**opts)
    sentences = [metric.sentence_score(p, g).score for p, g in zip(preds, refs)]
    return corpus_vals, sentences


def nltk_reference(kwargs: dict[str, object], preds: list[str], refs: list[list[str]]) -> tuple[object, list[float]]:
    sf = getattr(bleu_score.SmoothingFunction(), f"method{kwargs['smoothing']}")
    args = {"weights": kwargs["weights"], "smoothing_function": sf, "auto_reweigh": kwargs["auto_reweigh"]}
    hyps = [p.split() for p in preds]
    ref_toks = [[r.split() for r in g] for g in refs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            corpus_val: object = float(bleu_score.corpus_bleu(ref_toks, hyps, **args))
        except (AssertionError, IndexError, ZeroDivisionError) as exc:
            corpus_val = type(exc)
        sentences = []
        for r, h in zip(ref_toks, hyps):
            try:
                sentences.append(float(bleu_score.sentence_bleu(r, h, **args)))
            except (AssertionError, IndexError):
                sentences.append(math.nan)
    return corpus_val, sentences


# --- equality with the official libraries ----------------------------------------------------------------------
@given(corpus(), sacre_options())
def test_numpy_equals_sacrebleu(data: tuple[list[str], list[list[str]]], opts: dict[str, object]) -> None:
    preds, refs = data
    ours = llmtune.get_metric("bleu", **opts).compute(preds, refs)
    want_corpus, want_sent = sacre_reference(opts, preds, refs)
    got = list(ours.scores.values())
    assert len(got) == len(want_corpus)
    assert all(close(a, b) for a, b in zip(got, want_corpus)), (got, want_corpus)
    assert all(close(a, b) for a, b in zip(ours.per_example["bleu"], want_sent))


@given(corpus(), st.integers(0, 7), weights_st, st.booleans())
def test_numpy_equals_nltk(data: tuple[list[str], list[list[str]]], smoothing: int, weights: tuple[float, ...],
                           auto_reweigh: bool) -> None:
    preds, refs = data
    kwargs = {"smoothing": smoothing, "weights": weights, "auto_reweigh": auto_reweigh}
    want_corpus, want_sent = nltk_reference(kwargs, preds, refs)
    metric = llmtune.get_metric("bleu", definition="nltk", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = metric.compute(preds, refs)
    if isinstance(want_corpus, type):  # NLTK failed (method 6 assert): NaN corpus, per-example still NLTK's
        assert math.isnan(ours.scores["bleu"])
    else:
        assert close(ours.scores["bleu"], want_corpus), (ours.scores["bleu"], want_corpus)
    assert all(close(a, b) for a, b in zip(ours.per_example["bleu"], want_sent))


# --- metamorphic properties --------------------------------------------------------------------------------------
@given(corpus(), sacre_options(), st.randoms(use_true_random=False))
def test_reference_order_and_duplicates_do_not_matter(data: tuple[list[str], list[list[str]]],
                                                      opts: dict[str, object], rnd: object) -> None:
    preds, refs = data
    shuffled = []
    for g in refs:
        g2 = [*g, g[0]]
        rnd.shuffle(g2)  # type: ignore[attr-defined]
        shuffled.append(g2)
    metric = llmtune.get_metric("bleu", **opts)
    a, b = metric.compute(preds, refs), metric.compute(preds, shuffled)
    assert a.scores == b.scores
    assert list(a.per_example["bleu"]) == list(b.per_example["bleu"])


@given(corpus(), sacre_options(), st.randoms(use_true_random=False))
def test_segment_order_does_not_matter(data: tuple[list[str], list[list[str]]], opts: dict[str, object],
                                       rnd: object) -> None:
    preds, refs = data
    pairs = list(zip(preds, refs))
    rnd.shuffle(pairs)  # type: ignore[attr-defined]
    metric = llmtune.get_metric("bleu", **opts)
    assert metric.compute(preds, refs).scores == metric.compute([p for p, _ in pairs], [r for _, r in pairs]).scores


@given(sentence(), sacre_options())
def test_one_segment_corpus_is_its_sentence_score(pred: str, opts: dict[str, object]) -> None:
    res = llmtune.get_metric("bleu", **opts).compute([pred], [[pred + " extra"]])
    assert res.scores["bleu"] == res.per_example["bleu"][0]


@given(sentence(), st.sampled_from(["13a", "intl", "char", "none"]), st.integers(1, 6))
def test_identical_text_scores_100_with_effective_order(text: str, tok: str, order: int) -> None:
    res = llmtune.get_metric("bleu", tokenize=tok, effective_order=True, max_ngram_order=order).compute([text], [text])
    if res.scores["sys_len"] == 0:
        assert res.scores["bleu"] == 0.0
    else:  # exp(log(100)) is 100.00000000000004, not 100: never assert == 100
        assert abs(res.scores["bleu"] - 100.0) < 1e-9
        assert res.scores["bp"] == 1.0


@given(corpus(), sacre_options())
def test_lowercase_means_lowercasing_the_text(data: tuple[list[str], list[list[str]]],
                                              opts: dict[str, object]) -> None:
    preds, refs = data
    a = llmtune.get_metric("bleu", **{**opts, "lowercase": True}).compute(preds, refs)
    b = llmtune.get_metric("bleu", **{**opts, "lowercase": False}).compute(
        [p.lower() for p in preds], [[r.lower() for r in g] for g in refs])
    assert a.scores == b.scores


WORDS = [t for t in ADVERSARIAL if t and not any(c.isspace() for c in t)]


@st.composite
def long_corpus(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    """Predictions of >= 4 whitespace tokens, references related to them."""
    preds, refs = [], []
    for _ in range(draw(st.integers(1, 4))):
        pred = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=4, max_size=12)))
        preds.append(pred)
        refs.append([draw(related(pred)) for _ in range(draw(st.integers(1, 3)))])
    return preds, refs


@given(long_corpus(), st.sampled_from([("exp", 3), ("floor", 1), ("add-k", 2)]))
def test_sacrebleu_and_nltk_definitions_agree_on_long_hypotheses(data: tuple[list[str], list[list[str]]],
                                                                 pair: tuple[str, int]) -> None:
    """With whitespace tokens and every hypothesis >= 4 tokens: exp~method3, floor~method1, add-k~method2."""
    preds, refs = data
    method, smoothing = pair
    sacre = llmtune.get_metric("bleu", tokenize="none", smooth_method=method).compute(preds, refs).scores["bleu"]
    nltk_val = llmtune.get_metric("bleu", definition="nltk", smoothing=smoothing).compute(preds, refs).scores["bleu"]
    assert close(sacre / 100.0, nltk_val, rel=1e-9) or (sacre == 0.0 and nltk_val == 0.0)


@given(corpus(), sacre_options())
def test_official_backend_gives_the_same_keys_and_values(data: tuple[list[str], list[list[str]]],
                                                         opts: dict[str, object]) -> None:
    preds, refs = data
    ours = llmtune.get_metric("bleu", **opts).compute(preds, refs)
    theirs = llmtune.get_metric("bleu", backend="sacrebleu", **opts).compute(preds, refs)
    assert list(ours.scores) == list(theirs.scores)
    assert all(close(ours.scores[k], theirs.scores[k]) for k in ours.scores)
    assert ours.signature.rsplit("|impl:", 1)[0] == theirs.signature.rsplit("|impl:", 1)[0]


word = st.one_of(
    st.sampled_from(ADVERSARIAL), any_char_text, st.from_regex(r"[0-9.,]{1,8}[!.?]?", fullmatch=True),
    st.tuples(st.sampled_from(["x", "2019", "ab1", "日本", "e\u0301", "٣", "²", "Ⅻ", "一"]),
              st.sampled_from([".", ",", "!", "?", "-", "'", "$", "€", "%", "。", "、", "»", "¿", "(", ")", "&", "^"]))
    .map("".join),
).map(lambda s: "".join(s.split())).filter(bool)


@given(st.lists(word, max_size=12), st.booleans(), st.booleans())
def test_batched_word_tokenization_equals_one_word_at_a_time(words: list[str], left: bool, right: bool) -> None:
    """The corpus encoders tokenize all new distinct words in one pass of each rule (words joined by "\\n",
    line edges stood for by a digit): the same tokens as each word on its own (intl: sacrebleu's tokenizer; 13a:
    the per-word rules, which the corpus tests compare with sacrebleu after its HTML/line-break step)."""
    from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International

    from llmtune.metrics import _bleu_tokenizers as toks

    intl = TokenizerV14International()
    context = f"{' ' if left else ''}{{}}{' ' if right else ''}"
    assert toks._batch_intl(words, left, right) == [tuple(intl(context.format(w)).split()) for w in words]
    assert toks._batch_13a(words) == [toks.expand_13a(w) for w in words]
