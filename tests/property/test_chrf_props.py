"""Property tests: our chrF / chrF++ equals sacrebleu's ``CHRF`` bit for bit (corpus score, every sentence score,
signature) on the adversarial corpora of the BLEU property tests, for every option; plus metamorphic checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_bleu_props import corpus

import llmtune

sacrebleu_metrics = pytest.importorskip("sacrebleu.metrics")

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py


@st.composite
def chrf_options(draw: st.DrawFn) -> dict[str, object]:
    char_order = draw(st.integers(0, 7))
    word_order = draw(st.integers(0 if char_order else 1, 3))
    return {"char_order": char_order, "word_order": word_order, "beta": draw(st.integers(0, 4)),
            "lowercase": draw(st.booleans()), "whitespace": draw(st.booleans()),
            "eps_smoothing": draw(st.booleans())}


def sacre(opts: dict[str, object], preds: list[str], refs: list[list[str]]) -> tuple[float, list[float], str]:
    width = max(len(g) for g in refs)
    streams = [[g[k] if k < len(g) else None for g in refs] for k in range(width)]
    metric = sacrebleu_metrics.CHRF(**opts)
    score = metric.corpus_score(preds, streams).score
    signature = str(metric.get_signature())
    sentence = sacrebleu_metrics.CHRF(**opts)
    return score, [sentence.sentence_score(p, g).score for p, g in zip(preds, refs)], signature


@given(corpus(), chrf_options())
def test_numpy_equals_sacrebleu(data: tuple[list[str], list[list[str]]], opts: dict[str, object]) -> None:
    preds, refs = data
    ours = llmtune.get_metric("chrf", **opts).compute(preds, refs)
    want, want_sent, signature = sacre(opts, preds, refs)
    assert ours.scores["chrf"] == want
    assert list(ours.per_example["chrf"]) == want_sent
    assert ours.signature.startswith(signature + "|impl:llmtune-numpy")


@given(corpus(max_segments=3), st.sampled_from([{}, {"word_order": 2}]))
def test_sacrebleu_backend_gives_the_same_result(data: tuple[list[str], list[list[str]]],
                                                 opts: dict[str, object]) -> None:
    preds, refs = data
    ours = llmtune.get_metric("chrf", **opts).compute(preds, refs)
    theirs = llmtune.get_metric("chrf", backend="sacrebleu", **opts).compute(preds, refs)
    assert ours.scores == theirs.scores
    assert list(ours.per_example["chrf"]) == list(theirs.per_example["chrf"])
    assert ours.signature.split("|impl:")[0] == theirs.signature.split("|impl:")[0]


@given(corpus())
def test_bounds_and_identity(data: tuple[list[str], list[list[str]]]) -> None:
    preds, refs = data
    res = llmtune.get_metric("chrf", word_order=2).compute(preds, refs)
    assert 0.0 <= res.scores["chrf"] <= 100.0
    assert all(0.0 <= v <= 100.0 for v in res.per_example["chrf"])
    same = llmtune.get_metric("chrf").compute(preds, [[p] for p in preds])
    for p, v in zip(preds, same.per_example["chrf"]):
        if "".join(p.split()):  # a prediction with characters scores 100 against itself
            assert v == pytest.approx(100.0)
