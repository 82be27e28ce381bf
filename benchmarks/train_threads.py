"""How many torch CPU threads a tiny training run should use: one JSON line per thread count.

Issue 10's question: on a loaded 2-core machine a 24-step tiny LoRA run took 27 s with torch's default
threads and 1.5 s with one. This script runs the same 24-step `sft`/LoRA run (tiny Llama, bundled data) in
a fresh process per setting -- ``num_threads`` = 1, 2, ..., the core count, and torch's default -- and prints
the wall time of the training call, the final loss (identical across settings up to float reassociation),
the 1-minute load average before the run and the core count. ``--repeat`` runs each setting several times.

    python benchmarks/train_threads.py              # what this machine does now (idle or loaded)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, torch
threads = sys.argv[1]
if threads != "default":
    torch.set_num_threads(int(threads))
import llmtune
from llmtune.data import split_instructions
from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer
import tempfile
tok = train_tiny_tokenizer()
model = build_tiny_model(tok, seed=0)
train = split_instructions()[0][:96]
load = os.getloadavg()[0]
n = torch.get_num_threads()
trainer = llmtune.get_trainer("sft", rank=8, alpha=16, lr=2e-3, batch_size=4, max_steps=24, warmup=0,
                              max_length=96, num_threads=n, progress=False)
with tempfile.TemporaryDirectory() as out:
    t = time.perf_counter()
    r = trainer.train(model, train, tokenizer=tok, output_dir=out)
    dt = time.perf_counter() - t
print(json.dumps({"threads": n, "setting": threads, "seconds": round(dt, 2), "loss_last": r.history[-1]["loss"],
                  "load_before": round(load, 2)}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings = [str(n) for n in sorted({1, 2, cores}) if n <= cores] + ["default"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for _ in range(a.repeat):
        for setting in settings:
            out = subprocess.run([sys.executable, "-c", CHILD, setting], capture_output=True, text=True, env=env)
            line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
            row = json.loads(line) if line else {"setting": setting, "error": out.stderr[-400:]}
            print(json.dumps({"bench": "train_threads", "cores": cores, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
