"""Peak bytes of live tensors, measured on any device (the CPU included) by watching every ATen op.

A ``TorchDispatchMode`` sees every tensor each op returns, forward and backward, and tracks its storage with a
weak reference; after each op it adds up the storages still alive. With the model's parameters and buffers left
out, that sum is what ``torch.cuda.max_memory_allocated()`` would show on a GPU for the same ops, less the
static terms and the allocator's rounding. Allocations made inside a kernel (workspaces) are not seen.

    meter = LivePeak.excluding(model)
    with meter:
        model(input_ids=ids, labels=ids).loss.backward()
    meter.peak   # bytes
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LivePeak"]


class LivePeak(TorchDispatchMode):
    """Peak bytes of live tensor storages created while active (storages in ``skip`` excluded)."""

    def __init__(self, skip: Iterable[int] = ()) -> None:
        super().__init__()
        self.skip = set(skip)
        self.live: dict[int, tuple[Any, int]] = {}
        self.cur = self.peak = 0

    @classmethod
    def excluding(cls, model: torch.nn.Module) -> LivePeak:
        """A meter that leaves ``model``'s parameters and buffers out (they exist before and after the step)."""
        tensors = [*model.parameters(), *model.buffers()]
        return cls(t.untyped_storage().data_ptr() for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.cur -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.skip and key not in self.live:
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.cur += st.nbytes()
        self.peak = max(self.peak, self.cur)
        return out
