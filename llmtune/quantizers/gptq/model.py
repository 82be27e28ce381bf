"""Layer-by-layer driver: GPTQ (or RTN) over the decoder blocks of a transformers causal LM.

The calibration samples are stacked into batches (`stack_calibration`) and run through the model up to the
first decoder block (its inputs are captured, then the forward is stopped). Each block is then quantized on
the inputs produced by the *already quantized* blocks before it: for each "true sequential" group (attention
q/k/v, then o, then mlp up/gate, then down) one pass of the batches, stopped as soon as the group's linears
have seen their inputs, accumulates the Hessians (one per distinct input tensor), the group is solved and
written back, so the next group's pass sees it quantized; the linears are swapped for packed `QuantLinear`s
and one full pass produces the next block's inputs.
"""

from __future__ import annotations

import dataclasses
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


#: Tokens per stacked calibration batch (rows of equal length are stacked until this many; the block forwards
#: and the Hessian products then run on [batch, seq] tensors instead of one sample at a time).
BATCH_TOKENS = 8192


@dataclasses.dataclass
class _Batch:
    """One stacked calibration batch at a block's input: hidden states, the block's keyword arguments, and
    which positions are real tokens (None: all of them; right padding otherwise, excluded from the Hessians)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    tokens: torch.Tensor | None


def _calibration_rows(calibration: Iterable[Any]) -> list[torch.Tensor]:
    """Every calibration sample as a 1-D LongTensor of its real tokens (an ``attention_mask`` drops padding)."""
    rows: list[torch.Tensor] = []
    for i, batch in enumerate(calibration):
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
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
        if mask is not None:
            mask = torch.as_tensor(mask).reshape(batch.shape).bool()
        for r, row in enumerate(batch.long()):
            row = row[mask[r]] if mask is not None else row
            if row.numel():
                rows.append(row)
    if not rows:
        raise CalibrationError("calibration is empty: GPTQ needs at least one batch of token ids "
                               "(an iterable of LongTensor [batch, seq])")
    return rows


def stack_calibration(rows: list[torch.Tensor], batch_tokens: int = BATCH_TOKENS
                      ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Stack samples into ``(input_ids, attention_mask)`` batches of at most ``batch_tokens`` tokens (at least one
    row each), right-padded; the mask is None when every row of a batch has the same length.

    Rows are stacked in their order, so equal-length calibration (the usual windows) never needs padding.
    """
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    start = 0
    while start < len(rows):
        end, longest = start + 1, rows[start].numel()
        while end < len(rows) and (end - start + 1) * max(longest, rows[end].numel()) <= batch_tokens:
            longest = max(longest, rows[end].numel())
            end += 1
        chunk = rows[start:end]
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        mask = torch.zeros(len(chunk), longest, dtype=torch.long)
        for r, row in enumerate(chunk):
            ids[r, :row.numel()] = row
            mask[r, :row.numel()] = 1
        out.append((ids, None if bool(mask.all()) else mask))
        start = end
    return out


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calibration: Iterable[Any],
                         batch_tokens: int = BATCH_TOKENS) -> list[_Batch]:
    """Stack the calibration samples (`stack_calibration`) and run each batch up to the first block; return
    the block's inputs (hidden states and keyword arguments: attention mask, position embeddings...)."""
    device = _model_device(model)
    captured: list[_Batch] = []
    tokens: list[torch.Tensor | None] = [None]

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kw["use_cache"] = False
        if len(args) > 1:  # other positional arguments (older model code): keep them, in order
            kw[_POSITIONAL] = args[1:]
        captured.append(_Batch(hidden.detach(), kw, tokens[0]))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, mask in stack_calibration(_calibration_rows(calibration), batch_tokens):
            tokens[0] = mask.bool().to(device) if mask is not None else None
            extra = {"attention_mask": mask.to(device)} if mask is not None else {}
            try:
                with torch.no_grad():
                    model(input_ids=ids.to(device), use_cache=False, **extra)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _forward(block: nn.Module, batch: _Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    kw = dict(batch.kwargs)
    rest = kw.pop(_POSITIONAL, ())
    y = block(batch.hidden if hidden is None else hidden, *rest, **kw)
    return y[0] if isinstance(y, (tuple, list)) else y


def _run_block(block: nn.Module, batches: list[_Batch]) -> list[_Batch]:
    """The block's outputs: the next block's inputs (same keyword arguments and token masks)."""
    with torch.no_grad():
        return [dataclasses.replace(b, hidden=_forward(block, b)) for b in batches]


class _SharedHessians:
    """The Hessians of one true-sequential group, one per distinct input tensor: linears called on the same
    tensor (q/k/v on the normed hidden states, up/gate) share one ``GPTQ`` accumulator, built once."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.linears = linears
        self.owner: dict[str, GPTQ] = {}

    def add(self, inputs: dict[str, torch.Tensor], tokens: torch.Tensor | None) -> None:
        """Add one batch: ``inputs`` maps each linear called in this forward to its input tensor."""
        parts: dict[int, list[str]] = {}
        for name, x in inputs.items():
            parts.setdefault(id(x), []).append(name)
        for names in parts.values():
            x = inputs[names[0]]
            rows = x[tokens] if tokens is not None else x.reshape(-1, x.shape[-1])
            for solver in self._solvers_for(names):
                solver.add_batch(rows)

    def _solvers_for(self, names: list[str]) -> list[GPTQ]:
        """One accumulator when ``names`` are exactly the sharers of one (or all are new); else one each."""
        new = [n for n in names if n not in self.owner]
        if len(new) == len(names):
            shared = GPTQ(self.linears[names[0]].in_features, device=self.linears[names[0]].weight.device)
            self.owner.update(dict.fromkeys(names, shared))
            return [shared]
        if not new and len({id(self.owner[n]) for n in names}) == 1 and self.sharers(self.owner[names[0]]) == names:
            return [self.owner[names[0]]]
        for n in names:  # the sharing changed between batches (never seen in practice): split it up
            old = self.owner.get(n)
            own = GPTQ(self.linears[n].in_features, device=self.linears[n].weight.device)
            if old is not None:
                own.H, own.nsamples = old.H.clone(), old.nsamples
            self.owner[n] = own
        return [self.owner[n] for n in names]

    def sharers(self, solver: GPTQ) -> list[str]:
        return [n for n, s in self.owner.items() if s is solver]

    def groups(self) -> list[tuple[list[str], GPTQ]]:
        """``(names, solver)`` for each accumulator, names in the group's order."""
        seen: dict[int, tuple[list[str], GPTQ]] = {}
        for n in self.linears:
            solver = self.owner.get(n)
            if solver is None:
                raise ConfigError(f"GPTQ needs calibration inputs: {n} was never called by the calibration "
                                  "forwards (an MoE expert no sample reached?); skip it with skip_modules")
            seen.setdefault(id(solver), ([], solver))[0].append(n)
        return list(seen.values())


@dataclasses.dataclass
class _Tail:
    """What the last group's full pass keeps, per batch, so that the block's outputs need no further pass:
    the block output, and the last linear's input and (unquantized) output."""

    outputs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    inputs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    produced: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def next_inputs(self, layer: nn.Module, batches: list[_Batch]) -> list[_Batch]:
        """The block's outputs with ``layer`` (the quantized last linear) in place: output + layer(x) - old."""
        with torch.no_grad():
            return [dataclasses.replace(b, hidden=y + (layer(x) - o))
                    for b, y, x, o in zip(batches, self.outputs, self.inputs, self.produced)]


def _group_hessians(block: nn.Module, group: dict[str, nn.Linear], batches: list[_Batch],
                    tail: _Tail | None = None) -> _SharedHessians:
    """One pass of the calibration batches through ``block``, stopped once every linear of ``group`` has seen
    its input (the rest of the block cannot change those inputs); with ``tail`` (a group of one linear whose
    output adds straight into the block's), the pass runs to the end and fills ``tail``."""
    hessians = _SharedHessians(group)
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str, args: tuple[Any, ...]) -> None:
        seen[name] = args[0]  # the tensor itself: linears sharing an input are found by identity
        if tail is None and len(seen) == len(group):
            raise _StopForward

    handles = [lin.register_forward_pre_hook(lambda _m, a, n=n: hook(n, a)) for n, lin in group.items()]
    if tail is not None:
        (name, lin), = group.items()
        handles.append(lin.register_forward_hook(lambda _m, a, out: tail.produced.append(out)))
    try:
        for batch in batches:
            seen.clear()
            try:
                with torch.no_grad():
                    y = _forward(block, batch)
                if tail is not None:
                    tail.outputs.append(y)
                    tail.inputs.append(seen[name])
            except _StopForward:
                pass
            hessians.add(dict(seen), batch.tokens)
    finally:
        for h in handles:
            h.remove()
    return hessians


