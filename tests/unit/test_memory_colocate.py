"""The memory plan of online RL with a colocated vLLM engine: the training phases plus the engine that
`estimate_serving(engine="vllm")` sizes, and the three ways it can fail."""

from __future__ import annotations

import pytest

from llmtune.core.errors import InvalidOptionError
from llmtune.memory import ModelSpec, estimate_serving, estimate_training, gpu_bytes
from llmtune.memory.weights import weight_terms

SPEC = ModelSpec.from_preset("llama-3.1-8b")
RUN = {"batch_size": 2, "seq_len": 1024, "objective": "online_rl", "rl_samples": 8}


def test_engine_is_the_serving_estimate_and_is_added_to_every_training_phase() -> None:
    engine = {"gpu_memory_utilization": 0.3, "max_model_len": 1024, "max_num_seqs": 16, "max_num_batched_tokens": 4096}
    plan = estimate_training(SPEC, "lora", generator="vllm", gpu="H100-80GB", vllm={"gpu_memory_utilization": 0.3},
                             **RUN)
    served = estimate_serving(SPEC, 16, engine="vllm", gpu="H100-80GB", vllm=engine)
    assert plan.capacity == served.capacity  # the same block pool vLLM computes (TRL's colocate defaults)
    held = {"vllm_weights": sum(weight_terms(SPEC, "bf16", bits=16).values()),
            "vllm_kv_cache_pool": served.capacity.kv_pool_bytes}
    alone = estimate_training(SPEC, "lora", **RUN)
    for phase, total in alone.phases.items():
        if phase == "generation":  # vLLM generates, not the policy
            assert phase not in plan.phases
        else:
            assert plan.phases[phase] == total + sum(held.values())
    assert plan.phases["vllm_generation"] > plan.phases["optimizer_step"]  # + the profiled temporaries
    assert plan.fits("H100-80GB") and not plan.blockers
    assert plan.device_bytes > alone.device_bytes + sum(held.values()) - alone.phases["generation"]


def test_blockers_say_why_vllm_would_not_start() -> None:
    small = estimate_training(SPEC, "lora", generator="vllm", gpu="A100-40GB", **RUN)  # 0.3 x 40 GB < 16 GB weights
    assert not small.fits("A100-40GB") and "no KV block fits" in small.blockers[0]
    long = estimate_training(SPEC, "lora", generator="vllm", gpu="H100-80GB",
                             vllm={"max_model_len": 131072}, **RUN)  # the model's full context, TRL's unset default
    assert any("refuses max_model_len=131072" in b for b in long.blockers) and not long.fits("H100-80GB")
    full = estimate_training(SPEC, "full", generator="vllm", gpu="A100-40GB", vllm={"gpu_memory_utilization": 0.5},
                             **RUN)
    assert any("free after loading the policy" in b for b in full.blockers)
    with pytest.raises(InvalidOptionError, match="pass gpu="):
        estimate_training(SPEC, "lora", generator="vllm", **RUN)
    with pytest.raises(InvalidOptionError, match="objective='sft' generates nothing"):
        estimate_training(SPEC, "lora", generator="vllm", gpu="H100")
    with pytest.raises(InvalidOptionError, match="gpu_mem_util"):
        estimate_training(SPEC, "lora", generator="vllm", gpu="H100", vllm={"gpu_mem_util": 0.3}, **RUN)


def test_qlora_policy_gets_a_4bit_engine_as_trl_starts_it() -> None:
    plan = estimate_training(SPEC, "qlora", generator="vllm", gpu="H100-80GB", **RUN)
    assert plan.breakdown["vllm_weights"] == sum(weight_terms(SPEC, "nf4", bits=4).values())
    assert plan.fits("H100-80GB") and plan.device_bytes < gpu_bytes("H100-80GB")


def test_train_check_sizes_a_colocated_engine_per_gpu() -> None:
    import types

    import llmtune
    from llmtune.trainers._memory_gate import estimate_for_config

    trainer = llmtune.get_trainer("grpo", method="lora", batch_size=2, max_length=1024, samples=8, generator="vllm",
                                  gradient_checkpointing=True,
                                  vllm={"model": "meta-llama/Llama-3.1-8B", "gpu_memory_utilization": 0.3,
                                        "dtype": "bf16"})
    config = types.SimpleNamespace(trainer=trainer, model="meta-llama/Llama-3.1-8B", eval_data=None, eval_tasks=None)
    _, rows = estimate_for_config(config, spec=SPEC)
    by = {r["gpu"]: r for r in rows}
    assert by["H100-80GB"]["fits"] and not by["A100-40GB"]["fits"]
    assert "no KV block fits" in by["A100-40GB"]["notes"][0]
    assert any("'dtype': not modelled" in n for n in by["H100-80GB"]["notes"])
