"""Resident memory while the pretraining data path streams a large generated text file (one JSON line).

Question: does `llmtune.data.BlockStream` (what ``get_trainer("pretrain")`` reads text files with) keep
memory flat on a corpus far larger than its chunks? It writes a ``--size-mb`` text file (default 1024 MB) of
sentences drawn from the bundled corpus (seeded, written a line at a time), then streams it into
``--block`` token blocks with the tiny BPE tokenizer, sampling the process's resident set size (RSS, from
/proc/self/statm) every 256 blocks (and keeping a trace every 25,600). It prints RSS before streaming, its peak and its growth, throughput,
and the count of blocks and tokens. ``--keep`` keeps the file (default: deleted afterwards).

    python benchmarks/stream_memory.py                 # 1 GB (minutes on a 2-core CPU)
    python benchmarks/stream_memory.py --size-mb 16    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_corpus(path: Path, size_mb: int, seed: int) -> int:
    """Sentences of the bundled corpus in a seeded random order until the file has ``size_mb`` MB."""
    from llmtune.data import bundled_corpus

    sentences = [s.strip() + "." for text in bundled_corpus() for s in text.split(".") if s.strip()]
    rng = random.Random(seed)
    target = size_mb * 2**20
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            line = " ".join(rng.choice(sentences) for _ in range(8)) + "\n"
            fh.write(line)
            written += len(line.encode())
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--chunk-bytes", type=int, default=1 << 16)
    p.add_argument("--dir", default=None, help="where the generated file goes (default: the temp dir)")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args(argv)

    from llmtune.data import BlockStream, text_sources
    from llmtune.models.tiny import train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    path = Path(a.dir or tempfile.gettempdir()) / f"llmtune-stream-{a.size_mb}mb.txt"
    t0 = time.perf_counter()
    size = write_corpus(path, a.size_mb, seed=0)
    write_s = time.perf_counter() - t0
    try:
        stream = BlockStream(text_sources(path), tok, block_size=a.block, chunk_bytes=a.chunk_bytes)
        rss0 = rss_bytes()
        peak, trace = rss0, []
        blocks = read = 0
        t1 = time.perf_counter()
        for block in stream:
            blocks += 1
            read += len(block)
            if blocks % 256 == 0:
                r = rss_bytes()
                peak = max(peak, r)
                if blocks % 25600 == 0:  # every ~13 M tokens at block 512: the RSS curve, for flatness
                    trace.append(round(r / 2**20, 1))
        seconds = time.perf_counter() - t1
        rss1 = rss_bytes()
    finally:
        if not a.keep:
            path.unlink(missing_ok=True)
    print(json.dumps({
        "bench": "stream_memory", "file_mb": round(size / 2**20, 1), "block": a.block, "chunk_bytes": a.chunk_bytes,
        "blocks": blocks, "tokens": read, "write_s": round(write_s, 1), "stream_s": round(seconds, 1),
        "mb_per_s": round(size / 2**20 / seconds, 2), "rss_before_MiB": round(rss0 / 2**20, 1),
        "rss_peak_MiB": round(peak / 2**20, 1), "rss_after_MiB": round(rss1 / 2**20, 1),
        "rss_growth_MiB": round((peak - rss0) / 2**20, 1), "rss_trace_MiB": trace, "cpu": f"{os.cpu_count()} cores",
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
