"""The small interface through which tasks use a model, and its implementation for causal LMs.

A task never touches the model directly: it asks a `Scorer` for

* ``loglikelihood([(context, continuation), ...]) -> [(logprob, is_greedy), ...]``,
* ``loglikelihood_rolling([text, ...]) -> [(logprob, n_tokens), ...]`` (the whole text, in windows),
* ``generate_until([(context, until, max_new_tokens), ...]) -> [text, ...]`` (greedy).

`CausalLMScorer` implements it for a transformers causal LM (plain, PEFT-wrapped or quantized) the way
lm-evaluation-harness's ``HFLM`` tokenizes: trailing spaces of the context move to the continuation, the
continuation's tokens are those of ``encode(context + continuation)`` after ``len(encode(context))``, and an
empty context is replaced by the prefix token (BOS, else EOS). Requests that share a context are scored with
one forward of the context when ``shared_prefix`` is on: single-token continuations (MMLU's letters, BoolQ's
yes/no) all read the context's last row of logits, contexts batched together; longer continuations of a long
context reuse its KV cache, repeated for each continuation; the rest go in right-padded full forwards.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from llmtune.core.errors import InvalidOptionError


@runtime_checkable
class Scorer(Protocol):
    """What a task needs from a model."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]: ...

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]: ...

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]: ...


TokenPair = tuple[tuple[int, ...], tuple[int, ...]]
#: A context's KV cache is computed once and repeated for its continuations when that saves at least this many
#: token positions ((choices - 1) x context length); below it, padded full forwards are faster.
SHARED_MIN_TOKENS = 128


class CausalLMScorer:
    """`Scorer` over a transformers causal LM and its tokenizer (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None,
                 add_bos_token: bool | None = None, shared_prefix: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidOptionError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or _model_max_length(model, tokenizer)
        self.add_bos_token = add_bos_token
        # prompt tuning / prefix tuning prepend virtual tokens: a cached prefix would not include them
        self.shared_prefix = shared_prefix and not getattr(getattr(model, "active_peft_config", None),
                                                           "is_prompt_learning", False)
        self.progress = progress

    # -- tokenization (HFLM's) ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        flag = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self._bos_text and text.startswith(self._bos_text):
            flag = False  # HFLM: a text that already starts with BOS (a chat template) gets no second one
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        return list(self.tokenizer.encode(text, **kwargs))

    @property
    def _bos_text(self) -> str:
        return str(self.tokenizer.decode(self.prefix_token_id)) if self.tokenizer.bos_token_id is not None else ""

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return tuple(cont[:1]), tuple(cont[1:])
            return (self.prefix_token_id,), tuple(cont)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return tuple(ctx), tuple(whole[len(ctx):])

    # -- the interface --------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        pairs: list[TokenPair] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            tokens = self.encode(text, add_special_tokens=False)
            for pair in rolling_windows(tokens, self.prefix_token_id, self.max_length):
                pairs.append(pair)
                owners.append(i)
        scores = self.score_tokens(pairs)
        out = [(0.0, 0) for _ in texts]
        for owner, pair, (ll, _) in zip(owners, pairs, scores):
            out[owner] = (out[owner][0] + ll, out[owner][1] + len(pair[1]))
        return out

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        from llmtune.tasks._torch import generate_greedy

        with _eval_mode(self.model):
            return generate_greedy(self, requests)

    # -- batched scoring ------------------------------------------------------------------------------------
    def score_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, whether it is the greedy one) for each token pair."""
        with _eval_mode(self.model):
            return self._score_tokens(pairs)

    def _score_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        from llmtune.tasks import _torch

        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise InvalidOptionError(f"request {i}: the continuation has no tokens")
            groups[ctx].append(i)
        one_token: list[list[int]] = []  # groups scored from one row of logits: their context's last position
        cached: list[list[int]] = []     # groups whose context is long enough to pay for a repeated KV cache
        singles: list[int] = []
        for ctx, idx in groups.items():
            fits = all(len(ctx) + len(pairs[i][1]) <= self.max_length + 1 for i in idx)
            if self.shared_prefix and fits and ctx and all(len(pairs[i][1]) == 1 for i in idx):
                one_token.append(idx)
            elif self.shared_prefix and fits and len(idx) > 1 and (len(idx) - 1) * len(ctx) >= SHARED_MIN_TOKENS:
                cached.append(idx)
            else:
                singles.extend(idx)
        done = 0
        for start in range(0, len(one_token), self.batch_size):
            group_chunk = one_token[start:start + self.batch_size]
            rows = _torch.last_logprobs(self, [pairs[g[0]][0] for g in group_chunk])
            for g, row in zip(group_chunk, rows):
                for i in g:
                    results[i] = _torch.continuation_scores(row[None], pairs[i][1])
                done += len(g)
            self._tick(done, len(pairs))
        for g in cached:
            for i, r in zip(g, _torch.score_shared(self, pairs[g[0]][0], [pairs[i][1] for i in g])):
                results[i] = r
            done += len(g)
            self._tick(done, len(pairs))
        singles.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))  # similar lengths batch together
        for start in range(0, len(singles), self.batch_size):
            chunk = singles[start:start + self.batch_size]
            for i, r in zip(chunk, _torch.score_full(self, [pairs[i] for i in chunk])):
                results[i] = r
            done += len(chunk)
            self._tick(done, len(pairs))
        return [r for r in results if r is not None]

    def _tick(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Score in eval mode (no dropout), and give the model back in the mode it came in."""
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[TokenPair]:
    """The harness's ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window`` as token pairs.

    Each pair is (context, continuation): the model sees ``(context + continuation)[:-1]`` and every token of
    the text is predicted exactly once, the first one from the prefix token.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    pairs: list[TokenPair] = [((prefix,), tuple(tokens[:first]))]
    predicted = first
    while predicted < len(tokens):
        end = predicted + min(len(tokens) - predicted, max_len)
        pairs.append((tuple(tokens[end - max_len - 1:predicted]), tuple(tokens[predicted:end])))
        predicted = end
    return pairs


def _model_max_length(model: Any, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**9 else 2048
