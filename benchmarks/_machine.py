"""What every benchmark line says about the machine it ran on (stdlib and NumPy only, no torch).

Speed depends on the CPU model and on which SIMD paths the libraries dispatch to there, so each JSON line of
a speed benchmark carries the CPU model, its AVX-512 flags, NumPy's dispatched targets and the load average.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any


def cpu_facts() -> dict[str, Any]:
    """CPU model name and AVX-512 / AMX flags from /proc/cpuinfo (empty where it cannot be read)."""
    model, flags = platform.processor() or "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = {f for f in value.split() if f.startswith(("avx512", "amx"))}
                    break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_simd": sorted(flags)}


def numpy_dispatch() -> list[str]:
    """The SIMD targets NumPy dispatches to on this CPU (after ``NPY_DISABLE_CPU_FEATURES``)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__  # type: ignore[no-redef]
    return [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]


def machine() -> dict[str, Any]:
    """The facts merged into every JSON line."""
    return {**cpu_facts(), "numpy_dispatch": numpy_dispatch(), "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
