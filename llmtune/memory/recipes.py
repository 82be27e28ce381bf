"""Training loops as data: what each recipe does that changes memory, in one table of facts (stdlib only).

``estimate_training(recipe=...)`` takes a name from `RECIPE_FACTS` or a `Recipe` (a variant made with
``dataclasses.replace``, e.g. the llmtune trainer with ``upcast_embeddings=True``). Every recipe-specific
term of the estimate reads one of these fields; there is no per-recipe branch in the estimator.
"""

from __future__ import annotations

import dataclasses
import re

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
    #: QLoRA checkpointing is reentrant (``prepare_model_for_kbit_training`` before peft 0.22 / transformers
    #: 5.23, see `hf_recipe`). Its backward keeps the recomputed layer's two residual-stream outputs alive while
    #: the layer runs backward (CPU-measured).
    kbit_reentrant_checkpointing: bool = False

    def __post_init__(self) -> None:
        """Reject a loss the estimator does not know."""
        from llmtune.core.errors import InvalidOptionError

        if self.loss not in LOSSES:
            raise InvalidOptionError(f"Recipe {self.name!r}: loss={self.loss!r} is not one of {', '.join(LOSSES)}")


#: ``prepare_model_for_kbit_training`` checkpoints non-reentrantly from peft 0.22 on, and only on transformers >=
#: 5.23: peft 0.22 passes ``None`` as checkpointing kwargs, which ``activation_checkpointing_enable`` (new in 5.23)
#: reads as ``use_reentrant=False``; older transformers read ``None`` as ``use_reentrant=True``, and peft < 0.22
#: passes ``{}``, so ``torch.utils.checkpoint`` falls back to its reentrant default.
NON_REENTRANT_KBIT_SINCE = {"peft": (0, 22), "transformers": (5, 23)}


def hf_recipe(peft_version: str | None = None, transformers_version: str | None = None) -> Recipe:
    """The plain transformers + PEFT + bitsandbytes loop as these library versions run it.

    A version left ``None`` is the installed one (read from its metadata, nothing imported); with the library
    not installed, its newest behaviour. The measured H100 cases of ../shared/memory ran peft 0.21.0 and
    transformers 5.17.0: ``hf_recipe("0.21.0", "5.17.0")``."""
    versions = {"peft": peft_version, "transformers": transformers_version}
    reentrant = False
    for dist, since in NON_REENTRANT_KBIT_SINCE.items():
        version = versions[dist] if versions[dist] is not None else _installed_version(dist)
        reentrant = reentrant or (version is not None and _release(version) < since)
    return Recipe("hf", adapter_fp32=True, fused_kernels=False, loss="full_fp32", keeps_outputs=True,
                  kbit_upcast_fp32=True, offload_checkpoints=False, sharding=True,
                  kbit_reentrant_checkpointing=reentrant)


def _installed_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """``"0.21.2"`` -> ``(0, 21, 2)``; a pre-release or local suffix is ignored (``"0.22.0.dev0"`` -> 0.22.0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


#: The three loops the estimator knows; docs/memory.md gives the source of every fact. ``"hf"`` here is as the
#: newest peft and transformers run it; `resolve_recipe` gives the installed ones' (`hf_recipe`).
RECIPE_FACTS: dict[str, Recipe] = {
    "hf": hf_recipe(*(".".join(map(str, v)) for v in NON_REENTRANT_KBIT_SINCE.values())),
    "llmtune": Recipe("llmtune", adapter_fp32=True, fused_kernels=False, loss="chunked", keeps_outputs=False,
                      kbit_upcast_fp32=False, offload_checkpoints=False, sharding=True),
    "unsloth": Recipe("unsloth", adapter_fp32=False, fused_kernels=True, loss="cut", keeps_outputs=False,
                      kbit_upcast_fp32=False, offload_checkpoints=True, sharding=False),
}


def resolve_recipe(recipe: str | Recipe) -> Recipe:
    """A `Recipe` from a name in `RECIPE_FACTS` (or the `Recipe` itself); ``"hf"`` as the installed peft runs it."""
    from llmtune.core.errors import InvalidOptionError, did_you_mean

    if isinstance(recipe, Recipe):
        return recipe
    if recipe == "hf":
        return hf_recipe()
    if recipe not in RECIPE_FACTS:
        hint = did_you_mean(recipe, RECIPE_FACTS) if isinstance(recipe, str) else ""
        raise InvalidOptionError(f"recipe={recipe!r} is not one of {', '.join(RECIPE_FACTS)}.{hint}")
    return RECIPE_FACTS[recipe]
