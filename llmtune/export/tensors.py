"""Where the exported tensors come from, one at a time: a model in memory, or safetensors files streamed.

`StreamedTensors` reads the base model's safetensors files tensor by tensor (memory-mapped) and folds a LoRA
adapter into each weight as it is read, ``W + (B @ A) * scaling`` in float32 in PEFT's order of operations (so
the result is bit-equal to PEFT's ``merge_and_unload``): the export never holds more than one weight and its
LoRA pair. Adapters it cannot fold that way (DoRA, rank/alpha patterns, LoRA on embeddings, saved modules,
biases) and QLoRA runs (merged into the dequantized base) go through `ModelTensors` on the merged model instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmtune.export.source import ExportError, Source


class Tensors(Protocol):
    """HF-named float32 tensors and the ``config.json`` they belong to."""

    hparams: dict[str, Any]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, in file order (nothing loaded)."""

    def load(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float32 array (merged with its LoRA pair, if any)."""


class ModelTensors:
    """The state dict of a model already in memory (e.g. merged into a dequantized QLoRA base)."""

    def __init__(self, model: Any, hparams: dict[str, Any]) -> None:
        self.hparams = hparams
        self._state = model.state_dict()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._state.items()}

    def load(self, name: str) -> np.ndarray:
        return np.asarray(self._state[name].detach().float().cpu().numpy())


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def lora_scaling(adapter_config: dict[str, Any], rank: int) -> float:
    """PEFT's ``scaling``: ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``)."""
    alpha = float(adapter_config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def why_not_streamed(source: Source) -> str | None:
    """Why ``source`` must be merged in memory (None: it can be streamed)."""
    base = Path(source.base).expanduser()
    if not base.is_dir() or not _safetensors_files(base):
        return f"the base {source.base} is not a local directory of safetensors files"
    if source.adapter_dir is None:
        return None
    if source.quantizer is not None:
        return "a QLoRA run is merged into its dequantized base"
    cfg = source.adapter_config
    if cfg.get("peft_type") not in (None, "LORA"):
        return f"a {cfg.get('peft_type')} adapter"
    for key, what in (("use_dora", "DoRA"), ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern"),
                      ("modules_to_save", "modules_to_save"), ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(key):
            return f"the adapter uses {what}"
    if not (source.adapter_dir / "adapter_model.safetensors").is_file():
        return "the adapter has no adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(source.adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        odd = [k for k in f.keys() if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    return f"the adapter holds {odd[0]} (not a LoRA A/B pair)" if odd else None


class StreamedTensors:
    """The base model's safetensors, read one tensor at a time, with a LoRA adapter folded in on the way."""

    def __init__(self, source: Source) -> None:
        from safetensors import safe_open

        self._dir = Path(source.base).expanduser()
        self.hparams = json.loads((self._dir / "config.json").read_text())
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for path in _safetensors_files(self._dir):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    self._where[key] = path
                    self._shape[key] = tuple(f.get_slice(key).get_shape())
        self._lora: dict[str, str] = {}
        self._config = source.adapter_config
        if source.adapter_dir is not None:
            self._adapter = source.adapter_dir / "adapter_model.safetensors"
            with safe_open(str(self._adapter), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(".lora_A.weight"):
                        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                        if f"{module}.weight" not in self._where:
                            raise ExportError(f"{self._adapter}: {key} has no base weight {module}.weight in "
                                              f"{self._dir}; is --base the model the adapter was trained on?")
                        self._lora[f"{module}.weight"] = key.removesuffix(".lora_A.weight")
        if self.hparams.get("tie_word_embeddings") and "lm_head.weight" in self._lora:
            raise ExportError("the adapter trains lm_head while it is tied to the embeddings; export it with "
                              "--format hf (a tied LoRA'd head cannot be streamed)")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shape)

    def load(self, name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as f:
            weight = f.get_tensor(name).float()
        if name in self._lora:
            prefix = self._lora[name]
            with safe_open(str(self._adapter), framework="pt") as f:
                a = f.get_tensor(f"{prefix}.lora_A.weight").float()
                b = f.get_tensor(f"{prefix}.lora_B.weight").float()
            with torch.no_grad():
                weight += (b @ a) * lora_scaling(self._config, int(a.shape[0]))
        return np.asarray(weight.numpy())
