"""PEFT's other methods, with typed and validated options: LoRA variants, IA3, prefix tuning, LoRA+.

PEFT does the work; this module only turns llmtune's options into PEFT configs (and says no, with a typed
error, to combinations that cannot work):

* `LoraVariantOptions` — LoRA / DoRA with ``rslora`` (scaling ``alpha / sqrt(r)`` instead of ``alpha / r``,
  Kalajdzievski 2023), and the initialisations ``pissa`` (principal singular vectors of W; the residual stays
  in the base, so step 0 equals the base, Meng et al. 2024), ``olora`` (QR of W, Büyükakyüz 2024) and
  ``loftq`` (alternating quantize/SVD so that ``Q + s·BA ≈ W`` for a quantized base, Li et al. 2023);
* `IA3Options` — learned rescaling vectors of keys, values and the MLP input of ``down_proj`` (Liu et al. 2022);
* `PrefixTuningOptions` — per-layer trainable key/value prefixes (Li & Liang 2021);
* `loraplus_optimizer` — LoRA+ (Hayou et al. 2024): the B matrices learn ``ratio`` times faster than A.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmtune.core.errors import ConfigError, GPURequiredError, InvalidOptionError
from llmtune.core.options import check_choice, check_type

LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
#: modules IA3 scales on Llama-like models (PEFT's defaults for llama/mistral/qwen2)
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


def _names(field: str, value: Any) -> tuple[str, ...] | str:
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, tuple) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise InvalidOptionError(f"option {field}={value!r} must be 'all-linear' or a non-empty list of module names")


def _positive_int(field: str, value: Any) -> None:
    check_type(field, value, int)
    if value < 1:
        raise InvalidOptionError(f"option {field}={value!r} must be > 0")


@dataclasses.dataclass(frozen=True)
class LoraVariantOptions:
    """LoRA with rsLoRA scaling and a choice of initialisation (PiSSA, OLoRA, LoftQ)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str | tuple[str, ...] = "all-linear"
    rslora: bool = False                    #: scaling alpha/sqrt(rank) instead of alpha/rank
    init: str = "default"                   #: "default", "gaussian", "pissa", "olora" or "loftq"
    pissa_niter: int = 0                    #: > 0: fast randomized SVD with this many subspace iterations
    loftq_bits: int = 4                     #: LoftQ: bits of the quantized base it compensates
    loftq_iter: int = 1                     #: LoftQ: alternating quantize / SVD iterations
    dora: bool = False

    def __post_init__(self) -> None:
        _positive_int("rank", self.rank)
        check_type("alpha", self.alpha, (int, float))
        if self.alpha <= 0:
            raise InvalidOptionError(f"option alpha={self.alpha!r} must be > 0")
        check_type("dropout", self.dropout, (int, float))
        if not 0 <= self.dropout < 1:
            raise InvalidOptionError(f"option dropout={self.dropout!r} must be in [0, 1)")
        object.__setattr__(self, "targets", _names("targets", self.targets))
        check_type("rslora", self.rslora, bool)
        check_choice("init", self.init, LORA_INITS)
        check_type("pissa_niter", self.pissa_niter, int)
        if self.pissa_niter < 0 or (self.pissa_niter and self.init != "pissa"):
            raise InvalidOptionError(f"option pissa_niter={self.pissa_niter!r} must be >= 0 and only with init='pissa'")
        check_choice("loftq_bits", self.loftq_bits, (2, 4, 8))
        _positive_int("loftq_iter", self.loftq_iter)
        check_type("dora", self.dora, bool)
        if self.dora and self.init == "loftq":
            raise InvalidOptionError("option init='loftq' does not combine with dora=True (PEFT supports neither)")

    @property
    def scaling(self) -> float:
        """The factor s in ``W + s·BA``: ``alpha/sqrt(rank)`` with rslora, else ``alpha/rank``."""
        return float(self.alpha) / (self.rank ** 0.5 if self.rslora else self.rank)

    def peft_config(self) -> Any:
        """The PEFT ``LoraConfig``."""
        from peft import LoftQConfig, LoraConfig, TaskType

        init: Any = {"default": True, "gaussian": "gaussian", "olora": "olora", "loftq": "loftq"}.get(self.init)
        if self.init == "pissa":
            init = f"pissa_niter_{self.pissa_niter}" if self.pissa_niter else "pissa"
        extra: dict[str, Any] = {}
        if self.init == "loftq":
            import torch

            if not torch.cuda.is_available():
                raise GPURequiredError("init='loftq' needs a CUDA GPU: PEFT's LoftQ (peft.utils.loftq_utils) runs its "
                                       "quantize/SVD alternation on 'cuda'")
            extra["loftq_config"] = LoftQConfig(loftq_bits=self.loftq_bits, loftq_iter=self.loftq_iter)
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=self.rank, lora_alpha=self.alpha,  # type: ignore[arg-type]
                          lora_dropout=self.dropout, target_modules=targets, use_rslora=self.rslora,
                          init_lora_weights=init, use_dora=self.dora, **extra)


