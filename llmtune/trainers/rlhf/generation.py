"""Where online RL's samples come from: a `Generator` turns prompts into K completions per prompt.

The online objectives (``rloo``, ``grpo``) call a generator once per micro-batch, then score and train on what
it returned; the policy step never depends on how the tokens were produced. Two backends:

* `HFGenerator` (``generator="hf"``, the default): the policy's own ``generate`` with the KV cache, left-padded,
  one call for the whole micro-batch (`llmtune.trainers.rlhf.online.sample`). The samples come from the current
  weights, so there is nothing to synchronise.
* `VLLMGenerator` (``generator="vllm"``): a vLLM engine in the same process (TRL's ``vllm_mode="colocate"``),
  which holds its own copy of the weights and a KV-cache pool sized by ``gpu_memory_utilization``. Before each
  generation the policy's weights (the adapter merged in) are pushed into the engine (`sync_weights`), then
  ``LLM.generate`` samples ``n=K`` completions per prompt from token ids. vLLM runs on Linux with a CUDA GPU only;
  this backend is written against vLLM's public ``LLM`` / ``SamplingParams`` API and is **not exercised by
  llmtune's tests** (no GPU here): the tests check the seam (the protocol, the selection, the error without
  vLLM). `llmtune.memory.estimate_training(objective="online_rl", generator="vllm", ...)` sizes the colocated engine.

A third-party generator is any object with `generate(model, prompts, ...)` and `sync_weights(model)`, passed as
``generator=`` to the online trainers in Python.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from llmtune.core.errors import InvalidOptionError, MissingDependencyError

GENERATORS = ("hf", "vllm")


@runtime_checkable
class Generator(Protocol):
    """Samples completions for online RL."""

    def sync_weights(self, model: Any) -> None:
        """Make the next `generate` sample from ``model``'s current weights (a no-op when it uses them directly)."""

    def generate(self, model: Any, prompts: Sequence[Sequence[int]], *, k: int, pad_id: int,
                 stop_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0) -> list[list[int]]:
        """K completions per prompt (prompt-major: all K of prompt 0 first), each cut after its first stop token."""
        ...


class HFGenerator:
    """transformers ``generate`` on the policy itself, with the KV cache."""

    def sync_weights(self, model: Any) -> None:
        return None

    def generate(self, model: Any, prompts: Sequence[Sequence[int]], *, k: int, pad_id: int,
                 stop_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0) -> list[list[int]]:
        from llmtune.trainers.rlhf.online import sample

        return sample(model, prompts, k=k, pad_id=pad_id, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                      temperature=temperature)


class VLLMGenerator:
    """A colocated vLLM engine (``vllm.LLM``) that samples from token ids; weights pushed before each call.

    ``model_path``: what the engine loads first (the base model's directory or hub id); ``engine`` options go to
    ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``, ``tensor_parallel_size``, ``dtype``, ...).
    """

    def __init__(self, model_path: str, **engine: Any) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise MissingDependencyError("generator 'vllm' needs vLLM (Linux + CUDA GPU): pip install vllm; or use "
                                         "generator='hf' (transformers generate with the KV cache)")
        from vllm import LLM  # pragma: no cover - needs vLLM and a GPU

        self.llm = LLM(model=model_path, **{"enable_prefix_caching": True, **engine})  # pragma: no cover

    def sync_weights(self, model: Any) -> None:  # pragma: no cover - needs vLLM and a GPU
        """Load the policy's weights (PEFT adapter merged, PEFT prefixes removed) into the engine's model."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model  # as TRL's colocate mode
        for name, tensor in merged_state_dict(model).items():
            engine_model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()

    def generate(self, model: Any, prompts: Sequence[Sequence[int]], *, k: int, pad_id: int,
                 stop_ids: Sequence[int], max_new_tokens: int,
                 temperature: float = 1.0) -> list[list[int]]:  # pragma: no cover - needs vLLM and a GPU
        from vllm import SamplingParams

        params = SamplingParams(n=k, temperature=temperature, max_tokens=max_new_tokens,
                                stop_token_ids=list(stop_ids), include_stop_str_in_output=True)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [list(c.token_ids) or [pad_id] for out in outs for c in out.outputs]


def merged_state_dict(model: Any) -> dict[str, Any]:
    """The policy's weights as the base architecture names them: a PEFT model's adapter merged in (then unmerged)."""
    if not hasattr(model, "merge_adapter"):
        return dict(model.state_dict())
    model.merge_adapter()
    try:
        out = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name or "modules_to_save" in name or ".original_module." in name:
                continue
            out[name.replace("base_model.model.", "", 1).replace(".base_layer", "")] = tensor.detach().clone()
        return out
    finally:
        model.unmerge_adapter()


def make_generator(kind: str | Generator, *, model_path: str | None = None,
                   vllm: Mapping[str, Any] | None = None) -> Generator:
    """The generator an online trainer samples with: ``"hf"``, ``"vllm"`` (engine options ``vllm``) or an object."""
    if not isinstance(kind, str):
        if not isinstance(kind, Generator):
            raise InvalidOptionError(f"generator {kind!r} has no generate(model, prompts, ...) / sync_weights(model)",
                                     field="generator")
        return kind
    if kind not in GENERATORS:
        raise InvalidOptionError(f"generator must be one of {', '.join(GENERATORS)} or a Generator object, got "
                                 f"{kind!r}", field="generator")
    if kind == "hf":
        return HFGenerator()
    if model_path is None:
        raise InvalidOptionError("generator 'vllm' loads the model from a path or hub id: pass the model as one",
                                 field="generator")
    return VLLMGenerator(model_path, **dict(vllm or {}))


__all__ = ["GENERATORS", "Generator", "HFGenerator", "VLLMGenerator", "make_generator", "merged_state_dict"]
