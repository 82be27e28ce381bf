"""Batched calibration and fewer block passes give the GPTQ of the one-sample-at-a-time driver.

The reference below is the driver as it was before batching (and as GPTQModel/AutoGPTQ run true-sequential
GPTQ): every calibration sample alone, one full block forward per true-sequential group with a Hessian per
linear, each linear solved alone, then one forward for the next block's inputs. The batched driver stacks the
samples, stops each group's pass once the group's inputs are seen, shares one Hessian between linears with
the same input and solves them as one stacked weight: the same mathematics in a different float order.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

import llmtune  # noqa: E402
from llmtune.quantizers.gptq import GPTQOptions  # noqa: E402
from llmtune.quantizers.gptq import model as driver  # noqa: E402
from llmtune.quantizers.gptq.algorithm import GPTQ  # noqa: E402
from llmtune.quantizers.gptq.quant_linear import QuantLinear  # noqa: E402

VOCAB = 256


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    fields.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval().double()


def _first(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def _reference_gptq(model: nn.Module, samples: list[torch.Tensor], spec: GPTQOptions) -> dict[str, torch.Tensor]:
    """The one-sample-at-a-time driver: dequantized weight of every block linear."""
    prefix, blocks = driver.find_blocks(model)
    inputs: list[tuple[torch.Tensor, dict]] = []

    def capture(_m, args, kwargs):
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        inputs.append((args[0] if args else kwargs["hidden_states"], {**kw, "use_cache": False}))
        raise driver._StopForward

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    for s in samples:
        try:
            with torch.no_grad():
                model(input_ids=s[None], use_cache=False)
        except driver._StopForward:
            pass
    handle.remove()
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        linears = driver.block_linears(block, f"{prefix}.{i}", spec.skip_modules)
        for group in driver.sequential_groups(linears, spec.true_sequential):
            solvers = {n: GPTQ(linears[n].in_features) for n in group}
            hooks = [linears[n].register_forward_hook(lambda _m, a, _o, s=solvers[n]: s.add_batch(a[0]))
                     for n in group]
            with torch.no_grad():
                for x, kw in inputs:
                    block(x, **kw)
            for h in hooks:
                h.remove()
            for n in group:
                res = solvers[n].quantize(linears[n].weight, bits=spec.bits, group_size=spec.group_size,
                                          sym=spec.sym, act_order=spec.act_order, damp_percent=spec.damp_percent)
                with torch.no_grad():
                    linears[n].weight.copy_(res.dequantize().to(linears[n].weight.dtype))
                out[f"{prefix}.{i}.{n}"] = res.dequantize()
        with torch.no_grad():
            for lin in linears.values():  # the packed layer keeps its bias in float16, as GPTQ checkpoints do
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias.half().to(lin.bias.dtype))
            inputs = [(_first(block(x, **kw)), kw) for x, kw in inputs]
    return out


def _ours(model: nn.Module, calibration, **opts) -> dict[str, torch.Tensor]:
    q = llmtune.get_quantizer("gptq", bits=4, **opts)
    qmodel = q.quantize(model, calibration=calibration)
    return {n: m.dequantize() for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}


def _agree(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Same layers and weights, up to float order: a scale one float16 step apart, or a code flipped at a
    rounding tie, whose error feedback then nudges the later columns (float32 Hessians summed in another
    order differ by ~1e-7 relative). Under 5% of the weights move by more than 1e-4 (0 to 1.2% seen, by one
    grid step), and the whole weight by under 5% (0 to 2.2% seen)."""
    assert sorted(ours) == sorted(ref)
    for name, w in ours.items():
        diff = (w.double() - ref[name].double()).abs()
        assert float((diff > 1e-4).float().mean()) < 0.05, name
        assert float(diff.norm() / ref[name].double().norm()) < 0.05, name


@pytest.mark.parametrize("opts", [{"group_size": 32}, {"group_size": 48, "act_order": True, "sym": False},
                                  {"group_size": -1, "true_sequential": False}])
def test_batched_driver_equals_the_one_sample_reference(opts: dict) -> None:
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, VOCAB, (24,), generator=g) for _ in range(8)]
    spec = GPTQOptions(bits=4, **opts)
    ref = _reference_gptq(_tiny_llama(), samples, spec)
    ours = _ours(_tiny_llama(), [torch.stack(samples[:5]), torch.stack(samples[5:])], **opts)
    _agree(ours, ref)


