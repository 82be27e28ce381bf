"""BLEU: worked examples, every option combination on a fixed adversarial corpus, errors, signature, backends."""

from __future__ import annotations

import itertools
import logging
import math
import warnings

import numpy as np
import pytest

import llmtune
from llmtune.core.errors import InvalidOptionError, UnknownOptionError
from llmtune.core.results import LazyMapping
from llmtune.metrics import _bleu_tokenizers as toks
from llmtune.metrics import _unicode_tables

sacrebleu = pytest.importorskip("sacrebleu")
from sacrebleu.metrics import BLEU  # noqa: E402
from sacrebleu.metrics.bleu import _get_tokenizer  # noqa: E402

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py

logging.getLogger("sacrebleu").setLevel(logging.ERROR)

TEA_REF = "I am very happy to say that I am drinking a warm cup of tea"
TEA = ["I am very happy that I am drinking a cup of tea",
       "I am very happy that I am drinking a warm cup of tea",
       "I am very happy to say that I am drinking a warm tea"]

#: A fixed corpus of text that breaks tokenizers (used for the exhaustive option grid below).
ADVERSARIAL_PREDS = [
    "The cat sat on the mat.",
    "It's 3.14 or 1,000-2,000 e-mail.",
    "U.S.A. &amp;lt; &quot;quoted&quot; <skipped> x-\ny end 2019.",
    "日本語のテキスト，です。 «guillemets» — “curly” \u212a \u0130stanbul",
    "the the the the",
    "",
    "   \n\t",
    "a\u00a0b\x1cc\u200bd e\u0301 😀 👩\u200d👩\u200d👧",
    "isn't it? (yes) [no] {maybe} $5 50% #1 @me a/b",
    "Ελληνικά ΣΑΣ русский текст ١٢٣ １２３ x² ﬁne",
]
ADVERSARIAL_REFS = [
    ["The cat is on the mat.", "There is a cat on the mat."],
    ["It is 3.14 or 1,000 - 2,000 e-mail ."],
    ["U.S.A. < \"quoted\" xy end 2019 .", "&lt; quoted", "end 2019."],
    ["日本語のテキスト，です。 «guillemets» — “curly” K İstanbul"],
    ["the cat"],
    ["nothing"],
    [""],
    ["a b c\u200bd é 😀"],
    ["isn't it ? ( yes ) [ no ]", "$5 50 % #1"],
    ["ελληνικά σας русский текст ١٢٣ 123 x2 fine", "Ελληνικά"],
]


def sacre(opts: dict[str, object], preds: list[str], refs: list[list[str]]) -> tuple[list[float], list[float]]:
    width = max(len(g) for g in refs)
    streams = [[g[k] if k < len(g) else None for g in refs] for k in range(width)]
    res = BLEU(**opts).corpus_score(preds, streams)
    metric = BLEU(**opts)
    return ([res.score, res.bp, res.sys_len, res.ref_len, *res.precisions],
            [metric.sentence_score(p, g).score for p, g in zip(preds, refs)])


# --- the lecture and the reference notes ---------------------------------------------------------------------
def test_lecture_tea_examples_nltk() -> None:
    res = llmtune.get_metric("bleu", definition="nltk").compute(TEA, [TEA_REF] * 3)
    assert [round(x, 4) for x in res.per_example["bleu"]] == [0.4953, 0.7298, 0.7979]
    assert list(res.per_example["bleu"]) == [0.4953319416460018, 0.729836014355472, 0.7979042533838905]


def test_same_result_through_the_nltk_backend() -> None:
    ours = llmtune.get_metric("bleu", definition="nltk").compute(TEA, [TEA_REF] * 3)
    theirs = llmtune.get_metric("bleu", backend="nltk").compute(TEA, [TEA_REF] * 3)
    assert ours.scores == theirs.scores
    assert list(ours.per_example["bleu"]) == list(theirs.per_example["bleu"])


def test_clipping_and_exp_smoothing_example() -> None:
    """sentence_bleu('the the the the', ['the cat']) = 15.97 with precisions 25/16.7/12.5/12.5 (notes 3.4)."""
    res = llmtune.get_metric("bleu", effective_order=True).compute(["the the the the"], [["the cat"]])
    assert round(res.scores["bleu"], 2) == 15.97
    assert [res.scores[f"precision_{n}"] for n in range(1, 5)] == [25.0, 100 / 6, 12.5, 12.5]


