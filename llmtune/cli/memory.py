"""`llmtune memory MODEL`: the memory model's breakdown as a table, which GPUs it fits, solvers, plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def _spec(model: str) -> Any:
    """A ModelSpec from a preset name, a config.json path or a model directory."""
    from llmtune.memory import ModelSpec
    from llmtune.models.loading import gguf_path, model_config

    if gguf_path(model) is not None:
        return ModelSpec.from_hf_config(model_config(model))
    if Path(model).is_file() and Path(model).suffix != ".json":
        from llmtune.core.errors import ConfigError

        raise ConfigError(f"{model}: not a config.json; give a model directory, its config.json or a preset name")
    if Path(model).exists():
        return ModelSpec.from_hf_config(model)
    return ModelSpec.from_preset(model)


def _mib(n: int) -> str:
    from llmtune.core.units import MiB

    return f"{n / MiB:,.0f}"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from llmtune.core.errors import MissingDependencyError

        raise MissingDependencyError("--plot needs matplotlib: pip install 'llmtune[plot]'") from None
    return plt


def check_plot_path(path: str) -> None:
    """Refuse, before any work, a --plot path matplotlib could not write: unknown format, directory, no folder."""
    import os

    from llmtune.core.errors import ConfigError

    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--plot {path} is a directory; give a file name such as {target / 'memory.png'}")
    plt = _pyplot()
    fig = plt.figure()
    formats = fig.canvas.get_supported_filetypes()
    plt.close(fig)
    suffix = target.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ConfigError(f"--plot {path}: unknown image format {suffix or '(no extension)'!r}; use one of "
                          f"{', '.join(sorted(formats))}")
    folder = target.parent
    if not folder.is_dir():
        raise ConfigError(f"--plot {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--plot {path}: folder {folder} is not writable")


def plot_estimate(estimate: Any, path: str, title: str) -> None:
    """Write a stacked bar chart (one bar per phase, one colour per term) to ``path``."""
    plt = _pyplot()
    phases = list(estimate.phase_breakdowns)
    terms: list[str] = []
    for p in phases:
        terms += [t for t in estimate.phase_breakdowns[p] if t not in terms]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(phases)), 6))
    bottom = [0.0] * len(phases)
    cmap = plt.get_cmap("tab20")
    for i, term in enumerate(terms):
        vals = [estimate.phase_breakdowns[p].get(term, 0) / 2**30 for p in phases]
        ax.bar(phases, vals, bottom=bottom, label=term, color=cmap(i % 20))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.axhline(estimate.peak_tensor_bytes / 2**30, color="black", linestyle="--", linewidth=1, label="peak")
    ax.set_ylim(0, 1.08 * max([*bottom, estimate.peak_tensor_bytes / 2 ** 30]))
    ax.set_ylabel("GiB (max_memory_allocated)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_capacity(con: Any, cap: Any, gpu: str, seq: int, tp: int) -> None:
    """vLLM's block pool and the concurrency it admits, as a table."""
    from rich.table import Table

    t = Table(title=f"vLLM on {gpu}" + (f" (tensor parallel {tp}, per GPU)" if tp > 1 else ""))
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [("requested (total x gpu_memory_utilization)", f"{_mib(cap.requested_bytes)} MiB"),
            ("weights + profiling-run peak", f"{_mib(cap.non_kv_bytes)} MiB"),
            ("KV block pool", f"{_mib(cap.kv_pool_bytes)} MiB"),
            ("KV per token (all layers, this GPU)", f"{cap.kv_bytes_per_token / 1024:,.0f} KiB"),
            (f"blocks of {cap.block_size} tokens", f"{cap.num_blocks:,}"),
            ("tokens of KV cache", f"{cap.kv_tokens:,}"),
            (f"max concurrency at max_model_len={cap.max_model_len:,}", f"{cap.max_concurrency():.2f}x")]
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    con.print(f"concurrent sequences of {seq:,} tokens: [bold]{cap.concurrent_sequences(seq)}[/]"
              f" (max_num_seqs {cap.max_num_seqs})")


def _engine_kwargs(engine: str, gpu: str, vllm: dict[str, Any]) -> dict[str, Any]:
    """The serving estimator's engine arguments for ``--engine``: none for hf, the block pool for vllm."""
    if engine == "hf":
        return {}
    if engine == "vllm":
        return {"engine": "vllm", "gpu": gpu, "vllm": vllm}
    from llmtune.core.errors import InvalidOptionError

    raise InvalidOptionError(f"--engine {engine!r} is not one of hf, vllm")


