"""Property tests: our NumPy ROUGE equals rouge-score (and our Porter stemmer NLTK's) on text built to break
tokenizers, plus metamorphic properties that must hold.

Equality with rouge-score is asserted **bit for bit** (stricter than the required 1e-12 relative): the same
integer statistics go through the same float operations in the same order. Profiles: ``ci`` (fixed seed,
150 examples per test) and ``long`` (``HYPOTHESIS_PROFILE=long``), see tests/conftest.py.
"""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtune.metrics import _porter
from llmtune.metrics.rouge import ROUGE_TYPES, NumpyRouge, tokenize

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
rouge_tokenize = pytest.importorskip("rouge_score.tokenize")
porter = pytest.importorskip("nltk.stem.porter")

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py

MEASURES = ("precision", "recall", "fmeasure")
#: examples per test in the active profile (ci: 150, long: 3000); costly tests run a fraction, cheap ones more
BUDGET: int = settings().max_examples
NLTK_STEMMER = porter.PorterStemmer()

# --- strategies ------------------------------------------------------------------------------------------------
#: English words whose stems exercise every Porter step, and the NLTK irregular forms.
ENGLISH = [
    "running", "runs", "ran", "runner", "dogs", "dog", "cats", "caresses", "ponies", "ties", "skies", "sky",
    "dying", "lying", "news", "innings", "outings", "cannings", "howe", "proceed", "exceed", "succeed", "agreed",
    "feed", "plastered", "bled", "motoring", "sing", "conflated", "troubled", "sized", "hopping", "tanned",
    "falling", "hissing", "fizzed", "failing", "filing", "happy", "enjoy", "relational", "conditional",
    "rational", "valenci", "hesitanci", "digitizer", "conformabli", "radicalli", "differentli", "vileli",
    "analogousli", "vietnamization", "predication", "operator", "feudalism", "decisiveness", "hopefulness",
    "callousness", "formaliti", "sensitiviti", "sensibiliti", "triplicate", "formative", "formalize",
    "electriciti", "electrical", "hopeful", "goodness", "revival", "allowance", "inference", "airliner",
    "gyroscopic", "adjustable", "defensible", "irritant", "replacement", "adjustment", "dependent", "adoption",
    "homologou", "communism", "activate", "angulariti", "homologous", "effective", "bowdlerize", "probate",
    "rate", "cease", "controll", "roll", "generalizations", "this", "was", "his", "the", "a", "it", "is",
    "very", "cold", "outside", "tea", "cup", "drinking", "yyyy", "1234s", "analogi", "fulli", "spied",
]
#: Tokens that trip tokenizers: every script, combining marks, emoji, the two non-ASCII characters that
#: lower-case into ASCII (Kelvin sign, dotted capital I), ligatures, odd digits, HTML, apostrophes, NUL.
ADVERSARIAL = [
    "\u212a", "\u212aelvin", "\u0130stanbul", "İ", "ı", "ß", "SS", "ﬁne", "ﬀ", "x²", "１２３", "٣٤", "日本語",
    "テキスト", "中文", "한국어", "Ελληνικά", "ΣΑΣ", "русский", "עברית", "العربية", "हिन्दी", "ไทย",
    "e\u0301", "cafe\u0301", "café", "naïve", "résumé", "😀", "👍🏽", "👩\u200d👩\u200d👧", "🇫🇷", "&amp;", "&lt;b&gt;",
    "&quot;", "&#39;", "<br/>", "<p>", "don't", "isn't", "3.14", "1,000", "under_score", "U.S.A.", "e-mail",
    "--", "...", "!!!", "—", "“quoted”", "\u200b", "\ufeff", "\x00", "A", "B", "The", "RUNNING",
]
SEPARATORS = [" ", " ", " ", " ", "\n", "\n", "\n\n", "\t", "\r\n", "\r", "\u2028", "\x85", "\xa0", ", ", ". ",
              "-", "\u3000", ""]

ascii_word = st.text(string.ascii_letters + string.digits, min_size=1, max_size=12)
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
word = st.one_of(
    st.sampled_from(ENGLISH), st.sampled_from(ENGLISH), st.sampled_from(ADVERSARIAL), ascii_word, any_text,
    st.sampled_from(["a", "b", "c"]),
)


