"""Kernel paths a test run can force, so a developer on one CPU sees what another CPU would compute.

Which kernel runs depends on the CPU: ATen picks AVX-512 or AVX2 code, NumPy dispatches per feature level,
bitsandbytes takes its AVX512-BF16 path where the CPU has that instruction, and its AVX-512 4-bit kernel
dequantizes rows that are not whole blocks wrongly. ``nox -s cpu-paths`` reruns the tests marked
``cpu_kernels`` with the other paths forced (``ATEN_CPU_CAPABILITY=avx2``, ``NPY_DISABLE_CPU_FEATURES``, and
``LLMTUNE_CPU_PATHS``, read here):

* ``no-avx512bf16``: bitsandbytes behaves as on a CPU without AVX512-BF16 (no repacked inference weights);
* ``faulty-4bit``: bitsandbytes' 4-bit dequantization and forward are replaced by a simulation of the AVX-512
  fault (every row restarts the block count; inference fails for widths that are not a multiple of 64), for
  the tests marked ``bnb_4bit`` (they run llmtune's quantizer, whose guard must route around it).
"""

from __future__ import annotations

import os
from typing import Any

FORCED = frozenset(p for p in os.environ.get("LLMTUNE_CPU_PATHS", "").replace(",", " ").split() if p)
KNOWN = {"no-avx512bf16", "faulty-4bit"}
if FORCED - KNOWN:
    raise ValueError(f"LLMTUNE_CPU_PATHS: unknown path(s) {sorted(FORCED - KNOWN)}; known: {sorted(KNOWN)}")

FAULTY = {"on": False}
CALLS = {"n": 0}


def disable_avx512bf16() -> None:
    """bitsandbytes as on a CPU without AVX512-BF16: ``Linear4bit`` reads the flag when it is built."""
    import bitsandbytes.functional as F
    import bitsandbytes.nn.modules as modules

    F.has_avx512bf16 = modules.has_avx512bf16 = lambda: False


def row_restart_dequantize(packed: Any, quant_state: Any, *args: Any, **kwargs: Any) -> Any:
    """The AVX-512 fault: block index = row * ceil(n / blocksize) + col // blocksize (blocks never span rows)."""
    import torch

    from llmtune.quantizers import bnb_guard

    rows, n = quant_state.shape
    bs = quant_state.blocksize
    absmax = bnb_guard.reference_absmax(quant_state)
    exact = bnb_guard.reference_dequantize_4bit(packed, quant_state).float()
    per_row = -(-n // bs)
    col_block = torch.arange(n) // bs
    block = (torch.arange(rows)[:, None] * per_row + col_block[None, :]).clamp(max=absmax.numel() - 1)
    true_block = (torch.arange(rows * n) // bs).reshape(rows, n)
    return (exact / absmax[true_block] * absmax[block]).to(quant_state.dtype)


def sound_dequantize(packed: Any, quant_state: Any, *args: Any, **kwargs: Any) -> Any:
    from llmtune.quantizers.bnb_guard import reference_dequantize_4bit

    return reference_dequantize_4bit(packed, quant_state)


def simulated_forward(self: Any, x: Any) -> Any:
    """Linear4bit.forward on the simulated kernel; inference fails for widths not a multiple of 64 if faulty."""
    import bitsandbytes as bnb
    import torch

    if FAULTY["on"] and not self.training and self.in_features % 64:
        raise RuntimeError(f"shape '[{self.out_features}, {self.in_features // 64}]' is invalid")
    w = bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state).to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return torch.nn.functional.linear(x.to(self.compute_dtype), w, bias).to(x.dtype)


def simulate_4bit_kernel(monkeypatch: Any, faulty: bool) -> None:
    """Replace bitsandbytes' 4-bit dequantization and forward by the faulty or the sound simulation."""
    import bitsandbytes as bnb

    from llmtune.quantizers import bnb_guard

    bnb_guard.clear_cache()
    FAULTY["on"] = faulty
    CALLS["n"] = 0
    impl = row_restart_dequantize if faulty else sound_dequantize

    def counted(*args: Any, **kwargs: Any) -> Any:
        CALLS["n"] += 1
        return impl(*args, **kwargs)

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", counted)
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", simulated_forward)
