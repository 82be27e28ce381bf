"""Peak RSS and wall time: llmtune's GGUF export vs llama.cpp's ``convert_hf_to_gguf.py`` on the same model.

Each side runs in its own fresh Python process (so neither inherits the other's memory) and reports its own
``ru_maxrss``; one JSON line per side. ``--model`` is a transformers model directory (safetensors). With
``--run`` (a LoRA training run on that model) llmtune exports the run, folding the adapter in tensor by tensor,
and the converter gets the same run merged by PEFT and saved as HF safetensors (made first, not timed) — what a
user of the converter has to do. ``--converter`` is llama.cpp's directory (``vendor/llama.cpp`` of the
llama-cpp-python sdist: ``pip download --no-deps --no-binary :all: llama-cpp-python``; the converter imports
sentencepiece).

    python benchmarks/export_memory.py --model /path/to/SmolLM2-135M-Instruct --converter SDIST/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_OURS = """
import resource, sys
from llmtune.export import export
export(sys.argv[1], sys.argv[2], format="gguf", dtype=sys.argv[3], overwrite=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
_THEIRS = """
import resource, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[1] + "/gguf-py")
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3], "--outtype", sys.argv[4]]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _side(name: str, code: str, args: list[str], out: Path) -> dict[str, object]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rss_kib = int(done.stdout.strip().splitlines()[-1])
    return {"side": name, "peak_rss_mb": round(rss_kib / 1024, 1), "seconds": round(seconds, 2),
            "gguf_bytes": out.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="a LoRA run on --model (exported with its adapter merged)")
    parser.add_argument("--converter", type=Path, required=True)
    parser.add_argument("--dtype", default="f16", choices=["f16", "bf16", "q8_0"])
    args = parser.parse_args()
    common = {"model": str(args.model), "run": str(args.run) if args.run else None, "dtype": args.dtype,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg_1m": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = args.run or args.model
        converter_input = args.model
        if args.run:   # in a child too: a child's ru_maxrss starts at its parent's peak (Linux keeps it over exec)
            subprocess.run([sys.executable, "-c", "import sys; from llmtune.export import export; "
                            "export(sys.argv[1], sys.argv[2], format='hf', dtype='f32')", str(args.run),
                            str(work / "merged")], check=True, capture_output=True)
            converter_input = work / "merged"
        ours = work / "ours"
        theirs = work / f"converter-{args.dtype}.gguf"
        results = [
            _side("llmtune", _OURS, [str(source), str(ours), args.dtype], ours / f"model-{args.dtype}.gguf"),
            _side("convert_hf_to_gguf", _THEIRS, [str(args.converter), str(converter_input), str(theirs),
                                                  args.dtype], theirs),
        ]
    for result in results:
        print(json.dumps({**result, **common}))


if __name__ == "__main__":
    main()
