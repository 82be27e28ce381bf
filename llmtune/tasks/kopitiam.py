"""The bundled made-up ``kopitiam-mc`` task: which plain-English description is this kopitiam order?

Items come from the kopitiam lexicon (`llmtune.data.kopitiam`): the gold answer is the order's description,
the three distractors are other drinks' descriptions drawn with a fixed seed. `evaluate_kopitiam` is what the
demo calls before and after fine-tuning.
"""

from __future__ import annotations

import json
import random
from typing import Any

#: How many items the bundled file holds, and the seed that drew them.
N_ITEMS = 48
SEED = 0


def kopitiam_mc_items(n: int = N_ITEMS, seed: int = SEED) -> list[dict[str, Any]]:
    """``n`` items ``{"id", "question", "choices", "label"}`` (how ``bundled/kopitiam_mc.jsonl`` was written)."""
    from llmtune.data.kopitiam import _orders_lexicon

    pairs = _orders_lexicon()
    rnd = random.Random(seed)
    picked = rnd.sample(range(len(pairs)), n)
    items = []
    for k, i in enumerate(picked):
        order, english = pairs[i]
        others = rnd.sample([e for j, (_, e) in enumerate(pairs) if j != i and e != english], 3)
        label = rnd.randrange(4)
        choices = [*others[:label], english, *others[label:]]
        items.append({"id": f"kopitiam-{k}", "question": order, "choices": choices, "label": label})
    return items


def write_bundled(path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for item in kopitiam_mc_items():
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")


def evaluate_kopitiam(model: Any, tokenizer: Any, *, template: str | None = "llama3", batch_size: int = 16,
                      backend: str | None = None) -> dict[str, float]:
    """acc, acc_norm (and their standard errors) of ``model`` on the bundled ``kopitiam-mc`` items.

    ``template="llama3"`` asks each question the way the demo fine-tunes ("What is Kopi O?" as a user turn) and
    scores the choices as the assistant's answer.
    """
    from llmtune.core.registry import get_task

    options: dict[str, Any] = {} if backend == "lm-eval" else {"template": template}
    task = get_task("kopitiam-mc", backend=backend, **options)
    r = task.evaluate(model, tokenizer, batch_size=batch_size)
    return {"acc": r.metrics["acc"], "acc_norm": r.metrics["acc_norm"], "acc_stderr": r.stderr["acc"],
            "acc_norm_stderr": r.stderr["acc_norm"], "n": float(r.n)}


def evaluate_kopitiam_adapter(base_dir: Any, adapter_dir: Any, **kwargs: Any) -> dict[str, float]:
    """`evaluate_kopitiam` of the base model saved in ``base_dir`` with the adapter ``adapter_dir`` on top
    (``{}`` when there is no adapter)."""
    if adapter_dir is None:
        return {}
    from llmtune.tasks.run import load_model

    model, tokenizer = load_model(str(base_dir), adapter=adapter_dir)
    return evaluate_kopitiam(model, tokenizer, **kwargs)
