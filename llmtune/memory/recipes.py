"""Training loops as data: what each recipe does that changes memory, in one table of facts (stdlib only).

``estimate_training(recipe=...)`` takes a name from `RECIPE_FACTS` or a `Recipe` (a variant made with
``dataclasses.replace``, e.g. the llmtune trainer with ``upcast_embeddings=True``). Every recipe-specific
term of the estimate reads one of these fields; there is no per-recipe branch in the estimator.
"""

from __future__ import annotations

import dataclasses

#: How the loss is computed: all logits upcast to fp32 (transformers' ``ForCausalLMLoss``), chunks of rows
#: recomputed in backward (llmtune), or never materialised (Unsloth's cut cross-entropy).
LOSSES = ("full_fp32", "chunked", "cut")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The memory-relevant facts of one training loop."""

    name: str
    #: PEFT keeps adapter weights in fp32 and casts each wrapped module's input to fp32 (a copy per module);
    #: False: adapters in the activation dtype, no copies (Unsloth).
    adapter_fp32: bool
    #: Fused Triton kernels (Unsloth): RMSNorm saves input + 1/rms, SwiGLU saves gate and up only.
    fused_kernels: bool
    loss: str
    #: The loop keeps the model output (with its logits) alive through backward, the optimizer step and into
    #: the next forward (``out = model(...); out.loss.backward()`` in the reference recipe).
    keeps_outputs: bool
    #: QLoRA through PEFT's ``prepare_model_for_kbit_training``: every non-quantized parameter cast to fp32,
    #: so embeddings, norms and hence all activations and logits are fp32.
    kbit_upcast_fp32: bool
    #: Gradient checkpointing offloads each layer's input to CPU RAM (Unsloth's "unsloth" mode).
    offload_checkpoints: bool
    #: FSDP / ZeRO available.
    sharding: bool
    #: QLoRA checkpointing is reentrant: ``prepare_model_for_kbit_training`` passes ``{}`` as checkpointing
    #: kwargs, so ``torch.utils.checkpoint`` falls back to ``use_reentrant=True``. Its backward keeps the
    #: recomputed layer's two residual-stream outputs alive while the layer runs backward (CPU-measured).
    kbit_reentrant_checkpointing: bool = False

    def __post_init__(self) -> None:
        """Reject a loss the estimator does not know."""
        from llmtune.core.errors import InvalidOptionError

        if self.loss not in LOSSES:
            raise InvalidOptionError(f"Recipe {self.name!r}: loss={self.loss!r} is not one of {', '.join(LOSSES)}")


#: The three loops the estimator knows; docs/memory.md gives the source of every fact.
RECIPE_FACTS: dict[str, Recipe] = {
    "hf": Recipe("hf", adapter_fp32=True, fused_kernels=False, loss="full_fp32", keeps_outputs=True,
                 kbit_upcast_fp32=True, offload_checkpoints=False, sharding=True, kbit_reentrant_checkpointing=True),
    "llmtune": Recipe("llmtune", adapter_fp32=True, fused_kernels=False, loss="chunked", keeps_outputs=False,
                      kbit_upcast_fp32=False, offload_checkpoints=False, sharding=True),
    "unsloth": Recipe("unsloth", adapter_fp32=False, fused_kernels=True, loss="cut", keeps_outputs=False,
                      kbit_upcast_fp32=False, offload_checkpoints=True, sharding=False),
}


def resolve_recipe(recipe: str | Recipe) -> Recipe:
    """A `Recipe` from a name in `RECIPE_FACTS` (or the `Recipe` itself)."""
    from llmtune.core.errors import InvalidOptionError, did_you_mean

    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPE_FACTS:
        hint = did_you_mean(recipe, RECIPE_FACTS) if isinstance(recipe, str) else ""
        raise InvalidOptionError(f"recipe={recipe!r} is not one of {', '.join(RECIPE_FACTS)}.{hint}")
    return RECIPE_FACTS[recipe]
