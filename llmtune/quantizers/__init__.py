"""Quantizers: bitsandbytes NF4/FP4/INT8, our own GPTQ and RTN, and delegating GPTQ backends.

This module only *declares* the built-in backends; each is imported when first used.
"""

from llmtune.core.registry import declare

_TORCH = ("torch", "transformers")
for _name in ("nf4", "fp4", "int8"):
    declare("quantizer", _name, "bnb", f"llmtune.quantizers.bnb:{_name.upper()}Quantizer",
            requires=(*_TORCH, "bitsandbytes"), extra="bnb", default=True)
declare("quantizer", "gptq", "llmtune", "llmtune.quantizers.gptq:GPTQQuantizer", requires=_TORCH,
        extra="peft", default=True)
declare("quantizer", "gptq", "gptqmodel", "llmtune.quantizers.gptq.delegates:GPTQModelQuantizer",
        requires=(*_TORCH, "gptqmodel"), extra="gptq")
# auto-gptq: no module requirement, so its unavailable_reason (dead, breaks on transformers>=5) is shown.
declare("quantizer", "gptq", "auto-gptq", "llmtune.quantizers.gptq.delegates:AutoGPTQQuantizer",
        requires=_TORCH, extra=None)
declare("quantizer", "rtn", "llmtune", "llmtune.quantizers.gptq:RTNQuantizer", requires=_TORCH,
        extra="peft", default=True)
