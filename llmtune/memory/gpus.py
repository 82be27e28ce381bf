"""Memory of common GPUs, as the driver reports it (what a run can allocate at most, context included)."""

from __future__ import annotations

from llmtune.core.errors import InvalidOptionError, did_you_mean
from llmtune.core.units import MiB

#: GPU name -> total device memory in bytes (``torch.cuda.mem_get_info()[1]``; nominal GB in the name).
GPUS: dict[str, int] = {
    "T4": 15360 * MiB,
    "L4": 23034 * MiB,
    "RTX4090": 24564 * MiB,
    "A100-40GB": 40536 * MiB,
    "A100-80GB": 81228 * MiB,
    "H100-80GB": 81079 * MiB,  # measured: ../shared/memory/h100-llama3.2-1b.json "total_MiB"
    "H200": 143771 * MiB,
}

_ALIASES = {"4090": "RTX4090", "A100": "A100-80GB", "A100-40": "A100-40GB", "A100-80": "A100-80GB",
            "H100": "H100-80GB", "H100-80": "H100-80GB", "H200-141GB": "H200"}


def gpu_bytes(gpu: str | int) -> int:
    """Total memory of ``gpu``: a name from `GPUS` (case-insensitive, aliases like "H100") or a byte count."""
    if isinstance(gpu, int) and not isinstance(gpu, bool):
        if gpu <= 0:
            raise InvalidOptionError(f"gpu memory must be > 0 bytes, got {gpu}")
        return gpu
    if not isinstance(gpu, str):
        raise InvalidOptionError(f"gpu must be a name or a byte count, got {gpu!r}")
    key = gpu.strip().upper().replace(" ", "").replace("_", "-")
    names = {k.upper(): k for k in GPUS} | {k.upper(): v for k, v in _ALIASES.items()}
    if key not in names:
        raise InvalidOptionError(f"unknown GPU {gpu!r}.{did_you_mean(key, names)} Known: {', '.join(GPUS)}")
    return GPUS[names[key]]