def _solve(est: Any, spec: Any, gpu: str, batch: int, seq: int, mode: str, kw: dict[str, Any], *,
           max_batch: bool, max_seq: bool) -> dict[str, int]:
    """What was asked to be solved for (largest batch / sequence on ``gpu``; vLLM: concurrent sequences)."""
    from llmtune.memory import max_batch_size, max_seq_len

    solved: dict[str, int] = {}
    if est.capacity is not None:
        if max_batch or max_seq:
            from llmtune.core.errors import InvalidOptionError

            raise InvalidOptionError("--max-batch/--max-seq solve the hf engine; with --engine vllm read "
                                     "concurrent_sequences from the output")
        solved["concurrent_sequences"] = est.capacity.concurrent_sequences(seq)
    if max_batch:
        solved["max_batch"] = max_batch_size(spec, gpu, seq_len=seq, mode=mode, **kw)
    if max_seq:
        solved["max_seq"] = max_seq_len(spec, gpu, batch_size=batch, mode=mode, **kw)
    return solved


def _print_fits(con: Any, est: Any, solved: dict[str, int], gpu: str) -> None:
    from rich.table import Table

    from llmtune.memory import GPUS

    fits = Table(title="fits on one GPU?")
    fits.add_column("GPU")
    fits.add_column("memory (MiB)", justify="right")
    fits.add_column("fits")
    for name, ok in est.fitting_gpus().items():
        fits.add_row(name, _mib(GPUS[name]), "[green]yes[/]" if ok else "[red]no[/]")
    con.print(fits)
    for k, v in solved.items():
        con.print(f"{k.replace('_', ' ')} on {gpu}: [bold]{v}[/]" + (" (does not fit at all)" if v == 0 else ""))


