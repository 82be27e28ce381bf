"""Held-out perplexity, size and quantization time of fp32, RTN, GPTQ, NF4 and INT8 on one model.

By default a tiny Llama is pretrained on the bundled text (90% of the paragraphs; the other 10% are the
held-out set); ``--model DIR`` uses a real local checkpoint instead (with ``--eval-file`` for its text).
Perplexity follows the GPTQ paper's protocol: the held-out text joined by blank lines, cut into
non-overlapping windows of ``--seq-len`` tokens, ``exp(mean token NLL)``. One JSON line per result.

    python benchmarks/quantization_quality.py                 # tiny model, ~5-10 minutes on 2 busy CPU cores
    python benchmarks/quantization_quality.py --model ~/opt-125m --eval-file wiki.test.raw --seq-len 2048
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _state_bytes(model: Any) -> int:
    """Bytes of every distinct parameter and persistent buffer (what a checkpoint holds; tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.state_dict(keep_vars=True).values()):
        data = t.data if hasattr(t, "data") else t
        key = data.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += data.numel() * data.element_size()
    return total


def _windows(tokenizer: Any, text: str, seq_len: int) -> Any:
    import torch

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def evaluate(model: Any, windows: Any, reference: list[Any] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Perplexity (exp mean next-token NLL, each window on its own) and, given the fp32 model's log-probs,
    the mean per-token KL(fp32 || model) and top-1 agreement: fidelity to the unquantized model, which
    (unlike perplexity on a tiny corpus) an over-fitted tiny model cannot blur."""
    import torch

    nll, count, kl, agree = 0.0, 0, 0.0, 0
    logps = []
    model.eval()
    with torch.no_grad():
        for j, i in enumerate(range(0, windows.shape[0], batch_size)):
            batch = windows[i:i + batch_size].to(next(model.parameters()).device)
            logp = torch.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)
            target = batch[:, 1:]
            nll -= float(logp.gather(-1, target[..., None]).sum())
            count += target.numel()
            logps.append(logp)
            if reference is not None:
                ref = reference[j]
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    out: dict[str, Any] = {"perplexity": round(math.exp(nll / count), 4), "logprobs": logps}
    if reference is not None:
        out["kl_vs_fp32"] = round(kl / count, 6)
        out["top1_agree_fp32"] = round(agree / count, 4)
    return out


def _largest_group(model: Any, prefer: int) -> int:
    """``prefer`` if it divides every block linear's in_features, else the largest power of two <= it that does."""
    from torch import nn

    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
    g = prefer
    while g > 1 and any(w % g for w in widths):
        g //= 2
    return g


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="local HF checkpoint (default: pretrain a tiny Llama)")
    parser.add_argument("--eval-file", type=Path, help="held-out text for --model (default: bundled held-out)")
    parser.add_argument("--calib-file", type=Path, help="calibration text for --model (default: bundled train)")
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps of the tiny model")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of bundled paragraphs held out")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per eval/calibration window")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--group-size", type=int, default=128, help="group size (largest divisor <= it is used)")
    parser.add_argument("--only", nargs="*", help="only these result names (e.g. fp32 gptq-4-g128)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for the tiny model on a busy box)")
    args = parser.parse_args(argv)

    import torch

    import llmtune
    from llmtune.quantizers.calibration import text_calibration

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device": "cpu"}
    if args.model is None:
        from llmtune.models.tiny import build_tiny_model, bundled_corpus, pretrain, train_tiny_tokenizer

        corpus = bundled_corpus()
        cut = int(len(corpus) * (1 - args.held_out))
        train, held_out = corpus[:cut], corpus[cut:]
        tokenizer = train_tiny_tokenizer()
        # intermediate 384 (not the tiny default 352) so that group size 128 divides every width.
        model = build_tiny_model(tokenizer, seed=0, intermediate_size=384)
        start = time.perf_counter()
        losses = pretrain(model, tokenizer, train, steps=args.steps, seed=0)
        source = {"model": "tiny-llama (hidden 128, 4 layers, intermediate 384)", "pretrain_steps": args.steps,
                  "pretrain_seconds": round(time.perf_counter() - start, 1), "final_train_loss": round(losses[-1], 3),
                  "eval": f"bundled corpus, last {args.held_out:.0%} of paragraphs"}
        eval_text, calib_text = "\n\n".join(held_out), "\n\n".join(train)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(args.model), local_files_only=True, dtype=torch.float32)
        if args.eval_file is None or args.calib_file is None:
            from llmtune.models.tiny import bundled_corpus

            corpus = bundled_corpus()
            cut = int(len(corpus) * (1 - args.held_out))
        eval_text = args.eval_file.read_text() if args.eval_file else "\n\n".join(corpus[cut:])
        calib_text = args.calib_file.read_text() if args.calib_file else "\n\n".join(corpus[:cut])
        source = {"model": str(args.model), "eval": str(args.eval_file or "bundled held-out")}
    model.eval()
    windows = _windows(tokenizer, eval_text, args.seq_len)
    calibration = text_calibration(tokenizer, calib_text, n_samples=args.calib_samples, seq_len=args.seq_len,
                                   batch_size=8, seed=0)
    gs = _largest_group(model, args.group_size)
    common = {**source, **env, "eval_windows": int(windows.shape[0]), "seq_len": args.seq_len,
              "calib_samples": args.calib_samples}

    runs: list[tuple[str, str, str | None, dict[str, Any]]] = [
        ("fp32", "", None, {}),
        (f"rtn-4-g{gs}", "rtn", None, {"bits": 4, "group_size": gs}),
        (f"gptq-4-g{gs}", "gptq", None, {"bits": 4, "group_size": gs}),
        (f"gptq-4-g{gs}-act", "gptq", None, {"bits": 4, "group_size": gs, "act_order": True}),
        ("rtn-4-g32", "rtn", None, {"bits": 4, "group_size": 32}),
        ("gptq-4-g32-act", "gptq", None, {"bits": 4, "group_size": 32, "act_order": True}),
        ("rtn-3-g32", "rtn", None, {"bits": 3, "group_size": 32}),
        ("gptq-3-g32-act", "gptq", None, {"bits": 3, "group_size": 32, "act_order": True}),
        ("nf4", "nf4", "bnb", {"compute_dtype": "float32", "double_quant": True}),
        ("int8", "int8", "bnb", {}),
    ]
    fp32_ppl = None
    reference = None
    for label, name, backend, opts in runs:
        if args.only and label not in args.only:
            continue
        record: dict[str, Any] = {"name": label, "method": name or "fp32", "options": opts, **common}
        try:
            if not name:
                qmodel, seconds = model, 0.0
            else:
                q = llmtune.get_quantizer(name, backend=backend, **opts)
                qmodel = copy.deepcopy(model)
                start = time.perf_counter()
                qmodel = q.quantize(qmodel, calibration=calibration if name == "gptq" else None)
                seconds = time.perf_counter() - start
            scores = evaluate(qmodel, windows, reference)
            logprobs = scores.pop("logprobs")
            if not name:
                fp32_ppl, reference = scores["perplexity"], logprobs
            record.update({**scores, "size_bytes": _state_bytes(qmodel), "quantize_seconds": round(seconds, 2)})
            if fp32_ppl:
                record["ppl_vs_fp32"] = round(scores["perplexity"] / fp32_ppl, 4)
        except Exception as exc:  # report and go on: one unavailable backend must not hide the others
            record["error"] = f"{type(exc).__name__}: {exc}"
        _emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
