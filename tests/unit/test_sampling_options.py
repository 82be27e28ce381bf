"""`generate`'s decoding options: greedy by default, sampling only with a temperature, bad values named."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from llmtune.core.errors import InvalidOptionError
from llmtune.trainers._evaluate import sampling_options


def test_greedy_by_default_and_sampling_with_a_temperature() -> None:
    assert sampling_options() == {"do_sample": False}
    assert sampling_options(0.7, 0.9, 40, 3) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                                                 "seed": 3}
    assert sampling_options(1.0) == {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None}


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"), ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
    ({"temperature": 1.0, "top_k": -1}, "top_k"), ({"top_p": 0.9}, "temperature"), ({"top_k": 5}, "temperature"),
])
def test_bad_values_are_named(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidOptionError, match=field):
        sampling_options(**kwargs)
