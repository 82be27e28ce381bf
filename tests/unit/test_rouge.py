"""NumPy ROUGE: the lecture's numbers, rouge-score's quirks, options, input errors, signature, bootstrap."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

import llmtune
from llmtune.core.errors import InvalidOptionError, UnknownOptionError
from llmtune.metrics import _porter
from llmtune.metrics.rouge import DEFAULT_ROUGE_TYPES, ROUGE_TYPES, NumpyRouge, tokenize

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py

ALL = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def one(pred: str, ref: str | list[str], **options: object) -> dict[str, float]:
    """Per-example values of a single pair, as plain floats."""
    r = NumpyRouge(**options).compute([pred], [ref])
    return {k: float(v[0]) for k, v in r.per_example.items()}


# --- the lecture ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", [False, True])
def test_lecture_example_rouge1(stem: bool) -> None:
    # rouge-score's call in the slide: scorer.score(reference, candidate); the candidate is the prediction.
    s = one("it is very cold outside.", "it is cold outside.", rouge_types=["rouge1", "rouge2", "rougeL"],
            use_stemmer=stem)
    assert s["rouge1_precision"] == 0.8
    assert s["rouge1_recall"] == 1.0
    assert round(s["rouge1_fmeasure"], 3) == 0.889
    assert s["rougeL_fmeasure"] == s["rouge1_fmeasure"]
    # the slide's ROUGE-2 numbers (2/4, 2/3, 0.57) are this pair's, not those of the pair printed beside them
    assert (s["rouge2_precision"], s["rouge2_recall"]) == (0.5, 2 / 3)
    assert round(s["rouge2_fmeasure"], 2) == 0.57


def test_lecture_second_pair_as_rouge_score_counts_it() -> None:
    s = one("It is is very very cold cold outside", "It is is cold cold outside", rouge_types=["rouge2"])
    assert (s["rouge2_precision"], s["rouge2_recall"]) == (4 / 7, 4 / 5)


def test_prediction_and_reference_are_not_swapped() -> None:
    s = one("it is cold outside.", "it is very cold outside.", rouge_types=["rouge1"])
    assert (s["rouge1_precision"], s["rouge1_recall"]) == (1.0, 0.8)


def test_registry_default_backend_and_keys() -> None:
    m = llmtune.get_metric("rouge")
    assert type(m) is NumpyRouge
    assert m.options.rouge_types == DEFAULT_ROUGE_TYPES
    r = m.compute(["a b c", "d e"], ["a b d", "d e"])
    assert set(r.scores) == {f"{t}_{x}" for t in DEFAULT_ROUGE_TYPES for x in ("precision", "recall", "fmeasure")}
    for key, values in r.per_example.items():
        assert isinstance(values, np.ndarray) and values.shape == (2,) and values.dtype == np.float64
        assert r.scores[key] == float(np.mean(values))
        assert type(r.scores[key]) is float
    assert r["rouge1_fmeasure"] == r.scores["rouge1_fmeasure"]


# --- tokenizer and stemmer quirks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("café naïve résumé", ["caf", "na", "ve", "r", "sum"]),
        ("don't", ["don", "t"]),
        ("3.14", ["3", "14"]),
        ("under_score", ["under", "score"]),
        ("ﬁne", ["ne"]),
        ("\u212a", ["k"]),  # KELVIN SIGN lower-cases to ASCII k
        ("İstanbul", ["i", "stanbul"]),  # dotted capital I lower-cases to i + combining dot
        ("日本語 ΣΑΣ русский", []),
        ("x²  １２３ ٣", ["x"]),
        ("", []),
        (" \t\n ", []),
        ("A-B\rC\u2028d", ["a", "b", "c", "d"]),
    ],
)
def test_tokenizer_like_rouge_score(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_stemmer_only_on_tokens_longer_than_three() -> None:
    assert tokenize("his this was caresses ponies generalizations agreed yyyy 1234s", use_stemmer=True) == [
        "his", "thi", "was", "caress", "poni", "gener", "agre", "yyyi", "1234",
    ]
    assert one("his", "hi", rouge_types=["rouge1"], use_stemmer=True)["rouge1_fmeasure"] == 0.0
    s = one("runs dog", "running dogs", rouge_types=["rouge1", "rougeL"], use_stemmer=True)
    assert s["rouge1_fmeasure"] == 1.0 and s["rougeL_fmeasure"] == 1.0


@pytest.mark.parametrize(
    ("word", "stem"),
    [
        ("skies", "sky"), ("dying", "die"), ("news", "news"), ("innings", "inning"), ("proceed", "proceed"),
        ("ties", "tie"), ("cries", "cri"), ("died", "die"), ("spied", "spi"), ("happy", "happi"),
        ("enjoy", "enjoy"), ("relational", "relat"), ("conditional", "condit"), ("radically", "radic"),
        ("hopefulli", "hope"), ("analogi", "analog"), ("hopping", "hop"), ("falling", "fall"),
        ("filing", "file"), ("controll", "control"), ("agreed", "agre"), ("feed", "feed"), ("at", "at"),
        ("Running", "run"), ("generalizations", "gener"), ("oed", "o"),
    ],
)
def test_porter_matches_nltk_on_known_words(word: str, stem: str) -> None:
    assert _porter.stem_uncached(word) == stem
    assert _porter.stem(word) == stem


# --- degenerate inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref"),
    [("", ""), ("!!!", "???"), ("日本語", "日本語"), ("\n\n", "a"), ("a", "\n\n"), ("   ", "a b"), ("a b", "")],
)
def test_no_tokens_scores_zero(pred: str, ref: str) -> None:
    s = one(pred, ref, rouge_types=ALL)
    assert all(v == 0.0 for v in s.values()), s


def test_single_token_and_repeats() -> None:
    s = one("a", "a", rouge_types=ALL)
    assert s["rouge1_fmeasure"] == 1.0 and s["rouge2_fmeasure"] == 0.0
    assert s["rougeL_fmeasure"] == 1.0 and s["rougeLsum_fmeasure"] == 1.0
    s = one("the", "the the the", rouge_types=["rouge1", "rougeL"])
    assert (s["rouge1_precision"], s["rouge1_recall"], s["rouge1_fmeasure"]) == (1.0, 1 / 3, 0.5)
    assert s["rougeL_recall"] == 1 / 3


def test_kelvin_sign_and_case() -> None:
    s = one("k", "\u212a", rouge_types=ALL)
    assert s["rouge1_fmeasure"] == 1.0 and s["rougeLsum_fmeasure"] == 1.0
    assert one("cafe", "Café", rouge_types=["rouge1"])["rouge1_fmeasure"] == 0.0


def test_rougelsum_splits_on_newline_only() -> None:
    s = one("c d\na b", "a b\nc d", rouge_types=ALL)
    assert s["rouge1_fmeasure"] == 1.0 and s["rouge2_fmeasure"] == 2 / 3
    assert s["rougeL_fmeasure"] == 0.5 and s["rougeLsum_fmeasure"] == 1.0
    # "\r" and U+2028 are not line breaks for rougeLsum: it equals rougeL
    for sep in ("\r", "\u2028", "\r\r"):
        s = one(f"c d{sep}a b", f"a b{sep}c d", rouge_types=["rougeL", "rougeLsum"])
        assert s["rougeLsum_fmeasure"] == s["rougeL_fmeasure"] == 0.5


def test_rougelsum_uses_rouge_scores_exact_backtracking() -> None:
    # With ">=" instead of ">" in the back-tracking this would give 4 hits instead of 3.
    s = one("a a b a\nb c a c", "a b a b b", rouge_types=["rougeLsum"])
    assert (s["rougeLsum_precision"], s["rougeLsum_recall"]) == (3 / 8, 3 / 5)


def test_rougelsum_is_not_symmetric() -> None:
    a = one("c b a\nc d\na a", "c a c", rouge_types=["rougeLsum"])["rougeLsum_fmeasure"]
    b = one("c a c", "c b a\nc d\na a", rouge_types=["rougeLsum"])["rougeLsum_fmeasure"]
    assert (a, b) == (0.4, 0.6)


def test_text_containing_nul_is_tokenized_alone() -> None:
    r = NumpyRouge(rouge_types=ALL).compute(["a\x00b c", "b c"], ["a b c", "a\x00b\x00c"])
    assert r.per_example["rouge1_fmeasure"].tolist() == [1.0, 0.8]
    assert r.per_example["rougeLsum_fmeasure"].tolist() == [1.0, 0.8]


# --- several references --------------------------------------------------------------------------------------


def test_multi_reference_takes_best_f_per_type_like_score_multi() -> None:
    s = one("b d d c d", ["a c d a b", "b a c a"], rouge_types=["rouge1", "rouge2", "rougeL"])
    # rouge1 and rouge2 pick the first reference, rougeL the second
    assert (s["rouge1_precision"], s["rouge1_recall"]) == (3 / 5, 3 / 5)
    assert (s["rouge2_precision"], s["rouge2_recall"]) == (1 / 4, 1 / 4)
    assert (s["rougeL_precision"], s["rougeL_recall"]) == (2 / 5, 2 / 4)


def test_ties_pick_the_first_reference() -> None:
    s = one("a b", ["a c", "b d"], rouge_types=["rouge1", "rougeL"])
    assert s["rouge1_fmeasure"] == 0.5 and s["rougeL_fmeasure"] == 0.5


def test_reference_counts_may_vary() -> None:
    r = NumpyRouge(rouge_types=["rouge1"]).compute(["a b", "c d", "e"], [["a b"], ["x", "c d", "c"], "f"])
    assert r.per_example["rouge1_fmeasure"].tolist() == [1.0, 1.0, 0.0]
    assert "refs:var" in r.signature


def test_against_rouge_score_on_a_small_corpus() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    preds = ["the cats were running home", "Profits rose 3.5% in 2019.\nShares fell.", "", "日本語 text"]
    refs = [["a cat runs home"], ["Profits increased by 3.5 percent.\nThe shares fell sharply.", "profit rose"],
            ["nothing"], ["text 日本語"]]
    types = [*ROUGE_TYPES]
    for stem in (False, True):
        got = NumpyRouge(rouge_types=types, use_stemmer=stem).compute(preds, refs)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=stem)
        for i, (p, rs) in enumerate(zip(preds, refs)):
            want = scorer.score_multi(rs, p)
            for t in types:
                for k, m in enumerate(("precision", "recall", "fmeasure")):
                    assert got.per_example[f"{t}_{m}"][i] == want[t][k], (stem, i, t, m)


@pytest.mark.parametrize("u32_keys", [1 << 32, 0, -1])  # uint32 keys, int64 keys, keys too wide: n-gram sort
def test_rouge2_from_the_join_equals_rouge_score(monkeypatch: pytest.MonkeyPatch, u32_keys: int) -> None:
    """rouge2's overlaps come from the unigram join's groups; whichever key width it picks (or when it hands
    over to the general n-gram sort), the numbers are rouge-score's."""
    from llmtune.metrics import rouge

    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    if u32_keys < 0:
        monkeypatch.setattr(rouge, "_KEY_LIMIT", 0)
    else:
        monkeypatch.setattr(rouge, "_U32_KEYS", u32_keys)
    rng = np.random.default_rng(5)
    words = ["a", "b", "c", "dd", "e"]
    preds = [" ".join(rng.choice(words, int(rng.integers(0, 12)))) for _ in range(60)]
    refs = [[" ".join(rng.choice(words, int(rng.integers(0, 12))))] for _ in range(60)]
    got = NumpyRouge(rouge_types=["rouge2"]).compute(preds, refs).per_example
    scorer = rouge_scorer.RougeScorer(["rouge2"])
    for i, (p, r) in enumerate(zip(preds, refs)):
        want = scorer.score(r[0], p)["rouge2"]
        assert (got["rouge2_precision"][i], got["rouge2_recall"][i], got["rouge2_fmeasure"][i]) == tuple(want), i


