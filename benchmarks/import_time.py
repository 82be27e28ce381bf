"""Time `import llmtune` in fresh interpreters (best and median of N) and print one JSON line.

The budget is ~0.3 s; the peer is a bare interpreter start (`python -c pass`) measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time


def _run(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t


def main(n: int = 15) -> None:
    bare = [_run("pass") for _ in range(n)]
    full = [_run("import llmtune") for _ in range(n)]
    inner = []
    for _ in range(n):
        out = subprocess.run(
            [sys.executable, "-c", "import time; t=time.perf_counter(); import llmtune; print(time.perf_counter()-t)"],
            check=True, capture_output=True, text=True).stdout
        inner.append(float(out))
    print(json.dumps({
        "benchmark": "import_time", "runs": n,
        "import_llmtune_s_best": round(min(inner), 4), "import_llmtune_s_median": round(statistics.median(inner), 4),
        "process_with_import_s_median": round(statistics.median(full), 4),
        "bare_interpreter_s_median": round(statistics.median(bare), 4),
        "budget_s": 0.3, "within_budget": min(inner) < 0.3,
    }))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
