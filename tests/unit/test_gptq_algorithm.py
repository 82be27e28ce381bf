"""The GPTQ solver and RTN on single layers, QuantLinear, options and the delegate backends' reasons."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import llmtune  # noqa: E402
from llmtune.core.errors import BackendUnavailableError, InvalidOptionError, UnknownOptionError  # noqa: E402
from llmtune.quantizers.gptq.algorithm import GPTQ, rtn  # noqa: E402
from llmtune.quantizers.gptq.quant_linear import QuantLinear  # noqa: E402

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py


def _layer_problem(seed: int = 0, n: int = 1024, d_in: int = 128, d_out: int = 64):
    """Correlated inputs with a few outlier features (like LLM activations) and a random weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = torch.randn(n, d_in, generator=g) @ mix
    x[:, :4] *= 8.0
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    return x, w


def _rel_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    ref = x @ w.t()
    return float((x @ wq.t() - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_held_out_inputs(group_size: int, act_order: bool, sym: bool) -> None:
    x, w = _layer_problem()
    x_cal, x_test = x[:768], x[768:]
    solver = GPTQ(w.shape[1])
    solver.add_batch(x_cal)
    res = solver.quantize(w, bits=4, group_size=group_size, sym=sym, act_order=act_order)
    base = rtn(w, bits=4, group_size=group_size, sym=sym)
    e_gptq, e_rtn = _rel_err(x_test, w, res.dequantize()), _rel_err(x_test, w, base.dequantize())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_static_groups_keep_trivial_g_idx_and_act_order_permutes_it() -> None:
    x, w = _layer_problem(1)
    solver = GPTQ(w.shape[1])
    solver.add_batch(x)
    plain = solver.quantize(w, bits=4, group_size=32, act_order=True)
    static = solver.quantize(w, bits=4, group_size=32, act_order=True, static_groups=True)
    trivial = torch.arange(w.shape[1]) // 32
    assert torch.equal(static.g_idx.long(), trivial)
    assert not torch.equal(plain.g_idx.long(), trivial)
    assert sorted(torch.bincount(plain.g_idx.long()).tolist()) == [32] * 4  # every group still has 32 columns


def test_codes_scales_zeros_ranges_and_fp16_exact_scales() -> None:
    x, w = _layer_problem(2)
    solver = GPTQ(w.shape[1])
    solver.add_batch(x)
    for bits in (2, 3, 4, 8):
        res = solver.quantize(w, bits=bits, group_size=64, sym=False)
        assert int(res.codes.min()) >= 0 and int(res.codes.max()) < 2**bits
        assert int(res.zeros.min()) >= 0 and int(res.zeros.max()) < 2**bits
        assert torch.equal(res.scales, res.scales.half().float())
        assert res.scales.shape == (w.shape[0], 2)


def test_more_bits_less_error() -> None:
    x, w = _layer_problem(3)
    solver = GPTQ(w.shape[1])
    solver.add_batch(x)
    errs = [_rel_err(x, w, solver.quantize(w, bits=b, group_size=32).dequantize()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3


def test_dead_columns_are_zeroed_and_do_not_break_cholesky() -> None:
    x, w = _layer_problem(4)
    x[:, 10] = 0.0
    solver = GPTQ(w.shape[1])
    solver.add_batch(x)
    res = solver.quantize(w, bits=4, group_size=-1)
    assert torch.isfinite(res.dequantize()).all()


def test_solver_errors() -> None:
    solver = GPTQ(64)
    with pytest.raises(ValueError, match="calibration"):
        solver.quantize(torch.randn(8, 64))
    solver.add_batch(torch.randn(16, 64))
    with pytest.raises(ValueError, match="group_size=0 must be positive"):
        solver.quantize(torch.randn(8, 64), group_size=0)
    with pytest.raises(ValueError, match="bits=5"):
        solver.quantize(torch.randn(8, 64), bits=5)


def test_quant_linear_matches_the_solver_weights() -> None:
    x, w = _layer_problem(5)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
    solver = GPTQ(w.shape[1])
    solver.add_batch(x)
    res = solver.quantize(w, bits=3, group_size=32, sym=False, act_order=True)
    for fmt in ("gptq", "gptq_v2"):
        q = QuantLinear.from_result(lin, res, checkpoint_format=fmt)
        assert q.qweight.shape == (128 * 3 // 32, 64) and q.qzeros.shape == (4, 64 * 3 // 32)
        assert q.scales.dtype == torch.float16 and q.g_idx.dtype == torch.int32
        assert torch.equal(q.dequantize(), res.dequantize())
        expected = x[:8] @ res.dequantize().t() + lin.bias.detach().half().float()
        assert torch.allclose(q(x[:8]), expected, atol=1e-5)


def test_options_validation() -> None:
    with pytest.raises(InvalidOptionError, match="bits=5"):
        llmtune.get_quantizer("gptq", bits=5)
    with pytest.raises(InvalidOptionError, match="bits=1"):
        llmtune.get_quantizer("rtn", bits=1)
    with pytest.raises(InvalidOptionError, match="group_size=0"):
        llmtune.get_quantizer("gptq", group_size=0)
    with pytest.raises(InvalidOptionError, match="damp_percent"):
        llmtune.get_quantizer("gptq", damp_percent=0.0)
    with pytest.raises(InvalidOptionError, match="contradict"):
        llmtune.get_quantizer("gptq", act_order=True, desc_act=False)
    with pytest.raises(UnknownOptionError, match="act_order"):
        llmtune.get_quantizer("gptq", act_ordr=True)
    assert llmtune.get_quantizer("gptq", desc_act=True).options.act_order is True
    cfg = llmtune.get_quantizer("gptq", bits=3, group_size=64, act_order=True, sym=False).hf_quantization_config()
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym, cfg.damp_percent, cfg.format) == (
        3, 64, True, False, 0.01, "gptq_v2")  # asymmetric: v2 zeros by default


def test_auto_gptq_explains_why_and_what_instead() -> None:
    with pytest.raises(BackendUnavailableError) as info:
        llmtune.get_quantizer("gptq", backend="auto-gptq")
    msg = str(info.value)
    assert "transformers" in msg and "unmaintained" in msg and "'llmtune'" in msg and "'gptqmodel'" in msg
    row = next(r for r in llmtune.list_backends("quantizer") if r.backend == "auto-gptq")
    assert not row.available and "transformers" in (row.reason or "")


def test_gptqmodel_reason_is_cheap_and_specific() -> None:
    from llmtune.core.versions import release
    from llmtune.quantizers.gptq.delegates import _min_requirement, gptqmodel_unavailable_reason

    assert release("2.14.1+cu130") == (2, 14, 1) and release("5.20.2") > release("5.17.0")
    assert release("5.17.0.dev0") == (5, 17, 0) and release("2026.10.9") == (2026, 10, 9) and release("x") == ()
    assert _min_requirement("transformers", "huggingface-hub") is not None
    reason = gptqmodel_unavailable_reason()
    try:
        import importlib.metadata

        importlib.metadata.version("gptqmodel")
    except importlib.metadata.PackageNotFoundError:
        assert reason is not None and "pip install" in reason


# ---- group sizes that do not divide the width: a partial last group ---------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize(("in_f", "gs"), [(80, 32), (96, 64), (64, 48)])
def test_partial_last_group_layout(method: str, in_f: int, gs: int) -> None:
    """ceil(in / gs) groups: g_idx is i // gs, the last group holds the remaining in % gs columns."""
    x, w = _layer_problem(6, d_in=in_f, d_out=32)
    if method == "rtn":
        res = rtn(w, bits=4, group_size=gs)
    else:
        solver = GPTQ(in_f)
        solver.add_batch(x)
        res = solver.quantize(w, bits=4, group_size=gs)
    groups = -(-in_f // gs)
    assert res.scales.shape == res.zeros.shape == (32, groups)
    assert torch.equal(res.g_idx.long(), torch.arange(in_f) // gs)
    assert torch.bincount(res.g_idx.long()).tolist() == [gs] * (in_f // gs) + [in_f % gs]


def test_rtn_partial_group_is_rtn_of_its_own_columns() -> None:
    """The last group's grid comes from its own columns only (the padding never shows)."""
    _, w = _layer_problem(7, d_in=80, d_out=16)
    for sym in (True, False):
        res = rtn(w, bits=3, group_size=32, sym=sym)
        for g, cols in enumerate((slice(0, 32), slice(32, 64), slice(64, 80))):
            alone = rtn(w[:, cols], bits=3, group_size=-1, sym=sym)
            assert torch.equal(res.codes[:, cols], alone.codes)
            assert torch.equal(res.scales[:, g], alone.scales[:, 0])
            assert torch.equal(res.zeros[:, g], alone.zeros[:, 0])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("opts", [{}, {"act_order": True}, {"act_order": True, "static_groups": True}, {"sym": False}])
def test_partial_groups_pack_and_unpack_to_the_solver_weights(bits: int, opts: dict) -> None:
    """QuantLinear (qweight/qzeros/scales/g_idx with ceil(in/gs) rows) dequantizes to exactly the solver's
    fake-quantized weight, and a fresh layer loading its state dict gives the same again."""
    x, w = _layer_problem(8, d_in=96, d_out=64)
    solver = GPTQ(96)
    solver.add_batch(x)
    res = solver.quantize(w, bits=bits, group_size=64, **opts)
    lin = torch.nn.Linear(96, 64, bias=False)
    fmt = "gptq" if opts.get("sym", True) else "gptq_v2"
    layer = QuantLinear.from_result(lin, res, fmt)
    assert tuple(layer.scales.shape) == (2, 64) and tuple(layer.qzeros.shape) == (2, 64 * bits // 32)
    assert torch.equal(layer.dequantize(), res.dequantize())
    fresh = QuantLinear(96, 64, bits=bits, group_size=64, bias=False, checkpoint_format=fmt)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), res.dequantize())
    assert torch.equal(fresh(x[:4]), torch.nn.functional.linear(x[:4], res.dequantize()))


def test_gptq_with_a_partial_group_still_beats_rtn() -> None:
    x, w = _layer_problem(9, d_in=96)
    solver = GPTQ(96)
    solver.add_batch(x[:768])
    e_gptq = _rel_err(x[768:], w, solver.quantize(w, bits=4, group_size=64).dequantize())
    e_rtn = _rel_err(x[768:], w, rtn(w, bits=4, group_size=64).dequantize())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