# --- options -------------------------------------------------------------------------------------------------


def test_rouge_types_forms() -> None:
    assert NumpyRouge(rouge_types="rougeL").options.rouge_types == ("rougeL",)
    assert NumpyRouge(rouge_types=["rouge1", "rouge1", "rouge9"]).options.rouge_types == ("rouge1", "rouge9")
    r = NumpyRouge(rouge_types=("rouge9",)).compute(["a b c d e f g h i"], ["a b c d e f g h i"])
    assert r.scores == {"rouge9_precision": 1.0, "rouge9_recall": 1.0, "rouge9_fmeasure": 1.0}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rouge_types": ["rouge10"]}, "rouge10"),
        ({"rouge_types": ["rouge0"]}, "rouge0"),
        ({"rouge_types": ["rougel"]}, "Did you mean 'rougeL'"),
        ({"rouge_types": ["rougeLSum"]}, "Did you mean 'rougeLsum'"),
        ({"rouge_types": []}, "empty"),
        ({"rouge_types": 1}, "list of ROUGE types"),
        ({"rouge_types": [None]}, "None"),
        ({"use_stemmer": "yes"}, "use_stemmer"),
        ({"bootstrap": 1}, "bootstrap"),
        ({"bootstrap_samples": 0}, "bootstrap_samples"),
        ({"confidence": 1.5}, "confidence"),
        ({"seed": 1.0}, "seed"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOptionError, match="rouge") as info:
        NumpyRouge(**options)
    assert message in str(info.value)