def register(app: typer.Typer) -> None:
    @app.command("memory")
    def memory(
        model: str = typer.Argument(..., help="Preset name (e.g. llama-3.1-8b), config.json path, model dir or .gguf file."),
        method: str = typer.Option("lora", "--method", help="full, lora, qlora, dora, prompt_tuning, prefix_tuning, ia3 or bottleneck."),
        batch: int = typer.Option(1, "--batch", help="Micro-batch size per GPU."),
        seq: int = typer.Option(2048, "--seq", help="Sequence length in tokens."),
        recipe: str = typer.Option("llmtune", "--recipe", help="Whose loop: llmtune, hf or unsloth."),
        gc: bool = typer.Option(True, "--gc/--no-gc", help="Gradient checkpointing."),
        rank: int = typer.Option(16, "--rank", help="LoRA rank."),
        targets: str = typer.Option("all-linear", "--targets", help="LoRA target modules (comma list)."),
        optimizer: str = typer.Option("adamw", "--optimizer", help="adamw, adamw_8bit, sgd, sgd_momentum, adafactor."),
        attention: str = typer.Option("sdpa", "--attention", help="sdpa, flash or eager."),
        precision: str = typer.Option("bf16", "--precision", help="Full fine-tuning: bf16, fp32 or mixed."),
        objective: str = typer.Option("sft", "--objective", help="sft, reward, dpo or online_rl."),
        packing: bool = typer.Option(False, "--packing", help="Packed sequences (SDPA gets a block-diagonal mask)."),
        virtual_tokens: int = typer.Option(20, "--virtual-tokens", help="Prompt tuning: soft-prompt length."),
        bottleneck: int = typer.Option(64, "--bottleneck", help="Bottleneck adapters: bottleneck size."),
        rl_samples: int = typer.Option(4, "--rl-samples", help="Online RL: samples per prompt."),
        gpus: int = typer.Option(1, "--gpus", help="Number of GPUs."),
        sharding: str = typer.Option("none", "--sharding", help="none, ddp, fsdp, zero1, zero2, zero3."),
        serve: bool = typer.Option(False, "--serve", help="Estimate serving (a forward with KV cache) instead."),
        bits: int = typer.Option(16, "--bits", help="Serving weight bits (16, 8, 4)."),
        kv_bits: int = typer.Option(16, "--kv-bits", help="Serving KV-cache bits."),
        gpu: str = typer.Option("H100", "--gpu", help="GPU for --max-batch/--max-seq (T4, L4, RTX4090, A100-40GB, "
                                                      "A100-80GB, H100, H200)."),
        max_batch: bool = typer.Option(False, "--max-batch", help="Solve for the largest batch that fits --gpu."),
        max_seq: bool = typer.Option(False, "--max-seq", help="Solve for the longest sequence that fits --gpu."),
        engine: str = typer.Option("hf", "--engine", help="Serving engine: hf (one transformers forward) or vllm "
                                                          "(KV block pool; answers how many sequences fit)."),
        util: float = typer.Option(0.9, "--gpu-memory-utilization", help="vLLM gpu_memory_utilization."),
        block_size: int = typer.Option(16, "--block-size", help="vLLM block size in tokens."),
        max_num_seqs: int = typer.Option(256, "--max-num-seqs", help="vLLM max_num_seqs."),
        max_model_len: int = typer.Option(None, "--max-model-len", help="vLLM max_model_len (default: max(--seq, 8192))."),
        prefix: int = typer.Option(0, "--shared-prefix", help="vLLM prefix caching: tokens of prompt every request shares."),
        plot: str = typer.Option(None, "--plot", help="Write a stacked bar chart of the terms to this PNG."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    ) -> None:
        """Predict the peak GPU memory of fine-tuning or serving MODEL, term by term."""
        from llmtune.memory import estimate_serving, estimate_training

        if plot:
            check_plot_path(plot)
        spec = _spec(model)
        if serve:
            kw: dict[str, Any] = dict(weight_bits=bits, kv_bits=kv_bits, gpus=gpus)
            kw |= _engine_kwargs(engine, gpu, dict(
                gpu_memory_utilization=util, block_size=block_size, max_num_seqs=max_num_seqs,
                max_model_len=max_model_len or max(seq, 8192), shared_prefix_tokens=prefix))
            est = estimate_serving(spec, batch_size=batch, seq_len=seq, **kw)
            mode = "serving"
        else:
            kw = dict(method=method, recipe=recipe, gradient_checkpointing=gc, lora_rank=rank, lora_targets=targets,
                      optimizer=optimizer, attention=attention, precision=precision, gpus=gpus, sharding=sharding,
                      objective=objective, packing=packing, num_virtual_tokens=virtual_tokens,
                      bottleneck_size=bottleneck, rl_samples=rl_samples)
            est = estimate_training(spec, batch_size=batch, seq_len=seq, **kw)
            mode = "training"
        solved = _solve(est, spec, gpu, batch, seq, mode, kw, max_batch=max_batch, max_seq=max_seq)
        if plot:
            plot_estimate(est, plot, f"{spec.name} {mode} {'' if serve else method} b{batch} s{seq}")
        if as_json:
            out = {"model": spec.name, "params": spec.num_params, "mode": mode, "batch": batch, "seq": seq,
                   **est.to_dict(), "fits": est.fitting_gpus(), **({"gpu": gpu, **solved} if solved else {})}
            if est.capacity is not None:
                out.pop("fits")
            typer.echo(json.dumps(out))
            return
        from rich.console import Console
        from rich.table import Table

        con = Console()
        what = f"{mode}" + ("" if serve else f" {method} ({recipe} recipe)")
        t = Table(title=f"{spec.name} ({spec.num_params / 1e9:.2f}B params): {what}, batch {batch} x seq {seq}"
                        f"{f', {gpus} GPUs {sharding}' if gpus > 1 else ''}")
        t.add_column("term")
        t.add_column("MiB", justify="right")
        t.add_column("share", justify="right")
        for term, n in sorted(est.breakdown.items(), key=lambda kv: -kv[1]):
            t.add_row(term, _mib(n), f"{100 * n / est.device_bytes:.1f}%")
        t.add_section()
        t.add_row(f"[bold]peak tensors[/] (max_memory_allocated, phase {est.peak_phase})",
                  _mib(est.peak_tensor_bytes), "")
        t.add_row("[bold]device total[/] (+ CUDA context + allocator reserve)", _mib(est.device_bytes), "")
        con.print(t)
        ph = Table(title="peak per phase (the peak is the max, not the sum)")
        ph.add_column("phase")
        ph.add_column("MiB", justify="right")
        for p, n in est.phases.items():
            ph.add_row(("[bold]" + p + "[/]") if p == est.peak_phase else p, _mib(n))
        con.print(ph)
        if est.capacity is not None:
            _print_capacity(con, est.capacity, gpu, seq, gpus)
            for note in est.assumptions:
                con.print(f"[dim]- {note}[/]")
            return
        _print_fits(con, est, solved, gpu)
        if plot:
            con.print(f"plot written to {plot}")
        for note in est.assumptions:
            con.print(f"[dim]- {note}[/]")
