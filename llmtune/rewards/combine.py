"""Several reward functions (and a reward model's scores) combined with weights, with per-function statistics.

``reward_funcs`` of objectives ``rloo`` / ``grpo`` is a list whose items are

* a registry name: ``"numeric_answer"`` (weight 1, default options);
* a mapping: ``{name: format, weight: 0.5, backend: llmtune, pattern: "####"}`` (the other keys are the
  reward's options);
* (Python) a `llmtune.core.interfaces.Reward` instance or any callable ``f(prompts, completions, **fields)``
  returning one float (or None) per completion, as TRL's ``reward_funcs`` are written.

The total reward of a completion is ``sum(weight_i * r_i)`` over the functions (a ``None`` counts 0, as TRL's
``nansum``), plus ``reward_model_weight`` x the reward model's score when there is one.

    funcs = combine(["numeric_answer", {"name": "format", "pattern": "####", "weight": 0.2}])
    total, parts = funcs(prompts, completions, {"answer": answers})
    reward_statistics(parts)     # {"rewards/numeric_answer/mean": ..., "rewards/numeric_answer/std": ..., ...}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmtune.core.errors import InvalidOptionError, LlmtuneError

RewardCallable = Callable[..., Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward function with its weight and the name its statistics are logged under."""

    name: str
    function: RewardCallable
    weight: float = 1.0


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidOptionError(f"{what} must be a finite number, got {value!r}", field="reward_funcs")
    return float(value)


def reward_spec(item: Any, index: int) -> RewardSpec:
    """The `RewardSpec` of one ``reward_funcs`` item (a name, a mapping, a Reward or a callable)."""
    from llmtune.core.registry import get_reward

    where = f"reward_funcs[{index}]"
    if isinstance(item, str):
        return RewardSpec(item, _get(get_reward, item, None, {}, where))
    if isinstance(item, Mapping):
        body = dict(item)
        name = body.pop("name", None)
        if not isinstance(name, str) or not name:
            raise InvalidOptionError(f"{where} needs name: a reward function's registry name (e.g. numeric_answer), "
                                     f"got {item!r}", field="reward_funcs")
        weight = _number(body.pop("weight", 1.0), f"{where}.weight")
        backend = body.pop("backend", None)
        return RewardSpec(name, _get(get_reward, name, backend, body, where), weight)
    if callable(item):
        name = str(getattr(item, "name", "") or getattr(item, "__name__", "") or f"reward_{index}")
        return RewardSpec(name, item)
    raise InvalidOptionError(f"{where} must be a reward name, a mapping with name/weight/options, or a callable; "
                             f"got {type(item).__name__}", field="reward_funcs")


def _get(get_reward: Callable[..., Any], name: str, backend: str | None, options: dict[str, Any],
         where: str) -> RewardCallable:
    try:
        reward: RewardCallable = get_reward(name, backend, **options)
    except LlmtuneError as exc:
        raise InvalidOptionError(f"{where}: {exc}", field="reward_funcs") from None
    return reward


class RewardFunctions:
    """Weighted reward functions: called on a batch, the total per completion and each function's values."""

    def __init__(self, specs: Sequence[RewardSpec]) -> None:
        names: dict[str, int] = {}
        self.specs: list[RewardSpec] = []
        for spec in specs:  # two functions with one name log as name, name_2
            names[spec.name] = names.get(spec.name, 0) + 1
            label = spec.name if names[spec.name] == 1 else f"{spec.name}_{names[spec.name]}"
            self.specs.append(dataclasses.replace(spec, name=label))

    def __len__(self) -> int:
        return len(self.specs)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], fields: Mapping[str, Sequence[Any]]
                 ) -> tuple[list[float], dict[str, list[float | None]]]:
        totals = [0.0] * len(completions)
        parts: dict[str, list[float | None]] = {}
        for spec in self.specs:
            values = list(spec.function(list(prompts), list(completions), **fields))
            if len(values) != len(completions):
                raise LlmtuneError(f"reward function {spec.name!r} returned {len(values)} values for "
                                   f"{len(completions)} completions (it must return one per completion)")
            clean = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
            parts[spec.name] = clean
            totals = [t + spec.weight * (v or 0.0) for t, v in zip(totals, clean)]
        return totals, parts


def combine(items: Sequence[Any]) -> RewardFunctions:
    """`RewardFunctions` from ``reward_funcs`` items (see the module doc); an empty list gives none."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise InvalidOptionError(f"reward_funcs must be a list of reward functions, got {type(items).__name__}",
                                 field="reward_funcs")
    return RewardFunctions([reward_spec(item, i) for i, item in enumerate(items)])


def reward_statistics(parts: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """``rewards/<name>/mean`` and ``rewards/<name>/std`` (population std) of each function, over the completions it
    applied to (None left out; a function that applied to none logs NaN)."""
    out: dict[str, float] = {}
    for name, values in parts.items():
        xs = [v for v in values if v is not None]
        mean = sum(xs) / len(xs) if xs else float("nan")
        out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) if xs else float("nan")
    return out


__all__ = ["RewardFunctions", "RewardSpec", "combine", "reward_spec", "reward_statistics"]
