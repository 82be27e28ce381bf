"""What the checkpoint safety net costs: manifest hashing (write + verify) and pickle-free state files.

Prints one JSON object per line::

    python benchmarks/checkpoint_cost.py [--mb 64,512] [--params 1000000,8000000]

* ``manifest``: `write_manifest` + `manifest_problems` on a directory holding one file of ``mb`` MiB
  (what a checkpoint load or a quantized-model load adds), seconds and MiB/s.
* ``state``: an AdamW state dict of ``params`` parameters saved/loaded with `save_state`/`load_state`
  (safetensors + JSON tree) next to ``torch.save``/``torch.load(weights_only=True)``, seconds and bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def manifest_row(mb: int, root: Path) -> dict[str, object]:
    from llmtune.core.manifest import manifest_problems, write_manifest

    d = root / f"m{mb}"
    d.mkdir()
    (d / "weights.bin").write_bytes(os.urandom(mb << 20))
    t0 = time.perf_counter()
    write_manifest(d)
    t1 = time.perf_counter()
    assert manifest_problems(d) == []
    t2 = time.perf_counter()
    return {"bench": "manifest", "mib": mb, "write_s": round(t1 - t0, 4), "verify_s": round(t2 - t1, 4),
            "verify_mib_per_s": round(mb / (t2 - t1), 1)}


def state_row(params: int, root: Path) -> dict[str, object]:
    import torch

    from llmtune.trainers import _checkpoint as ckpt

    p = torch.nn.Parameter(torch.zeros(params))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(params)
    opt.step()
    sd = opt.state_dict()
    d = root / f"s{params}"
    d.mkdir()
    t0 = time.perf_counter()
    ckpt.save_state(d, "optimizer", sd)
    t1 = time.perf_counter()
    ckpt.load_state(d, "optimizer")
    t2 = time.perf_counter()
    torch.save(sd, d / "optimizer.pt")
    t3 = time.perf_counter()
    torch.load(d / "optimizer.pt", weights_only=True)
    t4 = time.perf_counter()
    return {"bench": "state", "params": params, "safetensors_save_s": round(t1 - t0, 4),
            "safetensors_load_s": round(t2 - t1, 4), "torch_save_s": round(t3 - t2, 4),
            "torch_load_s": round(t4 - t3, 4), "safetensors_bytes": (d / "optimizer.safetensors").stat().st_size,
            "torch_bytes": (d / "optimizer.pt").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="64,512")
    parser.add_argument("--params", default="1000000,8000000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mb in (int(x) for x in args.mb.split(",") if x):
            print(json.dumps(manifest_row(mb, Path(tmp))), flush=True)
        for n in (int(x) for x in args.params.split(",") if x):
            print(json.dumps(state_row(n, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
