"""`llmtune train CONFIG.yaml`, `llmtune generate`, `llmtune merge`, `llmtune demo --out DIR`.

Parsing and rendering only: the work is done by `llmtune.trainers` and `llmtune.demo`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def _render_eval(evals: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not evals:
        return
    table = Table(title="held-out evaluation")
    table.add_column("when")
    keys = [k for k in ("rougeL", "rouge1", "bleu", "exact_match", "n", "loss", "perplexity")
            if all(k in s for s in evals.values())]
    for k in keys:
        table.add_column(k, justify="right")
    for when, scores in evals.items():
        table.add_row(when, *(f"{scores.get(k, float('nan')):.4g}" for k in keys))
    Console().print(table)


def _render_check(report: object, as_json: bool) -> None:
    """The checks, the memory breakdown and the fit verdict per GPU of `llmtune.trainers.check_config`."""
    from rich.console import Console
    from rich.table import Table

    rep: Any = report
    if as_json:
        est = rep.estimate
        typer.echo(json.dumps({"ok": rep.ok, "gpu": rep.gpu, "checks": [vars(c) for c in rep.checks],
                               "estimate": est.to_dict() if est is not None else None, "gpus": rep.rows}))
        return
    con = Console()
    checks = Table(title="checks")
    for col in ("check", "", "detail"):
        checks.add_column(col, overflow="fold")
    for c in rep.checks:
        checks.add_row(c.name, "[green]ok[/]" if c.ok else "[bold red]FAIL[/]", c.detail)
    con.print(checks)
    if rep.estimate is not None:
        est = rep.estimate
        terms = Table(title=f"memory estimate (peak phase: {est.peak_phase})")
        terms.add_column("term")
        terms.add_column("MiB", justify="right")
        for term, n in sorted(est.breakdown.items(), key=lambda kv: -kv[1]):
            if n:
                terms.add_row(term, f"{n / 2**20:,.0f}")
        terms.add_row("[bold]device (peak + CUDA context + allocator reserve)[/]", f"{est.device_bytes / 2**20:,.0f}")
        con.print(terms)
        fit = Table(title="fit per GPU" + (" (this config's device peak, evaluation included)" if rep.rows else ""))
        for col in ("gpu", "capacity GiB", "needs GiB", "fits", "headroom GiB"):
            fit.add_column(col, justify="left" if col == "gpu" else "right")
        for r in rep.rows:
            fit.add_row(r["gpu"], f"{r['capacity_bytes'] / 2**30:.1f}", f"{r['device_bytes'] / 2**30:.2f}",
                        "[green]yes[/]" if r["fits"] else "[bold red]no[/]", f"{r['headroom_bytes'] / 2**30:.2f}")
        con.print(fit)
        for note in rep.rows[0]["notes"] if rep.rows else []:
            con.print(f"[yellow]note[/]: {note}", highlight=False)


def _run_check(cfg: Any, config: Path, gpu: str | None, processes: int, as_json: bool) -> None:
    """``train --check``: render `llmtune.trainers.check_config`; exit 1 when a check fails or it does not fit."""
    from rich.console import Console

    from llmtune.trainers.check import check_config

    report = check_config(cfg, gpu=int(gpu) if gpu and gpu.isdigit() else gpu, processes=processes)
    _render_check(report, as_json)
    if not as_json and report.ok:
        Console().print(f"[green]ok[/]: {config} is a valid config ({cfg.trainer.describe()})")
    elif not as_json:
        failed = [c.name for c in report.checks if not c.ok]
        why = [f"failed: {', '.join(failed)}"] if failed else []
        why += [f"does not fit {gpu}"] if report.rows and not all(r["fits"] for r in report.rows) else []
        Console(stderr=True).print(f"[bold red]check failed[/]: {config}: {'; '.join(why)}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def _callbacks(options: object, loggers: tuple[str, ...] = ()) -> list[object]:
    """What the CLI attaches to a run: a progress bar (unless the options say progress: false), one-line
    messages for Ctrl-C and guard stops (stderr), and the config's ``loggers`` (tensorboard, mlflow, wandb)."""
    from rich.console import Console

    from llmtune.trainers.callbacks import ConsoleReporter, MLflowLogger, ProgressBar, TensorBoardLogger, WandbLogger

    err = Console(stderr=True)
    # the interrupt message is the command's own (it also covers a Ctrl-C before training started)
    out: list[object] = [ConsoleReporter(lambda line: err.print(line, highlight=False), interrupts=False)]
    if getattr(options, "progress", False):
        out.append(ProgressBar(every=int(getattr(options, "log_every", 1))))
    makers = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}
    out.extend(makers[name]() for name in loggers)
    return out


