"""Layer-by-layer driver: GPTQ (or RTN) over the decoder blocks of a transformers causal LM.

The calibration batches run through the model up to the first decoder block (its inputs are captured,
then the forward is stopped). Each block is then quantized on the inputs produced by the *already
quantized* blocks before it: hooks collect each linear's inputs into its Hessian, the linears are solved
(in "true sequential" groups when asked: attention q/k/v, then o, then mlp up/gate, then down, each group
seeing the outputs of the groups quantized before it), swapped for packed `QuantLinear`s, and the block is
re-run to produce the next block's inputs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.interfaces import ProgressFn
from llmtune.quantizers.gptq import CalibrationError, GridOptions
from llmtune.quantizers.gptq.algorithm import GPTQ, QuantResult, _few_threads, check_bits_and_group, rtn
from llmtune.quantizers.gptq.quant_linear import QuantLinear
from llmtune.quantizers.skip import is_skipped

#: "True sequential" order inside a block (GPTQModel's for Llama-family and OPT-style names).
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn"),
    ("o_proj", "out_proj", "dense", "c_proj"),
    ("up_proj", "gate_proj", "gate_up_proj", "fc1", "w1", "w3", "dense_h_to_4h", "c_fc"),
    ("down_proj", "fc2", "w2", "dense_4h_to_h"),
)


_POSITIONAL = "__llmtune_positional_args__"


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ``nn.ModuleList`` of identical modules (``model.layers`` for Llama)."""
    best: tuple[str, nn.ModuleList] | None = None
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) != 1:
                continue
            if n_layers is not None and len(module) == n_layers:
                return name, module
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ConfigError(f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of layers")
    return best


def block_linears(block: nn.Module, prefix: str, skip_modules: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` children of one block (relative names), minus those ``skip_modules`` selects."""
    return {name: m for name, m in block.named_modules()
            if isinstance(m, nn.Linear) and not is_skipped(f"{prefix}.{name}", skip_modules)}


def sequential_groups(names: Iterable[str], true_sequential: bool) -> list[list[str]]:
    """Split a block's linear names into the groups quantized one after the other."""
    names = list(names)
    if not true_sequential:
        return [names]
    groups: list[list[str]] = []
    taken: set[str] = set()
    for leaves in SEQUENTIAL_GROUPS:
        group = [n for n in names if n.rsplit(".", 1)[-1] in leaves and n not in taken]
        if group:
            groups.append(group)
            taken.update(group)
    rest = [n for n in names if n not in taken]
    if rest:
        groups.append(rest)
    return groups


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: Iterable[Any]
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run each calibration batch up to the first block; return its hidden states and keyword arguments."""
    device = _model_device(model)
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kw["use_cache"] = False
        if len(args) > 1:  # other positional arguments (older model code): keep them, in order
            kw[_POSITIONAL] = args[1:]
        kwargs_list.append(kw)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(calibration):
            if isinstance(batch, dict):
                batch = batch["input_ids"]
            if not isinstance(batch, torch.Tensor) or batch.dtype not in (torch.int64, torch.int32):
                raise CalibrationError(f"calibration batch {i} must be a LongTensor [batch, seq] of token ids, "
                                 f"got {type(batch).__name__}"
                                 + (f" of dtype {batch.dtype}" if isinstance(batch, torch.Tensor) else ""))
            if batch.dim() == 1:
                batch = batch.unsqueeze(0)
            if batch.dim() != 2 or batch.numel() == 0:
                raise CalibrationError(f"calibration batch {i} must be a non-empty [batch, seq] tensor, "
                                 f"got shape {tuple(batch.shape)}")
            try:
                with torch.no_grad():
                    model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not inputs:
        raise CalibrationError("calibration is empty: GPTQ needs at least one batch of token ids "
                         "(an iterable of LongTensor [batch, seq])")
    return inputs, kwargs_list


def _run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs_list: list[dict[str, Any]]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for x, kw in zip(inputs, kwargs_list):
            kw = dict(kw)
            rest = kw.pop(_POSITIONAL, ())
            y = block(x, *rest, **kw)
            outs.append(y[0] if isinstance(y, (tuple, list)) else y)
    return outs


def _solve_block(block: nn.Module, linears: dict[str, nn.Linear], inputs: list[torch.Tensor],
                 kwargs_list: list[dict[str, Any]], spec: GridOptions) -> dict[str, QuantResult]:
    """GPTQ on one block's linears, group by group (`sequential_groups`); each solved weight is written back
    dequantized, so later groups (and the next block) see the quantized layer."""
    results: dict[str, QuantResult] = {}
    for group in sequential_groups(linears, spec.true_sequential):
        solvers = {n: GPTQ(linears[n].in_features, device=linears[n].weight.device) for n in group}
        handles = [
            linears[n].register_forward_hook(lambda _m, inp, _out, s=solvers[n]: s.add_batch(inp[0]))
            for n in group
        ]
        try:
            _run_block(block, inputs, kwargs_list)
        finally:
            for h in handles:
                h.remove()
        for n in group:
            lin = linears[n]
            res = solvers.pop(n).quantize(
                lin.weight, bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                act_order=spec.act_order, static_groups=spec.static_groups,
                damp_percent=spec.damp_percent, block_size=spec.block_size)
            results[n] = res
            with torch.no_grad():
                lin.weight.copy_(res.dequantize().to(lin.weight.dtype))
    return results


def quantize_model(
    model: nn.Module,
    spec: GridOptions,
    *,
    method: str,
    calibration: Iterable[Any] | None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Quantize every linear of every decoder block of ``model`` in place (``spec``: `RTNOptions` or
    `GPTQOptions`; its ``skip_modules`` are left alone); returns a summary dict."""
    numel = sum(p.numel() for p in model.parameters())
    with _few_threads(numel // 16, _model_device(model)):  # tiny models: threads only add overhead
        return _quantize_model(model, spec, method=method, calibration=calibration, progress=progress)


def _quantize_model(
    model: nn.Module,
    spec: GridOptions,
    *,
    method: str,
    calibration: Iterable[Any] | None,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    skip_modules = spec.skip_modules
    prefix, blocks = find_blocks(model)
    # Validate every layer before any work, so a bad group size fails fast and names the layer.
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block, f"{prefix}.{i}", skip_modules).items():
            check_bits_and_group(spec.bits, spec.group_size, lin.in_features, where=f"{prefix}.{i}.{name}")
            if (lin.in_features * spec.bits) % 32 or (lin.out_features * spec.bits) % 32:
                raise InvalidOptionError(
                    f"{prefix}.{i}.{name}: in_features*bits={lin.in_features * spec.bits} and out_features*bits="
                    f"{lin.out_features * spec.bits} must be multiples of 32 for the GPTQ int32 layout "
                    f"(skip it with skip_modules=[..., {name!r}])")
    losses: dict[str, float] = {}
    damps: dict[str, float] = {}
    quantized: list[str] = []
    if method == "rtn":
        for i, block in enumerate(blocks):
            for name, lin in block_linears(block, f"{prefix}.{i}", skip_modules).items():
                res = rtn(lin.weight, spec.bits, spec.group_size, spec.sym)
                _set_module(block, name, QuantLinear.from_result(lin, res, spec.layout))
                quantized.append(f"{prefix}.{i}.{name}")
            if progress:
                progress(f"{prefix}.{i}", i + 1, len(blocks))
        return {"modules": quantized, "seconds": time.perf_counter() - start}

    if calibration is None:
        raise CalibrationError("calibration is required for GPTQ: pass an iterable of LongTensor [batch, seq]")
    was_training = model.training
    model.eval()
    try:
        inputs, kwargs_list = capture_block_inputs(model, blocks, calibration)
        for i, block in enumerate(blocks):
            full = f"{prefix}.{i}"
            linears = block_linears(block, full, skip_modules)
            results = _solve_block(block, linears, inputs, kwargs_list, spec)
            for n, res in results.items():
                losses[f"{full}.{n}"] = res.loss
                damps[f"{full}.{n}"] = res.damp_percent
                _set_module(block, n, QuantLinear.from_result(linears[n], res, spec.layout))
                quantized.append(f"{full}.{n}")
            inputs = _run_block(block, inputs, kwargs_list)
            if progress:
                progress(full, i + 1, len(blocks))
    finally:
        model.train(was_training)
    return {"modules": quantized, "losses": losses, "damp_percent_used": damps,
            "seconds": time.perf_counter() - start}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every `QuantLinear` back for an ``nn.Linear`` holding its dequantized weight (in place).

    Used to merge a LoRA adapter into a GPTQ-quantized base (dequantize, merge, quantize again) and for
    comparisons; the result is as large as the unquantized model.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device=module.qweight.device)
            with torch.no_grad():
                lin.weight.copy_(module.dequantize())
                if module.bias is not None:
                    lin.bias.copy_(module.bias.float())
            _set_module(model, name, lin)
    config = getattr(model, "config", None)
    if isinstance(getattr(config, "quantization_config", None), dict):
        delattr(config, "quantization_config")
    return model