def test_identical_strings_score_just_above_100() -> None:
    res = llmtune.get_metric("bleu").compute(["The cat sat on the mat."], ["The cat sat on the mat."])
    assert res.scores["bleu"] == 100.00000000000004  # exp(log(100)), as sacrebleu


def test_short_corpus_needs_effective_order() -> None:
    assert llmtune.get_metric("bleu").compute(["a"], ["a"]).scores["bleu"] == 0.0
    eff = llmtune.get_metric("bleu", effective_order=True).compute(["a"], ["a"])
    assert eff.scores["bleu"] == 100.00000000000004


def test_sentence_score_does_not_force_effective_order() -> None:
    """``BLEU(effective_order=False).sentence_score`` only warns; it scores 0 for a 3-token sentence: so do we."""
    res = llmtune.get_metric("bleu").compute(["a b c"], ["a b c"])
    assert res.per_example["bleu"][0] == BLEU().sentence_score("a b c", ["a b c"]).score == 0.0


def test_nltk_without_smoothing_is_tiny_not_zero() -> None:
    metric = llmtune.get_metric("bleu", definition="nltk")
    with pytest.warns(UserWarning, match="method0"):
        res = metric.compute(["a b c"], ["a b c"])
    assert 0.0 < res.scores["bleu"] < 1e-70  # 1.22e-77: NLTK's sys.float_info.min substitution
    assert res.scores["bleu"] == pytest.approx(1.2213386273470075e-77, rel=1e-12)


def test_nltk_method6_needs_trigrams() -> None:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    metric = llmtune.get_metric("bleu", definition="nltk", smoothing=6)
    # NLTK fails the corpus (no trigram match) but defines sentence 1 (no unigram match: 0): the call does not
    # fail; the corpus value is NaN with a warning, the per-example values are NLTK's where it has them
    with pytest.warns(UserWarning, match="method 6"):
        res = metric.compute(["a b", "x y"], ["a b", "c d"])
    assert math.isnan(res.scores["bleu"])
    assert math.isnan(res.per_example["bleu"][0])
    want = sentence_bleu([["c", "d"]], ["x", "y"], smoothing_function=SmoothingFunction().method6)
    assert res.per_example["bleu"][1] == want == 0
    res = metric.compute(["a b", TEA[0]], ["a b", TEA_REF])  # corpus has trigram matches: fine
    assert math.isnan(res.per_example["bleu"][0]) and res.per_example["bleu"][1] > 0


# --- every option combination against sacrebleu and NLTK ------------------------------------------------------
@pytest.mark.parametrize("tokenize", ["13a", "intl", "char", "none"])
def test_every_sacrebleu_option_combination(tokenize: str) -> None:
    preds, refs = ADVERSARIAL_PREDS, ADVERSARIAL_REFS
    smooths: list[tuple[str, float | None]] = [("exp", None), ("none", None), ("floor", None), ("floor", 0.5),
                                               ("add-k", None), ("add-k", 2.5)]
    n = 0
    for (method, value), lowercase, eff, order in itertools.product(smooths, [False, True], [False, True],
                                                                    [1, 2, 3, 4, 5]):
        opts: dict[str, object] = {"tokenize": tokenize, "smooth_method": method, "lowercase": lowercase,
                                   "effective_order": eff, "max_ngram_order": order}
        if value is not None:
            opts["smooth_value"] = value
        res = llmtune.get_metric("bleu", **opts).compute(preds, refs)
        want, want_sent = sacre(opts, preds, refs)
        assert list(res.scores.values()) == want, opts
        assert list(res.per_example["bleu"]) == want_sent, opts
        n += 1
    assert n == 6 * 2 * 2 * 5


