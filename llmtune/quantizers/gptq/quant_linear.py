"""`QuantLinear`: a linear layer stored in the standard GPTQ packed layout, run in plain torch (CPU or CUDA).

Each forward unpacks the int32 words, dequantizes ``scales[g_idx] * (q - zeros[g_idx])`` and multiplies:
no cache, no custom kernel, so it runs wherever torch runs and its memory is the packed size between calls.
"""

from __future__ import annotations

import torch
from torch import nn

from llmtune.core.errors import InvalidOptionError
from llmtune.quantizers.gptq.algorithm import QuantResult, n_groups
from llmtune.quantizers.gptq.packing import (
    CHECKPOINT_FORMATS,
    SUPPORTED_BITS,
    pack_rows,
    pack_zeros,
    unpack_rows,
    unpack_zeros,
)


class QuantLinear(nn.Module):
    """A GPTQ-packed linear layer: buffers ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (and ``bias``)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        bias: bool,
        checkpoint_format: str = "gptq",
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise InvalidOptionError(f"QuantLinear: bits={bits} is not one of {SUPPORTED_BITS}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise InvalidOptionError(f"QuantLinear: checkpoint_format={checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}")
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise InvalidOptionError(
                f"QuantLinear: in_features*bits={in_features * bits} and out_features*bits="
                f"{out_features * bits} must be multiples of 32 for the GPTQ int32 layout"
            )
        if group_size != -1 and group_size <= 0:
            raise InvalidOptionError(f"QuantLinear: group_size={group_size} must be positive, or -1")
        gs = in_features if group_size == -1 else group_size
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        groups = n_groups(in_features, group_size)  # ceil: a partial last group when gs does not divide
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", (torch.arange(in_features, device=device) // gs).to(torch.int32))
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_result(cls, linear: nn.Linear, result: QuantResult, checkpoint_format: str = "gptq") -> QuantLinear:
        """Pack a solver result for ``linear`` (its bias is kept, in float16 like GPTQ checkpoints)."""
        out_f, in_f = linear.weight.shape
        layer = cls(in_f, out_f, bits=result.bits, group_size=result.group_size, bias=linear.bias is not None,
                    checkpoint_format=checkpoint_format, device=linear.weight.device)
        layer.qweight.copy_(pack_rows(result.codes.t().contiguous(), result.bits))
        layer.qzeros.copy_(pack_zeros(result.zeros.t().contiguous(), result.bits, checkpoint_format))
        layer.scales.copy_(result.scales.t().to(torch.float16))
        layer.g_idx.copy_(result.g_idx)
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.copy_(linear.bias.detach().to(layer.bias.dtype))
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[out, in]`` these buffers encode."""
        codes = unpack_rows(self.qweight, self.bits)  # [in, out]
        zeros = unpack_zeros(self.qzeros, self.bits, self.checkpoint_format)  # [groups, out]
        g = self.g_idx.long()
        w = self.scales.float()[g] * (codes - zeros[g]).float()
        return w.t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ + b`` with W dequantized on the fly, in ``x``'s dtype."""
        w = self.dequantize(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}")
