"""Tasks: benchmark evaluation (local data + a scoring rule), by llmtune or by lm-evaluation-harness.

This package only *declares* the built-in tasks (no torch): each name has the backend ``llmtune`` (default;
`llmtune.tasks.builtin`) and, where the harness has the same task, ``lm-eval`` (`llmtune.tasks.harness`).

    import llmtune
    hs = llmtune.get_task("hellaswag", data="hellaswag_val.jsonl", limit=100)
    result = hs.evaluate(model, tokenizer, batch_size=16)    # TaskResult: metrics, stderr, per_item
    llmtune.evaluate(model, tasks=["hellaswag", "arc_easy"], tokenizer=tokenizer, backend="lm-eval")
"""

from __future__ import annotations

from typing import Any

from llmtune.core.registry import declare

#: name -> class name in builtin (backend "llmtune") and in harness (backend "lm-eval"; None: llmtune only).
_TASKS: dict[str, tuple[str, str | None]] = {
    "mmlu": ("MMLUTask", "MMLUHarness"),
    "hellaswag": ("HellaSwagTask", "HellaSwagHarness"),
    "arc_easy": ("ArcEasyTask", "ArcEasyHarness"),
    "arc_challenge": ("ArcChallengeTask", "ArcChallengeHarness"),
    "boolq": ("BoolQTask", "BoolQHarness"),
    "truthfulqa_mc1": ("TruthfulQAMC1Task", "TruthfulQAMC1Harness"),
    "kopitiam-mc": ("KopitiamMCTask", "KopitiamMCHarness"),
    "multiple-choice": ("GenericMCTask", "GenericMCHarness"),
    "gsm8k": ("Gsm8kTask", "Gsm8kHarness"),
    "squad": ("SquadTask", "SquadHarness"),
    "perplexity": ("PerplexityTask", None),
    "generation": ("GenerationTask", None),
}

for _name, (_ours, _theirs) in _TASKS.items():
    declare("task", _name, "llmtune", f"llmtune.tasks.builtin:{_ours}", requires=("torch", "transformers"),
            extra="peft", default=True)
    if _theirs is not None:
        declare("task", _name, "lm-eval", f"llmtune.tasks.harness:{_theirs}", requires=("lm_eval",),
                extra="lm-eval")


def evaluate(model: Any, tasks: Any, **kwargs: Any) -> Any:
    """`llmtune.tasks.run.evaluate` (imports torch on call)."""
    from llmtune.tasks.run import evaluate as _evaluate

    return _evaluate(model, tasks, **kwargs)


__all__ = ["evaluate"]
