"""Training mechanisms beyond LoRA: soft prompts, IA3, bottleneck adapters, and the objectives (stdlib only).

Each function counts what one mechanism adds, from the operations it runs:

* **prefix tuning** (PEFT ``PrefixEncoder``, no projection): ``n x L x 2 x kv_dim`` fp32 parameters
  become ``n`` extra key/value positions per layer; PEFT passes a mask, so SDPA gets repeated K/V of
  ``s + n`` positions and a float bias (CUDA: the memory-efficient kernel).
* **prompt tuning** (PEFT ``PromptEmbedding``): ``n`` trainable fp32 vectors of width ``h`` prepended to the
  input, so every layer sees ``s + n`` positions and the input needs a gradient (layer 0's norm saves).
* **IA3** (PEFT ``IA3Layer``): fp32 vectors scaling the key and value outputs and the input of the last MLP
  linear. ``result * l`` saves ``result`` (the base output); for the MLP linear PEFT casts ``x`` to the
  vectors' dtype and ``x * l`` saves that fp32 copy: ``a x 2 kv + 4 f`` bytes per token and layer.
* **bottleneck adapters** (Houlsby et al. series, He et al. parallel): ``down (h->m) -> act -> up (m->h)``
  after attention and/or the MLP, ``2hm + m + h`` parameters each. Each saves its input for ``dW_down`` (a
  copy in the adapter dtype), the down output (the activation's input) and the activation output (for
  ``dW_up``): ``adapter_bytes x (h + 2m)`` per token.
* **objectives**: DPO and reward models run every answer of a pair (2x the sequences) or of a ranking of K
  answers (K x) together, each once, and score its K(K-1)/2 pairs; online RL (GRPO-style) trains on ``K`` samples per prompt after generating them with a KV cache.
"""

from __future__ import annotations

from llmtune.core.errors import InvalidOptionError
from llmtune.memory.spec import Linear, ModelSpec

ADAPTER_METHODS = ("prompt_tuning", "prefix_tuning", "ia3", "bottleneck")
OBJECTIVES = ("sft", "reward", "dpo", "online_rl")
PLACEMENTS = ("series", "parallel")
SITES = ("attention", "mlp")


def ia3_modules(spec: ModelSpec) -> tuple[list[Linear], list[Linear]]:
    """PEFT's IA3 defaults from the layer's linears: (output-scaled key/value projections, input-scaled MLP out).

    Separate projections: the two after the query projection; a fused QKV projection is scaled whole.
    The feed-forward one is the last non-expert linear (``down_proj``, ``dense_4h_to_h``, GPT-2's ``c_proj``).
    """
    lins = [x for x in spec.layer_linears() if not x.expert]
    attn = [lins[0]] if spec.fused_qkv else lins[1:3]
    return attn, [lins[-1]]


def adapter_params(spec: ModelSpec, method: str, *, num_virtual_tokens: int, bottleneck_size: int,
                   sites: tuple[str, ...]) -> int:
    """Trainable parameters of an adapter method (all layers)."""
    h, L = spec.hidden_size, spec.num_layers
    if method == "prompt_tuning":
        return num_virtual_tokens * h
    if method == "prefix_tuning":  # PEFT's PrefixEncoder without projection: n x (L x 2 x kv_dim)
        return num_virtual_tokens * L * 2 * spec.kv_dim
    if method == "ia3":
        scaled_out, scaled_in = ia3_modules(spec)
        return L * (sum(x.out_features for x in scaled_out) + sum(x.in_features for x in scaled_in))
    if method == "bottleneck":
        m = bottleneck_size
        return L * len(sites) * (2 * h * m + m + h)
    raise InvalidOptionError(f"method={method!r} is not one of {', '.join(ADAPTER_METHODS)}")


def adapter_layer_bytes(spec: ModelSpec, method: str, act: int, adapter_bytes: int, *, bottleneck_size: int,
                        sites: tuple[str, ...]) -> float:
    """Bytes per token one decoder layer saves for the adapter itself (prompt tuning: none)."""
    if method == "ia3":
        scaled_out, scaled_in = ia3_modules(spec)
        # k/v: ``result * l`` saves the base output; MLP: PEFT casts x to l's dtype (fp32), and x * l saves that copy
        return act * sum(x.out_features for x in scaled_out) + adapter_bytes * sum(x.in_features for x in scaled_in)
    if method == "bottleneck":
        return len(sites) * adapter_bytes * (spec.hidden_size + 2 * bottleneck_size)
    return 0.0


