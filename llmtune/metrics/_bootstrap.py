"""Seeded bootstrap confidence intervals for a corpus mean (what rouge-score's aggregator does, reproducibly).

rouge-score's ``BootstrapAggregator`` resamples with the unseeded global NumPy RNG and reports the
*median* of the bootstrap means as ``mid``. We keep the plain mean as the headline and only add the
interval ends, from a seeded generator, so the same inputs always give the same interval.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def bootstrap_intervals(
    per_example: Mapping[str, np.ndarray],
    *,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """``{key}_low`` / ``{key}_high`` percentile intervals of the mean of each per-example array.

    Every key is resampled with the same example indices (a paired bootstrap), ``samples`` times.
    """
    keys = list(per_example)
    if not keys:
        return {}
    values = np.column_stack([np.asarray(per_example[k], dtype=np.float64) for k in keys])
    n = values.shape[0]
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    means = np.empty((samples, len(keys)))
    chunk = max(1, 4_000_000 // n)  # bound the (chunk x n) count matrix to ~32 MB
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        idx = rng.integers(0, n, size=(size, n))
        flat = (idx + (np.arange(size)[:, None] * n)).ravel()
        counts = np.bincount(flat, minlength=size * n).reshape(size, n)
        means[start:start + size] = counts @ values / n
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail], axis=0)
    out: dict[str, float] = {}
    for k, lo, hi in zip(keys, low, high):
        out[f"{k}_low"] = float(lo)
        out[f"{k}_high"] = float(hi)
    return out
