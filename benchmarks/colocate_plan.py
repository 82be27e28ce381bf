"""The memory plan of GRPO with a colocated vLLM engine (TRL's ``vllm_mode="colocate"``): one JSON line per case.

Analytical (`llmtune.memory.estimate_training(objective="online_rl", generator="vllm", gpu=, vllm=)`), no GPU.
The run is TRL 1.16's GRPO defaults on one GPU: ``per_device_train_batch_size=8`` completions = 1 prompt x
``num_generations=8``, prompt + completion = 512 + 512 tokens, gradient checkpointing, bf16, vLLM with
``gpu_memory_utilization=0.3`` and ``max_num_batched_tokens=4096`` (``max_model_len`` 1024, as
``vllm_max_model_length`` would set it); then the same with other utilizations and methods.

    python benchmarks/colocate_plan.py               # Llama-3.1-8B on H100-80GB and A100-40GB, Qwen2.5-7B
"""

from __future__ import annotations

import json

from llmtune.memory import ModelSpec, estimate_training

GiB = 2**30


def case(model: str, method: str, gpu: str, util: float, prompts: int = 1, samples: int = 8,
         seq_len: int = 1024) -> dict[str, object]:
    spec = ModelSpec.from_preset(model)
    e = estimate_training(spec, method, batch_size=prompts, seq_len=seq_len, gradient_checkpointing=True,
                          objective="online_rl", rl_samples=samples, generator="vllm", gpu=gpu,
                          vllm={"gpu_memory_utilization": util})
    b = e.breakdown
    engine = b.get("vllm_weights", 0) + b.get("vllm_kv_cache_pool", 0)
    cap = e.capacity
    return {"model": model, "method": method, "gpu": gpu, "gpu_memory_utilization": util,
            "prompts_x_samples": f"{prompts}x{samples}", "seq_len": seq_len,
            "device_GiB": round(e.device_bytes / GiB, 2), "fits": e.fits(gpu), "peak_phase": e.peak_phase,
            "training_GiB": round((e.device_bytes - engine) / GiB, 2),
            "vllm_weights_GiB": round(b.get("vllm_weights", 0) / GiB, 2),
            "vllm_kv_pool_GiB": round(b.get("vllm_kv_cache_pool", 0) / GiB, 2),
            "kv_tokens": cap.kv_tokens if cap else 0, "blockers": list(e.blockers)}


def best_utilization(model: str, method: str, gpu: str) -> dict[str, object]:
    """The largest gpu_memory_utilization (steps of 0.05) at which the plan fits, with its KV pool."""
    fitting = [c for u in range(5, 100, 5) if (c := case(model, method, gpu, u / 100))["fits"]]
    if not fitting:
        return {"model": model, "method": method, "gpu": gpu, "best_gpu_memory_utilization": None}
    top = fitting[-1]
    return {"model": model, "method": method, "gpu": gpu, "best_gpu_memory_utilization": top["gpu_memory_utilization"],
            "smallest_fitting": fitting[0]["gpu_memory_utilization"], "device_GiB": top["device_GiB"],
            "kv_tokens": top["kv_tokens"]}


def main() -> None:
    for gpu in ("H100-80GB", "A100-40GB"):
        for method in ("lora", "qlora", "full"):
            for util in (0.3, 0.45, 0.6):
                print(json.dumps(case("llama-3.1-8b", method, gpu, util)))
    for gpu in ("H100-80GB", "A100-40GB"):
        for method in ("lora", "qlora"):
            print(json.dumps(best_utilization("llama-3.1-8b", method, gpu)))
    for util in (0.3, 0.5):
        print(json.dumps(case("qwen2.5-7b", "lora", "H100-80GB", util)))


if __name__ == "__main__":
    main()
