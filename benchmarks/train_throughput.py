"""Training throughput and peak memory: plain PEFT recipe vs llmtune `peft` vs llmtune `unsloth` (JSON lines).

Question (a) of the benchmark suite. For each model architecture (randomly initialised from its config, so no
download), method (LoRA, QLoRA), batch x sequence shape and recipe, it trains a few steps on the same random
token batch and prints one JSON line with tokens/s (median of the steps after the first), peak memory
(``torch.cuda.max_memory_allocated`` over load + steps, after a reset; on CPU the process's peak RSS, which is
not comparable across recipes), the loss at the first and the last step, and llmtune.memory's prediction
for the same run. At the end it prints one ``comparison`` line per (model, method, shape) with the ratios the
targets are about (unsloth vs plain tokens/s and peak memory, llmtune peft vs plain peak memory and loss).

Recipes (all LoRA r=16, alpha=16, dropout 0 on the seven linear projections, AdamW lr 1e-4 constant, no
clipping, gradient checkpointing on; QLoRA = NF4 + double quant):

* ``plain``: transformers + PEFT + bitsandbytes as most users write it (``../shared/memory/reference_recipe.py``:
  ``prepare_model_for_kbit_training`` for QLoRA, transformers' own loss);
* ``peft``: ``llmtune.get_trainer("lora", backend="peft")``: llmtune's whole training loop, fed these tokens
  through the public pre-tokenized path (``data=[{"input_ids": ..., "labels": ...}, ...]``);
* ``unsloth``: ``llmtune.get_trainer("lora", backend="unsloth")``, the same loop on the Unsloth backend;
* ``unsloth-plain``: Unsloth's own ``FastLanguageModel`` recipe, to see whether llmtune keeps its advantage.

Every recipe runs in its own process (Unsloth patches transformers when imported, and peak-memory counters
must not mix), with a time budget; a case that fails prints an ``error`` field instead of numbers.

    python benchmarks/train_throughput.py --smoke                      # CPU: tiny models, seconds per case
    python benchmarks/train_throughput.py --out results/train.jsonl   # GPU: the default grid (~4 min on an H100)
    python benchmarks/train_throughput.py --recipes unsloth --unsloth-python /path/to/venv/bin/python --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Architectures (randomly initialised): the target Llama-3.2-1B and a second family with other proportions.
MODELS: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                        max_position_embeddings=4096, rope_theta=500000.0),
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0),
    # --smoke: the same two families, tiny (hidden 128: bitsandbytes' CPU 4-bit packing needs >= 64)
    "tiny-llama": dict(arch="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=256),
    "tiny-qwen2": dict(arch="qwen2", vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=256),
}
RECIPES = ("plain", "peft", "unsloth", "unsloth-plain")
MEMORY_RECIPE = {"plain": "hf", "peft": "llmtune", "unsloth": "unsloth", "unsloth-plain": "unsloth"}
GPU_DEFAULT = dict(models="llama3.2-1b,qwen2.5-0.5b", grid="4x512,1x2048", steps=6)
SMOKE = dict(models="tiny-llama,tiny-qwen2", grid="2x64", steps=3)


# ====================================================================== driver (imports no torch)
def _parse_grid(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            b, s = item.lower().split("x")
            shapes.append((int(b), int(s)))
        except ValueError:
            raise SystemExit(f"--grid: {item!r} is not BATCHxSEQ (e.g. 4x512)") from None
    return shapes


_RUNNING: list[subprocess.Popen[str]] = []


def _on_term(signum: int, frame: Any) -> None:
    """A runner's timeout stops the driver: stop the child too, so it frees the GPU for the next benchmark."""
    for proc in _RUNNING:
        proc.kill()
    raise SystemExit(128 + signum)


