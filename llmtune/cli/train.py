"""`llmtune train CONFIG.yaml`, `llmtune generate`, `llmtune merge`, `llmtune demo --out DIR`.

Parsing and rendering only: the work is done by `llmtune.trainers` and `llmtune.demo`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

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


def _callbacks(options: object, loggers: tuple[str, ...] = ()) -> list[object]:
    """What the CLI attaches to a run: a progress bar (unless the options say progress: false), one-line
    messages for Ctrl-C and guard stops (stderr), and the config's ``loggers`` (tensorboard, mlflow)."""
    from rich.console import Console

    from llmtune.trainers.callbacks import ConsoleReporter, MLflowLogger, ProgressBar, TensorBoardLogger

    err = Console(stderr=True)
    # the interrupt message is the command's own (it also covers a Ctrl-C before training started)
    out: list[object] = [ConsoleReporter(lambda line: err.print(line, highlight=False), interrupts=False)]
    if getattr(options, "progress", False):
        out.append(ProgressBar(every=int(getattr(options, "log_every", 1))))
    makers = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}
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
        check: bool = typer.Option(False, "--check", help="Only validate the config, then exit."),
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
            Console().print(f"[green]ok[/]: {config} is a valid config ({cfg.trainer.describe()})")
            return
        try:
            result = run(cfg, resume=resume, overwrite=overwrite, allow_changes=tuple(allow_change or ()),
                         callbacks=_callbacks(cfg.trainer.options, cfg.loggers))
        except KeyboardInterrupt as exc:
            # the trainer raises KeyboardInterrupt("interrupted after step N; checkpoint PATH") once it saved one
            saved = "checkpoint" in str(exc)
            Console(stderr=True).print("[yellow]interrupted[/]: " + (
                f"{exc}; rerun with --resume auto" if saved
                else "before a checkpoint was saved; nothing to resume from this run"))
            raise typer.Exit(130) from None
        for event in result.extra.get("checkpoint_events", []):
            if event["event"] in ("checkpoint_skipped", "fell_back"):
                what = "skipped damaged checkpoint" if event["event"] == "checkpoint_skipped" else "resumed from"
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
        model: str = typer.Option(None, "--model", "-m", help="Base model dir or hub id (default: the adapter's)."),
        adapter: Annotated[Path | None, typer.Option("--adapter", "-a", help="Adapter directory written by llmtune train.")] = None,
        template: str = typer.Option("llama3", "--template", help="llama3, chatml, alpaca, tokenizer, or 'none'."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt."),
    ) -> None:
        """Answer prompts greedily with a model, optionally with an adapter on top."""
        from rich.console import Console

        from llmtune.trainers._inference import generate_text, load_for_inference

        _quiet_transformers()
        m, tok = load_for_inference(model, adapter)
        answers = generate_text(m, tok, list(prompt), template=None if template == "none" else template,
                                max_new_tokens=max_new_tokens)
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
