"""Serving capacity as vLLM computes it: the KV block pool that ``gpu_memory_utilization`` leaves (stdlib only).

vLLM (v1 engine, ``vllm/v1/worker/gpu_worker.py`` ``determine_available_memory`` and
``vllm/v1/core/kv_cache_utils.py``) sizes its cache once, at start-up:

1. ``requested = ceil(total_gpu_memory x gpu_memory_utilization)``; the CUDA context lives outside it
   (the start-up snapshot is taken after the context exists);
2. a profiling run, ``_dummy_run(max_num_batched_tokens)`` spread over ``min(tokens, max_num_seqs)``
   requests plus a dummy sampler run, measures ``non_kv_cache_memory = weights + torch peak increase +
   non-torch increase``;
3. ``available = requested - non_kv_cache_memory`` (minus a CUDA-graph estimate when that is enabled);
4. every layer's page is ``2 x block_size x num_kv_heads x head_size x dtype_size`` (``FullAttentionSpec``),
   so ``num_blocks = available // page_size // num_layers`` and the cache holds ``num_blocks x block_size``
   tokens; a request of ``n`` tokens takes ``ceil(n / block_size)`` blocks.

Under tensor parallelism each GPU holds ``weights / tp`` and ``max(1, kv_heads // tp)`` kv heads: the token
capacity is what one GPU's pool holds for its share of the heads.
"""

from __future__ import annotations

import dataclasses
import math

