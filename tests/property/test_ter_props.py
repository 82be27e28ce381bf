"""Property tests: our TER equals sacrebleu's ``TER`` bit for bit (corpus score, every sentence score, signature)
on the adversarial corpora of the BLEU property tests, for every option; long shuffled segments (beam, shift
limits); plus metamorphic checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bleu_props import corpus

import llmtune
from llmtune.core.errors import InvalidOptionError
from llmtune.metrics.ter import ter_edits

sacrebleu_metrics = pytest.importorskip("sacrebleu.metrics")
lib_ter = pytest.importorskip("sacrebleu.metrics.lib_ter")

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py

ter_options = st.fixed_dictionaries({k: st.booleans() for k in ("normalized", "no_punct", "asian_support",
                                                                 "case_sensitive")})


def sacre(opts: dict[str, bool], preds: list[str], refs: list[list[str]]) -> tuple[float, list[float], str]:
    width = max(len(g) for g in refs)
    streams = [[g[k] if k < len(g) else None for g in refs] for k in range(width)]
    metric = sacrebleu_metrics.TER(**opts)
    score = metric.corpus_score(preds, streams).score
    signature = str(metric.get_signature())
    sentence = sacrebleu_metrics.TER(**opts)
    return score, [sentence.sentence_score(p, g).score for p, g in zip(preds, refs)], signature


@given(corpus(), ter_options)
def test_numpy_equals_sacrebleu(data: tuple[list[str], list[list[str]]], opts: dict[str, bool]) -> None:
    preds, refs = data
    ours = llmtune.get_metric("ter", **opts).compute(preds, refs)
    want, want_sent, signature = sacre(opts, preds, refs)
    assert ours.scores["ter"] == want
    assert list(ours.per_example["ter"]) == want_sent
    assert ours.signature.startswith(signature + "|impl:llmtune-numpy")


TERCOM_WORDS = ["it's.", "it's", "Mr.", "420,846", "3.5", "x-y", "9-", "&amp;", "&quot;a", "a.b", "'s", "end.",
                "(see", "why?", "日本語", "ひらがなカタカナ", "。", "，", "the", "The", "cat", "\n-", "a\nb"]


@st.composite
def tercom_corpus(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    """Segments of words the Tercom normalizer rewrites (possessives, numbers, entities, CJK, punctuation),
    references a permuted / edited copy: the normalizer is applied to references twice, as sacrebleu does."""
    preds, refs = [], []
    for _ in range(draw(st.integers(1, 3))):
        words = draw(st.lists(st.sampled_from(TERCOM_WORDS), max_size=14))
        ref = list(draw(st.permutations(words))) + draw(st.lists(st.sampled_from(TERCOM_WORDS), max_size=3))
        preds.append(" ".join(words))
        refs.append([" ".join(ref)])
    return preds, refs


@given(tercom_corpus(), ter_options)
def test_normalizer_inputs_equal_sacrebleu(data: tuple[list[str], list[list[str]]], opts: dict[str, bool]) -> None:
    preds, refs = data
    ours = llmtune.get_metric("ter", **opts).compute(preds, refs)
    want, want_sent, _ = sacre(opts, preds, refs)
    assert ours.scores["ter"] == want
    assert list(ours.per_example["ter"]) == want_sent


@st.composite
def word_pair(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """Long segments over a tiny vocabulary (many shift candidates: the 1,000-candidate limit), references a
    shuffled / edited / truncated copy or unrelated, lengths far apart (the widened beam)."""
    vocab = [str(i) for i in range(draw(st.integers(1, 12)))]
    hyp = draw(st.lists(st.sampled_from(vocab), max_size=90))
    if hyp and draw(st.booleans()):
        ref = list(draw(st.permutations(hyp)))
        ref = ref[:draw(st.integers(0, len(ref)))] + draw(st.lists(st.sampled_from(vocab), max_size=10))
    else:
        ref = draw(st.lists(st.sampled_from(vocab), max_size=140))
    return hyp, ref


@settings(max_examples=60, deadline=None)
@given(word_pair())
def test_edits_equal_sacrebleu_on_long_segments(pair: tuple[list[str], list[str]]) -> None:
    hyp, ref = pair
    assert ter_edits(hyp, ref) == lib_ter.translation_edit_rate(hyp, ref)[0]


@given(corpus(max_segments=3), ter_options)
def test_sacrebleu_backend_gives_the_same_result(data: tuple[list[str], list[list[str]]],
                                                 opts: dict[str, bool]) -> None:
    preds, refs = data
    ours = llmtune.get_metric("ter", **opts).compute(preds, refs)
    theirs = llmtune.get_metric("ter", backend="sacrebleu", **opts).compute(preds, refs)
    assert ours.scores == theirs.scores
    assert list(ours.per_example["ter"]) == list(theirs.per_example["ter"])
    assert ours.signature.split("|impl:")[0] == theirs.signature.split("|impl:")[0]


@given(corpus())
def test_identity_and_bounds(data: tuple[list[str], list[list[str]]]) -> None:
    preds, refs = data
    same = llmtune.get_metric("ter").compute(preds, [[p] for p in preds])
    assert same.scores["ter"] == 0.0
    res = llmtune.get_metric("ter").compute(preds, refs)
    assert res.scores["ter"] >= 0.0
    assert all(v >= 0.0 for v in res.per_example["ter"])


def test_known_values_and_bad_option() -> None:
    res = llmtune.get_metric("ter").compute(["a b c", "x"], [["a c b"], ["x y", "z"]])
    assert res.scores["ter"] == pytest.approx(100 * 2 / 4.5)  # 1 shift + 1 insertion over (3 + 1.5) words
    assert list(res.per_example["ter"]) == pytest.approx([100 / 3, 100 / 1.5])
    with pytest.raises(InvalidOptionError, match="normalized"):
        llmtune.get_metric("ter", normalized="yes")
