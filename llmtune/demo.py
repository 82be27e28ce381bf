"""The end-to-end demo, offline on a CPU: tiny model -> pretraining -> LoRA fine-tuning -> ROUGE-L/BLEU before/after.

``llmtune demo --out DIR`` calls `run_demo`. Every step is the real library path a user would take, at toy size:

1. train a byte-level BPE tokenizer on the bundled kopitiam corpus and build a tiny Llama (`llmtune.models.tiny`);
2. pretrain it briefly with the ``pretrain`` trainer (next-token prediction on the corpus, streamed into
   64-token blocks; a few documents held out for validation perplexity), so it knows some English;
3. fine-tune it with the ``lora`` trainer on the bundled instruction set (kopitiam orders -> plain English,
   e.g. "Kopi O Kosong" -> "Black coffee, no sugar."), holding out whole drinks for evaluation;
4. answer the held-out orders greedily before and after, and score them with ROUGE-L and BLEU (`llmtune.metrics`);
5. print the GPU-memory estimate of the same run (`llmtune.memory`), save the adapter, write ``summary.json``.

Deterministic for a given seed on a given machine (fixed seeds, fixed data order, greedy decoding).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmtune.core.units import MiB

#: The settings of the full demo (about two to three minutes on a 2-core CPU).
DEFAULTS: dict[str, Any] = {
    "pretrain_steps": 300,
    "epochs": 4,
    "rank": 16,
    "alpha": 32,
    "lr": 2e-3,
    "batch_size": 16,
    "max_new_tokens": 24,
}


def _memory_lines(model: Any, *, batch_size: int, seq_len: int, rank: int) -> tuple[list[str], dict[str, Any]]:
    """The `llmtune.memory` estimate of this fine-tuning run (llmtune's recipe and the plain HF one)."""
    from llmtune.memory import ModelSpec, estimate_training

    spec = ModelSpec.from_hf_config(model.config.to_dict(), name="tiny-llama")
    lines, data = [], {}
    for recipe in ("llmtune", "hf"):
        est = estimate_training(spec, "lora", batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=False,
                                lora_rank=rank, lora_targets="all-linear", recipe=recipe)
        data[recipe] = {"peak_tensor_bytes": est.peak_tensor_bytes, "device_bytes": est.device_bytes}
        lines.append(f"  recipe {recipe:8s} peak tensors {est.peak_tensor_bytes / MiB:8.1f} MiB, "
                     f"device {est.device_bytes / MiB:8.1f} MiB (bf16 base on a GPU, incl. CUDA context)")
    return lines, data


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    pretrain_steps: int | None = None,
    epochs: int | None = None,
    eval_examples: int = 0,
    progress: bool = False,
    threads: int | None = 1,
    echo: Callable[[str], None] = print,
    callbacks: Sequence[Any] = (),
    rlhf: bool = False,
    rlhf_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the demo into directory ``out``; returns (and writes to ``out/summary.json``) the summary.

    ``pretrain_steps``/``epochs`` shorten it (tests); ``eval_examples`` limits the held-out set (0 = all of it).
    ``echo`` receives the demo's lines; ``callbacks`` are attached to both training runs (``progress=True``
    adds a `ProgressBar` to them: the caller asks for output, the library prints nothing by itself).
    ``threads``: torch CPU threads during the demo (restored after; None = leave as is). One thread is the
    default: for a model this small a second thread barely helps, a busy machine makes OpenMP threads spin
    (10x slower), and a fixed count keeps the numbers identical from machine to machine.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cbs = list(callbacks)
        if progress:
            from llmtune.trainers.callbacks import ProgressBar

            cbs.append(ProgressBar())
        summary = _run_demo(out, seed=seed, pretrain_steps=pretrain_steps, epochs=epochs,
                            eval_examples=eval_examples, echo=echo, callbacks=cbs, threads=threads)
        if rlhf:
            summary.update(rlhf_stage(out, summary, settings=rlhf_settings, echo=echo))
            summary["seconds"] = summary["seconds"] + summary["rlhf_seconds"]
            Path(out, "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(model: Any, tokenizer: Any, out: Path, *, steps: int, seed: int, threads: int | None,
              callbacks: list[Any]) -> Any:
    """The ``pretrain`` trainer on the bundled corpus (the last documents held out); returns its result."""
    import llmtune
    from llmtune.data import bundled_corpus

    texts = bundled_corpus()
    held = max(1, len(texts) // 10)
    trainer = llmtune.get_trainer(
        "pretrain", lr=3e-3, max_steps=steps, batch_size=8, max_length=64, warmup=min(20, steps // 10),
        weight_decay=0.01, max_grad_norm=1.0, seed=seed, eval_examples=0, eval_batch_size=16,
        num_threads=threads or "auto")
    return trainer.train(model, texts[:-held], eval_data=texts[-held:], tokenizer=tokenizer,
                         output_dir=out / "pretrain", callbacks=callbacks, overwrite=True)


def _run_demo(out: str | Path, *, seed: int, pretrain_steps: int | None, epochs: int | None, eval_examples: int,
              echo: Callable[[str], None], callbacks: list[Any], threads: int | None) -> dict[str, Any]:
    import torch

    import llmtune
    from llmtune.core.paths import check_output_dir
    from llmtune.models.tiny import build_tiny_model, split_instructions, train_tiny_tokenizer

    t0 = time.perf_counter()
    out = check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(DEFAULTS)
    if pretrain_steps is not None:
        cfg["pretrain_steps"] = pretrain_steps
    if epochs is not None:
        cfg["epochs"] = epochs

    echo(f"[1/5] tokenizer and tiny Llama (seed {seed})")
    tokenizer = train_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    echo(f"      vocab {len(tokenizer)}, {n_params / 1e6:.2f} M parameters, torch threads {torch.get_num_threads()}")

    echo(f"[2/5] pretraining on the bundled corpus ({cfg['pretrain_steps']} steps)")
    losses, ppl, base_dir = _pretrain_stage(model, tokenizer, out, cfg, seed, threads, callbacks, echo)

    from llmtune.tasks.kopitiam import evaluate_kopitiam, evaluate_kopitiam_adapter

    mc_before = evaluate_kopitiam(model, tokenizer)  # the bundled made-up kopitiam-mc task, before fine-tuning
    train, heldout = split_instructions(seed=seed)
    if eval_examples:
        heldout = heldout[:eval_examples]
    echo(f"[3/5] LoRA fine-tuning on {len(train)} kopitiam orders, {len(heldout)} held-out drinks "
         f"(rank {cfg['rank']}, {cfg['epochs']} epochs)")
    trainer = llmtune.get_trainer(
        "lora", rank=cfg["rank"], alpha=cfg["alpha"], dropout=0.0, lr=cfg["lr"], epochs=cfg["epochs"],
        batch_size=cfg["batch_size"], warmup=0.05, template="llama3", max_length=128, eval_examples=0,
        eval_batch_size=32, max_new_tokens=cfg["max_new_tokens"], seed=seed, loss_chunk_tokens=1024,
        num_threads=threads or "auto")
    t = time.perf_counter()
    result = trainer.train(model, train, eval_data=heldout, tokenizer=tokenizer, output_dir=out / "run",
                           callbacks=callbacks, overwrite=True)  # a rerun of the demo replaces its run
    train_seconds = time.perf_counter() - t
    before, after = result.eval.get("before", {}), result.eval.get("after", {})
    echo(f"      {len(result.history)} steps in {train_seconds:.1f} s; loss {result.history[0]['loss']:.3f} -> "
         f"{result.history[-1]['loss']:.3f}")

    echo("[4/5] held-out evaluation (greedy answers)")
    echo(f"      ROUGE-L {before.get('rougeL', float('nan')):.3f} -> {after.get('rougeL', float('nan')):.3f}   "
         f"BLEU {before.get('bleu', float('nan')):.2f} -> {after.get('bleu', float('nan')):.2f}")
    mc_after = evaluate_kopitiam_adapter(base_dir, result.adapter_dir)
    echo(f"      kopitiam-mc acc {mc_before['acc']:.3f} -> {mc_after.get('acc', float('nan')):.3f} "
         f"(acc_norm {mc_before['acc_norm']:.3f} -> {mc_after.get('acc_norm', float('nan')):.3f})")
    samples = _samples(out / "run", 3)
    for s in samples:
        echo(f"      want {s['reference']!r}  got {s['prediction']!r}")

    echo("[5/5] memory estimate of this run on a GPU (llmtune.memory)")
    seq_len, memory = _memory_stage(model, tokenizer, train, cfg, echo)

    seconds = time.perf_counter() - t0
    summary = {
        "rougeL_before": before.get("rougeL"), "rougeL_after": after.get("rougeL"),
        "bleu_before": before.get("bleu"), "bleu_after": after.get("bleu"),
        "rouge1_before": before.get("rouge1"), "rouge1_after": after.get("rouge1"),
        "exact_match_before": before.get("exact_match"), "exact_match_after": after.get("exact_match"),
        "seconds": seconds, "train_seconds": train_seconds,
        "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
        "output_dir": str(out / "run"), "base_model_dir": str(base_dir), "seed": seed, "settings": cfg,
        "pretrain_loss_first": losses[0], "pretrain_loss_last": losses[-1],
        "pretrain_perplexity_before": ppl[0], "pretrain_perplexity_after": ppl[1],
        "train_loss_first": result.history[0]["loss"], "train_loss_last": result.history[-1]["loss"],
        "train_examples": len(train), "heldout_examples": len(heldout), "parameters": n_params,
        "trainable_parameters": result.extra.get("trainable_parameters"),
        "memory_estimate": {"batch_size": cfg["batch_size"], "seq_len": seq_len, **memory},
        "torch_threads": torch.get_num_threads(),
        "kopitiam_mc_acc_before": mc_before["acc"], "kopitiam_mc_acc_after": mc_after.get("acc"),
        "kopitiam_mc_acc_norm_before": mc_before["acc_norm"], "kopitiam_mc_acc_norm_after": mc_after.get("acc_norm"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    echo(f"done in {seconds:.1f} s; adapter {summary['adapter_dir']}; summary {out / 'summary.json'}")
    return summary


def _pretrain_stage(model: Any, tokenizer: Any, out: Path, cfg: dict[str, Any], seed: int, threads: int | None,
                    callbacks: list[Any], echo: Callable[[str], None]) -> tuple[list[float], tuple[Any, Any], Path]:
    """Step 2: pretrain, echo the curve, save the base; returns (losses, (ppl before, after), base dir)."""
    t = time.perf_counter()
    pre = _pretrain(model, tokenizer, out, steps=cfg["pretrain_steps"], seed=seed, threads=threads,
                    callbacks=callbacks)
    losses = [h["loss"] for h in pre.history]
    ppl = (pre.eval.get("before", {}).get("perplexity"), pre.eval.get("after", {}).get("perplexity"))
    echo(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f}, held-out perplexity {ppl[0]:.1f} -> {ppl[1]:.1f} "
         f"in {time.perf_counter() - t:.1f} s")
    model.eval()
    # saved so that `llmtune generate/merge --adapter OUT/run/adapter` find the base the adapter records
    base_dir = out / "base-model"
    model.save_pretrained(str(base_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(base_dir))
    model.config._name_or_path = str(base_dir.resolve())
    model.name_or_path = str(base_dir.resolve())  # what PEFT records as base_model_name_or_path
    return losses, ppl, base_dir


def _memory_stage(model: Any, tokenizer: Any, train: list[dict[str, Any]], cfg: dict[str, Any],
                  echo: Callable[[str], None]) -> tuple[int, dict[str, Any]]:
    """Step 5: the memory estimate of the fine-tuning run, echoed; returns (sequence length, estimate)."""
    longest = max(len(tokenizer(r["instruction"] + r.get("input", "") + r["output"])["input_ids"]) for r in train)
    seq_len = min(128, longest + 16)
    lines, memory = _memory_lines(model, batch_size=cfg["batch_size"], seq_len=seq_len, rank=cfg["rank"])
    for line in lines:
        echo(line)
    return seq_len, memory


def _samples(run_dir: Path, n: int) -> list[dict[str, str]]:
    """The first ``n`` held-out predictions after training, for a human to eyeball."""
    path = run_dir / "eval-after.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


def rlhf_stage(out: str | Path, summary: dict[str, Any], *, settings: dict[str, Any] | None = None,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The second act: the bundled "human" rule ranks the SFT model's sampled answers -> reward model -> RLOO.

    Loads the fine-tuned model the first act saved (base + adapter, merged), then runs
    `llmtune.trainers.rlhf.kopitiam.run_rlhf_act` (writes ``out/rlhf/``); returns the numbers for the summary.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.models.tiny import split_instructions
    from llmtune.trainers.rlhf.kopitiam import run_rlhf_act

    echo("[6/6] RLHF: the bundled ranking rule ranks sampled answers -> reward model -> RLOO")
    tokenizer = AutoTokenizer.from_pretrained(summary["base_model_dir"])
    base = AutoModelForCausalLM.from_pretrained(summary["base_model_dir"])
    sft = PeftModel.from_pretrained(base, summary["adapter_dir"]).merge_and_unload()
    train, heldout = split_instructions(seed=summary["seed"])
    if summary.get("heldout_examples"):
        heldout = heldout[:summary["heldout_examples"]]
    result = run_rlhf_act(sft, tokenizer, train, heldout, Path(out) / "rlhf", seed=summary["seed"],
                          settings=settings, echo=echo)
    result["rlhf_memory_estimate"] = _rlhf_memory(sft, rank=result["rlhf_settings"]["rank"],
                                                  samples=result["rlhf_settings"]["samples"])
    echo(f"      held-out reward of sampled answers {result['heldout_reward_sft']:.3f} (SFT) -> "
         f"{result['heldout_reward_rl']:.3f} (RLOO); win-rate vs SFT {result['win_rate_vs_sft']:.3f} by the rule "
         f"(greedy answers: {result['greedy_win_rate_vs_sft']:.3f}, exact {result['greedy_exact_match_sft']:.3f} -> "
         f"{result['greedy_exact_match_rl']:.3f}); {result['rlhf_seconds']:.1f} s")
    return result


def _rlhf_memory(model: Any, *, rank: int, samples: int) -> dict[str, int]:
    """`llmtune.memory`'s peak-tensor estimate (bytes, bf16 on a GPU) of the act's three objectives."""
    from llmtune.memory import ModelSpec, estimate_training

    spec = ModelSpec.from_hf_config(model.config.to_dict(), name="tiny-llama")
    out = {}
    for objective in ("reward", "dpo", "online_rl"):
        est = estimate_training(spec, "lora", batch_size=8, seq_len=64, gradient_checkpointing=False, lora_rank=rank,
                                lora_targets="all-linear", objective=objective, rl_samples=samples)
        out[objective] = est.peak_tensor_bytes
    return out