from llmtune.core.errors import InvalidOptionError
from llmtune.core.options import check_type
from llmtune.memory.gpus import gpu_bytes
from llmtune.memory.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class ServingCapacity:
    """vLLM's KV block pool on one GPU and what it admits."""

    engine: str
    requested_bytes: int  # ceil(total x gpu_memory_utilization)
    non_kv_bytes: int  # weights + profiling-run peak + non-torch memory (per GPU)
    kv_pool_bytes: int  # num_blocks x page_size x num_layers
    block_size: int
    num_blocks: int
    page_bytes_per_layer: int
    kv_bytes_per_token: int  # one GPU, all layers
    max_num_seqs: int
    max_model_len: int
    shared_prefix_tokens: int = 0

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV cache ("GPU KV cache size: N tokens" in vLLM's log)."""
        return self.num_blocks * self.block_size

    def blocks_per_sequence(self, seq_len: int) -> int:
        """Blocks one sequence of ``seq_len`` tokens takes; with prefix caching, full shared blocks are free."""
        shared = self.shared_prefix_tokens // self.block_size if self.shared_prefix_tokens else 0
        return max(0, math.ceil(seq_len / self.block_size) - min(shared, seq_len // self.block_size))

    def concurrent_sequences(self, seq_len: int) -> int:
        """How many sequences of ``seq_len`` tokens are resident at once (capped by ``max_num_seqs``)."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise InvalidOptionError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        if seq_len > self.max_model_len:
            raise InvalidOptionError(f"seq_len={seq_len} exceeds max_model_len={self.max_model_len}")
        shared = self.shared_prefix_tokens // self.block_size if self.shared_prefix_tokens else 0
        pool = self.num_blocks - min(shared, seq_len // self.block_size)  # the shared prefix is stored once
        per = self.blocks_per_sequence(seq_len)
        if per == 0:
            return self.max_num_seqs
        return max(0, min(self.max_num_seqs, pool // per))

    def max_concurrency(self) -> float:
        """vLLM's "Maximum concurrency for max_model_len tokens per request": kv_tokens / max_model_len."""
        return self.kv_tokens / self.max_model_len

    def to_dict(self) -> dict[str, int | float | str]:
        """A JSON-ready view with the derived numbers."""
        return dataclasses.asdict(self) | {"kv_tokens": self.kv_tokens, "max_concurrency": self.max_concurrency()}


def kv_heads_per_gpu(spec: ModelSpec, tp: int) -> int:
    """KV heads one GPU stores under tensor parallelism (vLLM replicates heads when kv_heads < tp)."""
    return max(1, spec.num_kv_heads // tp)


def page_bytes(spec: ModelSpec, block_size: int, kv_bytes: float, tp: int = 1) -> int:
    """vLLM ``FullAttentionSpec.page_size_bytes`` of one layer on one GPU."""
    return int(2 * block_size * kv_heads_per_gpu(spec, tp) * spec.head_dim * kv_bytes)


def profile_run_bytes(spec: ModelSpec, act_bytes: int, tokens: int, seqs: int, tp: int) -> dict[str, int]:
    """Activation peak of vLLM's profiling run over ``tokens`` tokens in ``seqs`` requests (per GPU).

    One layer's working set (vLLM frees each layer's temporaries before the next): the residual and
    normed hidden states, the fused QKV output and the attention output (sharded over ``tp``), the fused
    gate/up output and the activated half (sharded); then logits for the last token of each request in
    fp32 plus the sampler's probabilities of the dummy sampler run.
    """
    h = spec.hidden_size
    f = spec.experts_per_token * spec.moe_intermediate_size if spec.is_moe else spec.intermediate_size
    qkv = (spec.q_dim + 2 * spec.kv_dim) // tp
    layer = act_bytes * tokens * (3 * h + qkv + spec.q_dim // tp + 3 * f // tp)
    sampler = seqs * spec.vocab_size * (act_bytes + 2 * 4)  # logits are gathered to the full vocabulary
    return {"profile_layer_temporaries": layer, "profile_logits_sampler": sampler}


def vllm_capacity(spec: ModelSpec, weight_bytes: int, *, gpu: str | int, kv_bytes: float, act_bytes: int = 2,
                  tp: int = 1, gpu_memory_utilization: float = 0.9, block_size: int = 16, max_num_seqs: int = 256,
                  max_model_len: int | None = None, max_num_batched_tokens: int = 8192,
                  non_torch_bytes: int = 0, cudagraph_bytes: int = 0,
                  shared_prefix_tokens: int = 0) -> tuple[ServingCapacity, dict[str, int]]:
    """vLLM's block pool on one GPU for ``weight_bytes`` of (per-GPU) weights; also the profiling-run terms."""
    check_type("gpu_memory_utilization", gpu_memory_utilization, (int, float))
    if not 0 < gpu_memory_utilization <= 1:
        raise InvalidOptionError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}",
                                 field="gpu_memory_utilization")
    mml = max_model_len if max_model_len is not None else spec_max_len(spec)
    for name, v, least in (("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1),
                           ("max_num_batched_tokens", max_num_batched_tokens, 1), ("max_model_len", mml, 1),
                           ("non_torch_bytes", non_torch_bytes, 0), ("cudagraph_bytes", cudagraph_bytes, 0),
                           ("shared_prefix_tokens", shared_prefix_tokens, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise InvalidOptionError(f"vllm option {name} must be an integer >= {least}, got {v!r}", field=name)
    requested = math.ceil(gpu_bytes(gpu) * gpu_memory_utilization)
    for name, v in (("non_torch_bytes", non_torch_bytes), ("cudagraph_bytes", cudagraph_bytes)):
        if v > requested:
            raise InvalidOptionError(f"vllm option {name}={v:,} is more than the {requested:,} bytes that "
                                     f"gpu_memory_utilization leaves on {gpu}", field=name)
    if shared_prefix_tokens > mml:
        raise InvalidOptionError(f"vllm option shared_prefix_tokens={shared_prefix_tokens} exceeds "
                                 f"max_model_len={mml}", field="shared_prefix_tokens")
    seqs = min(max_num_batched_tokens, max_num_seqs)
    prof = profile_run_bytes(spec, act_bytes, max_num_batched_tokens, seqs, tp)
    non_kv = weight_bytes + sum(prof.values()) + non_torch_bytes
    available = requested - non_kv - cudagraph_bytes
    page = page_bytes(spec, block_size, kv_bytes, tp)
    blocks = max(0, available // page // spec.num_layers)
    cap = ServingCapacity(engine="vllm", requested_bytes=requested, non_kv_bytes=non_kv,
                          kv_pool_bytes=blocks * page * spec.num_layers, block_size=block_size, num_blocks=blocks,
                          page_bytes_per_layer=page, kv_bytes_per_token=page * spec.num_layers // block_size,
                          max_num_seqs=max_num_seqs, max_model_len=mml, shared_prefix_tokens=shared_prefix_tokens)
    return cap, prof


def spec_max_len(spec: ModelSpec) -> int:
    """Default ``max_model_len`` when none is given: 8192 tokens (vLLM reads the config's own limit)."""
    return spec.learned_positions or 8192
