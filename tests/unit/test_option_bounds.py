"""Options get bounds: a non-finite or absurd value is a typed one-line error, before any work starts."""

from __future__ import annotations

import math

import pytest

import llmtune
from llmtune.core.errors import ConfigError, InvalidOptionError, LlmtuneError


@pytest.mark.parametrize("params", [math.inf, -math.inf, math.nan, 1e16, 0, -1.0, True])
def test_from_params_refuses_non_finite_and_absurd_sizes(params) -> None:
    from llmtune.memory import ModelSpec

    with pytest.raises(ConfigError, match="num_params must be a positive finite number"):
        ModelSpec.from_params(params)


def test_from_params_still_takes_real_sizes() -> None:
    from llmtune.memory import ModelSpec

    spec = ModelSpec.from_params(7e9)
    assert spec.approximate and 6e9 < spec.num_params < 8e9


@pytest.mark.parametrize(("params", "bits"), [(math.nan, 4), (math.inf, 4), (7e9, math.nan), (7e9, math.inf),
                                              (7e9, 0), (7e9, 65)])
def test_rule_of_thumb_refuses_nan_and_inf(params, bits) -> None:
    from llmtune.memory.estimate import rule_of_thumb_serving_gb

    with pytest.raises(InvalidOptionError):
        rule_of_thumb_serving_gb(params, bits)


def test_rule_of_thumb_value() -> None:
    from llmtune.memory.estimate import rule_of_thumb_serving_gb

    assert rule_of_thumb_serving_gb(7e9, 4) == pytest.approx(7e9 * 4 / 8 * 1.2 / 1e9)


@pytest.mark.parametrize("order", [0, 101, 10**8])
def test_bleu_max_ngram_order_is_bounded(order) -> None:
    with pytest.raises(InvalidOptionError, match="max_ngram_order"):
        llmtune.get_metric("bleu", max_ngram_order=order)
    assert llmtune.get_metric("bleu", max_ngram_order=100).compute(["a b"], ["a b"]).scores


def test_bleu_nltk_weights_are_bounded() -> None:
    with pytest.raises(InvalidOptionError, match="at most 100"):
        llmtune.get_metric("bleu", definition="nltk", weights=[1 / 101] * 101)


@pytest.mark.parametrize("lr", [math.nan, math.inf, -math.inf, 0.0, -1e-4])
def test_trainer_lr_must_be_finite_and_positive(lr) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    with pytest.raises(InvalidOptionError, match=r"option lr=.* must be a finite number > 0"):
        llmtune.get_trainer("lora", lr=lr)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_yaml_lr_nan_and_inf_fail_when_the_config_is_read(tmp_path, text) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from llmtune.trainers._config import load_config

    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(f"model: m\ndata: d.jsonl\ntrainer:\n  lr: {text}\n")
    with pytest.raises(LlmtuneError, match="lr"):
        load_config(config)


@pytest.mark.parametrize(("weights", "message"), [((-0.5, 1.5), r"weights\[0\]=-0\.5 must be a finite number >= 0"),
                                                  ((0.5, -1e-9), r"weights\[1\]=-1e-09 must be a finite number >= 0")])
def test_bleu_nltk_weights_are_not_negative(weights, message) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        llmtune.get_metric("bleu", definition="nltk", weights=weights)
    assert llmtune.get_metric("bleu", definition="nltk", weights=(0.5, 0.5, 0, 0)).compute(["a b"], ["a b"]).scores


@pytest.mark.parametrize(("text", "message"), [
    ("seed: 100000000000000000000", "option seed=100000000000000000000 must be at most 4294967295"),
    ("num_threads: 100000", "option num_threads=100000 must be at most 1024"),
])
def test_seed_and_num_threads_are_bounded_when_the_config_is_read(tmp_path, text, message) -> None:
    """``--check`` said "ok" to both; the run then failed in NumPy's seeding or crashed creating threads."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from llmtune.trainers._config import load_config

    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(f"model: m\ndata: d.jsonl\ntrainer:\n  {text}\n")
    with pytest.raises(LlmtuneError, match=rf"c\.yaml:4: .*{message}"):
        load_config(config)
