"""The bundled kopitiam data: a small English corpus and a compositional instruction set of drink orders.

Both live as text files in ``llmtune/data/bundled/`` (``kopitiam_corpus.txt``, ``kopitiam_orders.jsonl``) so that
tests and the demo run offline. The orders are generated from a small lexicon (`generate_orders`), which is how the
bundled JSONL was written and how a test checks that it is still consistent: every order is a composition of a
base drink and optional modifiers, so a tiny model can learn the parts and generalise to held-out combinations.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

#: Where the bundled files live inside the package.
BUNDLED_PACKAGE = "llmtune.data"
CORPUS_FILE = "kopitiam_corpus.txt"
ORDERS_FILE = "kopitiam_orders.jsonl"

# The lexicon: (word in the order, English). Order of words in an order: base, milk, strength, sweetness, ice.
_BASES = (("Kopi", "coffee"), ("Teh", "tea"), ("Yuan Yang", "coffee mixed with tea"))
_MILKS = (("", "with condensed milk"), ("O", "black"), ("C", "with evaporated milk"))
_STRENGTHS = (("", ""), ("Gau", "strong"), ("Po", "weak"))
_SWEETNESS = (("", ""), ("Kosong", "no sugar"), ("Siew Dai", "less sweet"), ("Ga Dai", "extra sweet"))
_ICE = (("", ""), ("Peng", "iced"))

#: Instruction wordings. The "question" form puts the order in the instruction, the others in the input.
_QUESTION = "What is {order}?"
_TRANSLATE = "Translate this kopitiam order into plain English."


def _describe(base: str, milk: str, strength: str, sweetness: str, ice: str) -> str:
    """The English description of one drink, e.g. 'Iced strong black coffee, no sugar.'."""
    words = [w for w in (ice, strength) if w]
    if milk == "black":
        words.append("black")
    words.append(base)
    if milk and milk != "black":
        words.append(milk)
    text = " ".join(words)
    if sweetness:
        text += ", " + sweetness
    return text[0].upper() + text[1:] + "."


def _orders_lexicon() -> list[tuple[str, str]]:
    """Every (order, English description) pair the lexicon composes, in a fixed order."""
    pairs: list[tuple[str, str]] = []
    for base, base_en in _BASES:
        for milk, milk_en in _MILKS:
            for strength, strength_en in _STRENGTHS:
                for sweet, sweet_en in _SWEETNESS:
                    for ice, ice_en in _ICE:
                        order = " ".join(w for w in (base, milk, strength, sweet, ice) if w)
                        pairs.append((order, _describe(base_en, milk_en, strength_en, sweet_en, ice_en)))
    # Milo is always made with milk; only sweetness and ice vary, plus the famous "Dinosaur".
    for sweet, sweet_en in _SWEETNESS:
        for ice, ice_en in _ICE:
            order = " ".join(w for w in ("Milo", sweet, ice) if w)
            words = [w for w in (ice_en, "Milo") if w]
            text = " ".join(words) + (", " + sweet_en if sweet_en else "")
            pairs.append((order, text[0].upper() + text[1:] + "."))
    pairs.append(("Milo Dinosaur", "Iced Milo with a heap of Milo powder on top."))
    return pairs


def generate_orders() -> list[dict[str, str]]:
    """The instruction set as alpaca records: each drink once as a question and once as a translation."""
    records: list[dict[str, str]] = []
    for order, english in _orders_lexicon():
        records.append({"instruction": _QUESTION.format(order=order), "input": "", "output": english})
        records.append({"instruction": _TRANSLATE, "input": order, "output": english})
    return records


def order_of(record: dict[str, Any]) -> str:
    """The kopitiam order a bundled record is about (its input, or the order named in its question)."""
    if record.get("input"):
        return str(record["input"])
    instruction = str(record["instruction"])
    prefix, suffix = _QUESTION.split("{order}")
    if instruction.startswith(prefix) and instruction.endswith(suffix):
        return instruction[len(prefix):len(instruction) - len(suffix)]
    return instruction


def is_heldout(order: str, heldout_fraction: float = 0.2, seed: int = 0) -> bool:
    """Whether `order` belongs to the held-out split: a stable hash, so both wordings of a drink go together."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction!r}")
    digest = hashlib.sha256(f"{seed}:{order}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_instructions(
    records: list[dict[str, Any]] | None = None, *, heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) split of the bundled orders, by drink: held-out drinks are never seen in training."""
    records = bundled_instructions() if records is None else records
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    for record in records:
        (heldout if is_heldout(order_of(record), heldout_fraction, seed) else train).append(record)
    return train, heldout


def _read_text(name: str) -> str:
    """The text of one bundled file."""
    return resources.files(BUNDLED_PACKAGE).joinpath("bundled").joinpath(name).read_text(encoding="utf-8")


def bundled_corpus() -> list[str]:
    """The bundled pretraining corpus: short English paragraphs about kopitiam drinks, food and ordering."""
    paragraphs = [" ".join(block.split()) for block in _read_text(CORPUS_FILE).split("\n\n")]
    return [p for p in paragraphs if p and not p.startswith("#")]


def bundled_instructions() -> list[dict[str, str]]:
    """The bundled instruction set: alpaca records (instruction/input/output) translating kopitiam orders."""
    lines = _read_text(ORDERS_FILE).splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def write_bundled_orders(path: str) -> None:
    """Regenerate the bundled orders JSONL from the lexicon (how ``kopitiam_orders.jsonl`` was written)."""
    with open(path, "w", encoding="utf-8") as fh:
        for record in generate_orders():
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
