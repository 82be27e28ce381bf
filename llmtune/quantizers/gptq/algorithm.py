"""The GPTQ solver (Frantar et al. 2022, arXiv 2210.17323) and round-to-nearest, on one weight matrix.

Both return a `QuantResult`: integer codes, per-group scales and zero points, and ``g_idx``, which is
exactly what `QuantLinear` packs. Scales are rounded to float16 *before* they are used, so the weights the
solver's error feedback sees are bit-for-bit the weights the packed layer dequantizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.quantizers.gptq.packing import SUPPORTED_BITS


@dataclasses.dataclass
class QuantResult:
    """One quantized weight ``[out, in]``: ``weight ≈ scales[:, g_idx] * (codes - zeros[:, g_idx])``."""

    codes: torch.Tensor  # int32 [out, in], values in [0, 2**bits)
    scales: torch.Tensor  # float32 [out, groups] (values exactly representable in float16)
    zeros: torch.Tensor  # int32 [out, groups]
    g_idx: torch.Tensor  # int32 [in]: group of each input column
    bits: int
    group_size: int
    loss: float = 0.0  # GPTQ's objective sum (w-q)^2 / Hinv_ii^2 / 2 (0 for RTN)
    damp_percent: float = 0.0  # the damping finally used (raised when Cholesky failed)
    #: float32 [out]: each row's share of ``loss`` (GPTQ only; what `split_rows` divides ``loss`` by).
    row_loss: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` the codes stand for."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes - self.zeros[:, g]).to(self.scales.dtype)

    def split_rows(self, sizes: list[int]) -> list[QuantResult]:
        """The results of weights stacked along the output dim (one solve shared a Hessian), one per weight."""
        out, start = [], 0
        for n in sizes:
            rows = slice(start, start + n)
            row_loss = self.row_loss[rows] if self.row_loss is not None else None
            out.append(dataclasses.replace(
                self, codes=self.codes[rows], scales=self.scales[rows], zeros=self.zeros[rows],
                loss=float(row_loss.sum()) if row_loss is not None else 0.0, row_loss=row_loss))
            start += n
        return out


def n_groups(in_features: int, group_size: int) -> int:
    """Groups of one row: ``ceil(in_features / group_size)`` (the last one partial when it does not divide)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def check_bits_and_group(bits: int, group_size: int, in_features: int, where: str = "weight") -> None:
    """Raise `InvalidOptionError` when ``bits`` or ``group_size`` cannot be used for a layer.

    A ``group_size`` that does not divide ``in_features`` is allowed: the last group is partial (what the GPTQ
    format's ``g_idx`` and ``ceil(in / group_size)`` rows of ``scales``/``qzeros`` express).
    """
    if bits not in SUPPORTED_BITS:
        raise InvalidOptionError(f"{where}: bits={bits} is not one of {SUPPORTED_BITS}")
    if group_size != -1 and group_size <= 0:
        raise InvalidOptionError(f"{where}: group_size={group_size} must be positive, or -1 (one group per row)")


def grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max affine grid of ``x`` ``[rows, cols]``: (scale, zero) ``[rows]``, as IST-DASLab's Quantizer."""
    maxq = 2**bits - 1
    zero_t = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    xmin = torch.minimum(x.min(1).values, zero_t)
    xmax = torch.maximum(x.max(1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    # Store-exact: the checkpoint keeps float16 scales, so quantize with exactly those.
    scale = scale.to(torch.float16).to(x.dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)  # fp16 underflow guard
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes of ``w`` on the grid (scale, zero) (broadcast along the last dim of ``w``'s rows)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> QuantResult:
    """Round-to-nearest: each group of ``group_size`` input columns gets its own min/max grid per output row."""
    w = weight.detach().to(torch.float32)
    out_f, in_f = w.shape
    check_bits_and_group(bits, group_size, in_f)
    gs = in_f if group_size == -1 else group_size
    groups = n_groups(in_f, group_size)
    # A partial last group is padded with zeros, which leave the grid alone (its range always contains 0).
    wp = torch.nn.functional.pad(w, (0, groups * gs - in_f))
    wg = wp.reshape(out_f, groups, gs).permute(1, 0, 2).reshape(groups * out_f, gs)
    scale, zero = grid(wg, bits, sym)
    codes = quantize_codes(wg, scale[:, None], zero[:, None], bits)
    codes = codes.reshape(groups, out_f, gs).permute(1, 0, 2).reshape(out_f, groups * gs)[:, :in_f]
    return QuantResult(
        codes=codes.contiguous().to(torch.int32),
        scales=scale.reshape(groups, out_f).t().contiguous(),
        zeros=zero.reshape(groups, out_f).t().contiguous().to(torch.int32),
        g_idx=(torch.arange(in_f, device=w.device) // gs).to(torch.int32),
        bits=bits,
        group_size=group_size,
    )


class GPTQ:
    """Accumulates the Hessian ``H = 2 X Xᵀ / n`` of one linear layer's inputs, then quantizes its weight."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.columns = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Add the inputs ``[..., in]`` of one forward call; each row (token) is one sample."""
        x = inp.detach().reshape(-1, inp.shape[-1]).to(device=self.H.device, dtype=torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        # Running mean of 2 x xᵀ over all tokens seen so far.
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.t() @ x

    def quantize(
        self,
        weight: torch.Tensor,
        *,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        act_order: bool = False,
        static_groups: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
    ) -> QuantResult:
        """Quantize ``weight`` ``[out, in]`` column by column, spreading each rounding error over the rest."""
        with _few_threads(weight.numel(), self.H.device):
            return self._quantize(weight, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                                  static_groups=static_groups, damp_percent=damp_percent, block_size=block_size)

    def _quantize(self, weight: torch.Tensor, *, bits: int, group_size: int, sym: bool, act_order: bool,
                  static_groups: bool, damp_percent: float, block_size: int) -> QuantResult:
        if self.nsamples == 0:
            raise ConfigError("GPTQ needs calibration inputs: add_batch was never called with any token")
        W = weight.detach().to(device=self.H.device, dtype=torch.float32).clone()
        rows, cols = W.shape
        if cols != self.columns:
            raise InvalidOptionError(f"weight has {cols} input columns, the Hessian was built for {self.columns}")
        check_bits_and_group(bits, group_size, cols)
        maxq = 2**bits - 1
        H = self.H.clone()

        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        gs = cols if group_size == -1 else group_size
        if group_size == -1:
            scale, zero = grid(W, bits, sym)
            g_scales, g_zeros = [scale], [zero]
        static: list[tuple[torch.Tensor, torch.Tensor]] = []
        if static_groups and group_size != -1:
            static = [grid(W[:, i:i + gs], bits, sym) for i in range(0, cols, gs)]

        perm = invperm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
            invperm = torch.argsort(perm)

        Hinv, used_damp = _inverse_cholesky(H, damp_percent)

        codes = torch.zeros_like(W)
        losses = torch.zeros(rows, device=W.device)
        col_group = torch.zeros(cols, dtype=torch.long, device=W.device)  # group of (permuted) column i
        if group_size != -1 and not static_groups:
            g_scales, g_zeros = [], []

        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            C1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            for i in range(count):
                col = i1 + i
                w = W1[:, i]
                d = Hinv1[i, i]
                if group_size != -1:
                    if static_groups:
                        orig = int(perm[col]) if perm is not None else col
                        g = orig // gs
                        scale, zero = static[g]
                    else:
                        g = col // gs
                        if col % gs == 0:  # a fresh grid from the current, error-updated weights
                            current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                            scale, zero = grid(current, bits, sym)
                            g_scales.append(scale)
                            g_zeros.append(zero)
                    col_group[col] = g
                c = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
                q = scale * (c - zero)
                C1[:, i] = c
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err1

            codes[:, i1:i2] = C1
            losses += torch.sum(Losses1, 1) / 2
            W[:, i1:i2] = W1  # keep the error-updated columns (later groups' grids read them)
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if static_groups and group_size != -1:
            g_scales = [s for s, _ in static]
            g_zeros = [z for _, z in static]
        if perm is not None:
            assert invperm is not None
            codes = codes[:, invperm]
            col_group = col_group[invperm]
        if group_size == -1:
            col_group = torch.zeros(cols, dtype=torch.long, device=W.device)
        return QuantResult(
            codes=codes.to(torch.int32),
            scales=torch.stack(g_scales, dim=1),
            zeros=torch.stack(g_zeros, dim=1).to(torch.int32),
            g_idx=col_group.to(torch.int32),
            bits=bits,
            group_size=group_size,
            loss=float(losses.sum()),
            damp_percent=used_damp,
            row_loss=losses,
        )


@contextlib.contextmanager
def _few_threads(numel: int, device: torch.device) -> Iterator[None]:
    """One CPU thread for small layers: the column loop is many tiny ops, where threads only add overhead."""
    if torch.device(device).type != "cpu" or numel > 1 << 20 or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``; raises damping on failure."""
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    idx = torch.arange(H.shape[0], device=H.device)
    while True:
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, damp
        if damp >= 1.0:
            raise ConfigError(
                f"GPTQ: the Hessian is not positive definite even with damp_percent={damp:.2f}; "
                "use more (or more varied) calibration data"
            )
        damp = min(1.0, damp + 0.01)  # GPTQModel's auto-increment
