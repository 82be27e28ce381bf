"""Full fine-tuning (and pretraining): every weight trains; the result is the whole model (``OUT/model``).

The weights stay in fp32 (the master copy) whatever the precision: ``precision="bf16"`` computes in bf16
under autocast, the optimizer updates the fp32 weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from llmtune.core.errors import ConfigError
from llmtune.trainers.methods.base import Method


class Full(Method):
    """Every parameter of the model trains."""

    name: ClassVar[str] = "full"
    adapter: ClassVar[bool] = False
    quantized_base: ClassVar[bool] = False
    master_fp32: ClassVar[bool] = True

    def apply(self, model: Any, options: Any) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def load_weights(self, model: Any, path: Path) -> None:
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"checkpoint model {path} has no *.safetensors weights")
        state: dict[str, Any] = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        loaded = {p.data_ptr() for name, p in model.named_parameters() if name in state}
        params = dict(model.named_parameters())
        untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
        if unexpected or untied:
            raise ConfigError(f"checkpoint model {path} does not fit this model: missing {untied[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")
