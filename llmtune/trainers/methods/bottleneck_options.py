"""The options of bottleneck adapters (`BottleneckOptions`) and their file names; imports no torch.

The adapters themselves are in `llmtune.trainers.methods.bottleneck`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from llmtune.core.errors import InvalidOptionError
from llmtune.core.options import check_choice, check_type

PLACEMENTS = ("series", "parallel")
SITES = ("attn", "mlp")
NON_LINEARITIES = ("tanh", "relu", "gelu", "silu")
#: decoder-layer child names of each site (llama, mistral, qwen2, qwen3, gemma, phi3 all use these)
SITE_MODULES = {"attn": "self_attn", "mlp": "mlp"}
CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_model.safetensors"
ADAPTER_ATTR = "bottleneck_adapter"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BottleneckOptions:
    """Where and how big the adapters are. Defaults: one series adapter after each MLP (the paper's best)."""

    size: int = 64                          #: bottleneck width b
    placement: str = "series"               #: "series" (reads F(x)) or "parallel" (reads x)
    sites: tuple[str, ...] = ("mlp",)       #: any of "attn", "mlp": after which sub-layers
    non_linearity: str = "tanh"             #: f: "tanh", "relu", "gelu" or "silu"
    scaling: float = 1.0                    #: s
    dropout: float = 0.0                    #: dropout on the adapter's input
    bias: bool = True                       #: biases in W_down and W_up

    def __post_init__(self) -> None:
        check_type("size", self.size, int)
        if self.size < 1:
            raise InvalidOptionError(f"option size={self.size!r} must be > 0")
        check_choice("placement", self.placement, PLACEMENTS)
        sites = self.sites
        if isinstance(sites, str):
            sites = (sites,)
        if isinstance(sites, list):
            sites = tuple(sites)
        if not isinstance(sites, tuple) or not sites:
            raise InvalidOptionError(f"option sites={self.sites!r} must be a non-empty list of 'attn', 'mlp'")
        for site in sites:
            check_choice("sites", site, SITES)
        if len(set(sites)) != len(sites):
            raise InvalidOptionError(f"option sites={self.sites!r} names a site twice")
        object.__setattr__(self, "sites", tuple(s for s in SITES if s in sites))
        check_choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        check_type("scaling", self.scaling, (int, float))
        if not math.isfinite(self.scaling) or self.scaling == 0:
            raise InvalidOptionError(f"option scaling={self.scaling!r} must be finite and non-zero")
        check_type("dropout", self.dropout, (int, float))
        if not 0 <= self.dropout < 1:
            raise InvalidOptionError(f"option dropout={self.dropout!r} must be in [0, 1)")
        check_type("bias", self.bias, bool)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (what `save_bottleneck` writes)."""
        out = dataclasses.asdict(self)
        out["sites"] = list(self.sites)
        return out


def from_trainer_options(options: Any) -> BottleneckOptions:
    """The `BottleneckOptions` of a trainer's options (its ``bottleneck_*`` fields and ``dropout``)."""
    sites = options.bottleneck_sites
    return BottleneckOptions(size=options.bottleneck_size, placement=options.bottleneck_placement,
                             sites=(sites,) if isinstance(sites, str) else tuple(sites),
                             non_linearity=options.bottleneck_non_linearity, scaling=options.bottleneck_scaling,
                             dropout=options.dropout)