def adds_to_output(block: nn.Module, linear: nn.Module, batch: _Batch) -> bool:
    """Whether ``block``'s output moves by exactly what ``linear``'s output moves (a residual add, as the last
    linear of a pre-norm block): then the block's outputs after quantizing ``linear`` need no new pass."""
    g = torch.Generator().manual_seed(0)
    shift: list[torch.Tensor] = []

    def nudge(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor:
        d = torch.randn(out.shape, generator=g).to(out) * out.abs().mean().clamp_min(1e-3)
        shift.append(d)
        return out + d

    with torch.no_grad():
        y0 = _forward(block, batch)
        handle = linear.register_forward_hook(nudge)
        try:
            y1 = _forward(block, batch)
        finally:
            handle.remove()
    if len(shift) != 1 or y1.shape != shift[0].shape:
        return False
    scale = torch.maximum(y0.abs().max(), shift[0].abs().max())
    return bool((y1 - y0 - shift[0]).abs().max() <= 1e-4 * scale)


def _solve_block(block: nn.Module, linears: dict[str, nn.Linear], batches: list[_Batch],
                 spec: GridOptions, additive_tail: bool = False) -> tuple[dict[str, QuantResult], _Tail | None]:
    """GPTQ on one block's linears, group by group (`sequential_groups`), one (partial) pass per group; each
    solved weight is written back dequantized, so later groups (and the next block) see the quantized layer.

    Linears with one shared Hessian (same input) are solved as one stacked weight: GPTQ treats every output
    row alone given the Hessian, so this is the same computation with fewer, larger operations. With
    ``additive_tail`` (see `adds_to_output`) a last group of one linear is collected by a full pass whose
    `_Tail` gives the block's outputs afterwards.
    """
    results: dict[str, QuantResult] = {}
    groups = sequential_groups(linears, spec.true_sequential)
    tail = _Tail() if additive_tail and len(groups) > 1 and len(groups[-1]) == 1 else None
    for k, group in enumerate(groups):
        hessians = _group_hessians(block, {n: linears[n] for n in group}, batches,
                                   tail if k == len(groups) - 1 else None)
        for names, solver in hessians.groups():
            weights = [linears[n].weight for n in names]
            stacked = solver.quantize(
                torch.cat(weights) if len(weights) > 1 else weights[0], bits=spec.bits, group_size=spec.group_size,
                sym=spec.sym, act_order=spec.act_order, static_groups=spec.static_groups,
                damp_percent=spec.damp_percent, block_size=spec.block_size)
            for n, res in zip(names, stacked.split_rows([w.shape[0] for w in weights])):
                results[n] = res
                with torch.no_grad():
                    linears[n].weight.copy_(res.dequantize().to(linears[n].weight.dtype))
    return results, tail


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
        batches = capture_block_inputs(model, blocks, calibration)
        additive = _tail_is_additive(blocks[0], block_linears(blocks[0], f"{prefix}.0", skip_modules), batches, spec)
        for i, block in enumerate(blocks):
            full = f"{prefix}.{i}"
            linears = block_linears(block, full, skip_modules)
            results, tail = _solve_block(block, linears, batches, spec, additive)
            for n, res in results.items():
                losses[f"{full}.{n}"] = res.loss
                damps[f"{full}.{n}"] = res.damp_percent
                _set_module(block, n, QuantLinear.from_result(linears[n], res, spec.layout))
                quantized.append(f"{full}.{n}")
            if i + 1 < len(blocks):  # the last block's outputs feed nothing
                last = sequential_groups(linears, spec.true_sequential)[-1][0]
                batches = tail.next_inputs(block.get_submodule(last), batches) if tail else _run_block(block, batches)
            if progress:
                progress(full, i + 1, len(blocks))
    finally:
        model.train(was_training)
    return {"modules": quantized, "losses": losses, "damp_percent_used": damps,
            "seconds": time.perf_counter() - start}


def _tail_is_additive(block: nn.Module, linears: dict[str, nn.Linear], batches: list[_Batch],
                      spec: GridOptions) -> bool:
    """`adds_to_output` for the last true-sequential group of the first block, when it is one linear (checked
    once: the blocks are identical modules)."""
    groups = sequential_groups(linears, spec.true_sequential)
    if len(groups) < 2 or len(groups[-1]) != 1:
        return False
    return adds_to_output(block, linears[groups[-1][0]], batches[0])


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