@st.composite
def text(draw: st.DrawFn, max_words: int = 30) -> str:
    """A text of adversarial words and separators; sometimes empty, blank, tiny-alphabet or very long."""
    kind = draw(st.integers(0, 15))
    if kind == 0:
        return draw(st.sampled_from(["", " ", "\n", "\n\n", " \t\n ", "...", "日本語", "\u212a"]))
    if kind in (1, 2):  # small alphabet, several lines: stresses rougeLsum's back-tracking and counters
        toks = draw(st.lists(st.sampled_from("abc"), max_size=14))
        seps = draw(st.lists(st.sampled_from([" ", " ", "\n"]), min_size=len(toks), max_size=len(toks)))
        return "".join(t + s for t, s in zip(toks, seps))
    if kind == 3:  # long, repeated tokens (rouge-score is O(m*n) per LCS: keep it affordable)
        base = draw(st.lists(st.sampled_from(["the", "cat", "runs", "a", "b"]), min_size=1, max_size=4))
        reps = draw(st.integers(20, 60))
        return draw(st.sampled_from([" ", "\n", ". "])).join(base * reps)
    words = draw(st.lists(word, max_size=max_words))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(words), max_size=len(words)))
    return "".join(w + s for w, s in zip(words, seps))


@st.composite
def related(draw: st.DrawFn, base: str) -> str:
    """A text sharing words with ``base``: words dropped, repeated, swapped, lines re-broken."""
    words = base.split()
    out = [w for w in words if draw(st.integers(0, 4))]
    if out and draw(st.booleans()):
        i = draw(st.integers(0, len(out) - 1))
        out.insert(i, out[i])
    if len(out) > 1 and draw(st.booleans()):
        i = draw(st.integers(0, len(out) - 2))
        out[i], out[i + 1] = out[i + 1], out[i]
    seps = draw(st.lists(st.sampled_from([" ", " ", "\n"]), min_size=len(out), max_size=len(out)))
    return "".join(w + s for w, s in zip(out, seps))


