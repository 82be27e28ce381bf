"""Held-out evaluation: greedy answers to prompts, scored with `llmtune.metrics` ROUGE and BLEU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmtune.data.templates import any_template_stop_ids as stop_token_ids


@torch.no_grad()
def sampling_options(temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None) -> dict[str, Any]:
    """``generate`` keyword arguments for greedy decoding (``temperature`` 0, the default) or sampling; checked."""
    from llmtune.core.errors import InvalidOptionError

    if not temperature >= 0:
        raise InvalidOptionError(f"temperature={temperature!r} must be >= 0 (0: greedy)", field="temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidOptionError(f"top_p={top_p!r} must be in (0, 1]", field="top_p")
    if top_k is not None and top_k < 0:
        raise InvalidOptionError(f"top_k={top_k!r} must be >= 0 (0: no limit)", field="top_k")
    if temperature == 0:
        if top_p is not None or top_k is not None:
            raise InvalidOptionError("top_p/top_k apply when sampling: set temperature > 0 (0 is greedy)",
                                     field="temperature")
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": 1.0 if top_p is None else float(top_p),
            "top_k": 0 if top_k is None else int(top_k), "seed": seed}


def generate(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             batch_size: int = 8, sampling: dict[str, Any] | None = None) -> list[str]:
    """Continuations of already-tokenized prompts (left-padded batches), decoded without special tokens: greedy, or
    sampled as ``sampling`` (from `sampling_options`) says; a sampling ``seed`` makes the answers repeatable."""
    options = dict(sampling or {"do_sample": False})
    seed = options.pop("seed", None)
    if options.get("do_sample") and seed is not None:
        with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None):
            torch.manual_seed(seed)
            return _generate(model, tokenizer, prompt_ids, max_new_tokens, batch_size, options)
    return _generate(model, tokenizer, prompt_ids, max_new_tokens, batch_size, options)


def _generate(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int,
              options: dict[str, Any]) -> list[str]:
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
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **options,
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
