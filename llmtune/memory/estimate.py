"""Serving and fine-tuning GPU-memory estimates, term by term and phase by phase (stdlib only).

What is predicted is ``torch.cuda.max_memory_allocated()`` of one run (``peak_tensor_bytes``) and what the
device shows (``device_bytes``: plus CUDA context and the caching allocator's reserve). Every term is a
count of tensors that are alive at that moment; docs/memory.md derives each one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from llmtune.core.errors import InvalidOptionError, did_you_mean
from llmtune.core.units import MiB
from llmtune.memory.attention import (
    AttentionBackward,
    attention_backward,
    cuda_attention_kernel,
    softmax_forward_transient,
)
from llmtune.memory.gpus import GPUS, gpu_bytes
from llmtune.memory.mechanisms import (
    ADAPTER_METHODS,
    adapter_layer_bytes,
    adapter_params,
    check_mechanism,
    generation_terms,
    pair_terms,
    prefix_layer_bytes,
    reference_pass_terms,
    sequences_per_example,
)
from llmtune.memory.recipes import RECIPE_FACTS, Recipe, resolve_recipe
from llmtune.memory.serving import ServingCapacity, kv_heads_per_gpu, vllm_capacity
from llmtune.memory.spec import ModelSpec
from llmtune.memory.weights import allocator_block_bytes, default_format, loading_peak_extra, weight_terms

GB = 10**9

METHODS = ("full", "lora", "qlora", "dora", *ADAPTER_METHODS)
RECIPES = tuple(RECIPE_FACTS)
ATTENTIONS = ("sdpa", "flash", "eager")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd", "sgd_momentum", "adafactor")
PRECISIONS = ("bf16", "fp32", "mixed")
SHARDINGS = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")

#: CUDA context after ``torch.cuda.init()`` on the H100 of ../shared/memory (torch 2.11, CUDA 13, lazy loading).
DEFAULT_CUDA_CONTEXT = 527 * MiB
#: cuBLAS workspace per handle: PyTorch's default on Hopper (":4096:8" = 32 MiB; other GPUs ~8 MiB).
DEFAULT_WORKSPACE = 32 * MiB
#: Caching-allocator reserve on top of the peak, as a fraction of the transient (non-static) bytes.
DEFAULT_ALLOCATOR_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A memory estimate: the peak, what the device shows, every term, and each phase's peak."""

    peak_tensor_bytes: int
    device_bytes: int
    breakdown: dict[str, int]
    phases: dict[str, int]
    peak_phase: str
    phase_breakdowns: dict[str, dict[str, int]]
    assumptions: tuple[str, ...] = ()
    capacity: ServingCapacity | None = None  # serving with engine="vllm": the KV block pool
    #: why the run cannot start or run whatever the memory total says (e.g. a colocated vLLM engine refusing)
    blockers: tuple[str, ...] = ()

    @property
    def peak_gib(self) -> float:
        """``peak_tensor_bytes`` in GiB."""
        return self.peak_tensor_bytes / 2**30

    @property
    def device_gib(self) -> float:
        """``device_bytes`` in GiB."""
        return self.device_bytes / 2**30

    def fits(self, gpu: str | int) -> bool:
        """True when ``device_bytes`` fits in ``gpu`` (a name from GPUS or a byte count) and nothing blocks the run."""
        return self.device_bytes <= gpu_bytes(gpu) and not self.blockers

    def fitting_gpus(self) -> dict[str, bool]:
        """For each common GPU, whether this estimate fits on one of it."""
        return {name: self.device_bytes <= b for name, b in GPUS.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (bytes as ints)."""
        out = dataclasses.asdict(self) | {"assumptions": list(self.assumptions), "blockers": list(self.blockers)}
        out["capacity"] = self.capacity.to_dict() if self.capacity else None
        return out


# ---------------------------------------------------------------------------------------------- helpers
def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidOptionError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise InvalidOptionError(f"{name}={value!r} is not one of {', '.join(choices)}.{hint}")
    return str(value)


def _check_nonneg_bytes(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidOptionError(f"{name} must be a byte count >= 0, got {value!r}")
    return value


def _check_fraction(name: str, value: object, hi: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < hi:
        raise InvalidOptionError(f"{name} must be a number in [0, {hi}), got {value!r}")
    return float(value)


def _check_spec(spec: object) -> ModelSpec:
    if not isinstance(spec, ModelSpec):
        raise InvalidOptionError(f"spec must be a ModelSpec (ModelSpec.from_preset/from_hf_config), got {spec!r}")
    return spec


def rule_of_thumb_serving_gb(params: float, bits: float) -> float:
    """The lecture's serving rule ``M = (P x 4B / (32/Q)) x 1.2`` in GB (1e9 bytes); no KV cache, no batch."""
    if isinstance(params, bool) or not isinstance(params, (int, float)) or not 0 < params <= 1e15:
        raise InvalidOptionError(f"params must be a positive finite number (at most 1e15), got {params!r}")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 64:
        raise InvalidOptionError(f"bits must be a number in (0, 64], got {bits!r}")
    return round(params * 4 / (32 / bits) * 1.2 / GB, 6)


def resolve_lora_targets(spec: ModelSpec, targets: str | Iterable[str]) -> list[str]:
    """Linear module names LoRA wraps: ``"all-linear"`` (PEFT: every linear but lm_head) or a list of names."""
    names = {lin.name for lin in spec.layer_linears() if not lin.expert}
    if targets == "all-linear":
        return sorted(names)
    wanted = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    if not wanted or not all(isinstance(t, str) and t for t in wanted):
        raise InvalidOptionError(f"lora_targets must be 'all-linear' or module names, got {targets!r}")
    hit = sorted(names & set(wanted))
    if not hit:
        raise InvalidOptionError(f"lora_targets {wanted} match no linear module of {spec.name!r} "
                                 f"(family {spec.family}); it has: {', '.join(sorted(names))}")
    return hit


def lora_params(spec: ModelSpec, rank: int, targets: Iterable[str], dora: bool = False) -> int:
    """Trainable adapter parameters: r x (in + out) per wrapped linear (+ out magnitudes for DoRA)."""
    ts = set(targets)
    per_layer = sum(rank * (x.in_features + x.out_features) + (x.out_features if dora else 0)
                    for x in spec.layer_linears() if x.name in ts and not x.expert)
    return spec.num_layers * per_layer


# ---------------------------------------------------------------------------------------------- activations
@dataclasses.dataclass(frozen=True)
class _Ctx:
    """How one layer is run: dtypes, what is trainable, which kernels."""

    act: int  # bytes of the residual stream / activations (2 = bf16, 4 = fp32)
    train_base: bool  # base weights trainable (full fine-tuning)
    lora: frozenset[str]
    lora_bytes: int  # adapter dtype (PEFT keeps adapters in fp32)
    rank: int
    lora_dropout: float
    dora: bool
    attention: str
    fused: bool  # fused Triton kernels (Unsloth) instead of eager PyTorch ops


def _norm_bytes(spec: ModelSpec, c: _Ctx, width: int) -> int:
    """Bytes per token one norm saves for backward."""
    a = c.act
    if c.fused:  # fused RMSNorm kernel: saves its input and 1/rms
        return a * width + 4
    if spec.norm == "layernorm":  # native_layer_norm saves input, mean and rstd
        return a * width + 8
    # HF RMSNorm: x.float() (or x itself when already fp32) and rsqrt(var); with a trainable weight also
    # the normalised tensor multiplied by it (cast back for Llama, fp32 for Gemma's (1 + w))
    return 4 * width + 4 + ((a if spec.norm == "rms" else 4) * width if c.train_base else 0)


class _Layer(NamedTuple):
    """One decoder layer's saved bytes per token, by term, and what its attention keeps."""

    terms: dict[str, float]
    quad: float  # bytes per token per key position (times seq_len): an explicit attention matrix
    first_norm: float  # the layer's first norm (not saved in layer 0 when the embedding output needs no grad)
    attn_kept: float  # bytes per token the attention block still holds when its softmax runs backward
    attn_bwd: AttentionBackward
    kernel: str
    # fp32 activations: RMSNorm's x.float() is x itself, so the first norm's saved input is the layer input
    # (with checkpointing: the checkpoint, not a second copy)
    norm_input_shared: float
    fwd_kept: float = 0.0  # bytes per token the attention block holds when its softmax runs forward
    fwd_transient: float = 0.0  # bytes per token per key position alive then beyond the saved softmax output


def _layer_terms(spec: ModelSpec, c: _Ctx, masked: bool = False) -> _Layer:
    """Bytes per token that autograd saves for one decoder layer, by term, and its attention kernel.

    ``masked``: SDPA gets an explicit mask (sliding-window layers longer than the window): transformers then
    repeats K/V to every head, and SDPA turns the boolean mask into a float bias it saves for backward.
    """
    a, h, f = c.act, spec.hidden_size, spec.intermediate_size
    t: dict[str, float] = {}
    saved: set[str] = set()
    quad = 0.0

    def add(k: str, v: float) -> None:
        t[k] = t.get(k, 0.0) + v

    def norm(width: int) -> None:
        add("norms", _norm_bytes(spec, c, width))

    def linear(name: str, src: str, n_in: int, n_out: int) -> None:
        if c.train_base and src not in saved:  # a trainable weight needs its input for dW
            saved.add(src)
            add("linear_inputs", a * n_in)
        if name in c.lora:
            if c.lora_dropout > 0:  # dropout output (adapter dtype) + bool mask, per module
                add("lora_inputs", (c.lora_bytes + 1) * n_in)
            elif c.lora_bytes != a and not c.fused:  # PEFT casts x to the adapter dtype: a copy per module
                add("lora_inputs", c.lora_bytes * n_in)
            elif src not in saved:
                saved.add(src)
                add("lora_inputs", a * n_in)
            add("lora_inputs", c.lora_bytes * c.rank)  # lora_A output, saved by lora_B
            if c.dora:  # base result and lora result are saved by DoRA's magnitude scaling
                add("dora", (a + 2 * c.lora_bytes) * n_out)

    q, kv, heads = spec.q_dim, spec.kv_dim, spec.num_heads
    # ---- attention block
    first_norm = float(_norm_bytes(spec, c, h))
    norm(h)
    if spec.fused_qkv:
        qkv_name = "c_attn" if spec.family == "gpt2" else ("query_key_value" if spec.family in ("gpt_neox", "falcon")
                                                           else "qkv_proj")
        linear(qkv_name, "x_attn", h, q + 2 * kv)
    else:
        for n, w in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            linear(n, "x_attn", h, w)
    if spec.qk_norm:
        add("norms", 4 * (q + kv) + 4 * (heads + spec.num_kv_heads)
            + (((a if spec.norm == "rms" else 4) * (q + kv)) if c.train_base else 0))
    kernel = cuda_attention_kernel(spec, a, c.attention, masked)
    pre_kernel = sum(t.values())
    gqa_native = kernel != "eager" and spec.head_dim <= 256 and not masked
    # repeat_kv materialises full-head K/V when SDPA cannot take GQA (a reshape view when there is 1 kv head)
    k_saved = kv if (gqa_native or kv == q or spec.num_kv_heads == 1) else q
    if spec.family == "gpt2":
        qkv_store = float(a * (q + 2 * kv))  # q, k, v: views of c_attn's output (SDPA) or bmm copies (eager)
        v_store = 0.0
        qk_store = 0.0
    else:
        qkv_store = 0.0
        qk_store = float(a * (q + k_saved))  # RoPE (or q/k-norm) makes new q, k tensors
        v_store = a * k_saved
    if c.attention == "eager":
        add("attention", qkv_store + qk_store + v_store)
        if spec.family in ("gpt2", "falcon"):
            quad += a * heads  # GPT-2 and Falcon take the softmax in the activation dtype
        else:
            quad += 4 * heads + (a * heads if a != 4 else 0)  # fp32 softmax output + its cast back
        if spec.family == "gemma2":
            quad += a * heads  # attention-logit soft-capping: tanh output
        if spec.dropout:
            quad += (1 + a) * heads  # attention dropout mask + output
    elif kernel == "math":  # scaled q, scaled k and v repeated to all heads (fp32) + the fp32 softmax output
        add("attention", 3 * 4 * q)
        quad += 4 * heads
    else:  # flash / memory-efficient SDPA: q, k, v, output and fp32 logsumexp; no s^2 term
        add("attention", qkv_store + qk_store + v_store + a * q + 4 * heads)
        if spec.family not in ("gpt_neox", "phi3"):  # output laid out (b, s, h, d): o_proj's input shares it
            saved.add("attn_2d")
        if masked:
            quad += a  # (b, 1, s, s) float attention bias made from the boolean mask
    o_name = {"gpt2": "c_proj", "gpt_neox": "dense", "falcon": "dense"}.get(spec.family, "o_proj")
    linear(o_name, "attn_2d", q, h)
    if spec.norms_per_layer == 4:
        norm(h)  # Gemma 2/3 post-attention norm
    if spec.dropout:
        add("dropout_masks", h)
    # ---- MLP block
    shared_norm = spec.parallel_residual and spec.norms_per_layer == 1
    if spec.parallel_residual and spec.norm == "layernorm" and not shared_norm:
        add("norms", 8)  # GPT-NeoX: both LayerNorms read the same x, saved once
    elif not shared_norm:
        norm(h)
    src = "x_attn" if shared_norm else "x_mlp"
    if spec.is_moe:
        e, k, fe = spec.num_experts, spec.experts_per_token, spec.moe_intermediate_size
        linear("gate", src, h, e)
        add("moe", a * e + 4 * e + 8 * k)  # router logits, fp32 softmax, top-k weights/indices
        per_slot = a * 2 * fe + a * fe + a * h  # gate/up output, activation, weighted expert output
        if c.train_base:
            per_slot += a * h + a * fe  # expert inputs and down_proj input for dW
        add("moe", k * per_slot)
        if spec.shared_expert_intermediate_size:
            fs = spec.shared_expert_intermediate_size
            linear("gate_proj", src, h, fs)
            linear("up_proj", src, h, fs)
            add("mlp", 3 * a * fs + a * h + a)  # gate, act, up, shared output and its sigmoid gate
            linear("down_proj", "mlp_mid", fs, h)
    elif spec.mlp == "gated":
        if spec.fused_gate_up:
            linear("gate_up_proj", src, h, 2 * f)
            add("mlp", a * 2 * f + a * f)  # gate/up are views of one tensor (kept whole) + act(gate)
        else:
            linear("gate_proj", src, h, f)
            linear("up_proj", src, h, f)
            add("mlp", (2 if c.fused else 3) * a * f)  # gate, up (+ act(gate) for mul)
        linear("down_proj", "mlp_mid", f, h)
    else:
        fc = {"gpt2": "c_fc"}.get(spec.family, "dense_h_to_4h")
        fc2 = {"gpt2": "c_proj"}.get(spec.family, "dense_4h_to_h")
        linear(fc, src, h, f)
        add("mlp", a * f * (4 if spec.activation == "gelu_new" else 1))  # GELU input (+ gelu_new's pieces)
        linear(fc2, "mlp_mid", f, h)
    if spec.norms_per_layer == 4:
        norm(h)  # Gemma 2/3 post-feed-forward norm
    if spec.dropout:
        add("dropout_masks", h)
    # what the attention block still holds when its softmax runs backward: o_proj's input and V were consumed
    kept = {"math": 2 * 4 * q, "eager": qkv_store + qk_store}.get(kernel, 0.0)
    bwd = attention_backward(spec, kernel, a, v_width=4 * q if kernel == "math" else a * max(k_saved, kv))
    shared = a * h if (a == 4 and not c.fused and spec.norm != "layernorm") else 0.0
    fwd_kept = pre_kernel + (3 * 4 * q if kernel == "math" else 0.0)  # math: scaled q, repeated k and v (fp32)
    return _Layer(t, quad, first_norm, pre_kernel + kept, bwd, kernel, shared, fwd_kept,
                  softmax_forward_transient(spec, kernel))


def _attention_backward_terms(lay: _Layer, L: int, s: int, T: int, gc: bool, layer: Mapping[str, float],
                              acts: Mapping[str, int]) -> dict[str, int]:
    """Terms alive while the first layer's softmax runs backward (explicit-attention kernels only).

    With checkpointing: the checkpoints, and the recomputed layer's attention block (its MLP block was
    freed by its own backward). Without: every other layer's saved tensors and this layer's attention block.
    Plus the softmax gradient and the softmax-backward result (``AttentionBackward``).
    """
    if not lay.attn_bwd.quad:
        return {}
    own_pt = lay.attn_kept - (lay.norm_input_shared if gc else 0.0) + lay.quad * s
    own = {"activations_recomputed_attention" if gc else "activations_last_layer_attention": int(own_pt * T)}
    if gc:
        kept = {k: v for k, v in acts.items() if k != "activations_model"}  # the final norm's input was freed
    else:
        kept = {k: v for k, v in acts.items() if not k.startswith("activations_")}
        kept |= {f"activations_{k}": int((L - 1) * v * T) for k, v in layer.items()}
        if lay.quad:
            kept["activations_attention_scores"] = int((L - 1) * lay.quad * s * T)
    return {**kept, **own, "attention_backward_grads": int((lay.attn_bwd.quad * s + lay.attn_bwd.per_token) * T)}


def _attention_recompute_terms(spec: ModelSpec, lay: _Layer, s: int, T: int, act: int,
                               attn_phase: Mapping[str, int]) -> dict[str, int]:
    """Terms alive at the softmax forward of the first layer's recomputation (checkpointing, math kernel).

    Reentrant or not, the recomputation runs inside backward: the checkpoints, the logits the loop holds
    and the layer output's gradient (the residual stream, ``act x h``) are alive, plus the recomputed
    attention block up to the softmax and ``softmax_forward_transient``.
    """
    if not lay.fwd_transient:
        return {}
    kept = {k: v for k, v in attn_phase.items()
            if k not in ("activations_recomputed_attention", "attention_backward_grads", "reentrant_checkpoint_outputs")}
    own = (lay.fwd_kept - lay.norm_input_shared + lay.quad * s) * T
    return {**kept, "activations_recomputed_attention": int(own), "layer_output_grad": act * spec.hidden_size * T,
            "attention_softmax_forward_transient": int(lay.fwd_transient * s * T)}


def _loss_terms(spec: ModelSpec, r: Recipe, act: int, T: int, chunk_tokens: int,
                notes: list[str]) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    """Loss-forward and loss-backward terms, the logits the loop holds, and last step's logits in the forward."""
    V, h = spec.vocab_size, spec.hidden_size
    logits = act * V * T
    if r.loss == "full_fp32":
        loss_fwd = {"logits": logits, "loss_fp32_logits": (4 * V * T if act != 4 else 0), "loss_log_softmax": 4 * V * T}
        loss_bwd = {"logits": logits, "loss_log_softmax": 4 * V * T, "loss_grad_nll": 4 * V * T,
                    "loss_grad_log_softmax": 4 * V * T}
        if spec.final_logit_softcapping is not None:
            loss_fwd["logits_softcap"] = loss_bwd["logits_softcap"] = logits
        notes.append(f"{r.name}: transformers' loss upcasts all logits to fp32")
    elif r.loss == "chunked":
        ck = min(chunk_tokens, T)
        loss_fwd = {"loss_chunk_working_set": ck * V * (act + 8), "loss_hidden_saved": act * h * T}
        loss_bwd = {"loss_chunk_working_set": ck * V * (act + 12), "loss_hidden_saved": act * h * T,
                    "loss_grad_hidden": act * h * T}
        notes.append(f"{r.name}: chunked cross-entropy, {ck} tokens per chunk recomputed in backward; "
                     "no full logits tensor is kept")
    else:
        loss_fwd = {"loss_hidden_saved": act * h * T, "loss_logsumexp": 4 * T}
        loss_bwd = {"loss_hidden_saved": act * h * T, "loss_logsumexp": 4 * T, "loss_grad_hidden": act * h * T}
        notes.append(f"{r.name}: cut cross-entropy never materialises logits")
    if not (r.keeps_outputs and r.loss == "full_fp32"):
        return loss_fwd, loss_bwd, {}, {}
    loss_fwd["logits_prev_step"] = logits
    notes.append(f"{r.name}: the loop keeps `out` (with its logits) alive through backward and optimizer step "
                 "and into the next forward")
    return loss_fwd, loss_bwd, {"logits": logits}, {"logits_prev_step": logits}


class _Acts(NamedTuple):
    """Activation terms by phase role."""

    acts: dict[str, int]
    recompute: dict[str, int]
    attn_phase: dict[str, int]
    scores_tmp: dict[str, int]
    bwd_temp: dict[str, int]
    recompute_fwd: dict[str, int]


def _activation_terms(spec: ModelSpec, c: _Ctx, r: Recipe, *, s: int, b: int, full: bool, quant: bool, gc: bool,
                      method: str, packing: bool, bottleneck_size: int, sites: tuple[str, ...],
                      num_virtual_tokens: int, notes: list[str]) -> _Acts:
    """What autograd keeps: per-layer saved tensors (or checkpoints + one recomputed layer), model-level terms,
    the attention-backward working set and the backward temporaries."""
    act, h, T = c.act, spec.hidden_size, b * s
    adapter_method = method in ADAPTER_METHODS
    prefix = num_virtual_tokens if method == "prefix_tuning" else 0
    masked = (packing or bool(prefix)) and c.attention == "sdpa"
    lay = _layer_terms(spec, c, masked=masked)
    layer, quad, first_norm = dict(lay.terms), lay.quad, lay.first_norm
    if adapter_method and method not in ("prompt_tuning", "prefix_tuning"):
        layer["adapters"] = adapter_layer_bytes(spec, method, act, c.lora_bytes, bottleneck_size=bottleneck_size,
                                                sites=sites)
    if prefix:
        layer["prefix_kv"] = prefix_layer_bytes(spec, act, prefix, s)
    L = spec.num_layers
    window_mask = s + prefix if masked else 0
    if packing and window_mask:
        notes.append("packing with SDPA: a block-diagonal mask for every layer (K/V repeated to all heads, float "
                     "bias saved per layer); attention='flash' packs varlen without a mask")
    if lay.kernel == "math":
        notes.append(f"fp32 activations with GQA ({spec.num_heads} query / {spec.num_kv_heads} kv heads) and no mask: "
                     "CUDA SDPA can run neither flash (16-bit only) nor memory-efficient (no GQA), so the math kernel "
                     "keeps the fp32 [b, heads, s, s] softmax output per layer")
    if spec.sliding_layers and spec.sliding_window and s > spec.sliding_window and c.attention != "eager" \
            and not window_mask:
        n_sl = spec.sliding_layers  # these layers get an explicit sliding-window mask
        sl_lay = _layer_terms(spec, c, masked=True)
        sl, sl_quad = sl_lay.terms, sl_lay.quad
        layer = {k: ((L - n_sl) * layer.get(k, 0.0) + n_sl * sl.get(k, 0.0)) / L for k in set(layer) | set(sl)}
        quad = ((L - n_sl) * quad + n_sl * sl_quad) / L
        window_mask = s  # the boolean (b, 1, s, s) mask, shared by the sliding layers
        notes.append(f"{n_sl} sliding-window layers (window {spec.sliding_window} < seq {s}) get an explicit mask: "
                     "K/V repeated to all heads, float bias saved per layer")
    layer_pt = sum(layer.values()) + quad * s  # one layer, bytes per token
    # (b, 1, s, s) causal mask shared by all layers: eager attention, and Falcon always passes one
    eager_mask = act * s if (c.attention == "eager" or spec.family == "falcon") else window_mask
    model_level = float(_norm_bytes(spec, c, h) + (act * h if full else 0))  # final norm (+ lm_head input for dW)
    model_level += 2 * act * spec.head_dim * (2 if spec.family == "gemma3" else 1) / b  # RoPE cos/sin, (1, s, d)
    dead: dict[str, float] = {}
    if not full and not gc and method == "bottleneck":
        # nothing upstream of layer 0's first adapter needs a gradient, so layer 0 saves nothing there
        dead = ({"attention": lay.terms.get("attention", 0.0)} if "attention" in sites else
                {k: v - (first_norm if k == "norms" else 0.0) for k, v in lay.terms.items()})
    if not full and not gc and method != "prompt_tuning":
        model_level -= first_norm  # frozen embeddings: layer 0's input norm needs no grad, saves nothing
    if spec.dropout:
        model_level += h  # embedding dropout mask
    offloaded = r.offload_checkpoints and gc
    if gc:
        per_layer_kept = 0 if offloaded else act * h  # the layer input; the rest is recomputed
        acts = {"activations_checkpoints": L * per_layer_kept * T, "activations_model": int((model_level + eager_mask) * T)}
        if offloaded:
            acts["offload_buffers"] = 2 * act * h * T
            notes.append("unsloth gradient checkpointing offloads each layer's input to CPU RAM")
        recompute = {"activations_recomputed_layer": int(layer_pt * T)}
        if quant and r.kbit_reentrant_checkpointing:
            recompute["reentrant_checkpoint_outputs"] = 2 * act * h * T
    else:
        acts = {f"activations_{k}": int((L * v - dead.get(k, 0.0)) * T) for k, v in layer.items()}
        if quad:
            acts["activations_attention_scores"] = int((L * quad - (lay.quad if dead else 0.0)) * s * T)
        acts["activations_model"] = int((model_level + eager_mask) * T)
        recompute = {}
    bwd_temp = {"backward_temporaries": int(_bwd_temp(spec, c) * T)}
    attn_phase = _attention_backward_terms(lay, L, s, T, gc, layer, acts)
    if attn_phase and "reentrant_checkpoint_outputs" in recompute:
        attn_phase["reentrant_checkpoint_outputs"] = recompute["reentrant_checkpoint_outputs"]
    scores_tmp = {}
    if attn_phase and not gc:  # the last layer's softmax forward: the scores (and _safe_softmax's temporaries)
        scores_tmp = {"attention_scores_transient": int((lay.fwd_transient or lay.quad) * s * T)}
    recompute_fwd = _attention_recompute_terms(spec, lay, s, T, act, attn_phase) if (attn_phase and gc) else {}
    return _Acts(acts, recompute, attn_phase, scores_tmp, bwd_temp, recompute_fwd)


def _optimizer_state_bytes(spec: ModelSpec, optimizer: str, trainable: int, state_dtype: int, full: bool, rank: int,
                           targets: Iterable[str]) -> int:
    """Bytes of optimizer states for ``trainable`` parameters (states in ``state_dtype`` bytes)."""
    state_bytes = {"adamw": 2 * state_dtype, "adamw_8bit": 2, "sgd": 0, "sgd_momentum": state_dtype,
                   "adafactor": 0}[optimizer]
    states = trainable * state_bytes
    if optimizer == "adamw_8bit":
        states += trainable * 2 * 4 // 256  # bitsandbytes: one fp32 absmax per 256-value block, per state
    if optimizer != "adafactor":
        return states
    ts = set(targets)  # Adafactor's factored second moment: one row and one column vector per matrix
    if full:
        states = spec.num_layers * sum(4 * (x.in_features + x.out_features) * x.count for x in spec.layer_linears())
        return states + 4 * (spec.vocab_size + spec.hidden_size) * (1 if spec.tie_embeddings else 2)
    return spec.num_layers * sum(4 * (rank + x.in_features) + 4 * (rank + x.out_features)
                                 for x in spec.layer_linears() if x.name in ts and not x.expert)


def _shard(spec: ModelSpec, sharding: str, n_gpu: int, st: dict[str, int], wterms: dict[str, int], fmt: str, full: bool,
           grad_bytes: int, grad_total: int, notes: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Divide model states per GPU as ``sharding`` does (``st`` in place); the weights and the extra buffers."""
    shard_terms: dict[str, int] = {}
    if sharding in ("zero1", "zero2", "zero3", "fsdp"):
        for k in ("states", "opt_temp", "master"):
            st[k] //= n_gpu
    if sharding in ("zero2", "zero3", "fsdp"):
        st["grads"] //= n_gpu
    if sharding in ("zero3", "fsdp"):
        wterms = {k: v // n_gpu for k, v in wterms.items()}
        st["adapters"] //= n_gpu
        layer_params = spec.layer_linear_params + spec.layer_other_params
        shard_terms["gathered_layers"] = 2 * layer_params * {"bf16": 2, "fp32": 4}.get(fmt, 1)
        if full:
            shard_terms["grad_reduce_buffer"] = layer_params * grad_bytes
        notes.append(f"{sharding}: parameters, gradients and optimizer states sharded over {n_gpu} GPUs; "
                     "two layers gathered at a time (current + prefetch)")
    elif sharding == "ddp" and n_gpu > 1:
        shard_terms["ddp_grad_buckets"] = grad_total
        notes.append("DDP: gradient buckets hold a second copy of the gradients")
    return wterms, shard_terms


def _objective_phases(spec: ModelSpec, objective: str, static: dict[str, int], act: int, b_ex: int, b: int, s: int,
                      ref_copy: bool, notes: list[str], reference: str = "adapter_off") -> dict[str, dict[str, int]]:
    """Phases an objective adds: the reference pass (DPO, online RL) and generation (online RL).

    The reference pass runs before the policy forward, so nothing of the policy step is alive yet; a
    reference held as a second model is a static term (``reference_weights``) of every phase.
    """
    out: dict[str, dict[str, int]] = {}
    if objective in ("dpo", "online_rl"):
        out["reference_forward"] = {**static, **reference_pass_terms(spec, act, b * s)}
        how = ("of a second copy of the model" if ref_copy else "computed once before training (no second copy)"
               if reference == "precomputed" else "with the adapter disabled (no second copy)")
        notes.append(f"{objective}: reference log-probs from a no-grad pass {how}")
    if objective == "online_rl":
        out["generation"] = {**static, **generation_terms(spec, act, b, s)}
        notes.append(f"online RL: {b // b_ex} samples per prompt generated with a KV cache, then trained on")
    if objective in ("dpo", "reward"):
        notes.append(f"{objective}: every answer of a micro-batch's pairs / rankings is one sequence, each once "
                     f"({b} sequences per micro-batch)")
    return out


def _bwd_temp(spec: ModelSpec, c: _Ctx) -> float:
    """Per-token gradient temporaries while one layer runs backward (residual grads, MLP-sized grads)."""
    f = spec.experts_per_token * spec.moe_intermediate_size if spec.is_moe else spec.intermediate_size
    extra = 4 * f if ("down_proj" in c.lora and c.lora_bytes != c.act and not c.fused) else 0
    return 2 * c.act * spec.hidden_size + 3 * c.act * f + extra


# ---------------------------------------------------------------------------------------------- estimate core
def _finish(phases: dict[str, dict[str, int]], static_keys: Iterable[str], context: int, fraction: float,
            assumptions: list[str]) -> Estimate:
    """Pick the peak phase, add context and allocator reserve, build the Estimate."""
    clean = {p: {k: int(v) for k, v in terms.items() if int(v) != 0} for p, terms in phases.items()}
    totals = {p: sum(t.values()) for p, t in clean.items()}
    peak_phase = max(totals, key=lambda p: totals[p])
    peak = totals[peak_phase]
    static = sum(v for k, v in clean[peak_phase].items() if k in set(static_keys))
    reserve = int(fraction * max(0, peak - static))
    breakdown = dict(clean[peak_phase])
    breakdown["cuda_context"] = context
    breakdown["allocator_reserve"] = reserve
    return Estimate(peak_tensor_bytes=peak, device_bytes=peak + context + reserve, breakdown=breakdown,
                    phases=totals, peak_phase=peak_phase, phase_breakdowns=clean, assumptions=tuple(assumptions))


def estimate_training(
    spec: ModelSpec,
    method: str = "lora",
    *,
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    lora_rank: int = 16,
    lora_targets: str | Iterable[str] = "all-linear",
    lora_dropout: float = 0.0,
    optimizer: str = "adamw",
    recipe: str | Recipe = "llmtune",
    attention: str = "sdpa",
    precision: str = "bf16",
    weight_bits: int | None = None,
    weight_format: str | None = None,
    double_quant: bool = True,
    gpus: int = 1,
    sharding: str = "none",
    loss_chunk_tokens: int = 1024,
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT,
    workspace_bytes: int = DEFAULT_WORKSPACE,
    allocator_fraction: float = DEFAULT_ALLOCATOR_FRACTION,
    objective: str = "sft",
    packing: bool = False,
    num_virtual_tokens: int = 20,
    bottleneck_size: int = 64,
    bottleneck_sites: tuple[str, ...] = ("attention", "mlp"),
    bottleneck_placement: str = "series",
    dpo_reference: str = "adapter_off",
    rl_samples: int = 4,
    responses: int = 2,
    generator: str = "hf",
    gpu: str | int | None = None,
    vllm: Mapping[str, Any] | None = None,
) -> Estimate:
    """Peak GPU memory of fine-tuning ``spec`` (per GPU), as the max over forward, backward and optimizer step.

    ``method``: ``full``, ``lora``, ``qlora``, ``dora``, ``prompt_tuning`` (``num_virtual_tokens``), ``ia3``,
    ``bottleneck`` (``bottleneck_size``, ``bottleneck_sites``, ``bottleneck_placement``). ``objective``:
    ``sft``; ``reward`` (scalar head, chosen + rejected); ``dpo`` (chosen + rejected, a no-grad reference
    pass; ``dpo_reference="adapter_off"`` reuses the base, ``"copy"`` holds a second model, ``"precomputed"``
    runs that pass once before training, over the starting model, and holds no copy); ``online_rl``
    (``rl_samples`` completions per prompt generated with a KV cache, then trained on, with a KL reference
    pass). ``responses``: answers per example of ``dpo`` / ``reward`` (2 for a pair; a ranking of K answers puts
    K rows through the model, each answer once, and scores its K(K-1)/2 pairs). ``generator="hf"`` generates
    online RL's samples with the policy itself, ``generator="vllm"`` with a colocated vLLM engine
    sized on ``gpu`` by its ``vllm`` engine options, `llmtune.memory.colocate`: its weights and KV pool are held
    through every phase, ``blockers`` says when vLLM would refuse to start. ``packing`` with SDPA: transformers builds a block-diagonal mask, so every layer gets an explicit
    mask (K/V repeated, float bias saved); with ``attention="flash"`` packing runs varlen, maskless.

    ``recipe``: ``"hf"`` = plain transformers + PEFT + bitsandbytes (../shared/memory/reference_recipe.py:
    full fp32 logits in the loss, QLoRA through ``prepare_model_for_kbit_training``); ``"llmtune"`` = llmtune's
    peft trainer (chunked cross-entropy over ``loss_chunk_tokens`` tokens, no fp32 upcast); ``"unsloth"`` =
    Unsloth (fused kernels, offloaded checkpoints, cut cross-entropy). ``batch_size`` is per GPU.
    """
    spec = _check_spec(spec)
    method = _check_choice("method", method, METHODS)
    r = resolve_recipe(recipe)
    attention = _check_choice("attention", attention, ATTENTIONS)
    optimizer = _check_choice("optimizer", optimizer, OPTIMIZERS)
    precision = _check_choice("precision", precision, PRECISIONS)
    sharding = _check_choice("sharding", sharding, SHARDINGS)
    b = _check_int("batch_size", batch_size)
    s = _check_int("seq_len", seq_len)
    n_gpu = _check_int("gpus", gpus)
    rank = _check_int("lora_rank", lora_rank)
    chunk_tokens = _check_int("loss_chunk_tokens", loss_chunk_tokens)
    dropout = _check_fraction("lora_dropout", lora_dropout)
    context = _check_nonneg_bytes("cuda_context_bytes", cuda_context_bytes)
    ws = _check_nonneg_bytes("workspace_bytes", workspace_bytes)
    frac = _check_fraction("allocator_fraction", allocator_fraction, 10.0)
    if not isinstance(gradient_checkpointing, bool):
        raise InvalidOptionError(f"gradient_checkpointing must be True or False, got {gradient_checkpointing!r}")
    if n_gpu == 1 and sharding not in ("none", "ddp"):
        sharding = "none"
    if n_gpu > 1 and sharding == "none":
        sharding = "ddp"
    if not r.sharding and method == "full" and sharding != "none":
        raise InvalidOptionError(f"recipe={r.name!r} has no FSDP/ZeRO support; use recipe='hf' or 'llmtune'")
    if method != "full" and precision == "mixed":
        raise InvalidOptionError(f"precision={precision!r} applies to method='full' only")
    check_mechanism(method, objective, num_virtual_tokens=num_virtual_tokens, bottleneck_size=bottleneck_size,
                    sites=tuple(bottleneck_sites), placement=bottleneck_placement, rl_samples=rl_samples,
                    dpo_reference=dpo_reference, responses=responses)
    if not isinstance(packing, bool):
        raise InvalidOptionError(f"packing must be True or False, got {packing!r}")
    n_seq = sequences_per_example(objective, rl_samples, responses)
    b_ex, b = b, b * n_seq  # sequences through the model per micro-batch
    if method == "prompt_tuning":
        s += num_virtual_tokens  # the soft prompt is prepended to every sequence
    T = b * s
    V, h = spec.vocab_size, spec.hidden_size
    notes: list[str] = []
    full = method == "full"
    quant = method == "qlora"
    # ---- weights
    if quant:
        fmt = weight_format or default_format(weight_bits if weight_bits is not None else 4)
        if fmt in ("bf16", "fp16", "fp32"):
            raise InvalidOptionError(f"method='qlora' needs a quantized weight format, got {fmt!r}")
        bits = weight_bits if weight_bits is not None else (8 if fmt == "int8" else 4)
    else:
        if weight_bits not in (None, 16, 32) or weight_format not in (None, "bf16", "fp16", "fp32"):
            raise InvalidOptionError(f"method={method!r} trains a 16/32-bit base; for a quantized base use "
                                     "method='qlora'")
        fmt = "fp32" if precision == "fp32" else "bf16"
        bits = 16
    upcast = quant and r.kbit_upcast_fp32
    wterms = weight_terms(spec, fmt, bits=bits, double_quant=double_quant, upcast_fp32=upcast)
    act = 4 if (upcast or precision == "fp32") else 2
    if upcast:
        notes.append("hf QLoRA: prepare_model_for_kbit_training upcasts embeddings/lm_head/norms to fp32, so the "
                     "residual stream, activations and logits are fp32")
    # ---- trainable parameters, gradients, optimizer states
    adapter_method = method in ADAPTER_METHODS
    targets = [] if (full or adapter_method) else resolve_lora_targets(spec, lora_targets)
    if full:
        trainable = spec.num_params
        # bf16: torch optimizers keep states in the parameter dtype; fp32: everything fp32;
        # mixed (ZeRO / Megatron / DeepSpeed): 16-bit weights and grads + fp32 master weights and states
        p_bytes = 4 if precision == "fp32" else 2
        state_dtype = 4 if precision in ("fp32", "mixed") else 2
    else:
        trainable = (adapter_params(spec, method, num_virtual_tokens=num_virtual_tokens, bottleneck_size=bottleneck_size,
                                    sites=tuple(bottleneck_sites)) if adapter_method
                     else lora_params(spec, rank, targets, dora=method == "dora"))
        if objective == "reward":
            trainable += h  # the scalar score head (PEFT modules_to_save)
        p_bytes = state_dtype = 4  # PEFT (and Unsloth) keep adapters in fp32
    grad_bytes = p_bytes
    states = _optimizer_state_bytes(spec, optimizer, trainable, state_dtype, full, rank, targets)
    master_fp32 = trainable * 4 if (full and precision == "mixed") else 0
    opt_temp = trainable * state_dtype if optimizer == "adamw" else 0  # foreach AdamW: sqrt(exp_avg_sq) copy
    grads = trainable * grad_bytes
    # ---- sharding (per GPU)
    adapters = trainable * p_bytes if not full else 0  # LoRA adapters (full: the weights are the parameters)
    model_states = {"states": states, "opt_temp": opt_temp, "master": master_fp32, "grads": grads, "adapters": adapters}
    wterms, shard_terms = _shard(spec, sharding, n_gpu, model_states, wterms, fmt, full, grad_bytes,
                                 trainable * grad_bytes, notes)
    states, opt_temp, master_fp32, grads, adapters = (model_states[k] for k in
                                                      ("states", "opt_temp", "master", "grads", "adapters"))
    mixed_cache = {"master_weights_fp32": master_fp32} if master_fp32 else {}
    # ---- activations
    c = _Ctx(act=act, train_base=full, lora=frozenset(targets), lora_bytes=4 if r.adapter_fp32 else act,
             rank=rank, lora_dropout=dropout, dora=method == "dora", attention=attention, fused=r.fused_kernels)
    ac = _activation_terms(spec, c, r, s=s, b=b, full=full, quant=quant, gc=gradient_checkpointing, method=method,
                           packing=packing, bottleneck_size=bottleneck_size, sites=tuple(bottleneck_sites),
                           num_virtual_tokens=num_virtual_tokens, notes=notes)
    acts, recompute, attn_phase, scores_tmp, bwd_temp = ac.acts, ac.recompute, ac.attn_phase, ac.scores_tmp, ac.bwd_temp
    dequant = {"dequant_buffer": spec.largest_linear() * 2} if quant else {}
    # ---- logits and loss, by recipe
    loss_fwd, loss_bwd, held, fwd_prev = _loss_terms(spec, r, act, T, chunk_tokens, notes)
    if objective == "reward":  # a (T, 1) score instead of (T, V) logits; the lm_head is replaced by the score head
        loss_fwd = loss_bwd = {"reward_scores": 3 * 4 * T}
        held, fwd_prev = {}, {}
        head = spec.lm_head_params * (4 if upcast else (2 if fmt not in ("fp32",) else 4))
        wkey = "weights" if "weights" in wterms else "embeddings_lm_head"
        wterms = {**wterms, wkey: max(0, wterms[wkey] - head)}
    # ---- phases (steady state: optimizer states exist, gradients were set to None by zero_grad)
    ref_copy = objective in ("dpo", "online_rl") and (dpo_reference == "copy" or (full and dpo_reference != "precomputed"))
    ref_w = {"reference_weights": sum(wterms.values())} if ref_copy else {}
    static = {**wterms, **ref_w, **({"lora_params": adapters} if adapters else {}), **mixed_cache, **({"optimizer_states": states} if states else {}),
              "cublas_workspace": 2 * ws, **shard_terms}
    grads_all = {"gradients": grads}
    lm_head_grad = {"gradients_lm_head": V * h * grad_bytes} if full else {}
    embed_temp = {"embedding_grad_temp": V * h * grad_bytes} if (full and spec.tie_embeddings) else {}
    phases: dict[str, dict[str, int]] = {
        "forward": {**static, **acts, **recompute, **fwd_prev, **dequant, **scores_tmp},
        "loss_forward": {**static, **acts, **loss_fwd},
        "loss_backward": {**static, **acts, **loss_bwd,
                          **(lm_head_grad if r.loss != "full_fp32" else {})},
        "backward_start": {**static, **acts, **recompute, **held, **bwd_temp, **lm_head_grad, **dequant},
        "backward_end": {**static, **grads_all, **held, **bwd_temp, **recompute, **embed_temp, **dequant,
                         "activations_model": acts.get("activations_model", 0)},
        "optimizer_step": {**static, **grads_all, **held, **({"optimizer_temp": opt_temp} if opt_temp else {})},
    }
    if attn_phase:
        phases["attention_backward"] = {**static, **attn_phase, **held}
    if ac.recompute_fwd:
        phases["attention_recompute_forward"] = {**static, **ac.recompute_fwd, **held}
    phases |= _objective_phases(spec, objective, static, act, b_ex, b, s, ref_copy, notes, dpo_reference)
    every, at_loss = pair_terms(objective, b_ex, responses)
    for name, terms in phases.items():
        terms.update(every, **(at_loss if name.startswith("loss_") else {}))
    if quant:
        notes.append("bitsandbytes dequantizes one weight at a time to bf16 in forward and backward")
    generator = _check_choice("generator", generator, ("hf", "vllm"))
    if generator == "vllm":
        if objective != "online_rl":
            raise InvalidOptionError(f"generator='vllm' is online RL's sample generator; objective={objective!r} "
                                     "generates nothing", field="generator")
        return _with_colocated_vllm(phases, static, {**wterms, **ref_w}, spec, gpu=gpu, options=vllm, seq_len=s,
                                    prompts=b_ex, samples=b // b_ex, workspace=ws, context=context, frac=frac,
                                    notes=notes, weight_format=fmt if fmt in ("nf4", "fp4") else "bf16")
    statics = set(static)
    return _finish(phases, statics, context, frac, notes)


def _with_colocated_vllm(phases: dict[str, dict[str, int]], static: dict[str, int], loaded: dict[str, int],
                         spec: ModelSpec, *, gpu: str | int | None, options: Mapping[str, Any] | None, seq_len: int,
                         prompts: int, samples: int, workspace: int, context: int, frac: float,
                         notes: list[str], weight_format: str) -> Estimate:
    """The training phases with a colocated vLLM engine's weights and pool held throughout; its generation replaces
    the policy's own (`llmtune.memory.colocate`)."""
    from llmtune.memory.colocate import colocated_engine, startup_blocker

    cap, held, temps, requested, engine_notes, blockers = colocated_engine(
        spec, gpu=gpu, options=options, seq_len=seq_len, prompts=prompts, samples=samples, workspace_bytes=workspace,
        weight_format=weight_format)
    phases = {name: {**terms, **held} for name, terms in phases.items() if name != "generation"}
    phases["vllm_generation"] = {**static, **held, **temps}
    assert gpu is not None  # colocated_engine checked it
    start = startup_blocker(requested, sum(loaded.values()), context, gpu)
    est = _finish(phases, set(static) | set(held), context, frac, [*notes, *engine_notes])
    return dataclasses.replace(est, capacity=cap, blockers=tuple(([start] if start else []) + blockers))


def estimate_serving(
    spec: ModelSpec,
    weight_bits: int = 16,
    *,
    batch_size: int = 1,
    seq_len: int = 2048,
    kv_bits: int = 16,
    weight_format: str | None = None,
    group_size: int = 128,
    double_quant: bool = True,
    logits: str = "all",
    gpus: int = 1,
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT,
    workspace_bytes: int = DEFAULT_WORKSPACE,
    allocator_fraction: float = DEFAULT_ALLOCATOR_FRACTION,
    engine: str = "hf",
    gpu: str | int = "H100",
    vllm: Mapping[str, Any] | None = None,
    cublas_handles: int = 1,
) -> Estimate:
    """Peak GPU memory of serving: a transformers forward (``engine="hf"``) or vLLM's block pool (``"vllm"``).

    ``engine="hf"``: one forward over ``batch_size`` x ``seq_len`` tokens with a KV cache.
    ``logits="all"`` is a plain ``model(input_ids)`` call (logits for every position, as measured);
    ``"last"`` is ``generate``'s prefill (last position only, upcast to fp32). ``gpus`` > 1 = tensor parallel.
    ``cublas_handles``: cuBLAS handles holding a ``workspace_bytes`` workspace in the process: 1 in a fresh
    process; 2 once any backward ran on the device (autograd's device thread has its own handle, and PyTorch
    keeps each handle's workspace allocated until the process ends). The logits tensor is counted as the
    caching allocator allocates it (``allocator_block_bytes``: a fresh segment rounded to 2 MiB, kept whole
    when less than 1 MiB would remain).

    ``engine="vllm"``: vLLM sizes a KV block pool on ``gpu`` at start-up; ``vllm`` holds its engine
    arguments (``gpu_memory_utilization`` 0.9, ``block_size`` 16, ``max_num_seqs`` 256, ``max_model_len``,
    ``max_num_batched_tokens`` 8192, ``non_torch_bytes``, ``cudagraph_bytes``, ``shared_prefix_tokens`` for
    prefix caching). The result's ``capacity`` has the blocks, the tokens of KV cache and
    ``concurrent_sequences(n)``; ``batch_size`` and ``seq_len`` are ignored there.
    """
    engine = _check_choice("engine", engine, ("hf", "vllm"))
    if engine == "vllm":
        return _serve_vllm(spec, weight_bits, kv_bits=kv_bits, weight_format=weight_format, group_size=group_size,
                           double_quant=double_quant, gpus=gpus, gpu=gpu, context=cuda_context_bytes,
                           workspace=workspace_bytes, options=dict(vllm or {}))
    spec = _check_spec(spec)
    b = _check_int("batch_size", batch_size)
    s = _check_int("seq_len", seq_len)
    n_gpu = _check_int("gpus", gpus)
    _check_int("weight_bits", weight_bits)
    if kv_bits not in (4, 8, 16, 32):
        raise InvalidOptionError(f"kv_bits={kv_bits!r} is not one of 4, 8, 16, 32")
    logits = _check_choice("logits", logits, ("all", "last"))
    context = _check_nonneg_bytes("cuda_context_bytes", cuda_context_bytes)
    ws = _check_nonneg_bytes("workspace_bytes", workspace_bytes) * _check_int("cublas_handles", cublas_handles)
    frac = _check_fraction("allocator_fraction", allocator_fraction, 10.0)
    fmt = weight_format or default_format(weight_bits)
    wterms = weight_terms(spec, fmt, bits=weight_bits, group_size=group_size, double_quant=double_quant)
    wterms = {k: v // n_gpu for k, v in wterms.items()}
    a = 4 if fmt == "fp32" else 2
    T = b * s
    V, h = spec.vocab_size, spec.hidden_size
    L = spec.num_layers
    kv = 2 * spec.kv_dim * kv_bits * L * s * b // 8 // n_gpu
    static = {**wterms, "cublas_workspace": ws}
    notes = [f"KV cache: 2 x {spec.num_kv_heads} kv heads x {spec.head_dim} x {kv_bits} bits per token and layer"]
    if spec.sliding_layers and spec.sliding_window and s > spec.sliding_window:
        notes.append(f"{spec.sliding_layers} sliding-window layers: transformers' cache keeps a view of the whole "
                     "prefill's keys/values, so a single forward saves nothing (decoding later trims them)")
    if logits == "all":
        lg = {"logits": allocator_block_bytes(a * V * T), "final_hidden": a * h * T}
        if spec.final_logit_softcapping is not None:
            lg["logits_softcap_temp"] = a * V * T
    else:
        lg = {"logits": (a + 4) * V * b, "final_hidden": a * h * T}
    f = spec.experts_per_token * spec.moe_intermediate_size if spec.is_moe else spec.intermediate_size
    layer_tmp = {"layer_temporaries": (3 * a * f // (1 if spec.is_moe else n_gpu) + 2 * a * h) * T}
    if spec.is_moe:
        layer_tmp["layer_temporaries"] += a * spec.experts_per_token * h * T
    quant = {}
    if fmt in ("nf4", "fp4", "gptq", "awq"):
        quant["dequant_buffer"] = spec.largest_linear() * 2 // n_gpu
    elif fmt == "int8":
        quant["int8_matmul_buffers"] = (spec.hidden_size + 4 * f) * T // n_gpu
    phases = {
        "layers": {**static, "kv_cache": kv, **layer_tmp, **quant},
        "logits": {**static, "kv_cache": kv, **lg},
    }
    return _finish(phases, static, context, frac, notes)


_VLLM_OPTIONS = ("gpu_memory_utilization", "block_size", "max_num_seqs", "max_model_len", "max_num_batched_tokens",
                 "non_torch_bytes", "cudagraph_bytes", "shared_prefix_tokens")


def _serve_vllm(spec: ModelSpec, weight_bits: int, *, kv_bits: int, weight_format: str | None, group_size: int,
                double_quant: bool, gpus: int, gpu: str | int, context: int, workspace: int,
                options: dict[str, Any]) -> Estimate:
    """vLLM's start-up memory on one GPU: weights, the profiling run's peak, and the KV block pool."""
    spec = _check_spec(spec)
    tp = _check_int("gpus", gpus)
    _check_int("weight_bits", weight_bits)
    if kv_bits not in (8, 16, 32):
        raise InvalidOptionError(f"kv_bits={kv_bits!r} is not one of 8 (fp8 KV cache), 16, 32 for vLLM")
    bad = sorted(set(options) - set(_VLLM_OPTIONS))
    if bad:
        raise InvalidOptionError(f"vllm option {bad[0]!r} is not one of {', '.join(_VLLM_OPTIONS)}."
                                 f"{did_you_mean(bad[0], _VLLM_OPTIONS)}")
    fmt = weight_format or default_format(weight_bits)
    wterms = {k: v // tp for k, v in weight_terms(spec, fmt, bits=weight_bits, group_size=group_size,
                                                  double_quant=double_quant).items()}
    static = {**wterms, "cublas_workspace": _check_nonneg_bytes("workspace_bytes", workspace)}
    cap, prof = vllm_capacity(spec, sum(static.values()), gpu=gpu, kv_bytes=kv_bits / 8, tp=tp, **options)
    if cap.num_blocks == 0:
        raise InvalidOptionError(f"vLLM cannot start: weights and the profiling run need "
                                 f"{cap.non_kv_bytes / 2**30:.2f} GiB of the {cap.requested_bytes / 2**30:.2f} GiB "
                                 f"that gpu_memory_utilization leaves on {gpu}; no KV block fits")
    phases = {"profile_run": {**static, **prof}, "serving": {**static, "kv_cache_pool": cap.kv_pool_bytes}}
    notes = [f"vLLM: {cap.num_blocks:,} blocks of {cap.block_size} tokens = {cap.kv_tokens:,} tokens of KV cache per GPU "
             f"({cap.kv_bytes_per_token / 1024:.0f} KiB per token"
             + (f", {kv_heads_per_gpu(spec, tp)} of {spec.num_kv_heads} kv heads per GPU at tensor parallel {tp})"
                if tp > 1 else ")"),
             "the pool is allocated at start-up: the device shows requested memory (total x "
             "gpu_memory_utilization) whatever the load"]
    if cap.shared_prefix_tokens:
        notes.append(f"prefix caching: the first {cap.shared_prefix_tokens} tokens' full blocks are stored once")
    else:
        notes.append("prefix caching (on by default in vLLM v1) stores a shared prompt prefix once; pass "
                     "shared_prefix_tokens to count it")
    est = _finish(phases, static, _check_nonneg_bytes("cuda_context_bytes", context), 0.0, notes)
    return dataclasses.replace(est, device_bytes=max(est.device_bytes, cap.requested_bytes + context), capacity=cap)


def estimate_weights(
    spec: ModelSpec,
    weight_bits: int = 16,
    *,
    weight_format: str | None = None,
    group_size: int = 128,
    double_quant: bool = True,
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT,
) -> Estimate:
    """Memory of loading the weights alone: the loaded model, and the load's peak.

    bitsandbytes quantizes on the GPU one weight at a time: the largest linear is briefly there in bf16
    next to its quantized form.
    """
    spec = _check_spec(spec)
    _check_int("weight_bits", weight_bits)
    context = _check_nonneg_bytes("cuda_context_bytes", cuda_context_bytes)
    fmt = weight_format or default_format(weight_bits)
    wterms = weight_terms(spec, fmt, bits=weight_bits, group_size=group_size, double_quant=double_quant)
    phases = {"loaded": dict(wterms)}
    if fmt not in ("bf16", "fp16", "fp32"):
        temps, later = loading_peak_extra(spec, fmt, double_quant)
        qkey = f"weights_{fmt}"
        phases["loading"] = {**wterms, qkey: wterms[qkey] - later, "load_quantize_temporaries": temps}
    return _finish(phases, wterms, context, 0.0, [f"weights stored as {fmt}"])


# ---------------------------------------------------------------------------------------------- solvers
def _largest(fits: Callable[[int], bool], hi: int) -> int:
    """Largest n in [1, hi] with fits(n) (fits is monotone), or 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _solver(spec: ModelSpec, gpu: str | int, mode: str, solved: str, kwargs: Mapping[str, Any]) -> Callable[..., Estimate]:
    """The estimator a solver calls; rejects a bad mode, GPU, or a keyword that the solver sets itself."""
    _check_spec(spec)
    if mode not in ("training", "serving"):
        raise InvalidOptionError(f"mode={mode!r} is not 'training' or 'serving'")
    gpu_bytes(gpu)
    if solved in kwargs:
        raise InvalidOptionError(f"{solved} is what this solver finds; do not pass it")
    return estimate_training if mode == "training" else estimate_serving


def max_batch_size(spec: ModelSpec, gpu: str | int, *, seq_len: int, mode: str = "training", limit: int = 65536,
                   **kwargs: Any) -> int:
    """Largest per-GPU batch at ``seq_len`` whose ``device_bytes`` fit ``gpu``; 0 when none does."""
    fn = _solver(spec, gpu, mode, "batch_size", kwargs)
    cap = gpu_bytes(gpu)
    return _largest(lambda n: fn(spec, batch_size=n, seq_len=seq_len, **kwargs).device_bytes <= cap, limit)


def max_seq_len(spec: ModelSpec, gpu: str | int, *, batch_size: int = 1, mode: str = "training",
                limit: int = 1 << 22, **kwargs: Any) -> int:
    """Largest sequence length at ``batch_size`` whose ``device_bytes`` fit ``gpu``; 0 when none does."""
    fn = _solver(spec, gpu, mode, "seq_len", kwargs)
    cap = gpu_bytes(gpu)
    return _largest(lambda n: fn(spec, batch_size=batch_size, seq_len=n, **kwargs).device_bytes <= cap, limit)