def test_every_nltk_smoothing_and_weights() -> None:
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

    preds = [*TEA, "the the the the", "a b c d e f", "x"]
    refs = [[TEA_REF]] * 3 + [["the cat"], ["a b c d e f", "a b c"], ["x y z"]]
    hyps, ref_toks = [p.split() for p in preds], [[r.split() for r in g] for g in refs]
    for k, weights, reweigh in itertools.product(range(8), [(0.25,) * 4, (0.5, 0.5), (0.1, 0.3, 0.5, 0.1), (0.2,) * 5],
                                                 [False, True]):
        sf = getattr(SmoothingFunction(), f"method{k}")
        kw = {"weights": weights, "smoothing_function": sf, "auto_reweigh": reweigh}
        metric = llmtune.get_metric("bleu", definition="nltk", smoothing=k, weights=weights, auto_reweigh=reweigh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if k == 6 and len(weights) < 3:  # NLTK raises IndexError everywhere: NaN, the call does not fail
                res = metric.compute(preds, refs)
                assert math.isnan(res.scores["bleu"]) and all(map(math.isnan, res.per_example["bleu"]))
                continue
            res = metric.compute(preds, refs)
            assert res.scores["bleu"] == corpus_bleu(ref_toks, hyps, **kw), (k, weights)
            want = []
            for r, h in zip(ref_toks, hyps):
                try:
                    want.append(float(sentence_bleu(r, h, **kw)))
                except AssertionError:
                    want.append(math.nan)
        got = res.per_example["bleu"]
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(got, want)), (k, weights)


