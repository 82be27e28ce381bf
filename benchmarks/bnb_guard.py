"""Cost of the bitsandbytes 4-bit kernel guard (`llmtune.quantizers.bnb_guard`); JSON lines.

    python benchmarks/bnb_guard.py                 # CPU, shapes of a tiny Llama and of Qwen2.5-0.5B's MLP
    python benchmarks/bnb_guard.py --device cuda --shapes 4096x4096,14336x4096

Lines:

* ``{"what": "machine", ...}``: CPU capability torch reports, AVX-512 flags, bitsandbytes version.
* ``{"what": "self_check", "shape", "blocksize", "ok", "check_ms", "quantize_ms", "cause"}``: one
  uncached check of one layer (reference dequantization + bnb dequantization + 3 probe forwards), next to
  the time bitsandbytes takes to quantize that layer (the work the check is added to).
* ``{"what": "forward", "shape", "bnb_ms", "block_rows_ms", "reference_ms"}``: one training-mode forward of
  8 tokens through bitsandbytes' ``Linear4bit`` and through a routed layer on each fallback path (bnb's kernel
  on one block per row; llmtune's reference dequantization): what a routed layer costs per call.
* ``{"what": "model", "layers", "classes", "quantize_s", "guard_cold_s", "guard_warm_s", "routed"}``:
  quantizing a tiny Llama with the guard, the guard alone with an empty cache, and with a warm one (a second
  model of the same shapes: what ``load()`` pays after ``quantize()`` in the same process).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from llmtune.quantizers.bnb import quiet_bnb_import

quiet_bnb_import()  # before bitsandbytes is imported: no advice about the optional `kernels` package

import bitsandbytes as bnb  # noqa: E402

from llmtune.quantizers import bnb_guard  # noqa: E402


def _ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 3)


def _layer(out_f: int, in_f: int, blocksize: int, device: str) -> tuple[torch.nn.Module, float]:
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              device="meta")
    t = time.perf_counter()
    weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=blocksize, quant_type="nf4",
                               module=layer)
    layer.weight = weight.to(device)
    return layer, round(1000 * (time.perf_counter() - t), 3)


def machine() -> dict:
    flags = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = {f for f in line.split(":", 1)[1].split() if f.startswith("avx512")}
                    break
    except OSError:
        pass
    return {"what": "machine", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_flags": sorted(flags), "bitsandbytes": bnb.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def per_shape(shapes: list[tuple[int, int]], blocksizes: list[int], device: str) -> None:
    for out_f, in_f in shapes:
        for bs in blocksizes:
            bnb_guard.clear_cache()
            layer, quantize_ms = _layer(out_f, in_f, bs, device)
            t = time.perf_counter()
            verdict = bnb_guard.check_layer(layer)
            check_ms = round(1000 * (time.perf_counter() - t), 3)
            print(json.dumps({"what": "self_check", "shape": [out_f, in_f], "blocksize": bs, "ok": verdict.ok,
                              "check_ms": check_ms, "quantize_ms": quantize_ms, "cause": verdict.cause}),
                  flush=True)
        layer, _ = _layer(out_f, in_f, 64, device)
        layer.train()
        routed = copy.deepcopy(layer)
        routed.__class__ = bnb_guard.reference_linear4bit_class()
        x = torch.randn(8, in_f, device=device)
        fast = copy.deepcopy(routed)
        fast.__dict__["llmtune_fallback"] = "block-rows"
        row = {"what": "forward", "shape": [out_f, in_f], "bnb_ms": _ms(lambda layer=layer, x=x: layer(x)),
               "block_rows_ms": _ms(lambda fast=fast, x=x: fast(x)),
               "reference_ms": _ms(lambda routed=routed, x=x: routed(x))}
        print(json.dumps(row), flush=True)


def model_level(device: str) -> None:
    import transformers

    import llmtune

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).to(device)
    bnb_guard.clear_cache()
    t = time.perf_counter()
    model = llmtune.get_quantizer("nf4").quantize(copy.deepcopy(base))
    quantize_s = time.perf_counter() - t
    bnb_guard.clear_cache()
    t = time.perf_counter()
    report = bnb_guard.guard_4bit_model(model)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    bnb_guard.guard_4bit_model(model)
    warm = time.perf_counter() - t
    print(json.dumps({"what": "model", "hidden": 256, "intermediate": 688, "layers": report["checked"],
                      "classes": len(report["verdicts"]), "quantize_s": round(quantize_s, 4),
                      "guard_cold_s": round(cold, 4), "guard_warm_s": round(warm, 5),
                      "routed": len(report["routed"])}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="64x64,64x96,896x896,4864x896,896x4864",
                        help="out x in, comma separated")
    parser.add_argument("--blocksizes", default="64,256")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(json.dumps(machine()), flush=True)
    per_shape(shapes, [int(b) for b in args.blocksizes.split(",")], args.device)  # type: ignore[arg-type]
    model_level(args.device)


if __name__ == "__main__":
    main()