def test_padded_batches_of_unequal_samples_equal_samples_run_alone(monkeypatch) -> None:
    """Samples of different lengths are stacked right-padded with an attention mask; padding is left out of
    the Hessians, so the result is that of each sample run alone (the reference, and BATCH_TOKENS=1)."""
    g = torch.Generator().manual_seed(2)
    samples = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 24, 17, 30, 5, 24)]
    masked = torch.zeros(len(samples), 30, dtype=torch.long)
    mask = torch.zeros_like(masked)
    for r, s in enumerate(samples):
        masked[r, :len(s)], mask[r, :len(s)] = s, 1
    batches = driver.stack_calibration(driver._calibration_rows([{"input_ids": masked, "attention_mask": mask}]))
    assert len(batches) == 1 and batches[0][1] is not None and int(batches[0][1].sum()) == sum(map(len, samples))
    ref = _reference_gptq(_tiny_llama(), samples, GPTQOptions(bits=4, group_size=32))
    ours = _ours(_tiny_llama(), [{"input_ids": masked, "attention_mask": mask}], group_size=32)
    _agree(ours, ref)
    monkeypatch.setattr(driver, "BATCH_TOKENS", 1)
    alone = _ours(_tiny_llama(), [s[None] for s in samples], group_size=32)
    _agree(ours, alone)


def test_post_norm_blocks_take_the_extra_output_pass(monkeypatch) -> None:
    """OPT with do_layer_norm_before=False normalises after the residual add: fc2's output does not add straight
    into the block's, so the block is re-run for the next inputs, and the result is still the reference's."""
    from transformers import OPTConfig, OPTForCausalLM

    def opt():
        torch.manual_seed(0)
        return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                        do_layer_norm_before=False)).eval().double()

    g = torch.Generator().manual_seed(6)
    samples = [torch.randint(0, VOCAB, (16,), generator=g) for _ in range(4)]
    model = opt()
    blocks = driver.find_blocks(model)[1]
    batch = driver.capture_block_inputs(model, blocks, [torch.stack(samples)])[0]
    assert not driver.adds_to_output(blocks[0], blocks[0].fc2, batch)
    runs: list[int] = []
    run_block = driver._run_block
    monkeypatch.setattr(driver, "_run_block", lambda block, b: (runs.append(1), run_block(block, b))[1])
    ours = _ours(opt(), [torch.stack(samples)], group_size=32)
    assert len(runs) == 1  # between the two blocks
    _agree(ours, _reference_gptq(opt(), samples, GPTQOptions(bits=4, group_size=32)))


def test_stack_calibration_respects_the_token_budget_and_order() -> None:
    rows = [torch.arange(n) for n in (4, 4, 4, 8, 2)]
    batches = driver.stack_calibration(rows, batch_tokens=12)
    assert [tuple(ids.shape) for ids, _ in batches] == [(3, 4), (1, 8), (1, 2)]
    assert all(m is None for _, m in batches)  # equal lengths inside each batch: no padding
    assert torch.equal(driver.stack_calibration(rows[:2] + rows[4:], batch_tokens=100)[0][1],
                       torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]))


def test_one_pass_per_group_stopped_early_and_shared_hessians(monkeypatch) -> None:
    """Per block: one pass per true-sequential group (stopped early but for the last, whose full pass also
    gives the next block's inputs: down_proj adds straight into the output, checked once by two passes of
    block 0); q/k/v and up/gate each share one Hessian and one solve."""
    calls: list[str] = []
    solves: list[int] = []
    forward, quantize = driver._forward, GPTQ.quantize
    monkeypatch.setattr(driver, "_forward", lambda block, batch, hidden=None: (
        calls.append("pass"), forward(block, batch, hidden))[1])
    monkeypatch.setattr(GPTQ, "quantize", lambda self, w, **kw: (solves.append(w.shape[0]), quantize(self, w, **kw))[1])
    g = torch.Generator().manual_seed(3)
    _ours(_tiny_llama(), [torch.randint(0, VOCAB, (3, 16), generator=g)], group_size=32)
    assert len(calls) == 2 + 2 * 4  # the additivity check, then 4 group passes per block
    # per block: q+k+v stacked (64+32+32 rows), o (64), up+gate stacked (128+128), down (64)
    assert solves == [128, 64, 256, 64] * 2


def test_linears_sharing_an_input_are_solved_as_separately() -> None:
    """GPTQ treats every output row alone given the Hessian: stacking weights that share it changes nothing."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 80, generator=g, dtype=torch.float64).float()
    ws = [torch.randn(n, 80, generator=g) for n in (16, 32)]
    solver = GPTQ(80)
    solver.add_batch(x)
    stacked = solver.quantize(torch.cat(ws), bits=4, group_size=32).split_rows([16, 32])
    for w, res in zip(ws, stacked):
        alone = solver.quantize(w, bits=4, group_size=32)
        assert torch.equal(res.codes, alone.codes) and torch.equal(res.scales, alone.scales)
        assert res.loss == pytest.approx(alone.loss, rel=1e-5)
