"""Pre-run memory gate: a training config mapped to the memory model's arguments, and a verdict per GPU.

`estimate_for_config` is a pure function (no torch, no GPU, nothing printed): it reads the trainer's and
the quantizer's options, turns them into `llmtune.memory.estimate_training` arguments and returns the
estimate with a fit verdict per GPU. Every option is either mapped (`MAPPED`) or declared irrelevant to
the peak with the reason (`IRRELEVANT`); tests/unit/test_memory_gate.py fails when an options class gains a
field that is in neither table, so the trainer and the memory model cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError

#: Options class name -> {field: estimator argument it becomes (or what it decides)}.
MAPPED: dict[str, dict[str, str]] = {
    "PeftLoraOptions": {
        "method": "method (lora / dora / prompt_tuning / prefix_tuning / ia3 / bottleneck / full; lora with a "
                  "quantizer: qlora)",
        "optimizer": "optimizer (adamw / adamw_8bit / sgd / sgd_momentum)",
        "rank": "lora_rank",
        "dropout": "lora_dropout",
        "targets": "lora_targets",
        "num_virtual_tokens": "num_virtual_tokens",
        "bottleneck_size": "bottleneck_size",
        "bottleneck_sites": "bottleneck_sites (attn -> attention, mlp -> mlp)",
        "bottleneck_placement": "bottleneck_placement",
        "quantizer": "method='qlora', weight_format, double_quant",
        "upcast_embeddings": "recipe.kbit_upcast_fp32",
        "gradient_checkpointing": "gradient_checkpointing",
        "distributed": "sharding ('fsdp' with more than one process: weights, gradients, optimizer states sharded)",
        "precision": "precision (auto/bf16/fp16 -> 2-byte activations, fp32 -> fp32)",
        "batch_size": "batch_size",
        "max_length": "seq_len (every micro-batch padded or packed to max_length: the worst case)",
        "packing": "packing",
        "loss_chunk_tokens": "loss_chunk_tokens (0: recipe.loss='full_fp32')",
        "eval_batch_size": "evaluation phase: estimate_serving batch_size",
        "max_new_tokens": "evaluation phase: estimate_serving seq_len = max_length + max_new_tokens",
    },
    "FourBitOptions": {
        "double_quant": "double_quant",
        "skip_modules": "checked: a list other than ('lm_head',) is reported as not modelled",
    },
    "DpoTrainOptions": {"reference": "dpo_reference (adapter_off; precomputed: no copy, the pass runs once)"},
    "RewardTrainOptions": {},
    "OnlineTrainOptions": {"samples": "rl_samples", "generator": "generator (hf: generate on the policy; vllm: a colocated engine)",
                           "vllm": "vllm (the colocated engine: gpu_memory_utilization, max_model_len, ...)"},
    "Int8Options": {
        "has_fp16_weights": "weight_format (True keeps 16-bit weights)",
        "skip_modules": "checked: a list other than ('lm_head',) is reported as not modelled",
    },
}

#: Options class name -> {field: why it does not change the peak}.
IRRELEVANT: dict[str, dict[str, str]] = {
    "PeftLoraOptions": {
        "alpha": "a scalar multiplier on the adapter output",
        "trust_remote_code": "how the model code is loaded",
        "lr": "a scalar", "epochs": "how long, not how much", "max_steps": "how long, not how much",
        "grad_accum": "micro-batches accumulate into the same .grad buffers",
        "warmup": "a schedule", "scheduler": "a schedule", "weight_decay": "AdamW's in-place decay, no buffer",
        "max_grad_norm": "clip_grad_norm_ keeps one scalar norm per parameter tensor",
        "template": "text formatting (the token count is bounded by max_length)",
        "train_on_prompt": "which labels are -100, not how many tokens",
        "train_on": "which labels are -100, not how many tokens",
        "system_prompt": "text formatting (the token count is bounded by max_length)",
        "rslora": "a scalar multiplier on the adapter output (alpha/sqrt(r) instead of alpha/r)",
        "init": "initial values of the same tensors; PiSSA/OLoRA/LoftQ decompose one weight at a time before "
                "training (a start-up transient, not modelled)",
        "loraplus_ratio": "LoRA+ splits the same parameters into two optimizer groups: the same AdamW states",
        "bottleneck_scaling": "a scalar multiplier on the adapter output",
        "bottleneck_non_linearity": "the estimator counts h + 2m saved per token and site; tanh/relu save their "
                                    "output only (h + m, measured), so for those it over-estimates by m",
        "eval_every": "how often evaluation runs, not its size",
        "eval_examples": "how many batches evaluation runs, not their size",
        "save_every": "checkpoints are written from the state dicts, no GPU copy",
        "keep_checkpoints": "files on disk", "seed": "randomness", "output_dir": "a path",
        "log_every": "logging", "progress": "a progress bar",
        "divergence_factor": "a check on the loss value", "num_threads": "CPU threads",
        "early_stopping_patience": "when the run ends, not how much it holds",
    },
    # PretrainOptions = PeftLoraOptions' fields (other defaults) plus these
    "PretrainOptions": {"chunk_bytes": "text read and tokenized on the CPU", "text_field": "which field holds the text"},
    "FourBitOptions": {
        "compute_dtype": "bitsandbytes casts the matmul output back to the input dtype; only the transient "
                         "dequantized weight (the largest linear) changes size",
        "blocksize": "absmax metadata: 0.2% of the 4-bit weights at 64, less at larger blocks",
        "quant_storage": "the same packed bytes under another dtype",
    },
    "Int8Options": {"threshold": "outlier columns are computed in a transient fp16 slice"},
    # the preference / online-RL options classes = TrainOptions' fields plus these
    "DpoTrainOptions": {"beta": "a scalar in the loss", "label_smoothing": "a scalar in the loss",
                        "simpo_gamma": "a scalar in the loss",
                        "ranking_loss": "pairwise or listwise: the same rows scored, another loss over them",
                        "loss_type": "every loss type scores the same chosen + rejected rows (SimPO/ORPO skip the "
                                     "reference pass: the estimate keeps it, an over-estimate of its phase only)"},
    "RewardTrainOptions": {"use_margin": "a scalar per pair",
                           "center_rewards_coefficient": "a scalar penalty on the scores",
                           "add_score_head": "the score head is h x 1 either way (counted)",

                           "ranking_loss": "pairwise or listwise: the same rows scored, another loss over them"},
    "OnlineTrainOptions": {"reward_model": "scored with no grad after generation, before the policy step (its "
                                           "weights are not counted: an under-estimate by the reward model's size)",
                           "kl_coef": "a scalar in the loss", "temperature": "sampling, not how much",
                           "reward_model_weight": "a scalar on the scores",
                           "reward_funcs": "Python functions of the decoded texts, on the CPU",
                           "loss_type": "how per-token losses are averaged: the same logits and log-probs"},
}


#: Top-level config keys (`_config.TOP_LEVEL`) -> how the gate treats them; guarded like the option tables.
CONFIG_KEYS: dict[str, str] = {
    "model": "mapped: the ModelSpec (config.json or a preset)", "tokenizer": "irrelevant: no device memory",
    "data": "read for dpo / reward: the rows and pairs its largest rankings become (responses); else irrelevant", "eval_data": "mapped: the evaluation generation phase",
    "output_dir": "irrelevant: a path", "resume": "irrelevant: the same run", "trainer": "mapped: its options",
    "quantizer": "mapped: its options", "loggers": "irrelevant: CPU-side logging",
    "eval_tasks": "not modelled: task scoring (no-grad forwards of batch_size sequences) is reported in notes",
    "val_size": "irrelevant: which records are held out, not how long a batch is (the held-out set is evaluated "
                "like eval_data)",
    "dedup": "irrelevant: which records train, not how long a batch is",
}


def model_spec(model: str) -> Any:
    """The ModelSpec of a config's ``model``: its config.json when local, else a preset named like the hub id."""
    from llmtune.memory import PRESETS, ModelSpec
    from llmtune.models.loading import gguf_path, model_config

    path = Path(model)
    if gguf_path(path) is not None:
        return ModelSpec.from_hf_config(model_config(path))
    if (path / "config.json").is_file() or path.name == "config.json":
        return ModelSpec.from_hf_config(path)
    key = re.sub(r"[^a-z0-9.]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-").replace("meta-", "")
    if key in PRESETS:
        return ModelSpec.from_preset(key)
    raise ConfigError(f"model {model!r}: no local config.json and no preset named {key!r}; pass spec= "
                      "(llmtune.memory.ModelSpec.from_hf_config) to estimate its memory")