@dataclasses.dataclass(frozen=True)
class IA3Options:
    """(IA)^3: one learned vector per target module; ``feedforward`` modules scale their input, others output."""

    targets: tuple[str, ...] = IA3_TARGETS
    feedforward: tuple[str, ...] = IA3_FEEDFORWARD

    def __post_init__(self) -> None:
        for field in ("targets", "feedforward"):
            value = getattr(self, field)
            value = tuple(value) if isinstance(value, list) else value
            if not (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)) or \
                    (field == "targets" and not value):
                raise InvalidOptionError(f"option {field}={value!r} must be a list of module names")
            object.__setattr__(self, field, value)
        stray = [m for m in self.feedforward if m not in self.targets]
        if stray:
            raise InvalidOptionError(f"option feedforward={list(self.feedforward)!r}: {stray} are not in targets")

    def peft_config(self) -> Any:
        from peft import IA3Config, TaskType

        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(self.targets),
                         feedforward_modules=list(self.feedforward))


@dataclasses.dataclass(frozen=True)
class PrefixTuningOptions:
    """Prefix tuning: ``num_virtual_tokens`` trainable keys/values per layer (optionally through an MLP)."""

    num_virtual_tokens: int = 20
    projection: bool = False                #: reparameterise the prefixes through a 2-layer MLP (the paper's trick)
    projection_hidden: int = 512            #: that MLP's hidden width

    def __post_init__(self) -> None:
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        check_type("projection", self.projection, bool)
        _positive_int("projection_hidden", self.projection_hidden)

    def peft_config(self) -> Any:
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.num_virtual_tokens,
                                  prefix_projection=self.projection, encoder_hidden_size=self.projection_hidden)


def check_quantized_base(init: str, quantized: bool) -> None:
    """PiSSA / OLoRA decompose W itself, which a 4-bit base no longer has; LoftQ exists for quantized bases."""
    if quantized and init in ("pissa", "olora"):
        raise ConfigError(f"init={init!r} rewrites the base weights from their SVD/QR, which a quantized base "
                          "cannot hold; use init='loftq' for a quantized base, or train unquantized")


def loraplus_optimizer(model: Any, *, lr: float, ratio: float, weight_decay: float = 0.0) -> Any:
    """AdamW with LoRA+ groups: ``lora_B`` (and 1-D adapter params) at ``lr·ratio``, ``lora_A`` at ``lr`` (PEFT's rule).

    The recipe does the same for any optimizer name (`llmtune.trainers._optim.loraplus_groups`).
    """
    from llmtune.trainers._optim import build_optimizer, loraplus_groups

    check_type("loraplus_ratio", ratio, (int, float))
    if ratio < 1:
        raise InvalidOptionError(f"option loraplus_ratio={ratio!r} must be >= 1 (B learns faster than A)")
    groups = loraplus_groups(model, lr=lr, ratio=ratio, weight_decay=weight_decay)
    return build_optimizer("adamw", groups, lr=lr, weight_decay=weight_decay)