def test_unknown_option_suggests_the_right_one() -> None:
    with pytest.raises(UnknownOptionError, match="use_stemmer"):
        llmtune.get_metric("rouge", use_stemer=True)


# --- inputs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preds", "refs", "error", "message"),
    [
        (["a", "b"], ["a"], ValueError, "2 predictions but 1 references"),
        (["a", None], ["a", "b"], TypeError, r"predictions\[1\]"),
        (["a", "b"], ["a", 3], TypeError, r"references\[1\]"),
        (["a"], [["a", b"b"]], TypeError, r"references\[0\]\[1\]"),
        (["a"], [[]], ValueError, r"references\[0\] is an empty list"),
        ("a", ["a"], TypeError, "predictions must be an iterable"),
        ([], [], ValueError, "empty"),
    ],
)
def test_bad_inputs_name_the_index(preds: object, refs: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        NumpyRouge().compute(preds, refs)  # type: ignore[arg-type]


# --- signature and bootstrap ---------------------------------------------------------------------------------


def test_signature() -> None:
    r = NumpyRouge(rouge_types=["rouge1", "rougeL"], use_stemmer=True).compute(["a"], ["a"])
    assert r.signature == (
        f"rouge|types:rouge1,rougeL|stem:yes|tok:rouge-score-default|lsum-split:newline|refs:1|multi:best-f"
        f"|agg:mean|impl:llmtune-numpy|version:{llmtune.__version__}"
    )


def test_bootstrap_is_seeded_and_keeps_the_plain_mean() -> None:
    preds = [f"w{i % 7} w{i % 3} common words here" for i in range(40)]
    refs = [f"w{i % 5} common words w{i % 2}" for i in range(40)]
    plain = NumpyRouge(rouge_types=["rouge1"]).compute(preds, refs)
    a = NumpyRouge(rouge_types=["rouge1"], bootstrap=True, seed=3, bootstrap_samples=200).compute(preds, refs)
    b = NumpyRouge(rouge_types=["rouge1"], bootstrap=True, seed=3, bootstrap_samples=200).compute(preds, refs)
    c = NumpyRouge(rouge_types=["rouge1"], bootstrap=True, seed=4, bootstrap_samples=200).compute(preds, refs)
    assert a.scores == b.scores
    assert a.scores != c.scores
    for key, value in plain.scores.items():
        assert a.scores[key] == value
        assert a.scores[f"{key}_low"] <= value <= a.scores[f"{key}_high"]
        assert a.scores[f"{key}_low"] < a.scores[f"{key}_high"]
    assert set(a.per_example) == set(plain.per_example)
    assert "ci:0.95,n:200,seed:3" in a.signature
    assert not any(math.isnan(v) for v in a.scores.values())


def test_signature_is_canonical_whatever_the_type_order() -> None:
    a = NumpyRouge(rouge_types=["rougeLsum", "rouge2", "rouge1"]).compute(["a b"], ["a b"]).signature
    b = NumpyRouge(rouge_types=["rouge1", "rouge2", "rougeLsum"]).compute(["a b"], ["a b"]).signature
    assert a == b and "types:rouge1,rouge2,rougeLsum|" in a


def test_bootstrap_on_one_example_says_it_cannot_give_an_interval() -> None:
    from llmtune.metrics import InputError

    with pytest.raises(InputError, match="cannot give a confidence interval from 1 example"):
        NumpyRouge(rouge_types=["rouge1"], bootstrap=True).compute(["a b"], ["a c"])


def test_n_jobs_gives_exactly_the_serial_result() -> None:
    preds = [f"w{i % 7} w{i % 3} common words here\nline {i % 5} two" for i in range(41)]
    refs = [[f"w{i % 5} common words w{i % 2}", f"line {i % 4} here"] for i in range(41)]
    serial = NumpyRouge(bootstrap=True, bootstrap_samples=50).compute(preds, refs)
    parallel = NumpyRouge(bootstrap=True, bootstrap_samples=50, n_jobs=3).compute(preds, refs)
    assert parallel.scores == serial.scores and parallel.signature == serial.signature
    for key, values in serial.per_example.items():
        assert parallel.per_example[key].tolist() == values.tolist()
    with pytest.raises(InvalidOptionError, match="n_jobs=0"):
        NumpyRouge(n_jobs=0)


# --- inputs people pass ----------------------------------------------------------------------------------------


class _Series:
    """What a pandas Series looks like to us (no pandas dependency): iterable, with ``.values``, and an index
    that iteration must not use."""

    def __init__(self, values: list[object], index: list[int]) -> None:
        self.values = np.array(values, dtype=object)
        self.index = index

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def test_any_iterable_numpy_arrays_and_series_give_the_same_numbers() -> None:
    preds = ["the cat sat", "a dog ran home", "x"]
    refs = ["the cat sat down", "a dog ran", "y"]
    want = NumpyRouge().compute(preds, refs)
    forms = [
        (tuple(preds), tuple(refs)),
        ((p for p in preds), iter(refs)),
        (np.array(preds), np.array(refs)),
        (_Series(preds, [7, 8, 9]), _Series(refs, [1, 2, 3])),
        (np.array(preds), np.array([[r] for r in refs])),  # one reference per row of a 2-D array
    ]
    for p, r in forms:
        got = NumpyRouge().compute(p, r)
        assert got.scores == want.scores and got.signature == want.signature


def test_reference_streams_only_through_the_helper() -> None:
    """Two predictions, two reference streams: as sacrebleu's layout this is two references each (100.0);
    read per prediction it would be something else. We never guess: the helper says which layout it is."""
    from sacrebleu.metrics import BLEU

    from llmtune.metrics import InputError, references_from_streams

    preds = ["the cat sat on the mat", "a dog ran in the park"]
    streams = [["the cat sat on the mat", "a dog ran in the park"], ["a cat sat on a mat", "the dog ran in a park"]]
    want = BLEU().corpus_score(preds, streams).score
    got = llmtune.get_metric("bleu").compute(preds, references_from_streams(streams)).scores["bleu"]
    assert got == want and want == pytest.approx(100.0)
    misread = llmtune.get_metric("bleu").compute(preds, streams).scores["bleu"]  # the per-prediction reading
    assert misread != pytest.approx(100.0)
    assert references_from_streams([["a", "b"], [None, "c"]]) == [["a"], ["b", "c"]]
    with pytest.raises(InputError, match="streams\\[1\\] has 1 references"):
        references_from_streams([["a", "b"], ["c"]])
    with pytest.raises(InputError, match="references_from_streams"):  # 3 predictions, 2 streams of 3: a hint
        NumpyRouge().compute(["a", "b", "c"], [["a", "b", "c"], ["a", "b", "c"]])


def test_a_mapping_is_not_taken_for_a_list() -> None:
    with pytest.raises(TypeError, match="predictions must be an iterable"):
        NumpyRouge().compute({"a": 1}, ["a"])  # type: ignore[arg-type]


def _example_plugin():  # type: ignore[no-untyped-def]
    """This checkout's example plugin, loaded from its file (the installed copy may be another version)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "plugins/example_plugin/llmtune_example_plugin/__init__.py"
    spec = importlib.util.spec_from_file_location("example_plugin_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_example_plugin_follows_the_template_and_never_truncates() -> None:
    plugin = _example_plugin()
    res = plugin.ExactMatch(ignore_case=True).compute(["Kopi O", "teh"], [["kopi o", "black coffee"], "Teh C"])
    assert res.scores["exact_match"] == 0.5 and res.signature.startswith("exact_match|nrefs:var|")
    for cls in (plugin.ExactMatch, plugin.LengthRatio):
        with pytest.raises(ValueError, match="2 predictions but 1 references"):
            cls().compute(["a", "b"], ["a"])
        with pytest.raises(TypeError, match=r"predictions\[1\]"):
            cls().compute(["a", None], ["a", "b"])


# --- the vectorised LCS engine -------------------------------------------------------------------------------


def test_bit_length_and_popcount_on_64_bit_edges() -> None:
    from llmtune.metrics._bitlcs import bit_length, popcount

    values = [1, 2, 3, (1 << 53) - 1, 1 << 53, (1 << 53) + 1, (1 << 62) + 1, (1 << 63) - 1]
    x = np.array(values, dtype=np.uint64)
    assert bit_length(x).tolist() == [v.bit_length() for v in values]
    assert popcount(x).tolist() == [v.bit_count() for v in values]


def test_lcs_batch_replays_rouge_scores_backtracking() -> None:
    """Up to 63-token sequences over 2-11 symbols: same LCS length and the same LCS indices as rouge-score."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    from llmtune.metrics._bitlcs import lcs_batch

    rng = np.random.default_rng(7)
    seqs: list[tuple[int, list[int]]] = []
    flat: list[int] = []
    for _ in range(400):
        length = int(rng.integers(1, 64)) if rng.random() < 0.4 else int(rng.integers(1, 9))
        seq = rng.integers(0, int(rng.choice([2, 3, 11])), size=length).tolist()
        seqs.append((len(flat), seq))
        flat += seq
    pairs = rng.integers(0, len(seqs), size=(800, 2))
    a = [seqs[i] for i in pairs[:, 0]]
    b = [seqs[i] for i in pairs[:, 1]]
    lcs, pair, pos = lcs_batch(
        np.asarray(flat, dtype=np.int64),
        np.array([s for s, _ in a]), np.array([len(q) for _, q in a]),
        np.array([s for s, _ in b]), np.array([len(q) for _, q in b]),
        vocab_size=11, backtrack=True,
    )
    found: dict[int, list[int]] = {}
    for k, p in zip(pair.tolist(), pos.tolist()):
        found.setdefault(k, []).append(p)
    for k, ((_, ref), (_, cand)) in enumerate(zip(a, b)):
        table = rouge_scorer._lcs_table(ref, cand)
        assert lcs[k] == table[-1][-1]
        assert sorted(found.get(k, [])) == rouge_scorer._backtrack_norec(table, ref, cand)