def ranking_rows(data: Any, batch_size: int, notes: list[str]) -> int:
    """Answers per example to estimate with: the largest micro-batch of rankings in ``data`` (its ``batch_size``
    largest) puts every answer through the model once, so its rows / ``batch_size``, rounded up (2 for pairs)."""
    from llmtune.data.preference import load_preference_records

    sizes = sorted((len(getattr(r, "responses", ())) or 2 for r in load_preference_records(data)), reverse=True)
    rows = sum(sizes[:batch_size])
    if sizes[0] > 2:
        notes.append(f"rankings of up to {sizes[0]} answers: the largest micro-batch ({min(batch_size, len(sizes))} "
                     f"rankings) puts {rows} answers through the model, each once, and scores up to "
                     f"{sum(k * (k - 1) // 2 for k in sizes[:batch_size])} pairs")
    return max(2, -(-rows // batch_size))


def training_arguments(options: Any, backend: str) -> tuple[dict[str, Any], list[str]]:
    """`estimate_training` keyword arguments for a trainer's options, and the notes on what is not modelled."""
    from llmtune.memory.recipes import RECIPE_FACTS

    o, notes = options, list[str]()
    q = getattr(o, "quantizer", None)
    recipe = RECIPE_FACTS["unsloth" if backend == "unsloth" else "llmtune"]
    if backend != "unsloth":
        recipe = dataclasses.replace(recipe, name="llmtune", kbit_upcast_fp32=bool(o.upcast_embeddings),
                                     loss="full_fp32" if o.loss_chunk_tokens == 0 else "chunked")
    kw: dict[str, Any] = dict(
        batch_size=o.batch_size, seq_len=o.max_length, gradient_checkpointing=o.gradient_checkpointing,
        lora_rank=o.rank, lora_dropout=float(o.dropout), lora_targets=o.targets, recipe=recipe, packing=o.packing,
        precision="fp32" if o.precision == "fp32" else "bf16", loss_chunk_tokens=max(1, o.loss_chunk_tokens),
        num_virtual_tokens=o.num_virtual_tokens, method=o.method, optimizer=getattr(o, "optimizer", "adamw"))
    if o.method == "bottleneck":
        sites = (o.bottleneck_sites,) if isinstance(o.bottleneck_sites, str) else tuple(o.bottleneck_sites)
        kw |= {"bottleneck_size": o.bottleneck_size, "bottleneck_placement": o.bottleneck_placement,
               "bottleneck_sites": tuple({"attn": "attention"}.get(x, x) for x in sites)}
    if getattr(o, "distributed", "ddp") == "fsdp":
        kw["sharding"] = "fsdp"
    if q is not None:
        kw |= _quantizer_arguments(q, o.method, notes)
    if o.method in _UNQUANTIZED_ONLY and q is not None:
        notes.append(f"{o.method} on a quantized base: weights counted in 16 bits (an over-estimate)")
    return kw, notes


#: the engine options of ``vllm:`` that `llmtune.memory.colocate` models (the others go to vllm.LLM unmodelled)
_ESTIMATED_VLLM_OPTIONS = ("gpu_memory_utilization", "block_size", "max_num_seqs", "max_model_len",
                           "max_num_batched_tokens")

#: methods the estimator models on a 16/32-bit base only
_UNQUANTIZED_ONLY = ("prompt_tuning", "prefix_tuning", "ia3", "bottleneck")


def _quantizer_arguments(q: Any, method: str, notes: list[str]) -> dict[str, Any]:
    """Arguments a bitsandbytes quantizer decides."""
    qo = q.options
    if tuple(getattr(qo, "skip_modules", ("lm_head",))) != ("lm_head",):
        notes.append(f"quantizer skip_modules={list(qo.skip_modules)}: modules kept in 16 bits beyond lm_head are "
                     "not modelled (an under-estimate)")
    if q.name == "int8" and getattr(qo, "has_fp16_weights", False):
        return {}
    out: dict[str, Any] = {"weight_format": {"nf4": "nf4", "fp4": "fp4", "int8": "int8"}.get(q.name, q.name)}
    if method not in _UNQUANTIZED_ONLY:
        out["method"] = "qlora"
        if method == "dora":
            notes.append("DoRA on a quantized base: counted as QLoRA (the magnitude vectors are not counted)")
    else:
        out.pop("weight_format")
    if q.name in ("nf4", "fp4"):
        out["double_quant"] = bool(qo.double_quant)
    return out


def estimate_for_config(config: Any, gpu: str | int | None = None, *, spec: Any = None,
                        processes: int = 1) -> tuple[Any, list[dict[str, Any]]]:
    """The memory estimate of a training config (`TrainConfig`) and a verdict table, one row per GPU.

    ``gpu``: one GPU name or byte count (default: every GPU in ``llmtune.memory.GPUS``). ``processes`` > 1:
    data parallel (DDP), ``batch_size`` per process. Each row: ``gpu``, ``capacity_bytes``, ``device_bytes``
    (the larger of the training step and, when the config has ``eval_data``, an evaluation generation), ``fits``, ``headroom_bytes``, ``notes``.
    """
    from llmtune.memory import GPUS, estimate_serving, estimate_training, gpu_bytes

    trainer = config.trainer
    spec = spec if spec is not None else model_spec(config.model)
    kw, notes = training_arguments(trainer.options, getattr(type(trainer), "backend", "peft"))
    objective = getattr(type(trainer), "objective", "sft")
    if objective in ("dpo", "reward"):   # every answer of a ranking is a row, every pair a loss term; DPO's reference
        kw |= {"objective": objective, "responses": ranking_rows(config.data, trainer.options.batch_size, notes)}
        if objective == "dpo":  # llmtune's DPO takes full-vocabulary fp32 log-probs of every row (no chunks)
            kw["recipe"] = dataclasses.replace(kw["recipe"], loss="full_fp32")
            kw["dpo_reference"] = trainer.options.reference
    elif objective in ("rloo", "grpo"):  # K sampled answers per prompt (KV cache), the adapter-off reference
        kw.update(objective="online_rl", rl_samples=trainer.options.samples)
    o = trainer.options
    targets = {str(gpu): gpu_bytes(gpu)} if gpu is not None else dict(GPUS)
    if kw.get("objective") == "online_rl" and getattr(o, "generator", "hf") == "vllm":
        engine = {k: v for k, v in dict(o.vllm or {}).items() if k != "model"}
        notes += [f"vllm option {k!r}: not modelled" for k in engine if k not in _ESTIMATED_VLLM_OPTIONS]
        modelled = {k: v for k, v in engine.items() if k in _ESTIMATED_VLLM_OPTIONS}
        return _colocated_rows(spec, kw, modelled, processes, targets, notes)
    est = estimate_training(spec, gpus=processes, **kw)
    q = o.quantizer
    bits = {"nf4": 4, "fp4": 4, "int8": 8}.get(q.name, 16) if q is not None else 16
    serve = estimate_serving(spec, bits, batch_size=o.eval_batch_size, seq_len=o.max_length + o.max_new_tokens,
                             logits="last")
    held = sum(est.breakdown.get(k, 0) for k in ("lora_params", "optimizer_states"))
    eval_device = serve.device_bytes + held if getattr(config, "eval_data", None) else 0
    device = max(est.device_bytes, eval_device)
    if eval_device > est.device_bytes:
        notes.append(f"evaluation generation (batch {o.eval_batch_size}, {o.max_length + o.max_new_tokens} tokens) "
                     "needs more than the training step")
    if getattr(config, "eval_tasks", None):
        notes.append("eval_tasks: task scoring during training (no-grad forwards) is not modelled")
    rows = [{"gpu": name, "capacity_bytes": cap, "device_bytes": device, "fits": device <= cap,
             "headroom_bytes": cap - device, "notes": list(notes)} for name, cap in targets.items()]
    return est, rows


def _colocated_rows(spec: Any, kw: dict[str, Any], engine: dict[str, Any], processes: int, targets: dict[str, int],
                    notes: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """Online RL with ``generator: vllm``: the engine is a fraction of each GPU, so one estimate per GPU; a row
    fits when the total does and vLLM would start (its blockers are the row's first notes)."""
    from llmtune.memory import estimate_training

    rows, first = [], None
    for name, cap in targets.items():
        est = estimate_training(spec, gpus=processes, generator="vllm", gpu=cap if name.isdigit() else name,
                                vllm=engine, **kw)
        first = first or est
        rows.append({"gpu": name, "capacity_bytes": cap, "device_bytes": est.device_bytes, "fits": est.fits(cap),
                     "headroom_bytes": cap - est.device_bytes, "notes": [*est.blockers, *notes]})
    return first, rows
