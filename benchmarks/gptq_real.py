"""GPTQ on a real model: llmtune's GPTQ against GPTQModel's, same calibration, bits and group size, same run.

Each side runs in its own process (one after the other, same machine): load the fp32 model, cut the
calibration windows (`llmtune.quantizers.calibration.text_calibration`: the same token windows for both), time
the ``quantize`` call alone (wall clock, and the process's CPU time over all its threads), save the checkpoint, then measure held-out perplexity of the *saved checkpoint*
read back by llmtune's loader and dequantized to fp32 (the same evaluation code for both sides, so the
number compares the quantization, not the kernels). One JSON line per side, plus the fp32 reference; with
``--check-load``, our checkpoint is also loaded by transformers (``from_pretrained``, GPTQModel's kernels)
and by GPTQModel (``GPTQModel.load``), each with its perplexity (float16: their CPU kernels' dtype).

Needs an environment with GPTQModel (see noxfile.py's ``interop`` session) and llmtune on the path:

    GPTQMODEL_CPU_WORKERS=2 OMP_NUM_THREADS=1 PYTHONPATH=. /work/envs/h22gptq/bin/python \\
        benchmarks/gptq_real.py --model /work/models/smollm2-hf --out /tmp/gptq-real --check-load

Calibration text: Debian's GPL-3, GFDL-1.3 and LGPL-2.1 licence texts; held-out: Apache-2.0, MPL-2.0,
Artistic and CC0-1.0 (``/usr/share/common-licenses``; override with ``--calibration-file``/``--eval-file``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LICENCES = Path("/usr/share/common-licenses")
CALIBRATION = ("GPL-3", "GFDL-1.3", "LGPL-2.1")
HELD_OUT = ("Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0")


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _text(files: list[Path]) -> str:
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def _held_out(tokenizer: Any, args: argparse.Namespace) -> Any:
    import torch

    text = _text(args.eval_file or [LICENCES / n for n in HELD_OUT])
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: args.eval_tokens]
    n = len(ids) // args.eval_seq_len
    return torch.tensor(ids[: n * args.eval_seq_len], dtype=torch.long).reshape(n, args.eval_seq_len)


def perplexity(model: Any, windows: Any) -> float:
    """exp(mean next-token NLL), every window on its own (the GPTQ paper's protocol)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], 4):
            batch = windows[i:i + 4]
            logp = torch.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)
            nll -= float(logp.gather(-1, batch[:, 1:, None]).sum())
            count += batch[:, 1:].numel()
    return round(math.exp(nll / count), 4)


def _checkpoint_perplexity(path: Path, windows: Any) -> float:
    """Perplexity of a GPTQ checkpoint read by llmtune's loader and dequantized to fp32 nn.Linear layers."""
    from llmtune.quantizers.gptq import load_quantized
    from llmtune.quantizers.gptq.model import dequantize_model

    return perplexity(dequantize_model(load_quantized(path, dtype=_torch().float32)), windows)


def _torch() -> Any:
    import torch

    return torch


def _calibration(tokenizer: Any, args: argparse.Namespace) -> list[Any]:
    from llmtune.quantizers.calibration import text_calibration

    text = _text(args.calibration_file or [LICENCES / n for n in CALIBRATION])
    return text_calibration(tokenizer, text, n_samples=args.samples, seq_len=args.seq_len, batch_size=1, seed=0)


