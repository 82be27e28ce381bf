"""The torch side of `CausalLMScorer`: batched forwards, a shared-prefix KV cache, greedy generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from llmtune.tasks.scoring import CausalLMScorer, TokenPair


def _device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def continuation_scores(logprobs: torch.Tensor, cont: Sequence[int]) -> tuple[float, bool]:
    """``logprobs``: [len(cont), vocab] log-softmax rows, row j predicting cont[j]."""
    target = torch.tensor(list(cont), dtype=torch.long, device=logprobs.device)
    picked = logprobs.gather(1, target[:, None])[:, 0]
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return float(picked.double().sum()), greedy


def _forward(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a right-padded batch. No attention mask, as in the harness: in a causal model position t never
    sees the padding after it, and without a mask attention takes its fast causal path. No KV cache either."""
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def score_full(scorer: CausalLMScorer, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
    """One right-padded forward over ``(context + continuation)[:-1]`` of every pair (left-truncated)."""
    model = scorer.model
    limit = scorer.max_length
    inputs = [(list(ctx) + list(cont))[-(limit + 1):][:-1] for ctx, cont in pairs]
    width = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), width), _pad_id(scorer.tokenizer), dtype=torch.long)
    for i, x in enumerate(inputs):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    device = _device(model)
    logits = _forward(model, ids.to(device))
    out = []
    for i, ((_, cont), x) in enumerate(zip(pairs, inputs)):
        rows = logits[i, len(x) - len(cont):len(x)].float().log_softmax(dim=-1)
        out.append(continuation_scores(rows, cont))
    return out


@torch.no_grad()
def last_logprobs(scorer: CausalLMScorer, contexts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The log-softmax of the logits after each whole context (right-padded batch)."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), _pad_id(scorer.tokenizer), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, :len(c)] = torch.tensor(list(c), dtype=torch.long)
    device = _device(scorer.model)
    logits = _forward(scorer.model, ids.to(device))
    return [logits[i, len(c) - 1].float().log_softmax(dim=-1) for i, c in enumerate(contexts)]


@torch.no_grad()
def score_shared(scorer: CausalLMScorer, ctx: Sequence[int], conts: Sequence[Sequence[int]]
                 ) -> list[tuple[float, bool]]:
    """Continuations of one context: the context once, its KV cache repeated for the continuations."""
    model = scorer.model
    device = _device(model)
    ctx_ids = torch.tensor([list(ctx)], dtype=torch.long, device=device)
    cache_kw = _cache_keyword(model)
    first = model(input_ids=ctx_ids, use_cache=True)
    cache = getattr(first, "cache", None) or first.past_key_values
    last = first.logits[0, -1].float().log_softmax(dim=-1)
    out: list[tuple[float, bool] | None] = [None] * len(conts)
    longer = [i for i, c in enumerate(conts) if len(c) > 1]
    for i, c in enumerate(conts):
        if len(c) == 1:
            out[i] = continuation_scores(last[None], c)
    for start in range(0, len(longer), scorer.batch_size):
        chunk = longer[start:start + scorer.batch_size]
        past = _repeat_cache(cache, len(chunk))
        width = max(len(conts[i]) - 1 for i in chunk)
        ids = torch.full((len(chunk), width), _pad_id(scorer.tokenizer), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, :len(conts[i]) - 1] = torch.tensor(list(conts[i][:-1]), dtype=torch.long)
        # right padding needs no mask: a causal model's position t never sees positions after t
        mask = torch.ones((len(chunk), len(ctx) + width), dtype=torch.long, device=device)
        logits = model(input_ids=ids.to(device), attention_mask=mask, use_cache=True, **{cache_kw: past}).logits
        for row, i in enumerate(chunk):
            c = conts[i]
            rows = torch.cat([last[None], logits[row, :len(c) - 1].float().log_softmax(dim=-1)])
            out[i] = continuation_scores(rows, c)
    return [r for r in out if r is not None]


def _cache_keyword(model: Any) -> str:
    """``cache`` where the model's forward takes it (transformers >= 5.24 deprecates ``past_key_values``)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _repeat_cache(cache: Any, n: int) -> Any:
    import copy

    repeated = copy.deepcopy(cache)
    if n > 1:
        repeated.batch_repeat_interleave(n)
    return repeated


@torch.no_grad()
def generate_greedy(scorer: CausalLMScorer, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
    """Greedy continuations (left-padded batches), cut at the first stop string; the context is left-truncated."""
    model, tok = scorer.model, scorer.tokenizer
    device = _device(model)
    pad = _pad_id(tok)
    eos = tok.eos_token_id
    answers: list[str] = []
    for start in range(0, len(requests), scorer.batch_size):
        chunk = requests[start:start + scorer.batch_size]
        max_new = max(r[2] for r in chunk)
        prompts = [scorer.encode(ctx)[-(scorer.max_length - max_new):] for ctx, _, _ in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos, use_cache=True)
        for row, (_, until, n_new) in zip(out[:, width:], chunk):
            text = tok.decode(row[:n_new].tolist(), skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            answers.append(text)
        scorer._tick(len(answers), len(requests))
    return answers