@st.composite
def pair(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A prediction and 1-4 references, usually related to the prediction."""
    pred = draw(text())
    refs = [draw(st.one_of(related(pred), text())) for _ in range(draw(st.integers(1, 4)))]
    return pred, refs


types_subset = st.lists(st.sampled_from(ROUGE_TYPES), min_size=1, max_size=5, unique=True)


def official(types: list[str], stem: bool, pred: str, refs: list[str]) -> dict[str, tuple[float, float, float]]:
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=stem)
    out = scorer.score(refs[0], pred) if len(refs) == 1 else scorer.score_multi(refs, pred)
    return {t: tuple(out[t]) for t in types}


# --- equality with rouge-score -----------------------------------------------------------------------------------


@given(pairs=st.lists(pair(), min_size=1, max_size=4), types=types_subset, stem=st.booleans(),
       single=st.booleans())
def test_equal_to_rouge_score(pairs: list[tuple[str, list[str]]], types: list[str], stem: bool,
                              single: bool) -> None:
    """Every per-example value equals ``score`` (one reference) / ``score_multi`` (several), bit for bit;
    corpus values are their means. Several pairs are scored at once, so texts share one tokenization pass."""
    preds = [p for p, _ in pairs]
    refs: list[str] | list[list[str]] = [r[0] for _, r in pairs] if single else [r for _, r in pairs]
    got = NumpyRouge(rouge_types=types, use_stemmer=stem).compute(preds, refs)
    expected = [official(types, stem, p, r[:1] if single else r) for p, r in pairs]
    for t in types:
        for k, m in enumerate(MEASURES):
            column = got.per_example[f"{t}_{m}"]
            want = [e[t][k] for e in expected]
            assert column.tolist() == want, (t, m)
            assert got.scores[f"{t}_{m}"] == float(np.mean(np.asarray(want, dtype=np.float64)))


@settings(max_examples=max(10, BUDGET // 4))
@given(pred=text(max_words=200), ref=text(max_words=200), stem=st.booleans())
def test_equal_to_rouge_score_on_long_texts(pred: str, ref: str, stem: bool) -> None:
    types = ["rouge1", "rouge3", "rougeL", "rougeLsum"]
    got = NumpyRouge(rouge_types=types, use_stemmer=stem).compute([pred], [ref])
    want = official(types, stem, pred, [ref])
    for t in types:
        assert tuple(got.per_example[f"{t}_{m}"][0] for m in MEASURES) == want[t], t


@st.composite
def document(draw: st.DrawFn, base: list[list[str]] | None = None) -> str:
    """A long multi-line document (10-40 lines of 1-70 words from a small vocabulary, so that LCS ties abound),
    or an edited copy of ``base``'s lines: lines dropped, shuffled, words dropped and repeated."""
    vocab = draw(st.sampled_from([["a", "b", "c"], ["the", "cat", "sat", "on", "mat", "a"], ENGLISH[:40]]))
    if base is None:
        n_lines = draw(st.integers(10, 40))
        lines = [draw(st.lists(st.sampled_from(vocab), min_size=0, max_size=draw(st.sampled_from([8, 20, 70]))))
                 for _ in range(n_lines)]
    else:
        lines = [list(line) for line in base if draw(st.integers(0, 5))]
        lines = draw(st.permutations(lines)) if lines and draw(st.booleans()) else lines
        for line in lines:
            for _ in range(draw(st.integers(0, 3))):
                if line:
                    i = draw(st.integers(0, len(line) - 1))
                    line.insert(i, line[i]) if draw(st.booleans()) else line.pop(i)
    return "\n".join(" ".join(line) for line in lines)


@settings(max_examples=max(10, BUDGET // 5), deadline=None)
@given(data=st.data(), n=st.integers(1, 3), stem=st.booleans())
def test_rougelsum_equal_to_rouge_score_on_long_multiline_documents(data: st.DataObject, n: int, stem: bool) -> None:
    """rougeLsum's packed bit-parallel union LCS (several lines per 64-bit word, rows spanning many words,
    lines over 63 tokens on the Python path) against rouge-score, bit for bit, several documents at once."""
    preds, refs = [], []
    for _ in range(n):
        ref = data.draw(document())
        lines = [line.split(" ") if line else [] for line in ref.split("\n")]
        preds.append(data.draw(st.one_of(document(base=lines), document())))
        refs.append(ref)
    types = ["rougeL", "rougeLsum"]
    got = NumpyRouge(rouge_types=types, use_stemmer=stem).compute(preds, refs)
    for i, (p, r) in enumerate(zip(preds, refs)):
        want = official(types, stem, p, [r])
        for t in types:
            assert tuple(got.per_example[f"{t}_{m}"][i] for m in MEASURES) == want[t], (t, i)


@given(t=text(), stem=st.booleans())
def test_tokenizer_equals_rouge_score(t: str, stem: bool) -> None:
    assert tokenize(t, stem) == rouge_tokenize.tokenize(t, NLTK_STEMMER if stem else None)


@st.composite
def english_like(draw: st.DrawFn) -> str:
    """Consonant/vowel/y stems with Porter suffixes stacked on them."""
    stem = draw(st.text("aeiouybcdfglmnprstvwxz", min_size=0, max_size=8))
    suffixes = draw(st.lists(st.sampled_from([
        "s", "es", "ies", "ied", "sses", "ss", "ed", "eed", "ing", "y", "ational", "tional", "enci", "anci", "izer",
        "bli", "alli", "entli", "eli", "ousli", "ization", "ation", "ator", "alism", "iveness", "fulness", "ousness",
        "aliti", "iviti", "biliti", "fulli", "logi", "icate", "ative", "alize", "iciti", "ical", "ful", "ness", "al",
        "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism", "ate", "iti",
        "ous", "ive", "ize", "e", "ll", "at", "bl", "iz",
    ]), max_size=3))
    return stem + "".join(suffixes)


@settings(max_examples=BUDGET * 2)
@given(w=st.one_of(english_like(), st.text(string.ascii_lowercase + string.digits, max_size=14),
                   st.text(max_size=6), st.sampled_from(ENGLISH)))
def test_porter_equals_nltk(w: str) -> None:
    assert _porter.stem_uncached(w) == NLTK_STEMMER.stem(w)


def test_porter_equals_nltk_on_a_generated_word_list() -> None:
    """10 000 words from a fixed seed: every 1-3 letter word over a small alphabet, and suffix stacks."""
    rng = random.Random(20240601)
    letters = "aeiouybcdlmnrstwxz"
    words = {a + b + c for a in letters for b in letters for c in ["", *letters]}
    sufs = ["s", "es", "ies", "ed", "eed", "ied", "ing", "y", "ational", "ation", "ness", "ful", "al", "ement",
            "ion", "ll", "e", "alli", "logi", "iviti", "ize", "ate", "ous", "ive", "bli", "fulli"]
    while len(words) < 10000:
        stem = "".join(rng.choice(letters) for _ in range(rng.randint(1, 7)))
        words.add(stem + "".join(rng.choice(sufs) for _ in range(rng.randint(1, 2))))
    bad = [w for w in sorted(words) if _porter.stem_uncached(w) != NLTK_STEMMER.stem(w)]
    assert bad == []


# --- metamorphic properties -------------------------------------------------------------------------------------


@given(pred=text(), ref=text(), stem=st.booleans())
def test_bounds_and_symmetry(pred: str, ref: str, stem: bool) -> None:
    """0 <= P, R, F <= 1; swapping prediction and reference swaps P and R and keeps F for rouge1/2/L."""
    types = ["rouge1", "rouge2", "rouge4", "rougeL", "rougeLsum"]
    m = NumpyRouge(rouge_types=types, use_stemmer=stem)
    a = m.compute([pred], [ref]).per_example
    b = m.compute([ref], [pred]).per_example
    for key, v in a.items():
        assert 0.0 <= v[0] <= 1.0, key
    for t in ("rouge1", "rouge2", "rouge4", "rougeL"):
        assert a[f"{t}_precision"][0] == b[f"{t}_recall"][0]
        assert a[f"{t}_recall"][0] == b[f"{t}_precision"][0]
        assert a[f"{t}_fmeasure"][0] == b[f"{t}_fmeasure"][0]


@given(pred=text(), ref=text())
def test_rougelsum_equals_rougel_without_newlines(pred: str, ref: str) -> None:
    pred, ref = pred.replace("\n", " "), ref.replace("\n", " ")
    r = NumpyRouge(rouge_types=["rougeL", "rougeLsum"]).compute([pred], [ref]).per_example
    for m in MEASURES:
        assert r[f"rougeL_{m}"][0] == r[f"rougeLsum_{m}"][0]


@given(t=text(), stem=st.booleans())
def test_identical_texts_score_one(t: str, stem: bool) -> None:
    n_tokens = len(tokenize(t, stem))
    r = NumpyRouge(rouge_types=["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=stem)
    s = r.compute([t], [t]).per_example
    for key in ("rouge1", "rougeL", "rougeLsum"):
        assert s[f"{key}_fmeasure"][0] == (1.0 if n_tokens else 0.0)
    assert s["rouge2_fmeasure"][0] == (1.0 if n_tokens >= 2 else 0.0)


@given(pred=text(), ref=text(), perm_seed=st.integers(0, 1000))
def test_rougelsum_ignores_line_order(pred: str, ref: str, perm_seed: int) -> None:
    """rouge-score's greedy hit count equals sum_x min(union count, prediction count): line order is irrelevant."""
    rng = random.Random(perm_seed)

    def shuffle(s: str) -> str:
        lines = s.split("\n")
        rng.shuffle(lines)
        return "\n".join(lines)

    m = NumpyRouge(rouge_types=["rougeLsum"])
    a = m.compute([pred], [ref]).per_example["rougeLsum_fmeasure"][0]
    b = m.compute([shuffle(pred)], [shuffle(ref)]).per_example["rougeLsum_fmeasure"][0]
    assert a == b


@given(pred=st.lists(st.sampled_from(ENGLISH), max_size=15).map(" ".join),
       ref=st.lists(st.sampled_from(ENGLISH), max_size=15).map(" ".join), stem=st.booleans())
def test_ascii_case_and_punctuation_invariance(pred: str, ref: str, stem: bool) -> None:
    """Upper-casing ASCII text, and punctuation/line breaks between words, change nothing for rouge1/2/L."""
    m = NumpyRouge(rouge_types=["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    a = m.compute([pred], [ref]).scores
    b = m.compute([pred.upper().replace(" ", " -- ")], [ref.title().replace(" ", ",\n")]).scores
    assert a == b


@given(p=pair(), types=types_subset)
def test_multi_reference_is_the_best_single_reference(p: tuple[str, list[str]], types: list[str]) -> None:
    """Several references give, per type, the single-reference result with the highest F (first on ties);
    adding a duplicate of a reference changes nothing."""
    pred, refs = p
    m = NumpyRouge(rouge_types=types)
    multi = m.compute([pred], [refs]).per_example
    singles = [m.compute([pred], [r]).per_example for r in refs]
    dup = m.compute([pred], [[*refs, refs[0]]]).per_example
    for t in types:
        best = int(np.argmax([s[f"{t}_fmeasure"][0] for s in singles]))
        for mm in MEASURES:
            assert multi[f"{t}_{mm}"][0] == singles[best][f"{t}_{mm}"][0]
            assert dup[f"{t}_{mm}"][0] == multi[f"{t}_{mm}"][0]


@settings(max_examples=max(10, BUDGET // 3))
@given(pairs=st.lists(pair(), min_size=1, max_size=6), stem=st.booleans())
def test_batching_changes_nothing(pairs: list[tuple[str, list[str]]], stem: bool) -> None:
    """Scoring pairs together equals scoring each alone (the corpus is tokenized in one pass)."""
    m = NumpyRouge(rouge_types=["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"], use_stemmer=stem)
    together = m.compute([p for p, _ in pairs], [r for _, r in pairs]).per_example
    for i, (p, r) in enumerate(pairs):
        alone = m.compute([p], [r]).per_example
        for key, values in alone.items():
            assert together[key][i] == values[0], key