def _child(python: str, args: list[str], timeout: float, sink: Any) -> list[dict[str, Any]]:
    """Run this script as a child; forward and collect its JSON lines (one per case)."""
    cmd = [python, str(Path(__file__).resolve()), *args]
    rows: list[dict[str, Any]] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", UNSLOTH_DISABLE_STATISTICS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    except OSError as exc:
        return [{"bench": "train_throughput", "error": f"cannot start {python}: {exc}"}]
    _RUNNING[:] = [proc]
    assert proc.stdout is not None
    deadline = time.time() + timeout
    import threading

    err_lines: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            del err_lines[:-40]

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    killer = threading.Timer(max(timeout, 1), proc.kill)
    killer.daemon = True  # never keeps the driver alive after it is told to stop
    killer.start()
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{") and '"bench": "train_throughput"' in line:
            row = json.loads(line)
            rows.append(row)
            print(line, flush=True)
            if sink is not None:
                sink.write(line + "\n")
                sink.flush()
    proc.wait()
    killer.cancel()
    t.join(timeout=5)
    if proc.returncode != 0:
        why = "timed out" if time.time() >= deadline else f"exit code {proc.returncode}"
        tail = "".join(err_lines[-12:])[-1500:]
        rows.append({"bench": "train_throughput", "child": args, "error": f"child {why}", "stderr_tail": tail})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (model, method, shape): the ratios the unsloth targets are about."""
    by: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == "case" and "error" not in r and "skipped" not in r:
            by.setdefault((r["model"], r["method"], r["batch"], r["seq"]), {})[r["recipe"]] = r
    out = []
    for (model, method, b, s), rec in sorted(by.items()):
        line: dict[str, Any] = {"bench": "train_throughput", "kind": "comparison", "model": model, "method": method,
                                "batch": b, "seq": s, "device": next(iter(rec.values()))["device"]}
        plain = rec.get("plain")
        for name in ("peft", "unsloth", "unsloth-plain"):
            other = rec.get(name)
            if plain is None or other is None:
                continue
            key = name.replace("-", "_")
            if plain.get("tokens_per_s") and other.get("tokens_per_s"):
                line[f"{key}_speedup"] = round(other["tokens_per_s"] / plain["tokens_per_s"], 3)
            if plain.get("peak_MiB") and other.get("peak_MiB") and plain["device"].startswith("cuda"):
                line[f"{key}_peak_ratio"] = round(other["peak_MiB"] / plain["peak_MiB"], 3)
            if plain.get("loss_last") is not None and other.get("loss_last") is not None:
                line[f"{key}_loss_diff"] = round(other["loss_last"] - plain["loss_last"], 4)
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help=f"tiny CPU grid: {SMOKE}")
    p.add_argument("--models", help=f"comma list from {', '.join(MODELS)} (default {GPU_DEFAULT['models']})")
    p.add_argument("--grid", help=f"BATCHxSEQ list (default {GPU_DEFAULT['grid']})")
    p.add_argument("--methods", default="lora,qlora", help="lora,qlora")
    p.add_argument("--recipes", default="plain,peft,unsloth", help=f"comma list from {', '.join(RECIPES)}")
    p.add_argument("--steps", type=int, help="optimizer steps per case (default 6; 3 with --smoke)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--workdir", help="where the random-init models are written (default: a temp dir, reused)")
    p.add_argument("--python", default=sys.executable, help="interpreter for plain/peft children")
    p.add_argument("--unsloth-python", default=None, help="interpreter with Unsloth for unsloth children "
                   "(default: --python)")
    p.add_argument("--budget-s", type=float, default=240.0, help="time budget of each recipe's child process")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cases", help=argparse.SUPPRESS)
    p.add_argument("--prep", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child or a.prep:
        return _run_child(a)

    import signal

    signal.signal(signal.SIGTERM, _on_term)
    preset = SMOKE if a.smoke else GPU_DEFAULT
    models = (a.models or preset["models"]).split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    recipes = a.recipes.split(",")
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise SystemExit(f"--recipes: unknown {bad}; known: {', '.join(RECIPES)}")
    methods = a.methods.split(",")
    if any(m not in ("lora", "qlora") for m in methods):
        raise SystemExit(f"--methods: {methods} must be lora and/or qlora")
    grid = _parse_grid(a.grid or preset["grid"])
    steps = a.steps or int(preset["steps"])
    if steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is warm-up)")
    workdir = Path(a.workdir or Path(tempfile.gettempdir()) / "llmtune-bench-models")
    sink = open(a.out, "a") if a.out else None
    rows: list[dict[str, Any]] = []
    try:
        rows += _child(a.python, ["--prep", "--cases", json.dumps({"models": models, "workdir": str(workdir)})],
                       max(a.budget_s, 240.0), sink)
        # shape-major: the first shape (the target 4x512) is measured for every model before any budget runs out
        cases = [dict(model=m, method=me, batch=b, seq=s, steps=steps, rank=a.rank, workdir=str(workdir))
                 for (b, s) in grid for m in models for me in methods]
        for recipe in recipes:
            python = (a.unsloth_python or a.python) if recipe.startswith("unsloth") else a.python
            rows += _child(python, ["--child", recipe, "--cases", json.dumps(cases), "--budget-s", str(a.budget_s)],
                           a.budget_s + 60, sink)
        for line in _compare(rows):
            text = json.dumps(line)
            print(text, flush=True)
            if sink is not None:
                sink.write(text + "\n")
    finally:
        if sink is not None:
            sink.close()
    return 1 if any("error" in r for r in rows) else 0


# ====================================================================== child side (torch from here on)
def _emit(row: dict[str, Any]) -> None:
    print(json.dumps({"bench": "train_throughput", **row}), flush=True)


def _versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "llmtune"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _prep(spec: dict[str, Any]) -> None:
    """Write each model (random init, seed 0) and a word-level tokenizer once, to WORKDIR/NAME."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    for name in spec["models"]:
        d = Path(spec["workdir"]) / name
        if (d / "config.json").is_file() and (d / "tokenizer.json").is_file():
            _emit({"kind": "prep", "model": name, "dir": str(d), "reused": True})
            continue
        t0 = time.time()
        kw = dict(MODELS[name])
        arch = kw.pop("arch")
        cfg = AutoConfig.for_model(arch, **kw)
        torch.manual_seed(0)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(str(d), safe_serialization=True)
        del model
        vocab = {f"w{i}": i for i in range(kw["vocab_size"])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2",
                                pad_token="w3").save_pretrained(str(d))
        _emit({"kind": "prep", "model": name, "dir": str(d), "parameters": n, "seconds": round(time.time() - t0, 1)})


def _batch(vocab: int, b: int, s: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(4, vocab, (b, s), generator=g)


def _nf4_config(dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _manual_loop(model: Any, ids: Any, steps: int, sync: Any) -> dict[str, Any]:
    """The reference recipe's loop: AdamW(lr 1e-4) over the trainable parameters, labels = inputs."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(float(out.loss.detach()))
        del out
    b, s = ids.shape
    return {"step_times": times, "losses": losses, "tokens_per_step": b * s,
            "trainable": sum(p.numel() for p in params)}


def _case_plain(case: dict[str, Any], d: Path, dev: str, dtype: Any, ids: Any, sync: Any) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    qlora = case["method"] == "qlora"
    kw: dict[str, Any] = {"dtype": dtype}
    if dev == "cuda":
        kw["device_map"] = {"": 0}
    if qlora:
        kw["quantization_config"] = _nf4_config(dtype)
        kw.setdefault("device_map", {"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(str(d), **kw)
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=case["rank"], lora_alpha=16, lora_dropout=0.0, target_modules=SEVEN,
                                             task_type="CAUSAL_LM"))
    return _manual_loop(model, ids.to(dev), case["steps"], sync)


def _case_unsloth_plain(case: dict[str, Any], d: Path, dev: str, dtype: Any, ids: Any, sync: Any) -> dict[str, Any]:
    from unsloth import FastLanguageModel

    model, _tok = FastLanguageModel.from_pretrained(model_name=str(d), max_seq_length=case["seq"], dtype=dtype,
                                                    load_in_4bit=case["method"] == "qlora", local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=case["rank"], lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=SEVEN, use_gradient_checkpointing="unsloth")
    return _manual_loop(model, ids.to(dev), case["steps"], sync)


def _case_llmtune(case: dict[str, Any], backend: str, d: Path, ids: Any) -> dict[str, Any]:
    """llmtune's own trainer (its whole loop), fed exactly these token ids as pre-tokenized examples."""
    import llmtune

    rows = [{"input_ids": list(map(int, r)), "labels": list(map(int, r))} for r in ids.tolist()]
    quantizer = llmtune.get_quantizer("nf4") if case["method"] == "qlora" else None
    trainer = llmtune.get_trainer("lora", backend=backend, rank=case["rank"], alpha=16, dropout=0.0,
                                  targets=tuple(SEVEN), quantizer=quantizer, gradient_checkpointing=True, lr=1e-4,
                                  scheduler="constant", warmup=0, max_grad_norm=0.0, batch_size=case["batch"],
                                  max_steps=case["steps"], max_length=case["seq"], progress=False)
    with tempfile.TemporaryDirectory(prefix="llmtune-bench-") as out:
        result = trainer.train(model=str(d), data=rows, output_dir=out)
    hist = result.history
    return {"step_times": [h["tokens"] / h["tokens_per_s"] for h in hist if h.get("tokens_per_s")],
            "losses": [h["loss"] for h in hist], "tokens_per_step": case["batch"] * case["seq"],
            "trainable": result.extra.get("trainable_parameters")}


def _predict(case: dict[str, Any], recipe: str, d: Path) -> dict[str, Any]:
    try:
        from llmtune.memory import ModelSpec, estimate_training

        spec = ModelSpec.from_hf_config(str(d / "config.json"))
        e = estimate_training(spec, method=case["method"], batch_size=case["batch"], seq_len=case["seq"],
                              gradient_checkpointing=True, lora_rank=case["rank"], lora_targets=SEVEN,
                              recipe=MEMORY_RECIPE[recipe])
        return {"predicted_peak_MiB": round(e.peak_tensor_bytes / 2**20, 1)}
    except Exception as exc:  # the prediction is extra information; never fail the measurement for it
        return {"predicted_error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def _run_child(a: argparse.Namespace) -> int:
    spec = json.loads(a.cases)
    if a.prep:
        _prep(spec)
        return 0
    recipe = a.child
    t_start = time.time()
    if recipe.startswith("unsloth"):
        try:  # before transformers, as Unsloth requires
            from llmtune.trainers.unsloth import import_unsloth

            import_unsloth()
        except Exception as exc:
            for case in spec:
                _emit({"kind": "case", "recipe": recipe, **{k: case[k] for k in ("model", "method", "batch", "seq")},
                       "device": "?", "skipped": f"Unsloth unavailable: {type(exc).__name__}: {str(exc)[:300]}"})
            return 0
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    context = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else f"cpu ({os.cpu_count()} cores)",
               **_versions()}
    _emit({"kind": "context", "recipe": recipe, **context})
    for case in spec:
        key = {k: case[k] for k in ("model", "method", "batch", "seq")}
        row: dict[str, Any] = {"kind": "case", "recipe": recipe, **key, "device": dev, "steps": case["steps"]}
        if time.time() - t_start > a.budget_s:
            _emit({**row, "skipped": "time budget"})
            continue
        d = Path(case["workdir"]) / case["model"]
        ids = _batch(MODELS[case["model"]]["vocab_size"], case["batch"], case["seq"])
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            if recipe == "plain":
                res = _case_plain(case, d, dev, dtype, ids, sync)
            elif recipe == "unsloth-plain":
                res = _case_unsloth_plain(case, d, dev, dtype, ids, sync)
            else:
                res = _case_llmtune(case, recipe, d, ids)
            times = res["step_times"][1:] or res["step_times"]
            step_s = statistics.median(times)
            row.update({"tokens_per_s": round(res["tokens_per_step"] / step_s, 1), "step_s": round(step_s, 4),
                        "loss_first": round(res["losses"][0], 4), "loss_last": round(res["losses"][-1], 4),
                        "trainable": res["trainable"]})
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        row["wall_s"] = round(time.time() - t0, 2)
        if dev == "cuda":
            row["peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            row["peak_reserved_MiB"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        else:
            import resource

            row["peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        row.update(_predict(case, recipe, d))
        if "peak_MiB" in row and "predicted_peak_MiB" in row:
            row["predicted_over_measured"] = round(row["predicted_peak_MiB"] / row["peak_MiB"], 3)
        _emit(row)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
