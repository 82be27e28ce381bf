"""``ranking_loss: listwise`` on the trainer recipe: objectives ``reward`` and ``dpo`` (tiny Llama)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_RANKED = [{"prompt": "What is Kopi O?", "responses": ["Black coffee.", "Tea.", "Coffee with milk."],
            "ranking": [0, 2, 1]},
           {"prompt": "What is Teh C?", "responses": ["Tea with evaporated milk.", "Coffee.", "Milo."],
            "ranking": [0, 1, 2]}] * 2
_PAIRS = [{"prompt": "What is Kopi O?", "chosen": "Black coffee.", "rejected": "Tea."},
          {"prompt": "What is Teh C?", "chosen": "Tea with evaporated milk.", "rejected": "Coffee."}] * 2


def _tiny(tok: Any, seed: int = 0) -> Any:
    from llmtune.models.tiny import build_tiny_model

    return build_tiny_model(tok, seed=seed)


def test_dpo_listwise_step0_is_the_uniform_plackett_luce_loss(tok: Any, tmp_path: Path) -> None:
    """Policy == reference at step 0: every implicit reward is 0, so a K = 3 ranking costs (ln 3 + ln 2) / 2 per stage."""
    import llmtune

    opts = {"method": "lora", "rank": 4, "alpha": 8, "max_steps": 3, "batch_size": 2, "lr": 1e-2, "warmup": 0,
            "progress": False, "beta": 0.1}
    result = llmtune.get_trainer("dpo", ranking_loss="listwise", **opts).train(
        _tiny(tok), _RANKED, tokenizer=tok, output_dir=tmp_path / "run")
    assert result.history[0]["loss"] == pytest.approx((math.log(3) + math.log(2)) / 2, abs=1e-6)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.parametrize("name", ["dpo", "reward"])
def test_listwise_on_pairs_trains_exactly_as_pairwise(tok: Any, tmp_path: Path, name: str) -> None:
    """K = 2 everywhere: the listwise run is the pairwise run, step for step."""
    import llmtune
    from llmtune.trainers.rlhf.reward import reward_model_from_causal_lm

    opts: dict[str, Any] = {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "warmup": 0, "progress": False}
    if name == "dpo":
        opts.update(method="lora", rank=4, alpha=8)
    losses = {}
    for ranking_loss in ("pairwise", "listwise"):
        model = _tiny(tok) if name == "dpo" else reward_model_from_causal_lm(_tiny(tok), tok)
        result = llmtune.get_trainer(name, ranking_loss=ranking_loss, **opts).train(
            model, _PAIRS, tokenizer=tok, output_dir=tmp_path / ranking_loss)
        losses[ranking_loss] = [row["loss"] for row in result.history if "loss" in row]
    assert losses["listwise"] == pytest.approx(losses["pairwise"], rel=1e-5)


def test_reward_listwise_trains_on_rankings_and_rejects_what_does_not_combine(tok: Any, tmp_path: Path) -> None:
    import llmtune
    from llmtune.core.errors import InvalidOptionError
    from llmtune.trainers.rlhf.reward import reward_model_from_causal_lm

    trainer = llmtune.get_trainer("reward", ranking_loss="listwise", max_steps=4, batch_size=2, lr=1e-3, warmup=0,
                                  progress=False)
    result = trainer.train(reward_model_from_causal_lm(_tiny(tok), tok), _RANKED, tokenizer=tok,
                           output_dir=tmp_path / "run")
    assert result.history[-1]["loss"] < result.history[0]["loss"] and "accuracy" in result.history[-1]
    with pytest.raises(InvalidOptionError, match="margin"):
        llmtune.get_trainer("reward", ranking_loss="listwise", use_margin=True)
    with pytest.raises(InvalidOptionError, match="loss_type 'ipo'"):
        llmtune.get_trainer("dpo", ranking_loss="listwise", loss_type="ipo")
    with pytest.raises(InvalidOptionError, match="pairwise, listwise"):
        llmtune.get_trainer("dpo", ranking_loss="plackett-luce")