def _quiet_transformers() -> None:
    """No weight-loading progress bars in command output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        config: Annotated[Path, typer.Argument(help="YAML config (see docs/config.md).")],
        resume: str = typer.Option(None, "--resume", help="'auto' (newest checkpoint in output_dir) or a checkpoint "
                                   "path; overrides the config's 'resume'."),
        check: bool = typer.Option(False, "--check", help="Check model, data, options and memory without training; "
                                   "exit 1 when a check fails or the config does not fit --gpu."),
        gpu: str = typer.Option(None, "--gpu", help="With --check: the GPU to judge the fit on (H100, A100-80GB, "
                                "T4, ... or bytes); default: show every known GPU."),
        processes: int = typer.Option(1, "--processes", min=1, help="With --check: data-parallel processes."),
        as_json: bool = typer.Option(False, "--json", help="With --check: one JSON object instead of tables."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace another run's files in output_dir."),
        allow_change: Annotated[list[str] | None, typer.Option(
            "--allow-change", help="Resume although this setting changed (repeatable: max_steps, lr, data, ...).")] = None,
    ) -> None:
        """Fine-tune as a YAML config says (LoRA/DoRA/prompt tuning/QLoRA); writes adapter, checkpoints, log."""
        from rich.console import Console

        from llmtune.trainers._config import load_config, run

        cfg = load_config(config)
        _quiet_transformers()
        if check:
            _run_check(cfg, config, gpu, processes, as_json)
            return
        elif gpu is not None or processes != 1 or as_json:
            from llmtune.core.errors import ConfigError

            raise ConfigError("--gpu, --processes and --json go with --check")
        try:
            result = run(cfg, resume=resume, overwrite=overwrite, allow_changes=tuple(allow_change or ()),
                         callbacks=_callbacks(cfg.trainer.options, cfg.loggers))
        except KeyboardInterrupt as exc:
            # the trainer raises KeyboardInterrupt("interrupted after step N; checkpoint PATH") once it saved one;
            # SIGTERM: the same, as `Terminated` (exit 143)
            from llmtune.core.signals import exit_code

            saved = "checkpoint" in str(exc)
            Console(stderr=True).print("[yellow]interrupted[/]: " + (
                f"{exc}; rerun with --resume auto" if saved
                else "before a checkpoint was saved; nothing to resume from this run"))
            raise typer.Exit(exit_code(exc)) from None
        said = {"checkpoint_skipped": "skipped damaged checkpoint", "fell_back": "resumed from",
                "lock_taken_over": "took over"}
        for event in result.extra.get("checkpoint_events", []):
            if event["event"] in said:
                what = said[event["event"]]
                Console(stderr=True).print(f"[yellow]{what}[/] {event['path']}: {event['reason']}",
                                           highlight=False, soft_wrap=True)
        _render_eval(result.eval)
        what = "adapter" if result.adapter_dir is not None else "model"
        if result.stopped_early:
            Console(stderr=True).print(f"[bold red]stopped early[/]: {result.stopped_early}; {what}: "
                                       f"{result.model_dir}")
            raise typer.Exit(3)
        Console().print(f"{what}: {result.model_dir}\nlog: {result.output_dir}/log.jsonl")

    @app.command("generate")
    def generate(
        prompt: Annotated[list[str], typer.Argument(help="One or more prompts (instructions).")],
        model: str = typer.Option(None, "--model", "-m", help="Base model dir, .gguf file or hub id (default: the adapter's)."),
        adapter: Annotated[Path | None, typer.Option("--adapter", "-a", help="Adapter directory written by llmtune train.")] = None,
        template: str = typer.Option("llama3", "--template", help="llama3, chatml, alpaca, tokenizer, or 'none'."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
        temperature: float = typer.Option(0.0, "--temperature", help="0: greedy (default); > 0: sample."),
        top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling: keep the smallest set of tokens "
                                    "whose probability reaches this (needs --temperature > 0)."),
        top_k: int = typer.Option(None, "--top-k", help="Sample among the k likeliest tokens (0: all)."),
        seed: int = typer.Option(None, "--seed", help="Seed for sampling: the same seed gives the same answers."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt."),
    ) -> None:
        """Answer prompts with a model (greedy, or sampled with --temperature), optionally with an adapter on top."""
        from rich.console import Console

        from llmtune.trainers._evaluate import sampling_options
        from llmtune.trainers._inference import generate_text, load_for_inference

        _quiet_transformers()
        sampling_options(temperature, top_p, top_k, seed)  # bad options fail before the model loads
        m, tok = load_for_inference(model, adapter)
        answers = generate_text(m, tok, list(prompt), template=None if template == "none" else template,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)
        console = Console()
        for p, a in zip(prompt, answers):
            if as_json:
                typer.echo(json.dumps({"prompt": p, "answer": a}))
            else:
                console.print(f"[bold]>[/] {p}\n{a}", highlight=False)

    @app.command("merge")
    def merge(
        adapter: Annotated[Path, typer.Option("--adapter", "-a", help="LoRA/DoRA adapter directory.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Where the merged model (safetensors) goes.")],
        model: str = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's recorded base)."),
        dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16."),
    ) -> None:
        """Fold an adapter into its base model and save the result as safetensors."""
        from rich.console import Console

        from llmtune.trainers._inference import merge_adapter

        _quiet_transformers()
        path = merge_adapter(adapter, out, model=model, dtype=dtype)
        Console().print(f"merged model written to {path}")

    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("llmtune-demo"),
        seed: int = typer.Option(0, "--seed"),
        pretrain_steps: int = typer.Option(None, "--pretrain-steps", min=1, help="Shorter/longer pretraining."),
        epochs: int = typer.Option(None, "--epochs", min=1, help="Fine-tuning epochs."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        rlhf: bool = typer.Option(False, "--rlhf", help="Second act: rankings -> reward model -> RLOO."),
    ) -> None:
        """Offline CPU demo: tiny model, pretraining, LoRA fine-tuning, ROUGE-L/BLEU before and after."""
        from rich.console import Console

        from llmtune.demo import run_demo

        console = Console()
        summary = run_demo(out, seed=seed, pretrain_steps=pretrain_steps, epochs=epochs,
                           progress=not no_progress, echo=lambda s: console.print(s, highlight=False), rlhf=rlhf)
        _render_eval({when: {k: summary[f"{k}_{when}"] for k in ("rougeL", "rouge1", "bleu", "exact_match")}
                      for when in ("before", "after")})