def prefix_layer_bytes(spec: ModelSpec, act: int, n: int, s: int) -> float:
    """Extra bytes per token one layer saves for ``n`` prefix keys/values: the concatenated K and V are
    ``n`` positions longer (repeated to every head: the prefix comes with a mask, so no ``enable_gqa``), and
    the mask's float bias has ``n`` more key columns."""
    kv_width = spec.kv_dim if spec.num_kv_heads in (1, spec.num_heads) else spec.q_dim
    return (2 * act * kv_width + act) * n / s


#: where DPO's reference log-probs come from: the base with the adapter off (a no-grad pass per step), a second
#: copy of the model, or one no-grad pass of the starting model before training (llmtune's ``precomputed``)
DPO_REFERENCES = ("adapter_off", "copy", "precomputed")


def check_mechanism(method: str, objective: str, *, num_virtual_tokens: int, bottleneck_size: int,
                    sites: tuple[str, ...], placement: str, rl_samples: int, dpo_reference: str,
                    responses: int = 2) -> None:
    """Reject bad mechanism arguments, naming the argument."""
    if objective not in OBJECTIVES:
        raise InvalidOptionError(f"objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
    for name, v, low in (("num_virtual_tokens", num_virtual_tokens, 1), ("bottleneck_size", bottleneck_size, 1),
                         ("rl_samples", rl_samples, 1), ("responses", responses, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise InvalidOptionError(f"{name} must be an integer >= {low}, got {v!r}")
    if placement not in PLACEMENTS:
        raise InvalidOptionError(f"bottleneck_placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    if not sites or any(x not in SITES for x in sites):
        raise InvalidOptionError(f"bottleneck_sites={sites!r} must name some of {', '.join(SITES)}")
    if dpo_reference not in DPO_REFERENCES:
        raise InvalidOptionError(f"dpo_reference={dpo_reference!r} is not one of {', '.join(DPO_REFERENCES)}")


def sequences_per_example(objective: str, rl_samples: int, responses: int = 2) -> int:
    """Sequences one example puts through the model: its ``responses`` answers, each once (DPO, reward: a pair
    is 2, a ranking of K answers K), K samples (online RL)."""
    return {"sft": 1, "reward": responses, "dpo": responses, "online_rl": rl_samples}[objective]


#: bytes per (better, worse) pair: the batch's chosen / rejected row indices (int64) and margin (fp32), alive
#: through the step; and the live peak of the pair-level loss (forward + backward: gathered log-probs or scores
#: in fp32, token counts, the per-pair losses), measured with `llmtune.models.live_memory.LivePeak` on 2M pairs
PAIR_BATCH_BYTES = 20
PAIR_LOSS_BYTES = {"dpo": 60, "reward": 28}


def pair_terms(objective: str, examples: int, responses: int) -> tuple[dict[str, int], dict[str, int]]:
    """(terms of every phase, terms of the loss phases) of the K(K-1)/2 pairs of ``examples`` rankings of
    ``responses`` answers (no ties: the most pairs such a ranking can make); none outside dpo / reward."""
    if objective not in PAIR_LOSS_BYTES:
        return {}, {}
    pairs = examples * responses * (responses - 1) // 2
    return {"pair_indices": PAIR_BATCH_BYTES * pairs}, {"pair_loss": PAIR_LOSS_BYTES[objective] * pairs}


def reference_pass_terms(spec: ModelSpec, act: int, tokens: int) -> dict[str, int]:
    """A no-grad forward of the reference policy (DPO, KL-regularised RL): one layer's temporaries and its
    logits, which are reduced to per-token log-probabilities before the policy forward starts."""
    f = spec.experts_per_token * spec.moe_intermediate_size if spec.is_moe else spec.intermediate_size
    return {"reference_layer_temporaries": (3 * act * f + 2 * act * spec.hidden_size) * tokens,
            "reference_logits": act * spec.vocab_size * tokens}


def generation_terms(spec: ModelSpec, act: int, sequences: int, seq_len: int) -> dict[str, int]:
    """Sampling the completions (online RL) with transformers' generate: the KV cache of every sequence at full
    length, and the last step's logits upcast to fp32 plus the sampler's probabilities."""
    kv = 2 * spec.num_layers * spec.kv_dim * act * sequences * seq_len
    return {"generation_kv_cache": kv, "generation_logits": sequences * spec.vocab_size * (act + 8)}
