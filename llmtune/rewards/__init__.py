"""Reward functions for online RL (``rloo`` / ``grpo``): the fifth registry kind, ``reward``.

A reward function takes the prompts, the sampled completions and the training record's other fields and returns
one float per completion (`llmtune.core.interfaces.Reward`, called as TRL's ``GRPOTrainer`` calls its reward
functions). This package only *declares* the built-ins (no torch); third-party packages add theirs through the
entry-point group ``llmtune.rewards`` (name ``"<name>.<backend>"``).

    import llmtune
    r = llmtune.get_reward("numeric_answer")                      # GSM8K's "#### 42" against the record's answer
    r(["2+3?"], ["5 apples.\\n#### 5"], answer=["#### 5"])          # [1.0]
    combined = combine([{"name": "numeric_answer", "weight": 1.0}, {"name": "format", "pattern": "####"}])

| name | reward |
|---|---|
| ``exact_match`` | 1.0 when the completion (stripped) equals the record's ``field`` (default ``answer``), else 0.0 |
| ``numeric_answer`` | 1.0 when the completion's final answer (``#### number``; ``extract="last"``: the last number) equals the record's number |
| ``format`` | 1.0 when the regex ``pattern`` is found (``mode="fullmatch"``: matches the whole completion) |
| ``length`` | the length in ``unit`` (``chars`` / ``words``); with ``target``: ``-abs(length - target) / target`` |
"""

from __future__ import annotations

from llmtune.core.registry import declare
from llmtune.rewards.combine import RewardFunctions, RewardSpec, combine

#: name -> class in `llmtune.rewards.builtin` (backend "llmtune")
_BUILTINS = {"exact_match": "ExactMatch", "numeric_answer": "NumericAnswer", "format": "FormatMatch",
             "length": "Length"}

for _name, _cls in _BUILTINS.items():
    declare("reward", _name, "llmtune", f"llmtune.rewards.builtin:{_cls}", default=True)

__all__ = ["RewardFunctions", "RewardSpec", "combine"]
