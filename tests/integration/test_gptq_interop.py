"""Interop of our GPTQ checkpoints: (1) an independent reader written from the format description agrees with
ours bit for bit; (2) GPTQModel and transformers load what we write and give the same outputs.

(2) runs where GPTQModel is importable; under ``nox -s interop`` (LLMTUNE_REQUIRE_GPTQMODEL=1) a missing
GPTQModel is a failure, not a skip.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import llmtune  # noqa: E402
from llmtune.quantizers.gptq.quant_linear import QuantLinear  # noqa: E402

REQUIRE_GPTQMODEL = os.environ.get("LLMTUNE_REQUIRE_GPTQMODEL") == "1"
MASK32 = 0xFFFFFFFF


# ---- an independent reader, from the AutoGPTQ/GPTQModel format description (plain Python ints) -------------
def _u32(t: torch.Tensor) -> list[list[int]]:
    return [[v & MASK32 for v in row] for row in t.tolist()]


def _unpack_column(words: list[int], bits: int, n: int) -> list[int]:
    """Codes packed along one column, as AutoGPTQ's ``QuantLinear.pack`` writes them."""
    out: list[int] = []
    if bits in (2, 4, 8):
        per = 32 // bits
        for i in range(n):
            out.append((words[i // per] >> (bits * (i % per))) & ((1 << bits) - 1))
        return out
    assert bits == 3  # every 32 codes take 3 words; codes 10 and 21 straddle word boundaries
    for c in range(n // 32):
        w0, w1, w2 = words[3 * c: 3 * c + 3]
        vals = [(w0 >> (3 * j)) & 7 for j in range(10)]
        vals.append(((w0 >> 30) & 0x3) | ((w1 & 0x1) << 2))
        vals += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
        vals.append(((w1 >> 31) & 0x1) | ((w2 & 0x3) << 1))
        vals += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
        out += vals
    return out


def _reference_dequantize(state: dict, prefix: str, bits: int, fmt: str) -> torch.Tensor:
    """W[out, in] = scales[g, o] * (q[i, o] - zero[g, o]) with g = g_idx[i]; v1 zeros are stored minus one."""
    qweight, qzeros = _u32(state[f"{prefix}.qweight"]), _u32(state[f"{prefix}.qzeros"])
    scales = state[f"{prefix}.scales"].float().tolist()
    g_idx = state[f"{prefix}.g_idx"].tolist()
    n_in, n_out = len(g_idx), len(scales[0])
    if fmt == "gptq" and bits != 3:
        # GPTQModel's v1 -> v2 conversion: add 1 to every field as one whole-word integer addition.
        ones = sum(1 << (bits * j) for j in range(32 // bits))
        qzeros = [[(w + ones) & MASK32 for w in row] for row in qzeros]
    zeros = [_unpack_column(row, bits, n_out) for row in qzeros]
    if fmt == "gptq" and bits == 3:
        zeros = [[(z + 1) % 8 for z in row] for row in zeros]
    w = torch.zeros(n_out, n_in)
    for o in range(n_out):
        codes = _unpack_column([qweight[r][o] for r in range(len(qweight))], bits, n_in)
        for i in range(n_in):
            g = g_idx[i]
            w[o, i] = scales[g][o] * (codes[i] - zeros[g][o])
    return w


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


@pytest.mark.parametrize(("method", "bits", "opts"), [
    ("rtn", 2, {"sym": False}), ("rtn", 3, {"sym": False}), ("rtn", 8, {}),
    ("gptq", 3, {"act_order": True, "sym": False}), ("gptq", 4, {"act_order": True, "sym": False}),
    ("gptq", 4, {"checkpoint_format": "gptq_v2", "sym": False}),
])
def test_independent_reader_agrees_with_ours(tmp_path: Path, method: str, bits: int, opts: dict) -> None:
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(3)
    calibration = [torch.randint(0, 256, (2, 32), generator=g) for _ in range(2)]
    q = llmtune.get_quantizer(method, bits=bits, group_size=32, quiet=True, **opts)
    model = q.quantize(_tiny_llama(), calibration=calibration if method == "gptq" else None)
    out = q.save(model, tmp_path)
    fmt = json.loads((out / "quantize_config.json").read_text())["checkpoint_format"]
    state = load_file(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        ours = model.get_submodule(name)
        assert isinstance(ours, QuantLinear)
        assert torch.equal(_reference_dequantize(state, name, bits, fmt), ours.dequantize())
    if "act_order" in opts:  # act-order really permuted the groups (g_idx is not i // 32)
        g_idx = state["model.layers.0.mlp.down_proj.g_idx"]
        assert not torch.equal(g_idx.long(), torch.arange(128) // 32)


# ---- GPTQModel / transformers load our checkpoint ----------------------------------------------------------
def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        if REQUIRE_GPTQMODEL:
            pytest.fail(f"LLMTUNE_REQUIRE_GPTQMODEL=1 but {module} is not importable ({why})")
        pytest.skip(f"{module} is not installed ({why}); run `nox -s interop`")


@pytest.fixture(scope="module", params=["sym-v1", "asym-v2", "partial-g64"])
def written(request, tmp_path_factory):
    """A tiny Llama with a tokenizer, quantized by our GPTQ (4-bit, g32, act-order) and saved: symmetric
    (checkpoint_format "gptq", v1) and asymmetric ("gptq_v2", the default for asymmetric grids); and
    "partial-g64": symmetric, no act-order, group 64 on widths 96 and 160 (partial last groups of 32; GPTQModel
    kernels accept only group sizes -1 and 16..1024 powers of two, so 64 it is)."""
    _require("gptqmodel", "GPTQModel/transformers reading our checkpoint")
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    partial = request.param == "partial-g64"
    widths = {"hidden_size": 96, "intermediate_size": 160} if partial else {"hidden_size": 64, "intermediate_size": 128}
    model = build_tiny_model(tok, seed=0, num_hidden_layers=2, **widths)
    g = torch.Generator().manual_seed(5)
    calibration = [torch.randint(0, len(tok), (4, 32), generator=g) for _ in range(4)]
    q = llmtune.get_quantizer("gptq", bits=4, group_size=64 if partial else 32, act_order=not partial,
                              sym=request.param != "asym-v2", quiet=True)
    qmodel = q.quantize(copy.deepcopy(model), calibration=calibration)
    out = q.save(qmodel, tmp_path_factory.mktemp(request.param))
    tok.save_pretrained(out)
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == (
        "gptq_v2" if request.param == "asym-v2" else "gptq")
    ids = torch.randint(0, len(tok), (2, 16), generator=g)
    with torch.no_grad():
        ref = qmodel(ids).logits
    return out, ids, ref, qmodel


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_gptqmodel_loads_our_checkpoint(written) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel

    out, ids, ref, ours = written
    # GPTQModel's CPU torch kernel runs in float16/bfloat16 only.
    loaded = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    names = [n for n, m in ours.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14
    for name in names:
        theirs = loaded.model.get_submodule(name).dequantize_weight().float().t()  # [in, out] -> [out, in]
        mine = ours.get_submodule(name).dequantize()
        assert torch.allclose(theirs, mine, rtol=1e-3, atol=1e-6), name  # equal up to float16 rounding
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert _close(logits, ref) < 5e-3


def test_transformers_loads_our_checkpoint(written) -> None:
    _require("optimum", "transformers' GPTQ integration imports optimum.gptq")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    out, ids, ref, _ = written
    loaded = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float16)
    with torch.no_grad():
        logits = loaded(ids).logits
    assert _close(logits, ref) < 5e-3


def test_gptqmodel_backend_and_our_loader_reads_its_checkpoint(tmp_path: Path) -> None:
    """Backend 'gptqmodel' quantizes, saves and loads; our loader reads GPTQModel's checkpoint to the same outputs."""
    _require("gptqmodel", "backend 'gptqmodel'")
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    model = type(model).from_pretrained(tmp_path / "fp")  # name_or_path: its tokenizer travels along
    g = torch.Generator().manual_seed(5)
    calibration = [torch.randint(0, len(tok), (4, 32), generator=g) for _ in range(4)]
    q = llmtune.get_quantizer("gptq", backend="gptqmodel", bits=4, group_size=32, quiet=True)
    qmodel = q.quantize(model, calibration=calibration)
    out = q.save(qmodel, tmp_path / "theirs")
    assert (out / "quantize_config.json").is_file()
    ids = torch.randint(0, len(tok), (2, 16), generator=g)
    theirs = q.load(out, dtype=torch.float16)  # its CPU kernel runs in float16/bfloat16 only
    ours = llmtune.get_quantizer("gptq").load(out, dtype=torch.float32)
    names = [n for n, m in ours.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14
    for name in names:
        w_theirs = theirs.get_submodule(name).dequantize_weight().float().t()
        assert torch.allclose(w_theirs, ours.get_submodule(name).dequantize(), rtol=1e-3, atol=1e-6), name
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    assert _close(a, b) < 5e-3
