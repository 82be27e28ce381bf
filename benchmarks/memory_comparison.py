"""Published memory estimators vs llmtune.memory on every public measured case (no GPU needed).

Reads ``shared/memory/h100-llama3.2-1b.json`` (or ``--cases PATH``) and, for each case, computes the
prediction of: the lecture's serving rule ``P x 4 / (32/Q) x 1.2``; accelerate ``estimate-memory``'s logic
(fp32 meta-model size / 2 for bf16; training prints ``max(model, grads, optimizer, step)`` = 8 B/param for
bf16; int4 "N/A"); EleutherAI's Transformer Math 101 (model + AdamW 12 B/param + grads + Korthikanti
activations ``sbhL(10 + 24 + 5as/h)``, or ``2sbhL`` with full recomputation; inference 1.2 x model); the
HF memory blog (model + optimizer + max(grads + optimizer intermediates, A x tokens x 2 B) with
A = 4.6894e-4 N + 1.8494e6 activations per token); and ours (``recipe="hf"``). LoRA/QLoRA cases apply
each published formula as its tool would be used: the optimizer and gradient terms count the trainable
parameters, the model term the (quantized) base; tools with no LoRA mode (accelerate) report their only
number. One JSON line per case and estimator; ``--markdown`` prints the docs table, ``--plot PNG`` a chart.

    python benchmarks/memory_comparison.py --markdown --plot docs/img/memory_comparison.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llmtune.memory import ModelSpec, estimate_serving, estimate_training, estimate_weights
from llmtune.memory.estimate import lora_params, resolve_lora_targets
from llmtune.memory.recipes import Recipe, hf_recipe

MiB = 2**20
DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "memory" / "h100-llama3.2-1b.json"
ESTIMATORS = ("lecture", "accelerate", "transformer_math", "hf_blog", "llmtune")


def _published(spec: ModelSpec, case: dict[str, Any]) -> dict[str, float | None]:
    """Bytes each published estimator predicts for one case (None: the tool gives no number)."""
    P, bits, method = spec.num_params, case["bits"], case["method"]
    model = P * bits / 8
    if method in ("load", "infer"):
        acc = None if bits == 4 else (2 * P if bits == 16 else P)  # int4: "N/A" in the current code
        return {"lecture": P * 4 / (32 / bits) * 1.2, "accelerate": acc, "transformer_math": 1.2 * model,
                "hf_blog": None}
    b, s, L, h, a = case["batch"], case["seq"], spec.num_layers, spec.hidden_size, spec.num_heads
    train = P if method == "full" else lora_params(spec, 16, resolve_lora_targets(spec, "all-linear"))
    acts = 2 * s * b * h * L if case.get("gc") else s * b * h * L * (10 + 24 + 5 * a * s / h)
    tm = model + 12 * train + 2 * train + acts
    A = 4.6894e-4 * P + 1.8494e6
    blog = model + 2 * 2 * train + max(2 * train + 2 * train, A * b * s * 2)
    return {"lecture": P * 4 / (32 / bits) * 1.2, "accelerate": 8 * P, "transformer_math": tm, "hf_blog": blog}


def _ours(spec: ModelSpec, case: dict[str, Any], hf: Recipe, trained: bool = False) -> float:
    """Our prediction (``hf``: the plain recipe as the measured peft ran it); ``trained``: a training case ran
    earlier in the same process (2 cuBLAS handles)."""
    method, bits = case["method"], case["bits"]
    if method == "load":
        return estimate_weights(spec, bits).peak_tensor_bytes
    if method == "infer":
        return estimate_serving(spec, bits, batch_size=case["batch"], seq_len=case["seq"],
                                cublas_handles=2 if trained else 1).peak_tensor_bytes
    if method.startswith("unsloth-"):
        return estimate_training(spec, method.split("-", 1)[1], batch_size=case["batch"], seq_len=case["seq"],
                                 recipe="unsloth", lora_rank=16).peak_tensor_bytes
    return estimate_training(spec, method, batch_size=case["batch"], seq_len=case["seq"], recipe=hf, lora_rank=16,
                             gradient_checkpointing=bool(case.get("gc"))).peak_tensor_bytes


def _measured_versions(data: dict[str, Any]) -> tuple[str | None, str | None]:
    """The peft and transformers versions the measurements ran (the file's ``versions``); None where unsaid."""
    found = data.get("versions") or {}
    return found.get("peft"), found.get("transformers")


def rows(path: Path) -> list[dict[str, Any]]:
    """One row per measured case: measured MiB and each estimator's MiB and relative error."""
    data = json.loads(path.read_text())
    spec = ModelSpec.from_preset("llama-3.2-1b")
    hf = hf_recipe(*_measured_versions(data))
    out = []
    trained = False  # cases run in file order in one process: after a backward, autograd's handle persists
    for case in data["cases"]:
        if "peak_alloc_MiB" not in case or "method" not in case:
            continue
        pred = _published(spec, case) | {"llmtune": _ours(spec, case, hf, trained)}
        trained = trained or case["method"] not in ("load", "infer")
        m = case["peak_alloc_MiB"]
        out.append({"case": case["name"].split("/", 1)[1], "measured_MiB": m,
                    **{f"{k}_MiB": (None if v is None else round(v / MiB, 1)) for k, v in pred.items()},
                    **{f"{k}_err": (None if v is None else round(v / MiB / m - 1, 4)) for k, v in pred.items()}})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    """The docs table: measured MiB, then each estimator's error."""
    head = "| case | measured MiB | lecture rule | accelerate | Transformer Math 101 | HF memory blog | llmtune |"
    lines = [head, "|" + "---|" * 7]
    for r in table:
        cells = [f"{100 * r[f'{k}_err']:+.1f}%" if r[f"{k}_err"] is not None else "N/A" for k in ESTIMATORS]
        lines.append(f"| {r['case']} | {r['measured_MiB']:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], path: str) -> None:
    """Relative error per case, one marker series per estimator (symlog scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    xs = list(range(len(table)))
    for k, marker in zip(ESTIMATORS, "os^Dx", strict=True):
        pts = [(x, 100 * r[f"{k}_err"]) for x, r in zip(xs, table, strict=True) if r[f"{k}_err"] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=k)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(xs, [r["case"] for r in table], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("error vs measured max_memory_allocated (%)")
    ax.set_title("Llama-3.2-1B on an H100: published estimators vs llmtune.memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    table = rows(args.cases)
    for r in table:
        print(json.dumps(r))
    if args.markdown:
        print(markdown(table))
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
