"""Keep the heap that a metric call grew for the next call (glibc's malloc returns it to the OS otherwise).

A 2,000-pair ROUGE or BLEU call holds up to about 10 MB of NumPy temporaries at once (a few MB per stage:
tokenizing, the sorted join, rouge2, rougeLsum). glibc's malloc trims the free top of its heap back to the OS
once it exceeds ``M_TRIM_THRESHOLD`` (128 KB at start; raised to twice the size of the largest ``mmap``-ed
block freed so far), so the pages of each stage are faulted in afresh: on the 2-core VM the benchmarks ran on,
2,800-5,400 faults per short ROUGE call (about 1.7 us each, 5-10 ms of a 20-24 ms call), how many depending on
what the process did before. Splitting the corpus into blocks does not avoid them: each block's temporaries
are trimmed and faulted again, and the per-block NumPy calls cost more (measured: see docs/metrics-rouge.md).
`keep_freed_heap` allocates and frees one untouched 32 MB buffer once per process: glibc then raises its
dynamic thresholds (mmap 32 MB, trim 64 MB), and later calls reuse the freed heap (0 faults per short call).
No page of the buffer is touched; a process that set ``M_MMAP_THRESHOLD``/``M_TRIM_THRESHOLD`` itself keeps
its settings (glibc stops adjusting them), and other allocators simply free the buffer.
"""

from __future__ import annotations

__all__ = ["keep_freed_heap"]

_BYTES = (32 << 20) - (64 << 10)  # just under glibc's largest dynamic mmap threshold (32 MB)
_done = False


def keep_freed_heap() -> None:
    """Once per process: allocate and free one untouched buffer of just under 32 MB (see the module docstring)."""
    global _done
    if not _done:
        import numpy as np

        np.empty(_BYTES, dtype=np.uint8)  # freed at once; numpy allocates it with malloc, never writes to it
        _done = True
