"""bitsandbytes quantizers on CPU (or CUDA): size, output error vs fp32, quantize and forward time; JSON lines.

    python benchmarks/bnb_quantizers.py                      # tiny Llama (hidden 256, 4 layers) on CPU
    python benchmarks/bnb_quantizers.py --hidden 1024 --layers 2 --device cuda

One line per configuration: ``method``, ``options``, ``device``, ``linear_params``, ``file_bytes`` (the saved
safetensors), ``bits_per_linear_param`` (quantized linears only: packed weights + statistics),
``logits_rel_err`` (||q - fp32|| / ||fp32|| on random tokens), ``quantize_s``, ``forward_ms`` (median of
``--repeats``), ``roundtrip_identical`` (save/load gives bit-identical logits). Plus one line per layer-level
timing of a ``--layer`` x ``--layer`` linear (quantize, dequantize, forward on 8 tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import llmtune

CONFIGS = [
    ("fp32", {}),
    ("nf4", {"compute_dtype": "float32"}),
    ("nf4", {"compute_dtype": "bfloat16"}),
    ("nf4", {"compute_dtype": "float32", "double_quant": False}),
    ("fp4", {"compute_dtype": "float32"}),
    ("int8", {}),
]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (first call may compile or pack)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def model_rows(args: argparse.Namespace) -> None:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(
            1, args.hidden // 128), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval().to(args.device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(args.device)
    with torch.no_grad():
        reference = base(input_ids=tokens).logits.float()
    linear_params = sum(m.weight.numel() for n, m in base.named_modules()
                        if type(m) is torch.nn.Linear and n != "lm_head")
    for method, options in CONFIGS:
        model = copy.deepcopy(base)
        quantize_s = 0.0
        q = None
        if method != "fp32":
            q = llmtune.get_quantizer(method, **options)
            start = time.perf_counter()
            q.quantize(model)
            quantize_s = time.perf_counter() - start

        def forward(m=model):
            with torch.no_grad():
                return m(input_ids=tokens).logits

        out = forward().float()
        forward_ms = _median_ms(forward, args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            if q is None:
                model.save_pretrained(tmp)
                identical = None
            else:
                q.save(model, tmp)
                identical = bool(torch.equal(q.load(tmp, device_map=args.device)(input_ids=tokens).logits,
                                             forward()))
            file_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        quant_bytes = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                          if k.startswith("model.layers."))
        other = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                    if k.startswith("model.layers.") and "norm" in k)
        print(json.dumps({
            "method": method, "options": options, "device": args.device, "linear_params": linear_params,
            "file_bytes": file_bytes, "bits_per_linear_param": round((quant_bytes - other) * 8 / linear_params, 3),
            "logits_rel_err": round(float((out - reference).norm() / reference.norm()), 5),
            "quantize_s": round(quantize_s, 3), "forward_ms": forward_ms, "roundtrip_identical": identical,
            "tokens": args.batch * args.seq,
        }), flush=True)


def layer_rows(args: argparse.Namespace) -> None:
    import bitsandbytes as bnb

    n = args.layer
    torch.manual_seed(0)
    linear = torch.nn.Linear(n, n, bias=False).to(args.device)
    x = torch.randn(8, n, device=args.device)
    rows = [("fp32", {}), ("nf4", {"compute_dtype": "float32"}), ("int8", {})]
    for method, options in rows:
        holder = torch.nn.Sequential(copy.deepcopy(linear))
        quantize_ms = 0.0
        dequant_ms = None
        if method != "fp32":
            start = time.perf_counter()
            llmtune.get_quantizer(method, skip_modules=[], **options).quantize(holder)
            quantize_ms = (time.perf_counter() - start) * 1000
            layer = holder[0]
            if method == "nf4":
                dequant_ms = _median_ms(lambda layer=layer: bnb.functional.dequantize_4bit(
                    layer.weight.data, layer.weight.quant_state), args.repeats)

        def forward(h=holder):
            with torch.no_grad():
                return h(x)

        print(json.dumps({
            "layer": f"{n}x{n}", "method": method, "options": options, "device": args.device,
            "quantize_ms": round(quantize_ms, 1), "dequantize_ms": dequant_ms,
            "forward_8_tokens_ms": _median_ms(forward, args.repeats),
        }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layer", type=int, default=2048, help="width of the single-layer timing (0: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    model_rows(args)
    if args.layer:
        layer_rows(args)


if __name__ == "__main__":
    main()
