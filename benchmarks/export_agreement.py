"""llama.cpp on llmtune's GGUF export vs transformers on the merged model: greedy-token agreement per dtype.

Exports a training run (``--run``, e.g. the demo's ``OUT/run``) as GGUF in each dtype, then for each held-out
kopitiam order (llama3 prompt) compares the first ``--tokens`` greedy tokens of llama.cpp (llama-cpp-python) with
those of transformers on the merged model with its weights rounded to float16. One JSON line per dtype:
``free_running`` (tokens equal before the first difference, summed over prompts), ``teacher_forced`` (positions
where llama.cpp's argmax, fed transformers' tokens, equals transformers' token). Needs llama-cpp-python.

    python -c "from llmtune.demo import run_demo; run_demo('demo-run')"
    python benchmarks/export_agreement.py --run demo-run/run --prompts 20
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def _merged_f16(run: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer

    from llmtune.export.merge import merge
    from llmtune.export.source import resolve_source

    merged = merge(resolve_source(run))
    with torch.no_grad():
        for p in merged.model.parameters():
            p.copy_(p.half().float())
    return merged.model, AutoTokenizer.from_pretrained(str(run / "adapter"))


def _prompts(tok: Any, n: int, template: str) -> list[list[int]]:
    from llmtune.data import render_prompt, split_instructions

    _train, held = split_instructions()
    return [tok(render_prompt(r, template, tok)[0], add_special_tokens=False)["input_ids"] for r in held[:n]]


def _hf(model: Any, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding (argmax of each full forward): no logits processors, no stop tokens."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _compare(llm: Any, ids: list[int], want: list[int]) -> tuple[int, int]:
    import numpy as np

    got: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        got.append(int(token))
        if len(got) == len(want):
            break
    prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    llm.reset()
    llm.eval(ids + want)
    forced = np.asarray(llm.scores[len(ids) - 1: len(ids) - 1 + len(want)]).argmax(-1)
    return prefix, int(sum(int(a) == b for a, b in zip(forced, want)))


def main() -> None:
    import llama_cpp
    import torch

    from llmtune.export import export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dtypes", default="f16,bf16,q8_0,q4_0")
    parser.add_argument("--template", default="llama3", help="the run's chat template (llama3, chatml, alpaca)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = _merged_f16(args.run)
    prompts = _prompts(tok, args.prompts, args.template)
    wants = [_hf(model, ids, args.tokens) for ids in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            export(args.run, Path(tmp) / dtype, format="gguf", dtype=dtype)
            seconds = time.perf_counter() - t0
            path = Path(tmp) / dtype / f"model-{dtype}.gguf"
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False, logits_all=True)
            pairs = [_compare(llm, ids, want) for ids, want in zip(prompts, wants)]
            print(json.dumps({"benchmark": "export_agreement", "dtype": dtype, "prompts": len(prompts),
                              "tokens_per_prompt": args.tokens, "free_running": sum(p for p, _ in pairs),
                              "teacher_forced": sum(t for _, t in pairs),
                              "all_16_equal": sum(p == args.tokens for p, _ in pairs),
                              "total": len(prompts) * args.tokens, "gguf_bytes": path.stat().st_size,
                              "export_seconds": round(seconds, 2), "llama_cpp_python": llama_cpp.__version__,
                              "machine": platform.processor() or platform.machine()}), flush=True)


if __name__ == "__main__":
    main()
