"""A deterministic, realistic-looking English summary corpus for the metric benchmarks.

Sentences are drawn from a Zipf-weighted vocabulary of common English words (with inflected forms, so
the Porter stemmer has work to do), capitalised, with commas, numbers such as ``3.5`` or ``1,000``,
hyphenated words, apostrophes and quotes; each example is 1-3 sentences joined by newlines (rougeLsum).
Predictions are the reference with realistic edits (dropped, substituted, swapped and inserted words).
"""

from __future__ import annotations

import random

_WORDS = """
the of and to a in is that for it as was with be by on not he this are or his from at which but have an they
you were her she there been one all we their has would when if so no will more can out up said about other
into than its time only could new them man some these then two first may any like now my such make over our
even most me state after also made many did must before back see through way where get much go well your know
should down work year because come people just say each those take day good how long little use government
own men being very same great old life might under while last world never here off state thing between both
life country public think again school found part thought city small night without war house asked however
system water every high hand another place under group market people report reports reported reporting company
companies announced announcing announcement officials official said says saying increase increased increasing
decline declined declining growth growing grows economy economic prices price rising rose fell falling police
arrested arresting investigation investigators court ruled ruling judge judges election elections voters voted
voting minister ministers president presidential leaders leader talks agreement agreements signed signing
students teachers teaching taught schools university universities research researchers study studies studied
patients hospital hospitals doctors treatment treatments health healthy disease diseases virus vaccines cases
weather storm storms flooding floods rain heavy winds temperatures cold colder warm warmer outside inside
tea coffee cup cups drink drinking drank hot sweet milk sugar morning evening afternoon today yesterday tomorrow
running runs ran runner walked walking walks dogs dog cats cat children child family families home homes
build building buildings built construction project projects plan plans planned planning million billion
percent quarter quarterly profits profit revenue revenues sales shares investors investment bank banks rates
technology software computer computers internet online users data network networks security attack attacks
team teams game games season players player coach won winning win lost losing match matches final finals
film films music album songs song artist artists show shows television series audience festival museum
"""
_VOCAB = list(dict.fromkeys(_WORDS.split()))
_EXTRAS = ["don't", "it's", "can't", "well-known", "long-term", "e-mail", "U.S.", "U.K.", "Mr.", "Dr.",
           '"quoted"', "(briefly)", "co-operate", "state-of-the-art", "&", "%", "#1", "$5"]


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        return str(rng.randint(2, 99))
    if kind < 0.55:
        return f"{rng.randint(1, 99)}.{rng.randint(0, 9)}"
    if kind < 0.8:
        return f"{rng.randint(1, 999)},{rng.randint(0, 999):03d}"
    return str(rng.randint(1990, 2030))


def _sentence(rng: random.Random, weights: list[float]) -> list[str]:
    n = rng.randint(8, 22)
    words = rng.choices(_VOCAB, weights=weights, k=n)
    for i in range(n):
        r = rng.random()
        if r < 0.05:
            words[i] = _number(rng)
        elif r < 0.08:
            words[i] = rng.choice(_EXTRAS)
        elif r < 0.14 and i < n - 1:
            words[i] += ","
    words[0] = words[0].capitalize()
    words[-1] += rng.choice([".", ".", ".", "!", "?"])
    return words


def _edit(rng: random.Random, words: list[str], weights: list[float]) -> list[str]:
    out: list[str] = []
    for w in words:
        r = rng.random()
        if r < 0.10:
            continue  # dropped
        if r < 0.22:
            out.append(rng.choices(_VOCAB, weights=weights, k=1)[0])  # substituted
        elif r < 0.27:
            out.extend([w, rng.choices(_VOCAB, weights=weights, k=1)[0]])  # inserted after
        else:
            out.append(w)
    for _ in range(max(1, len(out) // 10)):
        if len(out) > 2:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]  # swapped neighbours
    return out or words[:1]


def make_corpus(n: int = 2000, seed: int = 1234, n_refs: int = 1) -> tuple[list[str], list[list[str]]]:
    """``n`` predictions and, per prediction, ``n_refs`` references; same output for the same arguments."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(_VOCAB))]  # Zipf
    preds: list[str] = []
    refs: list[list[str]] = []
    for _ in range(n):
        k = rng.choice([1, 2, 2, 3])
        sents = [_sentence(rng, weights) for _ in range(k)]
        refs.append(["\n".join(" ".join(s) for s in sents)])
        for _ in range(n_refs - 1):
            refs[-1].append("\n".join(" ".join(_edit(rng, s, weights)) for s in sents))
        preds.append("\n".join(" ".join(_edit(rng, s, weights)) for s in sents))
    return preds, refs
