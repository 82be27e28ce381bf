"""Paired significance tests and bootstrap intervals equal sacrebleu's (PairedTest, corpus_score(n_bootstrap))
with the same seed, bit for bit; ROUGE through the same procedure."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llmtune.core.errors import InvalidOptionError
from llmtune.metrics.significance import bootstrap_ci, compare

sacrebleu_metrics = pytest.importorskip("sacrebleu.metrics")
significance = pytest.importorskip("sacrebleu.significance")

WORDS = "the a cat dog sat ran on in mat park home quickly slowly big small red blue it was is".split()


def _corpus(n: int = 120, seed: int = 0) -> tuple[list[str], list[str], list[str], list[str]]:
    """References, a baseline, a slightly different system (p-value well inside (0, 1)) and a better one."""
    rng = random.Random(seed)
    refs = [" ".join(rng.choices(WORDS, k=rng.randint(4, 16))) for _ in range(n)]

    def edit(text: str, rate: float) -> str:
        return " ".join(w if rng.random() > rate else rng.choice(WORDS) for w in text.split())

    base = [edit(r, 0.35) for r in refs]
    close = [edit(r, 0.35) if i % 12 == 0 else b for i, (r, b) in enumerate(zip(refs, base))]
    better = [edit(r, 0.2) for r in refs]
    return refs, base, close, better


def _theirs(metric: object, name: str, refs: list[str], systems: list[list[str]], test: str, n: int,
            n_conf: int) -> list[tuple[float, float | None, float | None, float | None]]:
    named = [(f"s{i}", s) for i, s in enumerate(systems)]
    _, scores = significance.PairedTest(named, {name: metric}, [refs], test_type=test, n_samples=n,
                                        n_ar_confidence=n_conf)()
    key = next(k for k in scores if k != "System")
    return [(r.score, r.p_value, None if r.mean is None else float(r.mean), None if r.ci is None else float(r.ci))
            for r in scores[key]]


@pytest.mark.parametrize("test,n,n_conf", [("bs", 0, -1), ("ar", 300, 100), ("ar", 200, -1)])
@pytest.mark.parametrize("metric", ["bleu", "chrf", "ter"])
def test_equal_to_sacrebleu_paired_tests(metric: str, test: str, n: int, n_conf: int) -> None:
    refs, base, close, better = _corpus()
    official = {"bleu": sacrebleu_metrics.BLEU, "chrf": sacrebleu_metrics.CHRF, "ter": sacrebleu_metrics.TER}[metric]()
    want = _theirs(official, metric, refs, [base, close, better], test, n, n_conf)
    res = compare(base, close, better, references=refs, metric=metric, test=test, n_samples=n, n_ar_confidence=n_conf)
    got = [(r.score, r.p_value, r.mean, r.ci) for r in [res.baseline, *res.systems]]
    assert got == want
    assert 0.01 < res.systems[0].p_value < 0.99  # the close system: a real p-value, not the floor
    assert f"test:{test}" in res.signature and "seed:12345" in res.signature


def test_bleu_options_and_multiple_references() -> None:
    refs, base, close, _ = _corpus(80, seed=3)
    refs2 = [" ".join(reversed(r.split())) for r in refs]
    official = sacrebleu_metrics.BLEU(tokenize="intl", lowercase=True)
    named = [("b", base), ("c", close)]
    _, scores = significance.PairedTest(named, {"bleu": official}, [refs, refs2], test_type="bs")()
    res = compare(base, close, references=[[a, b] for a, b in zip(refs, refs2)], tokenize="intl", lowercase=True)
    assert res.systems[0].p_value == scores[next(k for k in scores if k != "System")][1].p_value


def test_bootstrap_ci_equals_corpus_score_n_bootstrap() -> None:
    refs, base, _, _ = _corpus()
    for metric, official in (("bleu", sacrebleu_metrics.BLEU()), ("chrf", sacrebleu_metrics.CHRF(word_order=2))):
        score = official.corpus_score(base, [refs], n_bootstrap=500)
        opts = {"word_order": 2} if metric == "chrf" else {}
        got = bootstrap_ci(base, refs, metric, n_samples=500, **opts)
        assert (got.score, got.mean, got.ci) == (score.score, float(score._mean), float(score._ci))


def test_rouge_goes_through_the_same_procedure() -> None:
    import llmtune

    refs, base, close, _ = _corpus()
    res = compare(base, close, references=refs, metric="rouge", test="ar", n_samples=500, key="rouge1_fmeasure")
    plain = [llmtune.get_metric("rouge").compute(s, refs).scores["rouge1_fmeasure"] for s in (base, close)]
    assert res.baseline.score == pytest.approx(plain[0], rel=1e-12)
    assert res.systems[0].score == pytest.approx(plain[1], rel=1e-12)
    assert 0.0 < res.systems[0].p_value <= 1.0
    again = compare(base, close, references=refs, metric="rouge", test="ar", n_samples=500, key="rouge1_fmeasure")
    assert again == res  # seeded
    with pytest.raises(InvalidOptionError, match="not a ROUGE result key"):
        compare(base, close, references=refs, metric="rouge", key="rouge9_f")


def test_bad_arguments_are_named() -> None:
    refs, base, close, _ = _corpus(10)
    with pytest.raises(InvalidOptionError, match="test='t'"):
        compare(base, close, references=refs, test="t")
    with pytest.raises(InvalidOptionError, match="at least one system"):
        compare(base, references=refs)
    with pytest.raises(ValueError, match="9 predictions but 10 references"):
        compare(base, close[:9], references=refs)
    assert np.isfinite(compare(base, close, references=refs).systems[0].p_value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seed": -1}, r"seed=-1 must be None or an integer >= 0"),
    ({"seed": 1.5}, r"seed=1\.5 must be None or an integer >= 0"),
    ({"n_samples": -5}, r"n_samples=-5 must be an integer >= 0 \(0 = the default\)"),
    ({"n_samples": 2.0}, r"n_samples=2\.0 must be an integer"),
    ({"test": "ar", "n_ar_confidence": -2}, r"n_ar_confidence=-2 must be an integer >= -1"),
])
def test_seeds_and_sample_counts_are_checked(kwargs: dict, message: str) -> None:
    """A negative count used to mean the default (1000 resamples) and a negative seed was NumPy's ValueError."""
    refs, base, close, _ = _corpus(10)
    with pytest.raises(InvalidOptionError, match=message) as err:
        compare(base, close, references=refs, **kwargs)
    assert err.value.field == next(k for k in kwargs if k != "test")
    with pytest.raises(InvalidOptionError, match="n_samples=0 must be an integer >= 1"):
        bootstrap_ci(base, refs, n_samples=0)
    with pytest.raises(InvalidOptionError, match="seed=-3"):
        bootstrap_ci(base, refs, seed=-3)
