"""Which attention kernel a layer runs on CUDA, and what that kernel keeps for backward (stdlib only).

The choice is made twice, and both choices are reproduced here from their sources:

1. transformers (``integrations/sdpa_attention.py``, 5.x): with grouped-query attention (fewer kv heads than
   query heads) it passes ``enable_gqa=True`` when there is no explicit mask and ``head_dim <= 256``;
   otherwise it materialises full-head K/V with ``repeat_kv``.
2. PyTorch's CUDA dispatcher (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``), in priority order:

   * flash: fp16/bf16 only, ``head_dim <= 256``, no explicit mask; grouped-query heads admitted;
   * memory-efficient: fp16/bf16/fp32 (sm80+), masks admitted, but its dense constraints instantiate
     ``check_batch_size_and_num_heads_dense<false /*supports_grouped_query_attention*/>``: K/V must have
     as many heads as Q;
   * math: everything else.

So fp32 activations with grouped-query heads and no mask (QLoRA after ``prepare_model_for_kbit_training``,
or full fp32 fine-tuning of a GQA model) run the **math** kernel, which computes the attention matrix
explicitly and keeps it: scaled Q, scaled K repeated to every head, V repeated to every head (all fp32:
the math kernel upcasts 16-bit inputs) and the ``[b, heads, s, s]`` softmax output in fp32. Its backward
holds that softmax output, its gradient and the softmax-backward result at the same moment: three
``4 x heads x s`` bytes per token. Its forward (also the recomputation under gradient checkpointing, which
runs inside backward) holds, next to the softmax output it will save, the fp32 scores (the caller's
``attn`` until ``at::_safe_softmax`` returns) and the op's boolean ``isneginf`` mask of fully masked rows:
``(4 + 4 + 1) x heads x s`` bytes per token (`softmax_forward_transient`; the final ``where`` writes into
the softmax output and allocates nothing, as the CPU profiler shows for torch 2.13). (The CPU kernel picks differently: CPU flash takes fp32 and GQA, so
the CPU checks force the math kernel to measure what it keeps.)
"""

from __future__ import annotations

import dataclasses

from llmtune.memory.spec import ModelSpec

#: Kernels a layer's attention can run: transformers' eager code, the flash-attn package, or SDPA's three.
KERNELS = ("eager", "flash_attention_2", "flash", "efficient", "math")


def uses_enable_gqa(spec: ModelSpec, masked: bool) -> bool:
    """True when transformers hands SDPA grouped K/V (``enable_gqa=True``) instead of repeating them."""
    return spec.num_kv_heads < spec.num_heads and not masked and spec.head_dim <= 256


def cuda_attention_kernel(spec: ModelSpec, act_bytes: int, attention: str, masked: bool = False) -> str:
    """The kernel one layer's attention runs on CUDA: one of `KERNELS`.

    ``attention`` is the transformers ``attn_implementation`` ("sdpa", "flash" = flash_attention_2,
    "eager"); ``act_bytes`` the dtype reaching attention (2 = bf16/fp16, 4 = fp32); ``masked``: an explicit
    mask is passed (sliding window shorter than the sequence, padding, Falcon).
    """
    if attention == "eager":
        return "eager"
    if attention == "flash":
        return "flash_attention_2"
    if act_bytes == 2 and spec.head_dim <= 256 and not masked:
        return "flash"
    heads_match = spec.num_kv_heads == spec.num_heads or not uses_enable_gqa(spec, masked)
    return "efficient" if heads_match else "math"


@dataclasses.dataclass(frozen=True)
class AttentionBackward:
    """What is alive while one layer's softmax runs backward, beyond that layer's saved tensors.

    ``quad``: bytes per token per key position (times seq_len): the softmax output's gradient and the
    softmax-backward result. ``per_token``: the residual-stream gradient, the attention output's gradient
    and V's gradient (computed by the same node as the softmax gradient, waiting for its consumer).
    """

    quad: float
    per_token: float


def attention_backward(spec: ModelSpec, kernel: str, act_bytes: int, v_width: float) -> AttentionBackward:
    """The softmax-backward working set of an explicit-attention kernel (math or eager); zero otherwise.

    ``v_width``: bytes per token of V's gradient as the kernel produces it (math: fp32, every head).
    The attention output's gradient was consumed by the ``P @ V`` backward that made dP and dV.
    """
    a, heads = act_bytes, spec.num_heads
    if kernel == "math":  # dP = dO @ V^T and dS = softmax_backward(dP, P), both fp32
        return AttentionBackward(quad=2 * 4 * heads, per_token=a * spec.hidden_size + v_width)
    if kernel == "eager":
        sm = a if spec.family in ("gpt2", "falcon") else 4  # softmax dtype: activation or fp32
        return AttentionBackward(quad=2 * sm * heads, per_token=a * spec.hidden_size + v_width)
    return AttentionBackward(quad=0.0, per_token=0.0)


def softmax_forward_transient(spec: ModelSpec, kernel: str) -> float:
    """Bytes per token per key position alive at the softmax forward beyond the saved softmax output.

    math kernel (``_scaled_dot_product_attention_math`` -> ``at::_safe_softmax``): the fp32 scores (the
    caller's ``attn`` until the call returns) and ``isneginf(self)`` (a bool per element) are alive while
    the softmax output (saved for backward, counted in the layer's ``quad``) is written and its fully masked
    rows zeroed in place. Other kernels: 0 here.
    """
    if kernel == "math":
        return (4 + 1) * spec.num_heads
    return 0.0
