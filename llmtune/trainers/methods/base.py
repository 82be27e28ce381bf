"""The `Method` unit (which parameters train, how they are saved) and `PeftMethod` for methods PEFT provides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from llmtune.core.errors import ConfigError


class Method:
    """Which parameters of a loaded (frozen) base model train, and how they are written and read back.

    ``adapter``: True when the result is an adapter (PEFT format, ``OUT/adapter``); False when it is the
    whole model (``OUT/model``). ``quantized_base``: whether it can train on a quantized base (QLoRA-style).
    """

    name: ClassVar[str] = ""
    adapter: ClassVar[bool] = True
    quantized_base: ClassVar[bool] = True
    #: keep the weights in fp32 under mixed precision (the optimizer updates the master copy)
    master_fp32: ClassVar[bool] = False
    #: can train on packed examples (False for soft prompts: every packed example would share the virtual tokens)
    packing: ClassVar[bool] = True

    @property
    def output_name(self) -> str:
        """The directory name of what it saves, in the output directory and in each checkpoint."""
        return "adapter" if self.adapter else "model"

    def apply(self, model: Any, options: Any) -> Any:
        """Make the trainable parameters trainable; return the model to train (maybe a wrapper)."""
        raise NotImplementedError

    def save(self, model: Any, path: Path) -> None:
        """Write what this method trains to the directory ``path`` (safetensors)."""
        model.save_pretrained(str(path), safe_serialization=True)

    def load_weights(self, model: Any, path: Path) -> None:
        """Load what `save` wrote into ``model`` (as returned by `apply`), for exact resume."""
        raise NotImplementedError


class PeftMethod(Method):
    """A method PEFT implements: `peft_config` is all a new one needs."""

    def peft_config(self, options: Any) -> Any:
        raise NotImplementedError

    def apply(self, model: Any, options: Any) -> Any:
        import warnings

        from peft import get_peft_model

        try:
            with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                        category=FutureWarning)
                return get_peft_model(model, self.peft_config(options))
        except ValueError as exc:
            raise ConfigError(f"could not apply {self.name} to {type(model).__name__}: {exc}") from exc

    def load_weights(self, model: Any, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(path / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ConfigError(f"checkpoint adapter {path} does not fit this model: unexpected {unexpected[:5]}")
