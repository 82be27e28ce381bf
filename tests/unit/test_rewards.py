"""Reward functions: the built-ins, the weighted combination and its statistics, the registry kind and a plugin."""

from __future__ import annotations

import importlib.metadata
import math

import pytest

import llmtune
from llmtune.core.errors import InvalidOptionError, UnknownBackendError
from llmtune.rewards.combine import combine, reward_statistics


def test_numeric_answer_follows_gsm8k_hash_convention() -> None:
    r = llmtune.get_reward("numeric_answer")
    completions = ["3 + 4 = 7\n#### 7", "#### 1,234", "The answer is 7.", "#### 7.0", "#### $8"]
    refs = ["Natalia sold 3+4 = <<3+4=7>>7 clips.\n#### 7", "1234", 7, "#### 7", "8"]
    # "#### $8" fails, as the harness's strict-match regex ("#### -?[0-9.,]+") does
    assert r(["q"] * 5, completions, answer=refs) == [1.0, 1.0, 0.0, 1.0, 0.0]
    last = llmtune.get_reward("numeric_answer", extract="last")
    assert last(["q"] * 3, ["so 3 + 4 = 7.", "-2 degrees", "no number"], answer=[7, "-2", 1]) == [1.0, 1.0, 0.0]
    assert r(["q"], ["#### 7"], answer=[None]) == [None]  # no reference: does not apply
    with pytest.raises(llmtune.ConfigError, match=r"field 'answer'.*their fields: solution"):
        r(["q"], ["#### 7"], solution=["7"])
    with pytest.raises(InvalidOptionError, match="extract"):
        llmtune.get_reward("numeric_answer", extract="first")


def test_exact_match_format_and_length() -> None:
    em = llmtune.get_reward("exact_match", field="output", ignore_case=True)
    assert em(["q", "q"], [" Kopi O ", "teh"], output=["kopi o", "Teh C"]) == [1.0, 0.0]
    fmt = llmtune.get_reward("format", pattern=r"<answer>.*</answer>")
    assert fmt(["q", "q"], ["x <answer>\n5\n</answer>", "5"]) == [1.0, 0.0]
    full = llmtune.get_reward("format", pattern=r"\d+", mode="fullmatch")
    assert full(["q", "q"], [" 42\n", "42 apples"]) == [1.0, 0.0]
    with pytest.raises(InvalidOptionError, match="not a regular expression"):
        llmtune.get_reward("format", pattern="(")
    with pytest.raises(InvalidOptionError, match="needs option pattern"):
        llmtune.get_reward("format")
    assert llmtune.get_reward("length", unit="words")(["q"], ["a b  c"]) == [3.0]
    assert llmtune.get_reward("length", target=10)(["q", "q"], ["x" * 10, "x" * 15]) == [-0.0, -0.5]


def test_combine_weights_and_statistics() -> None:
    def half(prompts: list[str], completions: list[str], **fields: object) -> list[float | None]:
        return [0.5 if c else None for c in completions]  # a TRL-style function; None: does not apply

    funcs = combine(["numeric_answer", {"name": "format", "pattern": "####", "weight": 0.25}, half,
                     {"name": "format", "pattern": "x", "weight": -1.0}])
    total, parts = funcs(["p"] * 3, ["#### 5", "5 x", ""], {"answer": [5, 5, 5]})
    assert list(parts) == ["numeric_answer", "format", "half", "format_2"]
    assert total == pytest.approx([1.0 + 0.25 + 0.5, 0.0 - 1.0 + 0.5, 0.0])
    stats = reward_statistics(parts)
    assert stats["rewards/numeric_answer/mean"] == pytest.approx(1 / 3)
    assert stats["rewards/numeric_answer/std"] == pytest.approx(math.sqrt(2 / 9))
    assert stats["rewards/half/mean"] == 0.5 and stats["rewards/half/std"] == 0.0  # the None left out
    with pytest.raises(InvalidOptionError, match=r"reward_funcs\[0\].*unknown reward 'numeric'.*numeric_answer"):
        combine(["numeric"])
    with pytest.raises(InvalidOptionError, match=r"reward_funcs\[1\]\.weight"):
        combine(["length", {"name": "length", "weight": "high"}])
    with pytest.raises(InvalidOptionError, match=r"reward_funcs\[0\] needs name"):
        combine([{"weight": 1.0}])
    with pytest.raises(llmtune.LlmtuneError, match="returned 1 values for 2"):
        combine([lambda p, c, **f: [1.0]])(["p", "p"], ["a", "b"], {})


def test_reward_is_a_registry_kind() -> None:
    rows = {(r.name, r.backend): r for r in llmtune.list_backends("reward")}
    assert {("exact_match", "llmtune"), ("numeric_answer", "llmtune"), ("format", "llmtune"),
            ("length", "llmtune")} <= set(rows)
    with pytest.raises(UnknownBackendError, match="Known rewards"):
        llmtune.get_reward("exact")

    @llmtune.register_reward
    class Shouty(llmtune.Reward):
        name = "shouty_test"
        backend = "local"

        def __call__(self, prompts, completions, **fields):  # type: ignore[no-untyped-def]
            return [float(c.isupper()) for c in completions]

    assert llmtune.get_reward("shouty_test")(["p", "p"], ["YES", "no"]) == [1.0, 0.0]


def test_plugin_reward_from_an_entry_point() -> None:
    try:
        importlib.metadata.distribution("llmtune-reward-plugin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("install tests/plugins/reward_plugin (nox -s tests does it)")
    keyword = llmtune.get_reward("keyword", word="kopi")
    assert keyword(["p", "p"], ["Kopi O kosong", "Teh C"]) == [1.0, 0.0]
    row = next(r for r in llmtune.list_backends("reward") if r.name == "keyword")
    assert row.backend == "example" and row.source.startswith("plugin llmtune-reward-plugin")
    total, parts = combine([{"name": "keyword", "word": "teh", "weight": 2.0}])(["p"], ["teh c"], {})
    assert total == [2.0] and parts == {"keyword": [1.0]}
