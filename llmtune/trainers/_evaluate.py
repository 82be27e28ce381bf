"""Held-out evaluation: greedy answers to prompts, scored with `llmtune.metrics` ROUGE and BLEU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmtune.data.templates import any_template_stop_ids as stop_token_ids


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             batch_size: int = 8) -> list[str]:
    """Greedy continuations of already-tokenized prompts (left-padded batches), decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    answers: list[str] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = [list(p) for p in prompt_ids[start:start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, use_cache=True,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops or None)
            for row in out[:, width:]:
                tokens = row.tolist()
                for j, t in enumerate(tokens):
                    if t in stops:
                        tokens = tokens[:j]
                        break
                answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/ROUGE-L F-measure (0-1) and corpus BLEU (sacrebleu definition, 0-100) from `llmtune.metrics`."""
    from llmtune.core.registry import get_metric

    rouge = get_metric("rouge", rouge_types=("rouge1", "rougeL")).compute(predictions, references)
    bleu = get_metric("bleu").compute(predictions, references)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(predictions), 1)
    return {
        "rouge1": float(rouge.scores["rouge1_fmeasure"]),
        "rougeL": float(rouge.scores["rougeL_fmeasure"]),
        "bleu": float(bleu.scores["bleu"]),
        "exact_match": float(exact),
        "n": float(len(predictions)),
    }
