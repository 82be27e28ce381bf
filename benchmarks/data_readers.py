"""Records/s and peak resident memory reading a large instruction data set: a parquet file streamed through
`datasets` (`llmtune.data.sources`) vs llmtune's JSONL reader (one JSON line per side).

Question: does ``data: {path: big.parquet, streaming: true}`` read a large source with flat memory, and at what
speed compared with the JSONL reader (`llmtune.data.read_records`, which holds the file and its records in
memory)? The script writes the same seeded alpaca-style records (instruction / input / output, sentences of
the bundled corpus) as a ``--size-mb`` MB JSONL file and as a parquet file (written a batch at a time), then
reads each in a fresh Python process and counts the records. Each line gives records/s (overall, and after the
first record: the fixed cost of opening the source, ``first_record_s``, is separate), the file size, and the
process's RSS before reading, at the first record, every 50,000 records, and at its peak (``ru_maxrss``). ``--in-memory`` adds a third line: the parquet
file read in full into `Records` (``streaming: false``).

    python benchmarks/data_readers.py                    # 256 MB of JSONL (the issue's 1 GB: --size-mb 1024)
    python benchmarks/data_readers.py --size-mb 16       # quick
    python benchmarks/data_readers.py --size-mb 1024 --sides parquet-streamed   # the streamed side alone
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_READ = r"""
import json, resource, sys, time
from pathlib import Path
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")
side, path = sys.argv[1], sys.argv[2]
from llmtune.data import read_records
from llmtune.data.sources import Source, iter_source, read_source
import datasets  # imported before the baseline RSS on every side: the reader's memory, not the import's
before = rss()
t0 = time.perf_counter()
if side == "jsonl":
    rows = iter(read_records(path))
elif side == "parquet-streamed":
    rows = iter_source(Source(path, streaming=True))
else:
    rows = iter(read_source(Source(path)))
next(rows)
first, at_first = time.perf_counter() - t0, rss()
n, trace = 1, []
for _ in rows:
    n += 1
    if n % 50000 == 0:
        trace.append(round(rss() / 2**20, 1))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"records": n, "seconds": seconds, "first": first, "rss_before": before, "rss_first": at_first,
                  "rss_peak": peak, "trace": trace}))
"""


def write_files(jsonl: Path, parquet: Path, size_mb: int, seed: int, batch: int = 20_000) -> int:
    """The same seeded records as JSONL and as parquet, until the JSONL file has ``size_mb`` MB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmtune.data import bundled_corpus

    sentences = [s.strip() + "." for text in bundled_corpus() for s in text.split(".") if s.strip()]
    rng = random.Random(seed)
    target = size_mb * 2**20
    written = count = 0
    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())])
    rows: list[dict[str, str]] = []
    with open(jsonl, "w", encoding="utf-8") as fh, pq.ParquetWriter(str(parquet), schema) as writer:
        while written < target:
            record = {"instruction": " ".join(rng.choice(sentences) for _ in range(2)),
                      "input": rng.choice(sentences) if rng.random() < 0.4 else "",
                      "output": " ".join(rng.choice(sentences) for _ in range(5))}
            line = json.dumps(record) + "\n"
            fh.write(line)
            written += len(line.encode())
            count += 1
            rows.append(record)
            if len(rows) == batch:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return count


def read(side: str, path: Path) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _READ, side, str(path)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=256, help="size of the JSONL file (the parquet file is smaller)")
    p.add_argument("--dir", default=None, help="where the generated files go (default: the temp dir)")
    p.add_argument("--in-memory", action="store_true", help="also read the parquet file in full (streaming: false)")
    p.add_argument("--sides", default="jsonl,parquet-streamed",
                   help="comma-separated: jsonl, parquet-streamed, parquet-in-memory")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args(argv)

    folder = Path(a.dir or tempfile.gettempdir())
    jsonl, parquet = folder / f"llmtune-data-{a.size_mb}mb.jsonl", folder / f"llmtune-data-{a.size_mb}mb.parquet"
    t0 = time.perf_counter()
    count = write_files(jsonl, parquet, a.size_mb, seed=0)
    write_s = time.perf_counter() - t0
    names = a.sides.split(",") + (["parquet-in-memory"] if a.in_memory else [])
    sides = [(n, jsonl if n == "jsonl" else parquet) for n in dict.fromkeys(names)]
    try:
        for side, path in sides:
            got = read(side, path)
            assert got["records"] == count, (side, got["records"], count)
            print(json.dumps({
                "bench": "data_readers", "side": side, "file_mb": round(path.stat().st_size / 2**20, 1),
                "records": count, "read_s": round(got["seconds"], 2), "records_per_s": round(count / got["seconds"]),
                "first_record_s": round(got["first"], 2),
                "records_per_s_after_first": round((count - 1) / (got["seconds"] - got["first"])),
                "rss_at_first_record_MiB": round(got["rss_first"] / 2**20, 1),
                "rss_before_MiB": round(got["rss_before"] / 2**20, 1), "rss_peak_MiB": round(got["rss_peak"] / 2**20, 1),
                "rss_growth_MiB": round((got["rss_peak"] - got["rss_before"]) / 2**20, 1), "write_s": round(write_s, 1),
                "rss_every_50k_records_MiB": got["trace"],
                "cpu": f"{os.cpu_count()} cores", "load": round(os.getloadavg()[0], 2),
            }), flush=True)
    finally:
        if not a.keep:
            jsonl.unlink(missing_ok=True)
            parquet.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
