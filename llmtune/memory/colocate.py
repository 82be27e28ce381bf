"""One memory plan for online RL with a colocated vLLM generator (TRL's ``vllm_mode="colocate"``; stdlib only).

The policy trains and a vLLM engine generates in the same process on the same GPU. The engine is sized once, at
start-up, as `llmtune.memory.serving.vllm_capacity` computes it: it asks for ``requested = ceil(total x
gpu_memory_utilization)``, loads its own bf16 copy of the weights inside that, profiles a forward over
``max_num_batched_tokens``, and turns what is left into its KV block pool. From then on the GPU holds, besides
everything training holds:

* ``vllm_weights``: the engine's copy of the model (the policy's weights are pushed into it before generating);
* ``vllm_kv_cache_pool``: the block pool, allocated whole at start-up and never returned;
* during generation only, ``vllm_generation_temporaries``: at most the profiling run's peak.

Three things can fail, and the plan names each (`Estimate.blockers`):

1. start-up: vLLM refuses to start unless the free memory at that moment (the policy and reference are already
   loaded) is at least ``requested`` ("Free memory on device ... is less than desired GPU memory utilization");
2. no KV block fits in ``requested`` after the weights and the profiling peak, or the pool holds fewer tokens
   than ``max_model_len`` (vLLM refuses a model length one request could not reach);
3. the training step's peak plus the engine's weights and pool exceeds the device (the OOM of trl#2688/#3523).

Defaults are TRL 1.16's colocate settings: ``gpu_memory_utilization=0.3``, ``max_num_batched_tokens=4096``,
``max_num_seqs`` = the sequences generated per step, prompts x K (TRL: ``per_device_train_batch_size x
steps_per_generation`` completions) and
``max_model_len`` = the training sequence length (TRL passes ``vllm_max_model_length``; left unset, vLLM takes
the model's full context, which rarely fits a colocated pool).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmtune.core.errors import InvalidOptionError
from llmtune.memory.gpus import gpu_bytes
from llmtune.memory.serving import ServingCapacity, vllm_capacity
from llmtune.memory.spec import ModelSpec
from llmtune.memory.weights import weight_terms

#: TRL 1.16 GRPOConfig / VLLMGeneration defaults in colocate mode
TRL_COLOCATE_DEFAULTS = {"gpu_memory_utilization": 0.3, "max_num_batched_tokens": 4096}
VLLM_OPTIONS = ("gpu_memory_utilization", "block_size", "max_num_seqs", "max_model_len", "max_num_batched_tokens",
                "non_torch_bytes", "cudagraph_bytes", "shared_prefix_tokens")


def colocated_engine(spec: ModelSpec, *, gpu: str | int | None, options: Mapping[str, Any] | None, seq_len: int,
                     prompts: int, samples: int, workspace_bytes: int, weight_format: str = "bf16"
                     ) -> tuple[ServingCapacity, dict[str, int], dict[str, int], int, list[str], list[str]]:
    """The colocated engine on ``gpu``: (capacity, held terms, generation temporaries, requested bytes, notes,
    blockers other than start-up). ``seq_len``: prompt + completion tokens; ``prompts`` x ``samples`` sequences
    are generated per step; ``weight_format``: the engine's weights (``nf4`` for a 4-bit policy: TRL then starts
    vLLM with ``quantization="bitsandbytes"``)."""
    if gpu is None:
        raise InvalidOptionError("generator='vllm' sizes the engine as a fraction of the device: pass gpu= (a name "
                                 "such as 'H100-80GB' or a byte count)", field="gpu")
    opts = {**TRL_COLOCATE_DEFAULTS, "max_model_len": seq_len, "max_num_seqs": max(1, prompts * samples), **dict(options or {})}
    bad = sorted(set(opts) - set(VLLM_OPTIONS))
    if bad:
        raise InvalidOptionError(f"vllm option {bad[0]!r} is not one of {', '.join(VLLM_OPTIONS)}", field="vllm")
    bits = 4 if weight_format in ("nf4", "fp4") else 16
    weights = sum(weight_terms(spec, weight_format, bits=bits).values())
    cap, prof = vllm_capacity(spec, weights + workspace_bytes, gpu=gpu, kv_bytes=2, **opts)
    notes = [f"colocated vLLM: gpu_memory_utilization {opts['gpu_memory_utilization']} of {gpu} = "
             f"{cap.requested_bytes / 2**30:.2f} GiB requested; its {weight_format} weights {weights / 2**30:.2f} GiB, "
             f"profiling peak {sum(prof.values()) / 2**30:.2f} GiB, KV pool {cap.kv_pool_bytes / 2**30:.2f} GiB = "
             f"{cap.kv_tokens:,} tokens ({cap.kv_bytes_per_token // 1024} KiB per token)"]
    blockers: list[str] = []
    if cap.num_blocks == 0:
        blockers.append(f"vLLM cannot start: its weights and profiling run need {cap.non_kv_bytes / 2**30:.2f} GiB of "
                        f"the {cap.requested_bytes / 2**30:.2f} GiB that gpu_memory_utilization "
                        f"{opts['gpu_memory_utilization']} leaves; no KV block fits (raise gpu_memory_utilization)")
    elif cap.kv_tokens < cap.max_model_len:
        blockers.append(f"vLLM refuses max_model_len={cap.max_model_len}: its KV pool holds {cap.kv_tokens:,} tokens; "
                        f"lower vllm max_model_len (prompt + completion) or raise gpu_memory_utilization")
    else:
        need = prompts * samples
        fit = cap.concurrent_sequences(min(seq_len, cap.max_model_len))
        notes.append(f"colocated vLLM: {need} sequences of {seq_len} tokens per step; the pool holds {fit} at once"
                     + ("" if fit >= need else " (the rest wait: slower, not out of memory)"))
    held = {"vllm_weights": weights, "vllm_kv_cache_pool": cap.kv_pool_bytes}
    return cap, held, {"vllm_generation_temporaries": sum(prof.values())}, cap.requested_bytes, notes, blockers


def startup_blocker(requested: int, loaded_bytes: int, context_bytes: int, gpu: str | int) -> str | None:
    """Why vLLM would refuse to start next to ``loaded_bytes`` of policy (and reference) weights, or None."""
    free = gpu_bytes(gpu) - loaded_bytes - context_bytes
    if free >= requested:
        return None
    return (f"vLLM refuses to start: {free / 2**30:.2f} GiB free after loading the policy, less than the "
            f"{requested / 2**30:.2f} GiB gpu_memory_utilization asks for (lower gpu_memory_utilization)")


__all__ = ["TRL_COLOCATE_DEFAULTS", "VLLM_OPTIONS", "colocated_engine", "startup_blocker"]