def test_high_order_with_large_vocabulary_renumbers_keys() -> None:
    """A vocabulary whose 8-gram keys overflow int64 takes the re-numbering path; still exact."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(3000)]
    preds = [" ".join(rng.choice(words, 30)) for _ in range(50)]
    refs = [[" ".join(p.split()[:20] + list(rng.choice(words, 10))), p] for p in preds]
    opts: dict[str, object] = {"max_ngram_order": 8, "tokenize": "none"}
    res = llmtune.get_metric("bleu", **opts).compute(preds, refs)
    want, want_sent = sacre(opts, preds, refs)
    assert list(res.scores.values()) == want
    assert list(res.per_example["bleu"]) == want_sent


# --- tokenizers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "tokens"), [
    ("It's 3.14 or 1,000-2,000 e-mail.", "It's 3.14 or 1,000 - 2,000 e-mail ."),
    ("U.S.A.", "U . S . A ."),
    ("end 2019.", "end 2019 ."),
    ("&amp;lt;", "<"),
    ("&amp;quot;", "& quot ;"),
    ("x-\ny", "xy"),
    ("a\u00a0b\x1cc\u200bd", "a b c\u200bd"),
])
def test_13a_examples_from_the_notes(text: str, tokens: str) -> None:
    assert toks.tokenize([text], "13a", False) == [tokens.split()]


def test_intl_examples() -> None:
    assert toks.tokenize(["end 2019.", "isn't", "“quoted”"], "intl", False) == [
        ["end", "2019."], ["isn", "'", "t"], ["“", "quoted", "”"]]


@pytest.mark.parametrize("name", ["13a", "intl", "char", "none"])
def test_tokenizers_equal_sacrebleu_on_adversarial_lines(name: str) -> None:
    lines = [*ADVERSARIAL_PREDS, *(r for g in ADVERSARIAL_REFS for r in g)]
    theirs = _get_tokenizer(name)()
    for lowercase in (False, True):
        want = [theirs((s.lower() if lowercase else s).rstrip()).split() for s in lines]
        assert toks.tokenize(lines, name, lowercase) == want


@pytest.mark.parametrize("line", ["x", " x", "x.", " .x", "“a”", " (a) b, c. ", "a\u2028“b”\xa0-c-", "..", "\u1b4e"])
def test_intl_word_contexts(line: str) -> None:
    """intl is computed per word: first and last words keep their real context (no padding in intl)."""
    theirs = _get_tokenizer("intl")()
    assert toks.tokenize_intl([line.rstrip()]) == [theirs(line.rstrip()).split()]
    assert toks.tokenize_intl([f"{line} {line}".rstrip()]) == [theirs(f"{line} {line}".rstrip()).split()]


@pytest.mark.parametrize("lowercase", [False, True])
def test_13a_corpus_containing_nul_takes_the_line_by_line_path(lowercase: bool) -> None:
    """The fast 13a path joins segments with NUL; a corpus that contains NUL must give the same numbers."""
    preds = [*ADVERSARIAL_PREDS, "nul\x00byte. x-\ny"]
    refs = [*ADVERSARIAL_REFS, ["nul\x00byte ."]]
    opts: dict[str, object] = {"lowercase": lowercase, "effective_order": True}
    res = llmtune.get_metric("bleu", **opts).compute(preds, refs)
    want, want_sent = sacre(opts, preds, refs)
    assert list(res.scores.values()) == want
    assert list(res.per_example["bleu"]) == want_sent


def test_unicode_tables_equal_the_regex_module() -> None:
    """The frozen P/S/N tables equal the classes of the installed ``regex`` (what sacrebleu's intl uses)."""
    pytest.importorskip("regex")
    fresh = _unicode_tables._generate()
    assert tuple(fresh["PUNCTUATION"]) == _unicode_tables.PUNCTUATION
    assert tuple(fresh["SYMBOL"]) == _unicode_tables.SYMBOL
    assert tuple(fresh["NUMBER"]) == _unicode_tables.NUMBER


# --- inputs, options, signature, laziness ----------------------------------------------------------------------
def test_length_mismatch_is_an_error_not_a_truncation() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        llmtune.get_metric("bleu").compute(["a", "b"], ["a"])


@pytest.mark.parametrize("backend", ["numpy", "sacrebleu", "nltk"])
def test_bad_inputs_name_the_index(backend: str) -> None:
    metric = llmtune.get_metric("bleu", backend=backend)
    with pytest.raises(TypeError, match=r"predictions\[1\]"):
        metric.compute(["a", None], ["a", "b"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"references\[0\]\[1\]"):
        metric.compute(["a"], [["a", 3]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty"):
        metric.compute([], [])


def test_options_of_the_other_definition_are_rejected() -> None:
    with pytest.raises(InvalidOptionError, match="'smoothing' applies only to definition='nltk'"):
        llmtune.get_metric("bleu", smoothing=1)
    with pytest.raises(InvalidOptionError, match="'tokenize' applies only to definition='sacrebleu'"):
        llmtune.get_metric("bleu", definition="nltk", tokenize="13a")
    with pytest.raises(InvalidOptionError, match="definition='sacrebleu' only"):
        llmtune.get_metric("bleu", backend="sacrebleu", definition="nltk")
    with pytest.raises(InvalidOptionError, match="definition='nltk' only"):
        llmtune.get_metric("bleu", backend="nltk", definition="sacrebleu")


@pytest.mark.parametrize(("options", "match"), [
    ({"tokenize": "zh"}, "tokenize"),
    ({"smooth_method": "expo"}, "Did you mean 'exp'"),
    ({"smooth_value": 0.2}, "no effect with smooth_method='exp'"),
    ({"smooth_method": "floor", "smooth_value": -1}, ">= 0"),
    ({"max_ngram_order": 0}, ">= 1"),
    ({"lowercase": "yes"}, "must be bool"),
    ({"definition": "nltk", "smoothing": 8}, "smoothing"),
    ({"definition": "nltk", "weights": ()}, "at least one"),
    ({"definition": "nltk", "weights": (0.5, "x")}, r"weights\[1\]"),
])
def test_invalid_option_values(options: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        llmtune.get_metric("bleu", **options)


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(UnknownOptionError, match="smooth_method"):
        llmtune.get_metric("bleu", smoth_method="exp")


def test_signature_matches_sacrebleu_format() -> None:
    for opts in ({}, {"lowercase": True, "effective_order": True, "tokenize": "intl", "smooth_method": "floor"},
                 {"smooth_method": "add-k", "smooth_value": 2}, {"tokenize": "char", "smooth_method": "none"}):
        metric = BLEU(**opts)  # type: ignore[arg-type]
        metric.corpus_score(["a b"], [["a b"]])
        ours = llmtune.get_metric("bleu", **opts).compute(["a b"], ["a b"]).signature
        assert ours == f"{metric.get_signature().format()}|impl:llmtune-numpy-{llmtune.__version__}"


def test_signature_variable_references_and_order() -> None:
    sig = llmtune.get_metric("bleu", max_ngram_order=2).compute(["a", "b"], [["a"], ["b", "c"]]).signature
    assert sig.startswith("nrefs:var|") and "|ngram:2|" in sig
    nl = llmtune.get_metric("bleu", definition="nltk", smoothing=3).compute(["a"], ["a"]).signature
    assert nl.startswith("nrefs:1|def:nltk|smooth:method3|weights:0.25,0.25,0.25,0.25|")


def test_per_example_is_lazy() -> None:
    res = llmtune.get_metric("bleu").compute(TEA, [TEA_REF] * 3)
    assert isinstance(res.per_example, LazyMapping)
    assert "lazy" in repr(res.per_example)
    assert len(res.per_example["bleu"]) == 3 and "computed" in repr(res.per_example)


# --- official backends: same keys and scales ------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"max_ngram_order": 2, "tokenize": "char"}, {"smooth_method": "add-k"}])
def test_sacrebleu_backend_same_keys_and_values(opts: dict[str, object]) -> None:
    ours = llmtune.get_metric("bleu", **opts).compute(ADVERSARIAL_PREDS, ADVERSARIAL_REFS)
    theirs = llmtune.get_metric("bleu", backend="sacrebleu", **opts).compute(ADVERSARIAL_PREDS, ADVERSARIAL_REFS)
    assert ours.scores == theirs.scores
    assert list(ours.per_example) == list(theirs.per_example) == ["bleu"]
    assert list(ours.per_example["bleu"]) == list(theirs.per_example["bleu"])
    assert theirs.signature.endswith(f"|impl:sacrebleu-{sacrebleu.__version__}")


@pytest.mark.parametrize("opts", [{}, {"rouge_types": ["rouge1", "rougeLsum"], "use_stemmer": True}])
def test_rouge_score_backend_same_keys_as_numpy(opts: dict[str, object]) -> None:
    pytest.importorskip("rouge_score")
    preds = ["it is very cold outside.", "the cats are running\nfast today", "日本語"]
    refs = [["it is cold outside."], ["a cat runs fast", "cats ran\nfast today"], ["日本語"]]
    ours = llmtune.get_metric("rouge", **opts).compute(preds, refs)
    theirs = llmtune.get_metric("rouge", backend="rouge-score", **opts).compute(preds, refs)
    assert list(ours.scores) == list(theirs.scores)
    assert list(ours.per_example) == list(theirs.per_example)
    for key in ours.per_example:
        assert list(ours.per_example[key]) == list(theirs.per_example[key]), key
    assert ours.signature.split("|impl:")[0] == theirs.signature.split("|impl:")[0]


def test_intl_joined_encoding_equals_sacrebleu_across_cache_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The joined-corpus intl encoder (memoised words, line-edge words redone in context) gives sacrebleu's
    tokens, also when its memo is reset between and during calls."""
    tokenizer_intl = pytest.importorskip("sacrebleu.tokenizers.tokenizer_intl")
    official = tokenizer_intl.TokenizerV14International()
    monkeypatch.setattr(toks, "_CACHE_MAX_WORDS", 4)
    corpora = [[".5 a.", " x, 1,000 ", "", "(a) b€ ¿q?", "end."], ["«a» 5.", "", " .x", "a-b —", "日本。x"]]
    for lines in corpora * 2:
        ids, lens = toks.encode(lines, "intl", False)
        want = [official(line.rstrip()).split() for line in lines]
        assert lens.tolist() == [len(w) for w in want]
        flat = [t for w in want for t in w]
        pairs = set(zip(ids.tolist(), flat))
        assert len(pairs) == len({t for _, t in pairs}) == len({i for i, _ in pairs})  # equal tokens <=> equal ids


@pytest.mark.skipif(__import__("sys").version_info >= (3, 12), reason="used only where builtin sum is left-to-right")
@pytest.mark.parametrize("kw", [{}, {"effective_order": True}, {"smooth_method": "floor", "smooth_value": 0.01},
                                {"smooth_method": "add-k", "smooth_value": 3.5, "max_ngram_order": 6},
                                {"smooth_method": "add-k", "smooth_value": 0}, {"smooth_method": "none"},
                                {"smooth_method": "floor", "effective_order": True, "max_ngram_order": 2}])
def test_vectorised_sentence_scores_equal_the_per_segment_formula(kw: dict[str, object]) -> None:
    from llmtune.metrics import bleu

    opts = llmtune.get_metric("bleu", **kw).options
    rng = np.random.default_rng(1)
    n, order = 2000, opts.order
    hyp, ref = rng.integers(0, 12, n), rng.integers(0, 12, n)
    total = np.maximum(hyp[:, None] - np.arange(order)[None, :], 0)
    correct = np.minimum(total, rng.integers(0, 6, (n, order))) * (rng.random((n, order)) < 0.7)
    st = bleu.SegmentStats(hyp, ref, correct, total, [1] * n)
    want = [bleu.sacrebleu_score(c, t, int(h), int(r), opts)[0]
            for c, t, h, r in zip(correct.tolist(), total.tolist(), hyp, ref)]
    assert bleu._sacre_sentences_vectorised(st, opts).tolist() == want
