"""k-quants (q4_K_M, q5_K_M, q6_K) through llama.cpp's own quantizer (llama-cpp-python's ``llama_model_quantize``).

The ``gguf`` package only *dequantizes* the k-quant formats (``gguf.quants.Q4_K`` etc. have no quantizer), and
llama.cpp's k-quant recipes (``_M``: some tensors one step up, e.g. ``attn_v``/``ffn_down`` in q6_K) live in its C
code, so llmtune writes an f16 GGUF and has llama.cpp quantize it: the file is what ``llama-quantize`` writes.
Requires ``pip install llama-cpp-python`` (built from source: minutes).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from llmtune.core.errors import InvalidOptionError
from llmtune.export.source import ExportError

#: llmtune dtype -> llama.cpp's ``LLAMA_FTYPE_MOSTLY_*`` name.
KQUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def llama_cpp_quantizer(dtype: str) -> Any:
    """The ``llama_cpp`` module, whose quantizer writes ``dtype``; `ExportError` saying what to install."""
    if dtype not in KQUANTS:
        raise InvalidOptionError(f"dtype={dtype!r} is not one of {', '.join(KQUANTS)}")
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(f"dtype {dtype} needs llama.cpp's k-quant quantizer: pip install llama-cpp-python "
                          "(the gguf package can only dequantize k-quants); or export f16 and run llama.cpp's "
                          f"llama-quantize ({exc})") from exc
    return llama_cpp


def quantize_gguf(source: str | Path, target: str | Path, dtype: str, *, threads: int = 1) -> None:
    """Quantize the f16 GGUF ``source`` to ``target`` in k-quant ``dtype`` with llama.cpp's quantizer."""
    llama_cpp = llama_cpp_quantizer(dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANTS[dtype])
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0:
        raise ExportError(f"llama.cpp's quantizer failed ({code}) on {source} -> {target} ({dtype})")