def _common(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    torch = _torch()
    return {"bits": args.bits, "group_size": args.group_size, "samples": args.samples, "seq_len": args.seq_len,
            "damp_percent": args.damp, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def run_side(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch = _torch()
    tok = AutoTokenizer.from_pretrained(args.model)
    calibration = _calibration(tok, args)
    windows = _held_out(tok, args)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    out = Path(args.out) / args.side
    if args.side == "fp32":
        _emit({"side": "fp32", "perplexity": perplexity(model, windows), "eval_tokens": windows.numel(),
               **_common(args)})
        return
    if args.side == "llmtune":
        import llmtune
        from llmtune.quantizers.gptq import model as driver

        driver.BATCH_TOKENS = args.batch_tokens

        q = llmtune.get_quantizer("gptq", bits=args.bits, group_size=args.group_size, damp_percent=args.damp)
        start, cpu = time.perf_counter(), time.process_time()
        qmodel = q.quantize(model, calibration=calibration)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        q.save(qmodel, out)
        tok.save_pretrained(out)
        version: str = llmtune.__version__
    else:
        import gptqmodel
        from gptqmodel import GPTQModel, QuantizeConfig

        version = str(gptqmodel.__version__)

        cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=False, sym=True,
                             damp_percent=args.damp, true_sequential=True, act_group_aware=False,
                             offload_to_disk=False)
        wrapper = GPTQModel.load(args.model, cfg, **({} if args.dtype == "auto" else {"dtype": dtype}))
        examples = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calibration]
        start, cpu = time.perf_counter(), time.process_time()
        wrapper.quantize(examples, batch_size=args.gptqmodel_batch)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        wrapper.save(str(out))
    extra = {"batch_tokens": args.batch_tokens} if args.side == "llmtune" else {"batch_size": args.gptqmodel_batch}
    extra["dtype"] = str(getattr(getattr(wrapper, "model", None), "dtype", None) if args.side == "gptqmodel"
                         else model.dtype).replace("torch.", "")
    _emit({"side": args.side, "version": version, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), **extra,
           "perplexity": _checkpoint_perplexity(out, windows), "eval_tokens": windows.numel(),
           "checkpoint": str(out), **_common(args)})


def check_load(args: argparse.Namespace) -> None:
    """Our checkpoint in transformers (GPTQ integration) and in GPTQModel: loads, and its perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch = _torch()
    path = Path(args.out) / "llmtune"
    windows = _held_out(AutoTokenizer.from_pretrained(path), args)
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float16)
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    _emit({"side": "llmtune-checkpoint-in-transformers", "kernels": kernels,
           "perplexity": perplexity(model, windows), "dtype": "float16", **_common(args)})
    del model
    from gptqmodel import BACKEND, GPTQModel

    wrapper = GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    kernels = sorted({type(m).__name__ for m in wrapper.model.modules() if hasattr(m, "qweight")})
    _emit({"side": "llmtune-checkpoint-in-gptqmodel", "kernels": kernels,
           "perplexity": perplexity(wrapper.model, windows), "dtype": "float16", **_common(args)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory (fp32 safetensors + tokenizer)")
    parser.add_argument("--out", required=True, help="where the two checkpoints are written")
    parser.add_argument("--side", choices=["both", "fp32", "llmtune", "gptqmodel", "check-load"], default="both")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--damp", type=float, default=0.01, help="damp_percent, both sides (0.01: the paper's)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gptqmodel-batch", type=int, default=1, help="GPTQModel's quantize(batch_size=)")
    parser.add_argument("--batch-tokens", type=int, default=8192,
                        help="llmtune's calibration tokens per stacked batch (seq-len: one sample at a time)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype while quantizing; auto: float32 for llmtune, GPTQModel's own choice "
                             "(bfloat16 on CPU)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--calibration-file", type=Path, action="append")
    parser.add_argument("--eval-file", type=Path, action="append")
    parser.add_argument("--check-load", action="store_true", help="also load our checkpoint in transformers/GPTQModel")
    args = parser.parse_args(argv)
    if args.side == "check-load":
        check_load(args)
    elif args.side != "both":
        run_side(args)
    else:  # each side in its own process, one after the other: same machine, same run
        sides = ["fp32", "gptqmodel", "llmtune"] + (["check-load"] if args.check_load else [])
        for side in sides:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--side", side]
            rc = subprocess.run(cmd, check=False).returncode
            if rc:
                _emit({"side": side, "error": f"exit status {rc}"})
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
