"""``distributed="fsdp"``: torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) under the shared loop.

Accelerate 1.15 ignores an FSDP config on CPU (it runs DDP); FSDP2 itself shards on CPU with gloo, so the loop
calls it directly: one FSDP unit per decoder layer plus the root (the loop's loss module: the embeddings, the
final norm and the head live in it, and everything the backend's loss touches runs inside its forward).

* gradients: FSDP2 reduce-scatters the mean over processes, like DDP's all-reduce: the loop's loss scaling
  is the same; micro-batches all sync (the sum of per-micro-batch means is the mean of the sums).
* clipping: the global norm from the local shards (`clip_grad_norm`), the same as DDP's to float rounding.
* saving: `full_model_state` gathers the full state dict to rank 0 (CPU); the method's ``save_pretrained``
  writes it (`WithStateDict`), so the adapter / model on disk is the ordinary unsharded one.
* optimizer state: gathered to rank 0 keyed by parameter name (`full_optimizer_state`), loaded back into
  the shards on every rank on resume (`load_optimizer_state`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

_PREFIX = "model."   # the loop's loss module holds the trained model as ``.model``


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a causal LM (the children of its largest ``ModuleList``)."""
    best: list[nn.Module] = []
    for _name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            best = list(module)
    return best


def shard(root: nn.Module, model: nn.Module) -> None:
    """`fully_shard` every decoder layer of ``model``, then ``root`` (which holds ``model``), in place."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        from llmtune.core.errors import ConfigError

        raise ConfigError(f"distributed='fsdp': {type(model).__name__} has no ModuleList of layers to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the sharded gradients of ``params`` to a global L2 norm of ``max_norm``; returns the norm before."""
    import torch.distributed as dist

    grads = [_local(p.grad) for p in params if p.grad is not None]
    local = torch.zeros((), dtype=torch.float32)
    for g in grads:
        local += g.detach().float().pow(2).sum().cpu()
    dist.all_reduce(local)
    norm = float(local.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1 and math.isfinite(norm):
        for g in grads:
            g.detach().mul_(coef)
    return norm


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(root: nn.Module) -> dict[str, Any]:
    """The trained model's full state dict on rank 0 (CPU; empty elsewhere). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(root, options=_options())
    return {k[len(_PREFIX):]: v for k, v in full.items() if k.startswith(_PREFIX)}


def full_optimizer_state(root: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, full, on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return dict(get_optimizer_state_dict(root, optimizer, options=_options()))


def load_optimizer_state(root: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a `full_optimizer_state` (read by every rank) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))


class WithStateDict:
    """``model`` whose ``save_pretrained`` writes ``state_dict`` (the gathered full one) instead of its own
    sharded tensors; everything else is the model's."""

    def __init__(self, model: Any, state_dict: dict[str, Any]) -> None:
        self._model = model
        self._state_dict = state_dict

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        self._model.save_pretrained(path, state_dict=self._state_dict, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
